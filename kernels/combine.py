"""Combine (unpermute): bring expert outputs back to their tokens as a weighted sum.

Public API
----------
``combine(y_perm, row_map, weights=None) -> out``  (``unpermute`` is the same function)

- ``y_perm``: ``[R, D]`` expert outputs in the order ``kernels.permute.permute`` produced
  (``R >= T * k``; rows no token points at are ignored), rows contiguous, any float dtype.
- ``row_map``: int32 ``[T, k]`` from ``permute``: token ``t``'s slot ``j`` output is row
  ``row_map[t, j]``.
- ``weights``: ``[T, k]`` (fp32 from the router, or any float dtype), or ``None`` for a plain sum
  (the exact inverse of ``permute`` when ``k == 1``).
- ``out``: ``[T, D]`` in ``y_perm``'s dtype,
  ``out[t] = sum_j weights[t, j] * y_perm[row_map[t, j]]``, accumulated in fp32 in a fixed
  slot order (deterministic: no atomics).

Differentiable in ``y_perm`` and ``weights``. The backward is one fused launch per token that
writes ``grad_y_perm[row_map[t, j]] = weights[t, j] * grad_out[t]`` and
``grad_weights[t, j] = <grad_out[t], y_perm[row_map[t, j]]>``.

How: one program per token reads its k rows once (all k loads issued before the sum) and writes
the token row once: T*k*D reads and T*D writes, the minimum.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.backend import use_triton
from kernels.permute import row_block, scatter_rows


@triton.jit
def _gather_reduce_kernel(y_ptr, row_map_ptr, w_ptr, out_ptr, D, stride_y, stride_out,
                          K: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                          HAS_W: tl.constexpr, PADDED: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        acc = tl.zeros((BLOCK_D,), tl.float32)
        for j in tl.static_range(K):
            r = tl.load(row_map_ptr + t * K + j).to(tl.int64)
            if PADDED:  # a negative entry is padding: nothing is read for it
                lim = tl.where(r >= 0, D, 0)
                v = tl.load(y_ptr + tl.maximum(r, 0) * stride_y + cols, mask=cols < lim,
                            other=0.0).to(tl.float32)
            elif EVEN_D:
                v = tl.load(y_ptr + r * stride_y + cols).to(tl.float32)
            else:
                v = tl.load(y_ptr + r * stride_y + cols, mask=cols < D, other=0.0)
                v = v.to(tl.float32)
            if HAS_W:
                acc += tl.load(w_ptr + t * K + j).to(tl.float32) * v
            else:
                acc += v
        val = acc.to(out_ptr.dtype.element_ty)
        if EVEN_D:
            tl.store(out_ptr + t * stride_out + cols, val)
        else:
            tl.store(out_ptr + t * stride_out + cols, val, mask=cols < D)


@triton.jit
def _combine_bwd_kernel(g_ptr, y_ptr, row_map_ptr, w_ptr, gy_ptr, gw_ptr, D, stride_g, stride_y,
                        stride_gy, K: tl.constexpr, K_PAD: tl.constexpr, BLOCK_D: tl.constexpr,
                        EVEN_D: tl.constexpr):  # fmt: skip
    t = tl.program_id(0).to(tl.int64)
    kk = tl.arange(0, K_PAD)
    gw = tl.zeros((K_PAD,), tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        m = cols < D
        if EVEN_D:
            g = tl.load(g_ptr + t * stride_g + cols).to(tl.float32)
        else:
            g = tl.load(g_ptr + t * stride_g + cols, mask=m, other=0.0).to(tl.float32)
        for j in tl.static_range(K):
            r = tl.load(row_map_ptr + t * K + j).to(tl.int64)
            w = tl.load(w_ptr + t * K + j).to(tl.float32)
            if EVEN_D:
                y = tl.load(y_ptr + r * stride_y + cols).to(tl.float32)
                tl.store(gy_ptr + r * stride_gy + cols, (w * g).to(gy_ptr.dtype.element_ty))
            else:
                y = tl.load(y_ptr + r * stride_y + cols, mask=m, other=0.0).to(tl.float32)
                tl.store(gy_ptr + r * stride_gy + cols, (w * g).to(gy_ptr.dtype.element_ty),
                         mask=m)  # fmt: skip
            gw = tl.where(kk == j, gw + tl.sum(g * y, axis=0), gw)
    tl.store(gw_ptr + t * K + kk, gw.to(gw_ptr.dtype.element_ty), mask=kk < K)


def gather_reduce(
    y: torch.Tensor,
    row_map: torch.Tensor,
    weights: torch.Tensor | None,
    num_warps: int | None = None,
    padded: bool = False,
) -> torch.Tensor:
    """Launch the combine kernel (no autograd): ``out[t] = sum_j w[t, j] * y[row_map[t, j]]``.

    ``padded``: entries of ``row_map`` below 0 are padding and add nothing (a ragged
    gather-reduce: rows that sum different numbers of inputs). ``num_warps`` overrides the
    default launch shape (for the benchmark's sweep)."""
    t, k = row_map.shape
    d = y.shape[1]
    out = torch.empty((t, d), device=y.device, dtype=y.dtype)
    if t == 0 or d == 0:
        return out
    assert y.stride(1) == 1 and row_map.is_contiguous()
    if weights is not None:
        weights = weights.contiguous()
    block_d, warps = row_block(d, y.element_size())
    warps = num_warps or warps
    _gather_reduce_kernel[(t,)](
        y, row_map, weights if weights is not None else row_map, out, d, y.stride(0),
        out.stride(0), K=k, BLOCK_D=block_d, EVEN_D=d % block_d == 0,
        HAS_W=weights is not None, PADDED=padded, num_warps=warps,
    )  # fmt: skip
    return out


def combine_backward(
    grad_out: torch.Tensor, y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused backward of the weighted combine: ``(grad_y_perm, grad_weights)``."""
    t, k = row_map.shape
    d = y.shape[1]
    # Rows no token points at get no gradient: zero them only when there are any.
    alloc = torch.empty if y.shape[0] == t * k else torch.zeros
    gy = alloc(y.shape, device=y.device, dtype=y.dtype)
    gw = torch.empty((t, k), device=y.device, dtype=weights.dtype)
    if t == 0:
        return gy, gw
    if d == 0:
        return gy, gw.zero_()
    grad_out = grad_out.contiguous()
    block_d, warps = row_block(d, y.element_size())
    _combine_bwd_kernel[(t,)](
        grad_out, y, row_map, weights.contiguous(), gy, gw, d, grad_out.stride(0), y.stride(0),
        gy.stride(0), K=k, K_PAD=triton.next_power_of_2(k), BLOCK_D=block_d,
        EVEN_D=d % block_d == 0, num_warps=warps,
    )  # fmt: skip
    return gy, gw


def combine_reference(
    y_perm: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-torch combine (fp32 accumulation, float64 for float64 input). Autograd by torch."""
    acc_dtype = torch.float64 if y_perm.dtype == torch.float64 else torch.float32
    rows = y_perm[row_map.long()].to(acc_dtype)  # [T, k, D]
    if weights is not None:
        rows = rows * weights.to(acc_dtype).unsqueeze(-1)
    return rows.sum(dim=1).to(y_perm.dtype)


class _CombineFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, row_map, weights):
        ctx.save_for_backward(y_perm, row_map, weights)
        return gather_reduce(y_perm, row_map, weights)

    @staticmethod
    def backward(ctx, grad_out):
        y_perm, row_map, weights = ctx.saved_tensors
        gy, gw = combine_backward(grad_out, y_perm, row_map, weights)
        return gy, None, gw


class _UnpermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_perm, row_map):
        ctx.save_for_backward(row_map)
        ctx.rows = y_perm.shape[0]
        return gather_reduce(y_perm, row_map, None)

    @staticmethod
    def backward(ctx, grad_out):
        (row_map,) = ctx.saved_tensors
        t, k = row_map.shape
        alloc = torch.empty if ctx.rows == t * k else torch.zeros
        gy = alloc((ctx.rows, grad_out.shape[1]), device=grad_out.device, dtype=grad_out.dtype)
        return scatter_rows(grad_out.contiguous(), row_map, gy), None


def combine(
    y_perm: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Weighted sum of each token's k expert rows: see the module docstring."""
    if y_perm.dim() != 2 or row_map.dim() != 2:
        raise ValueError(f"need y_perm [R, D] and row_map [T, k], got {tuple(y_perm.shape)}, "
                         f"{tuple(row_map.shape)}")  # fmt: skip
    if weights is not None and weights.shape != row_map.shape:
        raise ValueError(f"weights {tuple(weights.shape)} must match row_map "
                         f"{tuple(row_map.shape)}")  # fmt: skip
    if not use_triton(y_perm):
        return combine_reference(y_perm, row_map, weights)
    if y_perm.stride(1) != 1:
        y_perm = y_perm.contiguous()
    row_map = row_map.contiguous()
    needs_grad = y_perm.requires_grad or (weights is not None and weights.requires_grad)
    if not (needs_grad and torch.is_grad_enabled()):
        return gather_reduce(y_perm, row_map, weights)
    if weights is None:
        return _UnpermuteFn.apply(y_perm, row_map)
    return _CombineFn.apply(y_perm, row_map, weights)


unpermute = combine
