"""Throughput against the number of GPUs, one line per strategy, and the speed-up over EP.

Input: a run summary (analysis.run_summary.SUMMARY_COLUMNS; only `strategy`, `num_gpus` and
`throughput_tok_s` are needed). Several runs of one (strategy, GPU count), e.g. seeds, are
averaged.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from analysis.inputs import check_columns
from analysis.style import (
    DOUBLE_COLUMN_IN,
    SINGLE_COLUMN_IN,
    ordered_strategies,
    paper_style,
    strategy_color,
    strategy_label,
    strategy_marker,
)
from analysis.units import count_label

REQUIRED = {"strategy": "string", "num_gpus": "number", "throughput_tok_s": "number"}


def scaling_table(summary: pd.DataFrame, source: str = "summary") -> pd.DataFrame:
    """Mean throughput per (strategy, num_gpus), and the speed-up over EP at the same GPU count
    (NaN where EP did not run)."""
    check_columns(summary, REQUIRED, source)
    t = (summary.groupby(["strategy", "num_gpus"], sort=True)["throughput_tok_s"].mean()
         .reset_index())
    ep = t[t["strategy"] == "ep"].set_index("num_gpus")["throughput_tok_s"]
    t["speedup_vs_ep"] = t["throughput_tok_s"] / t["num_gpus"].map(ep)
    return t


def plot_scaling(summary: pd.DataFrame, *, title: str | None = None,
                 source: str = "summary") -> Figure:
    t = scaling_table(summary, source)
    strategies = ordered_strategies(t["strategy"])
    with_speedup = "ep" in strategies and len(strategies) > 1
    with paper_style():
        if with_speedup:
            fig, (ax, ax2) = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN_IN * 0.82, 2.3),
                                          layout="constrained")
        else:
            fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, 2.4), layout="constrained")
            ax2 = None
        gpus = np.sort(t["num_gpus"].unique())
        for s in strategies:
            d = t[t["strategy"] == s].sort_values("num_gpus")
            kw = {"color": strategy_color(s), "marker": strategy_marker(s),
                  "label": strategy_label(s)}
            ax.plot(d["num_gpus"], d["throughput_tok_s"], **kw)
            # Ideal linear scaling from the strategy's smallest run: the gap is what the
            # network costs as the job grows.
            x0, y0 = d["num_gpus"].iloc[0], d["throughput_tok_s"].iloc[0]
            ax.plot(d["num_gpus"], y0 * d["num_gpus"] / x0, color=strategy_color(s), lw=0.7,
                    ls=":", alpha=0.8)
            if ax2 is not None and s != "ep":
                ax2.plot(d["num_gpus"], d["speedup_vs_ep"], **kw)
        for a in (ax, ax2):
            if a is None:
                continue
            a.set_xscale("log", base=2)
            a.set_xticks(gpus)
            a.xaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:g}"))
            a.xaxis.set_minor_formatter(NullFormatter())
            a.set_xlabel("GPUs")
        ax.set_yscale("log")
        # Label 1-2-5 decades with short counts (2M, not 2x10^6); minor ticks stay unlabelled.
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(count_label))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel("throughput (tokens/s)")
        ax.plot([], [], color="0.4", lw=0.7, ls=":", label="linear scaling")
        ax.legend(loc="upper left")
        if ax2 is not None:
            ax2.axhline(1.0, color=strategy_color("ep"), lw=0.8, ls="--")
            ax2.text(gpus[-1], 1.0, "EP ", va="bottom", ha="right", fontsize=7,
                     color=strategy_color("ep"))
            ax2.set_ylabel("speed-up over EP")
            ax2.yaxis.set_major_formatter(FuncFormatter(lambda v, _p: f"{v:.2g}×"))
            ax2.legend(loc="best")
            ax.set_title("(a) throughput", loc="left")
            ax2.set_title("(b) speed-up over EP", loc="left")
        if title:
            fig.suptitle(title)
    return fig
