"""Simulated against published training throughput of real MoE training systems.

    python -m benchmarks.published [--table docs/validation/published/throughput.csv] \
        [--out docs/validation/published/simulated.csv] [--doc docs/validation.md] [--only ID]

Each row of the table (sources in its header) becomes a whole-iteration config
(`row_config`): the model from configs/models/<model>.json at the row's sequence length, the
row's GPUs as DGX nodes of 8 (NVSwitch, 8 x 400 Gb/s rail fabric: the dgx-h200 preset's
topology is a DGX-H100's), its TP / PP / EP / ZeRO / recompute / micro-batches, and perfectly
balanced routing (both sources force-balance their benchmarks' token distribution;
`balanced_trace`). One iteration is simulated (moesim.sim.iteration); the simulated tokens/s
per GPU and TFLOP/s per GPU (Megatron's count the row names: `flops_formula`) go beside the
published ones with the error (simulated - published) / published on tokens/s, which is the
error on iteration time as well. The table is written to OUT and into DOC between the
`published-throughput` markers.

Assumptions (every row; docs/validation.md repeats them): the GPUs are H100 SXM and simulated
with the H200 calibration (same SMs, clocks and NVLink; the H200's HBM is 1.43x faster, so
memory-bound phases are optimistic); fused attention at cuDNN's published rate
(model.attention_kernel = "cudnn", Transformer Engine); virtual pipeline stages (vp > 1) are
not simulated (plain 1F1B: a larger bubble than the published runs had); DeepEP dispatch is
modelled as node-deduplicated all-to-all (parallel.ep_dedup). Nothing is tuned to the rows.
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import Config, config_from_dict
from moesim.sim import decoder
from traces.schema import Trace, TraceMeta

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "validation" / "published" / "throughput.csv"
OUT = ROOT / "docs" / "validation" / "published" / "simulated.csv"
DOC = ROOT / "docs" / "validation.md"
BEGIN, END = "<!-- published-throughput:begin -->", "<!-- published-throughput:end -->"
# Comparison words and the tolerance they are computed with.
TOLERANCE = 0.15
# Per source: the implementation choices the simulator is given (from the sources' configs).
SOURCE_SETUP = {
    # Megatron-Core: fused Adam, its vocab-parallel fp32 cross-entropy.
    "mcore": {"train.optimizer_impl": "fused", "train.loss_impl": "megatron"},
    # NeMo AutoModel: torch.optim.Adam (foreach), torch's cross-entropy (MaskedCrossEntropy,
    # fp32_upcast false: no fp32 copy of the logits is made; "torch" counts one: bounded).
    "automodel": {"train.optimizer_impl": "foreach", "train.loss_impl": "torch"},
}


def row_config(row: pd.Series) -> Config:
    """The whole-iteration config of one published row."""
    gpus, tp, pp = int(row.gpus), int(row.tp), int(row.pp)
    if gpus % 8:
        raise ValueError(f"{row.id}: {gpus} GPUs are not whole DGX nodes")
    raw = {
        "model": {"hf_config": str(ROOT / "configs" / "models" / f"{row.model}.json"),
                  "seq_len": int(row.seq_len), "attention_kernel": "cudnn"},
        "cluster": {"preset": "dgx-h200", "nodes": gpus // 8, "gpus_per_node": 8,
                    "gpu": "h200"},
        "parallel": {"strategy": "ep", "degree": int(row.ep), "tp": tp, "pp": pp,
                     "etp": int(row.etp), "sequence_parallel": tp > 1, "zero": int(row.zero),
                     "ep_dedup": row.dispatcher == "deepep"},
        "train": {"scope": "iteration", "micro_batch_size": int(row.micro_batch),
                  "micro_batches": int(row.micro_batches), "recompute": row.recompute,
                  "precision": "mixed"},
        "run": {"steps": 1},
    }
    for dotted, value in SOURCE_SETUP[row.source].items():
        section, _, name = dotted.partition(".")
        raw[section][name] = value
    cfg = config_from_dict(raw, f"{TABLE.name}:{row.id}")
    dp = gpus // (tp * pp)
    if int(row.global_batch) != dp * int(row.micro_batch) * int(row.micro_batches):
        raise ValueError(f"{row.id}: global batch {row.global_batch} is not dp {dp} x "
                         f"micro-batch {row.micro_batch} x {row.micro_batches}")
    return cfg


def balanced_trace(cfg: Config, shards: int) -> Trace:
    """One step of perfectly balanced routing: every shard sends each expert the same number
    of (token, expert) pairs (the sources' forced balance), for every MoE layer."""
    m = cfg.model
    tokens = cfg.train.micro_batch_size * m.seq_len
    pairs = tokens * m.top_k
    per, rest = divmod(pairs, m.num_experts)
    row = np.full(m.num_experts, per, dtype=np.int32)
    row[:rest] += 1
    counts = np.broadcast_to(row, (1, m.num_moe_layers, shards, m.num_heads, m.num_experts))
    meta = TraceMeta(model=m.name, source="balanced", tokens_per_shard=tokens, top_k=m.top_k,
                     generator={"kind": "balanced"})
    return Trace(np.ascontiguousarray(counts), meta)


def simulate_row(row: pd.Series) -> dict:
    from moesim.sim.iteration import IterationSimulator
    cfg = row_config(row)
    t0 = time.perf_counter()
    sim = IterationSimulator(cfg, balanced_trace(cfg, int(row.ep)), "balanced")
    out = sim.simulate_iteration("ep", 0)
    wall = time.perf_counter() - t0
    gpus = int(row.gpus)
    tokens = int(row.global_batch) * int(row.seq_len)
    causal = row.flops_formula != "megatron-2024"
    flops = decoder.model_flops(cfg.model, tokens, causal=causal)
    pub_tflops = float(row.tflops)
    pub_step = float(row.step_s) if pd.notna(row.step_s) else flops / (pub_tflops * 1e12
                                                                         * gpus)
    pub_tps = tokens / pub_step / gpus
    sim_step = float(out.step_time)
    sim_tps = tokens / sim_step / gpus if np.isfinite(sim_step) else float("nan")
    return {"id": row.id, "model": row.model, "gpus": gpus,
            "layout": f"TP{row.tp} PP{row.pp} VP{row.vp} EP{row.ep} ZeRO{row.zero}",
            "published_step_s": pub_step, "simulated_step_s": sim_step,
            "published_tokens_per_gpu_s": pub_tps, "simulated_tokens_per_gpu_s": sim_tps,
            "published_tflops": pub_tflops,
            "simulated_tflops": flops / sim_step / gpus / 1e12,
            "error": (sim_tps - pub_tps) / pub_tps,
            "peak_memory_gib": out.memory.peak_gib if out.memory else float("nan"),
            "memory": out.memory.verdict() if out.memory else "",
            "wall_s": wall}


def verdict(err: float) -> str:
    """The comparison word, computed with TOLERANCE."""
    if not np.isfinite(err):
        return "not simulated"
    if abs(err) <= TOLERANCE:
        return f"within {TOLERANCE:.0%}"
    return "faster than published" if err > 0 else "slower than published"


def markdown(df: pd.DataFrame, command: str) -> str:
    lines = [BEGIN, "",
             f"Generated by `{command}` on {time.strftime('%Y-%m-%d')} from "
             "`docs/validation/published/throughput.csv` (sources in its header); "
             f"comparison words within +-{TOLERANCE:.0%} on tokens/s.", "",
             "| run | GPUs | layout | published tokens/s/GPU | simulated | error | "
             "published TFLOP/s/GPU | simulated | verdict | simulated peak memory |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in df.itertuples():
        lines.append(f"| {r.id} | {r.gpus} | {r.layout} | {r.published_tokens_per_gpu_s:,.0f} "
                     f"| {r.simulated_tokens_per_gpu_s:,.0f} | {r.error:+.0%} | "
                     f"{r.published_tflops:.0f} | {r.simulated_tflops:.0f} | "
                     f"{verdict(r.error)} | {r.memory} |")
    errs = df["error"].abs()
    lines += ["", f"Median absolute error {errs.median():.0%}, worst {errs.max():.0%} "
              f"({len(df)} rows).", "", END]
    return "\n".join(lines)


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text()
    if BEGIN in text:
        text = re.sub(re.escape(BEGIN) + ".*?" + re.escape(END), lambda _: block, text,
                      flags=re.S)
    else:
        text = text.rstrip("\n") + "\n\n## Published training throughput\n\n" + block + "\n"
    write_text_atomic(doc, text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--only", action="append", default=[], help="row ids (repeatable)")
    args = ap.parse_args()
    table = pd.read_csv(args.table, comment="#")
    if args.only:
        table = table[table["id"].isin(args.only)]
    rows = []
    for _, row in table.iterrows():
        rows.append(simulate_row(row))
        r = rows[-1]
        print(f"{r['id']}: simulated {r['simulated_tokens_per_gpu_s']:,.0f} tokens/s/GPU, "
              f"published {r['published_tokens_per_gpu_s']:,.0f} ({r['error']:+.1%}); "
              f"{r['memory']}; {r['wall_s']:.0f} s", flush=True)
    df = pd.DataFrame(rows)
    with atomic_path(args.out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    if not args.only:
        write_doc(args.doc, markdown(df, "python -m benchmarks.published"))


if __name__ == "__main__":
    main()
