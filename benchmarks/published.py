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
error on iteration time as well. The table is written to OUT, and DOC's generated region
`validation.published` is rendered again from it (analysis.published_doc).

Assumptions (every row; docs/validation.md repeats them): the GPUs are H100 SXM and simulated
with the H200 calibration (same SMs, clocks and NVLink; the H200's HBM is 1.43x faster, so
memory-bound phases are optimistic); fused attention at cuDNN's published rate
(model.attention_kernel = "cudnn", Transformer Engine); virtual pipeline stages (vp > 1) are
not simulated (plain 1F1B: a larger bubble than the published runs had); DeepEP dispatch is
modelled as node-deduplicated all-to-all (parallel.ep_dedup). Nothing is tuned to the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import Config, config_from_dict, with_overrides
from moesim.sim import decoder
from moesim.sim.memory import GPU_MEMORY_GIB, RESERVE_GIB, estimate_config
from traces.schema import Trace, TraceMeta

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT / "docs" / "validation" / "published" / "throughput.csv"
OUT = ROOT / "docs" / "validation" / "published" / "simulated.csv"
DOC = ROOT / "docs" / "validation.md"
# Per source: the implementation choices the simulator is given (from the sources' configs).
SOURCE_SETUP = {
    # Megatron-Core: fused Adam, its vocab-parallel fp32 cross-entropy.
    "mcore": {"train.optimizer_impl": "fused", "train.loss_impl": "megatron"},
    # NeMo AutoModel: torch.optim.Adam (foreach), torch's cross-entropy on the bf16 logits
    # (MaskedCrossEntropy with fp32_upcast false).
    "automodel": {"train.optimizer_impl": "foreach", "train.loss_impl": "torch_nocast"},
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
                    "gpu": "h200", "gpu_memory_gib": GPU_MEMORY_GIB["h100"]},
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
    from moesim.sim.iteration import IterationSimulator, summarize_iterations
    cfg = row_config(row)
    mem = estimate_config(cfg)  # on the row's H100 memory
    # Timed whatever the estimate says: the published run did run, so a "does not fit" is
    # the estimate's miss, reported beside the time (the H200's memory lets it simulate).
    timed = with_overrides(cfg, {"cluster.gpu_memory_gib": GPU_MEMORY_GIB["h200"]})
    t0 = time.perf_counter()
    sim = IterationSimulator(timed, balanced_trace(cfg, int(row.ep)), "balanced")
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
    summary = summarize_iterations([out]).iloc[0]
    p, m, v = int(row.pp), int(row.micro_batches), int(row.vp)
    sim_step = float(out.step_time)
    sim_tps = tokens / sim_step / gpus if np.isfinite(sim_step) else float("nan")
    return {"id": row.id, "model": row.model, "gpus": gpus,
            "layout": f"TP{row.tp} PP{row.pp} VP{row.vp} EP{row.ep} ZeRO{row.zero}",
            "published_step_s": pub_step, "simulated_step_s": sim_step,
            "published_tokens_per_gpu_s": pub_tps, "simulated_tokens_per_gpu_s": sim_tps,
            "published_tflops": pub_tflops,
            "simulated_tflops": flops / sim_step / gpus / 1e12,
            "error": (sim_tps - pub_tps) / pub_tps,
            "peak_memory_gib": mem.peak_gib, "memory": mem.verdict(),
            "compute_ms": float(summary["compute_ms"]),
            "exposed_comm_ms": float(summary["exposed_comm_ms"]),
            "idle_ms": float(summary["idle_ms"]),
            # The pipeline bubble of the simulated schedule (1F1B) and of the published one
            # (interleaved over vp chunks), closed forms (p-1)/(m+p-1) and (p-1)/(vm+p-1).
            "bubble_1f1b": (p - 1) / (m + p - 1),
            "bubble_published": (p - 1) / (v * m + p - 1),
            "wall_s": wall}


PUBLISHED = Path("docs") / "validation" / "published"
TOLERANCE = 0.15  # on tokens/s per GPU (equivalently, iteration time)
# Datasheet HBM bandwidths (NVIDIA H100 SXM and H200 SXM datasheets), TB/s.
HBM_TBS = {"h100": 3.35, "h200": 4.8}
SOURCES = {
    "mcore": "Megatron-Core's MoE README (NVIDIA/Megatron-LM, "
             "megatron/core/transformer/moe/README.md)",
    "automodel": "NeMo AutoModel's DGX-H100 BF16 table (NVIDIA-NeMo/Automodel, "
                 "docs/performance-summary.md)",
}


