"""Where FSEP layouts come from: the planner's online heuristics fed with recent counts, or a
plan file replayed step by step. The runtime only asks; planner/ decides."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from moesim.config import ClusterConfig, ModelConfig, PlannerConfig
from moesim.errors import InputError
from planner.placement import Placement, replicated_placement

# The heuristics run on the device path: they need neither pulp nor highspy (the GPU machines
# have neither), unlike the ILP.
HEURISTICS = ("laer", "greedy")


def online_layout(m: ModelConfig, n: int, planner: PlannerConfig | None = None,
                  solver: str | None = None, cluster: ClusterConfig | None = None
                  ) -> Callable[[np.ndarray, int], Placement]:
    """A layout function (counts [N, H, E], layer) -> Placement, solving each call, with the
    time model's rates of `cluster` (planner.rates)."""
    from planner import heuristics
    from planner.cost import layout_cost
    from planner.rates import planner_rates
    planner = planner or PlannerConfig()
    rates = planner_rates(cluster, planner)
    name = solver or (planner.solver if planner.solver in HEURISTICS else "laer")
    if name not in HEURISTICS:
        raise InputError("config", "planner.solver",
                         f"{name!r}: the online planner runs {', '.join(HEURISTICS)}")
    fn = {"laer": heuristics.laer_fill, "greedy": heuristics.greedy_lpt}[name]
    # A rank must hold at least its even part of the experts; 25% more slots leave the solver
    # room to replicate the hot ones.
    even = -(-m.total_experts // n)
    slots = max(planner.slots_per_rank, even + -(-even // 4))

    def layout(counts: np.ndarray, layer: int) -> Placement:
        cost = layout_cost(m, planner, counts, n, rates)
        return replicated_placement("fsep", n, fn(cost, slots), source="online planner")

    return layout


def plan_layout(path: str, n: int) -> Callable[[np.ndarray, int], Placement]:
    """Replay plan.json: the k-th call for a layer gets the plan's step k (cycling)."""
    from planner.plan import read_plan
    plan = read_plan(path)
    if plan.num_ranks != n:
        raise InputError(path, "num_ranks", f"plan is for {plan.num_ranks} ranks, the job has {n}")
    steps = sorted({s for s, _ in plan.placements})
    calls: dict[int, int] = {}

    def layout(counts: np.ndarray, layer: int) -> Placement:
        k = calls.get(layer, 0)
        calls[layer] = k + 1
        return plan.placement(steps[k % len(steps)], layer)

    return layout
