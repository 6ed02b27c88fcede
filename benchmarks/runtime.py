"""Device benchmark of the runtime's MoE layers: EP, HP and FSEP on the lent 2xH200, one call.

    torchrun --standalone --nproc-per-node 2 benchmarks/runtime.py --out DIR [--cpu]

1. NCCL all_to_all_single sweep (bytes each rank sends each other rank, 64 KiB..512 MiB):
   median time and bandwidth -> DIR/nccl_a2a.csv (the simulator's calibration format).
2. For EP, HP and FSEP, top-k in {2,4,8}, routing uniform and Zipf-1.2 (forced from
   traces.generators, so the load is controlled): one MoE layer, forward + backward, warm-up
   then timed steps. Per phase medians (CUDA events), the layer step (max over ranks), and,
   for EP and HP, NCCL all_to_all_single on exactly the same splits, timed in the same run.
   Each configuration leaves a run directory DIR/runs/<name>/ (config.toml, results.parquet,
   trace.parquet, plan.json for FSEP, meta.json).
3. DIR/summary.json and a printed table.

--cpu runs the same code on gloo with tiny shapes (the smoke test before spending GPU time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesim.atomic import write_text_atomic
from moesim.config import ClusterConfig, Config, ModelConfig, ParallelConfig, RunConfig
from runtime.calibrate import median_seconds
from runtime.comm import init_distributed
from runtime.experts import init_moe_weights
from runtime.kernels_bridge import expert_backend
from runtime.layers import build_layer
from runtime.rundir import machine_meta, write_run_dir
from runtime.timing import PhaseTimer


def median_time(fn, iters: int, warmup: int, cuda: bool) -> float:
    return median_seconds(fn, iters, "cuda" if cuda else "cpu", warmup)


def max_over_ranks(v: float) -> float:
    t = torch.tensor([v], dtype=torch.float64,
                     device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def nccl_sweep(dev, cuda: bool, sizes: list[int], iters: int) -> list[dict]:
    world = dist.get_world_size()
    rows = []
    for size in sizes:
        n = size // 2  # bf16 elements each rank sends each rank
        x = torch.ones(world * n, dtype=torch.bfloat16, device=dev)
        y = torch.empty_like(x)
        t = median_time(lambda x=x, y=y: dist.all_to_all_single(y, x), iters, 3, cuda)
        t = max_over_ranks(t)
        rows.append({"bytes_per_peer": size, "time_s": t, "gbps": size / t / 1e9})
    return rows


def latency_from_sweep(sweep: list[dict], small: int = 256 * 1024) -> float:
    """The collectives' fixed cost on this machine: the median all_to_all_single time over the
    sweep's sizes of at most `small` bytes per peer, where the bytes' own time is negligible
    (written into each run's cluster.collective_latency_us, so `moesim validate` replays the
    run with the latency measured in the same call)."""
    times = [r["time_s"] for r in sweep if r["bytes_per_peer"] <= small]
    return float(np.median(times)) if times else 10e-6


def nccl_same_splits(send: list[int], recv: list[int], width: int, dev, cuda: bool,
                     iters: int) -> float:
    x = torch.empty(sum(send), width, dtype=torch.bfloat16, device=dev)
    y = torch.empty(sum(recv), width, dtype=torch.bfloat16, device=dev)
    return median_time(lambda: dist.all_to_all_single(y, x, recv, send), iters, 3, cuda)


def _copy_counts(c):
    """The layer's counts of this step, kept past the next step (a device tensor stays on the
    device: reading it back would synchronize the step)."""
    return c.clone() if isinstance(c, torch.Tensor) else c


def bench_layer(name: str, strategy: str, m: ModelConfig, routing: str, tokens: int, steps: int,
                warmup: int, env, out: Path, meta: dict, latency_s: float = 10e-6,
                kernels: str = "auto") -> dict:
    from traces.generators import TraceSpec, generate
    world, rank, dev = env.world, env.rank, env.device
    cuda = dev.type == "cuda"
    params = {"exponent": 1.2} if routing == "zipf" else {}
    trace = generate(TraceSpec(kind=routing, steps=steps + warmup, layers=1, shards=world,
                               experts=m.num_experts, heads=m.num_heads, top_k=m.top_k,
                               tokens_per_shard=tokens, seed=11, params=params)).counts
    w = init_moe_weights(m, seed=5)
    layer = build_layer(strategy, m, w, 0, env, kernels=kernels).to(dev)
    dtype = torch.bfloat16 if cuda else torch.float32
    layer.to(dtype)
    timer = PhaseTimer(dev)
    layer.timer = timer
    gen = torch.Generator(device=dev).manual_seed(rank)
    x = torch.randn(tokens, m.d_model, device=dev, dtype=dtype, generator=gen)
    gy = torch.randn(tokens, m.d_model, device=dev, dtype=dtype, generator=gen)
    rows, counts, placements, step_times, expert_fb = [], [], {}, [], []
    timed = []  # (step's spans, its end stamp, the layer's counts), read after the loop
    for s in range(warmup + steps):
        xs = x.detach().requires_grad_(True)
        layer.zero_grad(set_to_none=True)  # a training step's gradients start from nothing
        # Steps back to back, as in training: no synchronize at the boundary (the host queues
        # this step while the GPU finishes the last); the events are read after the loop.
        timer.start_step(s - warmup, sync=False)
        y = layer(xs, forced=trace[s, 0])
        y.backward(gy)
        end = timer.now()
        if s < warmup:
            continue
        timed.append((timer.end_step(), end, _copy_counts(layer.last_counts)))
        if getattr(layer, "last_placement", None) is not None:
            placements[(s - warmup, 0)] = layer.last_placement
    for spans, end, seen in timed:
        r = timer.rows(rank, strategy, spans)
        step_times.append(timer.elapsed(spans, end))
        rows += r
        ex = [row["end_s"] - row["start_s"] for row in r if row["phase"] == "expert"]
        expert_fb.append(sum(ex))
        layer.last_counts = seen
        counts.append(layer.seen_counts()[None])
    all_rows = [None] * world
    dist.all_gather_object(all_rows, rows)
    step_t = [max_over_ranks(t) for t in step_times]
    exp_max = [max_over_ranks(t) for t in expert_fb]
    res = {"name": name, "strategy": strategy, "top_k": m.top_k, "routing": routing,
           "tokens_per_rank": tokens, "step_s": float(np.median(step_t)),
           "expert_fwd_bwd_slowest_s": float(np.median(exp_max))}
    flat = [r for part in all_rows for r in part]
    for ph in ("dispatch", "combine", "weight_gather", "grad_scatter", "expert", "permute",
               "router", "latent_down", "latent_up"):
        for ps in ("fwd", "bwd"):
            per_step = {}
            for r in flat:
                if r["phase"] == ph and r["pass"] == ps:
                    per_step.setdefault(r["step"], []).append(r)
            if not per_step:
                continue
            t = [max(r["end_s"] - r["start_s"] for r in v) for v in per_step.values()]
            b = [max(r["bytes"] for r in v) for v in per_step.values()]
            res[f"{ps}_{ph}_s"] = float(np.median(t))
            res[f"{ps}_{ph}_bytes_max"] = int(np.median(b))
    # NCCL on the very same splits (the last step's), for EP and HP.
    tr = getattr(layer, "last_traffic", None)
    width = m.expert_dim
    if strategy == "ep" and tr is not None:
        tok = tr.tokens
        rep_r = tr.placement.replica_rank
        send = [int(tok[rank, rep_r == d].sum()) for d in range(world)]
        recv = [int(tok[s_, rep_r == rank].sum()) for s_ in range(world)]
        res["nccl_same_splits_s"] = max_over_ranks(
            nccl_same_splits(send, recv, width, dev, cuda, steps))
    if strategy == "hp":
        per = tokens * (m.num_heads // world)
        res["nccl_same_splits_s"] = max_over_ranks(
            nccl_same_splits([per] * world, [per] * world, width, dev, cuda, steps))
        res["latent_bytes_per_peer"] = tokens * (m.num_heads // world) * m.head_dim * 2
    if rank == 0:
        # The cluster is this machine, so `moesim validate` simulates the same GPUs.
        cluster = ClusterConfig(preset="h200x2" if world == 2 else "dgx-h200", nodes=1,
                                gpus_per_node=world,
                                collective_latency_us=round(latency_s * 1e6, 2))
        cfg = Config(model=m, cluster=cluster,
                     parallel=ParallelConfig(strategy=strategy, degree=world),
                     run=RunConfig(steps=steps, seed=11, tokens_per_rank=tokens,
                                   out_dir=str(out), routing="forced", routing_kind=routing,
                                   routing_exponent=1.2, device=dev.type, kernels=kernels))
        write_run_dir(out, cfg, world, flat, counts, placements,
                      {**meta, "benchmark": res, "warmup_steps": warmup})
    return res


def models(cpu: bool, world: int = 1) -> tuple[ModelConfig, ModelConfig]:
    """The standard MoE and the Multi-Head LatentMoE of the benchmark. HP places whole heads,
    so the latent model has max(4, world) heads (the same latent width, split finer)."""
    heads = max(4, world)
    if cpu:
        std = ModelConfig(name="bench-std", num_layers=1, d_model=32, d_ffn=16, num_experts=8,
                          top_k=2, dtype="fp32", attn_heads=4)
        lat = dataclasses.replace(std, name="bench-mhl", num_heads=heads, head_dim=32 // heads)
        return std, lat
    # Standard MoE of DESIGN.md's GEMM ceiling (64 experts of 2048 x 1408), and a Multi-Head
    # LatentMoE with the same latent width (4 heads of 512 up to 4 GPUs, 8 of 256 on 8) and
    # 32 experts of d_ffn 704 per head.
    std = ModelConfig(name="bench-std", num_layers=1, d_model=2048, d_ffn=1408, num_experts=64,
                      top_k=2, dtype="bf16", attn_heads=16)
    lat = dataclasses.replace(std, name="bench-mhl", num_heads=heads, head_dim=2048 // heads,
                              d_ffn=704, num_experts=32)
    return std, lat


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--tokens", type=int, default=0, help="tokens per rank (default 16384)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--only", default="", help="comma list of strategies to run")
    args = p.parse_args()
    env = init_distributed("cpu" if args.cpu else "cuda", timeout_s=300)
    cuda = env.device.type == "cuda"
    meta = machine_meta(env.world, env.backend, env.device.type)
    meta["expert_backend"] = expert_backend(env.device,
                                            torch.bfloat16 if cuda else torch.float32)
    if env.rank == 0:
        print(f"expert FFN: {meta['expert_backend']}", flush=True)
    out = args.out
    tokens = args.tokens or (64 if args.cpu else 16384)
    sizes = [2 ** i for i in range(12, 16)] if args.cpu else [2 ** i for i in range(16, 30)]
    sweep = nccl_sweep(env.device, cuda, sizes, 5 if args.cpu else 20)
    if env.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        head = (f"# NCCL all_to_all_single on {meta.get('machine') or meta['host']}: "
                f"{env.world} x {meta.get('gpu', 'cpu')}, torch {meta['torch']}, "
                f"nccl {meta.get('nccl', '-')}, {meta['date']}\n"
                "# record: a2a; op: all_to_all_single; size: bytes each rank sends each other "
                "rank; value: bytes/s of that (size / median time); time rows: seconds\n")
        lines = ["record,op,size,value"]
        for r in sweep:
            lines.append(f"a2a,all_to_all_single,{r['bytes_per_peer']},{r['gbps'] * 1e9:.6g}")
            lines.append(f"time,all_to_all_single,{r['bytes_per_peer']},{r['time_s']:.6g}")
        write_text_atomic(out / "nccl_a2a.csv", head + "\n".join(lines) + "\n")
        for r in sweep:
            print(f"nccl a2a {r['bytes_per_peer']:>10d} B/peer  {r['time_s'] * 1e6:9.1f} us  "
                  f"{r['gbps']:7.1f} GB/s", flush=True)
    std, lat = models(args.cpu, env.world)
    only = set(args.only.split(",")) if args.only else {"ep", "hp", "fsep"}
    results = []
    for k in (2, 4, 8):
        if args.cpu and k > 2:
            continue
        for routing in ("uniform", "zipf"):
            for strategy in ("ep", "fsep", "hp"):
                if strategy not in only:
                    continue
                m = dataclasses.replace(lat if strategy == "hp" else std, top_k=k)
                name = f"{strategy}-k{k}-{routing}"
                res = bench_layer(name, strategy, m, routing, tokens, args.steps, args.warmup,
                                  env, out / "runs" / name, meta, latency_from_sweep(sweep))
                results.append(res)
                if env.rank == 0:
                    print(json.dumps(res), flush=True)
    if env.rank == 0:
        write_text_atomic(out / "summary.json", json.dumps(
            {"meta": meta, "nccl_sweep": sweep, "layers": results}, indent=1) + "\n")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    sys.exit(main())
