"""Per-rank expert load over training steps, as heatmaps, before and after FSEP re-layout.

Each panel is a [steps x ranks] grid of the tokens a rank runs through its experts in one MoE
layer, divided by the mean over ranks of that step: 1.0 is a fair share, 1.3 a rank doing 30%
more than average (and making every other rank wait for it at the next all-to-all). A strip
under the heatmaps plots each panel's per-step imbalance, max/mean - 1, so the before/after
difference can be read as a number too.

Loads come from either
- Result tables: the forward expert-phase tokens per (step, layer, rank) that the simulator or
  the runtime recorded (analysis.run_summary.rank_loads), or
- a routing trace and a placement per (step, layer): a rank's load is the sum over the replicas
  it hosts of expert load x the replica's token share (`placement_rank_loads`), which is what
  EP's contiguous placement and an FSEP re-layout assign it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from analysis.inputs import ResultFile
from analysis.run_summary import load_imbalance, rank_loads
from analysis.style import SINGLE_COLUMN_IN, paper_style, strategy_color, strategy_label
from moesim.config import Config
from moesim.errors import InputError
from traces.schema import Trace


@dataclass(frozen=True)
class LoadPanel:
    """One heatmap: loads[step, layer, rank] (tokens) and how to title it."""

    title: str
    strategy: str
    loads: np.ndarray

    @property
    def imbalance(self) -> float:
        """Mean over steps and layers of max/mean - 1."""
        return float(load_imbalance(self.loads).mean())


def panels_from_results(files: Sequence[ResultFile]) -> list[LoadPanel]:
    """A panel per (file, source, strategy), in the order given."""
    panels = []
    for f in files:
        loads = rank_loads(f.frame)
        if loads.empty:
            raise InputError(f.path, "phase", "no forward 'expert' rows: no per-rank load")
        for (source, strategy), d in loads.groupby(["source", "strategy"], sort=False):
            ranks = int(f.frame["rank"].max()) + 1
            steps = np.sort(d["step"].unique())
            layers = np.sort(d["layer"].unique())
            grid = np.zeros((len(steps), len(layers), ranks))
            si = np.searchsorted(steps, d["step"].to_numpy())
            li = np.searchsorted(layers, d["layer"].to_numpy())
            np.add.at(grid, (si, li, d["rank"].to_numpy()), d["tokens"].to_numpy())
            name = strategy_label(strategy) + ("" if source == "sim" else " (measured)")
            panels.append(LoadPanel(name, strategy, grid))
    return panels


def placement_rank_loads(expert_load: np.ndarray, replica_expert: np.ndarray,
                         replica_rank: np.ndarray, replica_share: np.ndarray,
                         num_ranks: int) -> np.ndarray:
    """Tokens each rank runs: sum over its replicas of expert load x replica share.

    `expert_load` is [E_total] tokens per global expert (summed over source ranks); the
    replica arrays are a planner.placement.Placement's."""
    per_replica = np.asarray(expert_load, dtype=np.float64)[replica_expert] * replica_share
    return np.bincount(replica_rank, weights=per_replica, minlength=num_ranks)


def panel_from_trace(title: str, strategy: str, expert_load: np.ndarray,
                     placement_for: Callable[[int, int], object], num_ranks: int) -> LoadPanel:
    """A panel from expert loads [steps, layers, E_total] and a placement per (step, layer)
    (any object with replica_expert, replica_rank and replica_share arrays)."""
    steps, layers, _ = expert_load.shape
    grid = np.zeros((steps, layers, num_ranks))
    for s in range(steps):
        for layer in range(layers):
            p = placement_for(s, layer)
            grid[s, layer] = placement_rank_loads(expert_load[s, layer], p.replica_expert,
                                                  p.replica_rank, p.replica_share, num_ranks)
    return LoadPanel(title, strategy, grid)


def panels_from_trace(trace: Trace, cfg: Config, num_ranks: int, *,
                      plan_ahead: bool = False) -> list[LoadPanel]:
    """EP (contiguous blocks), EP with hot replicas (when `planner.ep_hot_replicas` > 0) and
    FSEP (the planner's re-layout with `cfg.planner`) on a trace aggregated to `num_ranks`.

    With `plan_ahead`, step s is laid out from step s-1's routing (as LAER-MoE plans from
    recent statistics; step 0 from its own), else from the routing it serves (an oracle)."""
    from planner.placement import ep_hot_replicas, ep_placement
    from planner.relayout import fsep_placement

    t = trace.aggregate(num_ranks)
    steps, layers = t.num_steps, t.num_layers
    counts = t.counts.reshape(steps, layers, num_ranks, -1)  # [S, L, N, E_total]
    load = counts.sum(axis=2, dtype=np.int64)  # [S, L, E_total]
    e_total = load.shape[-1]
    if e_total != cfg.model.total_experts:
        raise InputError(cfg.source, "model.num_experts",
                         f"the trace has {e_total} experts in all, the model "
                         f"{cfg.model.total_experts}")
    ep = ep_placement(e_total, num_ranks)
    panels = [panel_from_trace("EP", "ep", load, lambda s, ly: ep, num_ranks)]

    def seen(s: int, ly: int) -> np.ndarray:
        return counts[max(s - 1, 0) if plan_ahead else s, ly]

    extra = cfg.planner.ep_hot_replicas
    if extra > 0:
        panels.append(panel_from_trace(
            "EP + hot replicas", "ep", load,
            lambda s, ly: ep_hot_replicas(seen(s, ly).sum(axis=0), num_ranks, extra),
            num_ranks))
    panels.append(panel_from_trace(
        "FSEP (re-layout)", "fsep", load,
        lambda s, ly: fsep_placement(cfg.model, cfg.planner, seen(s, ly), num_ranks,
                                     with_bound=False, cluster=cfg.cluster)[0],
        num_ranks))
    return panels


