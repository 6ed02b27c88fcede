"""FSEP re-layout: the one entry point the simulator and the runtime call for an FSEP Placement
of one (step, layer), from its routing counts.

    placement, stats = fsep_placement(model, planner_cfg, counts, num_ranks, previous=None)

`planner_cfg.solver` picks the method: "highs" / "cbc" (the MILP in planner.ilp, warm-started
from the best of the heuristics), "greedy" or "laer" (planner.heuristics). Every result is
checked against the constraints before it is returned. `lp_bound` (planner.bounds) gives the
LP-relaxation lower bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from moesim.config import ClusterConfig, ModelConfig, PlannerConfig
from moesim.errors import InputError
from planner.bounds import lp_bound
from planner.cost import LayoutCost, layout_cost
from planner.heuristics import bin_completion, greedy_lpt, laer_fill, lpt_wrap, rebalance_shares
from planner.ilp import solve_milp
from planner.placement import Placement, replicated_placement
from planner.rates import planner_rates

HEURISTICS = {"greedy": greedy_lpt, "laer": laer_fill}
# Warm starts for the MILP: the two methods above, and lpt_wrap and bin_completion, which are
# better on Zipf routing (docs/planner.md) but not methods of their own. bin_completion can
# find nothing when the slots are tight (it returns None); the others always place.
STARTS = (greedy_lpt, laer_fill, lpt_wrap, bin_completion)

__all__ = ["HEURISTICS", "SolveStats", "check_feasible", "fsep_placement", "lp_bound",
           "verify_layout"]


@dataclass(frozen=True)
class SolveStats:
    """How a layout was found and how good it is. Times in seconds of the planner.cost model;
    `bound` is the LP-relaxation bound when computed (else NaN), `gap` = max_time/bound - 1.
    `dual_bound` is the MILP's own proven lower bound on its objective (NaN for heuristics);
    `proved_at_start` says that the best warm start was already within `mip_gap` of it, so
    no branch and bound ran."""

    solver: str
    status: str  # "optimal" | "time_limit" | "heuristic"
    objective: float  # max rank time (+ change penalty)
    max_time: float
    mean_time: float
    bound: float
    gap: float
    solve_s: float
    replicas: int
    tokens_max_mean: float  # max / mean of per-rank tokens
    before_tokens_max_mean: float  # the same for plain contiguous EP
    dual_bound: float = float("nan")
    proved_at_start: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def check_feasible(num_experts: int, num_ranks: int, slots: int) -> None:
    if num_ranks * slots < num_experts:
        raise InputError("planner", "slots_per_rank",
                         f"{num_ranks} ranks x {slots} slots cannot hold all {num_experts} "
                         f"experts (need at least {-(-num_experts // num_ranks)} slots a rank)")


def _cost(model: ModelConfig, planner: PlannerConfig, counts: np.ndarray,
          num_ranks: int, cluster: ClusterConfig | None = None) -> LayoutCost:
    c = np.asarray(counts)
    if not planner.locality and c.ndim > 1:
        c = c.reshape(c.shape[0], -1).sum(axis=0)  # even sources: ranks are symmetric
    return layout_cost(model, planner, c, num_ranks, planner_rates(cluster, planner))


def fsep_placement(model: ModelConfig, planner: PlannerConfig, counts: np.ndarray,
                   num_ranks: int, *, previous: Placement | None = None,
                   with_bound: bool = True, cluster: ClusterConfig | None = None
                   ) -> tuple[Placement, SolveStats]:
    """An FSEP layout for routing `counts` ([N, H, E], [N, E_total] or loads [E_total]).

    Assumes the layout is planned from the counts it will serve (an oracle; pass the previous
    step's counts to plan ahead as LAER-MoE does). `previous` makes changes cost
    `planner.change_penalty` seconds a replica (ILP only; heuristics ignore it). Raises
    InputError when the slots cannot hold every expert. `cluster` gives the time model's
    link rates and GPU kind (planner.rates; default: the default cluster)."""
    cost = _cost(model, planner, counts, num_ranks, cluster)
    e_total = cost.num_experts
    if e_total != model.total_experts:
        raise InputError("counts", "shape", f"{e_total} experts, the model has "
                         f"{model.total_experts}")
    slots = planner.slots_per_rank
    check_feasible(e_total, num_ranks, slots)
    t0 = time.perf_counter()
    dual, proved = float("nan"), False
    if planner.solver in HEURISTICS:
        share = HEURISTICS[planner.solver](cost, slots)
        status, objective = "heuristic", float(cost.rank_time(share).max())
    else:
        prev = previous.hosted() if previous is not None else None
        starts = [s for s in (f(cost, slots) for f in STARTS) if s is not None]
        if prev is not None and prev.shape == cost.w.shape and planner.change_penalty > 0 \
                and prev.any(axis=1).all() and (prev.sum(axis=0) <= slots).all():
            starts.append(rebalance_shares(cost, prev))  # no change, no penalty

        def objective_of(share: np.ndarray) -> float:
            moved = 0 if prev is None else int(((share > 0) != prev).sum())
            return float(cost.rank_time(share).max()) + planner.change_penalty * moved

        start = min(starts, key=objective_of)
        res = solve_milp(cost, slots, solver=planner.solver, time_limit_s=planner.time_limit_s,
                         mip_gap=planner.mip_gap, threads=planner.threads, start=start,
                         previous=prev, change_penalty=planner.change_penalty)
        if res.share is None:
            raise InputError("planner", "solver", f"{planner.solver} found no layout "
                             f"({res.status}) within {planner.time_limit_s} s")
        share, status, objective = res.share, res.status, res.objective
        dual, proved = res.dual_bound, res.start_proved
        if objective_of(share) > objective_of(start) * (1 + 1e-9):
            share = start  # a time-limited solve never returns worse than its start
    solve_s = time.perf_counter() - t0
    placement = replicated_placement("fsep", num_ranks, share, source="planner")
    verify_layout(placement, slots)
    t = cost.rank_time(placement.share_matrix())
    bound = lp_bound(cost, slots) if with_bound else float("nan")
    tok = cost.load[:, None] * placement.share_matrix()
    ep_tok = cost.load.reshape(num_ranks, -1).sum(axis=1) if e_total % num_ranks == 0 \
        else np.bincount(np.arange(e_total) * num_ranks // e_total, cost.load, num_ranks)
    stats = SolveStats(
        solver=planner.solver, status=status, objective=objective, max_time=float(t.max()),
        mean_time=float(t.mean()), bound=bound,
        gap=float(t.max() / bound - 1) if with_bound and bound > 0 else float("nan"),
        solve_s=solve_s, replicas=placement.num_replicas,
        tokens_max_mean=_max_mean(tok.sum(axis=0)), before_tokens_max_mean=_max_mean(ep_tok),
        dual_bound=dual, proved_at_start=proved)
    return placement, stats


def _max_mean(v: np.ndarray) -> float:
    m = float(np.mean(v))
    return float(np.max(v)) / m if m > 0 else 1.0


def verify_layout(placement: Placement, slots: int) -> None:
    """The re-layout constraints: slots per rank (Placement itself checks one replica or more
    per expert and shares summing to 1)."""
    used = placement.replicas_per_rank()
    if used.max(initial=0) > slots:
        raise AssertionError(f"rank {int(used.argmax())} holds {int(used.max())} replicas, "
                             f"more than {slots} slots")
