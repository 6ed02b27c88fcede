"""Fused MoE router: scores, top-k, renormalisation and per-expert counts in one launch.

Public API
----------
``route(logits, top_k, score="softmax", renormalize=True) -> Route(weights, experts, counts)``

- ``logits``: ``[T, E]`` (one router) or ``[T, H, E]`` (Multi-Head LatentMoE: ``H`` independent
  routers, one per head, over the token's ``H`` sub-tokens). Any float dtype (fp32, bf16, fp16);
  the last dimension must be contiguous. ``1 <= top_k <= E``.
- ``score="softmax"``: ``p = softmax(logits)`` over the ``E`` experts of a router.
  ``score="sigmoid"``: ``p = sigmoid(logits)`` (DeepSeek-V3 style).
- selection: the ``top_k`` experts of largest logit (the same as largest ``p``: both scores are
  monotonic), in descending order; ties go to the lower expert index.
- ``weights``: fp32 ``[T, (H,) k]``, ``p`` of the selected experts; with ``renormalize`` divided
  by their sum, so each token's weights sum to 1.
- ``experts``: int64 ``[T, (H,) k]`` expert ids in ``[0, E)`` (per head for ``[T, H, E]``).
- ``counts``: int32 ``[(H,) E]``, how many of the ``T * k`` assignments went to each expert
  (the trace recorder's row and the dispatch split sizes).

Gradients flow to ``logits`` through ``weights`` (the selection itself is piecewise constant).
The backward recomputes the weights of the selected experts in torch from the saved logits: it
is a few small ops over ``[T, E]``, not worth a kernel.

``route_reference`` is the pure-torch definition the kernel is tested against and the path taken
on CPU tensors outside the Triton interpreter.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton

Score = Literal["softmax", "sigmoid"]


class Route(NamedTuple):
    weights: torch.Tensor
    experts: torch.Tensor
    counts: torch.Tensor


@triton.jit
def _route_kernel(
    logits_ptr,
    w_ptr,
    e_ptr,
    counts_ptr,
    T,
    E,
    stride_t,
    stride_h,
    H: tl.constexpr,
    TOP_K: tl.constexpr,
    K_PAD: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_E: tl.constexpr,
    SIGMOID: tl.constexpr,
    RENORM: tl.constexpr,
):
    # One program: BLOCK_T tokens of one head. The whole row of E logits sits in registers, so
    # scores, k rounds of argmax and the counts need no second pass over memory.
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_E)
    row_ok = rows < T
    col_ok = cols < E
    ptrs = logits_ptr + rows.to(tl.int64)[:, None] * stride_t + h * stride_h + cols[None, :]
    # Rows past T load zeros (finite: no NaN from -inf - -inf); padded experts get -inf so
    # they score 0 and are never selected.
    x = tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
    x = tl.where(col_ok[None, :], x, float("-inf"))

    if SIGMOID:
        p = tl.sigmoid(x)
    else:
        m = tl.max(x, axis=1)
        ex = tl.exp(x - m[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]

    kcols = tl.arange(0, K_PAD)
    wk = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    ek = tl.zeros((BLOCK_T, K_PAD), tl.int64)
    hits = tl.zeros((BLOCK_E,), tl.int32)
    work = x
    for j in tl.static_range(TOP_K):
        # Selecting on the logit, not on p, keeps ties exactly where the reference has them.
        idx = tl.argmax(work, axis=1, tie_break_left=True)
        onehot = cols[None, :] == idx[:, None]
        val = tl.sum(tl.where(onehot, p, 0.0), axis=1)
        wk = tl.where(kcols[None, :] == j, val[:, None], wk)
        ek = tl.where(kcols[None, :] == j, idx.to(tl.int64)[:, None], ek)
        hits += tl.sum((onehot & row_ok[:, None]).to(tl.int32), axis=0)
        work = tl.where(onehot, float("-inf"), work)
    if RENORM:
        wk = wk / tl.sum(wk, axis=1)[:, None]

    out_off = (rows.to(tl.int64)[:, None] * H + h) * TOP_K + kcols[None, :]
    out_mask = row_ok[:, None] & (kcols[None, :] < TOP_K)
    tl.store(w_ptr + out_off, wk, mask=out_mask)
    tl.store(e_ptr + out_off, ek, mask=out_mask)
    # One atomic per expert per program rather than one per assignment.
    tl.atomic_add(counts_ptr + h * E + cols, hits, mask=col_ok)


def _check(logits: torch.Tensor, top_k: int, score: str) -> None:
    if logits.dim() not in (2, 3):
        raise ValueError(f"logits must be [T, E] or [T, H, E], got shape {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    e = logits.shape[-1]
    if not 1 <= top_k <= e:
        raise ValueError(f"top_k={top_k} must be in [1, E={e}]")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def _weights_of(logits: torch.Tensor, experts: torch.Tensor, score: str, renorm: bool):
    """Differentiable weights of given (already selected) experts, in the logits' dtype math."""
    if score == "softmax":
        p = torch.softmax(logits, dim=-1)
    else:
        p = torch.sigmoid(logits)
    w = torch.gather(p, -1, experts)
    if renorm:
        w = w / w.sum(dim=-1, keepdim=True)
    return w


