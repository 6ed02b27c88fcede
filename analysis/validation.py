"""Simulated against measured: a log-log scatter of per-phase (and whole-step) times, one point
per (strategy, phase), on the y = x line when the simulator is right.

Input: a comparison table with columns `strategy`, `phase`, `measured_s`, `simulated_s` (what
`moesim validate` reports), or Result tables of both sources, paired here by strategy: the
phase times (analysis.run_summary.phase_times) of the `real` rows against those of the `sim`
rows, plus the step time under the phase name "step".
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from analysis.inputs import ResultFile, check_columns
from analysis.run_summary import phase_times, step_times
from analysis.style import (
    PHASE_COLOR,
    PHASE_LABEL,
    SINGLE_COLUMN_IN,
    ordered_strategies,
    paper_style,
    strategy_label,
    strategy_marker,
)
from analysis.units import time_unit
from moesim.errors import InputError

REQUIRED = {"strategy": "string", "phase": "string", "measured_s": "number",
            "simulated_s": "number"}
BAND = 0.2  # the shaded band: within 20% of measured


def comparison_from_results(files: Sequence[ResultFile]) -> pd.DataFrame:
    """Pair measured and simulated phase and step times by strategy."""
    frame = pd.concat([f.frame for f in files], ignore_index=True)
    pt = phase_times(frame).groupby(["source", "strategy", "phase"])["time_s"].sum()
    st = step_times(frame).groupby(["source", "strategy"])["step_time_s"].mean()
    st.index = pd.MultiIndex.from_tuples([(s, g, "step") for s, g in st.index],
                                         names=["source", "strategy", "phase"])
    t = pd.concat([pt, st.rename("time_s")]).unstack("source")
    if "sim" not in t.columns or "real" not in t.columns:
        raise InputError(", ".join(str(f.path) for f in files), "source",
                         "need both simulated ('sim') and measured ('real') rows")
    t = t.dropna(subset=["sim", "real"]).reset_index()
    if t.empty:
        raise InputError(", ".join(str(f.path) for f in files), "strategy",
                         "no strategy has both simulated and measured rows")
    return t.rename(columns={"real": "measured_s", "sim": "simulated_s"})[
        ["strategy", "phase", "measured_s", "simulated_s"]]


def error_stats(comp: pd.DataFrame) -> dict[str, float]:
    """Mean absolute percentage error of simulated vs measured, over phases (excluding the
    whole step) and over steps alone; NaN where there are no such rows."""
    ok = comp[comp["measured_s"] > 0]
    rel = (ok["simulated_s"] - ok["measured_s"]).abs() / ok["measured_s"]
    is_step = ok["phase"] == "step"
    return {"phase_mape": float(rel[~is_step].mean()) if (~is_step).any() else float("nan"),
            "step_mape": float(rel[is_step].mean()) if is_step.any() else float("nan")}


def plot_validation(comp: pd.DataFrame, *, title: str | None = None,
                    source: str = "comparison") -> Figure:
    check_columns(comp, REQUIRED, source)
    if "step" in comp.columns:  # `moesim validate` tables: plot the means, not every step
        comp = comp[comp["step"].astype(str) == "mean"]
    comp = comp[(comp["measured_s"] > 0) & (comp["simulated_s"] > 0)]
    if comp.empty:
        raise InputError(source, "measured_s", "no row with positive measured and simulated time")
    lo = float(min(comp["measured_s"].min(), comp["simulated_s"].min())) / 1.6
    hi = float(max(comp["measured_s"].max(), comp["simulated_s"].max())) * 1.6
    scale, unit = time_unit(hi)
    stats = error_stats(comp)
    with paper_style():
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN + 1.2, 3.0), layout="constrained")
        xs = np.geomspace(lo, hi, 50) / scale
        ax.fill_between(xs, xs * (1 - BAND), xs * (1 + BAND), color="0.88", lw=0,
                        label=f"±{BAND:.0%}")
        ax.plot(xs, xs, color="0.3", lw=0.8, ls="--", label="y = x")
        for _, r in comp.iterrows():
            step = r["phase"] == "step"
            ax.scatter(r["measured_s"] / scale, r["simulated_s"] / scale,
                       marker=strategy_marker(r["strategy"]), s=34 if step else 22,
                       facecolor="black" if step else PHASE_COLOR.get(r["phase"], "0.5"),
                       edgecolor="black", linewidth=0.4, zorder=3)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo / scale, hi / scale)
        ax.set_ylim(lo / scale, hi / scale)
        ax.set_aspect("equal")
        ax.set_xlabel(f"measured ({unit})")
        ax.set_ylabel(f"simulated ({unit})")
        handles = [Line2D([], [], ls="", marker=strategy_marker(s), color="0.4",
                          label=strategy_label(s)) for s in ordered_strategies(comp["strategy"])]
        phases = [p for p in PHASE_COLOR if p in set(comp["phase"])]
        handles += [Line2D([], [], ls="", marker="o", markerfacecolor=PHASE_COLOR[p],
                           markeredgecolor="black", markeredgewidth=0.4, label=PHASE_LABEL[p])
                    for p in phases]
        if (comp["phase"] == "step").any():
            handles.append(Line2D([], [], ls="", marker="o", color="black", label="whole step"))
        notes = []
        if not np.isnan(stats["step_mape"]):
            notes.append(f"step MAPE {stats['step_mape']:.1%}")
        if not np.isnan(stats["phase_mape"]):
            notes.append(f"phase MAPE {stats['phase_mape']:.1%}")
        # The error figures head the legend: inside the axes they would cover points.
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0),
                  title="\n".join(notes) or None, title_fontsize=7)
        if title:
            ax.set_title(title, loc="left")
    return fig


def measured_steps(run: Path) -> tuple[list[float], str]:
    """The run's measured step times: the benchmark's own, host time included, not the span
    of its timed phases. Per-step wall times when the run recorded them (meta.json
    `step_wall_s`, or the benchmark's), else the benchmark's `step_s` alone (one value: the
    median over its timed steps of CUDA events from the step's start, queued before its first
    kernel, to its end). Returns (times, what they are)."""
    path = run / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file", "no meta.json: no measured step time") from None
    except json.JSONDecodeError as e:
        raise InputError(path, "json", str(e)) from None
    bench = meta.get("benchmark", {})
    for src in (meta, bench):
        wall = src.get("step_wall_s")
        if isinstance(wall, list) and wall:
            return [float(v) for v in wall], "wall time per step"
    if "step_s" not in bench:
        raise InputError(path, "benchmark.step_s", "no measured step time in the run")
    return [float(bench["step_s"])], "benchmark step_s (median over steps, CUDA events)"


def compare(measured: pd.DataFrame, simulated: pd.DataFrame, run: Path,
            measured_step: list[float] | None = None) -> pd.DataFrame:
    """Rows: every phase, the mean step, and each step; columns measured_s, simulated_s,
    rel_error. With `measured_step` (measured_steps(run)[0]) the measured step is the
    benchmark's own: its mean is the step row, and per-step rows appear only when there is one
    time per simulated step; without it, the span of the timed phases."""
    comp = comparison_from_results([ResultFile(run / "results.parquet", measured, {}),
                                    ResultFile(Path("simulated"), simulated, {})])
    comp.insert(2, "step", "mean")
    st = step_times(pd.concat([measured, simulated], ignore_index=True))
    per_step = st.pivot_table(index=["strategy", "step"], columns="source",
                              values="step_time_s").dropna().reset_index()
    per_step = pd.DataFrame({"strategy": per_step["strategy"], "phase": "step",
                             "step": per_step["step"].astype(str),
                             "measured_s": per_step["real"], "simulated_s": per_step["sim"]})
    if measured_step is not None:
        mean = (comp["phase"] == "step") & (comp["step"] == "mean")
        comp.loc[mean, "measured_s"] = float(np.mean(measured_step))
        if len(measured_step) == len(per_step):
            per_step["measured_s"] = measured_step
        else:
            per_step = per_step.iloc[0:0]
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


# ---------------------------------------------------------------------------------------------
# Run sets and calibrations (docs/validation/sets.toml): what was measured together.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RunSet:
    name: str
    dirs: list[Path]
    call: str
    command: str
    machine: str
    note: str


@dataclass(frozen=True)
class Calibration:
    name: str
    file: Path
    call: str
    note: str

    def scores_in_sample(self, runs: RunSet) -> bool:
        """Same device call as the runs: the calibration has seen their machine."""
        return bool(self.call) and self.call == runs.call


@dataclass(frozen=True)
class Sets:
    path: Path
    primary: str
    runs: list[RunSet]
    calibrations: list[Calibration]


def load_sets(path: Path, root: Path | None = None) -> Sets:
    """Read docs/validation/sets.toml; paths are taken from `root` (default: its repo, two
    folders up)."""
    path = Path(path)
    root = Path(root) if root is not None else path.resolve().parents[2]
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file", "no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise InputError(path, "toml", str(e)) from None
    for k in raw:
        if k not in ("primary", "runs", "calibration"):
            raise InputError(path, k, "unknown key; allowed: primary, runs, calibration")
    sets, cals = [], []
    for i, r in enumerate(raw.get("runs", [])):
        for k in ("name", "call", "command", "machine"):
            if not isinstance(r.get(k), str):
                raise InputError(path, f"runs[{i}].{k}", "required (a string)")
        globs = [r.get("dirs")] if isinstance(r.get("dirs"), str) else r.get("dirs")
        if not (isinstance(globs, list) and globs and all(isinstance(g, str) for g in globs)):
            raise InputError(path, f"runs[{i}].dirs", "a glob or a list of globs")
        dirs = sorted({p for g in globs for p in root.glob(g) if p.is_dir()})
        if not dirs:
            raise InputError(path, f"runs[{i}].dirs", f"{globs!r} match no run directory")
        sets.append(RunSet(r["name"], dirs, r["call"], r["command"], r["machine"],
                           r.get("note", "")))
    for i, c in enumerate(raw.get("calibration", [])):
        for k in ("name", "file", "call"):
            if not isinstance(c.get(k), str):
                raise InputError(path, f"calibration[{i}].{k}", "required (a string)")
        f = root / c["file"]
        if not f.exists() or f.stem != c["name"]:
            raise InputError(path, f"calibration[{i}].file", f"{c['file']}: missing, or not "
                             f"named {c['name']}.csv (cluster.gpu selects it by name)")
        cals.append(Calibration(c["name"], f, c["call"], c.get("note", "")))
    owner: dict[Path, str] = {}
    for rs in sets:
        for d in rs.dirs:
            if d in owner:
                raise InputError(path, "runs", f"{d.name} is in both {owner[d]} and {rs.name}")
            owner[d] = rs.name
    if not sets or not cals:
        raise InputError(path, "runs" if not sets else "calibration", "at least one needed")
    primary = raw.get("primary", cals[0].name)
    if primary not in {c.name for c in cals}:
        raise InputError(path, "primary", f"{primary!r} is not a [[calibration]] name")
    return Sets(path, primary, sets, cals)


def score_run(run: Path, overrides: dict | None = None) -> dict:
    """One run's step against the simulator: the measured step is the benchmark's own
    (measured_steps); the span of the timed phases is kept beside it."""
    from moesim.sim.replay import simulate_run

    measured, simulated = simulate_run(run, overrides)
    steps, kind = measured_steps(run)
    meas = float(np.mean(steps))
    sim = float(step_times(simulated)["step_time_s"].mean())
    return {"run": run.name, "strategy": str(measured["strategy"].iloc[0]),
            "measured_step_s": meas, "measured_kind": kind,
            "phase_span_s": float(step_times(measured)["step_time_s"].mean()),
            "simulated_step_s": sim, "step_error": (sim - meas) / meas}


def strategy_errors(scores: pd.DataFrame) -> pd.DataFrame:
    """Per strategy: runs, median |step error|, the worst error (signed) and its run."""
    rows = []
    for strategy, d in scores.groupby("strategy", sort=True):
        a = d["step_error"].abs()
        worst = d.loc[a.idxmax()]
        rows.append({"strategy": strategy, "runs": len(d), "median_abs_error": float(a.median()),
                     "worst_error": float(worst["step_error"]), "worst_run": worst["run"]})
    return pd.DataFrame(rows)
