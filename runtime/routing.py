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


def forced_choice_on(counts: np.ndarray, n: int, k: int, device: torch.device) -> torch.Tensor:
    """`forced_choice` built on `device`: only the E counts are uploaded (pinned, so the copy
    does not wait for the stream: runtime.upload), and the expansion knows its output size, so
    nothing synchronises (the host-built [n, k] array and its upload cost 0.5-3 ms a layer on
    one H200, more than the router's kernels)."""
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != n * k or (counts > n).any() or (counts < 0).any():
        raise ValueError(f"forced routing counts do not fit {n} items x top-{k}: "
                         f"sum {counts.sum()}, max {counts.max()}")
    (c,) = upload(counts, device=device)
    flat = torch.repeat_interleave(torch.arange(len(counts), device=device), c,
                                   output_size=n * k)
    return flat.view(k, n).t()


def choose(probs: torch.Tensor, k: int, forced: np.ndarray | None) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Route n items given their probs [n, E]; `forced` counts [E] override the choice."""
    if forced is None:
        return top_k(probs, k)
    idx = forced_choice_on(forced, probs.shape[0], k, probs.device)
    vals = probs.gather(1, idx)
    return idx, vals / vals.sum(dim=-1, keepdim=True)


def local_counts(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Tokens sent to each expert: int64 [E] from experts [n, k]. A scatter-add, not
    torch.bincount, which reads the largest id back to the host (a sync) on CUDA."""
    flat = experts.reshape(-1)
    out = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    return out.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.int64))
