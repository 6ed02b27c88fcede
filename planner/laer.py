"""The FSEP planners of LAER-MoE's code and artifact, read from PKU-DAIR/Hetu-Galvatron (branch
laer-moe) and Fizzmy/LAER-MoE-AE; re-implemented here (vectorised), no code copied. Each
returns a slot matrix A int[E, N]: slots of expert e on rank r, every one of the N x C slots
of the FSEP buffer filled, duplicates on one rank allowed. Token routing over the slots is
node-local (planner.traffic, `routing = "node_local"`).

- `static_layout`: the fixed round-robin layout LAER-MoE starts from and the artifact's
  `FSDP` arm runs throughout (`MoEOptimizer.default_placement`, galvatron/core/runtime/moe/
  prefetch/solver.py): rank j's slot i holds expert i * (E / C) + j mod (E / C).
- `laer_greedy`: LAER-MoE's planner (`greedy_load_balancing_heuristic_complete`, csrc/
  greedy_balancer.cpp, called from solver.py with no perturbations). Replica-count
  candidates: "even" (N C / E each, when that is whole) and "pq" (`allocate_expert_
  replicas_precise`: a max-heap on load per replica; every expert starts with one replica per
  node when the slots allow it, else one; the top expert gets one more while it has fewer
  than one per node, else one per node more, "whole-node steps", while they fit, and is
  fixed at its count once a whole-node step no longer fits). Each candidate is placed by
  `greedy_placement` (replicas in decreasing load per replica onto the least-loaded rank
  with a free slot among the nodes holding the fewest copies of that expert) and costed
  by `laer_cost` (4 sum(comm) + (3 + recompute) max(comp) under smart routing); the
  cheaper is kept.
- `flexmoe`: FlexMoE's scheduler as LAER-MoE's artifact runs it (`MoEOptimizer.flexmoe_
  method`, solver.py): from the previous layout, up to 10 rounds of `_make_scheduling_plan`
  (in every node, one slot of the expert with the lowest load per replica goes to the one
  with the highest), each kept while it lowers the max rank load or the max/min balance
  ratio under node-local routing.

Deviations, all stated: ties between equal loads go to the lower expert / rank id
(std::sort and std::priority_queue leave them unspecified); a node size comes from the
cluster (the code hard-codes 8); LAER's cost model routes in floating point and adds the
remainder on top (it counts up to W - 1 tokens too many per source and expert, kept as is);
FlexMoE's step skips a node where the expert to shrink has no slot (the code would fail)
and makes no step that would leave an expert without a slot (the code would drop its
tokens).
"""

from __future__ import annotations

import heapq

import numpy as np

from moesim.errors import InputError


def _nodes(n: int, node_size: int) -> tuple[int, int]:
    g = node_size if node_size and n % node_size == 0 and node_size <= n else n
    return n // g, g


def static_layout(num_experts: int, num_ranks: int, slots: int) -> np.ndarray:
    """The round-robin layout (LAER-MoE's default placement). With C not dividing E (which
    the artifact never runs) slot i of rank j holds expert (j C + i) mod E."""
    e, n, c = num_experts, num_ranks, slots
    if n * c < e:
        raise InputError("planner", "slots_per_rank", f"{n} ranks x {c} slots cannot hold "
                         f"all {e} experts")
    a = np.zeros((e, n), dtype=np.int64)
    j = np.repeat(np.arange(n), c)
    i = np.tile(np.arange(c), n)
    if e % c == 0 and n >= e // c:
        ep = e // c
        np.add.at(a, (i * ep + j % ep, j), 1)
    else:
        np.add.at(a, ((j * c + i) % e, j), 1)
    return a


