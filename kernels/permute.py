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

How: two launches, no host sync. The first builds the counting sort's bases: per chunk of
~256 keys (whole tokens), how many keys of each bucket come before it (counted with L2 atomics);
its last program (an atomic ticket) scans the per-program totals into absolute bases and writes
``offsets``. The second runs one program per token: it ranks the token's k keys among the
earlier keys of its chunk (at most ~256, read from L2), writes ``row_map`` and copies the row,
reading it once and writing it k times (stores marked evict-first). On Hopper the second is a
programmatic dependent launch of the first: its programs start while the index launch runs,
load their rows and rank their keys, and wait for the index launch's results only before
reading the bases. (The earlier versions took three index launches, ~53 us on an H200, then one
index launch of ~29 us and no overlap; docs/benchmarks.md has the figures.)
"""

from __future__ import annotations

from dataclasses import dataclass
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
def _bucket_keys(e_ptr, map_ptr, i, ok, HAS_MAP: tl.constexpr):
    """Bucket of each flat assignment index ``i`` (expert id, or ``bucket_of[expert]``)."""
    key = tl.load(e_ptr + i, mask=ok, other=0)
    if HAS_MAP:
        key = tl.load(map_ptr + key, mask=ok, other=0)
    return key.to(tl.int32)


@triton.jit
def _index_kernel(e_ptr, map_ptr, local_ptr, super_ptr, offsets_ptr, ticket_ptr, N, B, NCHUNK,
                  NCS, NS, CH: tl.constexpr, CH_PAD: tl.constexpr, NCS_T: tl.constexpr,
                  BB: tl.constexpr, BBB: tl.constexpr, NS_PAD: tl.constexpr, BBS: tl.constexpr,
                  HAS_MAP: tl.constexpr, PDL: tl.constexpr):  # fmt: skip
    # Counting sort, bases only, in one launch. The keys are cut into chunks of CH keys (whole
    # tokens), chunks into NS superchunks of NCS chunks, one program each. A program writes,
    # for each of its chunks, how many keys of each bucket its superchunk holds before that
    # chunk (`local`), and its superchunk's bucket totals (`super`). The last program to finish
    # (an atomic ticket; no spin-wait, so any grid size and the interpreter are safe) scans the
    # small [NS, B] totals into absolute superchunk bases and writes `offsets`. The copy kernel
    # adds the rank inside a chunk, so no launch ever ranks all keys.
    if PDL == 1:
        # Let the copy kernel (launched as a programmatic dependent) start now: its programs
        # load their rows and rank their keys, which need nothing from this launch, then wait
        # (gdc_wait) for this whole grid to finish and flush before they read the bases.
        tl.extra.cuda.gdc_launch_dependents()
    s = tl.program_id(0)
    c_lo = s * NCS
    c_hi = tl.minimum(c_lo + NCS, NCHUNK)
    rows = tl.arange(0, NCS_T)
    kk = tl.arange(0, CH_PAD)
    # Count with one relaxed atomic per key into this program's own rows of `local` (L2
    # atomics, in place of a [keys x buckets] one-hot whose reductions were most of this
    # launch's time), then turn the counts into exclusive prefixes over the chunks in place.
    # A CTA barrier separates the phases (the accesses before it are performed for the whole
    # CTA after it); the counts are zeroed and read back at L2 (atomics, .cg loads).
    for b0 in tl.static_range(0, BB, BBB):
        bcols = b0 + tl.arange(0, BBB)
        for c0 in range(c_lo, c_hi, NCS_T):
            c = c0 + rows
            tl.atomic_xchg(local_ptr + c[:, None] * BB + bcols[None, :], 0,
                           mask=(c < c_hi)[:, None], sem="relaxed")  # fmt: skip
    tl.debug_barrier()
    for c0 in range(c_lo, c_hi, NCS_T):
        c = c0 + rows
        i = c[:, None] * CH + kk[None, :]
        ok = (c < c_hi)[:, None] & (kk[None, :] < CH) & (i < N)
        key = _bucket_keys(e_ptr, map_ptr, i, ok, HAS_MAP)
        tl.atomic_add(local_ptr + c[:, None] * BB + key, 1, mask=ok, sem="relaxed")
    tl.debug_barrier()
    for b0 in tl.static_range(0, BB, BBB):
        bcols = b0 + tl.arange(0, BBB)
        carry = tl.zeros((BBB,), tl.int32)
        for c0 in range(c_lo, c_hi, NCS_T):
            c = c0 + rows
            c_ok = c < c_hi
            ptrs = local_ptr + c[:, None] * BB + bcols[None, :]
            h = tl.load(ptrs, mask=c_ok[:, None], other=0, cache_modifier=".cg")
            before = tl.cumsum(h, axis=0) - h + carry[None, :]
            tl.debug_barrier()  # every thread has read the tile before any overwrites it
            tl.store(ptrs, before, mask=c_ok[:, None])
            carry += tl.sum(h, axis=0)
        tl.store(super_ptr + s * BB + bcols, carry)
    if PDL == 2:
        # (The later trigger: the copy kernel starts once every program has counted its keys.)
        tl.extra.cuda.gdc_launch_dependents()

    # Every thread's stores above, then one release by the program (the scalar atomic runs on
    # one thread; the barrier orders the others' stores before it, as CUTLASS's semaphores do).
    tl.debug_barrier()
    done = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if done == NS - 1:
        srow = tl.arange(0, NS_PAD)
        s_ok = srow[:, None] < NS
        run = tl.zeros((), tl.int32)
        # (New names in this branch: a compiled `if` may not change an outer variable's shape.)
        for s0 in tl.static_range(0, BB, BBS):
            scols = s0 + tl.arange(0, BBS)
            ptrs = super_ptr + srow[:, None] * BB + scols[None, :]
            # .cg: read from L2, where the other programs' stores landed, never a stale L1 line.
            tab = tl.load(ptrs, mask=s_ok, other=0, cache_modifier=".cg")
            tot = tl.sum(tab, axis=0)
            ends = tl.cumsum(tot, axis=0) + run
            tl.store(ptrs, tl.cumsum(tab, axis=0) - tab + (ends - tot)[None, :], mask=s_ok)
            tl.store(offsets_ptr + 1 + scols, ends, mask=scols < B)
            run += tl.sum(tot, axis=0)
        tl.store(offsets_ptr, 0)
        # Every program has taken its ticket: reset it for the next call on this stream.
        tl.atomic_xchg(ticket_ptr, 0)


@triton.jit
def _permute_rows_kernel(x_ptr, e_ptr, map_ptr, local_ptr, super_ptr, row_map_ptr, out_ptr, N, D,
                         NCS, stride_x, stride_out, K: tl.constexpr, K_PAD: tl.constexpr,
                         TOKC: tl.constexpr, CH_PAD: tl.constexpr, BB: tl.constexpr,
                         BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr, ONE_BLOCK: tl.constexpr,
                         COPY: tl.constexpr, HAS_MAP: tl.constexpr, PDL: tl.constexpr,
                         EVICT: tl.constexpr):  # fmt: skip
    # One program per token: it finds its k destinations (superchunk base + chunk base + rank
    # among the earlier keys of its chunk, at most CH_PAD of them, all in L2), writes them to
    # row_map, and copies its row there: T*D reads and T*k*D writes, the minimum.
    t = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    if COPY:
        if ONE_BLOCK:
            # Issued first: the row does not depend on the index; its latency covers the ranks.
            if EVEN_D:
                v = tl.load(x_ptr + t * stride_x + cols)
            else:
                v = tl.load(x_ptr + t * stride_x + cols, mask=cols < D)
    c = t // TOKC
    s = c // NCS
    jj = tl.arange(0, K_PAD)
    own = t * K + jj
    own_ok = jj < K
    b = _bucket_keys(e_ptr, map_ptr, own, own_ok, HAS_MAP)
    w = c * (TOKC * K) + tl.arange(0, CH_PAD)
    wkey = _bucket_keys(e_ptr, map_ptr, w, w < t * K + (K - 1), HAS_MAP)
    # Stable order: a key's rank counts the same-bucket keys before it in its chunk (earlier
    # tokens, then earlier slots of its own token).
    same = (w[None, :] < own[:, None]) & (wkey[None, :] == b[:, None])
    rank = tl.sum(same.to(tl.int32), axis=1)
    if PDL:
        # Everything above reads only x and the keys (written before the index launch began);
        # the bases below are the index launch's output.
        tl.extra.cuda.gdc_wait()
    base = tl.load(super_ptr + s * BB + b, mask=own_ok, other=0)
    base += tl.load(local_ptr + c * BB + b, mask=own_ok, other=0)
    dest = base + rank
    tl.store(row_map_ptr + own, dest, mask=own_ok)
    if COPY:
        if ONE_BLOCK:
            for j in tl.static_range(K):
                r = tl.sum(tl.where(jj == j, dest, 0), axis=0).to(tl.int64)
                val = v.to(out_ptr.dtype.element_ty)
                if EVEN_D:
                    tl.store(out_ptr + r * stride_out + cols, val, eviction_policy=EVICT)
                else:
                    tl.store(out_ptr + r * stride_out + cols, val, mask=cols < D,
                             eviction_policy=EVICT)  # fmt: skip
        else:
            for d0 in range(0, D, BLOCK_D):
                dc = d0 + cols
                if EVEN_D:
                    v = tl.load(x_ptr + t * stride_x + dc)
                else:
                    v = tl.load(x_ptr + t * stride_x + dc, mask=dc < D)
                for j in tl.static_range(K):
                    r = tl.sum(tl.where(jj == j, dest, 0), axis=0).to(tl.int64)
                    if EVEN_D:
                        tl.store(out_ptr + r * stride_out + dc, v, eviction_policy=EVICT)
                    else:
                        tl.store(out_ptr + r * stride_out + dc, v, mask=dc < D,
                                 eviction_policy=EVICT)  # fmt: skip


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


@dataclass(frozen=True)
class PermuteConfig:
    """Launch shape of permute's two kernels, a launcher parameter (``config=``) with these
    defaults. On the H200 (32k tokens, top-8 of 64; benchmarks/kernels.py, 2026-11-23 15:18,
    docs/benchmarks.md) the defaults ran 0.654 ms end to end.

    - ``index_programs``, ``index_chunk_keys``: superchunks per index launch (about one
      program per SM) and keys per chunk (the copy kernel's rank window); 64 / 256 programs
      ran 0.656 / 0.657 ms, 128-key chunks 0.651 (0.660 against 0.658 in the run before: no
      clear winner).
    - ``pdl``: the copy kernel as a programmatic dependent launch (Hopper and newer; never
      under the interpreter); ``pdl_trigger`` 1 lets it launch as soon as every index program
      has started, 2 once each has counted its keys (0.654 ms either way; 0.659 without PDL).
    - ``store_evict``: the copy's store eviction policy (evict_first; the default policy ""
      ran 0.660).
    - ``copy_warps``: the copy's warps (None: half of row_block's, 2 for 8 KiB rows;
      row_block's 4 ran 0.658, and 1 ran 0.646 in one timing: the next candidate).
    """

    index_programs: int = 128
    index_chunk_keys: int = 256
    pdl: bool = True
    pdl_trigger: int = 1
    store_evict: str = "evict_first"
    copy_warps: int | None = None


DEFAULT_CONFIG = PermuteConfig()
_PDL_DEVICES: dict[int, bool] = {}

# One ticket per (device, stream): the index kernel's last program resets it, so calls on the
# same stream (ordered) reuse it without a memset; other streams get their own.
_TICKETS: dict[tuple[int, int], torch.Tensor] = {}


def _ticket(dev: torch.device) -> torch.Tensor:
    if dev.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return torch.zeros(1, device=dev, dtype=torch.int32)
    key = (dev.index if dev.index is not None else torch.cuda.current_device(),
           torch.cuda.current_stream(dev).cuda_stream)  # fmt: skip
    tk = _TICKETS.get(key)
    if tk is None:
        tk = _TICKETS[key] = torch.zeros(1, device=dev, dtype=torch.int32)
    return tk


def _pdl_ok(dev: torch.device, cfg: PermuteConfig) -> bool:
    """Programmatic dependent launch: CUDA on Hopper or newer, never the interpreter."""
    if not cfg.pdl or dev.type != "cuda" or INTERPRET:
        return False
    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    ok = _PDL_DEVICES.get(idx)
    if ok is None:
        ok = _PDL_DEVICES[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return ok


def _index_launch(
    x: torch.Tensor | None,
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None,
    num_buckets: int | None,
    cfg: PermuteConfig = DEFAULT_CONFIG,
) -> tuple[Permuted, dict | None]:
    """Allocate the outputs and run the index build (one launch). Returns the outputs (rows not
    yet written) and the copy launch's arguments (``None`` when there are no keys)."""
    nb_keys = num_experts if num_buckets is None else num_buckets
    t, k = experts.shape
    n = t * k
    dev = experts.device
    flat = experts.contiguous()
    row_map = torch.empty((t, k), device=dev, dtype=torch.int32)
    offsets = torch.empty(nb_keys + 1, device=dev, dtype=torch.int32)
    x_perm = None
    if x is not None:
        x_perm = torch.empty((n, x.shape[1]), device=dev, dtype=x.dtype)
    if n == 0:
        return Permuted(x_perm, row_map, offsets.zero_()), None
    bb = triton.next_power_of_2(nb_keys)
    # Chunks are whole tokens, about index_chunk_keys keys: the copy kernel's rank window.
    tokc = max(1, cfg.index_chunk_keys // k)
    ch = tokc * k
    ch_pad = triton.next_power_of_2(ch)
    nchunk = triton.cdiv(t, tokc)
    ncs = triton.cdiv(nchunk, cfg.index_programs)
    ns = triton.cdiv(nchunk, ncs)
    ncs_t = min(16, triton.next_power_of_2(ncs))
    ns_pad = triton.next_power_of_2(ns)
    bbb = max(1, min(bb, 8192 // ncs_t))
    bbs = max(1, min(bb, 16384 // ns_pad))
    local = torch.empty((nchunk, bb), device=dev, dtype=torch.int32)
    sup = torch.empty((ns, bb), device=dev, dtype=torch.int32)
    bmap = bucket_of.contiguous() if bucket_of is not None else flat
    has_map = bucket_of is not None
    pdl = _pdl_ok(dev, cfg)
    _index_kernel[(ns,)](
        flat, bmap, local, sup, offsets, _ticket(dev), n, nb_keys, nchunk, ncs, ns, CH=ch,
        CH_PAD=ch_pad, NCS_T=ncs_t, BB=bb, BBB=bbb, NS_PAD=ns_pad, BBS=bbs, HAS_MAP=has_map,
        PDL=cfg.pdl_trigger if pdl else 0, num_warps=8,
    )  # fmt: skip
    d = x.shape[1] if x is not None else 0
    copy = x is not None and d > 0
    if copy:
        # Half row_block's warps: each thread keeps twice the bytes in flight, which suits a
        # copy that stores k times what it loads (measured on 8 KiB rows: see copy_warps).
        block_d, warps = row_block(d, x.element_size())
        warps = cfg.copy_warps or max(1, warps // 2)
    else:
        block_d, warps = 16, 4
    rows = dict(
        grid=(t,),
        args=(x if copy else flat, flat, bmap, local, sup, row_map, x_perm if copy else row_map,
              n, d, ncs, x.stride(0) if copy else 0, x_perm.stride(0) if copy else 0),
        meta=dict(K=k, K_PAD=triton.next_power_of_2(k), TOKC=tokc, CH_PAD=ch_pad, BB=bb,
                  BLOCK_D=block_d, EVEN_D=d % block_d == 0, ONE_BLOCK=d <= block_d, COPY=copy,
                  HAS_MAP=has_map, num_warps=warps),
        pdl=pdl, evict=cfg.store_evict,
    )  # fmt: skip
    return Permuted(x_perm, row_map, offsets), rows


def _rows_launch(rows: dict, pdl: bool | None = None) -> None:
    """The copy launch (ranks, ``row_map``, rows). It must follow its index launch on the
    stream with nothing between them: as a programmatic dependent it waits on the launch just
    before it. ``pdl=False`` launches it plainly (the benchmark times it alone that way)."""
    pdl = rows["pdl"] if pdl is None else pdl
    extra = {"launch_pdl": True} if pdl else {}
    _permute_rows_kernel[rows["grid"]](*rows["args"], **rows["meta"], PDL=pdl,
                                       EVICT=rows["evict"], **extra)  # fmt: skip


def _permute_launch(
    x: torch.Tensor | None,
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None,
    num_buckets: int | None,
    cfg: PermuteConfig = DEFAULT_CONFIG,
) -> Permuted:
    """Index build (one launch) and row copy with the ranks in its prologue (one launch, a
    programmatic dependent of the first where the GPU has them).
    With ``x=None`` only ``row_map`` and ``offsets`` are built (``x_perm`` is ``None``)."""
    out, rows = _index_launch(x, experts, num_experts, bucket_of, num_buckets, cfg)
    if rows is not None:
        _rows_launch(rows)
    return out


def permute_indices(
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None = None,
    num_buckets: int | None = None,
    config: PermuteConfig = DEFAULT_CONFIG,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(row_map, offsets)`` of ``permute`` without moving any rows (Triton, no host sync)."""
    _, row_map, offsets = _permute_launch(None, experts, num_experts, bucket_of, num_buckets,
                                          config)  # fmt: skip
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
    def forward(ctx, x, experts, num_experts, bucket_of, num_buckets, config):
        x_perm, row_map, offsets = _permute_launch(x, experts, num_experts, bucket_of,
                                                   num_buckets, config)  # fmt: skip
        ctx.save_for_backward(row_map)
        ctx.mark_non_differentiable(row_map, offsets)
        return x_perm, row_map, offsets

    @staticmethod
    def backward(ctx, grad_perm, _g_map, _g_off):
        from kernels.combine import gather_reduce  # combine imports this module

        (row_map,) = ctx.saved_tensors
        return (gather_reduce(grad_perm.contiguous(), row_map, None), None, None, None, None,
                None)


def permute(
    x: torch.Tensor,
    experts: torch.Tensor,
    num_experts: int,
    bucket_of: torch.Tensor | None = None,
    num_buckets: int | None = None,
    config: PermuteConfig = DEFAULT_CONFIG,
) -> Permuted:
    """Permute token rows into bucket-contiguous order: see the module docstring. ``config``:
    the launch shape (``PermuteConfig``; the defaults are the measured best)."""
    nb_keys = num_experts if num_buckets is None else num_buckets
    _check(x, experts, nb_keys)
    if not use_triton(x):
        return permute_reference(x, experts, num_experts, bucket_of, num_buckets)
    if x.stride(1) != 1:
        x = x.contiguous()
    if x.requires_grad and torch.is_grad_enabled():
        return Permuted(*_PermuteFn.apply(x, experts, num_experts, bucket_of, num_buckets,
                                          config))
    # Inference path: no autograd node (its host overhead shows next to a short launch chain).
    return _permute_launch(x, experts, num_experts, bucket_of, num_buckets, config)
