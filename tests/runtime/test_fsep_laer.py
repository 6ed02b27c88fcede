"""The runtime's FSEP layer as LAER-MoE runs it (issue 16 items 1, 2, 4), on 2 and 4 gloo
processes laid out as two virtual nodes: two linked layers (the next layer's weights gathered
after this layer's token dispatch, the previous layer's re-gathered when backward reaches this
one), three passes planned by LAER's greedy from the earlier passes (the static round robin
first), node-local routing, every slot filled (duplicates allowed), weights freed after
forward and gathered again in backward, gradients returned by the reverse all-to-all and
summed over replicas. Checked against the float64 single-process reference (outputs, input
gradients, every weight gradient) and, in fp32, byte for byte against planner.traffic."""

from __future__ import annotations

import numpy as np
import torch

from moesim.config import ClusterConfig, ModelConfig, PlannerConfig
from runtime.comm import DistEnv, all_reduce_grads, record_bytes
from tests.runtime.harness import run_ranks

T = 10  # tokens per rank and pass


def _model(latent: bool) -> ModelConfig:
    if latent:
        return ModelConfig(num_layers=2, d_model=16, d_ffn=8, num_experts=4, top_k=2,
                           num_heads=2, head_dim=6, dtype="fp32", attn_heads=2)
    return ModelConfig(num_layers=2, d_model=12, d_ffn=10, num_experts=8, top_k=2,
                       dtype="fp32", attn_heads=2)


def _counts(m: ModelConfig, world: int, seed: int) -> np.ndarray:
    from traces.generators import TraceSpec, generate
    spec = TraceSpec(kind="zipf", steps=1, layers=1, shards=world, experts=m.num_experts,
                     heads=m.num_heads, top_k=m.top_k, tokens_per_shard=T, seed=seed,
                     params={"exponent": 1.5})
    return generate(spec).counts[0, 0]


def _check(rank, world, latent, dtype_name):
    from planner.traffic import layer_traffic
    from runtime.experts import ReferenceMoE, init_moe_weights
    from runtime.layers_fsep import FSEPMoE
    from runtime.plans import OnlineLayouts
    dtype = getattr(torch, dtype_name)
    m = _model(latent)
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo")
    cluster = ClusterConfig(nodes=2, gpus_per_node=world // 2)
    slots = -(-m.total_experts // world) + 1  # room to replicate the hot experts
    layouts = OnlineLayouts(m, world, PlannerConfig(solver="laer", slots_per_rank=slots),
                            cluster)
    ws = [init_moe_weights(m, seed=10 + i) for i in range(2)]
    layers = [FSEPMoE(m, w, i, env, layouts).to(dtype) for i, w in enumerate(ws)]
    layers[0].link(next_=layers[1])
    layers[1].link(prev=layers[0])
    refs = [ReferenceMoE(m, {k: v.to(torch.float64) for k, v in w.items()}) for w in ws]
    tol = {"rtol": 1e-9, "atol": 1e-10} if dtype == torch.float64 else \
        {"rtol": 1e-4, "atol": 1e-5}
    for step in range(3):
        forced = [_counts(m, world, 100 * step + i) for i in range(2)]
        x = torch.randn(world * T, m.d_model, generator=torch.Generator().manual_seed(step),
                        dtype=torch.float64, requires_grad=True)
        for mod in (*layers, *refs):
            mod.zero_grad(set_to_none=True)
        h = x
        for ref, f in zip(refs, forced, strict=True):
            h = ref(h, forced=f, tokens_per_rank=T)
        wgt = torch.linspace(-1, 1, h.numel(), dtype=torch.float64).view_as(h)
        (h * wgt).sum().backward()
        sl = slice(rank * T, (rank + 1) * T)
        xr = x.detach()[sl].to(dtype).requires_grad_(True)
        with record_bytes() as log:
            y = xr
            for layer, f in zip(layers, forced, strict=True):
                y = layer(y, forced=f)
            (y * wgt[sl].to(dtype)).sum().backward()
        for layer in layers:
            all_reduce_grads(layer.replicated_parameters())
        torch.testing.assert_close(y.double(), h.detach()[sl], **tol)
        torch.testing.assert_close(xr.grad.double(), x.grad[sl], **tol)
        for li, (layer, ref) in enumerate(zip(layers, refs, strict=True)):
            for name, got, want in layer.reference_grads(ref):
                torch.testing.assert_close(got.double(), want, **tol,
                                           msg=f"step {step} layer {li} {name}")
            p = layer.last_placement
            assert (p.slots_per_rank() == slots).all()  # every slot filled
            assert p.routing == "node_local" and p.node_size == world // 2
            if step == 0:  # no history yet: the static round robin
                from planner.laer import static_layout
                assert np.array_equal(p.slot_matrix(),
                                      static_layout(m.total_experts, world, slots))
            # planned from earlier passes only
            assert set(layouts.schedule.read.get((step, li), ())) <= set(range(step))
            if dtype == torch.float32:
                want = layer_traffic(m, p, layer.seen_counts())
                got = {k[1:] for k in log.sent if k[0] == li}
                assert got == set(want.phases), (sorted(got), sorted(want.phases))
                for key, mtx in want.phases.items():
                    np.testing.assert_array_equal(log.sent[(li, *key)], mtx[rank],
                                                  err_msg=f"step {step} {key}")
                    np.testing.assert_array_equal(log.received[(li, *key)], mtx[:, rank],
                                                  err_msg=f"step {step} {key}")
                # node-local: a token crosses nodes only for an expert its node lacks
                tok = layer.last_traffic.tokens
                g = world // 2
                home = p.slot_matrix().reshape(m.total_experts, 2, g).sum(2) > 0
                for s in range(world):
                    cross = (p.replica_rank // g) != s // g
                    assert tok[s, cross & home[p.replica_expert, s // g]].sum() == 0


def _check_all(rank, world):
    for case in ((False, "float64"), (True, "float64"), (False, "float32")):
        try:
            _check(rank, world, *case)
        except AssertionError as e:
            raise AssertionError(f"case (latent, dtype) = {case}: {e}") from e


def test_fsep_laer_2_ranks_two_nodes():
    run_ranks(2, _check_all)


def test_fsep_laer_4_ranks_two_nodes():
    run_ranks(4, _check_all)
