"""Validate the simulator against measured runs, out of sample, and write docs/validation.md's
numbers:

    python -m benchmarks.validation --sets docs/validation/sets.toml --out docs/validation
    python -m benchmarks.validation --sets docs/validation/sets.toml --out docs/validation \
        --render-only        # re-render docs/validation.md from the committed CSVs
    python -m benchmarks.validation RUN... --out DIR [--set cluster.gpu=NAME]   # ad hoc
    python -m benchmarks.validation --sets docs/validation/sets.toml --out docs/validation \
        --add-set s4-1410 --add-runs /tmp/runs/runs --add-calibration OUT/h200-measured.csv \
        --call "2026-12-01 14:10 UTC" --command "bash benchmarks/device_session.sh ..." \
        --machine "one lent nvidia-h200"    # commit a device call's runs and calibration

With --sets, every run set is scored with every calibration (sets.toml says which device call
took each; the same call is in sample, another is out of sample) into OUT/out_of_sample.csv
(one row per run and calibration); with the primary calibration, `moesim validate`'s
comparison of every run into OUT/comparison.csv (every phase and step), OUT/passes.csv (each
phase per pass) and OUT/summary.csv (one row per run); then the figure
docs/figures/validation_h200x1 and the generated regions of docs/validation.md
(analysis.validation_doc). The measured step is the benchmark's own step time
(analysis.validation.measured_steps), not the span of the timed phases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from analysis.validation import (
    compare,
    compare_passes,
    load_sets,
    measured_steps,
    score_run,
    strategy_errors,
)
from moesim.atomic import atomic_path
from moesim.config import parse_override
from moesim.errors import InputError
from moesim.sim.replay import simulate_run

ROOT = Path(__file__).resolve().parents[1]


def write_csv(df: pd.DataFrame, path: Path) -> None:
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False, float_format="%.6g")


def detailed(runs: list[Path], overrides: dict, set_of: dict[str, str] | None = None):
    """(comparison, summary, passes) of `runs` with `overrides`."""
    comps, rows, passes = [], [], []
    for run in runs:
        measured, simulated = simulate_run(run, overrides)
        steps, _ = measured_steps(run)
        set_ = (set_of or {}).get(run.name, "")
        comp = compare(measured, simulated, run, steps).assign(run=run.name, set=set_)
        comps.append(comp)
        passes.append(compare_passes(measured, simulated).assign(run=run.name, set=set_))
        mean = comp[comp["step"] == "mean"]
        step = mean[mean["phase"] == "step"].iloc[0]
        phases = mean[(mean["phase"] != "step") & (mean["measured_s"] > 0)]
        worst = phases.loc[phases["rel_error"].abs().idxmax()]
        span = comparison_span(measured)
        rows.append({"set": set_, "run": run.name,
                     "strategy": step["strategy"], "measured_step_s": step["measured_s"],
                     "phase_span_s": span, "simulated_step_s": step["simulated_s"],
                     "step_error": step["rel_error"], "worst_phase": worst["phase"],
                     "worst_phase_error": worst["rel_error"]})
    return (pd.concat(comps, ignore_index=True), pd.DataFrame(rows),
            pd.concat(passes, ignore_index=True))


def comparison_span(measured: pd.DataFrame) -> float:
    from analysis.run_summary import step_times
    return float(step_times(measured)["step_time_s"].mean())


def out_of_sample(sets) -> pd.DataFrame:
    rows = []
    for rs in sets.runs:
        for cal in sets.calibrations:
            for run in rs.dirs:
                s = score_run(run, {"cluster.gpu": cal.name})
                rows.append({"set": rs.name, "runs_call": rs.call, "calibration": cal.name,
                             "calibration_call": cal.call,
                             "sample": "in" if cal.scores_in_sample(rs) else "out", **s})
    return pd.DataFrame(rows)


def add_set(args: argparse.Namespace) -> None:
    """Copy a device call's run directories to docs/validation/runs/NAME-RUN and its
    calibration to configs/calibration/h200-NAME.csv, and append both to sets.toml, tagged
    with the call (the new runs are then scored in and out of sample)."""
    import re
    import shutil

    name = args.add_set
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name or ""):
        raise InputError("--add-set", name, "lower-case letters, digits and '-'")
    for flag, v in (("--add-runs", args.add_runs), ("--add-calibration", args.add_calibration),
                    ("--call", args.call)):
        if not v:
            raise InputError("--add-set", flag, "required with --add-set")
    sets = load_sets(args.sets)
    if name in {r.name for r in sets.runs}:
        raise InputError(args.sets, name, "a run set of that name exists")
    runs = sorted(p for p in args.add_runs.iterdir() if (p / "results.parquet").exists())
    if not runs:
        raise InputError(args.add_runs, "results.parquet", "no run directory in this folder")
    if not args.add_calibration.exists():
        raise InputError(args.add_calibration, "file", "no such calibration file")
    root = args.sets.resolve().parents[2]
    dest = root / "docs" / "validation" / "runs"
    for r in runs:
        shutil.copytree(r, dest / f"{name}-{r.name}")
    cal = f"h200-{name}"
    text = args.add_calibration.read_text()
    (root / "configs" / "calibration" / f"{cal}.csv").write_text(
        f"# taken in the device call of {args.call} with the run set {name}\n" + text)
    note = "the measured step: each run's meta.json (analysis.validation.measured_steps)"
    entries = [("runs", {"name": name, "dirs": f"docs/validation/runs/{name}-*",
                         "call": args.call, "command": args.command, "machine": args.machine,
                         "note": note}),
               ("calibration", {"name": cal, "file": f"configs/calibration/{cal}.csv",
                                "call": args.call,
                                "note": f"taken in the same device call as run set {name}"})]
    # JSON's string escapes are TOML's basic-string escapes
    block = "".join(f"\n[[{table}]]\n" + "".join(f"{k} = {json.dumps(v)}\n"
                                                   for k, v in vals.items())
                    for table, vals in entries)
    with open(args.sets, "a") as f:
        f.write(block)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.validation", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, nargs="*", help="run directories (without --sets)")
    ap.add_argument("--sets", type=Path, help="docs/validation/sets.toml")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                    help="override every run's config (ad hoc mode, moesim validate --set)")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "validation.md")
    ap.add_argument("--figures", type=Path, default=ROOT / "docs" / "figures")
    ap.add_argument("--render-only", action="store_true",
                    help="with --sets: only re-render the doc from OUT's committed CSVs")
    add = ap.add_argument_group("adding a device call's runs and calibration (with --sets)")
    add.add_argument("--add-set", metavar="NAME", help="name of the new run set")
    add.add_argument("--add-runs", type=Path, metavar="DIR",
                     help="folder of run directories (benchmarks/runtime.py --out DIR/runs)")
    add.add_argument("--add-calibration", type=Path, metavar="CSV",
                     help="the calibration taken in the same device call")
    add.add_argument("--call", help="when the device call ran, e.g. '2026-12-01 14:10 UTC'")
    add.add_argument("--command", default="bash benchmarks/device_session.sh $OUT "
                     "runtime,calibrate", help="the command that took them")
    add.add_argument("--machine", default="one lent nvidia-h200")
    args = ap.parse_args(argv)
    try:
        if args.sets and args.add_set:
            add_set(args)
        if args.sets:
            sets = load_sets(args.sets)
            if not args.render_only:
                oos = out_of_sample(sets)
                write_csv(oos, args.out / "out_of_sample.csv")
                set_of = {r.name: rs.name for rs in sets.runs for r in rs.dirs}
                runs = [r for rs in sets.runs for r in rs.dirs]
                comp, summary, passes = detailed(runs, {"cluster.gpu": sets.primary}, set_of)
                for name, df in (("comparison.csv", comp), ("summary.csv", summary),
                                 ("passes.csv", passes)):
                    write_csv(df, args.out / name)
                from analysis.figure_files import save_figure
                from analysis.validation import plot_validation
                fig = plot_validation(comp, title=f"1 x H200: EP, HP, FSEP layers "
                                      f"(calibration {sets.primary})",
                                      source=str(args.out / "comparison.csv"))
                save_figure(fig, args.figures, "validation_h200x1")
                for (set_, cal), d in oos.groupby(["set", "calibration"], sort=False):
                    e = strategy_errors(d)
                    print(f"{set_} scored with {cal}: " + ", ".join(
                        f"{r.strategy} {r.median_abs_error:.1%} (worst {r.worst_error:+.0%})"
                        for r in e.itertuples()))
            from analysis.doc_regions import update
            update(args.doc)
            print(f"wrote {args.doc}")
            return 0
        if not args.runs:
            raise InputError("benchmarks.validation", "runs", "give run directories or --sets")
        comp, summary, passes = detailed(sorted(args.runs), dict(map(parse_override, args.set)))
        for name, df in (("comparison.csv", comp), ("summary.csv", summary),
                         ("passes.csv", passes)):
            write_csv(df, args.out / name)
        print(summary.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print("\nper strategy:")
        print(strategy_errors(summary).to_string(index=False,
                                                 float_format=lambda v: f"{v:.3f}"))
    except InputError as e:
        print(f"validation: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
