"""Lower bounds on the re-layout's max rank time (planner.cost), in seconds.

- `lp_bound`: the LP relaxation of the MILP in planner.ilp (y in [0, 1]), the ceiling that
  docs/benchmarks.md compares plans against. When every expert costs the same on every rank
  (`PlannerConfig.locality` off) it has a closed form: summing the N time rows gives
  N z >= sum_e min_r w[e, r] + g sum_{e,r} y[e, r] >= sum_e min_r w[e, r] + g E (each expert's
  y sum to at least its x, which sum to 1), and x = y = 1/N reaches that with E/N <= C slots a
  rank. Otherwise the LP is solved (HiGHS, from planner.ilp_highs's arrays).
- `replica_bound`: a counting bound the MILP uses as its dual bound. In a layout whose max rank
  time is z, a replica of e on r runs x[e, r] w[e, r] <= z - g (the rank also pays its g), so e
  needs at least k_e(z) replicas, the fewest ranks whose caps min(1, (z - g) / w[e, r]) cover
  1; summing the time rows, z >= B(z) = (sum_e min_r w[e, r] + g sum_e k_e(z)) / N, and the
  N x C slots must hold sum_e k_e(z) replicas (else no layout reaches z: B(z) = inf). B is
  non-increasing in z, so every layout has z >= U* = the least u with B(u) <= u (bisection).
  It is never below the closed-form LP bound and is higher when hot experts must be split,
  much higher when the slots leave no room to split them (E = N x C: U* >= max_e w_e + g).
"""

from __future__ import annotations

import numpy as np

from planner.cost import LayoutCost


def ranks_interchangeable(cost: LayoutCost) -> bool:
    """Every expert costs the same on every rank (no locality): the ranks are symmetric."""
    return bool(np.all(cost.w == cost.w[:, :1]))


def lp_bound(cost: LayoutCost, slots: int) -> float:
    """The LP relaxation's optimum: no layout has a lower max rank time (seconds)."""
    if ranks_interchangeable(cost):
        return floor_bound(cost)
    from planner.ilp import solve_milp  # the general case solves the LP

    return solve_milp(cost, slots, relax=True).objective


def floor_bound(cost: LayoutCost) -> float:
    """(sum_e min_r w[e, r] + g E) / N: every expert once, each token where it is cheapest."""
    return float((cost.w.min(axis=1).sum() + cost.g * cost.num_experts) / cost.num_ranks)


def replicas_needed(cost: LayoutCost, z: float) -> np.ndarray:
    """int[E]: the fewest replicas each expert needs for every rank to stay within z seconds
    (N + 1 where even N cannot hold it)."""
    n = cost.num_ranks
    room = z - cost.g
    if room <= 0:
        return np.full(cost.num_experts, n + 1)
    w = cost.w
    caps = np.ones_like(w)
    np.divide(room, w, out=caps, where=w > room)
    caps = -np.sort(-caps, axis=1)
    covered = np.cumsum(caps, axis=1) >= 1 - 1e-12
    return np.where(covered.any(axis=1), covered.argmax(axis=1) + 1, n + 1)


def replica_bound(cost: LayoutCost, slots: int, *, rel_tol: float = 1e-7) -> float:
    """U*: no layout with `slots` a rank has a max rank time below it (module docstring), to
    `rel_tol`, rounded down so that it stays a bound."""
    n = cost.num_ranks
    base = cost.w.min(axis=1).sum()

    def b(z: float) -> float:
        k = replicas_needed(cost, z).sum()
        return float((base + cost.g * k) / n) if k <= n * slots else np.inf

    lo = floor_bound(cost)  # B(u) >= lo for every u, so U* >= lo
    hi = max(lo, 1e-300)
    while b(hi) > hi:  # B is non-increasing: grow hi until it is feasible
        hi *= 2
    while hi - lo > rel_tol * hi:
        mid = (lo + hi) / 2
        if b(mid) <= mid:
            hi = mid
        else:
            lo = mid
    return lo
