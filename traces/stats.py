"""Load-imbalance statistics of a routing trace, per layer.

For every (step, layer, head) the load of expert e is the tokens it receives from all shards.
Per step we take max/mean load, the coefficient of variation (std/mean) and the top expert's
share of all slots; the table reports, per layer, the mean of each over steps and heads, and
the worst step's max/mean.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from traces.schema import Trace

COLUMNS = ["layer", "max_over_mean", "max_over_mean_worst", "cv", "top_share", "tokens_per_step"]


def imbalance_table(trace: Trace) -> pd.DataFrame:
    load = trace.expert_load().astype(np.float64)  # [steps, layers, heads, experts]
    mean = load.mean(axis=-1)
    mom = load.max(axis=-1) / mean
    cv = load.std(axis=-1) / mean
    share = load.max(axis=-1) / load.sum(axis=-1)
    return pd.DataFrame({
        "layer": np.arange(trace.num_layers),
        "max_over_mean": mom.mean(axis=(0, 2)),
        "max_over_mean_worst": mom.max(axis=(0, 2)),
        "cv": cv.mean(axis=(0, 2)),
        "top_share": share.mean(axis=(0, 2)),
        "tokens_per_step": np.full(trace.num_layers, trace.tokens_per_step),
    }, columns=COLUMNS)


def format_table(df: pd.DataFrame) -> str:
    return df.to_string(index=False, float_format=lambda v: f"{v:.3f}")
