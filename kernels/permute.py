"""Permute: copy each token's row to its k experts' slots, expert-contiguous (or rank-contiguous).

Public API
----------
``permute(x, experts, num_experts, bucket_of=None, num_buckets=None)
-> Permuted(x_perm, row_map, offsets)``

- ``x``: ``[T, D]``, any dtype, rows contiguous (``x.stride(1) == 1``).
- ``experts``: int ``[T, k]`` (int32 or int64) expert ids in ``[0, num_experts)``, as returned by
  ``kernels.router.route``. For Multi-Head LatentMoE flatten the heads first: sub-tokens
  ``x.reshape(T * H, d_h)`` with ``experts.reshape(T * H, k)`` (offset ids by ``h * E`` to keep
  the heads' experts apart).
- ``bucket_of`` (optional): int ``[num_experts]`` mapping each expert to the bucket its rows are
  sorted by, in ``[0, num_buckets)``. Default: the identity (expert-contiguous order). For an EP
  dispatch buffer that is rank-contiguous pass ``bucket_of = rank_of_expert * E_local +
  local_index``: rows come out rank-major, expert-minor, and rank ``r`` owns rows
  ``offsets[r * E_local] : offsets[(r + 1) * E_local]``. ``bucket_of = rank_of_expert`` with
  ``num_buckets = R`` gives rank-contiguous order alone.
- ``x_perm``: ``[T * k, D]``, same dtype as ``x``. Rows of bucket ``b`` are
  ``offsets[b] : offsets[b + 1]``; within a bucket they keep token order (then slot order), so
  the permutation is deterministic and equal to a stable sort of the bucket keys.
- ``row_map``: int32 ``[T, k]``: ``x_perm[row_map[t, j]] == x[t]``. It is what
  ``kernels.combine.combine`` takes to bring expert outputs back.
- ``offsets``: int32 ``[num_buckets + 1]``, ``offsets[0] == 0``, ``offsets[-1] == T * k``
  (``offsets[1:]`` is the ``offs`` argument of ``torch._grouped_mm``).

Differentiable in ``x`` (the backward sums each token's k row gradients, with the combine kernel).

How: three small launches build ``row_map`` without any host sync (a counting sort: per-block
bucket histograms, one program per bucket scanning its column into per-block bases, then
per-block ranks, which also write the offsets); one launch copies rows, reading each token row
once and writing it k times.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.backend import INTERPRET, use_triton


class Permuted(NamedTuple):
    x_perm: torch.Tensor
    row_map: torch.Tensor
    offsets: torch.Tensor


@triton.jit
def _bucket_onehot(e_ptr, map_ptr, b, N, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                   HAS_MAP: tl.constexpr):  # fmt: skip
    i = b * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = i < N
    key = tl.load(e_ptr + i, mask=ok, other=0)
    if HAS_MAP:
        key = tl.load(map_ptr + key, mask=ok, other=0)
    onehot = (key[:, None] == tl.arange(0, BLOCK_B)[None, :]) & ok[:, None]
    return i, ok, onehot.to(tl.int32)


@triton.jit
def _hist_kernel(e_ptr, map_ptr, hist_ptr, N, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
                 HAS_MAP: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    _, _, onehot = _bucket_onehot(e_ptr, map_ptr, b, N, BLOCK_N, BLOCK_B, HAS_MAP)
    tl.store(hist_ptr + b * BLOCK_B + tl.arange(0, BLOCK_B), tl.sum(onehot, axis=0))


@triton.jit
def _scan_kernel(hist_ptr, totals_ptr, NB, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr):
    # One program per bucket scans that bucket's column of block counts, in place, into the
    # row each block starts at within the bucket (one program over the whole table was
    # latency-bound: 90 us of a 750 us permute on an H200).
    e = tl.program_id(0)
    run = tl.zeros((), tl.int32)
    for c in range(0, NB, CHUNK):
        r = c + tl.arange(0, CHUNK)
        ptrs = hist_ptr + r * BLOCK_B + e
        col = tl.load(ptrs, mask=r < NB, other=0)
        tl.store(ptrs, tl.cumsum(col, axis=0) - col + run, mask=r < NB)
        run += tl.sum(col, axis=0)
    tl.store(totals_ptr + e, run)


@triton.jit
def _rank_kernel(e_ptr, map_ptr, base_ptr, totals_ptr, row_map_ptr, offsets_ptr, N, B,
                 BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, HAS_MAP: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    i, ok, onehot = _bucket_onehot(e_ptr, map_ptr, b, N, BLOCK_N, BLOCK_B, HAS_MAP)
    cols = tl.arange(0, BLOCK_B)
    totals = tl.load(totals_ptr + cols)
    ends = tl.cumsum(totals, axis=0)
    if b == 0:
        tl.store(offsets_ptr + 1 + cols, ends, mask=cols < B)
        tl.store(offsets_ptr + cols, tl.zeros((BLOCK_B,), tl.int32), mask=cols == 0)
    rank = tl.cumsum(onehot, axis=0) - onehot
    base = tl.load(base_ptr + b * BLOCK_B + cols) + ends - totals
    dest = tl.sum(tl.where(onehot != 0, rank + base[None, :], 0), axis=1)
    tl.store(row_map_ptr + i, dest, mask=ok)


@triton.jit
def _scatter_rows_kernel(x_ptr, row_map_ptr, scale_ptr, out_ptr, D, stride_x, stride_out,
                         K: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
                         HAS_SCALE: tl.constexpr):  # fmt: skip
    # One program per token: its row is read once and written to its K slots (optionally
    # scaled, for the combine backward), so HBM sees T*D reads and T*K*D writes, the minimum.
    t = tl.program_id(0).to(tl.int64)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        if EVEN_D:
            v = tl.load(x_ptr + t * stride_x + cols)
        else:
            v = tl.load(x_ptr + t * stride_x + cols, mask=cols < D)
        for j in tl.static_range(K):
            r = tl.load(row_map_ptr + t * K + j).to(tl.int64)
            if HAS_SCALE:
                s = tl.load(scale_ptr + t * K + j).to(tl.float32)
                val = (v.to(tl.float32) * s).to(out_ptr.dtype.element_ty)
            else:
                val = v.to(out_ptr.dtype.element_ty)
            if EVEN_D:
                tl.store(out_ptr + r * stride_out + cols, val)
            else:
                tl.store(out_ptr + r * stride_out + cols, val, mask=cols < D)


def row_block(d: int, elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_D, num_warps) for the row kernels: up to 16 KiB of a row per step, 16-byte
    accesses, at most 64 bytes in flight per thread."""
    block_d = min(triton.next_power_of_2(max(d, 1)), 16384 // elem_bytes)
    num_warps = max(1, min(8, block_d * elem_bytes // (32 * 64)))
    return block_d, num_warps


def scatter_rows(
    x: torch.Tensor,
    row_map: torch.Tensor,
    out: torch.Tensor,
    scale: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> torch.Tensor:
    """``out[row_map[t, j]] = x[t] (* scale[t, j])`` with the Triton kernel. Returns ``out``.

    ``num_warps`` overrides the default launch shape (for the benchmark's sweep)."""
    t, d = x.shape
    k = row_map.shape[1]
    if t == 0 or d == 0:
        return out
    assert x.stride(1) == 1 and out.stride(1) == 1 and row_map.is_contiguous()
    block_d, warps = row_block(d, x.element_size())
    warps = num_warps or warps
    _scatter_rows_kernel[(t,)](
        x, row_map, scale if scale is not None else row_map, out, d, x.stride(0), out.stride(0),
        K=k, BLOCK_D=block_d, EVEN_D=d % block_d == 0, HAS_SCALE=scale is not None,
        num_warps=warps,
    )  # fmt: skip
    return out


def _check(x: torch.Tensor, experts: torch.Tensor, num_buckets: int) -> None:
    if x.dim() != 2 or experts.dim() != 2 or experts.shape[0] != x.shape[0]:
        raise ValueError(f"need x [T, D] and experts [T, k], got {tuple(x.shape)}, "
                         f"{tuple(experts.shape)}")  # fmt: skip
    if experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"experts must be int32 or int64, got {experts.dtype}")
    if num_buckets < 1:
        raise ValueError(f"need at least one bucket, got {num_buckets}")


def permute_indices(
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None = None,
    num_buckets: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_map, offsets)`` of ``permute`` without moving any rows (Triton, no host sync)."""
    nb_keys = num_experts if num_buckets is None else num_buckets
    t, k = experts.shape
    n = t * k
    dev = experts.device
    flat = experts.contiguous()
    block_b = triton.next_power_of_2(nb_keys)
    # The one-hot tile is BLOCK_N x BLOCK_B int32: keep it at 16k values.
    block_n = max(16, min(1024, 16384 // block_b))
    nblocks = max(1, triton.cdiv(n, block_n))
    hist = torch.empty((nblocks, block_b), device=dev, dtype=torch.int32)
    totals = torch.empty(block_b, device=dev, dtype=torch.int32)
    offsets = torch.empty(nb_keys + 1, device=dev, dtype=torch.int32)
    row_map = torch.empty((t, k), device=dev, dtype=torch.int32)
    bmap = bucket_of.contiguous() if bucket_of is not None else flat
    has_map = bucket_of is not None
    _hist_kernel[(nblocks,)](flat, bmap, hist, n, BLOCK_N=block_n, BLOCK_B=block_b,
                             HAS_MAP=has_map, num_warps=4)  # fmt: skip
    chunk = min(triton.next_power_of_2(nblocks), 2048 if not INTERPRET else 4)
    _scan_kernel[(block_b,)](hist, totals, nblocks, BLOCK_B=block_b, CHUNK=chunk, num_warps=4)
    _rank_kernel[(nblocks,)](flat, bmap, hist, totals, row_map, offsets, n, nb_keys,
                             BLOCK_N=block_n, BLOCK_B=block_b, HAS_MAP=has_map,
                             num_warps=4)  # fmt: skip
    return row_map, offsets


def permute_reference(
    x: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None = None,
    num_buckets: int | None = None,
) -> Permuted:
    """Pure-torch permute: a stable sort of the bucket keys. Differentiable through torch."""
    nb_keys = num_experts if num_buckets is None else num_buckets
    _check(x, experts, nb_keys)
    t, k = experts.shape
    keys = experts.reshape(-1).long()
    if bucket_of is not None:
        keys = bucket_of.long()[keys]
    order = torch.sort(keys, stable=True).indices
    row_map = torch.empty(t * k, dtype=torch.int64, device=x.device)
    row_map[order] = torch.arange(t * k, device=x.device)
    counts = torch.bincount(keys, minlength=nb_keys)
    offsets = torch.zeros(nb_keys + 1, dtype=torch.int64, device=x.device)
    offsets[1:] = torch.cumsum(counts, 0)
    x_perm = x[torch.div(order, k, rounding_mode="floor")]
    return Permuted(x_perm, row_map.view(t, k).int(), offsets.int())


class _PermuteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, experts, num_experts, bucket_of, num_buckets):
        row_map, offsets = permute_indices(experts, num_experts, bucket_of, num_buckets)
        x_perm = torch.empty((row_map.numel(), x.shape[1]), device=x.device, dtype=x.dtype)
        scatter_rows(x, row_map, x_perm)
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(row_map, offsets)
        return x_perm, row_map, offsets

    @staticmethod
    def backward(ctx, grad_perm, _g_map, _g_off):
        from kernels.combine import gather_reduce  # combine imports this module

        (row_map,) = ctx.saved_tensors
        return gather_reduce(grad_perm.contiguous(), row_map, None), None, None, None, None


def permute(
    x: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None = None,
    num_buckets: int | None = None,
) -> Permuted:
    """Permute token rows into bucket-contiguous order: see the module docstring."""
    nb_keys = num_experts if num_buckets is None else num_buckets
    _check(x, experts, nb_keys)
    if not use_triton(x):
        return permute_reference(x, experts, num_experts, bucket_of, num_buckets)
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.requires_grad and torch.is_grad_enabled():
        return Permuted(*_PermuteFn.apply(x, experts, num_experts, bucket_of, num_buckets))
    # Inference path: no autograd node (its host overhead shows next to a ~0.1 ms launch chain).
    row_map, offsets = permute_indices(experts, num_experts, bucket_of, num_buckets)
    x_perm = torch.empty((row_map.numel(), x.shape[1]), device=x.device, dtype=x.dtype)
    return Permuted(scatter_rows(x, row_map, x_perm), row_map, offsets)
