"""Step-time breakdown: one stacked bar per strategy (and per source when simulated and
measured runs are shown together), a segment per phase, and the wall-clock step time marked on
each bar.

Communication that overlaps compute makes the stack taller than the step: a stack above the
step-time mark shows time hidden by overlap (FSEP's chunked weight gathers). A stack below the
mark means the average rank sat idle for the rest of the step, waiting for the slowest rank or
the network; that gap is drawn as a dotted "waiting" segment. Phase time is defined in
analysis.run_summary (mean over steps and ranks, summed over layers and both passes).
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from analysis.inputs import ResultFile
from analysis.run_summary import phase_times, step_times
from analysis.style import (
    PHASE_COLOR,
    PHASE_LABEL,
    SINGLE_COLUMN_IN,
    STRATEGY_ORDER,
    paper_style,
    strategy_label,
)
from analysis.units import time_unit
from moesim.results import PHASES


def breakdown_tables(files: list[ResultFile], names: dict[str, str] | None = None
                     ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(phases, steps): phases has one row per (bar, phase) with time_s and stream; steps one
    row per bar with step_time_s. A bar is a (file, source, strategy); `names` maps a file's
    label (its stem) to the bar's name, else bars are named by strategy."""
    phase_rows, step_rows = [], []
    for f in files:
        pt = phase_times(f.frame).assign(label=f.label)
        st = (step_times(f.frame).groupby(["source", "strategy"])["step_time_s"].mean()
              .reset_index().assign(label=f.label))
        phase_rows.append(pt)
        step_rows.append(st)
    phases = pd.concat(phase_rows, ignore_index=True)
    steps = pd.concat(step_rows, ignore_index=True)
    _name_bars(steps)
    if names:
        steps["bar"] = [names.get(lab, bar) for lab, bar in zip(steps["label"], steps["bar"],
                                                                strict=True)]
    phases = phases.merge(steps[["label", "source", "strategy", "bar", "order"]],
                          on=["label", "source", "strategy"])
    # A phase may run on both streams (e.g. a fused op): one segment per phase is enough.
    stream = phases.groupby(["bar", "phase"])["stream"].agg(
        lambda s: "comm" if (s != "compute").any() else "compute")
    phases = (phases.groupby(["bar", "order", "phase"], sort=False)["time_s"].sum()
              .reset_index().merge(stream.reset_index(), on=["bar", "phase"]))
    return (phases.sort_values(["order", "phase"]).reset_index(drop=True),
            steps.sort_values("order").reset_index(drop=True))


def _name_bars(steps: pd.DataFrame) -> None:
    """Label each bar by its strategy, adding the source or file only where needed to tell
    bars apart; order bars EP, HP, FSEP, simulated before measured."""
    both_sources = steps["source"].nunique() > 1
    names = []
    for _, r in steps.iterrows():
        name = strategy_label(r["strategy"])
        if both_sources:
            name += " (sim)" if r["source"] == "sim" else " (real)"
        names.append(name)
    steps["bar"] = names
    dup = steps["bar"].duplicated(keep=False)
    steps.loc[dup, "bar"] = steps.loc[dup, "bar"] + "\n" + steps.loc[dup, "label"]
    rank = {s: i for i, s in enumerate(STRATEGY_ORDER)}
    steps["order"] = [(rank.get(s, len(rank)), src != "sim", lab)
                      for s, src, lab in zip(steps["strategy"], steps["source"], steps["label"],
                                             strict=True)]
    steps["order"] = steps["order"].rank(method="dense").astype(int)


def plot_breakdown(files: list[ResultFile], *, title: str | None = None,
                   names: dict[str, str] | None = None) -> Figure:
    phases, steps = breakdown_tables(files, names)
    scale, unit = time_unit(float(max(steps["step_time_s"].max(),
                                       phases.groupby("bar")["time_s"].sum().max())))
    bars = list(steps["bar"])
    x = np.arange(len(bars))
    present = [p for p in PHASES if p in set(phases["phase"][phases["time_s"] > 0])]
    width = max(SINGLE_COLUMN_IN, 1.0 + 0.75 * len(bars) + 1.3)
    with paper_style():
        fig, ax = plt.subplots(figsize=(width, 2.6), layout="constrained")
        bottom = np.zeros(len(bars))
        for p in present:
            d = phases[phases["phase"] == p].set_index("bar")["time_s"].reindex(bars,
                                                                                 fill_value=0)
            h = d.to_numpy() / scale
            comm = (phases[phases["phase"] == p]["stream"] != "compute").any()
            ax.bar(x, h, 0.62, bottom=bottom, color=PHASE_COLOR[p], edgecolor="white",
                   linewidth=0.4, hatch="////" if comm else None, label=PHASE_LABEL[p])
            bottom += h
        st = steps["step_time_s"].to_numpy() / scale
        # Where the busiest phases of an average rank end below the wall-clock step, the rest
        # of the step is that rank waiting (for the slowest rank's experts, for the network).
        idle = np.clip(st - bottom, 0, None)
        if (idle > 0).any():
            ax.bar(x, idle, 0.62, bottom=bottom, color="white", edgecolor="0.55",
                   linewidth=0.5, hatch="....")
        ax.hlines(st, x - 0.40, x + 0.40, color="black", lw=1.4, zorder=5)
        for xi, v in zip(x, st, strict=True):
            ax.text(xi, max(v, bottom[int(xi)]) * 1.015, f"{v:.3g}", ha="center", va="bottom",
                    fontsize=6.5)
        ax.set_xticks(x)
        ax.set_xticklabels(bars)
        ax.set_ylabel(f"time per step ({unit})")
        ax.grid(axis="x", visible=False)
        ax.set_ylim(0, max(bottom.max(), st.max()) * 1.12)
        handles = [Patch(facecolor=PHASE_COLOR[p], edgecolor="white",
                         hatch="////" if (phases[phases["phase"] == p]["stream"] != "compute").any()
                         else None, label=PHASE_LABEL[p]) for p in reversed(present)]
        if (idle > 0).any():
            handles.insert(0, Patch(facecolor="white", edgecolor="0.55", hatch="....",
                                    label="waiting"))
        handles.append(plt.Line2D([], [], color="black", lw=1.4, label="step time"))
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if title:
            ax.set_title(title, loc="left")
    return fig
