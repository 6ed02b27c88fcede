"""moesim.sim.variants: the paper's EP baseline as a step table of EP rows with its costs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.config import Config, ModelConfig, ParallelConfig
from moesim.sim import programs as P
from moesim.sim import variants as V
from moesim.sim.compute import ComputeModel


def _ctx(variant: str = "paper", n: int = 4) -> P.StrategyContext:
    cfg = Config(model=ModelConfig(d_model=1024, d_ffn=512, num_experts=16, top_k=4,
                                   expert_kind="gelu"),
                 parallel=ParallelConfig(strategy="ep", ep_variant=variant))
    return P.StrategyContext(cfg=cfg, compute=ComputeModel.load("h200"), a2a=None,
                             dp_all_reduce=None, all_reduce_all=None, replicated_bytes=0.0,
                             n=n)


def _lin(n: int = 4) -> P.LayerInputs:
    tokens = np.array([4096, 4000, 0, 4100][:n])
    return P.LayerInputs(phases={}, expert_tokens=np.full((n, 16), 1024), tokens=tokens,
                         routed=tokens, dp_bytes=0.0)


def test_table_for_picks_the_paper_table_only_for_ep():
    assert V.table_for(_ctx().cfg, "ep") is V.EP_PAPER
    assert V.table_for(_ctx("moesim").cfg, "ep") is P.EP
    assert V.table_for(_ctx().cfg, "hp") is P.HP
    # Same rows, dependencies and keys as EP: only the costs differ.
    assert [(r.phase, r.pass_, r.stream, r.after, r.key) for r in V.EP_PAPER.rows] == \
        [(r.phase, r.pass_, r.stream, r.after, r.key) for r in P.EP.rows]


def test_paper_permute_adds_exactly_its_extras():
    # One sort, three syncs and no host split (no planner) against moesim's two sorts, one
    # sync and the split; plus the duplication, the bincount and the metadata collective.
    ctx, lin = _ctx(), _lin()
    cm, m = ctx.compute, ctx.cfg.model
    base, _, _ = P._permute(ctx, lin, "fwd", {"sorts": 1, "syncs": 3, "splits": 0})
    got, _, _ = V.paper_permute(ctx, lin, "fwd")
    a = lin.routed * m.top_k
    rb = m.d_model * m.dtype_bytes
    dup = np.where(lin.routed > 0, cm.launch_overhead + lin.routed * rb * (1 + m.top_k)
                   / cm.rates["hbm"], 0.0)
    extra = np.where(a > 0, cm.launch_overhead + 8.0 * a / cm.rates["hbm"]
                     + ctx.cfg.cluster.collective_latency_us * 1e-6, 0.0)
    np.testing.assert_allclose(got - base, dup + extra, rtol=1e-12)
    assert got[2] == 0.0  # a rank without tokens does nothing
    bb, _, _ = P._permute(ctx, lin, "bwd", {"sorts": 1, "syncs": 3, "splits": 0})
    gb, _, _ = V.paper_permute(ctx, lin, "bwd")
    np.testing.assert_allclose(gb - bb, dup, rtol=1e-12)


@pytest.mark.parametrize("pass_", ["fwd", "bwd"])
def test_paper_combine_and_experts_are_the_unfused_ops(pass_):
    ctx, lin = _ctx(), _lin()
    cm, m = ctx.compute, ctx.cfg.model
    a = lin.routed * m.top_k
    rb = m.d_model * m.dtype_bytes
    got, _, _ = V.paper_unpermute(ctx, lin, pass_)
    widths = (11 + 5 / m.top_k) * rb * a / cm.rates["hbm"]
    want = (np.where(a > 0, 7 * cm.launch_overhead + widths, 0.0) if pass_ == "bwd" else
            np.where(a > 0, 7 * cm.launch_overhead + 24.0 * a / cm.rates["hbm"] + widths, 0.0))
    np.testing.assert_allclose(got, want, rtol=1e-12)
    fused, _, _ = P.unpermute(ctx, lin, pass_)
    assert (got[lin.routed > 0] > fused[lin.routed > 0]).all()
    e_paper, f_paper, _ = V.paper_experts(ctx, lin, pass_)
    unfused = dataclasses.replace(ctx, cfg=dataclasses.replace(
        ctx.cfg, model=dataclasses.replace(m, activation="unfused")))
    e_want, f_want, _ = P.experts_regrouped(unfused, lin, pass_)
    np.testing.assert_array_equal(e_paper, e_want)
    np.testing.assert_array_equal(f_paper, f_want)


def test_hpxep_crosses_nodes_only_in_its_hp_stage():
    # 2 nodes x 4 GPUs, 4 heads (fewer than the 8 GPUs: HP alone cannot run): HP across the
    # two head groups (nodes), EP inside. Every NIC byte is the HP stage's, which is HP's
    # bytes: T x heads_of_group x head_dim to each rank of the other node.
    from moesim.config import ClusterConfig, RunConfig
    from moesim.sim.simulate import LINK_KINDS, Simulator
    from traces.generators import TraceSpec, generate

    m = ModelConfig(num_layers=1, d_model=256, d_ffn=128, num_experts=8, top_k=2, num_heads=4,
                    head_dim=64, expert_kind="gelu")
    cfg = Config(model=m, cluster=ClusterConfig(nodes=2, gpus_per_node=4),
                 parallel=ParallelConfig(strategy="hpxep", dp_grad_sync=False),
                 run=RunConfig(tokens_per_rank=256))
    trace = generate(TraceSpec(kind="zipf", steps=1, layers=1, shards=8, experts=8, heads=4,
                               top_k=2, tokens_per_shard=256, seed=1))
    sim = Simulator(cfg, trace, "test")
    out = sim.simulate_step("hpxep", 0)
    lt, _ = sim._layer_traffic("hpxep", 0, 0)
    hp = lt.phases[("fwd", "dispatch")]
    cross = sum(int(hp[s, d]) for s in range(8) for d in range(8) if s // 4 != d // 4)
    assert cross == 8 * 4 * (256 // 4) * 2 * 64 * 2  # 8 sources x 4 far ranks x part x heads
    nic = out.link_bytes[LINK_KINDS.index("nic")]
    # Each crossing byte leaves one NIC and enters another, in the four HP all-to-alls (no
    # gradient all-reduce here: dp_grad_sync off).
    assert nic == pytest.approx(4 * 2 * cross, rel=1e-9)
    ep = lt.phases[("fwd", "ep_dispatch")]
    assert all(ep[s, d] == 0 for s in range(8) for d in range(8) if s // 4 != d // 4)
    assert out.step_time > 0
