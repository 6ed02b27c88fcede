"""Where the runtime's hot loops come from: kernels/ when it provides them for the tensor's
device, torch's own grouped GEMM on CUDA, else the plain-torch loop (CPU and gloo).

The choice is made per call from the tensor's device and dtype, so one model runs on the CPU in
the tests and on the GPU in the benchmark without configuration. Where two GPU paths compute
the same function (the dense or the streaming router; grouped GEMMs or the fused kernel for
HP's thin GELU experts) the faster is chosen by timing both once per shape (`CHOICES`)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from runtime.upload import upload


@functools.cache
def _torch_grouped_mm():
    """torch._grouped_mm if it runs forward and backward here (probed once on the GPU).

    The probe's output gradient is a dense tensor, as in the layers: `_grouped_mm`'s backward
    rejects an expanded one (`.sum().backward()` gives strides [0, 0]), which once made this
    probe fail on every GPU and sent the runtime down the per-expert loop unnoticed."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or not torch.cuda.is_available():
        return None
    try:
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = fn(x, w, offs=torch.tensor([16, 64], device="cuda", dtype=torch.int32))
        y.backward(torch.randn_like(y))
        torch.cuda.synchronize()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        print(f"runtime: torch._grouped_mm unusable here ({e}); using a loop", flush=True)
        return None
    return fn


def expert_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which grouped FFN a layer on `device` in `dtype` runs (recorded in run directories)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and _torch_grouped_mm() is not None:
        return "torch._grouped_mm"
    return "loop"


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient dense: `_grouped_mm`'s backward refuses
    expanded or strided gradients (e.g. from a sum or a broadcast downstream)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _DenseGrad.apply(_torch_grouped_mm()(x, w, offs=offs))


GROUPED_MM_MAX_GROUPS = 512


def grouped_ffn(x: torch.Tensor, group_sizes, w1: torch.Tensor,
                w2: torch.Tensor, unfused: bool = False) -> torch.Tensor:
    """group_sizes: a list of ints or an int tensor (on the device: no host sync on GPU).
    SwiGLU or GELU experts by w1's width (runtime.experts.expert_kind_of)."""
    from runtime.experts import activate, expert_kind_of, ffn_loop
    fast = (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0
            and w2.shape[1] % 8 == 0 and _torch_grouped_mm() is not None)
    if not fast:
        if isinstance(group_sizes, torch.Tensor):
            group_sizes = group_sizes.tolist()
        return ffn_loop(x, group_sizes, w1, w2, unfused)
    if w1.shape[0] > GROUPED_MM_MAX_GROUPS:
        # torch._grouped_mm refused 1024 groups on the H200 (torch 2.11: HP's 16 heads x 64
        # experts on one GPU): run slices of groups, which needs the sizes on the host (one
        # sync a call; HP cuts at head boundaries instead, `head_grouped_ffn`, with none). The
        # sync left the host behind the GPU for the rest of the step in the first H200 run
        # (2026-12-01: HP's small phases after it 2-3x their modelled time).
        sizes = group_sizes.tolist() if isinstance(group_sizes, torch.Tensor) else group_sizes
        outs, start = [], 0
        for g0 in range(0, w1.shape[0], GROUPED_MM_MAX_GROUPS):
            part = sizes[g0:g0 + GROUPED_MM_MAX_GROUPS]
            rows = int(sum(part))
            outs.append(grouped_ffn(x[start:start + rows], part, w1[g0:g0 + len(part)],
                                    w2[g0:g0 + len(part)], unfused))
            start += rows
        return torch.cat(outs)
    if not isinstance(group_sizes, torch.Tensor):
        (group_sizes,) = upload(group_sizes, device=x.device)  # pinned: no stream stall
    offs = group_sizes.cumsum(0, dtype=torch.int32)
    h = _gmm(x, w1, offs)
    return _gmm(activate(h, expert_kind_of(w1, w2), unfused), w2, offs)


# -- Measured choices: the streaming router and the fused thin-expert kernel ----------------
#
# Each candidate of a choice is timed once per shape key on the device (forward and backward,
# on inputs of the call's shapes), the fastest kept for the process: the runtime runs what
# measures faster here, and the simulator (moesim.sim.compute) takes the faster of the same
# two from the calibration's curves. `CHOICES` records every decision (run directories, logs).
CHOICES: dict[tuple, dict] = {}


def _bucket(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _time_candidates(cands: dict[str, Callable[[], object]], reps: int = 5) -> dict[str, float]:
    """Median milliseconds of each candidate (forward + backward), after one warm-up call that
    also compiles it; GPU time between CUDA events, candidates interleaved."""
    for fn in cands.values():
        fn()
    times = {name: [] for name in cands}
    for _ in range(reps):
        for name, fn in cands.items():
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


def _choose(key: tuple, cands: dict[str, Callable[[], object]]) -> str:
    got = CHOICES.get(key)
    if got is None:
        ms = _time_candidates(cands)
        best = min(ms, key=ms.get)
        got = CHOICES[key] = {"choice": best, "ms": ms}
        print(f"kernels_bridge: {key[0]} {key[1:]}: {best} "
              f"({', '.join(f'{k} {v:.3f} ms' for k, v in ms.items())})", flush=True)
    return got["choice"]


def _fwd_bwd(fn: Callable[..., object], *inputs: torch.Tensor) -> Callable[[], object]:
    """A timed call: fn on fresh leaves of `inputs`, then the backward of all its float outputs
    with gradients of ones (dense, as _grouped_mm's backward needs)."""
    leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in inputs]

    def run():
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.is_floating_point() and o.requires_grad]
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        for t in leaves:
            t.grad = None

    return run


