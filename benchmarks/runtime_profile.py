"""Where one MoE layer's time goes on one GPU: torch.profiler over forward and backward.

    python -m benchmarks.runtime_profile [--strategy ep[,hp,fsep]] [--top-k 8] [--routing uniform]
                                         [--tokens 16384] [--rows 15]

Builds the same layer as benchmarks/runtime.py (one rank, so the all-to-alls are local copies),
runs warm-up steps, then profiles one forward and, separately, its backward, and prints for
each pass the CUDA time (events) and the kernels that took it, largest first. This is the tool
that found the runtime's slow expert backward; keep it for the next regression.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runtime import models
from runtime.comm import init_distributed
from runtime.experts import init_moe_weights
from runtime.layers import build_layer
from traces.generators import TraceSpec, generate


def op_table(prof, device: str, rows: int) -> str:
    """The profile's ops on `device` ("CUDA": kernels by GPU time; "CPU": host ops by self
    time, what keeps the GPU waiting when the events exceed the kernels' sum), largest first."""
    cuda = device == "CUDA"

    def time_of(e) -> float:
        return e.device_time_total if cuda else e.self_cpu_time_total

    evs = sorted((e for e in prof.key_averages() if e.device_type.name == device),
                 key=time_of, reverse=True)
    label = "kernel time" if cuda else "host self"
    total = sum(map(time_of, evs))
    out = [f"    {label:>12s} {'calls':>6s}  name  ({device} total {total / 1e3:.2f} ms)"]
    out += [f"    {time_of(e) / 1e3:9.3f} ms {e.count:6d}  {e.key[:110]}" for e in evs[:rows]]
    return "\n".join(out)


def profile_layer(strategy: str, args: argparse.Namespace, env) -> None:
    dev = env.device
    std, lat = models(cpu=False)
    m = dataclasses.replace(lat if strategy == "hp" else std, top_k=args.top_k)
    params = {"exponent": 1.2} if args.routing == "zipf" else {}
    trace = generate(TraceSpec(kind=args.routing, steps=args.warmup + 1, layers=1, shards=1,
                               experts=m.num_experts, heads=m.num_heads, top_k=m.top_k,
                               tokens_per_shard=args.tokens, seed=11, params=params)).counts
    layer = build_layer(strategy, m, init_moe_weights(m, seed=5), 0, env).to(dev)
    layer.to(torch.bfloat16)
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(args.tokens, m.d_model, device=dev, dtype=torch.bfloat16, generator=gen)
    gy = torch.randn_like(x)
    for s in range(args.warmup):
        layer.zero_grad(set_to_none=True)  # as a training step: no gradient accumulation
        layer(x.detach().requires_grad_(True), forced=trace[s, 0]).backward(gy)
    layer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    xs = x.detach().requires_grad_(True)
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pf:
        ev[0].record()
        y = layer(xs, forced=trace[args.warmup, 0])
        ev[1].record()
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as pb:
        y.backward(gy)
        ev[2].record()
        torch.cuda.synchronize()
    print(f"{strategy} top-{args.top_k} {args.routing}, {args.tokens} tokens, "
          f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print(f"  forward  {ev[0].elapsed_time(ev[1]):8.2f} ms (events)")
    print(op_table(pf, "CUDA", args.rows))
    print(op_table(pf, "CPU", args.rows))
    print(f"  backward {ev[1].elapsed_time(ev[2]):8.2f} ms (events, incl. forward sync gap)")
    print(op_table(pb, "CUDA", args.rows))
    print(op_table(pb, "CPU", args.rows))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--strategy", default="ep",
                   help="ep, hp, fsep, or several separated by commas")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--routing", default="uniform", choices=["uniform", "zipf"])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=15)
    args = p.parse_args()
    strategies = args.strategy.split(",")
    if bad := set(strategies) - {"ep", "hp", "fsep"}:
        p.error(f"--strategy: unknown {sorted(bad)}")
    env = init_distributed("cuda", timeout_s=120)
    for strategy in strategies:
        profile_layer(strategy, args, env)
    return 0


if __name__ == "__main__":
    sys.exit(main())
