"""Communication volume and time against top-k: EP's dispatch/combine bytes grow with k (each
token is sent to up to k ranks), HP's are fixed by the batch (each token's latent is sent once,
split across ranks), FSEP adds weight traffic that does not depend on k.

Input: a run summary (analysis.run_summary.SUMMARY_COLUMNS) with `strategy`, `top_k`,
`comm_bytes_per_gpu` and `comm_time_s`; runs of one (strategy, top_k) are averaged.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from analysis.inputs import check_columns
from analysis.style import (
    DOUBLE_COLUMN_IN,
    ordered_strategies,
    paper_style,
    strategy_color,
    strategy_label,
    strategy_marker,
)
from analysis.units import byte_unit, time_unit

REQUIRED = {"strategy": "string", "top_k": "number", "comm_bytes_per_gpu": "number",
            "comm_time_s": "number"}


def comm_table(summary: pd.DataFrame, source: str = "summary") -> pd.DataFrame:
    """Mean bytes per GPU per step and comm time per step for each (strategy, top_k)."""
    check_columns(summary, REQUIRED, source)
    return (summary.groupby(["strategy", "top_k"], sort=True)[["comm_bytes_per_gpu",
                                                                "comm_time_s"]]
            .mean().reset_index())


def plot_comm(summary: pd.DataFrame, *, title: str | None = None,
              source: str = "summary") -> Figure:
    t = comm_table(summary, source)
    bscale, bunit = byte_unit(float(t["comm_bytes_per_gpu"].max()))
    tscale, tunit = time_unit(float(t["comm_time_s"].max()))
    ks = np.sort(t["top_k"].unique())
    with paper_style():
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(DOUBLE_COLUMN_IN * 0.82, 2.3),
                                       layout="constrained")
        for s in ordered_strategies(t["strategy"]):
            d = t[t["strategy"] == s].sort_values("top_k")
            kw = {"color": strategy_color(s), "marker": strategy_marker(s),
                  "label": strategy_label(s)}
            ax1.plot(d["top_k"], d["comm_bytes_per_gpu"] / bscale, **kw)
            ax2.plot(d["top_k"], d["comm_time_s"] / tscale, **kw)
        for a in (ax1, ax2):
            a.set_xlabel("top-k (experts per token)")
            a.set_xticks(ks)
            a.set_xticklabels([f"{k:g}" for k in ks])
            a.set_ylim(bottom=0)
        ax1.set_ylabel(f"bytes sent per GPU per step ({bunit})")
        ax2.set_ylabel(f"communication time per step ({tunit})")
        ax1.set_title("(a) communication volume", loc="left")
        ax2.set_title("(b) communication time", loc="left")
        ax1.legend(loc="upper left")
        if title:
            fig.suptitle(title)
    return fig