def replica_counts_even(num_experts: int, num_ranks: int, slots: int) -> np.ndarray | None:
    """N C / E replicas of every expert, or None when that is not whole."""
    total = num_ranks * slots
    if total % num_experts:
        return None
    return np.full(num_experts, total // num_experts, dtype=np.int64)


def replica_counts_pq(load: np.ndarray, num_ranks: int, slots: int,
                      node_size: int) -> np.ndarray:
    """`allocate_expert_replicas_precise`: replica counts by a max-heap on load per replica,
    in whole-node steps once an expert has one replica per node."""
    load = np.asarray(load, dtype=np.float64)
    e = len(load)
    nodes, _ = _nodes(num_ranks, node_size)
    total = num_ranks * slots
    start = nodes if nodes * e <= total else 1
    reps = np.full(e, start, dtype=np.int64)
    used = start * e
    heap = [(-load[i] / start, i) for i in range(e)]
    heapq.heapify(heap)
    while used < total and heap:
        _, i = heapq.heappop(heap)
        step = nodes if reps[i] >= nodes else 1
        if reps[i] >= nodes and used + nodes > total:
            continue  # fixed at its count
        reps[i] += step
        used += step
        heapq.heappush(heap, (-load[i] / reps[i], i))
    return reps


def greedy_placement(reps: np.ndarray, load: np.ndarray, num_ranks: int, slots: int,
                     node_size: int) -> np.ndarray:
    """`get_greedy_placement`: replicas (load / count each) in decreasing load; each goes to
    the least-loaded rank with a free slot among the nodes holding the fewest copies of its
    expert (all nodes counted, full ones too); to the least-loaded free rank anywhere when
    those nodes are full. Ties: lower expert, then lower rank.

    An expert's copies have equal loads and so are placed one after another: in a round the
    nodes at the fewest copies each take one on their least-loaded free rank, in the order of
    that rank's (load, id), which is what placing them one at a time does."""
    n, c = num_ranks, slots
    nodes, g = _nodes(n, node_size)
    reps = np.asarray(reps, dtype=np.int64)
    load = np.asarray(load, dtype=np.float64)
    e = len(reps)
    if reps.sum() > n * c:
        raise InputError("planner", "slots_per_rank", "more replicas than slots")
    piece = np.where(reps > 0, load / np.maximum(reps, 1), 0.0)
    a = np.zeros((e, n), dtype=np.int64)
    dev_load = np.zeros(n)
    used = np.zeros(n, dtype=np.int64)
    for ex in np.lexsort((np.arange(e), -piece)):
        left = int(reps[ex])
        count = np.zeros(nodes, dtype=np.int64)  # copies of ex per node
        while left > 0:
            free = used < c
            if not free.any():
                raise InputError("planner", "slots_per_rank", "no more capacity")
            lo = count.min()
            key = np.where(free, dev_load, np.inf).reshape(nodes, g)
            best = key.argmin(axis=1)  # least-loaded free rank of each node (lower id)
            best_load = key[np.arange(nodes), best]
            cand = np.flatnonzero((count == lo) & np.isfinite(best_load))
            if len(cand):
                cand = cand[np.lexsort((cand * g + best[cand], best_load[cand]))]
                take = cand[:left]
                devs = take * g + best[take]
                count[take] += 1
            else:  # every node at the fewest copies is full: the least-loaded free rank
                d = int(np.argmin(np.where(free, dev_load, np.inf)))
                devs = np.array([d])
                count[d // g] += 1
            a[ex, devs] += 1
            dev_load[devs] += piece[ex]
            used[devs] += 1
            left -= len(devs)
    return a


def _extras_to(extra: np.ndarray, before: np.ndarray, width: np.ndarray) -> np.ndarray:
    """sum over sources s of clip(extra[s] - before[d], 0, width[d]), per d: each source's
    remainder handed out slot by slot in rank order (sorted prefix sums, O((S + D) log S))."""
    x = np.sort(np.asarray(extra, dtype=np.float64))
    suffix = np.concatenate([np.cumsum(x[::-1])[::-1], [0.0]])

    def above(t: np.ndarray) -> np.ndarray:  # sum max(0, x - t)
        k = np.searchsorted(x, t, side="right")
        return suffix[k] - t * (len(x) - k)

    return above(before) - above(before + width)


def laer_cost(counts: np.ndarray, a: np.ndarray, token_bytes: float, comp_s: float,
              intra_bps: float, inter_bps: float, node_size: int,
              recompute: bool = True) -> float:
    """`generate_smart_routing_and_calculate_time`: route `counts` [N, E] over the slots `a`
    [E, N] node-locally, in floating point as the code does (c / W a slot, plus the remainder
    c mod W handed out again, one a slot in rank order); comm[s] = token_bytes x tokens s
    sends / the link's rate (NVLink inside its node, the fabric across, 1e18 B/s to itself);
    comp[d] = comp_s x tokens d runs. Returns 4 sum_s comm[s] + (3 + recompute) max_d comp[d]
    (forward, backward twice, and the recomputed forward with activation checkpointing)."""
    c = np.asarray(counts, dtype=np.float64)
    n, e = c.shape
    nodes, g = _nodes(n, node_size)
    a = np.asarray(a, dtype=np.float64)
    a3 = a.reshape(e, nodes, g)
    w_node = a3.sum(axis=2)  # [E, nodes]
    w_all = a.sum(axis=1)  # [E]
    pre_in = (np.cumsum(a3, axis=2) - a3)  # slots before d in its node [E, nodes, G]
    pre_all = np.cumsum(a, axis=1) - a  # slots before d over all ranks [E, N]
    src_node = np.arange(n) // g
    w_in = w_node[:, src_node].T  # [N, E]
    intra = w_in > 0
    w_src = np.where(intra, w_in, w_all[None, :])
    extra = np.fmod(c, w_src)
    tpw = c / w_src
    # Self tokens (intra only): the source's own slots of e.
    own = a.T  # [N, E]: slots of e on rank s
    own_pre = pre_in.reshape(e, n).T
    self_tok = np.where(intra, tpw * own + np.clip(extra - own_pre, 0, own), 0.0)
    sent = c + extra  # all the code assigns, remainder counted twice
    comm = token_bytes * np.where(intra, (sent - self_tok) / intra_bps + self_tok / 1e18,
                                  sent / inter_bps).sum(axis=1)
    # Tokens each rank runs.
    comp = np.zeros(n)
    c_node = c.reshape(nodes, g, e).sum(axis=1).T  # [E, nodes]
    intra_en = w_node > 0
    share_in = np.where(intra_en, c_node / np.maximum(w_node, 1), 0.0)  # [E, nodes]
    comp += (share_in[:, :, None] * a3).sum(axis=0).reshape(n)
    ext3 = np.where(intra, extra, 0.0).reshape(nodes, g, e)  # [nodes, G(src), E]
    ext_in = np.clip(ext3.transpose(2, 0, 1)[:, :, :, None] - pre_in[:, :, None, :], 0,
                     a3[:, :, None, :]).sum(axis=2)  # [E, nodes, G(dev)]
    comp += ext_in.sum(axis=0).reshape(n)
    inter = ~intra
    if inter.any():
        c_out = np.where(inter, c, 0.0).sum(axis=0)  # [E]
        comp += ((c_out / np.maximum(w_all, 1))[:, None] * a).sum(axis=0)
        for ex in np.flatnonzero(inter.any(axis=0)):
            comp += _extras_to(extra[inter[:, ex], ex], pre_all[ex], a[ex])
    comp *= comp_s
    return float(4 * comm.sum() + (3 + int(recompute)) * comp.max())


def laer_greedy(counts: np.ndarray, slots: int, *, token_bytes: float, comp_s: float,
                intra_bps: float, inter_bps: float, node_size: int,
                recompute: bool = True) -> np.ndarray:
    """LAER-MoE's planner: the cheaper (`laer_cost`) of the even and the pq replica counts,
    each placed by `greedy_placement`. `counts` [N, E]: the layer's tokens per source and
    expert, summed over the last passes."""
    c = np.asarray(counts, dtype=np.float64)
    n, e = c.shape
    load = c.sum(axis=0)
    cands = [r for r in (replica_counts_even(e, n, slots),
                         replica_counts_pq(load, n, slots, node_size)) if r is not None]
    best, best_t = None, np.inf
    for reps in cands:
        a = greedy_placement(reps, load, n, slots, node_size)
        t = laer_cost(c, a, token_bytes, comp_s, intra_bps, inter_bps, node_size, recompute)
        if t < best_t:
            best, best_t = a, t
    return best


def _node_local_tokens(counts: np.ndarray, a: np.ndarray, node_size: int) -> np.ndarray:
    """float[N]: tokens each rank runs under node-local routing in integers (planner.traffic's
    split, which FlexMoE's `_generate_smart_routing` in solver.py computes the same way)."""
    from planner.placement import slot_placement
    from planner.traffic import split_tokens
    p = slot_placement(a, node_size)
    tok = split_tokens(np.asarray(counts, dtype=np.int64), p).sum(axis=0)
    return np.bincount(p.replica_rank, weights=tok, minlength=a.shape[1])


def flexmoe(counts: np.ndarray, slots: int, previous: np.ndarray, node_size: int,
            max_iteration: int = 10) -> np.ndarray:
    """FlexMoE's scheduler as LAER-MoE's artifact runs it, from the `previous` slot layout
    [E, N] (module docstring)."""
    c = np.rint(np.asarray(counts)).astype(np.int64)
    n = c.shape[0]
    nodes, g = _nodes(n, node_size)
    load = c.sum(axis=0)

    def measure(a: np.ndarray) -> tuple[float, float, np.ndarray]:
        dev = _node_local_tokens(c, a, node_size)
        lo = dev.min()
        return (float(dev.max() / lo) if lo > 0 else np.inf), float(dev.max()), dev

    a = np.asarray(previous, dtype=np.int64).copy()
    ratio, cost, dev = measure(a)
    for _ in range(max_iteration):
        if not ratio > 1:
            break
        new = _scheduling_step(a, load, dev, slots, nodes, g)
        r2, c2, d2 = measure(new)
        if c2 < cost or r2 < ratio:
            a, ratio, cost, dev = new, r2, c2, d2
        else:
            break
    return a


def _scheduling_step(a: np.ndarray, load: np.ndarray, dev_load: np.ndarray, slots: int,
                     nodes: int, g: int) -> np.ndarray:
    """`_make_scheduling_plan`: in every node, one slot moves from the expert with the
    lowest load per replica (skipping experts with exactly one replica a node, as the code
    does) to the one with the highest, on the least-loaded rank holding the former; when the
    latter's ranks in the node have room, the swap goes through a third expert of that rank
    (the hottest one) so that both ranks keep their C slots."""
    e = a.shape[0]
    reps = a.sum(axis=1)
    per = load // np.maximum(reps, 1)
    order = sorted(range(e), key=lambda x: -per[x])  # stable: ties by lower id
    hi = order[0]
    idx = e - 1
    while idx > 0 and reps[order[idx]] == nodes:
        idx -= 1
    low = order[idx]
    if hi == low:
        return a
    new = a.copy()
    for k in range(nodes):
        devs = np.arange(k * g, (k + 1) * g)
        hi_devs = devs[new[hi, devs] > 0]
        lo_devs = devs[new[low, devs] > 0]
        if not len(lo_devs):
            continue
        lo_dev = int(lo_devs[np.argmin(dev_load[lo_devs])])
        room = hi_devs[new[hi, hi_devs] < slots]
        hi_dev = int(room[0]) if len(room) else -1
        if hi_dev in (-1, lo_dev):
            new[hi, lo_dev] += 1
            new[low, lo_dev] -= 1
            continue
        others = [x for x in range(e) if x != hi and new[x, hi_dev] > 0]
        if not others:
            continue
        mv = max(others, key=lambda x: per[x])
        new[hi, hi_dev] += 1
        new[low, lo_dev] -= 1
        new[mv, hi_dev] -= 1
        new[mv, lo_dev] += 1
    if (new.sum(axis=1) == 0).any() or (new < 0).any():
        return a  # a move that would drop an expert altogether is not made
    return new