def route_reference(
    logits: torch.Tensor, top_k: int, score: Score = "softmax", renormalize: bool = True
) -> Route:
    """Pure-torch router with the kernel's exact contract (fp32 math, ties to the lower index).

    Computes in fp32, or in the input's precision if it is wider (float64 for the tests).
    """
    _check(logits, top_k, score)
    x = logits if logits.dtype == torch.float64 else logits.float()
    # A stable descending sort puts equal logits in index order: the kernel's tie rule.
    experts = torch.sort(x.detach(), dim=-1, descending=True, stable=True).indices[..., :top_k]
    weights = _weights_of(x, experts, score, renormalize)
    e = logits.shape[-1]
    flat = experts.reshape(experts.shape[0], -1, top_k)  # [T, H or 1, k]
    counts = torch.stack(
        [torch.bincount(flat[:, h].reshape(-1), minlength=e) for h in range(flat.shape[1])]
    ).to(torch.int32)
    if logits.dim() == 2:
        counts = counts[0]
    return Route(weights, experts, counts)


def route_triton(
    logits: torch.Tensor, top_k: int, score: Score = "softmax", renormalize: bool = True
) -> Route:
    """Launch the fused kernel (no autograd). Use ``route`` unless you need the raw launch."""
    _check(logits, top_k, score)
    single = logits.dim() == 2
    x3 = logits.unsqueeze(1) if single else logits
    if x3.stride(-1) != 1:
        x3 = x3.contiguous()
    t, h, e = x3.shape
    weights = torch.empty((t, h, top_k), device=logits.device, dtype=torch.float32)
    experts = torch.empty((t, h, top_k), device=logits.device, dtype=torch.int64)
    counts = torch.zeros((h, e), device=logits.device, dtype=torch.int32)
    block_e = triton.next_power_of_2(e)
    # Keep the [BLOCK_T, BLOCK_E] tile at 4k values (32 fp32 per thread at 4 warps).
    block_t = max(1, min(triton.next_power_of_2(max(t, 1)), 4096 // block_e))
    if t > 0:
        grid = (triton.cdiv(t, block_t), h)
        _route_kernel[grid](
            x3, weights, experts, counts, t, e, x3.stride(0), x3.stride(1),
            H=h, TOP_K=top_k, K_PAD=triton.next_power_of_2(top_k), BLOCK_T=block_t,
            BLOCK_E=block_e, SIGMOID=score == "sigmoid", RENORM=renormalize, num_warps=4,
        )  # fmt: skip
    if single:
        return Route(weights[:, 0], experts[:, 0], counts[0])
    return Route(weights, experts, counts)


class _RouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, top_k, score, renormalize):
        r = route_triton(logits, top_k, score, renormalize)
        ctx.save_for_backward(logits, r.experts)
        ctx.score, ctx.renorm = score, renormalize
        ctx.mark_non_differentiable(r.experts, r.counts)
        return r.weights, r.experts, r.counts

    @staticmethod
    def backward(ctx, grad_w, _grad_e, _grad_c):
        logits, experts = ctx.saved_tensors
        with torch.enable_grad():
            x = logits.detach().float().requires_grad_(True)
            w = _weights_of(x, experts, ctx.score, ctx.renorm)
            (gx,) = torch.autograd.grad(w, x, grad_w)
        return gx.to(logits.dtype), None, None, None


def route(
    logits: torch.Tensor, top_k: int, score: Score = "softmax", renormalize: bool = True
) -> Route:
    """Route tokens: see the module docstring for the contract. Differentiable in ``logits``."""
    if not use_triton(logits):
        return route_reference(logits, top_k, score, renormalize)
    if logits.requires_grad and torch.is_grad_enabled():
        return Route(*_RouteFn.apply(logits, top_k, score, renormalize))
    return route_triton(logits, top_k, score, renormalize)
