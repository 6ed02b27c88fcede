"""Check the runtime's GPU paths before timing them: each MoE layer in bf16 on the GPU (the
grouped GEMM, the fused SwiGLU, the combine and gather-reduce kernels, pinned uploads, FSEP's
weight views) against the float64 single-process reference on the CPU, with the same weights,
inputs and forced routing: output, input gradient and every weight gradient.

    torchrun --standalone --nproc-per-node N benchmarks/runtime_check.py

Prints one line per (strategy, tensor) with its relative error (||got - want|| / ||want||) and
exits non-zero if any exceeds the bf16 tolerance (device/METHOD.md: 1e-2; 2e-2 here, as a bf16
layer chains several bf16 roundings). The CPU tests (tests/runtime, gloo) check the same layers
in fp32 on the torch paths.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesim.config import ModelConfig
from runtime.comm import all_reduce_grads, init_distributed
from runtime.experts import ReferenceMoE, init_moe_weights
from runtime.layers import build_layer
from traces.generators import TraceSpec, generate

TOL = 2e-2
T = 512  # tokens per rank


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if not torch.isfinite(got).all():
        return float("inf")
    return ((got - want).norm() / want.norm().clamp_min(1e-300)).item()


def check(strategy: str, m: ModelConfig, env) -> list[tuple[str, float]]:
    world, rank = env.world, env.rank
    counts = generate(TraceSpec(kind="zipf", steps=1, layers=1, shards=world,
                                experts=m.num_experts, heads=m.num_heads, top_k=m.top_k,
                                tokens_per_shard=T, seed=5, params={"exponent": 1.2})).counts[0, 0]
    w = init_moe_weights(m, seed=3)
    ref = ReferenceMoE(m, {k: v.double() for k, v in w.items()})
    x = torch.randn(world * T, m.d_model, generator=torch.Generator().manual_seed(7),
                    dtype=torch.float64, requires_grad=True)
    y_ref = ref(x, forced=counts, tokens_per_rank=T)
    wgt = torch.linspace(-1, 1, y_ref.numel(), dtype=torch.float64).view_as(y_ref)
    (y_ref * wgt).sum().backward()
    dtype = torch.bfloat16 if env.device.type == "cuda" else torch.float32
    layer = build_layer(strategy, m, w, 0, env).to(env.device).to(dtype)
    sl = slice(rank * T, (rank + 1) * T)
    xr = x.detach()[sl].to(env.device, dtype).requires_grad_(True)
    y = layer(xr, forced=counts)
    (y.double() * wgt[sl].to(env.device)).sum().backward()
    all_reduce_grads(layer.replicated_parameters())
    out = [("y", rel_err(y, y_ref[sl])), ("x.grad", rel_err(xr.grad, x.grad[sl]))]
    out += [(f"{name}.grad", rel_err(got, want)) for name, got, want in layer.reference_grads(ref)]
    return out


def main() -> int:
    env = init_distributed("auto", timeout_s=120)  # the CPU (gloo, fp32) as a smoke test
    std = ModelConfig(num_layers=1, d_model=256, d_ffn=128 * env.world, num_experts=8, top_k=2,
                      attn_heads=2)
    lat = ModelConfig(num_layers=1, d_model=256, d_ffn=128, num_experts=8, top_k=2,
                      num_heads=max(4, env.world), head_dim=64, attn_heads=2)
    worst = 0.0
    for strategy, m in (("ep", std), ("hp", lat), ("fsep", std), ("ep", lat)):
        for name, err in check(strategy, m, env):
            worst = max(worst, err)
            if env.rank == 0:
                ok = "ok" if err <= TOL else "FAIL"
                print(f"{strategy:5s} heads={m.num_heads} {name:12s} rel err {err:.2e} {ok}",
                      flush=True)
    if env.rank == 0:
        print(f"runtime_check: worst {worst:.2e} (tolerance {TOL:.0e})")
    return 0 if worst <= TOL else 1


if __name__ == "__main__":
    sys.exit(main())
