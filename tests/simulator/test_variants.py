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
    ctx, lin = _ctx(), _lin()
    cm, m = ctx.compute, ctx.cfg.model
    base, _, _ = P.ep_permute(ctx, lin, "fwd")
    got, _, _ = V.paper_permute(ctx, lin, "fwd")
    a = lin.routed * m.top_k
    rb = m.d_model * m.dtype_bytes
    dup = np.where(lin.routed > 0, cm.launch_overhead + lin.routed * rb * (1 + m.top_k)
                   / cm.rates["hbm"], 0.0)
    extra = np.where(a > 0, cm.launch_overhead + 8.0 * a / cm.rates["hbm"]
                     + 3 * cm.sync_overhead + ctx.cfg.cluster.collective_latency_us * 1e-6, 0.0)
    np.testing.assert_allclose(got - base, dup + extra, rtol=1e-12)
    assert got[2] == 0.0  # a rank without tokens does nothing
    bb, _, _ = P.ep_permute(ctx, lin, "bwd")
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
