"""Each distributed MoE layer, on 2 and 4 gloo processes, against the single-process reference
with the same weights and inputs: outputs, input gradients and every weight gradient."""

from __future__ import annotations

import numpy as np
import torch

from moesim.config import ModelConfig
from runtime.comm import DistEnv
from runtime.experts import ReferenceMoE, init_moe_weights
from tests.runtime.harness import run_ranks

T = 12  # tokens per rank


def model(strategy: str, latent: bool, top_k: int = 2, kind: str = "swiglu") -> ModelConfig:
    if latent or strategy == "hp":
        return ModelConfig(num_layers=1, d_model=16, d_ffn=8, num_experts=4, top_k=top_k,
                           num_heads=4, head_dim=6, dtype="fp32", attn_heads=2,
                           expert_kind=kind)
    return ModelConfig(num_layers=1, d_model=12, d_ffn=8, num_experts=8, top_k=top_k,
                       dtype="fp32", attn_heads=2, expert_kind=kind)


def forced_counts(m: ModelConfig, world: int, seed: int) -> np.ndarray:
    from traces.generators import TraceSpec, generate
    spec = TraceSpec(kind="zipf", steps=1, layers=1, shards=world, experts=m.num_experts,
                     heads=m.num_heads, top_k=m.top_k, tokens_per_shard=T, seed=seed)
    return generate(spec).counts[0, 0]


def replicated_layout(counts: np.ndarray, layer: int):
    """Every expert on its EP owner; the two hottest also on every other rank, with uneven
    shares (0.5 on the owner, the rest spread as 1, 2, ... parts)."""
    from planner.placement import replicated_placement
    n, h, e = counts.shape
    total = h * e
    share = np.zeros((total, n))
    share[np.arange(total), np.arange(total) * n // total] = 1.0
    for g in np.argsort(-counts.reshape(n, -1).sum(0), kind="stable")[:2]:
        owner = g * n // total
        others = [r for r in range(n) if r != owner]
        parts = np.arange(1, len(others) + 1, dtype=float)
        share[g] = 0.0
        share[g, owner] = 0.5
        share[g, others] = 0.5 * parts / parts.sum()
    return replicated_placement("fsep", n, share)


class ReplicatedLayouts:
    """runtime.plans.Layouts giving `replicated_layout` of each pass's own counts (known only
    after the routing, as with planner.oracle)."""

    def before(self, layer: int):
        return None

    def after(self, layer: int, counts: np.ndarray):
        return replicated_layout(counts, layer)


def reference(m: ModelConfig, world: int, forced: np.ndarray | None):
    w = init_moe_weights(m, seed=3)
    ref = ReferenceMoE(m, w)
    x = torch.randn(world * T, m.d_model, generator=torch.Generator().manual_seed(7),
                    requires_grad=True)
    y = ref(x, forced=forced, tokens_per_rank=T)
    # A loss that weighs every output element differently, so that permuted rows would show.
    wgt = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * wgt).sum().backward()
    return w, x, y, wgt, ref


def _check(rank, world, strategy, latent, top_k, use_forced, kind="swiglu", variant="moesim"):
    from runtime.layers import build_layer
    m = model(strategy, latent, top_k, kind)
    forced = forced_counts(m, world, seed=5) if use_forced else None
    w, x, y_ref, wgt, ref = reference(m, world, forced)
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo")
    kw = {"layout": ReplicatedLayouts()} if strategy == "fsep" and use_forced else {}
    layer = build_layer(strategy, m, w, layer=0, env=env, ep_variant=variant, **kw)
    sl = slice(rank * T, (rank + 1) * T)
    xr = x.detach()[sl].clone().requires_grad_(True)
    y = layer(xr, forced=forced)
    torch.testing.assert_close(y, y_ref.detach()[sl], rtol=1e-5, atol=1e-5)
    (y * wgt[sl]).sum().backward()
    from runtime.comm import all_reduce_grads
    all_reduce_grads(layer.replicated_parameters())
    torch.testing.assert_close(xr.grad, x.grad[sl], rtol=1e-5, atol=1e-5)
    for name, got, want in layer.reference_grads(ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    seen = layer.seen_counts()
    assert seen.sum() == world * T * m.num_heads * m.top_k
    if forced is not None:
        np.testing.assert_array_equal(seen, forced)
    if strategy == "fsep" and use_forced:
        # Hot experts replicated with uneven shares: splits over replicas and the gather of
        # replicated weights are exercised, not just an EP layout.
        assert layer.last_placement.num_replicas > m.total_experts


def _check_all(rank, world, cases):
    for case in cases:
        try:
            _check(rank, world, *case)
        except AssertionError as e:
            raise AssertionError(f"case (strategy, latent, top_k, forced, kind, variant) = {case}: "
                                 f"{e}") from e


# One spawn per world size runs every case: process start-up dominates on a 2-core runner.
CASES_2 = [(s, lat, 2, f) for s, lat in [("ep", False), ("ep", True), ("hp", True),
                                         ("fsep", False), ("fsep", True)]
           for f in (False, True)]
# The 2-matrix GELU expert (model.expert_kind = "gelu") on every strategy.
CASES_2 += [("ep", True, 2, False, "gelu"), ("hp", True, 2, True, "gelu"),
            ("fsep", False, 2, True, "gelu"),
            # The paper's EP baseline (parallel.ep_variant = "paper"): the same function.
            ("ep", False, 2, True, "gelu", "paper"), ("ep", True, 2, False, "swiglu", "paper")]
CASES_4 = [("ep", False, 3, True), ("ep", True, 3, False), ("hp", True, 3, True),
           ("fsep", False, 3, True), ("fsep", True, 1, False), ("hp", True, 3, False, "gelu"),
           ("fsep", True, 2, False, "gelu"), ("ep", False, 3, True, "gelu", "paper")]


def test_layers_match_reference_2_ranks():
    run_ranks(2, _check_all, CASES_2)


def test_layers_match_reference_4_ranks():
    run_ranks(4, _check_all, CASES_4)
