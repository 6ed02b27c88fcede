"""The FSEP re-layout MILP and its LP relaxation.

    minimise    z  +  lambda * sum_{e,r} moved[e, r]
    subject to  sum_r x[e, r] = 1                            every expert's tokens served
                x[e, r] <= y[e, r]                           tokens only where materialised
                sum_e y[e, r] <= C                           slots per rank
                sum_e w[e, r] x[e, r] + g sum_e y[e, r] <= z  (per-rank time, planner.cost)
                y binary, 0 <= x <= 1
    moved[e, r] = 1 - y[e, r] where the previous layout had (e, r), else y[e, r] (linear).

At least one replica per expert follows from the first two constraints. Times are divided by
`LayoutCost.mean_time_floor()` so the coefficients are O(1).

Two back ends build this same model. "highs" (the default) builds it as numpy arrays and
solves it through highspy (planner.ilp_highs), with cuts that only remove layouts worse than
the warm start and z bounded below by planner.bounds.replica_bound. "cbc" builds it in PuLP
(`solve_pulp`, also the tests' reference model, which PuLP can hand to HiGHS as well).
Before either runs, a warm start already within `mip_gap` of the replica bound is returned
as optimal: the solver would stop at the same bound.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np
import pulp

from moesim.errors import InputError
from planner.bounds import replica_bound
from planner.cost import LayoutCost
from planner.ilp_highs import build_arrays, run_highs, start_values

SOLVERS = ("highs", "cbc")


@dataclass(frozen=True, eq=False)
class MilpResult:
    share: np.ndarray | None  # float[E_total, N], None when no solution was found
    objective: float  # z (+ penalty) in seconds, as the solver reports it
    dual_bound: float  # a proven lower bound on the objective, seconds
    status: str  # "optimal" | "time_limit" | "infeasible" | "no_solution"
    solve_s: float
    solver: str
    start_proved: bool = False  # the warm start was within mip_gap of the bound: no solve


class _WarmHiGHS(pulp.HiGHS):
    """PuLP's HiGHS with a MIP start (PuLP's HiGHS API has none) and the solver's dual bound
    and status kept after the solve."""

    def __init__(self, *args, start: dict[str, float] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.start = start or {}
        self.info: dict[str, float] = {}

    def callSolver(self, lp: pulp.LpProblem) -> None:
        h = lp.solverModel
        if self.start:
            idx = [v.index for v in lp.variables() if v.name in self.start]
            val = [self.start[v.name] for v in lp.variables() if v.name in self.start]
            h.setSolution(len(idx), np.asarray(idx, np.int32), np.asarray(val, np.float64))
        h.run()
        info = h.getInfo()
        self.info = {"mip_dual_bound": info.mip_dual_bound, "status": h.getModelStatus()}


def _build(cost: LayoutCost, slots: int, unit: float, *, relax: bool,
           previous: np.ndarray | None, change_penalty: float
           ) -> tuple[pulp.LpProblem, dict, dict, pulp.LpVariable]:
    e_total, n = cost.w.shape
    w = cost.w / unit
    g = cost.g / unit
    prob = pulp.LpProblem("fsep_relayout", pulp.LpMinimize)
    cat = pulp.LpContinuous if relax else pulp.LpBinary
    x = {(e, r): prob.add_variable(f"x_{e}_{r}", 0, 1)
         for e in range(e_total) for r in range(n)}
    y = {(e, r): prob.add_variable(f"y_{e}_{r}", 0, 1, cat=cat)
         for e in range(e_total) for r in range(n)}
    z = prob.add_variable("z", 0)
    objective = [(z, 1.0)]
    const = 0.0
    if previous is not None and change_penalty > 0:
        lam = change_penalty / unit
        for (e, r), v in y.items():
            if previous[e, r]:
                objective.append((v, -lam))
                const += lam
            else:
                objective.append((v, lam))
    prob += pulp.LpAffineExpression(objective, constant=const)

    # Rows from term lists (PuLP's fast path), not from operator arithmetic on variables.
    def row(terms: list, sense: int, rhs: float, name: str) -> None:
        prob.addConstraint(pulp.LpConstraint(pulp.LpAffineExpression(terms), sense=sense,
                                             rhs=rhs, name=name))

    for e in range(e_total):
        row([(x[e, r], 1.0) for r in range(n)], pulp.LpConstraintEQ, 1, f"serve_{e}")
    for (e, r), v in x.items():
        row([(v, 1.0), (y[e, r], -1.0)], pulp.LpConstraintLE, 0, f"link_{e}_{r}")
    for r in range(n):
        row([(y[e, r], 1.0) for e in range(e_total)], pulp.LpConstraintLE, slots, f"slots_{r}")
        terms = [(x[e, r], float(w[e, r])) for e in range(e_total)]
        terms += [(y[e, r], g) for e in range(e_total)]
        terms.append((z, -1.0))
        row(terms, pulp.LpConstraintLE, 0, f"time_{r}")
    return prob, x, y, z


def _check(cost: LayoutCost, slots: int, solver: str) -> None:
    if solver not in SOLVERS:
        raise InputError("planner", "solver", f"{solver!r} is not one of {', '.join(SOLVERS)}")
    e_total, n = cost.w.shape
    if n * slots < e_total:
        raise InputError("planner", "slots_per_rank",
                         f"{n} ranks x {slots} slots cannot hold all {e_total} experts "
                         f"(need at least {-(-e_total // n)} slots a rank)")


# HiGHS's dual simplex takes ~17k iterations (4-5 s) on the root LP at 256 x 64; its
# interior point solver (IPX) takes ~1 s. Past the root, branch and bound wants the simplex
# (warm-started node LPs), so IPX only for models this large, where the root is most of it.
IPX_MIN_PAIRS = 8192


def solve_milp(cost: LayoutCost, slots: int, *, solver: str = "highs", time_limit_s: float = 10,
               mip_gap: float = 0.01, threads: int = 1, relax: bool = False,
               start: np.ndarray | None = None, previous: np.ndarray | None = None,
               change_penalty: float = 0.0) -> MilpResult:
    """Solve the re-layout MILP (or, with `relax`, its LP relaxation).

    `start` is a share matrix used as the MIP start; `previous` a bool[E_total, N] layout
    whose changes cost `change_penalty` seconds per replica added or dropped. A time limit
    returns the best incumbent with status "time_limit". Status "optimal" means within
    `mip_gap` of `dual_bound`, relative to the objective (HiGHS's rule)."""
    _check(cost, slots, solver)
    if solver == "cbc":
        return solve_pulp(cost, slots, solver="cbc", time_limit_s=time_limit_s,
                          mip_gap=mip_gap, threads=threads, relax=relax, start=start,
                          previous=previous, change_penalty=change_penalty)
    t0 = time.perf_counter()
    unit = cost.mean_time_floor() or 1.0
    if relax:
        a = build_arrays(cost, slots, unit, relax=True)
        r = run_highs(a, time_limit_s=time_limit_s, mip_gap=mip_gap, threads=threads)
        if r.values is None:
            return MilpResult(None, float("nan"), float("nan"), r.status,
                              time.perf_counter() - t0, solver)
        e_total, n = cost.w.shape
        share = r.values[:e_total * n].reshape(e_total, n)
        return MilpResult(share, r.objective * unit, r.objective * unit, r.status,
                          time.perf_counter() - t0, solver)
    bound = replica_bound(cost, slots)
    penalty = _penalty(previous, change_penalty)
    sv = cutoff = None
    if start is not None:
        sv = start_values(cost, start, unit)
        cutoff = float(sv[-1]) + penalty(start > 0) / unit
        if _within(cutoff, bound / unit, mip_gap):
            return MilpResult(start, cutoff * unit, bound, "optimal", time.perf_counter() - t0,
                              solver, start_proved=True)
    a = build_arrays(cost, slots, unit, relax=False, previous=previous,
                     change_penalty=change_penalty, cutoff=cutoff, z_floor=bound / unit)
    big = cost.w.size >= IPX_MIN_PAIRS
    r = run_highs(a, time_limit_s=time_limit_s, mip_gap=mip_gap, threads=threads, start=sv,
                  options={"mip_lp_solver": "ipx"} if big else None)
    solve_s = time.perf_counter() - t0
    if r.values is None:
        return MilpResult(None, float("nan"), float("nan"), r.status, solve_s, solver)
    e_total, n = cost.w.shape
    m = e_total * n
    share = _clean_share(r.values[:m].reshape(e_total, n), r.values[m:2 * m].reshape(e_total, n))
    dual = max(r.dual_bound * unit, bound)
    status = "optimal" if _within(r.objective, dual / unit, mip_gap) else r.status
    return MilpResult(share, r.objective * unit, dual, status, solve_s, solver)


def _within(objective: float, bound: float, gap: float) -> bool:
    return objective - bound <= gap * abs(objective) + 1e-12


def _penalty(previous: np.ndarray | None, change_penalty: float):
    """The change penalty of a layout, seconds (0 without a previous layout)."""
    def f(hosted: np.ndarray) -> float:
        if previous is None or change_penalty <= 0:
            return 0.0
        return change_penalty * float((hosted != np.asarray(previous, dtype=bool)).sum())
    return f


def _clean_share(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Shares where y is set, without the solver's round-off: a share below 1e-9 would cost a
    whole replica (g) in planner.cost for nothing, so it is dropped and the rest rescaled."""
    share = np.where(y > 0.5, np.clip(x, 0, 1), 0.0)
    share[share < 1e-9] = 0.0
    return share / share.sum(axis=1, keepdims=True)


def solve_pulp(cost: LayoutCost, slots: int, *, solver: str = "cbc", time_limit_s: float = 10,
               mip_gap: float = 0.01, threads: int = 1, relax: bool = False,
               start: np.ndarray | None = None, previous: np.ndarray | None = None,
               change_penalty: float = 0.0) -> MilpResult:
    """The same MILP built in PuLP, solved by CBC or (as a reference) by PuLP's HiGHS. No
    cuts; the reported dual bound is the replica bound (CBC's is not exposed by PuLP)."""
    _check(cost, slots, solver)
    e_total, n = cost.w.shape
    unit = cost.mean_time_floor() or 1.0
    t0 = time.perf_counter()
    prob, x, y, z = _build(cost, slots, unit, relax=relax, previous=previous,
                           change_penalty=change_penalty)
    warm: dict[str, float] = {}
    if start is not None and not relax:
        t_r = cost.rank_time(start) / unit
        for (e, r), v in x.items():
            warm[v.name] = float(start[e, r])
            warm[y[e, r].name] = float(start[e, r] > 0)
        warm[z.name] = float(t_r.max())
    if solver == "highs":
        s = _WarmHiGHS(mip=not relax, msg=False, gapRel=mip_gap, threads=threads,
                       timeLimit=time_limit_s, start=warm, random_seed=0)
    else:
        for name, val in warm.items():
            prob.variablesDict()[name].setInitialValue(val)
        s = pulp.PULP_CBC_CMD(msg=False, gapRel=mip_gap, timeLimit=time_limit_s,
                              threads=threads, warmStart=bool(warm),
                              options=["randomSeed 0", "randomCbcSeed 0"])
    code = prob.solve(s)
    solve_s = time.perf_counter() - t0
    status = _status(prob, s, code)
    if status in ("infeasible", "no_solution"):
        return MilpResult(None, float("nan"), float("nan"), status, solve_s, solver)
    share = np.array([[x[e, r].varValue or 0.0 for r in range(n)] for e in range(e_total)])
    if not relax:
        hosted = np.array([[(y[e, r].varValue or 0.0) > 0.5 for r in range(n)]
                           for e in range(e_total)])
        share = np.where(hosted, np.clip(share, 0, 1), 0.0)
    objective = float(pulp.value(prob.objective)) * unit
    bound = objective
    if not relax:
        bound = replica_bound(cost, slots)
        if isinstance(s, _WarmHiGHS):
            dual = float(s.info.get("mip_dual_bound", -np.inf)) * unit
            bound = max(bound, dual) if np.isfinite(dual) else bound
        elif status == "optimal":  # CBC stopped within its relative gap
            bound = max(bound, objective * (1 - mip_gap))
    return MilpResult(share, objective, bound, status, solve_s, solver)


def _status(prob: pulp.LpProblem, s: pulp.LpSolver, code: int) -> str:
    if isinstance(s, _WarmHiGHS):
        st = s.info.get("status")
        if st == highspy.HighsModelStatus.kOptimal:
            return "optimal"
        if st in (highspy.HighsModelStatus.kInfeasible,
                  highspy.HighsModelStatus.kUnboundedOrInfeasible):
            return "infeasible"
        if prob.sol_status == pulp.LpSolutionIntegerFeasible or \
                (code == pulp.LpStatusOptimal and prob.sol_status > 0):
            return "time_limit"
        return "no_solution"
    if code == pulp.LpStatusInfeasible:
        return "infeasible"
    if prob.sol_status == pulp.LpSolutionOptimal:
        return "optimal"
    if prob.sol_status == pulp.LpSolutionIntegerFeasible:
        return "time_limit"
    return "no_solution"
