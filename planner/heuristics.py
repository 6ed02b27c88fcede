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
- `lpt_wrap`: the MILP's warm start. `greedy_lpt`'s layout evens out the number of replicas a
  rank holds but leaves ranks unequal by up to a small expert; McNaughton's wrap-around rule
  then evens out the time: the ranks' replica lists, most loaded rank first, are laid end to
  end and cut into N stretches of length T, each cut adding one replica (g) to the next rank,
  for the least T (bisection) at which every piece fits with `slots` a rank. Laying the
  lists end to end, rather than the experts by size as McNaughton does, keeps each stretch's
  replica count close to its list's, so the slots hold (sorted by size, the small experts
  would all land together on the last ranks).
- `bin_completion`: the MILP's best warm start. For a target T, ranks are filled one at a
  time: while an expert's remaining work cannot fit on one rank (work + g > T) a piece of it
  fills a rank, alone or (second variant) beside an even share of the smallest experts, which
  need slots more than time (with many hot experts, pieces alone leave too few ranks for the
  rest); otherwise the rank takes the largest expert left, then the subset of
  the others that fills the most of what remains within its slots (a subset-sum DP, items
  rounded up to T/1000, preferring more and so smaller experts at equal fill, so that small
  experts do not pile up on the last ranks), then a piece of the largest expert left fills
  the rest when more than g remains. T is the least that places everything, searched upward
  from the replica bound (planner.bounds) and then bisected; the better variant is kept.
  Most ranks are filled exactly by whole experts, so few experts are split: on Zipf routing
  at 64 experts x 16 ranks this lands within 0.1% of the replica bound where `lpt_wrap` is
  ~1% above it (docs/planner.md).
"""

from __future__ import annotations

import heapq

import numpy as np

from planner.cost import LayoutCost


def _free_ranks(used: np.ndarray, slots: int, hosted_row: np.ndarray) -> np.ndarray:
    return (used < slots) & ~hosted_row


def greedy_lpt(cost: LayoutCost, slots: int) -> np.ndarray:
    """LPT with D'Hondt replica counts and even shares (see module docstring)."""
    hosted, _, _ = _lpt_layout(cost, slots)
    return hosted / hosted.sum(axis=1, keepdims=True)


