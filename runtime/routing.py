"""Routing: which k experts each (sub-)token visits and with what weight.

Learned routing is top-k over the router's scores (softmax or sigmoid), the chosen scores
renormalised to sum to 1 (Mixtral/DeepSeek style). Forced routing keeps the router's weighting
but takes the *choice* of experts from given per-expert counts (a synthetic trace), so a
benchmark controls the load exactly while gradients still reach the router.

An "item" is what is routed: a token for a standard MoE, a (token, head) sub-token for
Multi-Head LatentMoE. Items are numbered token-major, item = token * H + head.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.balancing import Balancer
from runtime.upload import upload


def router_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Scores over the experts, [..., E], in fp32 so that top-k is the same on every rank."""
    logits = logits.float()
    return torch.softmax(logits, dim=-1) if kind == "softmax" else torch.sigmoid(logits)


def top_k(probs: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(experts [..., k] int64, gates [..., k]) with the gates renormalised to sum to 1."""
    vals, idx = torch.topk(probs, k, dim=-1, sorted=True)
    return idx, vals / vals.sum(dim=-1, keepdim=True)


def forced_choice(counts: np.ndarray, n: int, k: int) -> np.ndarray:
    """Experts [n, k] for n items such that expert e is chosen by exactly counts[e] items and no
    item picks an expert twice. Requires counts.sum() == n * k and counts <= n (what the trace
    schema guarantees). Lay the multiset of expert ids out in expert order and deal it
    column-major: slot i goes to item i % n, column i // n; an expert's run of <= n consecutive
    slots lands on distinct items."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != n * k or (counts > n).any() or (counts < 0).any():
        raise ValueError(f"forced routing counts do not fit {n} items x top-{k}: "
                         f"sum {counts.sum()}, max {counts.max()}")
    flat = np.repeat(np.arange(len(counts)), counts)
    return np.ascontiguousarray(flat.reshape(k, n).T)


def forced_choice_blocks(counts: np.ndarray, n: int, k: int,
                         device: torch.device) -> torch.Tensor:
    """`forced_choice` for every (block, head) at once: counts [B, H, E] (block b is items
    b*n .. (b+1)*n, one block per source rank) -> experts [B * n, H, k] (ids within the
    head). One upload and one expansion whatever B and H: the per-head, per-block calls cost
    ~10 host-bound launches each, which left the GPU waiting in HP's router."""
    counts = np.asarray(counts, dtype=np.int64)
    b, h, e = counts.shape
    sums = counts.sum(axis=-1)
    if (sums != n * k).any() or (counts > n).any() or (counts < 0).any():
        raise ValueError(f"forced routing counts do not fit {n} items x top-{k}: "
                         f"sums {sorted(set(sums.reshape(-1).tolist()))}, max {counts.max()}")
    ids, c = upload(np.tile(np.arange(e), b * h), counts.reshape(-1), device=device)
    flat = torch.repeat_interleave(ids, c, output_size=b * h * n * k)
    # [B, H, k, n]: head h of block b deals its expert-ordered run column-major, as
    # forced_choice does; -> [B, n, H, k]
    return flat.view(b, h, k, n).permute(0, 3, 1, 2).reshape(b * n, h, k)


def route(items: torch.Tensor, router: torch.Tensor, kind: str, k: int,
          forced: np.ndarray | None = None, balancer: Balancer | None = None,
          blocks: int = 1, bias: torch.Tensor | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Route items [n, H, dim] with one router per head, router [H, dim, E]: (experts
    [n, H, k] int64, ids within the head; gates [n, H, k] fp32). One batched GEMM and one
    set of kernels for all heads. `forced`: counts [B, H, E] for B equal contiguous blocks of
    the items (one per source rank) override the choice; the gates stay the router's.
    `balancer` (runtime.balancing): its expert bias enters the top-k choice, and it takes the
    balancing losses and the load of this forward; the items are `blocks` equal blocks, one
    per source rank (1 when they are this rank's own tokens). `bias` [H, E] alone: an expert
    bias for the choice without a balancer (the gates stay unbiased)."""
    logits = torch.bmm(items.transpose(0, 1), router).transpose(0, 1)  # [n, H, E]
    probs = router_probs(logits, kind)
    if forced is None:
        if balancer is None and bias is not None:
            scored = logits.float() if kind == "softmax" else probs
            idx = torch.topk(scored.detach() + bias, k, dim=-1, sorted=True).indices
            vals = probs.gather(-1, idx)
            return idx, vals / vals.sum(dim=-1, keepdim=True)
        if balancer is None:
            return top_k(probs, k)
        experts, gates = balancer.select(logits, probs, k)
        if torch.is_grad_enabled():
            balancer.observe(logits, experts, blocks)
        return experts, gates
    forced = np.asarray(forced)
    idx = forced_choice_blocks(forced, items.shape[0] // forced.shape[0], k, items.device)
    vals = probs.gather(-1, idx)
    return idx, vals / vals.sum(dim=-1, keepdim=True)


def choose(probs: torch.Tensor, k: int, forced: np.ndarray | None) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Route n items given their probs [n, E]; `forced` counts [E] override the choice."""
    if forced is None:
        return top_k(probs, k)
    idx = forced_choice_blocks(np.asarray(forced)[None, None], probs.shape[0], k,
                               probs.device)[:, 0]
    vals = probs.gather(1, idx)
    return idx, vals / vals.sum(dim=-1, keepdim=True)


def local_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens sent to each expert: int64 [E] from experts [n, k]. On CUDA a histogram of the
    ids as floats (exact below 2^24 per expert; shared-memory counters), not torch.bincount,
    which reads the largest id back to the host (a sync), nor a scatter-add, whose atomics on
    a few dozen counters serialise (0.18 ms for 524k ids on an H200)."""
    flat = experts.reshape(-1)
    if flat.is_cuda:
        return torch.histc(flat.float(), bins=num_experts, min=0, max=num_experts).long()
    return torch.bincount(flat, minlength=num_experts)
