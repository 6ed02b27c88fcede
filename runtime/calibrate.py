"""`moesim calibrate`: measure this machine's compute rates and write the calibration CSV that
the compute model (`moesim.sim.compute.ComputeModel`) reads.

Measured, each as the median of `repeat` timed runs after warm-up, on fresh random inputs:
- rate hbm: a large device copy (bytes read + written over time);
- rate gather: `index_select` of token rows in a random order (bytes read + written);
- overhead kernel: time per launch of a tiny kernel, launched back to back;
- curve gemm: bf16 square GEMMs from 256 to 8192, efficiency = achieved / best achieved. On a
  GPU every GEMM (here and below) is timed as in a step: a 1 GiB copy queued before each run
  (memory-bound work between GEMMs keeps the board off its power limit, as in a step), the
  weights at the model's scale, GPU time alone; on the CPU the launch overhead is taken out
  of each time (the compute model adds it back per launch);
- curve grouped_gemm: the two grouped GEMMs of a gated expert FFN (up+gate, then down;
  `torch._grouped_mm` where the GPU has it, else one matmul per expert) over `experts` groups
  of t tokens each, for t from 16 to 8192 (128 and its multiples: whole row tiles); size =
  forward FLOPs of one group (6 t d f), the quantity the compute model looks up; efficiency =
  achieved / best achieved. The activation between the GEMMs is not timed: the compute model
  charges it as its own memory-bound kernels. Each extra expert shape (`--expert-shapes
  512x704`) gets its own curve `grouped_gemm@512x704`, relative to the same rate (the best of
  all shapes), which experts of that shape use; and each shape its backward (the input and
  weight gradients of both GEMMs) as `grouped_gemm_bwd@<dim>x<ffn>`, size = the group's
  forward FLOPs, value = backward FLOPs per second (twice the forward's FLOPs) over the
  rate: thin experts' backward is faster per FLOP than their forward (its weight-gradient
  GEMM contracts over the group's rows, not over a short expert dimension);
- curves grouped_gemm_gelu@DxF (and _bwd), fused_expert@DxF (and _bwd) for each 2-matrix
  GELU expert shape (`--gelu-shapes 128x1024`): its two grouped GEMMs (GELU charged apart) and
  the fused expert kernel (kernels/fused_expert.py, GELU included), over `experts` groups of t
  rows for whole 64-row tiles t (the fused kernel's padding granule); size = a group's forward
  FLOPs (4 t d f), relative to the same grouped GEMM rate (the best of every family);
- curves router_stream@DxE (and _bwd) for each streaming-router shape (`--router-shapes
  128x64k8`): the streaming top-k router (kernels/stream_router.py) on 16 heads of width D,
  E experts a head, at 2^14..2^22 items; size = the logits' FLOPs (2 items D E), value = their
  FLOP/s over the dense GEMM rate;
- rate sort, overhead sort: stable `argsort` of int64 keys (what the permute runs) at several
  sizes; keys per second from the two largest, the fixed cost per call from the smallest;
- overhead sync: a device-to-host read between two kernels (`.item()`), less the two launches:
  the bubble a sync leaves on the GPU;
- overhead split: host time from an EP layer's exchanged counts to its dispatch layout (the
  planner's splits and runtime.dispatch's index layout, its kernels queued), `experts`
  experts on one rank: what the GPU waits for after the size exchange's sync;
- param sms: the device's multiprocessor count; param tile_m, tile_n: the grouped GEMM's output
  tile, ASSUMED (128 x 256, CUTLASS's on Hopper), written so the file says what was used;
  param curve_dim, curve_ffn: the expert shape of the plain grouped GEMM curve.
The best achieved rate of each family becomes its `rate` row, so every efficiency is <= 1.

On a machine without CUDA it measures the CPU with small shapes (`--device cpu`): useful to test
the path and to calibrate CPU runs of the runtime, not to predict GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from moesim.atomic import atomic_path
from moesim.calibration import (
    BACKWARD,
    BACKWARD_GELU,
    FUSED,
    FUSED_BWD,
    ROUTER_STREAM,
    ROUTER_STREAM_BWD,
    SHAPED,
    SHAPED_GELU,
    shaped_op,
)
from moesim.errors import InputError

GEMM_SIZES_GPU = (256, 512, 1024, 2048, 4096, 8192)
GEMM_SIZES_CPU = (64, 128, 256, 512)
GROUP_TOKENS_GPU = (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
GROUP_TOKENS_CPU = (4, 16, 64, 256)
SORT_KEYS_GPU = (4096, 1 << 20, 1 << 22)
SORT_KEYS_CPU = (1024, 1 << 14, 1 << 16)
TILE = (128, 256)  # grouped GEMM output tile (rows, columns), assumed


def _expert_gemms_backward(x, a, w_up, w_down, offs) -> Callable[[], object]:
    """The backward of `_expert_gemms` (input and weight gradients of both GEMMs: four
    grouped GEMMs), as a function to time: the graph is built once and kept."""
    import torch

    leaves = [t.detach().requires_grad_(True) for t in (x, a, w_up, w_down)]
    outs = _expert_gemms(*leaves, offs)
    grads = [torch.randn_like(o) for o in outs]
    return lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)


def median_seconds(fn: Callable[[], object], repeat: int, device: str,
                   warmup: int = 2, between: Callable[[], object] | None = None) -> float:
    """Median seconds of `fn` over `repeat` runs after `warmup`. On a GPU the runs are queued
    back to back, each between two CUDA events, and read after one synchronize: the GPU time
    of a call as it runs inside a step (the host ahead). A synchronize after every run timed
    the host's launch latency and an idle GPU's clock ramp too, and put the grouped GEMMs
    12-17% below what the same GEMMs take inside the runtime's steps (H200, session 3).
    `between` is queued before each run, outside its events (on a GPU only)."""
    import torch

    for _ in range(warmup):
        fn()
    if device == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeat)]
        torch.cuda.synchronize()
        for start, end in events:
            if between is not None:
                between()
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) / 1e3 for start, end in events)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _timer(device: str) -> Callable[..., float]:
    """The timer `measure` uses (a seam for tests): (fn, repeat, between=None) -> seconds."""
    return lambda fn, repeat, between=None: median_seconds(fn, repeat, device, between=between)


def _expert_gemms(x, a, w_up, w_down, offs):
    """The two grouped GEMMs of a gated FFN over groups (rows offs[i-1]:offs[i] use expert i):
    x @ w_up and a @ w_down, `a` standing for the activation (not timed: the compute model
    charges the activation as its own kernels)."""
    import torch

    if hasattr(torch, "_grouped_mm") and x.is_cuda:
        return torch._grouped_mm(x, w_up, offs=offs), torch._grouped_mm(a, w_down, offs=offs)
    ups, downs, start = [], [], 0
    for i, end in enumerate(offs.tolist()):
        ups.append(x[start:end] @ w_up[i])
        downs.append(a[start:end] @ w_down[i])
        start = end
    return torch.cat(ups), torch.cat(downs)


# The fused expert kernel pads each group to 64-row tiles: its curve is measured at whole
# tiles only (the compute model looks groups up at their padded size).
FUSED_GROUP_TOKENS_GPU = (64, 256, 1024, 4096, 8192)
FUSED_GROUP_TOKENS_CPU = (4, 16)
# Items (sub-tokens x heads) per call of the streaming router's curve.
ROUTER_ITEMS_GPU = (1 << 14, 1 << 16, 1 << 18, 1 << 20, 1 << 22)
ROUTER_ITEMS_CPU = (64, 256)
ROUTER_HEADS = 16


def _gelu_families(rand, device: str, e: int, d: int, f: int, gpu: bool, time_it, gpu_busy,
                   in_step, repeat: int) -> dict[str, list[tuple[float, float]]]:
    """The 2-matrix GELU expert at dim d x hidden f over e groups of t rows: its two grouped
    GEMMs (x @ w1, a @ w2; the GELU is charged apart) and the fused expert kernel (GEMMs and
    GELU, kernels/fused_expert.py), forward and backward. (group forward FLOPs 4 t d f, FLOP/s)
    per family; the backward's FLOP/s count twice the forward's FLOPs."""
    import torch

    from kernels.fused_expert import CANDIDATES, fused_expert

    w1, w2 = rand(e, d, f) / d ** 0.5, rand(e, f, d) / f ** 0.5
    fam = {shaped_op(d, f, SHAPED_GELU): [], shaped_op(d, f, BACKWARD_GELU): [],
           shaped_op(d, f, FUSED): [], shaped_op(d, f, FUSED_BWD): []}
    for t_per in FUSED_GROUP_TOKENS_GPU if gpu else FUSED_GROUP_TOKENS_CPU:
        xg, ag = rand(e * t_per, d), rand(e * t_per, f)
        ends = torch.arange(1, e + 1, device=device, dtype=torch.int32) * t_per
        offsets = torch.cat([ends.new_zeros(1), ends])
        fl = 4.0 * t_per * d * f
        sec = gpu_busy(time_it(lambda xg=xg, ag=ag, ends=ends: _expert_gemms(
            xg, ag, w1, w2, ends), repeat, between=in_step), 2)
        fam[shaped_op(d, f, SHAPED_GELU)].append((fl, e * fl / sec))
        bwd = _expert_gemms_backward(xg, ag, w1, w2, ends)
        sec = gpu_busy(time_it(bwd, repeat, between=in_step), 4)
        fam[shaped_op(d, f, BACKWARD_GELU)].append((fl, e * 2 * fl / sec))
        # The fused kernel at each of its candidate launch shapes; the one whose forward +
        # backward is fastest is the one the runtime would keep (runtime.kernels_bridge).
        best = None
        for cfg in CANDIDATES if gpu else CANDIDATES[:1]:
            f_sec = gpu_busy(time_it(lambda xg=xg, offsets=offsets, cfg=cfg: fused_expert(
                xg, w1, w2, offsets, cfg), repeat, between=in_step), 1)
            leaves = [t.detach().requires_grad_(True) for t in (xg, w1, w2)]
            out = fused_expert(*leaves, offsets, cfg)
            grad = torch.randn_like(out)
            b_sec = gpu_busy(time_it(lambda out=out, leaves=leaves, grad=grad: torch.autograd.grad(
                out, leaves, grad, retain_graph=True), repeat, between=in_step), 2)
            if best is None or f_sec + b_sec < best[0] + best[1]:
                best = (f_sec, b_sec)
        fam[shaped_op(d, f, FUSED)].append((fl, e * fl / best[0]))
        fam[shaped_op(d, f, FUSED_BWD)].append((fl, e * 2 * fl / best[1]))
    return fam


def _router_curves(rand, d: int, e: int, k: int, gpu: bool, time_it, gpu_busy, in_step,
                   repeat: int) -> dict[str, list[tuple[float, float]]]:
    """The streaming router (kernels/stream_router.py) over items of ROUTER_HEADS heads of
    width d, e experts a head, top-k: (logits FLOPs 2 n d e, logits FLOP/s) forward and
    backward (the backward's FLOP/s counted on the same FLOPs)."""
    import torch

    from kernels.stream_router import stream_route

    fwd, bwd = [], []
    h = ROUTER_HEADS if gpu else 2
    router = rand(h, d, e) / d ** 0.5
    for items in ROUTER_ITEMS_GPU if gpu else ROUTER_ITEMS_CPU:
        x = rand(items // h, h, d)
        fl = 2.0 * items * d * e
        sec = gpu_busy(time_it(lambda x=x: stream_route(x, router, k), repeat, between=in_step),
                       1)
        fwd.append((fl, fl / sec))
        xl, rl = x.detach().requires_grad_(True), router.detach().requires_grad_(True)
        _, gates = stream_route(xl, rl, k)
        grad = torch.randn_like(gates)
        sec = gpu_busy(time_it(lambda gates=gates, xl=xl, rl=rl, grad=grad: torch.autograd.grad(
            gates, (xl, rl), grad, retain_graph=True), repeat, between=in_step), 3)
        bwd.append((fl, fl / sec))
    return {shaped_op(d, e, ROUTER_STREAM): fwd, shaped_op(d, e, ROUTER_STREAM_BWD): bwd}


def measure(device: str, repeat: int = 10, d_model: int = 4096, d_ffn: int = 1408,
            experts: int = 64, expert_shapes: tuple[tuple[int, int], ...] = (),
            gelu_shapes: tuple[tuple[int, int], ...] = (),
            router_shapes: tuple[tuple[int, int, int], ...] = ()
            ) -> list[tuple[str, str, float | str, float]]:
    """Run the measurements; return CSV rows (record, op, size, value)."""
    import torch

    time_it = _timer(device)
    gpu = device == "cuda"
    dt = torch.bfloat16 if gpu else torch.float32
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dt, generator=g)

    rows: list[tuple[str, str, float | str, float]] = []
    n = (1 << 30 if gpu else 1 << 24) // 2
    src, dst = rand(n), torch.empty(n, device=device, dtype=dt)
    t = time_it(lambda src=src, dst=dst: dst.copy_(src), repeat)
    rows.append(("rate", "hbm", "", 2 * n * src.element_size() / t))
    tokens, width = (32768, 4096) if gpu else (4096, 256)
    x = rand(tokens, width)
    idx = torch.randperm(tokens, device=device, generator=g)
    t = time_it(lambda: x.index_select(0, idx), repeat)
    rows.append(("rate", "gather", "", 2 * x.numel() * x.element_size() / t))
    small = rand(16)
    launches = 200
    t = time_it(lambda: [small.add_(1.0) for _ in range(launches)], repeat)
    rows.append(("overhead", "kernel", "", t / launches))

    overhead = t / launches

    def busy(seconds: float, kernels: int) -> float:
        # The compute model adds `overhead` per launch on top of the curve: take it out here,
        # or small GEMMs would pay it twice (a floor keeps launch-bound points positive).
        return max(seconds - kernels * overhead, 0.05 * seconds)

    def gpu_busy(seconds: float, kernels: int) -> float:
        # A GEMM timed in step (the host ahead, a copy queued before it) is GPU time alone:
        # no launch time to take out. On the CPU the host runs it: as `busy`.
        return seconds if gpu else busy(seconds, kernels)

    # GEMMs are timed as they run in a step: between memory-bound kernels (a 1 GiB copy
    # before each run, not timed) and on weights of the model's scale (randn / sqrt(fan-in)).
    # Back to back, GEMMs hold the board at its power limit and lower the clocks: on an H200
    # the 2048 x 1408 experts ran 746 TFLOP/s with scaled weights back to back, 719 with a 1 GiB
    # copy between runs, 667 with a synchronize after each (benchmarks/gemm_context.py), and
    # about 680 inside the runtime's EP steps.
    in_step = None
    if gpu:
        src = torch.empty(1 << 29, device=device, dtype=torch.bfloat16)
        in_step = functools.partial(torch.empty_like(src).copy_, src)
    gemm = []
    for s in GEMM_SIZES_GPU if gpu else GEMM_SIZES_CPU:
        a, b = rand(s, s), rand(s, s) / s ** 0.5
        sec = gpu_busy(time_it(lambda a=a, b=b: a @ b, repeat, between=in_step), 1)
        gemm.append((2.0 * s**3, 2.0 * s**3 / sec))
    best = max(r for _, r in gemm)
    rows.append(("rate", "gemm", "", best))
    rows += [("curve", "gemm", f, r / best) for f, r in gemm]

    e = experts if gpu else 8
    shapes = [("grouped_gemm", *((d_model, d_ffn) if gpu else (128, 64)))]
    shapes += [(shaped_op(d, f), d, f) for d, f in expert_shapes]
    families = {}
    for op, d, f in shapes:
        w_up, w_down = rand(e, d, 2 * f) / d ** 0.5, rand(e, f, d) / f ** 0.5
        grouped, backward = [], []
        for t_per in GROUP_TOKENS_GPU if gpu else GROUP_TOKENS_CPU:
            xg, ag = rand(e * t_per, d), rand(e * t_per, f)
            offs = torch.arange(1, e + 1, device=device, dtype=torch.int32) * t_per
            flops_group = 6.0 * t_per * d * f
            sec = gpu_busy(time_it(lambda xg=xg, ag=ag, offs=offs, w_up=w_up, w_down=w_down:
                               _expert_gemms(xg, ag, w_up, w_down, offs), repeat,
                               between=in_step), 2)
            grouped.append((flops_group, e * flops_group / sec))
            bwd = _expert_gemms_backward(xg, ag, w_up, w_down, offs)
            sec = gpu_busy(time_it(bwd, repeat, between=in_step), 4)
            backward.append((flops_group, e * 2 * flops_group / sec))
        families[op] = grouped
        families[shaped_op(d, f).replace(SHAPED, BACKWARD, 1)] = backward
    for d, f in gelu_shapes:
        families.update(_gelu_families(rand, device, e, d, f, gpu, time_it, gpu_busy, in_step,
                                       repeat))
    best = max(r for grouped in families.values() for _, r in grouped)
    rows.append(("rate", "grouped_gemm", "", best))
    rows += [("curve", op, f, r / best) for op, grouped in families.items() for f, r in grouped]
    for d, e_r, k in router_shapes:
        for op, pts in _router_curves(rand, d, e_r, k, gpu, time_it, gpu_busy, in_step,
                                      repeat).items():
            # Relative to the dense GEMM rate; a (fake or odd) point above it is capped at 1.
            rows += [("curve", op, fl, min(r / rows_rate(rows, "gemm"), 1.0)) for fl, r in pts]

    sizes = SORT_KEYS_GPU if gpu else SORT_KEYS_CPU
    secs = []
    for n_keys in sizes:
        keys = torch.randint(0, experts, (n_keys,), device=device, generator=g)
        secs.append(time_it(lambda keys=keys: torch.argsort(keys, stable=True), repeat))
    rate, fixed = sort_fit(sizes, secs)
    rows.append(("rate", "sort", "", rate))
    rows.append(("overhead", "sort", "", fixed))
    one = torch.zeros(1, device=device)

    def synced():
        one.add_(1.0)
        one.item()
        one.add_(1.0)

    rows.append(("overhead", "sync", "", busy(time_it(synced, repeat), 2)))
    rows.append(("overhead", "split", "", split_seconds(experts, device, repeat)))
    sms = torch.cuda.get_device_properties(device).multi_processor_count if gpu else 1
    rows += [("param", "sms", "", float(sms)), ("param", "tile_m", "", float(TILE[0])),
             ("param", "tile_n", "", float(TILE[1])),
             ("param", "curve_dim", "", float(shapes[0][1])),
             ("param", "curve_ffn", "", float(shapes[0][2]))]
    return rows


def rows_rate(rows: list[tuple[str, str, float | str, float]], op: str) -> float:
    """The `rate` row of `op` among the rows measured so far."""
    return next(v for r, o, _, v in rows if r == "rate" and o == op)


def split_seconds(experts: int, device: str, repeat: int, tokens: int = 16384,
                  top_k: int = 8) -> float:
    """Host seconds from an EP layer's exchanged counts to its dispatch layout on one rank:
    the planner's splits (planner.traffic.layer_traffic) and the send/receive index layout
    (runtime.dispatch.build_route, whose kernels are only queued), as the runtime runs them
    right after the size exchange's sync, while the GPU waits."""
    import torch

    from moesim.config import ModelConfig
    from planner.placement import ep_placement
    from planner.traffic import layer_traffic
    from runtime.dispatch import build_route

    device = torch.device(device)
    m = ModelConfig(num_experts=experts, top_k=min(top_k, experts))
    placement = ep_placement(experts, 1)
    assign = torch.randint(0, experts, (tokens * m.top_k,), device=device)
    counts = torch.bincount(assign, minlength=experts).cpu().numpy().reshape(1, 1, experts)
    times = []
    for _ in range(max(repeat, 5)):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        traffic = layer_traffic(m, placement, counts)
        build_route(placement, traffic.tokens, 0, assign, device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def sort_fit(keys: tuple[int, ...], seconds: list[float]) -> tuple[float, float]:
    """(keys per second, fixed seconds per call) of t = fixed + n / rate: the rate from the two
    largest sizes, the fixed cost from the smallest. Flat timings (launch-bound, or a fake
    timer) give the rate of the largest size alone and a fixed cost of 5% of the smallest
    (the file takes positive numbers only)."""
    dn, dt = keys[-1] - keys[-2], seconds[-1] - seconds[-2]
    rate = dn / dt if dt > 0 else keys[-1] / seconds[-1]
    return rate, max(seconds[0] - keys[0] / rate, 0.05 * seconds[0])


def write_calibration(rows: list[tuple[str, str, float | str, float]], path: Path,
                      machine: str, command: str) -> None:
    import torch

    header = [
        f"# moesim compute calibration measured on {machine}",
        f"# date {datetime.date.today().isoformat()}, torch {torch.__version__}, "
        f"python {platform.python_version()}",
        f"# command: {command}",
        "# record: rate (FLOP/s, bytes/s, or keys/s for sort), overhead (s per launch, per sort "
        "call, per device-to-host sync, per dispatch layout on the host), curve (size = FLOPs "
        "of one GEMM or of one expert group, value = fraction of the rate), param (sms "
        "measured; tile_m, tile_n assumed)",
        "record,op,size,value",
    ]
    lines = [f"{r},{op},{'' if size == '' else f'{size:.6g}'},{value:.6g}"
             for r, op, size, value in rows]
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(header + lines) + "\n")


def parse_router_shapes(text: str) -> tuple[tuple[int, int, int], ...]:
    """"128x64k8,64x64" -> ((128, 64, 8), (64, 64, 8)): head width x experts, top-k (default
    8); InputError names a bad entry."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        body, _, k = part.lower().partition("k")
        try:
            (d, e), = parse_shapes(body)
            k_ = int(k) if k else 8
        except (ValueError, InputError):
            raise InputError("--router-shapes", part, "want DxE or DxEkK, e.g. 128x64k8") \
                from None
        if not 1 <= k_ <= e:
            raise InputError("--router-shapes", part, f"top-k {k_} must be in 1..{e}")
        out.append((d, e, k_))
    return tuple(out)


def parse_shapes(text: str) -> tuple[tuple[int, int], ...]:
    """"512x704,1024x1408" -> ((512, 704), (1024, 1408)); InputError names a bad entry."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            d, f = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise InputError("--expert-shapes", part, "want DxF, e.g. 512x704") from None
        if d < 1 or f < 1:
            raise InputError("--expert-shapes", part, "dimensions must be >= 1")
        shapes.append((d, f))
    return tuple(shapes)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure compute rates into a calibration CSV",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True,
                   help="CSV to write, e.g. configs/calibration/h200.csv")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--d-model", type=int, default=4096,
                   help="expert input width of the grouped GEMM curve (GPU)")
    p.add_argument("--d-ffn", type=int, default=1408,
                   help="expert hidden width of the grouped GEMM curve (GPU)")
    p.add_argument("--experts", type=int, default=64, help="groups of the grouped GEMM curve")
    p.add_argument("--expert-shapes", default="", metavar="DxF[,DxF...]",
                   help="extra expert shapes with their own grouped GEMM curve, e.g. 512x704 "
                   "(Multi-Head LatentMoE experts)")
    p.add_argument("--gelu-shapes", default="", metavar="DxF[,DxF...]",
                   help="2-matrix GELU expert shapes (Multi-Head LatentMoE heads, e.g. 128x1024): "
                   "their grouped GEMM curves and the fused expert kernel's, forward and backward")
    p.add_argument("--router-shapes", default="", metavar="DxE[kK][,...]",
                   help="streaming router shapes, head width x experts a head and top-k, e.g. "
                   "128x64k8: its forward and backward curves")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("--device", "cuda", "no CUDA device on this machine")
    if args.repeat < 1:
        raise InputError("--repeat", "repeat", "must be >= 1")
    for name in ("d_model", "d_ffn", "experts"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}", name, "must be >= 1")
    machine = torch.cuda.get_device_name() if device == "cuda" else \
        f"CPU {platform.processor() or platform.machine()}"
    shapes = parse_shapes(args.expert_shapes)
    gelu = parse_shapes(args.gelu_shapes)
    routers = parse_router_shapes(args.router_shapes)
    rows = measure(device, args.repeat, args.d_model, args.d_ffn, args.experts, shapes, gelu,
                   routers)
    extra = f" --expert-shapes {args.expert_shapes}" if shapes else ""
    extra += f" --gelu-shapes {args.gelu_shapes}" if gelu else ""
    extra += f" --router-shapes {args.router_shapes}" if routers else ""
    write_calibration(rows, args.out, machine, f"moesim calibrate --device {device} "
                      f"--repeat {args.repeat} --d-model {args.d_model} --d-ffn {args.d_ffn} "
                      f"--experts {args.experts}{extra} --out {args.out}")
    for r, op, size, value in rows:
        print(f"{r:9s} {op:13s} {size if size == '' else f'{size:.3g}':>9s} {value:.4g}")
    print(f"wrote {args.out}")
    return 0
