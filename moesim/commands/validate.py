"""`moesim validate --run DIR`: simulate exactly what a runtime run did (moesim.sim.replay) and
compare per phase and per step (analysis.validation)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

from analysis.figure_files import save_figure
from analysis.validation import compare, measured_steps, plot_validation
from moesim.atomic import atomic_path
from moesim.config import parse_override
from moesim.sim.replay import simulate_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="simulate a runtime run and compare with its timings",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, required=True, help="runtime run directory")
    p.add_argument("--out", type=Path, help="folder for comparison.csv and the scatter plot "
                   "(default: RUN/validate)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override the run's config, e.g. cluster.gpu=h200-measured (repeatable)")
    p.set_defaults(func=cmd_validate)


def cmd_validate(args: argparse.Namespace) -> int:
    measured, simulated = simulate_run(args.run, dict(map(parse_override, args.set)))
    # The measured step is the benchmark's own (host time included) where the run records it.
    steps = measured_steps(args.run)[0] if (args.run / "meta.json").exists() else None
    comp = compare(measured, simulated, args.run, steps)
    out = args.out or args.run / "validate"
    with atomic_path(out / "comparison.csv") as tmp:
        comp.to_csv(tmp, index=False)
    fig = plot_validation(comp, title=str(args.run.name),
                          source=str(args.run))
    save_figure(fig, out, "validation")
    with pd.option_context("display.width", 120):
        print(comp.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    step = comp[(comp["phase"] == "step") & (comp["step"] == "mean")]["rel_error"].abs()
    print(f"step-time error {float(step.median()):.1%} (median |rel|); wrote "
          f"{out / 'comparison.csv'} and {out / 'validation'}.png/.pdf")
    return 0
