"""Traffic of one (step, layer): who sends how many bytes to whom in each phase, how many
tokens each rank brings, routes and runs through each expert, what it copies around its
all-to-alls, and which parameter bytes it holds. The simulator and the runtime both take these
numbers from here and compute none themselves (docs/interfaces.md; tests/runtime/
test_traffic_bytes.py checks that the runtime's all-to-alls move exactly these bytes).

Conventions (docs/interfaces.md):
- `counts[src, h, e]`: tokens (sub-tokens for Multi-Head LatentMoE) source rank `src` routes to
  expert e of head h; global expert `g = h * E + e`.
- A token-expert pair carries `model.expert_dim * dtype_bytes` bytes (d_model for a standard
  MoE, head_dim per sub-token for Multi-Head LatentMoE); activations and their gradients move in
  the model dtype.
- `phases[(pass, phase)][src, dst]` are bytes; the diagonal is data that stays on the rank.
  `rows[(pass, phase)]` are the same transfers in rows of `row_bytes[(pass, phase)]` bytes
  (token-expert pairs, HP sub-tokens, FSEP weight shards): phases == rows * row_bytes.
  The backward entries are the autograd of the forward all-to-alls: ("bwd", "combine") moves
  output gradients from token owners to experts (the direction of the forward dispatch),
  ("bwd", "dispatch") moves input gradients back (the direction of the forward combine).
- FSEP weights: every expert's parameters (w1 then w2, flattened) are cut into N flat shards
  of `shard_elements(model, N)` = ceil(P / N) elements, zero-padded at the end (FSDP's flat
  parameter, as LAER-MoE's FSEP does it: PKU-DAIR/Hetu-Galvatron, branch laer-moe,
  galvatron/core/runtime/moe/prefetch/fsdp_patch.py); rank j holds shard j of every expert.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moesim.config import ModelConfig
from moesim.errors import InputError
from planner.capacity import Capacity
from planner.placement import Placement

Key = tuple[str, str]


@dataclass(frozen=True, eq=False)
class LayerTraffic:
    """Every byte and token count of one (step, layer) under one Placement."""

    placement: Placement
    tokens: np.ndarray  # int64[N, R]: tokens source rank sends to each replica
    expert_tokens: np.ndarray  # int64[N, E_total]: tokens each rank runs through each expert
    phases: dict[Key, np.ndarray]  # (pass, phase) -> int64[N, N] bytes [src, dst]
    rows: dict[Key, np.ndarray] = field(default_factory=dict)  # the same in rows
    row_bytes: dict[Key, int] = field(default_factory=dict)  # bytes of one row of each phase
    source_tokens: np.ndarray | None = None  # int64[N]: tokens each rank brings to the layer
    routed: np.ndarray | None = None  # int64[N]: (sub-)tokens each rank routes
    # Bytes each rank copies on the compute stream around its all-to-alls, by what the copy
    # is: "head_pack" (HP: the latent's heads made destination-major before every all-to-all
    # and back after its mirror; none with one rank, where the buffer is a view).
    copies: dict[str, np.ndarray] = field(default_factory=dict)
    owned_param_bytes: np.ndarray | None = None  # int64[N]: parameters only this rank holds
    replicated_param_bytes: int = 0  # parameters every rank of the group holds whole
    # int64[N, E_total]: token-expert pairs each source drops over capacity (None: dropless)
    dropped: np.ndarray | None = None
    # int64[N, E_total]: padding rows each source sends (pad_to_capacity; None: no padding)
    padded: np.ndarray | None = None

    @property
    def strategy(self) -> str:
        return self.placement.strategy

    def _select(self, phase: Key | None) -> list[np.ndarray]:
        if phase is None:
            return list(self.phases.values())
        return [self.phases[phase]]

    def bytes_sent(self, phase: Key | None = None, include_local: bool = False) -> np.ndarray:
        """int64[N]: bytes each rank sends (one phase, or all), the diagonal excluded unless
        `include_local`."""
        return sum((self._offdiag(m, include_local).sum(axis=1) for m in self._select(phase)),
                   np.zeros(self.placement.num_ranks, dtype=np.int64))

    def bytes_received(self, phase: Key | None = None,
                       include_local: bool = False) -> np.ndarray:
        """int64[N]: bytes each rank receives (one phase, or all)."""
        return sum((self._offdiag(m, include_local).sum(axis=0) for m in self._select(phase)),
                   np.zeros(self.placement.num_ranks, dtype=np.int64))

    @staticmethod
    def _offdiag(m: np.ndarray, include_local: bool) -> np.ndarray:
        if include_local:
            return m
        m = m.copy()
        np.fill_diagonal(m, 0)
        return m

    def rank_tokens(self) -> np.ndarray:
        """int64[N]: token-expert pairs each rank computes (its GEMM rows)."""
        return self.expert_tokens.sum(axis=1)


def split_tokens(counts2d: np.ndarray, placement: Placement) -> np.ndarray:
    """int64[N, R]: each source's tokens of expert g split over g's replicas by the
    placement's routing. Row and per-expert sums are exact.

    - "shares": by `replica_share`, in integers by largest remainder (ties: replica order).
    - "node_local": LAER-MoE's smart routing (`_smart_routing_kernel` in galvatron/core/
      runtime/moe/fused_kernel.py, PKU-DAIR/Hetu-Galvatron branch laer-moe): a source's
      tokens of g go evenly, slot by slot, to g's replicas in its own node of `node_size`
      ranks; only when the node has none, evenly over all of g's replicas. Even in integers:
      every slot gets c // W, and the first c % W slots in rank order one more (W: the slots
      eligible).
    """
    if placement.routing == "node_local":
        return _node_local_split(np.asarray(counts2d, dtype=np.int64), placement)
    return _share_split(counts2d, placement)


def _node_local_split(c: np.ndarray, placement: Placement) -> np.ndarray:
    n = placement.num_ranks
    ex, rk, w = placement.replica_expert, placement.replica_rank, placement.replica_slots
    g = placement.node_size or n
    order = np.lexsort((rk, ex))  # replicas by expert, then rank: the kernel's slot order
    ex, rk, w = ex[order], rk[order], w[order]
    src_node = np.arange(n) // g
    local = (rk // g)[None, :] == src_node[:, None]  # [N, R]
    w_local = np.zeros((n, placement.num_experts), dtype=np.int64)
    np.add.at(w_local.T, ex, (local * w).T)
    eligible = np.where((w_local[:, ex] > 0), local, True)
    ew = eligible * w  # [N, R] slots eligible
    tot = np.zeros_like(w_local)
    np.add.at(tot.T, ex, ew.T)
    cnt = c[:, ex]
    den = np.maximum(tot[:, ex], 1)
    per, extra = cnt // den, cnt % den
    # Eligible slots before each replica within its expert (replicas are expert-sorted).
    cum = np.cumsum(ew, axis=1) - ew
    first = np.searchsorted(ex, ex)  # index of each expert's first replica
    before = cum - cum[:, first]
    out_sorted = ew * per + np.clip(extra - before, 0, w) * eligible
    out = np.empty_like(out_sorted)
    out[:, order] = out_sorted
    return out


def _share_split(counts2d: np.ndarray, placement: Placement) -> np.ndarray:
    ex, sh = placement.replica_expert, placement.replica_share
    want = counts2d[:, ex].astype(np.float64) * sh[None, :]
    base = np.floor(want + 1e-9).astype(np.int64)
    frac = want - base
    given = np.zeros_like(counts2d, dtype=np.int64)
    np.add.at(given.T, ex, base.T)
    left = counts2d.astype(np.int64) - given  # [N, E_total], in [0, replicas of g)
    # Rank replicas within each expert by descending remainder, then replica order; the first
    # `left` of each (src, expert) group get one more token.
    r = len(ex)
    idx = np.broadcast_to(np.arange(r), frac.shape)
    order = np.lexsort((idx, -frac, np.broadcast_to(ex, frac.shape)), axis=-1)
    first = np.searchsorted(ex[np.argsort(ex, kind="stable")], np.arange(placement.num_experts))
    sorted_ex = np.take_along_axis(np.broadcast_to(ex, frac.shape), order, axis=-1)
    pos = np.arange(r)[None, :] - first[sorted_ex]
    need = np.take_along_axis(left, sorted_ex, axis=-1)
    bump = np.zeros_like(base)
    np.put_along_axis(bump, order, (pos < need).astype(np.int64), axis=-1)
    return base + bump


def _tokens_per_source(model: ModelConfig, counts: np.ndarray) -> np.ndarray:
    sums = counts.sum(axis=2, dtype=np.int64)  # [N, H]
    per = sums // model.top_k
    if (per * model.top_k != sums).any() or (per != per[:, :1]).any():
        src, h = np.argwhere((per * model.top_k != sums) | (per != per[:, :1]))[0]
        raise InputError("counts", "top_k",
                         f"source {src} head {h} routes {sums[src, h]} token-expert pairs: not "
                         f"the same multiple of top_k = {model.top_k} for every head (trace and "
                         "config disagree?)")
    return per[:, 0]


def _dedup_dispatch(tokens: np.ndarray, placement: Placement, t_src: np.ndarray,
                    gpus_per_node: int, width: int) -> np.ndarray:
    """DeepEP-style dispatch bytes: a token crosses to another node once (to the rank with the
    sender's local index, over RDMA), which forwards it once to each GPU of that node that
    needs it (NVLink); within the sender's node it goes once to each GPU that needs it.

    A trace holds per-expert counts, not token identities, so the number of distinct tokens a
    source sends to a GPU (node) is its expectation when a token's visits to different
    replicas are independent: T * (1 - prod_i (1 - t_i / T)) over the replicas on that GPU
    (node), rounded. It lies between the largest t_i and min(T, sum t_i), the two exact bounds.
    """
    n = placement.num_ranks
    g = gpus_per_node
    nodes = n // g
    p = np.clip(tokens / np.maximum(t_src, 1)[:, None], 0.0, 1.0)
    log_miss = np.log1p(-np.minimum(p, 1 - 1e-15))  # [N, R]

    def distinct(group: np.ndarray, size: int) -> np.ndarray:
        """Expected distinct tokens from each source to each group of replicas."""
        onehot = np.zeros((len(group), size))
        onehot[np.arange(len(group)), group] = 1
        exp = t_src[:, None] * -np.expm1(log_miss @ onehot)
        lo = np.zeros((tokens.shape[0], size), dtype=np.int64)
        np.maximum.at(lo.T, group, tokens.T)
        hi = np.minimum(t_src[:, None], tokens @ onehot.astype(np.int64))
        return np.clip(np.rint(exp), lo, hi).astype(np.int64)

    to_rank = distinct(placement.replica_rank, n)  # [N, N]
    to_node = distinct(placement.replica_rank // g, nodes)  # [N, nodes]
    out = np.zeros((n, n), dtype=np.int64)
    for src in range(n):
        home, local = divmod(src, g)
        for b in range(nodes):
            dsts = slice(b * g, (b + 1) * g)
            if b == home:
                out[src, dsts] += to_rank[src, dsts]
            else:
                relay = b * g + local
                out[src, relay] += to_node[src, b]
                out[relay, dsts] += to_rank[src, dsts]
    return out * width


def _ring_grad_sync(placement: Placement, param_bytes: int) -> np.ndarray:
    """Ring all-reduce of each replicated expert's gradients among its replica ranks: every
    member sends 2(k-1)/k of the gradient to its successor."""
    n = placement.num_ranks
    out = np.zeros((n, n), dtype=np.int64)
    ex, rk = placement.replica_expert, placement.replica_rank
    for g in np.unique(ex):
        ranks = np.sort(rk[ex == g])
        k = len(ranks)
        if k < 2:
            continue
        per = round(2 * (k - 1) / k * param_bytes)
        np.add.at(out, (ranks, np.roll(ranks, -1)), per)
    return out


def shard_elements(model: ModelConfig, num_ranks: int) -> int:
    """Elements of one FSEP weight shard: ceil(P / N) of an expert's P parameters (the last
    shard zero-padded; LAER-MoE asserts P % N == 0, which makes the padding empty)."""
    return -(-model.expert_params // num_ranks)


def weight_gather_rows(placement: Placement) -> np.ndarray:
    """int64[N, N]: FSEP weight-shard rows [q, r]: rank q sends its shard of every replica
    rank r materialises, one row per slot the replica fills (LAER-MoE sends a shard for
    every slot, duplicates included: `_all_to_all_flat_param_type1` in fsdp_patch.py). The
    reverse all-to-all of the weight gradients (grad_scatter) is its transpose."""
    n = placement.num_ranks
    return np.broadcast_to(placement.slots_per_rank(), (n, n)).astype(np.int64)


def heads_on(model: ModelConfig, placement: Placement) -> np.ndarray:
    """int64[N]: heads whose experts rank r holds (HP)."""
    pairs = np.unique(np.stack([placement.replica_expert // model.num_experts,
                                placement.replica_rank]), axis=1)
    return np.bincount(pairs[1], minlength=placement.num_ranks).astype(np.int64)


def head_rows(model: ModelConfig, placement: Placement,
              source_tokens: np.ndarray) -> np.ndarray:
    """int64[N, N]: HP dispatch rows [src, dst] = T_src * heads_on(dst): every token's
    sub-token of each head goes to the head's rank, whatever the routing and top-k (a row
    is one sub-token, head_dim elements). The combine is its transpose."""
    return np.outer(np.asarray(source_tokens, dtype=np.int64), heads_on(model, placement))


def param_bytes(model: ModelConfig, placement: Placement) -> tuple[np.ndarray, int]:
    """(owned int64[N], replicated): the layer's parameter bytes only rank r of the group
    holds, and those every rank of the group holds whole, as runtime/ lays them out.
    Owned: EP a replica's full expert per slot; HP its heads' experts and routers; FSEP one
    shard of every expert. Replicated: the router (EP, FSEP: [H, dim, E]) and the latent
    projections of Multi-Head LatentMoE (d_model x latent, both ways)."""
    m, n, db = model, placement.num_ranks, model.dtype_bytes
    latent = 2 * m.d_model * m.latent_dim * db if m.num_heads > 1 else 0
    router = m.total_experts * m.expert_dim * db
    if placement.strategy == "fsep":
        owned = np.full(n, m.total_experts * shard_elements(m, n) * db, dtype=np.int64)
        return owned, router + latent
    owned = placement.slots_per_rank() * m.expert_params * db
    if placement.strategy == "hp":
        return owned + heads_on(m, placement) * m.expert_dim * m.num_experts * db, latent
    return owned.astype(np.int64), router + latent


def _set(lt: dict, rows: dict, width: dict, key: Key, r: np.ndarray, w: int) -> None:
    rows[key] = np.ascontiguousarray(r, dtype=np.int64)
    width[key] = int(w)
    lt[key] = rows[key] * int(w)


def layer_traffic(model: ModelConfig, placement: Placement, counts: np.ndarray, *,
                  gpus_per_node: int = 0, fsep_backward_gather: bool = True,
                  capacity: Capacity | None = None) -> LayerTraffic:
    """Traffic of one (step, layer). `counts` is int [N, H, E] (see module docstring).

    - tokens / expert_tokens: integer splits of `counts` over replicas (`split_tokens`).
    - source_tokens: tokens a rank brings (its pairs of any head / top_k); routed: the
      (sub-)tokens it routes (EP, FSEP: its own tokens x heads; HP: every token's
      sub-tokens of its heads, after the dispatch).
    - EP: dispatch/combine per token-expert pair; `gpus_per_node > 0` gives node-deduplicated
      dispatch (and the mirrored combine). With replicated experts (the hot-replica baseline)
      also ("bwd", "grad_sync"): each replicated expert's gradient all-reduce.
    - HP: dispatch[src, dst] = T_src * heads_on(dst) * head_dim * dtype_bytes (`head_rows`),
      fixed by the batch whatever the routing and top-k; combine is its transpose. Packing
      the heads destination-major costs T x latent bytes a rank, a copy on the compute stream
      around each of its four all-to-alls (`copies["head_pack"]`; none with one rank).
    - FSEP: the EP token phases to replicas, plus weight_gather (fwd, and again in bwd since
      weights are freed after use, FSDP-style, unless `fsep_backward_gather` is False: the
      forward's materialised weights are kept): rank q sends its shard of every slot rank r
      fills (`weight_gather_rows`, shards of `shard_elements`); and ("bwd", "grad_scatter"),
      its transpose. Gradients move in the model dtype.
    - owned_param_bytes / replicated_param_bytes: `param_bytes`.
    - `capacity`: experts take at most their capacity from each source (planner.capacity):
      tokens, expert_tokens and every token phase count the rows really sent (kept, plus
      padding with `capacity.pad`); `dropped` and `padded` say how many. HP's dispatch is fixed
      by the batch whatever is dropped after it; only its expert rows change.
    """
    n, e_total = placement.num_ranks, placement.num_experts
    counts = np.asarray(counts)
    want = (n, model.num_heads, model.num_experts)
    if counts.shape != want:
        raise InputError("counts", "shape", f"expected [N, H, E] = {list(want)} from the "
                         f"placement and model, got {list(counts.shape)}")
    if e_total != model.total_experts:
        raise InputError("placement", "num_experts", f"{e_total} experts, but the model has "
                         f"{model.total_experts}")
    if not np.issubdtype(counts.dtype, np.integer) or (counts < 0).any():
        raise InputError("counts", "tokens", "counts must be non-negative integers")
    if gpus_per_node < 0 or (gpus_per_node and n % gpus_per_node):
        raise InputError("cluster", "gpus_per_node",
                         f"{gpus_per_node} does not divide the {n} ranks")
    t_src = _tokens_per_source(model, counts)
    dropped = padded = None
    if capacity is not None:
        kept = capacity.rows(counts, t_src, model.top_k)
        dropped = np.maximum(counts - kept, 0).reshape(n, e_total)
        padded = np.maximum(kept - counts, 0).reshape(n, e_total) if capacity.pad else None
        counts = kept
    c2 = counts.reshape(n, e_total).astype(np.int64)
    tokens = split_tokens(c2, placement)
    expert_tokens = np.zeros((n, e_total), dtype=np.int64)
    np.add.at(expert_tokens, (placement.replica_rank, placement.replica_expert), tokens.sum(0))

    db = model.dtype_bytes
    width = model.expert_dim * db
    phases: dict[Key, np.ndarray] = {}
    rows: dict[Key, np.ndarray] = {}
    row_bytes: dict[Key, int] = {}
    copies: dict[str, np.ndarray] = {}
    if placement.strategy == "hp":
        dispatch = head_rows(model, placement, t_src)
        routed = int(t_src.sum()) * heads_on(model, placement)
        if n > 1:
            copies["head_pack"] = t_src * model.latent_dim * db
    else:
        if placement.strategy == "ep" and gpus_per_node:
            dispatch = _dedup_dispatch(tokens, placement, t_src, gpus_per_node, 1)
        else:
            onehot = np.zeros((placement.num_replicas, n), dtype=np.int64)
            onehot[np.arange(placement.num_replicas), placement.replica_rank] = 1
            dispatch = tokens @ onehot
        routed = t_src * model.num_heads
    _set(phases, rows, row_bytes, ("fwd", "dispatch"), dispatch, width)
    _set(phases, rows, row_bytes, ("fwd", "combine"), dispatch.T, width)
    _set(phases, rows, row_bytes, ("bwd", "combine"), dispatch, width)
    _set(phases, rows, row_bytes, ("bwd", "dispatch"), dispatch.T, width)

    if placement.strategy == "fsep":
        gather = weight_gather_rows(placement)
        shard = shard_elements(model, n) * db
        _set(phases, rows, row_bytes, ("fwd", "weight_gather"), gather, shard)
        if fsep_backward_gather:
            _set(phases, rows, row_bytes, ("bwd", "weight_gather"), gather, shard)
        _set(phases, rows, row_bytes, ("bwd", "grad_scatter"), gather.T, shard)
    elif placement.strategy == "ep" and placement.num_replicas > e_total:
        phases[("bwd", "grad_sync")] = _ring_grad_sync(placement, model.expert_params * db)
    owned, replicated = param_bytes(model, placement)
    return LayerTraffic(placement, tokens, expert_tokens, phases, rows, row_bytes,
                        source_tokens=t_src.astype(np.int64), routed=routed.astype(np.int64),
                        copies=copies, owned_param_bytes=owned.astype(np.int64),
                        replicated_param_bytes=int(replicated), dropped=dropped,
                        padded=padded)
