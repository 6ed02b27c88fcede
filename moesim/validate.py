"""`moesim validate --run DIR`: simulate exactly what a runtime run did and compare.

A run directory (written by `runtime.train`, docs/interfaces.md) holds `config.toml`,
`results.parquet` (measured Result table, source "real"), `trace.parquet` (the routing the run
saw) and, for FSEP, `plan.json` (the placements it used). The simulator replays the same steps
with the same config, routing and placements; the comparison pairs per-phase times (summed over
layers and passes, mean over ranks and steps) and the step time (analysis.validation), and
adds one row per step. Relative error = (simulated - measured) / measured.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.atomic import atomic_path
from moesim.config import load_config, parse_override, with_overrides
from moesim.errors import InputError
from moesim.results import read_results
from moesim.simulate import Simulator
from traces.io import read_trace


class PlannedSimulator(Simulator):
    """A Simulator that takes the run's own placements (a planner Plan) for its strategy
    instead of re-planning, so simulated and measured steps do the same work."""

    def __init__(self, *args, plan=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self._at: tuple[int, int] | None = None

    def _layer_traffic(self, strategy: str, tstep: int, layer: int):
        self._at = (tstep, layer)
        return super()._layer_traffic(strategy, tstep, layer)

    def _placement(self, strategy: str, counts: np.ndarray):
        if self.plan is not None and strategy == self.plan.strategy and self._at is not None:
            return self.plan.placement(*self._at)
        return super()._placement(strategy, counts)


def _run_files(run: Path) -> dict[str, Path]:
    if not run.is_dir():
        raise InputError(run, "--run", "no such run directory")
    files = {name: run / name for name in ("config.toml", "results.parquet", "trace.parquet")}
    for name, path in files.items():
        if not path.exists():
            raise InputError(run, name, "missing from the run directory")
    return files


def simulate_run(run: Path, overrides: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured, simulated) Result tables of the run's steps. `overrides` ('section.field' ->
    value) change the run's config before simulating, e.g. {"cluster.gpu": "h200-measured"}
    to use a calibration measured on the run's machine."""
    files = _run_files(run)
    cfg = load_config(files["config.toml"])
    if overrides:
        cfg = with_overrides(cfg, overrides)
    measured, _ = read_results(files["results.parquet"])
    measured = measured[measured["source"] == "real"]
    if measured.empty:
        raise InputError(files["results.parquet"], "source", "no measured ('real') rows")
    strategies = measured["strategy"].unique().tolist()
    if len(strategies) != 1:
        raise InputError(files["results.parquet"], "strategy",
                         f"one strategy per run, found {', '.join(strategies)}")
    strategy = strategies[0]
    trace = read_trace(files["trace.parquet"])
    plan = None
    if (run / "plan.json").exists():
        from planner.plan import read_plan
        plan = read_plan(run / "plan.json")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy=strategy))
    sim = PlannedSimulator(cfg, trace, str(files["trace.parquet"]), plan=plan)
    steps = sorted(int(s) for s in measured["step"].unique())
    if steps[-1] >= trace.num_steps:
        raise InputError(files["trace.parquet"], "steps", f"the results have step {steps[-1]}, "
                         f"the trace {trace.num_steps} steps")
    frames = [sim.simulate_step(strategy, s).frame for s in steps]
    return measured.reset_index(drop=True), pd.concat(frames, ignore_index=True)


def compare(measured: pd.DataFrame, simulated: pd.DataFrame, run: Path) -> pd.DataFrame:
    """Rows: every phase, the mean step, and each step; columns measured_s, simulated_s,
    rel_error."""
    from analysis.inputs import ResultFile
    from analysis.run_summary import step_times
    from analysis.validation import comparison_from_results

    comp = comparison_from_results([ResultFile(run / "results.parquet", measured, {}),
                                    ResultFile(Path("simulated"), simulated, {})])
    comp.insert(2, "step", "mean")
    st = step_times(pd.concat([measured, simulated], ignore_index=True))
    per_step = st.pivot_table(index=["strategy", "step"], columns="source",
                              values="step_time_s").dropna().reset_index()
    per_step = pd.DataFrame({"strategy": per_step["strategy"], "phase": "step",
                             "step": per_step["step"].astype(str),
                             "measured_s": per_step["real"], "simulated_s": per_step["sim"]})
    out = pd.concat([comp, per_step], ignore_index=True)
    out["rel_error"] = (out["simulated_s"] - out["measured_s"]) / out["measured_s"]
    return out


def compare_passes(measured: pd.DataFrame, simulated: pd.DataFrame) -> pd.DataFrame:
    """Rows: every (strategy, pass, phase), both streams together; columns measured_s,
    simulated_s, rel_error. The time is a phase's summed duration over layers, the mean over
    ranks and steps. Separating the passes lets a comparison trust one pass when the other's
    measurements are known to be off (e.g. a runtime whose backward is being fixed)."""
    rows = []
    for src, df in (("measured_s", measured), ("simulated_s", simulated)):
        d = df.assign(dur=df["end_s"] - df["start_s"])
        per = d.groupby(["strategy", "pass", "phase"])["dur"].sum()
        norm = d.groupby("strategy").apply(lambda g: g["rank"].nunique() * g["step"].nunique(),
                                           include_groups=False)
        rows.append((per / norm.reindex(per.index.get_level_values("strategy")).to_numpy())
                    .rename(src))
    out = pd.concat(rows, axis=1).dropna().reset_index()
    out["rel_error"] = (out["simulated_s"] - out["measured_s"]) / out["measured_s"]
    return out


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
    from analysis.figure_files import save_figure
    from analysis.validation import plot_validation

    measured, simulated = simulate_run(args.run, dict(map(parse_override, args.set)))
    comp = compare(measured, simulated, args.run)
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
