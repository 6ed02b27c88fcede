"""Step tables beside the three of moesim.sim.programs: the EP baseline of the HP paper's code,
picked by `table_for` from the config (parallel.ep_variant).

EP_PAPER is EP (programs.EP, the same rows, dependencies and traffic) with the costs of the EP
baseline in kerner-lab/Sparse-GPT-Pretraining (src/model/modules/ffwd/moe_ep.py) as
runtime/moe_layer.py runs it with parallel.ep_variant = "paper":
- permute: moesim's EP permute (planner splits from the size exchange, one sync) plus the
  paper's token duplication (a copy of k rows per token before the permute), a bincount (one
  launch, a host sync), the metadata all-to-all of the per-expert counts (a collective's
  latency: its E x 8 bytes a rank are ignored) and two host reads of its splits (two syncs);
  backward: moesim's plus the duplication's sum over the k copies.
- experts: the activation as separate torch ops (model.activation taken as "unfused").
- combine: the unpermute and the weighted sum as separate fp32 torch ops
  (`ComputeModel.combine_unfused`) in place of the fused combine kernel.
Ignored: the paper's Transformer Engine kernels (moe_permute, moe_sort_chunks_by_index,
GroupedLinear) are costed as moesim's equivalents (permute, regroup, grouped GEMM).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from moesim.config import Config
from moesim.sim import programs as P

# Syncs the paper adds to moesim's one: the bincount and the two reads of the split sizes.
PAPER_EXTRA_SYNCS = 3


def paper_permute(ctx: P.StrategyContext, lin: P.LayerInputs, pass_: str) -> P.Work:
    m, cm = ctx.cfg.model, ctx.compute
    t, _, _ = P.ep_permute(ctx, lin, pass_)
    backward = pass_ == "bwd"
    t = t + cm.duplicate(lin.routed, P._row_bytes(ctx), m.top_k, backward)
    if not backward:
        a = P._assignments(ctx, lin)
        latency = ctx.cfg.cluster.collective_latency_us * 1e-6 if ctx.group_ranks > 1 else 0.0
        t = t + np.where(a > 0, cm._kernels(a, 1, 8.0 * a) + PAPER_EXTRA_SYNCS
                         * cm.sync_overhead + latency, 0.0)
    return t, None, None


def paper_experts(ctx: P.StrategyContext, lin: P.LayerInputs, pass_: str) -> P.Work:
    unfused = dataclasses.replace(ctx.cfg, model=dataclasses.replace(ctx.cfg.model,
                                                                     activation="unfused"))
    return P.experts_regrouped(dataclasses.replace(ctx, cfg=unfused), lin, pass_)


def paper_unpermute(ctx: P.StrategyContext, lin: P.LayerInputs, pass_: str) -> P.Work:
    t = ctx.compute.combine_unfused(P._assignments(ctx, lin), P._row_bytes(ctx),
                                    ctx.cfg.model.top_k, backward=pass_ == "bwd")
    return t, None, None


_SWAP = {P.ep_permute: paper_permute, P.experts_regrouped: paper_experts,
         P.unpermute: paper_unpermute}
EP_PAPER = P.Table("ep-paper", tuple(dataclasses.replace(r, cost=_SWAP.get(r.cost, r.cost))
                                     for r in P.EP.rows),
                   out=P.EP.out, steps=P.EP.steps)


def table_for(cfg: Config, strategy: str) -> P.Table:
    """The step table of `strategy` under `cfg` (EP_PAPER for EP with ep_variant "paper")."""
    if strategy == "ep" and cfg.parallel.ep_variant == "paper":
        return EP_PAPER
    return P.TABLES[strategy]
