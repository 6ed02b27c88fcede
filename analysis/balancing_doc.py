"""docs/runtime.md's region `runtime.balancing`: the 200-step CPU runs on real text per
load-balancing method, from docs/runtime/balancing.csv (written by `python -m
benchmarks.balancing`). Comparison words are computed: a method "balances" when its last-50-step
expert max/mean is below the unbalanced run's by more than TOLERANCE."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

TOLERANCE = 0.05


def table(root: Path) -> str:
    path = root / "docs" / "runtime" / "balancing.csv"
    df = pd.read_csv(path)
    first = df.iloc[0]
    base = df.set_index("method")["expert_max_over_mean"].get("none")
    lines = [f"{first['machine']}, {first['date']}, `{first['command']}`; "
             f"{int(first['steps'])} steps each. Ceiling of expert max/mean at top-2 over 16 "
             "experts: 8 (one expert in every token's top-2); rank max/mean: 2 (one of the 2 EP "
             "ranks takes every token).", "",
             "| method | loss, first 10 steps | loss, last 10 | falls | expert max/mean, last "
             "50 | rank max/mean, last 50 | vs none | balancing loss, last 10 |",
             "|---|---|---|---|---|---|---|---|"]
    for _, r in df.iterrows():
        falls = "yes" if r["loss_last10"] < r["loss_first10"] else "no"
        if r["method"] == "none" or base is None:
            vs = ""
        else:
            rel = r["expert_max_over_mean"] / base - 1
            word = ("more balanced" if rel < -TOLERANCE else "less balanced"
                    if rel > TOLERANCE else f"within ±{TOLERANCE:.0%}")
            vs = f"{rel:+.0%} ({word})"
        lines.append(f"| {r['method']} | {r['loss_first10']:.3f} | {r['loss_last10']:.3f} | "
                     f"{falls} | {r['expert_max_over_mean']:.2f} | "
                     f"{r['rank_max_over_mean']:.3f} | {vs} | "
                     f"{r['balancing_loss_last10']:.4g} |")
    return "\n".join(lines) + "\n"
