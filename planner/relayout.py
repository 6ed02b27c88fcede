"""FSEP re-layout: the one entry point the simulator and the runtime call for an FSEP Placement
of one (step, layer), from its routing counts (planner.schedule says which counts).

    placement, stats = fsep_placement(model, planner_cfg, counts, num_ranks, previous=None)

`planner_cfg.solver` picks the method:
- "laer": LAER-MoE's greedy planner; "flexmoe": FlexMoE's scheduler as LAER-MoE's artifact
  runs it (from `previous`); "static": the fixed round-robin layout (the artifact's `FSDP`
  arm). All three fill every slot (planner.laer) and route node-locally.
- "highs" / "cbc": moesim's MILP (planner.ilp, warm-started from the best of the heuristics;
  `lp_bound` in planner.bounds is its LP-relaxation bound); "greedy" (an LPT with D'Hondt
  counts) and "fill" (slot-aware fill to the balanced target with splitting), both
  planner.heuristics. These four set token shares and route by them.
`planner_cfg.routing` ("auto": as just said) can force either routing on any layout. Every
result is checked against the constraints before it is returned.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np

from moesim.config import ClusterConfig, ModelConfig, PlannerConfig
from moesim.errors import InputError
from planner import laer
from planner.bounds import lp_bound
from planner.cost import LayoutCost, layout_cost
from planner.heuristics import bin_completion, greedy_lpt, laer_fill, lpt_wrap, rebalance_shares
from planner.ilp import solve_milp
from planner.placement import Placement, replicated_placement, slot_placement, with_routing
from planner.rates import Rates, planner_rates

HEURISTICS = {"greedy": greedy_lpt, "fill": laer_fill}
SLOT_SOLVERS = ("laer", "flexmoe", "static")
# Warm starts for the MILP: the two methods above, and lpt_wrap and bin_completion, which are
# better on Zipf routing (docs/planner.md) but not methods of their own. bin_completion can
# find nothing when the slots are tight (it returns None); the others always place.
STARTS = (greedy_lpt, laer_fill, lpt_wrap, bin_completion)

__all__ = ["HEURISTICS", "SLOT_SOLVERS", "SolveStats", "check_feasible", "fsep_placement",
           "lp_bound", "node_size_of", "static_placement", "verify_layout"]


def node_size_of(cluster: ClusterConfig | None, num_ranks: int) -> int:
    """Ranks per node of a group of `num_ranks` laid node by node (0: one node)."""
    g = (cluster or ClusterConfig()).gpus_per_node
    return g if g < num_ranks and num_ranks % g == 0 else 0


def _routed(p: Placement, planner: PlannerConfig, node: int, slot_based: bool) -> Placement:
    want = planner.routing if planner.routing != "auto" else \
        ("node_local" if slot_based else "shares")
    return p if (p.routing, p.node_size) == (want, node if want == "node_local" else
                                             p.node_size) else with_routing(p, want, node)


def static_placement(model: ModelConfig, planner: PlannerConfig, num_ranks: int,
                     cluster: ClusterConfig | None = None) -> Placement:
    """The round-robin layout every FSEP layer starts from (planner.laer.static_layout)."""
    node = node_size_of(cluster, num_ranks)
    a = laer.static_layout(model.total_experts, num_ranks, planner.slots_per_rank)
    return _routed(slot_placement(a, node, source="planner"), planner, node, True)


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
    node = node_size_of(cluster, num_ranks)
    rates = planner_rates(cluster, planner)
    t0 = time.perf_counter()
    dual, proved = float("nan"), False
    slot_based = planner.solver in SLOT_SOLVERS
    if slot_based:
        c2 = _source_counts(counts, num_ranks, e_total)
        a = _slot_solve(model, planner, c2, num_ranks, previous, node, rates)
        placement = _routed(slot_placement(a, node, source="planner"), planner, node, True)
        status = "heuristic"
        share = _effective_shares(placement, c2)
        objective = float(cost.rank_time(share).max())
    elif planner.solver in HEURISTICS:
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
    if not slot_based:
        placement = _routed(replicated_placement("fsep", num_ranks, share, source="planner"),
                            planner, node, False)
        if placement.routing == "node_local":
            share = _effective_shares(placement, _source_counts(counts, num_ranks, e_total))
        else:
            share = placement.share_matrix()
    verify_layout(placement, slots)
    t = cost.rank_time(share)
    bound = lp_bound(cost, slots) if with_bound else float("nan")
    tok = cost.load[:, None] * share
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


def _source_counts(counts: np.ndarray, n: int, e_total: int) -> np.ndarray:
    """Routing as [N, E_total] (loads [E_total] taken as even over the sources)."""
    c = np.asarray(counts)
    if c.ndim == 1:
        return np.broadcast_to(c / n, (n, e_total)).astype(np.float64)
    return c.reshape(n, e_total)


def _effective_shares(placement: Placement, c2: np.ndarray) -> np.ndarray:
    """float[E_total, N]: the fraction of expert g's tokens rank r runs under the placement's
    routing of these counts (node-local routing depends on the sources)."""
    from planner.traffic import split_tokens
    ci = np.rint(c2).astype(np.int64)
    tok = split_tokens(ci, placement).sum(axis=0)
    m = np.zeros((placement.num_experts, placement.num_ranks))
    np.add.at(m, (placement.replica_expert, placement.replica_rank), tok)
    tot = m.sum(axis=1, keepdims=True)
    return np.where(tot > 0, m / np.maximum(tot, 1), placement.share_matrix())


def _slot_solve(model: ModelConfig, planner: PlannerConfig, c2: np.ndarray, n: int,
                previous: Placement | None, node: int, rates: Rates) -> np.ndarray:
    slots = planner.slots_per_rank
    if planner.solver == "static":
        return laer.static_layout(model.total_experts, n, slots)
    if planner.solver == "flexmoe":
        prev = previous.slot_matrix() if previous is not None and \
            previous.slot_matrix().shape == (model.total_experts, n) and \
            (previous.slots_per_rank() == slots).all() else \
            laer.static_layout(model.total_experts, n, slots)
        return laer.flexmoe(c2, slots, prev, node)
    load = c2.sum(axis=0)
    comp_s = 2.0 * model.expert_params / rates.gemm_rate(
        2.0 * model.expert_params * float(load.mean()))
    return laer.laer_greedy(c2, slots, token_bytes=model.expert_dim * model.dtype_bytes,
                            comp_s=comp_s, intra_bps=rates.intra_bps,
                            inter_bps=rates.inter_bps, node_size=node,
                            recompute=planner.recompute)


def _max_mean(v: np.ndarray) -> float:
    m = float(np.mean(v))
    return float(np.max(v)) / m if m > 0 else 1.0


def verify_layout(placement: Placement, slots: int) -> None:
    """The re-layout constraints: slots per rank (Placement itself checks one replica or more
    per expert and shares summing to 1)."""
    used = placement.slots_per_rank()
    if used.max(initial=0) > slots:
        raise AssertionError(f"rank {int(used.argmax())} holds {int(used.max())} replicas, "
                             f"more than {slots} slots")
