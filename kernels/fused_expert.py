"""Fused thin-expert MLP: y = gelu(x @ w1[g]) @ w2[g] per group, the hidden layer on chip.

Public API
----------
``fused_expert(x, w1, w2, offsets, config=None) -> y``

- ``x``: ``[M, D]`` rows grouped by expert: group ``g`` is rows ``offsets[g]:offsets[g+1]``
  (for Multi-Head LatentMoE the groups are (head, expert) pairs, the sort the HP layer does).
  ``D`` is a head's width (16 to 256; the kernel holds a ``[BLOCK_M, D]`` tile in registers).
- ``w1``: ``[G, D, F]``, ``w2``: ``[G, F, D]``, the 2-matrix GELU experts of Multi-Head
  LatentMoE (no gate, no bias: kerner-lab/Sparse-GPT-Pretraining
  ``src/model/modules/ffwd/mh_moe_hp_nrt.py``, where ``w1`` is its K and ``w2`` its V). ``F``
  a multiple of 16 (the paper's code needs a multiple of 128).
- ``offsets``: int ``[G + 1]`` on the device (no host sync: the tile list is found on the GPU).
- ``y``: ``[M, D]`` in ``x``'s dtype; rows past ``offsets[G]`` are zero. The GELU is the exact
  (erf) one. Differentiable in ``x``, ``w1`` and ``w2``.

How. Each group is cut into ``BLOCK_M``-row tiles, its last tile padded (the paper's code pads
every group to 128 rows in memory and runs FlexAttention over the padded sub-tokens; here the
padding exists only as masked lanes of the last tile: computed, never loaded or stored). A
program of the forward takes one tile: it loads the ``[BLOCK_M, D]`` rows once and walks the
hidden layer in ``BLOCK_F`` chunks, ``h = x @ w1[g][:, chunk]`` (fp32 accumulation), ``a =
gelu(h)`` rounded to the input dtype, ``acc += a @ w2[g][chunk, :]``: the ``[M, F]`` hidden
activation never reaches memory, which reads ``x`` and the weights and writes ``y`` once. The
unfused path (two grouped GEMMs and the GELU between them) writes ``h``, reads it, writes
``gelu(h)`` and reads it again: ``4 F`` bytes per row per byte of ``D`` for thin experts.
Programs find their tile without a host sync: a binary search of the tile index in the groups'
cumulative tile counts (one small torch cumsum), over a grid sized for the worst case
(``cdiv(M, BLOCK_M) + G`` tiles; surplus programs exit).

Backward, by recomputation (nothing of the hidden layer is saved): ``dw`` kernel, a program
per (group, hidden chunk) walks the group's row tiles: recompute ``h``, ``a``; ``dW2 += a^T
dy``; ``da = dy w2^T``; ``dh = da * gelu'(h)``; ``dW1 += x^T dh`` (fp32 in registers, one store
per program, deterministic). Input gradient (``config.dx``): "recompute", a second kernel per
row tile over all chunks (``h``, ``da``, ``dx += dh w1^T``: 3 more dots a chunk, deterministic),
or "atomic", the ``dw`` kernel adds each chunk's ``dh w1^T`` into an fp32 buffer with atomics
(one dot instead of three; the sum's order varies between runs).

Tuning knobs are the launcher's ``config`` (``FusedExpertConfig``), not module globals.
``fused_expert_reference`` is the per-group torch definition (autograd by torch), the path on
tensors Triton cannot take.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.backend import INTERPRET, use_triton

_SQRT1_2: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0))
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))


@dataclass(frozen=True)
class FusedExpertConfig:
    """Launch shape; ``None`` fields are chosen from the shapes (``resolve``). The forward and
    the input-gradient kernel share ``block_m`` (a group's padding granule), ``block_f``,
    ``num_warps``; the weight-gradient kernel has its own (it holds two fp32 ``[D, block_f]``
    accumulators)."""

    block_m: int = 128              # rows per tile (a group's padding granule)
    block_f: int | None = None      # hidden units per chunk
    num_warps: int | None = None
    num_stages: int = 2
    dw_block_m: int = 64            # rows per step of the weight-gradient kernel
    dw_block_f: int = 64            # hidden units per weight-gradient program
    dw_warps: int | None = None
    dx: str = "recompute"           # input gradient: "recompute" (own kernel) or "atomic"

    def resolve(self, d: int, f: int) -> FusedExpertConfig:
        if f % 16:
            raise ValueError(f"fused_expert needs F a multiple of 16, got {f}")
        if self.dx not in ("recompute", "atomic"):
            raise ValueError(f"dx must be 'recompute' or 'atomic', got {self.dx!r}")
        bf = self.block_f or next(b for b in (64, 32, 16) if f % b == 0)
        dwf = next(b for b in (self.dw_block_f, 64, 32, 16) if f % b == 0)
        if f % bf:
            raise ValueError(f"block_f={bf} must divide F={f}")
        wide = triton.next_power_of_2(d) >= 256
        warps = self.num_warps or (8 if wide or self.block_m >= 128 else 4)
        dw_warps = self.dw_warps or 8
        return FusedExpertConfig(self.block_m, bf, warps, self.num_stages, self.dw_block_m, dwf,
                                 dw_warps, self.dx)


# Launch shapes the runtime tries (runtime.kernels_bridge times each once per shape and keeps
# the fastest; the benchmark times all of them). The first H200 run (2026-12-01) measured
# 64-row tiles with 128-wide hidden chunks at 17% of the grouped GEMM rate forward and 8%
# backward (128 x 1024 experts): every row tile re-reads its group's weights (BLOCK_M FLOPs
# per weight byte) and 2 stages of 128-wide chunks fill the shared memory of one program per
# SM; the weight-gradient kernel's accumulators spilled at 4 warps.
CANDIDATES = (
    FusedExpertConfig(),
    FusedExpertConfig(block_m=64, num_warps=4),
    FusedExpertConfig(block_f=128),
    FusedExpertConfig(block_m=128, num_warps=4),
    FusedExpertConfig(dx="atomic"),
)


@triton.jit
def _gelu(h):
    return 0.5 * h * (1.0 + tl.math.erf(h * _SQRT1_2))


@triton.jit
def _gelu_grad(h):
    return 0.5 * (1.0 + tl.math.erf(h * _SQRT1_2)) + h * tl.exp(-0.5 * h * h) * _INV_SQRT_2PI


@triton.jit
def _tile_of(offs_ptr, cum_ptr, G, LOG_G: tl.constexpr, BLOCK_M: tl.constexpr):
    """(valid, group, first row, end row) of this program's tile: the binary search of the
    program id in the groups' inclusive cumulative tile counts."""
    pid = tl.program_id(0)
    total = tl.load(cum_ptr + G - 1)
    lo = pid * 0
    hi = lo + G
    for _ in tl.static_range(LOG_G):
        mid = (lo + hi) // 2
        c = tl.load(cum_ptr + mid, mask=mid < G, other=0)
        active = lo < hi
        right = c <= pid
        lo, hi = tl.where(active & right, mid + 1, lo), tl.where(active & ~right, mid, hi)
    g = tl.minimum(lo, G - 1)
    before = tl.load(cum_ptr + g - 1, mask=g > 0, other=0)
    start = tl.load(offs_ptr + g) + (pid - before) * BLOCK_M
    end = tl.load(offs_ptr + g + 1)
    return pid < total, g, start, end


@triton.jit
def _fused_fwd(x_ptr, w1_ptr, w2_ptr, y_ptr, offs_ptr, cum_ptr, G, D, F, sx, sy,
               s1g, s1d, s1f, s2g, s2f, s2d, LOG_G: tl.constexpr, D_PAD: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, UPCAST: tl.constexpr,
               NUM_STAGES: tl.constexpr):  # fmt: skip
    valid, g, start, end = _tile_of(offs_ptr, cum_ptr, G, LOG_G, BLOCK_M)
    if valid:
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D
        r64 = rows.to(tl.int64)
        x = tl.load(x_ptr + r64[:, None] * sx + dd[None, :], mask=r_ok[:, None] & d_ok[None, :],
                    other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
        ff = tl.arange(0, BLOCK_F)
        g64 = g.to(tl.int64)
        w1p = w1_ptr + g64 * s1g + dd[:, None] * s1d + ff[None, :] * s1f
        w2p = w2_ptr + g64 * s2g + ff[:, None] * s2f + dd[None, :] * s2d
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for f0 in tl.range(0, F, BLOCK_F, num_stages=NUM_STAGES):
            w1 = tl.load(w1p + f0 * s1f, mask=d_ok[:, None], other=0.0)
            w2 = tl.load(w2p + f0 * s2f, mask=d_ok[None, :], other=0.0)
            if UPCAST:
                w1 = w1.to(tl.float32)
                w2 = w2.to(tl.float32)
            h = tl.dot(x, w1)
            a = _gelu(h).to(w2.dtype)
            acc = tl.dot(a, w2, acc)
        tl.store(y_ptr + r64[:, None] * sy + dd[None, :], acc.to(y_ptr.dtype.element_ty),
                 mask=r_ok[:, None] & d_ok[None, :])


@triton.jit
def _fused_bwd_dx(x_ptr, dy_ptr, w1_ptr, w2_ptr, dx_ptr, offs_ptr, cum_ptr, G, D, F, sx, sdy,
                  sdx, s1g, s1d, s1f, s2g, s2f, s2d, LOG_G: tl.constexpr, D_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, UPCAST: tl.constexpr,
                  NUM_STAGES: tl.constexpr):  # fmt: skip
    """dx for one row tile: over the hidden chunks, recompute h and da, dx += dh w1^T."""
    valid, g, start, end = _tile_of(offs_ptr, cum_ptr, G, LOG_G, BLOCK_M)
    if valid:
        rows = start + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        dd = tl.arange(0, D_PAD)
        d_ok = dd < D
        r64 = rows.to(tl.int64)
        m2 = r_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + r64[:, None] * sx + dd[None, :], mask=m2, other=0.0)
        dy = tl.load(dy_ptr + r64[:, None] * sdy + dd[None, :], mask=m2, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        ff = tl.arange(0, BLOCK_F)
        g64 = g.to(tl.int64)
        w1p = w1_ptr + g64 * s1g + dd[:, None] * s1d + ff[None, :] * s1f
        w2tp = w2_ptr + g64 * s2g + dd[:, None] * s2d + ff[None, :] * s2f  # w2[g]^T chunk
        acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
        for f0 in tl.range(0, F, BLOCK_F, num_stages=NUM_STAGES):
            w1 = tl.load(w1p + f0 * s1f, mask=d_ok[:, None], other=0.0)
            w2t = tl.load(w2tp + f0 * s2f, mask=d_ok[:, None], other=0.0)
            if UPCAST:
                w1 = w1.to(tl.float32)
                w2t = w2t.to(tl.float32)
            h = tl.dot(x, w1)
            da = tl.dot(dy, w2t)
            dh = (da * _gelu_grad(h)).to(w1.dtype)
            acc = tl.dot(dh, tl.trans(w1), acc)
        tl.store(dx_ptr + r64[:, None] * sdx + dd[None, :], acc.to(dx_ptr.dtype.element_ty),
                 mask=m2)


@triton.jit
def _fused_bwd_dw(x_ptr, dy_ptr, w1_ptr, w2_ptr, dw1_ptr, dw2_ptr, dxacc_ptr, offs_ptr, D, F,
                  sx, sdy, s1g, s1d, s1f, s2g, s2f, s2d, D_PAD: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr, UPCAST: tl.constexpr,
                  ATOMIC_DX: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    """dW1[g][:, chunk] and dW2[g][chunk, :] over the group's row tiles (and, ATOMIC_DX, each
    tile's dx share of this chunk added into the fp32 buffer)."""
    g = tl.program_id(0)
    f0 = tl.program_id(1) * BLOCK_F
    start = tl.load(offs_ptr + g)
    end = tl.load(offs_ptr + g + 1)
    dd = tl.arange(0, D_PAD)
    d_ok = dd < D
    ff = f0 + tl.arange(0, BLOCK_F)
    g64 = g.to(tl.int64)
    w1 = tl.load(w1_ptr + g64 * s1g + dd[:, None] * s1d + ff[None, :] * s1f,
                 mask=d_ok[:, None], other=0.0)
    w2t = tl.load(w2_ptr + g64 * s2g + dd[:, None] * s2d + ff[None, :] * s2f,
                  mask=d_ok[:, None], other=0.0)
    if UPCAST:
        w1 = w1.to(tl.float32)
        w2t = w2t.to(tl.float32)
    dw1 = tl.zeros((D_PAD, BLOCK_F), tl.float32)
    dw2 = tl.zeros((BLOCK_F, D_PAD), tl.float32)
    for r0 in tl.range(start, end, BLOCK_M, num_stages=NUM_STAGES):
        rows = r0 + tl.arange(0, BLOCK_M)
        r_ok = rows < end
        r64 = rows.to(tl.int64)
        m2 = r_ok[:, None] & d_ok[None, :]
        x = tl.load(x_ptr + r64[:, None] * sx + dd[None, :], mask=m2, other=0.0)
        dy = tl.load(dy_ptr + r64[:, None] * sdy + dd[None, :], mask=m2, other=0.0)
        if UPCAST:
            x = x.to(tl.float32)
            dy = dy.to(tl.float32)
        h = tl.dot(x, w1)
        a = _gelu(h).to(x.dtype)
        dw2 = tl.dot(tl.trans(a), dy, dw2)
        da = tl.dot(dy, w2t)
        dh = (da * _gelu_grad(h)).to(x.dtype)
        dw1 = tl.dot(tl.trans(x), dh, dw1)
        if ATOMIC_DX:
            part = tl.dot(dh, tl.trans(w1))
            tl.atomic_add(dxacc_ptr + r64[:, None] * D + dd[None, :], part, mask=m2,
                          sem="relaxed")
    gw = g64 * F * D
    tl.store(dw1_ptr + gw + dd[:, None] * F + ff[None, :], dw1.to(dw1_ptr.dtype.element_ty),
             mask=d_ok[:, None])
    tl.store(dw2_ptr + gw + ff[:, None] * D + dd[None, :], dw2.to(dw2_ptr.dtype.element_ty),
             mask=d_ok[None, :])


def _check(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor) -> None:
    if x.dim() != 2 or w1.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"need x [M, D], w1 [G, D, F], w2 [G, F, D], got {tuple(x.shape)}, "
                         f"{tuple(w1.shape)}, {tuple(w2.shape)}")  # fmt: skip
    g, d, f = w1.shape
    if w2.shape != (g, f, d) or x.shape[1] != d:
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, w1 {tuple(w1.shape)}, "
                         f"w2 {tuple(w2.shape)}")  # fmt: skip
    if offsets.shape != (g + 1,):
        raise ValueError(f"offsets must be [G + 1 = {g + 1}], got {tuple(offsets.shape)}")


class _Tiles:
    """The tile list's inputs on the device: offsets (int32) and the inclusive cumulative
    tile counts per group, plus the grid's upper bound."""

    def __init__(self, offsets: torch.Tensor, m: int, block_m: int) -> None:
        self.offs = offsets.to(torch.int32).contiguous()
        sizes = self.offs[1:] - self.offs[:-1]
        self.cum = torch.cumsum((sizes + block_m - 1) // block_m, 0, dtype=torch.int32)
        self.g = sizes.numel()
        self.log_g = max(1, math.ceil(math.log2(self.g + 1)))
        self.grid = (triton.cdiv(m, block_m) + self.g,)


def _interp(t: torch.Tensor) -> bool:
    return INTERPRET and t.device.type == "cpu"


def fused_expert_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                         offsets: torch.Tensor,
                         config: FusedExpertConfig | None = None) -> torch.Tensor:
    """Launch the forward kernel (no autograd)."""
    _check(x, w1, w2, offsets)
    g, d, f = w1.shape
    cfg = (config or FusedExpertConfig()).resolve(d, f)
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    y = torch.zeros((m, d), device=x.device, dtype=x.dtype)
    if m == 0 or g == 0:
        return y
    tiles = _Tiles(offsets, m, cfg.block_m)
    _fused_fwd[tiles.grid](
        x, w1, w2, y, tiles.offs, tiles.cum, g, d, f, x.stride(0), y.stride(0), *w1.stride(),
        *w2.stride(), LOG_G=tiles.log_g, D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_M=cfg.block_m, BLOCK_F=cfg.block_f, UPCAST=_interp(x),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return y


def fused_expert_backward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                          offsets: torch.Tensor, dy: torch.Tensor,
                          config: FusedExpertConfig | None = None):  # fmt: skip
    """Launch the backward kernels: (dx, dw1, dw2)."""
    g, d, f = w1.shape
    cfg = (config or FusedExpertConfig()).resolve(d, f)
    if dy.stride(1) != 1:
        dy = dy.contiguous()
    m = x.shape[0]
    dw1 = torch.empty((g, d, f), device=x.device, dtype=w1.dtype)
    dw2 = torch.empty((g, f, d), device=x.device, dtype=w2.dtype)
    if m == 0 or g == 0:
        return torch.zeros_like(x), dw1.zero_(), dw2.zero_()
    d_pad = max(16, triton.next_power_of_2(d))
    tiles = _Tiles(offsets, m, cfg.block_m)
    atomic = cfg.dx == "atomic"
    dx_acc = torch.zeros((m, d), device=x.device, dtype=torch.float32) if atomic else dw1
    _fused_bwd_dw[(g, f // cfg.dw_block_f)](
        x, dy, w1, w2, dw1, dw2, dx_acc, tiles.offs, d, f, x.stride(0), dy.stride(0),
        *w1.stride(), *w2.stride(), D_PAD=d_pad, BLOCK_M=cfg.dw_block_m, BLOCK_F=cfg.dw_block_f,
        UPCAST=_interp(x), ATOMIC_DX=atomic, NUM_STAGES=cfg.num_stages,
        num_warps=cfg.dw_warps,
    )  # fmt: skip
    if atomic:
        return dx_acc.to(x.dtype), dw1, dw2
    dx = torch.zeros_like(x)
    _fused_bwd_dx[tiles.grid](
        x, dy, w1, w2, dx, tiles.offs, tiles.cum, g, d, f, x.stride(0), dy.stride(0),
        dx.stride(0), *w1.stride(), *w2.stride(), LOG_G=tiles.log_g, D_PAD=d_pad,
        BLOCK_M=cfg.block_m, BLOCK_F=cfg.block_f, UPCAST=_interp(x),
        NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return dx, dw1, dw2


class _FusedExpertFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w1, w2, offsets, config):
        if x.stride(1) != 1:
            x = x.contiguous()
        ctx.save_for_backward(x, w1, w2, offsets)
        ctx.config = config
        return fused_expert_forward(x, w1, w2, offsets, config)

    @staticmethod
    def backward(ctx, dy):
        x, w1, w2, offsets = ctx.saved_tensors
        dx, dw1, dw2 = fused_expert_backward(x, w1, w2, offsets, dy, ctx.config)
        return dx, dw1, dw2, None, None


def fused_expert_reference(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
                           offsets: torch.Tensor) -> torch.Tensor:
    """Per-group torch: ``gelu(x[rows of g] @ w1[g]) @ w2[g]`` (exact GELU), zeros past the
    last group. Autograd by torch; float64 in, float64 math."""
    _check(x, w1, w2, offsets)
    offs = offsets.tolist()
    parts = [x.new_zeros((offs[0], x.shape[1]))]
    for g in range(w1.shape[0]):
        parts.append(F.gelu(x[offs[g]:offs[g + 1]] @ w1[g]) @ w2[g])
    parts.append(x.new_zeros((x.shape[0] - offs[-1], x.shape[1])))
    return torch.cat(parts)


def fused_expert(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, offsets: torch.Tensor,
                 config: FusedExpertConfig | None = None) -> torch.Tensor:
    """The fused GELU experts over row groups: see the module docstring. Differentiable."""
    _check(x, w1, w2, offsets)
    if not use_triton(x):
        return fused_expert_reference(x, w1, w2, offsets)
    if (x.requires_grad or w1.requires_grad or w2.requires_grad) and torch.is_grad_enabled():
        return _FusedExpertFn.apply(x, w1, w2, offsets, config)
    return fused_expert_forward(x, w1, w2, offsets, config)
