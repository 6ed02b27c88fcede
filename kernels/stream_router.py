"""Streaming top-k router for many heads: the [items x experts] logits never reach memory.

Public API
----------
``stream_route(items, router, top_k, score="softmax", bias=None, forced=None,
               config=None) -> (experts, gates)``

- ``items``: ``[n, H, D]`` sub-tokens (any float dtype; the last dimension contiguous, any
  strides for ``n`` and ``H``), ``router``: ``[H, D, E]``, one router per head, the items'
  dtype. ``1 <= top_k <= E``.
- ``score="softmax"``: selection on the logit ``l = x . r_e``, gates the softmax over the
  ``top_k`` selected logits (the same as a softmax over all ``E`` renormalised over the
  selected: runtime.routing's definition, and the post-softmax of kerner-lab/
  Sparse-GPT-Pretraining ``src/model/modules/ffwd/mh_moe_hp_nrt.py``).
  ``score="sigmoid"``: selection on ``sigmoid(l)``, gates the selected sigmoids renormalised.
- ``bias``: ``[H, E]`` fp32, the aux-loss-free load-balancing bias, added to the score before
  the top-k (selection only: gates use the unbiased score), as the paper's router kernel does
  (``src/model/ops/mh_router/mh_router_fwd.py``). ``None``: no bias.
- ``forced``: ``[n, H, k]`` int64 expert ids that replace the top-k choice (a benchmark's
  synthetic routing); the kernel computes the logits tile by tile as in the learned case, so
  forced routing costs what learned routing costs.
- ``experts``: int64 ``[n, H, k]``, descending by biased score, ties to the lower expert
  index; ``gates``: fp32 ``[n, H, k]``. Differentiable in ``items`` and ``router`` through
  ``gates``.

How (forward, one launch): a program takes ``BLOCK_T`` items of one head, loads their
``[BLOCK_T, D]`` tile once and walks the experts in ``BLOCK_E``-wide tiles: one tensor-core dot
gives the tile's logits in fp32 registers, and k rounds merge it into a running top-k of
``BLOCK_T x k`` int64 keys (the score's order-preserving 32 bits above ``2^31 - 1 - expert``,
so one integer max finds the largest score and, among equal scores, the lower index): each
round takes the tile's largest key and, if it beats the running minimum, replaces it. The raw
logits of the running entries ride along, so the gates need no second pass. Only the items
(``n H D``), the routers, ``k`` ids and ``k`` gates per item touch memory. The paper's kernel
(mh_router_fwd.py) merges with ``tl.topk`` over packed uint64 keys and computes the logits in
IEEE fp32; this one merges by rounds (no sort network) and runs the dot in the items' dtype
with fp32 accumulation (bf16 tensor cores), as the dense torch router does.

Backward (two launches and a sum): kernel 1 (``BLOCK_T`` items of a head) turns the gates'
gradient into the k selected logits' gradient (softmax or sigmoid Jacobian over the k
entries, in registers), stores it (fp32 ``[n, H, k]``) and computes the items' gradient as
``G @ R^T`` over expert tiles, ``G`` the ``[BLOCK_T, BLOCK_E]`` gradient tile built in
registers from the k ids (zero except the selected columns); kernel 2 (a head, an expert
tile, a share of the item tiles) accumulates ``R``'s gradient ``X^T @ G`` in registers and
writes one partial per program, summed in torch (deterministic, no atomics; the paper's
mh_router_bwd.py adds every selected row with fp32 atomics). Neither materialises the
``[n x E]`` gradient: memory sees the items, the k ids and gradients, and the routers.

Tuning knobs are the launcher's ``config`` (``RouterConfig``: tile sizes, warps, stages,
the backward's split of item tiles), not module globals. ``stream_route_reference`` is the
plain torch definition (dense logits, stable sort), the path on tensors Triton cannot take.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.backend import INTERPRET, use_triton


@dataclass(frozen=True)
class RouterConfig:
    """Launch shape of the three kernels. ``None`` fields are chosen from the shapes
    (``resolve``)."""

    block_t: int | None = None      # items per program (forward and input-gradient kernels)
    block_e: int | None = None      # experts per tile
    num_warps: int | None = None
    num_stages: int = 2
    bwd_block_t: int | None = None  # items per step of the weight-gradient kernel
    bwd_splits: int | None = None   # programs sharing one (head, expert tile) in that kernel

    def resolve(self, n: int, h: int, d: int, e: int, sms: int) -> RouterConfig:
        """Defaults from one H200 (benchmarks/kernels.py, 2026-12-01, 32k items x 16 heads x 128,
        E = 64, k = 8): 32-expert tiles ran the forward in 0.348 ms against 0.391 with 64 and
        the backward in 0.330 against 0.428 (twice the weight-gradient programs); 64 items a
        program beat 32 and 128 (0.76, 0.70 ms forward); 8 warps, 3 stages and 128-item
        backward steps were slower. The weight-gradient kernel splits the item tiles over
        about 8 programs per SM (one split: 1.78 ms)."""
        d_pad = triton.next_power_of_2(d)
        # tl.dot wants every tile dimension >= 16 (padded lanes are masked).
        be = self.block_e or max(16, min(32, triton.next_power_of_2(e)))
        bt = self.block_t or (32 if d_pad >= 256 else 64)
        warps = self.num_warps or (8 if d_pad >= 256 else 4)
        bbt = self.bwd_block_t or 64
        tiles = triton.cdiv(max(n, 1), bbt)
        splits = self.bwd_splits or max(1, min(tiles, triton.cdiv(8 * sms,
                                                                  h * triton.cdiv(e, be))))
        return RouterConfig(bt, be, warps, self.num_stages, bbt, splits)


# Key sentinels: below every key (a spent or padded column), the running list's padding slots
# (above every key: never its minimum), and the first empty slot (distinct empties follow).
_KEY_NONE: tl.constexpr = tl.constexpr(-(2**63))
_KEY_PAD: tl.constexpr = tl.constexpr(2**63 - 1)
_KEY_EMPTY: tl.constexpr = tl.constexpr(-(2**63) + 1)


@triton.jit
def _keys(score, cols):
    """int64 keys ordered as (score, then lower column first): the fp32 score's bits mapped to
    an order-preserving uint32, minus 2^31, times 2^32, plus 2^31 - 1 - column."""
    u = score.to(tl.uint32, bitcast=True)
    ordered = tl.where((u & 0x80000000) != 0, ~u, u | 0x80000000).to(tl.int64)
    return (ordered - 2147483648) * 4294967296 + (2147483647 - cols.to(tl.int64))


@triton.jit
def _stream_route_fwd(x_ptr, r_ptr, bias_ptr, forced_ptr, e_ptr, g_ptr, l_ptr, n, E, D,
                      sx_n, sx_h, sr_h, sr_d, sr_e, sf_n, sf_h,
                      K: tl.constexpr, K_PAD: tl.constexpr, D_PAD: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
                      HAS_BIAS: tl.constexpr, FORCED: tl.constexpr, UPCAST: tl.constexpr,
                      PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n
    dd = tl.arange(0, D_PAD)
    r64 = rows.to(tl.int64)
    x = tl.load(x_ptr + r64[:, None] * sx_n + h * sx_h + dd[None, :],
                mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    kk = tl.arange(0, K_PAD)
    k_ok = kk < K
    out_off = (r64[:, None] * H + h) * K + kk[None, :]
    out_mask = row_ok[:, None] & k_ok[None, :]
    if FORCED:
        pick = tl.load(forced_ptr + r64[:, None] * sf_n + h * sf_h + kk[None, :],
                       mask=out_mask, other=-1)
        sel_raw = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    else:
        # Running top-k: distinct keys below any real score's for the empty slots, the
        # largest int64 for the K_PAD - K padding slots (never the minimum).
        run = tl.where(k_ok[None, :], _KEY_EMPTY + kk[None, :].to(tl.int64), _KEY_PAD)
        run = tl.broadcast_to(run, (BLOCK_T, K_PAD))
        run_raw = tl.zeros((BLOCK_T, K_PAD), tl.float32)
    for e0 in tl.range(0, E, BLOCK_E, num_stages=NUM_STAGES):
        cols = e0 + tl.arange(0, BLOCK_E)
        col_ok = cols < E
        r = tl.load(r_ptr + h * sr_h + dd[:, None] * sr_d + cols[None, :] * sr_e,
                    mask=(dd[:, None] < D) & col_ok[None, :], other=0.0)
        if UPCAST:
            r = r.to(tl.float32)
        logit = tl.dot(x, r, input_precision=PRECISION)  # [BLOCK_T, BLOCK_E] fp32
        if FORCED:
            for j in tl.static_range(K):
                want = tl.sum(tl.where(kk[None, :] == j, pick, 0), axis=1)
                hit = cols[None, :] == want[:, None]
                val = tl.sum(tl.where(hit, logit, 0.0), axis=1)
                sel_raw += tl.where(kk[None, :] == j, val[:, None], 0.0)
        else:
            score = logit
            if SIGMOID:
                score = tl.sigmoid(logit)
            if HAS_BIAS:
                score += tl.load(bias_ptr + h * E + cols, mask=col_ok, other=0.0)[None, :]
            key = tl.where(col_ok[None, :], _keys(score, tl.broadcast_to(cols[None, :],
                                                                         (BLOCK_T, BLOCK_E))),
                           _KEY_NONE)
            for _ in tl.static_range(K):
                best = tl.max(key, axis=1)
                at = key == best[:, None]
                best_raw = tl.sum(tl.where(at, logit, 0.0), axis=1)
                key = tl.where(at, _KEY_NONE, key)
                low = tl.min(run, axis=1)
                slot = (run == low[:, None]) & (best > low)[:, None]
                run = tl.where(slot, best[:, None], run)
                run_raw = tl.where(slot, best_raw[:, None], run_raw)
    if FORCED:
        ids = pick
        raw = sel_raw
    else:
        # Descending order: k rounds of the running maximum.
        run = tl.where(k_ok[None, :], run, _KEY_NONE)
        ids = tl.zeros((BLOCK_T, K_PAD), tl.int64)
        raw = tl.zeros((BLOCK_T, K_PAD), tl.float32)
        for j in tl.static_range(K):
            best = tl.max(run, axis=1)
            at = run == best[:, None]
            v = tl.sum(tl.where(at, run_raw, 0.0), axis=1)
            idx = 2147483647 - (best & 4294967295)
            ids = tl.where(kk[None, :] == j, idx[:, None], ids)
            raw = tl.where(kk[None, :] == j, v[:, None], raw)
            run = tl.where(at, _KEY_NONE, run)
    if SIGMOID:
        s = tl.where(k_ok[None, :], tl.sigmoid(raw), 0.0)
        total = tl.sum(s, axis=1)[:, None]
        gate = s / tl.where(total > 0, total, 1.0)
    else:
        mx = tl.max(tl.where(k_ok[None, :], raw, float("-inf")), axis=1)
        ex = tl.where(k_ok[None, :], tl.exp(raw - mx[:, None]), 0.0)
        gate = ex / tl.sum(ex, axis=1)[:, None]
    tl.store(e_ptr + out_off, ids, mask=out_mask)
    tl.store(g_ptr + out_off, gate, mask=out_mask)
    tl.store(l_ptr + out_off, raw, mask=out_mask)


@triton.jit
def _stream_route_bwd_dx(r_ptr, e_ptr, g_ptr, l_ptr, dg_ptr, dl_ptr, dx_ptr, n, E, D,
                         sr_h, sr_d, sr_e, sdx_n, sdx_h,
                         K: tl.constexpr, K_PAD: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
                         PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    """dl (the k selected logits' gradient, stored) and dX = G @ R^T over expert tiles."""
    pid_t = tl.program_id(0)
    h = tl.program_id(1)
    H = tl.num_programs(1)
    rows = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n
    r64 = rows.to(tl.int64)
    kk = tl.arange(0, K_PAD)
    k_ok = kk < K
    off = (r64[:, None] * H + h) * K + kk[None, :]
    msk = row_ok[:, None] & k_ok[None, :]
    ids = tl.load(e_ptr + off, mask=msk, other=-1)
    gate = tl.load(g_ptr + off, mask=msk, other=0.0)
    dg = tl.load(dg_ptr + off, mask=msk, other=0.0)
    dot_gd = tl.sum(gate * dg, axis=1)[:, None]
    if SIGMOID:
        raw = tl.load(l_ptr + off, mask=msk, other=0.0)
        s = tl.where(msk, tl.sigmoid(raw), 0.0)
        total = tl.sum(s, axis=1)[:, None]
        dl = (dg - dot_gd) / tl.where(total > 0, total, 1.0) * s * (1.0 - s)
    else:
        dl = gate * (dg - dot_gd)
    dl = tl.where(msk, dl, 0.0)
    tl.store(dl_ptr + off, dl, mask=msk)
    dd = tl.arange(0, D_PAD)
    acc = tl.zeros((BLOCK_T, D_PAD), tl.float32)
    for e0 in tl.range(0, E, BLOCK_E, num_stages=NUM_STAGES):
        cols = e0 + tl.arange(0, BLOCK_E)
        grad = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        for j in tl.static_range(K):
            at = kk[None, :] == j
            id_j = tl.sum(tl.where(at, ids, 0), axis=1)
            dl_j = tl.sum(tl.where(at, dl, 0.0), axis=1)
            grad += tl.where(cols[None, :] == id_j[:, None], dl_j[:, None], 0.0)
        # R tile [D, BLOCK_E] (loaded along its contiguous experts), transposed on chip, in
        # fp32: the gradient keeps fp32 (tf32 dot on tensor cores).
        r = tl.load(r_ptr + h * sr_h + dd[:, None] * sr_d + cols[None, :] * sr_e,
                    mask=(dd[:, None] < D) & (cols[None, :] < E), other=0.0).to(tl.float32)
        acc = tl.dot(grad, tl.trans(r), acc, input_precision=PRECISION)
    tl.store(dx_ptr + r64[:, None] * sdx_n + h * sdx_h + dd[None, :],
             acc.to(dx_ptr.dtype.element_ty), mask=row_ok[:, None] & (dd[None, :] < D))


@triton.jit
def _stream_route_bwd_dr(x_ptr, e_ptr, dl_ptr, part_ptr, n, E, D, sx_n, sx_h,
                         K: tl.constexpr, K_PAD: tl.constexpr, D_PAD: tl.constexpr,
                         BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                         PRECISION: tl.constexpr, NUM_STAGES: tl.constexpr):  # fmt: skip
    """part[split, h, :, tile] = sum over this split's item tiles of X^T @ G (G in registers)."""
    h = tl.program_id(0)
    et = tl.program_id(1)
    split = tl.program_id(2)
    H = tl.num_programs(0)
    splits = tl.num_programs(2)
    cols = et * BLOCK_E + tl.arange(0, BLOCK_E)
    dd = tl.arange(0, D_PAD)
    kk = tl.arange(0, K_PAD)
    k_ok = kk < K
    acc = tl.zeros((D_PAD, BLOCK_E), tl.float32)
    tiles = tl.cdiv(n, BLOCK_T)
    for t in tl.range(split, tiles, splits, num_stages=NUM_STAGES):
        rows = t * BLOCK_T + tl.arange(0, BLOCK_T)
        row_ok = rows < n
        r64 = rows.to(tl.int64)
        off = (r64[:, None] * H + h) * K + kk[None, :]
        msk = row_ok[:, None] & k_ok[None, :]
        ids = tl.load(e_ptr + off, mask=msk, other=-1)
        dl = tl.load(dl_ptr + off, mask=msk, other=0.0)
        grad = tl.zeros((BLOCK_T, BLOCK_E), tl.float32)
        for j in tl.static_range(K):
            at = kk[None, :] == j
            id_j = tl.sum(tl.where(at, ids, 0), axis=1)
            dl_j = tl.sum(tl.where(at, dl, 0.0), axis=1)
            grad += tl.where(cols[None, :] == id_j[:, None], dl_j[:, None], 0.0)
        # Rows loaded along their contiguous width, transposed on chip.
        x = tl.load(x_ptr + r64[:, None] * sx_n + h * sx_h + dd[None, :],
                    mask=row_ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc = tl.dot(tl.trans(x), grad, acc, input_precision=PRECISION)
    base = part_ptr + ((split * H + h) * D_PAD).to(tl.int64) * E
    tl.store(base + dd[:, None] * E + cols[None, :], acc,
             mask=(dd[:, None] < D) & (cols[None, :] < E))


def _check(items: torch.Tensor, router: torch.Tensor, top_k: int, score: str) -> None:
    if items.dim() != 3 or router.dim() != 3:
        raise ValueError(f"need items [n, H, D] and router [H, D, E], got "
                         f"{tuple(items.shape)}, {tuple(router.shape)}")  # fmt: skip
    _, h, d = items.shape
    if router.shape[:2] != (h, d):
        raise ValueError(f"router {tuple(router.shape)} does not match items [n, {h}, {d}]")
    if not 1 <= top_k <= router.shape[2]:
        raise ValueError(f"top_k={top_k} must be in [1, E={router.shape[2]}]")
    if score not in ("softmax", "sigmoid"):
        raise ValueError(f"score must be 'softmax' or 'sigmoid', got {score!r}")


def _sms(dev: torch.device) -> int:
    return torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" \
        else 4


def _interp(t: torch.Tensor) -> bool:
    return INTERPRET and t.device.type == "cpu"


def _precision(items: torch.Tensor) -> str:
    """The dots' precision: IEEE fp32 for fp32 (and wider) items, else the tensor cores' own
    (bf16/fp16 operands; the gradients' fp32 dots as tf32)."""
    return "ieee" if items.dtype in (torch.float32, torch.float64) else "tf32"


def stream_route_forward(items: torch.Tensor, router: torch.Tensor, top_k: int,
                         score: str = "softmax", bias: torch.Tensor | None = None,
                         forced: torch.Tensor | None = None,
                         config: RouterConfig | None = None):  # fmt: skip
    """Launch the forward kernel: (experts, gates, selected raw logits), no autograd."""
    _check(items, router, top_k, score)
    if items.stride(2) != 1:
        items = items.contiguous()
    n, h, d = items.shape
    e = router.shape[2]
    cfg = (config or RouterConfig()).resolve(n, h, d, e, _sms(items.device))
    dev = items.device
    experts = torch.empty((n, h, top_k), device=dev, dtype=torch.int64)
    gates = torch.empty((n, h, top_k), device=dev, dtype=torch.float32)
    logits = torch.empty((n, h, top_k), device=dev, dtype=torch.float32)
    if n == 0:
        return experts, gates, logits
    if bias is not None:
        bias = bias.to(device=dev, dtype=torch.float32).contiguous()
        if bias.shape != (h, e):
            raise ValueError(f"bias must be [H, E] = {(h, e)}, got {tuple(bias.shape)}")
    if forced is not None:
        if forced.shape != (n, h, top_k):
            raise ValueError(f"forced must be [n, H, k] = {(n, h, top_k)}")
        forced = forced.to(device=dev, dtype=torch.int64)
        if forced.stride(2) != 1:
            forced = forced.contiguous()
    fs = forced if forced is not None else experts
    grid = (triton.cdiv(n, cfg.block_t), h)
    _stream_route_fwd[grid](
        items, router, bias if bias is not None else gates, fs, experts, gates, logits, n, e,
        d, items.stride(0), items.stride(1), router.stride(0), router.stride(1),
        router.stride(2), fs.stride(0), fs.stride(1), K=top_k,
        K_PAD=triton.next_power_of_2(top_k), D_PAD=max(16, triton.next_power_of_2(d)),
        BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, SIGMOID=score == "sigmoid",
        HAS_BIAS=bias is not None, FORCED=forced is not None, UPCAST=_interp(items),
        PRECISION=_precision(items), NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    return experts, gates, logits


def stream_route_backward(items: torch.Tensor, router: torch.Tensor, experts: torch.Tensor,
                          gates: torch.Tensor, logits: torch.Tensor, dgates: torch.Tensor,
                          score: str = "softmax",
                          config: RouterConfig | None = None):  # fmt: skip
    """Launch the backward kernels: (d items, d router) from the gates' gradient."""
    if items.stride(2) != 1:
        items = items.contiguous()
    n, h, d = items.shape
    e, k = router.shape[2], experts.shape[2]
    cfg = (config or RouterConfig()).resolve(n, h, d, e, _sms(items.device))
    dg = dgates.to(torch.float32).contiguous()
    dx = torch.empty_like(items)
    dl = torch.empty((n, h, k), device=items.device, dtype=torch.float32)
    d_pad, k_pad = max(16, triton.next_power_of_2(d)), triton.next_power_of_2(k)
    if n == 0:
        return dx, torch.zeros_like(router)
    _stream_route_bwd_dx[(triton.cdiv(n, cfg.block_t), h)](
        router, experts, gates, logits, dg, dl, dx, n, e, d, router.stride(0), router.stride(1),
        router.stride(2), dx.stride(0), dx.stride(1), K=k, K_PAD=k_pad, D_PAD=d_pad,
        BLOCK_T=cfg.block_t, BLOCK_E=cfg.block_e, SIGMOID=score == "sigmoid",
        PRECISION=_precision(items), NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    splits = cfg.bwd_splits
    part = torch.empty((splits, h, d_pad, e), device=items.device, dtype=torch.float32)
    _stream_route_bwd_dr[(h, triton.cdiv(e, cfg.block_e), splits)](
        items, experts, dl, part, n, e, d, items.stride(0), items.stride(1), K=k, K_PAD=k_pad,
        D_PAD=d_pad, BLOCK_T=cfg.bwd_block_t, BLOCK_E=cfg.block_e,
        PRECISION=_precision(items), NUM_STAGES=cfg.num_stages, num_warps=cfg.num_warps,
    )  # fmt: skip
    dr = part[:, :, :d].sum(0) if splits > 1 else part[0, :, :d]
    return dx, dr.to(router.dtype)


class _StreamRouteFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, items, router, top_k, score, bias, forced, config):
        experts, gates, logits = stream_route_forward(items, router, top_k, score, bias, forced,
                                                      config)  # fmt: skip
        ctx.save_for_backward(items, router, experts, gates, logits)
        ctx.score, ctx.config = score, config
        ctx.mark_non_differentiable(experts)
        return experts, gates

    @staticmethod
    def backward(ctx, _d_experts, dgates):
        items, router, experts, gates, logits = ctx.saved_tensors
        dx, dr = stream_route_backward(items, router, experts, gates, logits, dgates, ctx.score,
                                       ctx.config)  # fmt: skip
        return dx, dr, None, None, None, None, None


def stream_route_reference(items: torch.Tensor, router: torch.Tensor, top_k: int,
                           score: str = "softmax", bias: torch.Tensor | None = None,
                           forced: torch.Tensor | None = None):  # fmt: skip
    """Plain torch, the kernel's contract: dense logits [n, H, E] (fp32, or the input's
    precision when wider), a stable descending sort of the biased score, gates over the k
    selected unbiased scores. Autograd by torch."""
    _check(items, router, top_k, score)
    acc = torch.float64 if items.dtype == torch.float64 else torch.float32
    logits = torch.einsum("nhd,hde->nhe", items.to(acc), router.to(acc))
    sc = torch.sigmoid(logits) if score == "sigmoid" else logits
    if forced is None:
        sel = sc.detach() + (0 if bias is None else bias.to(acc))
        experts = torch.sort(sel, dim=-1, descending=True, stable=True).indices[..., :top_k]
    else:
        experts = forced.to(device=items.device, dtype=torch.int64)
    chosen = torch.gather(logits, -1, experts)
    if score == "sigmoid":
        s = torch.sigmoid(chosen)
        gates = s / s.sum(-1, keepdim=True)
    else:
        gates = torch.softmax(chosen, dim=-1)
    return experts, gates.to(torch.float32) if acc == torch.float32 else gates


def stream_route(items: torch.Tensor, router: torch.Tensor, top_k: int, score: str = "softmax",
                 bias: torch.Tensor | None = None, forced: torch.Tensor | None = None,
                 config: RouterConfig | None = None):  # fmt: skip
    """Route items [n, H, D] with router [H, D, E]: see the module docstring."""
    if not use_triton(items):
        return stream_route_reference(items, router, top_k, score, bias, forced)
    if (items.requires_grad or router.requires_grad) and torch.is_grad_enabled():
        return _StreamRouteFn.apply(items, router, top_k, score, bias, forced, config)
    experts, gates, _ = stream_route_forward(items, router, top_k, score, bias, forced, config)
    return experts, gates