def _lpt_layout(cost: LayoutCost, slots: int
                ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """greedy_lpt's layout: hosted bool[E, N], rank times float[N] with even shares, and each
    rank's experts in placement order."""
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
    lists: list[list[int]] = [[] for _ in range(n)]
    for piece, e in reps:
        free = _free_ranks(used, slots, hosted[e])
        if not free.any():  # only ranks already holding e have slots left: drop this copy
            continue
        r = int(np.argmin(np.where(free, t, np.inf)))
        hosted[e, r] = True
        used[r] += 1
        t[r] += piece + g
        lists[r].append(e)
    # Copies dropped above leave their expert's tokens to the copies placed.
    t = (hosted / hosted.sum(axis=1, keepdims=True) * w).sum(axis=0) + g * used
    return hosted, t, lists


def lpt_wrap(cost: LayoutCost, slots: int) -> np.ndarray:
    """greedy_lpt's replica lists wrapped around N ranks at the least feasible T (see module
    docstring); the token shares are then re-solved for the layout (`rebalance_shares`)."""
    w = cost.w.mean(axis=1)
    e_total, n = cost.w.shape
    hosted, t, lists = _lpt_layout(cost, slots)
    copies = hosted.sum(axis=1)
    items = [(e, w[e] / copies[e]) for r in np.argsort(-t, kind="stable") for e in lists[r]]
    lo = (w.sum() + cost.g * e_total) / n  # no layout does better (every expert once)
    hi = float(t.max()) * (1 + 1e-9)  # the LPT layout itself: one stretch per list
    best = _wrap(items, w, cost.g, n, slots, hi)
    if best is None:  # cannot happen (hi reproduces the lists); keep the LPT layout
        return hosted / copies[:, None]
    while hi - lo > 1e-6 * hi:
        mid = (lo + hi) / 2
        share = _wrap(items, w, cost.g, n, slots, mid)
        if share is None:
            lo = mid
        else:
            hi, best = mid, share
    return rebalance_shares(cost, best > 0)


def _wrap(items: list[tuple[int, float]], w: np.ndarray, g: float, n: int, slots: int,
          target: float) -> np.ndarray | None:
    """Lay `items` (expert, work) end to end over n ranks of length `target`, cutting an item
    where a rank is full; a piece of an expert the rank already holds merges with it (no new
    slot, no new g). The share matrix, or None when the items do not fit."""
    share = np.zeros((len(w), n))
    used = np.zeros(n, dtype=np.int64)
    r, t = 0, 0.0
    for e, amount in items:
        rem = amount
        while True:
            if r >= n:
                return None
            have = share[e, r] > 0
            room = target - t - (0.0 if have else g)
            fits_slot = have or used[r] < slots
            if fits_slot and rem <= room + 1e-12 * target:
                share[e, r] += rem / w[e] if w[e] > 0 else 1.0
                t += rem + (0.0 if have else g)
                used[r] += not have
                break
            if fits_slot and room > 1e-9 * target and r < n - 1:
                share[e, r] += room / w[e]
                used[r] += not have
                rem -= room
            r, t = r + 1, 0.0
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


_FILL_RES = 1000  # subset-sum resolution, steps per target T


def bin_completion(cost: LayoutCost, slots: int) -> np.ndarray | None:
    """Rank-by-rank completion at the least feasible target (see module docstring), the
    better of its two variants; None when neither places every expert within the slots at
    any target up to 1.5x the replica bound. The token shares are then re-solved for the
    layout (`rebalance_shares`)."""
    found = [s for s in (_least_target(cost, slots, spread) for spread in (False, True))
             if s is not None]
    if not found:
        return None
    best = min(found, key=lambda s: cost.rank_time(s).max())
    return rebalance_shares(cost, best > 0)


def _least_target(cost: LayoutCost, slots: int, spread: bool) -> np.ndarray | None:
    from planner.bounds import replica_bound

    w = cost.w.mean(axis=1)
    n = cost.num_ranks
    lo = replica_bound(cost, slots)  # no layout does better
    best, hi = None, lo
    for step in (1e-4, 5e-4, 2e-3, 1e-2, 5e-2, 0.2, 0.5):
        hi = lo * (1 + step)
        best = _complete(w, cost.g, n, slots, hi, spread)
        if best is not None:
            break
        lo = hi
    if best is None:
        return None
    while hi - lo > 2e-5 * hi:
        mid = (lo + hi) / 2
        share = _complete(w, cost.g, n, slots, mid, spread)
        if share is None:
            lo = mid
        else:
            hi, best = mid, share
    return best


def _complete(w: np.ndarray, g: float, n: int, slots: int, target: float, spread: bool
              ) -> np.ndarray | None:
    """One completion pass at `target` seconds a rank: the share matrix or None. `spread`
    puts the smallest experts beside the pieces of hot ones, an even count on every rank."""
    share = np.zeros((len(w), n))
    left = w.astype(np.float64).copy()  # work still to place, per expert
    todo = np.ones(len(w), dtype=bool)

    def put(e: int, r: int, amount: float) -> None:
        share[e, r] += amount / w[e] if w[e] > 0 else 1.0
        left[e] -= amount
        if left[e] <= 1e-12 * target:
            todo[e] = False

    for r in range(n):
        idx = np.flatnonzero(todo)
        if not len(idx):
            break
        order = idx[np.lexsort((idx, -left[idx]))]  # most work left first, then lower id
        e0 = int(order[0])
        if left[e0] + g > target:  # cannot fit whole on any rank: a piece fills this one
            small = order[left[order] + g <= target][::-1] if spread else order[:0]
            q = min(slots - 1, -(-len(small) // (n - r)))
            room = target - g - (left[small[:q]] + g).sum()
            if room <= 0:
                q, room = 0, target - g
            for e in small[:q]:
                put(int(e), r, left[e])
            put(e0, r, room)
            continue
        room = target - left[e0] - g
        put(e0, r, left[e0])
        rest = order[1:]
        if r == n - 1:  # the last rank takes all that is left, or the target is too low
            if len(rest) + 1 > slots or (left[rest] + g).sum() > room * (1 + 1e-12):
                return None
            for e in rest:
                put(int(e), r, left[e])
            break
        sizes = left[rest] + g
        used = 1
        for k in _fill(sizes, room, slots - 1):
            room -= sizes[k]
            used += 1
            put(int(rest[k]), r, left[rest[k]])
        rest = rest[todo[rest]]
        if room > g and used < slots and len(rest):  # a piece of the largest left fills it
            put(int(rest[0]), r, min(room - g, left[rest[0]]))
    return None if todo.any() else share


def _fill(sizes: np.ndarray, room: float, max_count: int) -> list[int]:
    """Indices of a subset of `sizes` with at most `max_count` items and the largest total
    within `room` (sizes rounded up to room/_FILL_RES; at equal totals, the most items)."""
    if room <= 0 or max_count <= 0 or not len(sizes):
        return []
    res = _FILL_RES
    u = np.ceil(sizes / (room / res) - 1e-9).astype(np.int64)
    reach = np.zeros((max_count + 1, res + 1), dtype=bool)  # [items used, units filled]
    reach[0, 0] = True
    history = []
    for s in u:
        history.append(reach)
        if s <= res:
            reach = reach.copy()
            reach[1:, s:] |= history[-1][:-1, :res + 1 - s]
    count, total = np.nonzero(reach)
    t = int(total.max())
    c = int(count[total == t].max())
    chosen = []
    for k in range(len(u) - 1, -1, -1):
        if not history[k][c, t]:  # not reachable without item k: it is in
            chosen.append(k)
            c, t = c - 1, t - int(u[k])
    return chosen[::-1]
