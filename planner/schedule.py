"""When FSEP plans, and from which counts: the layout that serves (step s, layer l).

LAER-MoE plans layer l from the layer's token counts summed over its last 5 forward passes
(`history_capacity = 5` in MoEAlltoAllSmartTokenDispatcher, galvatron/core/runtime/moe/
smart_routing.py, PKU-DAIR/Hetu-Galvatron branch laer-moe), in a CPU worker, and applies the
result at the layer's next weight gather: the step it serves is never among the counts it
planned from. Before any pass the layer runs its initial round-robin layout
(planner.laer.static_layout). `FsepSchedule` does the same for the simulator and the
runtime: pass s of a layer is served by a plan made from passes max(0, s - history) .. s - 1
(the static layout at s = 0), or, with `planner.oracle`, from pass s itself (an upper bound
no real system reaches: a study must name it). Solvers that work from the previous layout
(FlexMoE; the MILP's change penalty) get the layout that served pass s - 1.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moesim.config import ClusterConfig, ModelConfig, PlannerConfig
from planner.placement import Placement
from planner.relayout import SolveStats, fsep_placement, node_size_of, static_placement

CountsAt = Callable[[int], np.ndarray]  # pass -> int [N, H, E] counts of the layer


class FsepSchedule:
    """Plans of one MoE group, memoised per (pass, layer)."""

    def __init__(self, model: ModelConfig, planner: PlannerConfig, num_ranks: int,
                 cluster: ClusterConfig | None = None) -> None:
        self.model, self.planner, self.n = model, planner, num_ranks
        self.cluster = cluster or ClusterConfig()
        self.plans: dict[tuple[int, int], Placement] = {}
        self.stats: dict[tuple[int, int], SolveStats | None] = {}
        self.read: dict[tuple[int, int], tuple[int, ...]] = {}  # passes each plan read

    def planning_passes(self, step: int) -> tuple[int, ...]:
        """The passes whose counts plan pass `step` (none: the static layout)."""
        if self.planner.oracle:
            return (step,)
        return tuple(range(max(0, step - self.planner.history), step))

    def placement(self, step: int, layer: int, counts_at: CountsAt) -> Placement:
        """The layout serving pass `step` of `layer`."""
        first = step
        while first > 0 and (first - 1, layer) not in self.plans and self._chained():
            first -= 1  # a solver that starts from the previous layout needs it first
        for s in range(first, step + 1):
            if (s, layer) not in self.plans:
                self._plan(s, layer, counts_at)
        return self.plans[step, layer]

    def _chained(self) -> bool:
        return self.planner.solver == "flexmoe" or (
            self.planner.change_penalty > 0 and self.planner.solver in ("highs", "cbc"))

    def _plan(self, step: int, layer: int, counts_at: CountsAt) -> None:
        passes = self.planning_passes(step)
        self.read[step, layer] = passes
        if not passes:
            self.plans[step, layer] = static_placement(self.model, self.planner, self.n,
                                                       self.cluster)
            self.stats[step, layer] = None
            return
        counts = np.sum([np.asarray(counts_at(s), dtype=np.int64) for s in passes], axis=0)
        prev = self.plans.get((step - 1, layer)) if self._chained() else None
        p, st = fsep_placement(self.model, self.planner, counts, self.n, previous=prev,
                               with_bound=False, cluster=self.cluster)
        self.plans[step, layer] = p
        self.stats[step, layer] = st


__all__ = ["CountsAt", "FsepSchedule", "node_size_of"]
