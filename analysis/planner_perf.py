"""Planner solve time against problem size, one line per solver: whether the FSEP re-layout can
be re-planned every step (it must finish well inside a training step) and how it grows.

Input: a planner statistics table with `solver`, `solve_time_s` and a size column (default
`num_experts`; `num_ranks` or any numeric column via `x`). Repeated solves of one (solver,
size) are summarised by their median, with a bar from the fastest to the slowest.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from analysis.inputs import check_columns
from analysis.style import SINGLE_COLUMN_IN, paper_style

# Solvers get fixed colours too, so planner figures agree with each other.
SOLVER_STYLE = {
    "highs": ("#332288", "o", "ILP (HiGHS)"),
    "cbc": ("#88CCEE", "s", "ILP (CBC)"),
    "greedy": ("#117733", "^", "greedy"),
    "laer": ("#CC6677", "D", "LAER heuristic"),
    "lp": ("#999933", "v", "LP relaxation (bound)"),
}
X_LABEL = {"num_experts": "experts (total)", "num_ranks": "ranks (GPUs)",
           "variables": "ILP variables"}


def solve_time_table(stats: pd.DataFrame, x: str = "num_experts",
                     source: str = "planner stats") -> pd.DataFrame:
    """Median, min and max solve time per (solver, x)."""
    check_columns(stats, {"solver": "string", "solve_time_s": "number", x: "number"}, source)
    g = stats.groupby(["solver", x], sort=True)["solve_time_s"]
    return pd.DataFrame({"median_s": g.median(), "min_s": g.min(), "max_s": g.max(),
                         "runs": g.size()}).reset_index()


def plot_planner_perf(stats: pd.DataFrame, *, x: str = "num_experts", title: str | None = None,
                      source: str = "planner stats") -> Figure:
    t = solve_time_table(stats, x, source)
    with paper_style():
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.4), layout="constrained")
        for i, solver in enumerate(sorted(t["solver"].unique())):
            color, marker, label = SOLVER_STYLE.get(
                solver, (plt.get_cmap("tab10")(i), "v", solver))
            d = t[t["solver"] == solver].sort_values(x)
            yerr = np.vstack([d["median_s"] - d["min_s"], d["max_s"] - d["median_s"]])
            ax.errorbar(d[x], d["median_s"], yerr=yerr, color=color, marker=marker, label=label,
                        capsize=1.5, elinewidth=0.6)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        xs = np.sort(t[x].unique())
        ax.set_xticks(xs)
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(X_LABEL.get(x, x))
        ax.set_ylabel("solve time (s)")
        ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
        if title:
            ax.set_title(title, loc="left")
    return fig