def imbalance_table(panels: Sequence[LoadPanel]) -> pd.DataFrame:
    """Per panel and step: imbalance (max/mean - 1) averaged over layers."""
    rows = []
    for p in panels:
        per_step = load_imbalance(p.loads).mean(axis=1)
        rows += [{"panel": p.title, "strategy": p.strategy, "step": s, "imbalance": v}
                 for s, v in enumerate(per_step)]
    return pd.DataFrame(rows, columns=["panel", "strategy", "step", "imbalance"])


def plot_imbalance(panels: Sequence[LoadPanel], *, layer: int = 0,
                   title: str | None = None) -> Figure:
    """Heatmaps of load / mean for `layer` (index into each panel's layers), one per panel,
    on a shared colour scale, above a strip of per-step imbalance (mean over all layers)."""
    if not panels:
        raise InputError("--results", "files", "nothing to plot")
    for p in panels:
        if not 0 <= layer < p.loads.shape[1]:
            raise InputError("--layer", "layer",
                             f"{layer} out of range: {p.title} has {p.loads.shape[1]} layers")
    rel = []
    for p in panels:
        grid = p.loads[:, layer, :]
        mean = grid.mean(axis=1, keepdims=True)
        rel.append(np.divide(grid, mean, out=np.ones_like(grid), where=mean > 0))
    hi = max(1.05, max(float(r.max()) for r in rel))
    lo = min(0.95, min(float(r.min()) for r in rel))
    # Centre the diverging map on a fair share, symmetric in range so that equal colour
    # intensity means equal distance from the mean above and below.
    span = max(hi - 1.0, 1.0 - lo)
    norm = TwoSlopeNorm(vcenter=1.0, vmin=max(0.0, 1.0 - span), vmax=1.0 + span)
    n = len(panels)
    with paper_style():
        fig, axes = plt.subplots(
            n + 1, 1, figsize=(SINGLE_COLUMN_IN * 1.25, 1.25 * n + 1.35),
            layout="constrained", sharex=True,
            gridspec_kw={"height_ratios": [1.0] * n + [0.85]})
        for ax, p, r in zip(axes[:-1], panels, rel, strict=True):
            steps, ranks = r.shape
            im = ax.imshow(r.T, aspect="auto", origin="lower", cmap="RdBu_r", norm=norm,
                           interpolation="nearest", extent=(-0.5, steps - 0.5, -0.5, ranks - 0.5))
            ax.grid(False)
            ax.set_ylabel("rank")
            ax.set_yticks(_rank_ticks(ranks))
            ax.set_title(f"{p.title}: imbalance {p.imbalance:.0%} (max/mean − 1)", loc="left")
        cb = fig.colorbar(im, ax=axes[:-1], shrink=0.9, pad=0.02, aspect=25)
        cb.set_label("load / mean")
        cb.outline.set_linewidth(0.4)
        strip = axes[-1]
        seen: dict[str, int] = {}
        top = 0.0
        for p in panels:
            per_step = load_imbalance(p.loads).mean(axis=1)
            # Two panels of one strategy (EP, EP + hot replicas) share a colour: tell them
            # apart by line style.
            k = seen[p.strategy] = seen.get(p.strategy, -1) + 1
            strip.plot(np.arange(len(per_step)), per_step * 100, color=strategy_color(p.strategy),
                       lw=1.0, ls=("-", "--", ":")[k % 3], label=p.title,
                       marker="." if len(per_step) <= 30 else None, ms=3)
            top = max(top, float(per_step.max()) * 100)
        # Headroom above the lines for the legend.
        strip.set_ylim(0, max(top, 1.0) * 1.6)
        strip.xaxis.set_major_locator(MaxNLocator(integer=True))
        strip.set_ylabel("imbalance (%)")
        strip.set_xlabel("training step")
        strip.legend(loc="upper center", ncols=min(n, 3), fontsize=6.5, borderaxespad=0.2)
        head = f"MoE layer {layer}" + (f" · {title}" if title else "")
        fig.suptitle(head + " (strip: mean over layers)", fontsize=8)
    return fig


def _rank_ticks(ranks: int) -> list[int]:
    if ranks <= 8:
        return list(range(ranks))
    step = int(np.ceil(ranks / 8))
    return list(range(0, ranks, step))
