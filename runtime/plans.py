"""Where a runtime FSEP layer's layouts come from, pass by pass. The runtime only asks;
planner/ decides (planner.schedule, planner.relayout).

A `Layouts` object answers two calls per layer and forward pass:
- `before(layer)`: the layout of the coming pass when it is known before the routing (planned
  from earlier passes, LAER-MoE's way; a replayed plan), so that its weight gather can start
  early; None when the layout needs this pass's own counts (`planner.oracle`).
- `after(layer, counts)`: the pass's routing counts [N, H, E] are in; the layout of the pass
  (the one `before` gave, or, for the oracle, one planned from these counts). The pass ends.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from moesim.config import ClusterConfig, ModelConfig, PlannerConfig
from moesim.errors import InputError
from planner.placement import Placement

# Solvers the online planner runs: they need neither pulp nor highspy (the GPU machines have
# neither), unlike the MILP.
ONLINE_SOLVERS = ("laer", "flexmoe", "static", "greedy", "fill")


class Layouts(Protocol):
    def before(self, layer: int) -> Placement | None: ...

    def after(self, layer: int, counts: np.ndarray) -> Placement: ...


def online_planner(planner: PlannerConfig) -> PlannerConfig:
    """The planner config the runtime plans online with: the MILP solvers (which need pulp
    and highspy, and seconds a layer) are replaced by LAER-MoE's greedy; the run directory
    records the replacement (runtime.rundir)."""
    import dataclasses
    if planner.solver in ONLINE_SOLVERS:
        return planner
    return dataclasses.replace(planner, solver="laer")


class OnlineLayouts:
    """planner.schedule.FsepSchedule fed with the counts each layer saw: pass k of a layer
    runs the layout planned from its passes k-5 .. k-1 (the static round robin at k = 0), so
    the runtime never plans from counts it has not seen, unless `planner.oracle`."""

    def __init__(self, m: ModelConfig, n: int, planner: PlannerConfig | None = None,
                 cluster: ClusterConfig | None = None) -> None:
        from planner.schedule import FsepSchedule
        planner = online_planner(planner or PlannerConfig(solver="laer"))
        self.planner = planner
        self.schedule = FsepSchedule(m, planner, n, cluster)
        self.passes: dict[int, int] = {}  # layer -> index of its coming pass
        self.seen: dict[int, dict[int, np.ndarray]] = {}  # layer -> pass -> counts

    def _at(self, layer: int):
        seen = self.seen.setdefault(layer, {})
        return lambda s: seen[s]

    def before(self, layer: int) -> Placement | None:
        if self.planner.oracle:
            return None
        return self.schedule.placement(self.passes.get(layer, 0), layer, self._at(layer))

    def after(self, layer: int, counts: np.ndarray) -> Placement:
        k = self.passes.get(layer, 0)
        seen = self.seen.setdefault(layer, {})
        seen[k] = np.asarray(counts, dtype=np.int64)
        p = self.schedule.placement(k, layer, self._at(layer))
        self.passes[layer] = k + 1
        keep = k + 1 - self.planner.history
        for s in [s for s in seen if s < keep]:
            del seen[s]
        for key in [key for key in self.schedule.plans if key[1] == layer and key[0] < k]:
            del self.schedule.plans[key]  # a chained solver needs only the last layout
        return p

    def state(self, layer: int) -> dict:
        """What a checkpoint keeps of a layer: its pass index, recent counts and layout."""
        k = self.passes.get(layer, 0)
        return {"pass": k, "seen": dict(self.seen.get(layer, {})),
                "plan": self.schedule.plans.get((k - 1, layer))}

    def restore(self, layer: int, st: dict | None) -> None:
        if not st:
            return
        self.passes[layer] = st["pass"]
        self.seen[layer] = dict(st["seen"])
        if st.get("plan") is not None:
            self.schedule.plans[st["pass"] - 1, layer] = st["plan"]


class PlanLayouts:
    """Replay plan.json: a layer's k-th pass gets the plan's k-th step (cycling)."""

    def __init__(self, path: str, n: int) -> None:
        from planner.plan import read_plan
        self.plan = read_plan(path)
        if self.plan.num_ranks != n:
            raise InputError(path, "num_ranks", f"plan is for {self.plan.num_ranks} ranks, the "
                             f"job has {n}")
        self.steps = sorted({s for s, _ in self.plan.placements})
        self.passes: dict[int, int] = {}

    def before(self, layer: int) -> Placement:
        k = self.passes.get(layer, 0)
        return self.plan.placement(self.steps[k % len(self.steps)], layer)

    def after(self, layer: int, counts: np.ndarray) -> Placement:
        p = self.before(layer)
        self.passes[layer] = self.passes.get(layer, 0) + 1
        return p

    def state(self, layer: int) -> dict:
        return {"pass": self.passes.get(layer, 0)}

    def restore(self, layer: int, st: dict | None) -> None:
        if st:
            self.passes[layer] = st["pass"]


def online_layout(m: ModelConfig, n: int, planner: PlannerConfig | None = None,
                  cluster: ClusterConfig | None = None) -> OnlineLayouts:
    return OnlineLayouts(m, n, planner, cluster)


def plan_layout(path: str, n: int) -> PlanLayouts:
    return PlanLayouts(path, n)