def route_items(items: torch.Tensor, router: torch.Tensor, kind: str, k: int,
                forced: np.ndarray | None = None, bias: torch.Tensor | None = None,
                mode: str = "auto", balancer=None, blocks: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Route items [n, H, dim] with one router per head [H, dim, E]: (experts [n, H, k], ids
    within the head; gates [n, H, k] fp32), by the dense torch router (runtime.routing.route:
    one batched GEMM, then softmax and top-k over the written logits) or the streaming router
    (kernels.stream_router: logits never written), whichever measures faster at this shape on
    this GPU (`mode` "auto"; "baseline" always dense). `forced` counts [B, H, E] choose the
    experts (both then compute the gates of the forced choice); `bias` [H, E], the aux-loss-free
    bias, shifts the selection only. `balancer` (runtime.balancing) takes the dense path: its
    losses need the logits, and it brings its own bias."""
    from runtime import routing

    if balancer is not None:
        return routing.route(items, router, kind, k, forced, balancer=balancer, blocks=blocks)

    stream_ok = (mode == "auto" and items.is_cuda and items.dtype == router.dtype
                 and items.shape[-1] <= 256 and router.shape[-1] >= k)
    if not stream_ok:
        return routing.route(items, router, kind, k, forced, bias=bias)
    from kernels.stream_router import stream_route

    forced_idx = None
    if forced is not None:
        forced = np.asarray(forced)
        forced_idx = routing.forced_choice_blocks(forced, items.shape[0] // forced.shape[0], k,
                                                  items.device)
    n, h, d = items.shape
    key = ("router", _bucket(n), h, d, router.shape[-1], k, kind, forced is not None,
           str(items.dtype))
    if key not in CHOICES:
        fi = forced_idx

        def dense(x, r):
            logits = torch.bmm(x.transpose(0, 1), r).transpose(0, 1)
            probs = routing.router_probs(logits, kind)
            if fi is None:
                return routing.top_k(probs, k)[1]
            vals = probs.gather(-1, fi)
            return vals / vals.sum(-1, keepdim=True)

        def stream(x, r):
            return stream_route(x, r, k, kind, bias, fi)[1]

        _choose(key, {"dense": _fwd_bwd(dense, items, router),
                      "stream": _fwd_bwd(stream, items, router)})
    if CHOICES[key]["choice"] == "dense":
        return routing.route(items, router, kind, k, forced, bias=bias)
    return stream_route(items, router, k, kind, bias, forced_idx)


def head_grouped_ffn(rows: torch.Tensor, sizes: torch.Tensor, w1: torch.Tensor,
                     w2: torch.Tensor, heads: int) -> torch.Tensor:
    """`grouped_ffn` over rows sorted by (head, expert) with no host sync however many groups:
    every head's items choose k of its experts, so each head holds rows / heads rows (known
    on the host) and the groups are cut at head boundaries into calls of at most
    GROUPED_MM_MAX_GROUPS groups."""
    g = w1.shape[0]
    per_call = max(1, GROUPED_MM_MAX_GROUPS // max(g // heads, 1))
    if g <= GROUPED_MM_MAX_GROUPS or heads <= 1 or g % heads or rows.shape[0] % heads:
        return grouped_ffn(rows, sizes, w1, w2)
    e, r = g // heads, rows.shape[0] // heads
    outs = []
    for h0 in range(0, heads, per_call):
        h1 = min(heads, h0 + per_call)
        outs.append(grouped_ffn(rows[h0 * r:h1 * r], sizes[h0 * e:h1 * e], w1[h0 * e:h1 * e],
                                w2[h0 * e:h1 * e]))
    return torch.cat(outs)


def head_expert_ffn(rows: torch.Tensor, sizes: torch.Tensor, w1: torch.Tensor,
                    w2: torch.Tensor, mode: str = "auto", heads: int = 1) -> torch.Tensor:
    """HP's experts over rows sorted by (head, expert), `sizes` [G] rows a group on the device
    (`heads` heads of G / heads experts, rows / heads rows each): the grouped GEMM path
    (`head_grouped_ffn`) or, for thin GELU experts, the fused expert kernel
    (kernels.fused_expert: the hidden layer on chip, each group padded to whole row tiles),
    whichever measures faster at this shape (`mode` "auto"; "baseline" always grouped)."""
    from runtime.experts import expert_kind_of

    fused_ok = (mode == "auto" and rows.is_cuda and rows.dtype == torch.bfloat16
                and expert_kind_of(w1, w2) == "gelu" and rows.shape[1] <= 256
                and w1.shape[-1] % 16 == 0)
    if not fused_ok:
        return head_grouped_ffn(rows, sizes, w1, w2, heads)
    from kernels.fused_expert import CANDIDATES, fused_expert

    offsets = torch.zeros(sizes.numel() + 1, device=rows.device, dtype=torch.int32)
    torch.cumsum(sizes, 0, out=offsets[1:])
    key = ("experts", _bucket(rows.shape[0]), w1.shape[0], rows.shape[1], w1.shape[-1],
           str(rows.dtype))
    if key not in CHOICES:
        cands = {"grouped": _fwd_bwd(lambda x, a, b: head_grouped_ffn(x, sizes, a, b, heads),
                                     rows, w1, w2)}
        for i, cfg in enumerate(CANDIDATES):
            cands[f"fused{i}"] = _fwd_bwd(lambda x, a, b, cfg=cfg: fused_expert(
                x, a, b, offsets, cfg), rows, w1, w2)
        _choose(key, cands)
    choice = CHOICES[key]["choice"]
    if choice == "grouped":
        return head_grouped_ffn(rows, sizes, w1, w2, heads)
    return fused_expert(rows, w1, w2, offsets, CANDIDATES[int(choice[len("fused"):])])
