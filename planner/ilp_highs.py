"""The re-layout MILP of planner.ilp as numpy arrays, solved through highspy.

Columns: x[e, r] at e * N + r, y[e, r] at E*N + e * N + r, then z. Rows: serve (E), link
(E*N), slots (N), time (N), then the cuts. Built as CSR arrays this takes milliseconds at
256 experts x 64 ranks, where PuLP's row-by-row building took seconds.

Cuts (`cutoff` = U, the warm start's objective; every layout at least as good has z <= U, so
each cut keeps all of them, the start included):
- piece bound: a replica of e on r runs x[e, r] w[e, r] + g <= t_r <= z <= U, so
  x[e, r] <= min(1, (U - g) / w[e, r]) y[e, r], tighter than x <= y for hot experts;
- replica floor: sum_r y[e, r] >= k_e(U) (planner.bounds.replicas_needed) where k_e > 1;
- replica ceiling (no change penalty only): for a fixed layout the best token shares are an
  LP whose basic optimal solutions have at most E + N - 1 non-zero shares (E serve rows and
  N time rows, z basic); a replica left with no tokens costs nothing to drop, so some optimal
  layout has at most E + N - 1 replicas: sum y <= E + N - 1.
And `z_floor` (planner.bounds.replica_bound, valid for every layout) is z's lower bound, so
HiGHS's gap is measured against it from the start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import highspy
import numpy as np

from planner.bounds import replicas_needed
from planner.cost import LayoutCost

_INF = highspy.kHighsInf
# Slack on the cut-off U so that the warm start passes the cuts despite rounding.
_CUTOFF_SLACK = 1e-9


@dataclass(frozen=True, eq=False)
class Arrays:
    """A MILP in HiGHS's row-wise form: min c.x + offset, row_lo <= A x <= row_hi."""

    cost: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    integer: np.ndarray  # bool per column
    row_lo: np.ndarray
    row_hi: np.ndarray
    start: np.ndarray  # CSR row starts (int32, len rows + 1)
    index: np.ndarray  # CSR column indices (int32)
    value: np.ndarray  # CSR values (float64)
    offset: float = 0.0


