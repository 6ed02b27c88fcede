"""Traffic of one (step, layer): who sends how many bytes to whom in each phase, and how many
tokens each rank runs through each expert. The simulator and the runtime both take these
numbers from here and compute none themselves.

Conventions (docs/interfaces.md):
- `counts[src, h, e]`: tokens (sub-tokens for Multi-Head LatentMoE) source rank `src` routes to
  expert e of head h; global expert `g = h * E + e`.
- A token-expert pair carries `model.expert_dim * dtype_bytes` bytes (d_model for a standard
  MoE, head_dim per sub-token for Multi-Head LatentMoE); activations and their gradients move in
  the model dtype.
- `phases[(pass, phase)][src, dst]` are bytes; the diagonal is data that stays on the rank.
  The backward entries are the autograd of the forward all-to-alls: ("bwd", "combine") moves
  output gradients from token owners to experts (the direction of the forward dispatch),
  ("bwd", "dispatch") moves input gradients back (the direction of the forward combine).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config import ModelConfig
from moesim.errors import InputError
from planner.placement import Placement


@dataclass(frozen=True, eq=False)
class LayerTraffic:
    """Per-phase byte matrices and token counts of one (step, layer) under one Placement."""

    placement: Placement
    tokens: np.ndarray  # int64[N, R]: tokens source rank sends to each replica
    expert_tokens: np.ndarray  # int64[N, E_total]: tokens each rank runs through each expert
    phases: dict[tuple[str, str], np.ndarray]  # (pass, phase) -> int64[N, N] bytes [src, dst]

    @property
    def strategy(self) -> str:
        return self.placement.strategy

    def _select(self, phase: tuple[str, str] | None) -> list[np.ndarray]:
        if phase is None:
            return list(self.phases.values())
        return [self.phases[phase]]

    def bytes_sent(self, phase: tuple[str, str] | None = None,
                   include_local: bool = False) -> np.ndarray:
        """int64[N]: bytes each rank sends (one phase, or all), the diagonal excluded unless
        `include_local`."""
        return sum((self._offdiag(m, include_local).sum(axis=1) for m in self._select(phase)),
                   np.zeros(self.placement.num_ranks, dtype=np.int64))

    def bytes_received(self, phase: tuple[str, str] | None = None,
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
    """int64[N, R]: split each source's tokens of expert g over g's replicas by share, in
    integers, by largest remainder (ties: replica order). Row and per-expert sums are exact."""
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


def layer_traffic(model: ModelConfig, placement: Placement, counts: np.ndarray, *,
                  gpus_per_node: int = 0, fsep_backward_gather: bool = True) -> LayerTraffic:
    """Traffic of one (step, layer). `counts` is int [N, H, E] (see module docstring).

    - tokens / expert_tokens: integer splits of `counts` over replicas (`split_tokens`).
    - EP: dispatch/combine per token-expert pair; `gpus_per_node > 0` gives node-deduplicated
      dispatch (and the mirrored combine). With replicated experts (the hot-replica baseline)
      also ("bwd", "grad_sync"): each replicated expert's gradient all-reduce.
    - HP: dispatch[src, dst] = T_src * heads_on(dst) * head_dim * dtype_bytes, fixed by the
      batch whatever the routing and top-k; combine is its transpose.
    - FSEP: the EP token phases to replicas, plus weight_gather (fwd, and again in bwd since
      weights are freed after use, FSDP-style, unless `fsep_backward_gather` is False: the
      forward's materialised weights are kept, as runtime/ does): rank q sends its shard of
      every expert rank r materialises; and ("bwd", "grad_scatter"), its transpose. Shards
      are an even split of `model.expert_params` (the first P mod N ranks hold one element
      more); gradients move in the model dtype.
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
    c2 = counts.reshape(n, e_total).astype(np.int64)
    tokens = split_tokens(c2, placement)
    expert_tokens = np.zeros((n, e_total), dtype=np.int64)
    np.add.at(expert_tokens, (placement.replica_rank, placement.replica_expert), tokens.sum(0))

    db = model.dtype_bytes
    width = model.expert_dim * db
    phases: dict[tuple[str, str], np.ndarray] = {}
    if placement.strategy == "hp":
        heads_on = np.zeros(n, dtype=np.int64)
        head_rank = np.unique(np.stack([placement.replica_expert // model.num_experts,
                                        placement.replica_rank]), axis=1)
        np.add.at(heads_on, head_rank[1], 1)
        dispatch = np.outer(t_src, heads_on) * (model.head_dim or model.d_model) * db
    elif placement.strategy == "ep" and gpus_per_node:
        dispatch = _dedup_dispatch(tokens, placement, t_src, gpus_per_node, width)
    else:
        onehot = np.zeros((placement.num_replicas, n), dtype=np.int64)
        onehot[np.arange(placement.num_replicas), placement.replica_rank] = 1
        dispatch = tokens @ onehot * width
    dispatch = dispatch.astype(np.int64)
    phases[("fwd", "dispatch")] = dispatch
    phases[("fwd", "combine")] = dispatch.T.copy()
    phases[("bwd", "combine")] = dispatch.copy()
    phases[("bwd", "dispatch")] = dispatch.T.copy()

    if placement.strategy == "fsep":
        p = model.expert_params
        shard = (p // n + (np.arange(n) < p % n)).astype(np.int64) * db  # bytes rank q holds
        gather = np.outer(shard, placement.replicas_per_rank())  # [q, r]
        phases[("fwd", "weight_gather")] = gather
        if fsep_backward_gather:
            phases[("bwd", "weight_gather")] = gather.copy()
        phases[("bwd", "grad_scatter")] = gather.T.copy()
    elif placement.strategy == "ep" and placement.num_replicas > e_total:
        phases[("bwd", "grad_sync")] = _ring_grad_sync(placement, model.expert_params * db)
    return LayerTraffic(placement, tokens, expert_tokens, phases)
