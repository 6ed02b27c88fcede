"""Fast FSEP re-layout heuristics. Each returns a share matrix float[E_total, N] (rank r runs
share[e, r] of expert e's tokens; a replica wherever share > 0) with at most `slots` replicas a
rank and at least one replica an expert. Both are deterministic (ties go to the lower id).

- `greedy_lpt`: FlexMoE/SmartMoE-style replication. Replica counts by the D'Hondt rule (the
  expert with the most time per replica gets the next replica while that is above the mean
  rank time), tokens split evenly over an expert's replicas, replicas placed Longest
  Processing Time first on the least-loaded rank with a free slot.
- `laer_fill`: our reading of LAER-MoE's load-balancing planner (arXiv 2602.11686, Sec. 4:
  expert layout and token routing are chosen together so that every device reaches the same
  load, replicating an expert only where its tokens do not fit). Experts in decreasing load
  go to the least-loaded rank with a free slot; an expert that would push that rank past the
  balanced target is split: the rank takes exactly what fits and the rest goes on to the next
  least-loaded rank (McNaughton's wrap-around rule, slot-aware). The token shares are then
  re-solved exactly for that layout (`rebalance_shares`, an LP). At most about N-1 experts
  are split.
"""

from __future__ import annotations

import heapq

import numpy as np

from planner.cost import LayoutCost


def _free_ranks(used: np.ndarray, slots: int, hosted_row: np.ndarray) -> np.ndarray:
    return (used < slots) & ~hosted_row


def greedy_lpt(cost: LayoutCost, slots: int) -> np.ndarray:
    """LPT with D'Hondt replica counts and even shares (see module docstring)."""
    w, g = cost.w, cost.g
    e_total, n = w.shape
    work = w.mean(axis=1)  # time of an expert's tokens, locality averaged
    target = (work.sum() + g * e_total) / n
    k = np.ones(e_total, dtype=np.int64)
    budget = n * slots - e_total
    heap = [(-work[e], e) for e in range(e_total)]
    heapq.heapify(heap)
    while budget > 0 and heap:
        neg, e = heap[0]
        if -neg <= target or k[e] >= n:
            if k[e] >= n:
                heapq.heappop(heap)
                continue
            break
        k[e] += 1
        budget -= 1
        heapq.heapreplace(heap, (-work[e] / k[e], e))
    # Replicas, longest first (ties: lower expert id).
    reps = sorted(((work[e] / k[e], e) for e in range(e_total) for _ in range(k[e])),
                  key=lambda t: (-t[0], t[1]))
    hosted = np.zeros((e_total, n), dtype=bool)
    used = np.zeros(n, dtype=np.int64)
    t = np.zeros(n)
    for piece, e in reps:
        free = _free_ranks(used, slots, hosted[e])
        if not free.any():  # only ranks already holding e have slots left: drop this copy
            continue
        r = int(np.argmin(np.where(free, t, np.inf)))
        hosted[e, r] = True
        used[r] += 1
        t[r] += piece + g
    share = hosted / hosted.sum(axis=1, keepdims=True)
    return share


def laer_fill(cost: LayoutCost, slots: int) -> np.ndarray:
    """Slot-aware fill-to-target with splitting (see module docstring)."""
    w, g = cost.w, cost.g
    e_total, n = w.shape
    work = w.mean(axis=1)
    # Balanced target: all work, every expert once, plus up to N-1 split replicas.
    target = (work.sum() + g * (e_total + n - 1)) / n
    order = np.lexsort((np.arange(e_total), -work))
    share = np.zeros((e_total, n))
    used = np.zeros(n, dtype=np.int64)
    t = np.zeros(n)
    # Keep a slot for every expert still to place, so the tail never runs out of room.
    for i, e in enumerate(order):
        later = e_total - i - 1
        rem = 1.0
        while rem > 1e-12:
            free = _free_ranks(used, slots, share[e] > 0)
            spare_slots = n * slots - used.sum() - 1 - later  # slots beyond one per expert
            if not free.any():
                # Every rank with a slot already holds e: add the rest to its cheapest holder.
                holders = np.flatnonzero(share[e] > 0)
                r = int(holders[np.argmin(t[holders])])
                share[e, r] += rem
                t[r] += rem * w[e, r]
                break
            r = int(np.argmin(np.where(free, t, np.inf)))
            room = target - t[r] - g
            need = rem * w[e, r]
            # Split only when a meaningful part fits here, there is a slot to spare for the
            # extra replica, and the remainder still has somewhere to go.
            if need <= room or room <= 0.02 * target or spare_slots <= 0 \
                    or free.sum() == 1:
                take = rem
            else:
                take = room / w[e, r]
            share[e, r] += take
            used[r] += 1
            t[r] += take * w[e, r] + g
            rem -= take
    # LAER-MoE routes tokens among the replicas of the chosen layout to balance devices:
    # given the layout, the best shares are an LP.
    return rebalance_shares(cost, share > 0)


def rebalance_shares(cost: LayoutCost, hosted: np.ndarray) -> np.ndarray:
    """The token shares that minimise the maximum rank time for a fixed layout `hosted`
    bool[E_total, N] (an LP over the hosted pairs, solved by HiGHS through scipy)."""
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix

    e_total, n = hosted.shape
    ex, rk = np.nonzero(hosted)
    m = len(ex)
    unit = cost.mean_time_floor() or 1.0
    wv = cost.w[ex, rk] / unit
    base = cost.g * hosted.sum(axis=0) / unit  # gather time, fixed by the layout
    # variables: x (m), z; minimise z
    c = np.zeros(m + 1)
    c[-1] = 1.0
    a_ub = coo_matrix((np.concatenate([wv, -np.ones(n)]),
                       (np.concatenate([rk, np.arange(n)]),
                        np.concatenate([np.arange(m), np.full(n, m)]))), shape=(n, m + 1))
    a_eq = coo_matrix((np.ones(m), (ex, np.arange(m))), shape=(e_total, m + 1))
    res = linprog(c, A_ub=a_ub.tocsr(), b_ub=-base, A_eq=a_eq.tocsr(), b_eq=np.ones(e_total),
                  bounds=[(0, 1)] * m + [(0, None)], method="highs")
    share = np.zeros((e_total, n))
    if res.status != 0:  # cannot happen for a layout with a replica per expert; keep even
        return hosted / hosted.sum(axis=1, keepdims=True)
    share[ex, rk] = np.clip(res.x[:m], 0, 1)
    return share