def verdict(err: float) -> str:
    if not np.isfinite(err):
        return "not simulated"
    if abs(err) <= TOLERANCE:
        return f"within {TOLERANCE:.0%}"
    return "faster than published" if err > 0 else "slower than published"


def _ms(v: float) -> str:
    return f"{max(v, 0.0):,.0f}"


def region(root: Path = ROOT) -> str:
    """The `validation.published` region of docs/validation.md (analysis.doc_regions),
    rendered from the committed throughput.csv, simulated.csv and simulated.meta.json."""
    pub = pd.read_csv(root / PUBLISHED / "throughput.csv", comment="#").set_index("id")
    sim = pd.read_csv(root / PUBLISHED / "simulated.csv")
    meta = json.loads((root / PUBLISHED / "simulated.meta.json").read_text())
    lines = ["Rows: " + "; ".join(
        f"{SOURCES[s]}: " + ", ".join(
            f"{r.model} on {r.gpus} H100 ({r.tflops:.0f} TFLOP/s a GPU)"
            for r in pub[pub.source == s].itertuples()) for s in SOURCES) + ".", "",
        f"Comparison words within {TOLERANCE:.0%} on tokens/s per GPU. HBM by the "
        f"datasheets: H100 SXM {HBM_TBS['h100']} TB/s, H200 {HBM_TBS['h200']} TB/s (whose "
        f"calibration simulates the H100), {HBM_TBS['h200'] / HBM_TBS['h100']:.2f}x; memory "
        f"is the estimate against the H100's {GPU_MEMORY_GIB['h100']:.1f} GiB with the "
        f"{RESERVE_GIB:.0f} GiB reserve. Simulated by `{meta['command']}` on {meta['date']}, "
        f"{meta['machine']}, in {sim['wall_s'].sum():.0f} s.", "",
        "| run | GPUs | layout | published tokens/s/GPU | simulated | error | verdict | "
        "published TFLOP/s/GPU | simulated | simulated: compute / exposed comm / idle (ms) | "
        "bubble: 1F1B simulated / published schedule | memory (estimate, H100) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sim.itertuples():
        lines.append(
            f"| {r.id} | {r.gpus} | {r.layout} | {r.published_tokens_per_gpu_s:,.0f} | "
            f"{r.simulated_tokens_per_gpu_s:,.0f} | {r.error:+.1%} | {verdict(r.error)} | "
            f"{r.published_tflops:.0f} | {r.simulated_tflops:.0f} | {_ms(r.compute_ms)} / "
            f"{_ms(r.exposed_comm_ms)} / {_ms(r.idle_ms)} | {r.bubble_1f1b:.1%} / "
            f"{r.bubble_published:.1%} | {r.memory} |")
    errs = sim["error"].abs()
    within = int((errs <= TOLERANCE).sum())
    lines += ["", f"Median absolute error {errs.median():.1%}, worst {errs.max():.1%}; "
              f"{within} of {len(sim)} rows within {TOLERANCE:.0%}."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--table", type=Path, default=TABLE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--only", action="append", default=[],
                    help="simulate these row ids only and print them (writes nothing)")
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
    if args.only:  # a partial run writes nothing: the table and the doc hold every row
        return
    df = pd.DataFrame(rows)
    with atomic_path(args.out) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")
    meta = {"command": "python -m benchmarks.published", "date": time.strftime("%Y-%m-%d"),
            "machine": f"{platform.node() or 'host'} ({os.cpu_count()} CPUs, "
                       f"{platform.processor() or platform.machine()})"}
    write_text_atomic(args.out.with_suffix(".meta.json"), json.dumps(meta, indent=1) + "\n")
    render_region_into(args.doc, REGION)


REGION = "validation.published"


def render_region_into(doc: Path, name: str) -> None:
    """Render one generated region of `doc` again, leaving the others as they are (each is
    its own area's to regenerate)."""
    from analysis.doc_regions import render_region
    text = doc.read_text()
    begin, end = f"<!-- generated: {name} -->\n", f"<!-- end: {name} -->"
    i, j = text.index(begin) + len(begin), text.index(end)
    write_text_atomic(doc, text[:i] + render_region(name, ROOT) + text[j:])


if __name__ == "__main__":
    main()
