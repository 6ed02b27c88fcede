"""Step tables beside the three of moesim.sim.programs, picked by `table_for` from the config:
the EP baseline of the HP paper's code (parallel.ep_variant) and HP x EP (strategy "hpxep").

EP_PAPER is EP (programs.EP, the same rows, dependencies and traffic) with the costs of the EP
baseline in kerner-lab/Sparse-GPT-Pretraining (src/model/modules/ffwd/moe_ep.py) as
runtime/moe_layer.py runs it with parallel.ep_variant = "paper":
- permute: the paper's token duplication (a copy of k rows per token before the permute), one
  sort-based permute (te.moe_permute: one stable sort, the index passes and the row gather),
  a bincount (one launch, a host sync), the metadata all-to-all of the per-expert counts (a
  collective's latency: its E x 8 bytes a rank are ignored) and two host reads of its splits
  (two syncs); no planner on the host (the paper's splits come from the metadata). Backward:
  the permute's, plus the duplication's sum over the k copies. runtime/'s paper variant runs
  these on top of moesim's own size exchange and planner splits (the same splits), so it pays
  moesim EP's host work too (overhead.split, one sync, one more sort) where the paper's code
  does not.
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

# The paper EP's permute: one sort (te.moe_permute), three host syncs (the bincount and the two
# reads of the split sizes), no host split work (no planner: the metadata carries the splits).
PAPER_PERMUTE = {"sorts": 1, "syncs": 3, "splits": 0}


def paper_permute(ctx: P.StrategyContext, lin: P.LayerInputs, pass_: str) -> P.Work:
    m, cm = ctx.cfg.model, ctx.compute
    backward = pass_ == "bwd"
    t, _, _ = P._permute(ctx, lin, pass_, PAPER_PERMUTE)
    t = t + cm.duplicate(lin.routed, P._row_bytes(ctx), m.top_k, backward)
    if not backward:
        a = P._assignments(ctx, lin)
        latency = ctx.cfg.cluster.collective_latency_us * 1e-6 if ctx.group_ranks > 1 else 0.0
        t = t + np.where(a > 0, cm._kernels(a, 1, 8.0 * a) + latency, 0.0)
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


def _stage(key: str):
    """The all-to-all of the planner phase `key` (HP x EP's EP stage: "ep_dispatch",
    "ep_combine"), recorded under the row's own phase (dispatch, combine)."""
    def cost(ctx: P.StrategyContext, lin: P.LayerInputs, pass_: str, phase: str, share: float):
        return P.a2a(ctx, lin, pass_, key, share)
    return cost


F, B, COMPUTE, COMM, IN = "fwd", "bwd", P.COMPUTE, P.COMM, P.IN
# HP x EP (planner/hpxep.py): HP's rows around an EP stage inside the head group. The latent's
# heads go to their group (the HP all-to-all, fixed by the batch), each rank routes what it got,
# exchanges sizes inside its group (EP's permute: one sync) and sends every routed row to its
# expert's rank of the group (the EP all-to-all); the way back mirrors it.
HPXEP = P.Table("hpxep", (
    P.Row("latent_down", F, COMPUTE, P.latent_down, (IN,)),
    P.Row("dispatch", F, COMPUTE, P.head_pack, ("latent_down",), key="pack"),
    P.Row("dispatch", F, COMM, P.a2a, ("pack",), key="dispatch_a2a"),
    P.Row("router", F, COMPUTE, P.head_router, ("dispatch_a2a",)),
    P.Row("permute", F, COMPUTE, P.ep_permute, ("router",)),
    P.Row("dispatch", F, COMM, _stage("ep_dispatch"), ("permute",), key="ep_dispatch_a2a"),
    P.Row("expert", F, COMPUTE, P.experts_regrouped, ("ep_dispatch_a2a",)),
    P.Row("combine", F, COMM, _stage("ep_combine"), ("expert",), key="ep_combine_a2a"),
    P.Row("combine", F, COMPUTE, P.unpermute, ("ep_combine_a2a",)),
    P.Row("combine", F, COMM, P.a2a, ("combine",), key="combine_a2a"),
    P.Row("combine", F, COMPUTE, P.head_pack, ("combine_a2a",), key="unpack"),
    P.Row("latent_up", F, COMPUTE, P.latent_up, ("unpack",)),
    P.Row("latent_up", B, COMPUTE, P.latent_up, (IN,)),
    P.Row("combine", B, COMPUTE, P.head_pack, ("latent_up",), key="unpack"),
    P.Row("combine", B, COMM, P.a2a, ("unpack",), key="combine_a2a"),
    P.Row("combine", B, COMPUTE, P.unpermute, ("combine_a2a",)),
    P.Row("combine", B, COMM, _stage("ep_combine"), ("combine",), key="ep_combine_a2a"),
    P.Row("expert", B, COMPUTE, P.experts_regrouped, ("ep_combine_a2a",)),
    P.Row("dispatch", B, COMM, _stage("ep_dispatch"), ("expert",), key="ep_dispatch_a2a"),
    P.Row("permute", B, COMPUTE, P.ep_permute, ("ep_dispatch_a2a",)),
    P.Row("router", B, COMPUTE, P.head_router, ("permute",)),
    P.Row("dispatch", B, COMM, P.a2a, ("router",), key="dispatch_a2a"),
    P.Row("dispatch", B, COMPUTE, P.head_pack, ("dispatch_a2a",), key="pack"),
    P.Row("latent_down", B, COMPUTE, P.latent_down, ("pack",)),
    P.Row("grad_sync", B, COMM, P.a2a, ("expert",), key="replica_sync", when=P.replica_synced),
    P.Row("grad_sync", B, COMM, P.dp_all_reduce, ("expert",), key="dp_sync", when=P.dp_synced),
), out={F: "latent_up", B: "latent_down"}, steps=P.FINAL_SYNC)


def table_for(cfg: Config, strategy: str) -> P.Table:
    """The step table of `strategy` under `cfg` (EP_PAPER for EP with ep_variant "paper",
    HPXEP for "hpxep")."""
    if strategy == "hpxep":
        return HPXEP
    if strategy == "ep" and cfg.parallel.ep_variant == "paper":
        return EP_PAPER
    return P.TABLES[strategy]
