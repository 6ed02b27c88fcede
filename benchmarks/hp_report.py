"""The issue-17 tables of docs/benchmarks.md, from the committed results of one H200 run.

    python -m benchmarks.hp_report [--dir docs/benchmarks/hp] [--runs docs/validation/runs]

Reads DIR/kernels.json (benchmarks/kernels.py, sections stream_router and fused_expert),
DIR/hp_layer_summary.json (benchmarks/hp_layer.py) and the HP runs' comparison.csv (`moesim
validate --run RUN --set cluster.gpu=h200-hp`, configs/calibration/h200-hp.csv measured in the
same device call), and prints the markdown tables. Verdicts are computed: a speed-up "meets"
its target when it is >= the target; a validation error is "within" 10% when its |median| is
<= 0.10.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

ROUTER_TARGET = 2.0
EXPERT_TARGET = 1.5
VALIDATE_TOL = 0.10


def _verdict(x: float, target: float) -> str:
    return "meets" if x >= target else "misses"


def router_table(res: dict) -> list[str]:
    lines = ["| items (tokens x heads x width), experts, k | pass | streaming ms | dense torch ms "
             f"| speed-up | target {ROUTER_TARGET:g}x |", "| --- | --- | --- | --- | --- | --- |"]
    for key in sorted({k.rsplit("/", 1)[0] for k in res if k.startswith("stream_router/")}):
        for what in ("fwd", "bwd", "fwd+bwd"):
            s, d = res.get(f"{key}/{what} stream"), res.get(f"{key}/{what} dense torch")
            if not s or not d or "ms" not in s:
                continue
            x = d["ms"] / s["ms"]
            lines.append(f"| {key.split('/', 1)[1]} | {what} | {s['ms']:.3f} | {d['ms']:.3f} | "
                         f"{x:.2f}x | {_verdict(x, ROUTER_TARGET)} |")
    return lines


def expert_table(res: dict) -> list[str]:
    lines = ["| head width x expert width | pass | fused ms (best launch shape) | TFLOP/s | "
             f"grouped GEMM + GELU ms | speed-up | target {EXPERT_TARGET:g}x |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key in sorted({k.rsplit("/", 1)[0] for k in res if k.startswith("fused_expert/")}):
        for what in ("fwd", "bwd", "fwd+bwd"):
            f, g = res.get(f"{key}/{what} fused best"), res.get(f"{key}/{what} grouped GEMM + GELU")
            if not f or not g:
                continue
            x = g["ms"] / f["ms"]
            lines.append(f"| {key.split('/', 1)[1]} | {what} | {f['ms']:.3f} ({f['config']}) | "
                         f"{f['TFLOP/s']:.0f} | {g['ms']:.3f} | {x:.2f}x | "
                         f"{_verdict(x, EXPERT_TARGET)} |")
    return lines


def layer_table(summary: dict, runs: Path) -> list[str]:
    lines = ["| model | kernels | kernels chosen | step ms | speed-up | validate step error "
             f"(median) | within {VALIDATE_TOL:.0%} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    results = {r["name"]: r for r in summary["results"]}
    choices = summary.get("kernel_choices", {})
    for name, r in results.items():
        base = results.get(name.replace("-auto", "-baseline"), r)
        comp = runs / f"h200x1-{name}" / "comparison.csv"
        err = "-"
        within = "-"
        if comp.exists():
            c = pd.read_csv(comp)
            # As `moesim validate` reports it: the mean step's |relative error|.
            step = c[(c["phase"] == "step") & (c["step"].astype(str) == "mean")]["rel_error"]
            e = float(step.abs().median())
            err, within = f"{e:.1%}", "yes" if e <= VALIDATE_TOL else "no"
        if r["kernels"] == "auto":
            # Choice keys: "router n H D E k ..." and "experts rows G D F ...": match the width.
            width = str(r["name"].split("-h", 1)[1].split("-", 1)[0])
            picked = [f"{key.split()[0]} {v['choice']}" for key, v in choices.items()
                      if key.split()[3] == width]
            chosen = "; ".join(sorted(picked)) or "-"
        else:
            chosen = "dense router, grouped GEMMs"
        lines.append(f"| {r['name'].rsplit('-', 1)[0]} | {r['kernels']} | {chosen} | "
                     f"{r['step_s'] * 1e3:.3f} | {base['step_s'] / r['step_s']:.2f}x | {err} | "
                     f"{within} |")
    return lines


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", type=Path, default=Path("docs/benchmarks/hp"))
    p.add_argument("--runs", type=Path, default=Path("docs/validation/runs"))
    args = p.parse_args()
    k = json.loads((args.dir / "kernels.json").read_text())
    meta = k["meta"]
    print(f"Machine: {meta.get('gpu')} ({meta.get('sms')} SMs), torch {meta['torch']}, triton "
          f"{meta['triton']}, {meta['date']} UTC; copy ceiling "
          f"{k['results']['ceiling/copy']['TB/s']:.2f} TB/s measured in the same run.\n")
    print("\n".join(router_table(k["results"])))
    print()
    print("\n".join(expert_table(k["results"])))
    print()
    summary = json.loads((args.dir / "hp_layer_summary.json").read_text())
    print("\n".join(layer_table(summary, args.runs)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
