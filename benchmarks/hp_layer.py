"""The runtime's HP layer step before and after the IO-aware kernels, at the paper's shapes.

    torchrun --standalone --nproc-per-node N benchmarks/hp_layer.py --out DIR [--cpu]

Multi-Head LatentMoE layers inside the limits of kerner-lab/Sparse-GPT-Pretraining
(src/model/modules/ffwd/mh_moe_hp_nrt.py: head size 64/128/256, experts a multiple of 16,
expert width a multiple of 128, 2-matrix GELU experts, top-k 4 and 8, sequence 2048), HP on
every GPU of the machine, forward + backward of one layer (benchmarks/runtime.py's
`bench_layer`: warm-up, timed steps back to back, per-phase CUDA events, a run directory for
`moesim validate`). Each model runs twice: run.kernels = "baseline" (the dense torch router
and the grouped GEMMs + GELU, what the runtime ran before) and "auto" (the streaming router and
the fused thin-expert kernel wherever runtime.kernels_bridge measures them faster; its choices
are printed and kept in DIR/summary.json). Routing is forced from a uniform synthetic trace
(the load is controlled, the router's gates stay learned).

--cpu runs the same code on gloo with tiny shapes (the smoke test before spending GPU time).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.runtime import bench_layer
from moesim.atomic import write_text_atomic
from moesim.config import ModelConfig
from runtime import kernels_bridge
from runtime.comm import init_distributed
from runtime.rundir import machine_meta

# 4 sequences of 2048 tokens a GPU.
TOKENS = 8192


def models(cpu: bool, world: int) -> list[ModelConfig]:
    """Two paper-shaped layers: 16 heads of 128 (latent 2048) and of 64 (latent 1024), 64
    GELU experts a head of width 1024 and 512, top-8 (the paper's granularity arms double the
    experts and halve their width at the same parameters: the second is that arm of a 64-wide
    head)."""
    heads = max(16, world)
    base = ModelConfig(name="hp-h128-e64x1024-k8", num_layers=1, d_model=2048, d_ffn=1024,
                       num_experts=64, top_k=8, num_heads=heads, head_dim=128, dtype="bf16",
                       attn_heads=16, expert_kind="gelu", seq_len=2048)
    if cpu:
        return [dataclasses.replace(base, name="hp-cpu", d_model=64, d_ffn=32, num_experts=16,
                                    top_k=4, num_heads=max(4, world), head_dim=16,
                                    dtype="fp32", attn_heads=4)]
    return [base, dataclasses.replace(base, name="hp-h64-e64x512-k8", d_model=1024, d_ffn=512,
                                      head_dim=64)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cpu", action="store_true")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    env = init_distributed("cpu" if args.cpu else "cuda", timeout_s=300)
    meta = machine_meta(env.world, env.backend, env.device.type)
    tokens = 32 if args.cpu else TOKENS
    results = []
    for m in models(args.cpu, env.world):
        for kernels in ("baseline", "auto"):
            name = f"{m.name}-{kernels}"
            res = bench_layer(name, "hp", m, "uniform", tokens, args.steps, args.warmup, env,
                              args.out / "runs" / name, meta, kernels=kernels)
            res["kernels"] = kernels
            results.append(res)
            if env.rank == 0:
                print(f"{name:<34} step {res['step_s'] * 1e3:8.3f} ms  router fwd "
                      f"{res.get('fwd_router_s', 0) * 1e3:6.3f} bwd "
                      f"{res.get('bwd_router_s', 0) * 1e3:6.3f}  expert fwd "
                      f"{res.get('fwd_expert_s', 0) * 1e3:6.3f} bwd "
                      f"{res.get('bwd_expert_s', 0) * 1e3:6.3f} ms", flush=True)
    if env.rank == 0:
        choices = {" ".join(map(str, k)): v for k, v in kernels_bridge.CHOICES.items()}
        write_text_atomic(args.out / "summary.json", json.dumps(
            {"meta": meta, "results": results, "kernel_choices": choices}, indent=1,
            default=str))
        print(f"{'model':<26} {'baseline ms':>12} {'auto ms':>10} {'speed-up':>9}")
        for m in models(args.cpu, env.world):
            b, a = (next(r["step_s"] for r in results if r["name"] == f"{m.name}-{k}")
                    for k in ("baseline", "auto"))
            print(f"{m.name:<26} {b * 1e3:12.3f} {a * 1e3:10.3f} {b / a:9.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
