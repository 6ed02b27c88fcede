"""SwiGLU: the gated activation between the expert FFN's two GEMMs, forward and backward fused.

Public API
----------
``swiglu(h) -> out``

- ``h``: ``[M, 2F]``, the first GEMM's output ``x @ w1`` (gate half ``g = h[:, :F]``, up half
  ``u = h[:, F:]``), any float dtype, rows contiguous (``h.stride(1) == 1``; other layouts are
  copied first). Any ``M >= 0``, any ``F >= 1`` (no power of two needed: F=704 and 1408 are the
  shapes that matter).
- ``out``: ``[M, F]`` in ``h``'s dtype, ``out = silu(g) * u = g * sigmoid(g) * u``.

Differentiable in ``h``. With ``s = sigmoid(g)`` and ``dout = dL/dout`` the backward writes one
``[M, 2F]`` tensor ``dh = [dg | du]``::

    dg = dout * u * s * (1 + g * (1 - s))        du = dout * g * s

Only ``h`` is saved for the backward (``s`` is recomputed; the output is not kept). The math is
fp32 in registers (float64 for float64 input on the torch path), rounded to ``h``'s dtype once
per output element.

``swiglu_reference`` is the plain differentiable torch definition (the tests' float64 reference;
autograd differentiates it). ``swiglu_backward_reference`` is the closed-form backward in torch.

How: the forward reads ``2F`` and writes ``F`` elements per row once, the backward reads ``3F``
(``h`` and ``dout``) and writes ``2F`` once: HBM-bound, one launch each. A program takes a tile
of ``BLOCK_M`` rows by ``BLOCK_F`` columns of the gate half and the same columns of the up half
(``F`` columns further on, so the loads stay 16-byte aligned whenever ``F`` is a multiple of 8);
``BLOCK_F`` is ``F``'s largest power-of-two divisor when that is at least 32 (64 for F=704, 128
for F=1408: no masked lanes), else the next power of two with a masked tail. Programs are
numbered column block fastest, so the programs in flight together cover whole rows. Unfused torch
(``F.silu(h[:, :F]) * h[:, F:]``) takes a strided silu kernel and a multiply forward, and
autograd's slice backward adds zero-fills, copies and an add in backward (H200, M=131072,
F=704: 1.0 ms forward, ~2.5 ms of fill/copy/add in backward).

On tensors Triton cannot take (CPU without the interpreter: the gloo runtime) the same
``autograd.Function`` runs the torch forward and the closed-form torch backward, which also
writes ``dh`` as one tensor (two slice assignments into one ``torch.empty``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from kernels.backend import use_triton

# Default launch shape: elements per tile (BLOCK_M * BLOCK_F) and warps, forward and backward.
# The launchers take each as a parameter (`tile`, `num_warps`, `block_f`); the benchmark sweeps
# those, never these constants.
_FWD_TILE = 4096
_FWD_WARPS = 4
_BWD_TILE = 4096
_BWD_WARPS = 8


@triton.jit
def _gate_up_tile(h_ptr, M, F, stride_h, NF, BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                  EVEN_F: tl.constexpr):  # fmt: skip
    """This program's [BLOCK_M, BLOCK_F] tile (program ids run column block fastest): its rows
    (int64, [BLOCK_M, 1]), columns, mask, and the gate and up halves of h there, in fp32."""
    pid = tl.program_id(0)
    pid_m = pid // NF
    pid_f = pid % NF
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = rows[:, None] < M
    if not EVEN_F:
        mask = mask & (cols[None, :] < F)
    r = rows.to(tl.int64)[:, None]
    g_ptrs = h_ptr + r * stride_h + cols[None, :]
    g = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(g_ptrs + F, mask=mask, other=0.0).to(tl.float32)
    return r, cols, mask, g, u


@triton.jit
def _swiglu_fwd_kernel(h_ptr, out_ptr, M, F, stride_h, stride_out, NF, BLOCK_M: tl.constexpr,
                       BLOCK_F: tl.constexpr, EVEN_F: tl.constexpr):  # fmt: skip
    r, cols, mask, g, u = _gate_up_tile(h_ptr, M, F, stride_h, NF, BLOCK_M, BLOCK_F, EVEN_F)
    s = 1.0 / (1.0 + tl.exp(-g))
    out = (g * s * u).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + r * stride_out + cols[None, :], out, mask=mask)


@triton.jit
def _swiglu_bwd_kernel(h_ptr, d_ptr, dh_ptr, M, F, stride_h, stride_d, stride_dh, NF,
                       BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
                       EVEN_F: tl.constexpr):  # fmt: skip
    # The same tiling; each program writes its columns of both halves of dh.
    r, cols, mask, g, u = _gate_up_tile(h_ptr, M, F, stride_h, NF, BLOCK_M, BLOCK_F, EVEN_F)
    d = tl.load(d_ptr + r * stride_d + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    ds = d * s
    dg = ds * u * (1.0 + g * (1.0 - s))
    du = ds * g
    dg_ptrs = dh_ptr + r * stride_dh + cols[None, :]
    tl.store(dg_ptrs, dg.to(dh_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptrs + F, du.to(dh_ptr.dtype.element_ty), mask=mask)


def _check(h: torch.Tensor) -> int:
    """F of a valid ``h`` (``[M, 2F]``, float)."""
    if h.dim() != 2 or h.shape[1] == 0 or h.shape[1] % 2:
        raise ValueError(f"need h [M, 2F] with F >= 1, got {tuple(h.shape)}")
    if not h.dtype.is_floating_point:
        raise TypeError(f"h must be a float tensor, got {h.dtype}")
    return h.shape[1] // 2


def tile_shape(m: int, f: int, tile: int, block_f: int | None = None) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_F) for ``tile`` elements per program: see the module docstring."""
    if block_f is None:
        p = f & -f  # largest power of two dividing f
        block_f = min(p, 256) if p >= 32 else min(256, triton.next_power_of_2(f))
    block_m = max(1, min(tile // block_f, triton.next_power_of_2(max(m, 1))))
    return block_m, block_f


def swiglu_triton(
    h: torch.Tensor,
    out: torch.Tensor | None = None,
    tile: int | None = None,
    num_warps: int | None = None,
    block_f: int | None = None,
) -> torch.Tensor:
    """Launch the forward kernel (no autograd). Returns ``out`` (allocated when ``None``).

    ``tile``, ``num_warps`` and ``block_f`` override the launch shape (for the benchmark)."""
    f = _check(h)
    m = h.shape[0]
    if out is None:
        out = torch.empty((m, f), device=h.device, dtype=h.dtype)
    if m == 0:
        return out
    assert h.stride(1) == 1 and out.stride(1) == 1 and out.shape == (m, f)
    block_m, block_f = tile_shape(m, f, tile or _FWD_TILE, block_f)
    nf = triton.cdiv(f, block_f)
    _swiglu_fwd_kernel[(triton.cdiv(m, block_m) * nf,)](
        h, out, m, f, h.stride(0), out.stride(0), nf, BLOCK_M=block_m, BLOCK_F=block_f,
        EVEN_F=f % block_f == 0, num_warps=num_warps or _FWD_WARPS,
    )  # fmt: skip
    return out


def swiglu_backward_triton(
    h: torch.Tensor,
    dout: torch.Tensor,
    dh: torch.Tensor | None = None,
    tile: int | None = None,
    num_warps: int | None = None,
    block_f: int | None = None,
) -> torch.Tensor:
    """Launch the backward kernel: ``dh = [dg | du]``, ``[M, 2F]`` in ``h``'s dtype."""
    f = _check(h)
    m = h.shape[0]
    if dout.shape != (m, f):
        raise ValueError(f"dout {tuple(dout.shape)} must be [M, F] = {(m, f)}")
    if dh is None:
        dh = torch.empty((m, 2 * f), device=h.device, dtype=h.dtype)
    if m == 0:
        return dh
    if dout.stride(1) != 1:
        dout = dout.contiguous()
    assert h.stride(1) == 1 and dh.stride(1) == 1 and dh.shape == (m, 2 * f)
    block_m, block_f = tile_shape(m, f, tile or _BWD_TILE, block_f)
    nf = triton.cdiv(f, block_f)
    _swiglu_bwd_kernel[(triton.cdiv(m, block_m) * nf,)](
        h, dout, dh, m, f, h.stride(0), dout.stride(0), dh.stride(0), nf, BLOCK_M=block_m,
        BLOCK_F=block_f, EVEN_F=f % block_f == 0, num_warps=num_warps or _BWD_WARPS,
    )  # fmt: skip
    return dh


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def swiglu_reference(h: torch.Tensor) -> torch.Tensor:
    """Plain torch ``silu(h[:, :F]) * h[:, F:]``, in ``h``'s dtype; autograd by torch."""
    f = _check(h)
    return F.silu(h[:, :f]) * h[:, f:]


def _swiglu_torch(h: torch.Tensor) -> torch.Tensor:
    """The torch forward of the fused op: fp32 math (float64 for float64), one rounding."""
    f = _check(h)
    acc = _acc_dtype(h.dtype)
    return (F.silu(h[:, :f].to(acc)) * h[:, f:].to(acc)).to(h.dtype)


def swiglu_backward_reference(h: torch.Tensor, dout: torch.Tensor) -> torch.Tensor:
    """Closed-form backward in torch: ``dh = [dg | du]`` as one ``[M, 2F]`` tensor in ``h``'s
    dtype, computed in fp32 (float64 for float64 input)."""
    f = _check(h)
    acc = _acc_dtype(h.dtype)
    g, u, d = h[:, :f].to(acc), h[:, f:].to(acc), dout.to(acc)
    s = torch.sigmoid(g)
    ds = d * s
    dh = torch.empty((h.shape[0], 2 * f), device=h.device, dtype=h.dtype)
    dh[:, f:] = ds * g
    dh[:, :f] = ds.mul_(u).mul_(g * (1 - s) + 1)
    return dh


class _SwiGLUFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, triton_path):
        ctx.triton_path = triton_path
        ctx.save_for_backward(h)
        return swiglu_triton(h) if triton_path else _swiglu_torch(h)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        (h,) = ctx.saved_tensors
        if ctx.triton_path:
            return swiglu_backward_triton(h, dout), None
        return swiglu_backward_reference(h, dout), None


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """Fused ``silu(h[:, :F]) * h[:, F:]``: see the module docstring."""
    _check(h)
    if h.stride(1) != 1:
        h = h.contiguous()
    triton_path = use_triton(h)
    if h.requires_grad and torch.is_grad_enabled():
        return _SwiGLUFn.apply(h, triton_path)
    # Inference path: no autograd node.
    return swiglu_triton(h) if triton_path else _swiglu_torch(h)
