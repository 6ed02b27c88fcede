"""Validate the simulator against every runtime run directory given, in one table.

    python -m benchmarks.validation docs/validation/runs/h200x1-* --out docs/validation \
        [--set cluster.gpu=h200-measured]

For each run, `moesim validate`'s comparison (analysis.validation.compare); then per run the
step-time error and the worst phase, and per strategy the median absolute step-time error. Writes
OUT/comparison.csv (every row), OUT/summary.csv (one row per run) and OUT/passes.csv (each
phase per pass, `analysis.validation.compare_passes`), and prints the summary and the forward
phases' errors (the passes can be judged apart: a runtime bug may spoil one of them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.validation import compare, compare_passes
from moesim.atomic import atomic_path
from moesim.config import parse_override
from moesim.sim.replay import simulate_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override every run's config (moesim validate --set)")
    args = ap.parse_args()
    overrides = dict(map(parse_override, args.set))
    comps, rows, passes = [], [], []
    for run in sorted(args.runs):
        measured, simulated = simulate_run(run, overrides)
        comp = compare(measured, simulated, run).assign(run=run.name)
        comps.append(comp)
        passes.append(compare_passes(measured, simulated).assign(run=run.name))
        mean = comp[comp["step"] == "mean"]
        step = mean[mean["phase"] == "step"].iloc[0]
        phases = mean[(mean["phase"] != "step") & (mean["measured_s"] > 0)]
        worst = phases.loc[phases["rel_error"].abs().idxmax()]
        rows.append({"run": run.name, "strategy": step["strategy"],
                     "measured_step_s": step["measured_s"], "simulated_step_s": step["simulated_s"],
                     "step_error": step["rel_error"], "worst_phase": worst["phase"],
                     "worst_phase_error": worst["rel_error"]})
    summary = pd.DataFrame(rows)
    by_pass = pd.concat(passes, ignore_index=True)
    for name, df in (("comparison.csv", pd.concat(comps, ignore_index=True)),
                     ("summary.csv", summary), ("passes.csv", by_pass)):
        with atomic_path(args.out / name) as tmp:
            df.to_csv(tmp, index=False)
    print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    med = summary.assign(abs_err=summary["step_error"].abs()).groupby("strategy")["abs_err"]
    print("\nmedian |step error| per strategy:")
    print(med.median().to_string(float_format=lambda v: f"{v:.1%}"))
    fwd = by_pass[(by_pass["pass"] == "fwd") & (by_pass["measured_s"] > 0)]
    table = fwd.pivot_table(index="run", columns="phase", values="rel_error")
    print("\nforward phases, relative error (simulated - measured) / measured:")
    print(table.to_string(float_format=lambda v: f"{v:+.0%}"))


if __name__ == "__main__":
    main()