def build_arrays(cost: LayoutCost, slots: int, unit: float, *, relax: bool,
                 previous: np.ndarray | None = None, change_penalty: float = 0.0,
                 cutoff: float | None = None, z_floor: float = 0.0) -> Arrays:
    """The re-layout model with times divided by `unit`. `cutoff` (the warm start's
    objective) adds the cuts of the module docstring and `z_floor` bounds z below, both
    normalised; leave them out for the plain model and its LP relaxation."""
    e_total, n = cost.w.shape
    m = e_total * n
    w = cost.w / unit
    g = cost.g / unit
    xi = np.arange(m, dtype=np.int64).reshape(e_total, n)  # x[e, r] column
    yi = xi + m  # y[e, r] column
    zi = 2 * m

    c = np.zeros(2 * m + 1)
    c[zi] = 1.0
    offset = 0.0
    if previous is not None and change_penalty > 0:
        lam = change_penalty / unit
        prev = np.asarray(previous, dtype=bool)
        c[m:2 * m] = np.where(prev, -lam, lam).ravel()
        offset = lam * float(prev.sum())

    link_cap = np.ones((e_total, n))
    if cutoff is not None and not relax:
        room = cutoff * (1 + _CUTOFF_SLACK) - g
        with np.errstate(divide="ignore"):
            link_cap = np.minimum(1.0, np.where(w > 0, room / np.where(w > 0, w, 1), 1.0))
        link_cap = np.maximum(link_cap, 0.0)

    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def block(cols: np.ndarray, vals: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
        # cols/vals: [rows, terms] dense blocks, every row with the same number of terms
        rows.append((cols, vals, lo, hi, np.full(len(cols), cols.shape[1])))

    # serve: sum_r x[e, r] = 1
    block(xi, np.ones((e_total, n)), np.ones(e_total), np.ones(e_total))
    # link: x[e, r] - cap[e, r] y[e, r] <= 0
    block(np.stack([xi.ravel(), yi.ravel()], axis=1),
          np.stack([np.ones(m), -link_cap.ravel()], axis=1), np.full(m, -_INF), np.zeros(m))
    # slots: sum_e y[e, r] <= C
    block(yi.T, np.ones((n, e_total)), np.full(n, -_INF), np.full(n, float(slots)))
    # time: sum_e w[e, r] x[e, r] + g sum_e y[e, r] - z <= 0
    block(np.concatenate([xi.T, yi.T, np.full((n, 1), zi)], axis=1),
          np.concatenate([w.T, np.full((n, e_total), g), -np.ones((n, 1))], axis=1),
          np.full(n, -_INF), np.zeros(n))
    if cutoff is not None and not relax:
        floor = replicas_needed(LayoutCost(w=w, g=g, load=cost.load),
                                cutoff * (1 + _CUTOFF_SLACK))
        floor = np.minimum(floor, n)  # n + 1 (cannot fit) is impossible below a feasible U
        hot = np.flatnonzero(floor > 1)
        if len(hot):
            block(yi[hot], np.ones((len(hot), n)), floor[hot].astype(float),
                  np.full(len(hot), _INF))
        if previous is None or change_penalty == 0:
            block(yi.reshape(1, -1), np.ones((1, m)), np.array([-_INF]),
                  np.array([float(e_total + n - 1)]))

    counts = np.concatenate([r[4] for r in rows])
    start = np.zeros(len(counts) + 1, dtype=np.int32)
    np.cumsum(counts, out=start[1:])
    index = np.concatenate([r[0].ravel() for r in rows]).astype(np.int32)
    value = np.concatenate([r[1].ravel() for r in rows]).astype(np.float64)
    # drop explicit zeros (w[e, r] = 0 for an expert with no tokens)
    if (value == 0).any():
        keep = value != 0
        row_of = np.repeat(np.arange(len(counts)), counts)
        start = np.zeros(len(counts) + 1, dtype=np.int32)
        np.cumsum(np.bincount(row_of[keep], minlength=len(counts)), out=start[1:])
        index, value = index[keep], value[keep]
    integer = np.zeros(2 * m + 1, dtype=bool)
    if not relax:
        integer[m:2 * m] = True
    col_lo = np.zeros(2 * m + 1)
    col_lo[zi] = z_floor
    return Arrays(cost=c, col_lo=col_lo,
                  col_hi=np.concatenate([np.ones(2 * m), [_INF]]), integer=integer,
                  row_lo=np.concatenate([r[2] for r in rows]),
                  row_hi=np.concatenate([r[3] for r in rows]), start=start, index=index,
                  value=value, offset=offset)


def highs_model(a: Arrays, *, time_limit_s: float, mip_gap: float, threads: int,
                options: dict | None = None) -> highspy.Highs:
    h = highspy.Highs()
    opts = {"output_flag": False, "threads": threads, "random_seed": 0,
            "time_limit": float(time_limit_s), "mip_rel_gap": float(mip_gap)}
    for k, v in (opts | (options or {})).items():
        h.setOptionValue(k, v)
    lp = highspy.HighsLp()
    lp.num_col_ = len(a.cost)
    lp.num_row_ = len(a.row_lo)
    lp.col_cost_ = a.cost
    lp.col_lower_ = a.col_lo
    lp.col_upper_ = a.col_hi
    lp.row_lower_ = a.row_lo
    lp.row_upper_ = a.row_hi
    lp.offset_ = a.offset
    lp.a_matrix_.format_ = highspy.MatrixFormat.kRowwise
    lp.a_matrix_.start_ = a.start
    lp.a_matrix_.index_ = a.index
    lp.a_matrix_.value_ = a.value
    if a.integer.any():
        lp.integrality_ = [highspy.HighsVarType.kInteger if i else
                           highspy.HighsVarType.kContinuous for i in a.integer]
    h.passModel(lp)
    return h


@dataclass(frozen=True, eq=False)
class HighsSolve:
    values: np.ndarray | None  # column values, None without a solution
    objective: float  # normalised
    dual_bound: float  # normalised
    status: str  # "optimal" | "time_limit" | "infeasible" | "no_solution"
    solve_s: float


def run_highs(a: Arrays, *, time_limit_s: float, mip_gap: float, threads: int,
              start: np.ndarray | None = None, options: dict | None = None) -> HighsSolve:
    t0 = time.perf_counter()
    h = highs_model(a, time_limit_s=time_limit_s, mip_gap=mip_gap, threads=threads,
                    options=options)
    if start is not None:
        h.setSolution(_solution(start))
    h.run()
    st = h.getModelStatus()
    info = h.getInfo()
    solve_s = time.perf_counter() - t0
    S = highspy.HighsModelStatus
    if st in (S.kInfeasible, S.kUnboundedOrInfeasible):
        return HighsSolve(None, float("nan"), float("nan"), "infeasible", solve_s)
    if info.primal_solution_status < 2:  # no feasible solution
        return HighsSolve(None, float("nan"), float("nan"), "no_solution", solve_s)
    values = np.asarray(h.getSolution().col_value)
    obj = float(info.objective_function_value)
    mip = bool(a.integer.any())
    dual = float(info.mip_dual_bound) if mip else obj
    if not np.isfinite(dual):
        dual = obj
    return HighsSolve(values, obj, dual, "optimal" if st == S.kOptimal else "time_limit", solve_s)


def _solution(values: np.ndarray) -> highspy.HighsSolution:
    sol = highspy.HighsSolution()
    sol.col_value = np.asarray(values, dtype=np.float64)
    sol.value_valid = True
    return sol


def start_values(cost: LayoutCost, share: np.ndarray, unit: float) -> np.ndarray:
    """Column values of a share matrix (x = share, y = share > 0, z = max rank time)."""
    hosted = share > 0
    z = float(cost.rank_time(share).max()) / unit
    return np.concatenate([share.ravel(), hosted.ravel().astype(float), [z]])
