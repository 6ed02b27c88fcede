"""Grouped GEMM over variable group sizes: ``out[rows of g] = x[rows of g] @ w[g]``.

Public API
----------
``grouped_mm(x, w, offsets=None, *, group_sizes=None) -> out``

- ``x``: ``[M, K]`` bf16 (fp16 and fp32 work too), rows of group ``g`` are
  ``offsets[g] : offsets[g + 1]`` (the ``x_perm`` / ``offsets`` of ``kernels.permute.permute``).
- ``w``: ``[G, K, N]``, same dtype as ``x``; any strides (a transposed view is fine).
- ``offsets``: int ``[G + 1]`` with ``offsets[0] == 0``, non-decreasing, ``offsets[G] <= M``
  (rows past ``offsets[G]`` are left out of every group and get zeros in ``out``); or
  ``group_sizes``: int ``[G]`` (converted on the device, no host sync). Zero-sized groups are
  legal: they add no rows, and their weight gradient is zero.
- ``out``: ``[M, N]`` in ``x``'s dtype; products accumulate in fp32.

Differentiable in ``x`` and ``w`` (``torch.autograd.Function``): ``dX = dY @ w[g]^T`` runs on
the forward kernel with ``w``'s strides swapped; ``dW[g] = x[rows of g]^T @ dY[rows of g]`` is a
second kernel whose reduction runs over the group's rows.

Two forward kernels, picked per call (the launchers' ``kernel`` parameter, default "auto"):

- On Hopper (compute capability >= 9) a persistent kernel: one program per SM walks the list of
  output tiles of all groups, loading A and B tiles through TMA descriptors built on the device
  (``tl.make_tensor_descriptor``; the allocator is set at each launch) and storing whole tiles
  through TMA. It needs 16-byte aligned rows and all of ``w``'s groups in one 2-D view
  (``[G*K, N]`` with N contiguous and K a multiple of 64, or ``[G*N, K]`` with K contiguous);
  the launcher checks that. Autotuned over a few tile shapes, keyed on (N, K, G, M rounded up to
  a power of two, layout).
- Otherwise (older GPUs, odd strides, the CPU interpreter) a pointer-based kernel with one
  program per output tile.

How either finds its tile without a host sync: the program loads the G+1 offsets, computes
each group's row-tile count and their prefix sum in registers, and picks a tile's group by
counting prefix ends ``<= its row-tile index``. The pointer kernel's grid is sized for the worst
case, ``cdiv(M, BM) + G + 1`` row tiles, and surplus programs exit at once; row indices past a
group's end are clamped to the group's last row (not masked), so its main loop's loads are
unmasked, and those rows are dropped at the store. Rows past ``offsets[G]`` form a pseudo-group
whose tiles store zeros, so ``out`` needs no memset.

Assumptions (checked by the launcher): ``x`` and ``out`` have unit stride along their last
dimension; ``x.shape[1] == w.shape[1]``. Tiles are 128 wide (fp32 accumulator in registers),
tuned for Hopper; on other GPUs the pointer kernel runs, slower.
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from kernels.backend import INTERPRET, use_triton


def _tc_configs(stages: tuple[int, ...] = (3, 4)) -> list[triton.Config]:
    # Hand-picked Hopper candidates (wgmma wants BM a multiple of 64 and 4 or 8 warps);
    # a short list keeps the autotune compile time inside a device call.
    cfgs = []
    for bm, bn, bk, w in ((128, 128, 64, 8), (128, 256, 64, 8), (256, 128, 64, 8)):
        for s in stages:
            # Shared memory: (bm + bn) * bk * 2 B * stages must fit in 227 KB.
            if (bm + bn) * bk * 2 * s > 200 * 1024:
                continue
            cfgs.append(triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8},
                                      num_warps=w, num_stages=s))  # fmt: skip
    return cfgs


@triton.jit
def _gmm_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, G, M, N, K, stride_am, stride_ak, stride_bg,
                stride_bk, stride_bn, stride_cm, stride_cn, M_BUCKET, G_PAD: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
                UPCAST: tl.constexpr, EVEN_K: tl.constexpr, SMALL_N: tl.constexpr):  # fmt: skip
    """c[rows of g] = a[rows of g] @ b[g], b[g] is K x N (reduction over K)."""
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_m = tl.num_programs(0) // num_pid_n
    # Supertile order: GROUP_M row tiles walk the N tiles together, so a group's weight and
    # each A tile are reused from L2.
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    gm = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gm
    pid_n = (pid % width) // gm

    # Slot G is a pseudo-group for rows [offsets[G], M) that belong to no group: its tiles
    # write zeros, so `out` needs no memset beforehand.
    gi = tl.arange(0, G_PAD)
    starts = tl.load(offs_ptr + gi, mask=gi <= G, other=0)
    ends = tl.load(offs_ptr + gi + 1, mask=gi < G, other=0)
    ends = tl.where(gi == G, M, ends)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, axis=0)
    if pid_m >= tl.sum(tiles, axis=0):
        return
    g = tl.sum((cum <= pid_m).to(tl.int32), axis=0)
    sel = gi == g
    m_start = tl.sum(tl.where(sel, starts + (pid_m - (cum - tiles)) * BM, 0), axis=0)
    m_end = tl.sum(tl.where(sel, ends, 0), axis=0)

    # No per-element clamp or mask on N, which may be the contiguous dimension: either hides
    # its contiguity or adds predicates (seen: a clamp gave 89 TFLOP/s instead of 615 for
    # w[G, K, N]). The last N tile is shifted left to end at N instead, overlapping its
    # neighbour, and stores only its own columns. Rows are clamped to the group's last row
    # (A's rows are never contiguous) and dropped at the store.
    n_own = pid_n * BN
    if SMALL_N:
        n0 = 0
    else:
        n0 = tl.minimum(n_own, N - BN)
    rm = m_start + tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    n_ok = rn < N
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :] * stride_cn
    c_mask = (rm < m_end)[:, None] & (n_ok & (rn >= n_own))[None, :]
    if g == G:
        tl.store(c_ptrs, tl.zeros((BM, BN), c_ptr.dtype.element_ty), mask=c_mask)
        return

    rm_ld = tl.minimum(rm, m_end - 1).to(tl.int64)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm_ld[:, None] * stride_am + rk[None, :] * stride_ak
    b_ptrs = b_ptr + g.to(tl.int64) * stride_bg
    b_ptrs += rk[:, None] * stride_bk + rn[None, :] * stride_bn
    acc = tl.zeros((BM, BN), tl.float32)
    for k0 in range(0, K, BK):
        # Compile-time branches only: the loop body stays straight for the software pipeliner.
        if EVEN_K:
            a = tl.load(a_ptrs)
            if SMALL_N:
                b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
            else:
                b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0.0)
            b = tl.load(b_ptrs, mask=(rk[:, None] < K - k0) & n_ok[None, :], other=0.0)
        if UPCAST:
            # Only under TRITON_INTERPRET: its tl.dot multiplies bf16 bit patterns
            # (triton-lang/triton#11584), so the CPU tests feed it fp32 copies.
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        a_ptrs += BK * stride_ak
        b_ptrs += BK * stride_bk
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=c_mask)


@triton.jit
def _gmm_tma_kernel(a_ptr, b_ptr, c_ptr, offs_ptr, G, M, N, K, stride_am, stride_brow,
                    stride_cm, M_BUCKET, G_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                    BK: tl.constexpr, GROUP_M: tl.constexpr, B_KN: tl.constexpr,
                    EPI_SPLIT: tl.constexpr, FLATTEN: tl.constexpr,
                    UPCAST: tl.constexpr):  # fmt: skip
    """Persistent TMA variant of ``_gmm_kernel``: one program per SM walks the tile list.

    ``b`` is read through one 2-D descriptor over all groups: ``[G*K, N]`` when ``B_KN`` (each
    group's K x N block, N contiguous) or ``[G*N, K]`` (each group's b^T, K contiguous).
    A tile past a group's end reads the next group's rows (dropped at the store) or TMA's zero
    fill past the tensor; the launcher only takes this kernel when K % BK == 0 for ``B_KN``,
    so the reduction never reads past its group."""
    a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1],
                                       block_shape=[BM, BK])  # fmt: skip
    if B_KN:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[G * K, N], strides=[stride_brow, 1],
                                           block_shape=[BK, BN])  # fmt: skip
    else:
        b_desc = tl.make_tensor_descriptor(b_ptr, shape=[G * N, K], strides=[stride_brow, 1],
                                           block_shape=[BN, BK])  # fmt: skip
    c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, N], strides=[stride_cm, 1],
                                       block_shape=[BM, BN // EPI_SPLIT])  # fmt: skip

    # The tile list, as in _gmm_kernel: per-group row-tile counts and their prefix sums, in
    # registers for the whole kernel (slot G: rows past offsets[G], written as zeros).
    gi = tl.arange(0, G_PAD)
    starts = tl.load(offs_ptr + gi, mask=gi <= G, other=0)
    ends = tl.load(offs_ptr + gi + 1, mask=gi < G, other=0)
    ends = tl.where(gi == G, M, ends)
    tiles = (ends - starts + BM - 1) // BM
    cum = tl.cumsum(tiles, axis=0)
    num_pid_m = tl.sum(tiles, axis=0)
    num_pid_n = tl.cdiv(N, BN)
    num_tiles = num_pid_m * num_pid_n
    k_tiles = tl.cdiv(K, BK)
    width = GROUP_M * num_pid_n

    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), flatten=FLATTEN):
        # Supertile order (GROUP_M row tiles walk the N tiles together): the programs running
        # at once share a few A row blocks and one group's weights in L2.
        first_m = (tile // width) * GROUP_M
        gm = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % width) % gm
        pid_n = (tile % width) // gm
        before = cum <= pid_m
        g = tl.sum(before.to(tl.int32), axis=0)
        m_start = tl.load(offs_ptr + g) + (pid_m - tl.sum(tl.where(before, tiles, 0), axis=0)) * BM
        m_end = tl.load(offs_ptr + g + 1, mask=g < G, other=M)
        n0 = pid_n * BN
        acc = tl.zeros((BM, BN), tl.float32)
        for ki in range(k_tiles):
            k0 = ki * BK
            a = a_desc.load([m_start, k0])
            if B_KN:
                b = b_desc.load([g * K + k0, n0])
            else:
                b = b_desc.load([g * N + n0, k0]).T
            if UPCAST:
                # Interpreter only: its tl.dot multiplies bf16 bit patterns (see _gmm_kernel).
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc)
        # Slot G's B loads fall past the descriptor (zero fill); its A rows may hold anything,
        # so its tile is zeroed explicitly (0 * NaN is NaN).
        acc = tl.where(g < G, acc, 0.0)
        if EPI_SPLIT == 1:
            _gmm_tma_store(c_desc, c_ptr, acc, m_start, m_end, n0, N, stride_cm, BM, BN)
        else:
            # Two column halves: half the registers for the partial tile's pointers and half
            # the shared-memory staging for the TMA store.
            acc_lo, acc_hi = tl.split(tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1)))
            _gmm_tma_store(c_desc, c_ptr, acc_lo, m_start, m_end, n0, N, stride_cm, BM, BN // 2)
            _gmm_tma_store(c_desc, c_ptr, acc_hi, m_start, m_end, n0 + BN // 2, N, stride_cm, BM,
                           BN // 2)  # fmt: skip


@triton.jit
def _gmm_tma_store(c_desc, c_ptr, part, m_start, m_end, n0, N, stride_cm, BM: tl.constexpr,
                   BNP: tl.constexpr):  # fmt: skip
    val = part.to(c_ptr.dtype.element_ty)
    if m_start + BM <= m_end:
        # Whole tile inside the group: TMA store (clipped at N by the descriptor).
        c_desc.store([m_start, n0], val)
    else:
        # The group's last, partial tile: rows past its end belong to the next group.
        rm = m_start + tl.arange(0, BM)
        rn = n0 + tl.arange(0, BNP)
        c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
        tl.store(c_ptrs, val, mask=(rm < m_end)[:, None] & (rn < N)[None, :])


@triton.jit
def _gmm_dw_kernel(x_ptr, dy_ptr, dw_ptr, offs_ptr, K, N, stride_xm, stride_xk, stride_ym,
                   stride_yn, stride_wg, stride_wk, stride_wn, M_BUCKET, BM: tl.constexpr,
                   BN: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr,
                   SMALL_K: tl.constexpr, SMALL_N: tl.constexpr):  # fmt: skip
    """dw[g] (K x N) = x[rows of g]^T @ dy[rows of g]; BM tiles K, BK tiles the group's rows."""
    pid = tl.program_id(0)
    g = tl.program_id(1)
    num_pid_n = tl.cdiv(N, BN)
    pid_k = pid // num_pid_n
    pid_n = pid % num_pid_n
    start = tl.load(offs_ptr + g)
    end = tl.load(offs_ptr + g + 1)

    # K and N are the contiguous dimensions of x and dy: last tiles shift left (as in the
    # forward) so the main loop needs no mask at all.
    k_own = pid_k * BM
    n_own = pid_n * BN
    if SMALL_K:
        k0 = 0
    else:
        k0 = tl.minimum(k_own, K - BM)
    if SMALL_N:
        n0 = 0
    else:
        n0 = tl.minimum(n_own, N - BN)
    rk = k0 + tl.arange(0, BM)
    rn = n0 + tl.arange(0, BN)
    k_ok = rk < K
    n_ok = rn < N
    rr = tl.arange(0, BK)
    x_ptrs = x_ptr + (start + rr).to(tl.int64)[None, :] * stride_xm + rk[:, None] * stride_xk
    y_ptrs = dy_ptr + (start + rr).to(tl.int64)[:, None] * stride_ym + rn[None, :] * stride_yn
    acc = tl.zeros((BM, BN), tl.float32)
    # Full row chunks first; the group's tail rows (rows past `end` would add wrong terms, so
    # masking, not clamping) in one masked step after the loop.
    n_full = (end - start) // BK
    for _ in range(0, n_full):
        if SMALL_K:
            a = tl.load(x_ptrs, mask=k_ok[:, None], other=0.0)
        else:
            a = tl.load(x_ptrs)
        if SMALL_N:
            b = tl.load(y_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            b = tl.load(y_ptrs)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
        x_ptrs += BK * stride_xm
        y_ptrs += BK * stride_ym
    rem = end - start - n_full * BK
    if rem > 0:
        a = tl.load(x_ptrs, mask=k_ok[:, None] & (rr[None, :] < rem), other=0.0)
        b = tl.load(y_ptrs, mask=(rr[:, None] < rem) & n_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc)
    w_ptrs = dw_ptr + g.to(tl.int64) * stride_wg + rk[:, None] * stride_wk + rn[None, :] * stride_wn
    w_mask = (k_ok & (rk >= k_own))[:, None] & (n_ok & (rn >= n_own))[None, :]
    tl.store(w_ptrs, acc.to(dw_ptr.dtype.element_ty), mask=w_mask)


# Shape flags the kernels branch on at compile time, from the arguments and the tile config.
_gmm_heur = triton.heuristics(
    {"EVEN_K": lambda a: a["K"] % a["BK"] == 0, "SMALL_N": lambda a: a["N"] < a["BN"]}
)(_gmm_kernel)
_gmm_dw_heur = triton.heuristics(
    {"SMALL_K": lambda a: a["K"] < a["BM"], "SMALL_N": lambda a: a["N"] < a["BN"]}
)(_gmm_dw_kernel)
_gmm_tuned = triton.autotune(configs=_tc_configs(), key=["N", "K", "G_PAD", "M_BUCKET"])(_gmm_heur)


def _tma_configs() -> list[triton.Config]:
    # Hopper candidates for the persistent TMA kernel. N = 1408 = 11 x 128 favours BN = 128.
    # Shared memory = stages * (BM + BN) * BK * 2 B plus the epilogue's staging, under 227 KB.
    # All store the tile in two column halves: with one, 8 warps spill registers (the partial
    # tile's pointers). No loop flattening: Triton 3.6's TritonGPUFuseNestedLoops fails on
    # this kernel (seen on the H200, 2026-11-23); 632 TFLOP/s without it.
    cfgs = []
    shapes = ((128, 128, 8, 4), (128, 128, 8, 3), (128, 128, 8, 5), (256, 128, 8, 3),
              (128, 256, 8, 3), (128, 128, 4, 4))  # fmt: skip
    for bm, bn, warps, stages in shapes:
        meta = {"BM": bm, "BN": bn, "BK": 64, "GROUP_M": 8, "EPI_SPLIT": 2, "FLATTEN": False}
        cfgs.append(triton.Config(meta, num_warps=warps, num_stages=stages))
    return cfgs


TMA_CONFIGS = _tma_configs()
# Every TMA config reduces over K in steps of this (the launcher's K % BK check for B_KN).
_TMA_BK = 64
_TMA_KEY = ["N", "K", "G_PAD", "M_BUCKET", "B_KN"]
_gmm_tma_tuned = triton.autotune(configs=TMA_CONFIGS, key=_TMA_KEY)(_gmm_tma_kernel)
_gmm_dw_tuned = triton.autotune(
    configs=[
        triton.Config({"BM": bm, "BN": bn, "BK": 64}, num_warps=8, num_stages=s)
        for bm, bn, s in ((128, 128, 3), (128, 128, 4), (128, 256, 3), (256, 128, 3))
    ],
    key=["K", "N", "M_BUCKET"],
)(_gmm_dw_heur)


def _m_bucket(m: int) -> int:
    """Autotune key for the row count: one tuning per power of two, not per batch size
    (``M_BUCKET`` is unused inside the kernels)."""
    return triton.next_power_of_2(max(m, 1))


# Small tiles for the interpreter: it runs every program in numpy, and the CPU tests only need
# several tiles per group and several reduction steps to exercise the indexing.
_INTERP_TILES = {"BM": 16, "BN": 16, "BK": 16}


# Which forward kernel runs (the launchers' `kernel`): "auto" takes the persistent TMA kernel on
# CUDA GPUs of compute capability >= 9 (Hopper) whenever the operands allow it, and the pointer
# kernel otherwise (always under the interpreter); "tma" and "pointer" force one.
KERNELS = ("auto", "tma", "pointer")
HAS_TMA = hasattr(tl, "make_tensor_descriptor")


def _tma_alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
    # Global scratch for the descriptors the kernel builds on the device (128 B each).
    return torch.empty(size, device="cuda", dtype=torch.int8)


def _num_sms(dev: torch.device) -> int:
    if dev.type != "cuda":
        return 4
    return torch.cuda.get_device_properties(dev).multi_processor_count


def _tma_operands(a: torch.Tensor, b: torch.Tensor, sb: tuple[int, int, int], n: int,
                  out: torch.Tensor, bk: int) -> tuple[bool, int] | None:  # fmt: skip
    """``(B_KN, row stride of b's 2-D view)`` if TMA can read these operands, else None.

    TMA wants 16-byte aligned bases and row strides and a unit last stride; all groups of
    ``b`` must form one 2-D tensor (``[G*K, N]`` or ``[G*N, K]``)."""
    if not HAS_TMA:
        return None
    esz = a.element_size()
    k = a.shape[1]

    def al(v: int) -> bool:
        return v % 16 == 0

    if a.stride(1) != 1 or out.stride(1) != 1:
        return None
    if not (al(a.data_ptr()) and al(a.stride(0) * esz) and al(b.data_ptr())
            and al(out.data_ptr()) and al(out.stride(0) * esz)):  # fmt: skip
        return None
    sg, sk, sn = sb
    g = b.shape[0]
    if sn == 1 and (g == 1 or sg == k * sk) and al(sk * esz) and k % bk == 0:
        return True, sk
    if sk == 1 and (g == 1 or sg == n * sn) and al(sn * esz):
        return False, sn
    return None


# Set to the error if the TMA kernel failed to build here; "auto" then stays on the pointer kernel.
_TMA_BROKEN: str | None = None


def _tma_broken(exc: Exception) -> None:
    global _TMA_BROKEN
    _TMA_BROKEN = f"{type(exc).__name__}: {str(exc)[:300]}"
    warnings.warn(f"grouped_mm: TMA kernel unavailable, using the pointer kernel ({_TMA_BROKEN})",
                  stacklevel=3)  # fmt: skip


def _use_tma(a: torch.Tensor, kernel: str) -> bool:
    if kernel == "pointer":
        return False
    if kernel == "tma":
        return True
    return (a.device.type == "cuda" and not INTERPRET
            and torch.cuda.get_device_capability(a.device)[0] >= 9)  # fmt: skip


def _mm_launch(a: torch.Tensor, b: torch.Tensor, sb: tuple[int, int, int], n: int,
               offsets: torch.Tensor, config: triton.Config | None = None,
               kernel: str = "auto") -> torch.Tensor:  # fmt: skip
    """out[M, n] = a @ b[g] per group, with b given as (ptr tensor, strides (g, k, n)).

    ``config`` pins one TMA config instead of the autotuner's pick (for the benchmark);
    ``kernel`` picks the forward kernel (KERNELS)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    m, k = a.shape
    g = offsets.numel() - 1
    out = torch.empty((m, n), device=a.device, dtype=a.dtype)
    if m == 0 or n == 0:
        return out
    if g == 0 or k == 0:
        return out.zero_()
    g_pad = triton.next_power_of_2(g + 1)
    interp = INTERPRET and a.device.type == "cpu"
    tma = None
    # The TMA configs are sized for 2-byte operands (fp32 would overflow shared memory).
    if interp or a.element_size() == 2:
        tma = _tma_operands(a, b, sb, n, out, _INTERP_TILES["BK"] if interp else _TMA_BK)
    if tma is not None and _use_tma(a, kernel) and (_TMA_BROKEN is None or kernel == "tma"):
        b_kn, b_row = tma
        triton.set_allocator(_tma_alloc)  # a context variable: set on every launching thread
        args = (a, b, out, offsets, g, m, n, k, a.stride(0), b_row, out.stride(0), _m_bucket(m))
        nsm = _num_sms(a.device)

        def tgrid(meta):
            upper = (triton.cdiv(m, meta["BM"]) + g + 1) * triton.cdiv(n, meta["BN"])
            return (min(nsm, upper),)

        if interp:
            # Split epilogue and no flattening: the interpreter runs both code paths the same.
            _gmm_tma_kernel[tgrid({**_INTERP_TILES})](*args, G_PAD=g_pad, GROUP_M=2, B_KN=b_kn,
                                                      EPI_SPLIT=2, FLATTEN=False, UPCAST=True,
                                                      **_INTERP_TILES)  # fmt: skip
        elif config is not None:
            _gmm_tma_kernel[tgrid(config.kwargs)](*args, G_PAD=g_pad, B_KN=b_kn, UPCAST=False,
                                                  num_warps=config.num_warps,
                                                  num_stages=config.num_stages,
                                                  **config.kwargs)  # fmt: skip
        else:
            try:
                _gmm_tma_tuned[tgrid](*args, G_PAD=g_pad, B_KN=b_kn, UPCAST=False)
            except Exception as exc:  # a Triton that cannot build it: keep the pointer kernel
                if kernel == "tma":
                    raise
                _tma_broken(exc)
                return _mm_launch(a, b, sb, n, offsets, kernel=kernel)
        return out
    args = (a, b, out, offsets, g, m, n, k, a.stride(0), a.stride(1), *sb, out.stride(0),
            out.stride(1), _m_bucket(m))  # fmt: skip
    if interp:
        bm = _INTERP_TILES["BM"]
        grid = ((triton.cdiv(m, bm) + g + 1) * triton.cdiv(n, _INTERP_TILES["BN"]),)
        _gmm_heur[grid](*args, G_PAD=g_pad, GROUP_M=2, UPCAST=True, **_INTERP_TILES)
    else:

        def grid(meta):
            return ((triton.cdiv(m, meta["BM"]) + g + 1) * triton.cdiv(n, meta["BN"]),)

        _gmm_tuned[grid](*args, G_PAD=g_pad, UPCAST=False)
    return out


def _dw_launch(x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor,
               like: torch.Tensor) -> torch.Tensor:  # fmt: skip
    g = offsets.numel() - 1
    k, n = x.shape[1], dy.shape[1]
    dw = torch.empty((g, k, n), device=x.device, dtype=like.dtype)
    if g == 0 or k == 0 or n == 0:
        return dw
    args = (x, dy, dw, offsets, k, n, x.stride(0), x.stride(1), dy.stride(0), dy.stride(1),
            dw.stride(0), dw.stride(1), dw.stride(2), _m_bucket(x.shape[0]))  # fmt: skip
    if INTERPRET and x.device.type == "cpu":
        t = _INTERP_TILES
        grid = (triton.cdiv(k, t["BM"]) * triton.cdiv(n, t["BN"]), g)
        _gmm_dw_heur[grid](*args, UPCAST=True, **t)
    else:

        def grid(meta):
            return (triton.cdiv(k, meta["BM"]) * triton.cdiv(n, meta["BN"]), g)

        _gmm_dw_tuned[grid](*args, UPCAST=False)
    return dw


def grouped_mm_forward(x: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                       config: triton.Config | None = None,
                       kernel: str = "auto") -> torch.Tensor:  # fmt: skip
    """Triton forward (no autograd). ``config``: pin a TMA config; ``kernel``: KERNELS."""
    return _mm_launch(x, w, (w.stride(0), w.stride(1), w.stride(2)), w.shape[2], offsets, config,
                      kernel)  # fmt: skip


def grouped_mm_dx(dy: torch.Tensor, w: torch.Tensor, offsets: torch.Tensor,
                  config: triton.Config | None = None,
                  kernel: str = "auto") -> torch.Tensor:  # fmt: skip
    """Triton ``dX = dY @ w[g]^T`` per group: the forward kernel on ``w`` with K and N swapped."""
    return _mm_launch(dy, w, (w.stride(0), w.stride(2), w.stride(1)), w.shape[1], offsets,
                      config, kernel)  # fmt: skip


def grouped_mm_dw(
    x: torch.Tensor, dy: torch.Tensor, offsets: torch.Tensor, like: torch.Tensor
) -> torch.Tensor:
    """Triton ``dW[g] = x[rows of g]^T @ dY[rows of g]`` in ``like``'s dtype (zeros for empty g)."""
    return _dw_launch(x, dy, offsets, like)


def _offsets_of(
    g: int, offsets: torch.Tensor | None, group_sizes: torch.Tensor | None, device: torch.device
) -> torch.Tensor:
    if (offsets is None) == (group_sizes is None):
        raise ValueError("pass exactly one of offsets [G+1] and group_sizes [G]")
    if offsets is None:
        assert group_sizes is not None
        if group_sizes.shape != (g,):
            raise ValueError(f"group_sizes must be [G={g}], got {tuple(group_sizes.shape)}")
        offsets = torch.zeros(g + 1, device=device, dtype=torch.int32)
        torch.cumsum(group_sizes.to(device), 0, out=offsets[1:])
    elif offsets.shape != (g + 1,):
        raise ValueError(f"offsets must be [G+1={g + 1}], got {tuple(offsets.shape)}")
    return offsets.to(device=device, dtype=torch.int32).contiguous()


def grouped_mm_reference(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    group_sizes: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pure torch: one ``mm`` per group (reads the offsets on the host). Autograd by torch.

    Accumulates in the input's precision path of ``torch.mm`` (float64 for float64 input)."""
    offs = _offsets_of(w.shape[0], offsets, group_sizes, x.device).tolist()
    parts = [x.new_zeros((offs[0], w.shape[2]))]
    for g in range(w.shape[0]):
        parts.append(x[offs[g] : offs[g + 1]] @ w[g])
    parts.append(x.new_zeros((x.shape[0] - offs[-1], w.shape[2])))
    return torch.cat(parts, dim=0)


class _GroupedMMFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, offsets, kernel):
        ctx.save_for_backward(x, w, offsets)
        ctx.kernel = kernel
        return grouped_mm_forward(x, w, offsets, kernel=kernel)

    @staticmethod
    def backward(ctx, dy):
        x, w, offsets = ctx.saved_tensors
        if dy.stride(1) != 1:
            dy = dy.contiguous()
        dx = grouped_mm_dx(dy, w, offsets, kernel=ctx.kernel) if ctx.needs_input_grad[0] else None
        dw = grouped_mm_dw(x, dy, offsets, w) if ctx.needs_input_grad[1] else None
        return dx, dw, None, None


def grouped_mm(
    x: torch.Tensor,
    w: torch.Tensor,
    offsets: torch.Tensor | None = None,
    *,
    group_sizes: torch.Tensor | None = None,
    kernel: str = "auto",
) -> torch.Tensor:
    """Grouped ``x @ w[g]`` over row groups: see the module docstring. Differentiable.
    ``kernel``: which forward kernel (KERNELS: "auto", "tma", "pointer")."""
    if x.dim() != 2 or w.dim() != 3 or x.shape[1] != w.shape[1]:
        raise ValueError(f"need x [M, K] and w [G, K, N], got {tuple(x.shape)}, "
                         f"{tuple(w.shape)}")  # fmt: skip
    if x.dtype != w.dtype:
        raise TypeError(f"x and w dtypes differ: {x.dtype} vs {w.dtype}")
    if not use_triton(x):
        return grouped_mm_reference(x, w, offsets, group_sizes=group_sizes)
    offs = _offsets_of(w.shape[0], offsets, group_sizes, x.device)
    if x.stride(1) != 1:
        x = x.contiguous()
    if (x.requires_grad or w.requires_grad) and torch.is_grad_enabled():
        return _GroupedMMFn.apply(x, w, offs, kernel)
    return grouped_mm_forward(x, w, offs, kernel=kernel)
