"""Fully Sharded Expert Parallel with per-step re-layout (LAER-MoE, arXiv 2602.11686).

Every expert's weights are split evenly over the N ranks along the FFN hidden size: rank j
holds columns j*F/N..(j+1)*F/N of each expert's gate and up projections and the same rows of
its down projection, flattened into one shard row per expert ([E_total, 3*dim*F/N]).

Each step a layout (a planner Placement with replicas and token shares) says which ranks
materialise which experts. The layer then
  1. gathers weights: an all-to-all in which rank j sends its shard of expert g to every rank
     hosting a replica of g; a rank concatenates the N shards of each of its replicas;
  2. dispatches tokens to replicas with the planner's integer splits (as EP does);
  3. runs its replicas, combines as EP does;
  4. in backward, the gather's autograd is the reverse all-to-all: each replica's weight
     gradient is cut into shards and sent back to their owners, which sum them over replicas
     (the grad_scatter phase).
The materialised weights are kept from forward to backward (not re-gathered, as an FSDP-style
implementation would do to save memory): the run directory records
`parallel.fsep_backward_gather = false` (runtime.rundir.what_ran), so the planner's traffic
for the replay has no ("bwd", "weight_gather") phase.

The layout comes from `layout(counts, layer)`, a callable: a plan replayed from plan.json, or
the online planner fed with the counts of this layer's previous step (the first step uses its
own counts). Planning ahead lets the weight all-to-all run on a side CUDA stream over a second
communicator, overlapping routing and the token dispatch (LAER-MoE's communication overlap, at
the granularity of one gather per layer: the run directory records `parallel.fsep_chunks = 1`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from moesim.config import ModelConfig
from moesim.errors import InputError
from planner.placement import Placement
from planner.traffic import weight_gather_rows
from runtime.comm import DistEnv, all_to_all, side_group
from runtime.kernels_bridge import route_items
from runtime.moe_layer import MoELayerBase, gather_rows

Layout = Callable[[np.ndarray, int], Placement]


def shard_experts(w1: torch.Tensor, w2: torch.Tensor, n: int, j: int) -> torch.Tensor:
    """Rank j's shard rows [E, P*F/n] of full weights w1 [E, dim, p*F], w2 [E, F, dim] (p = 2
    SwiGLU gate|up, p = 1 GELU up; P = (p + 1) * dim): each row is this rank's columns of
    every part of w1 side by side ([dim, p*F/n]), then its rows of the down projection
    ([F/n, dim]). With that layout one rank's gathered weights are views of the received
    buffer, and N ranks' need one copy each for w1 and w2 (`unshard`)."""
    e, f = w1.shape[0], w2.shape[1]
    parts = w1.shape[2] // f
    fs = f // n
    cols = slice(j * fs, (j + 1) * fs)
    w1_part = torch.cat([w1[:, :, p * f:(p + 1) * f][:, :, cols] for p in range(parts)], dim=2)
    return torch.cat([w1_part.reshape(e, -1), w2[:, cols, :].reshape(e, -1)], dim=1)


def _unshard_views(buf: torch.Tensor, n: int, dim: int, f: int, parts: int = 2):
    """The [m, dim, parts, n, fs] and [m, n, fs, dim] views of a [n * m, row] buffer of shards
    (source-major, replica-minor) whose merge is w1 [m, dim, parts*F] and w2 [m, F, dim]."""
    fs = f // n
    rows = buf.view(n, -1, buf.shape[-1])
    m, a = rows.shape[1], dim * parts * fs
    w1 = rows[:, :, :a].reshape(n, m, dim, parts, fs).permute(1, 2, 3, 0, 4)
    w2 = rows[:, :, a:].reshape(n, m, fs, dim).permute(1, 0, 2, 3)
    return w1, w2


class _Unshard(torch.autograd.Function):
    """Received shards [n * m, row] -> w1 [m, dim, parts*F], w2 [m, F, dim] (views when n == 1,
    one copy each otherwise). The backward writes both gradients into one buffer of the
    received layout, once: autograd's own backward of the slices and permutes zero-fills and
    adds a full-size buffer per slice (5 passes over 1.1 GB for one H200's FSEP layer)."""

    @staticmethod
    def forward(ctx, recv, n, dim, f, parts):
        ctx.n, ctx.dim, ctx.f, ctx.parts = n, dim, f, parts
        w1, w2 = _unshard_views(recv, n, dim, f, parts)
        m = w1.shape[0]
        return w1.reshape(m, dim, parts * f), w2.reshape(m, f, dim)

    @staticmethod
    def backward(ctx, g1, g2):
        n, dim, f, parts = ctx.n, ctx.dim, ctx.f, ctx.parts
        ref = g1 if g1 is not None else g2
        m = ref.shape[0]
        if n == 1 and g1 is not None and g2 is not None:
            # One rank: the received layout is [w1 | w2] per replica, a concatenation, which
            # runs vectorised (a copy into the strided views does not: 1.7 TB/s on an H200).
            return (torch.cat([g1.reshape(m, -1), g2.reshape(m, -1)], dim=1), None, None, None,
                    None)
        grad = ref.new_empty((n * m, (parts + 1) * dim * f // n))
        v1, v2 = _unshard_views(grad, n, dim, f, parts)
        for view, g in ((v1, g1), (v2, g2)):
            if g is None:
                view.zero_()
            else:
                view.copy_(g.reshape(view.shape))
        return grad, None, None, None, None


def unshard(recv: torch.Tensor, n: int, dim: int, f: int,
            parts: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """recv [n * m, (parts+1)*dim*F/n] (source j's shard of each of m replicas, source-major)
    -> w1 [m, dim, parts*F], w2 [m, F, dim] (parts 2: SwiGLU, 1: GELU)."""
    return _Unshard.apply(recv, n, dim, f, parts)


class FSEPMoE(MoELayerBase):
    strategy = "fsep"

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                 env: DistEnv, layout: Layout | None = None) -> None:
        super().__init__(m, weights, layer, env)
        if m.d_ffn % env.world:
            raise InputError("config", "model.d_ffn", f"FSEP shards the FFN hidden size over "
                             f"the {env.world} ranks: {m.d_ffn} is not a multiple")
        self.router = nn.Parameter(weights["router"].clone())
        self.shard = nn.Parameter(shard_experts(weights["w1"], weights["w2"], env.world,
                                                env.rank))
        self.layout = layout or default_layout(m, env.world)
        # The forward's materialised weights are kept for backward (no re-gather).
        self.traffic_options = {"fsep_backward_gather": False}
        self.prev_counts: np.ndarray | None = None
        self.last_placement: Placement | None = None

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [*super().replicated_parameters(), self.router]

    def _gather_ahead(self, placement: Placement) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.shard.is_cuda:
            return self.materialise(placement)
        if not hasattr(self, "_side"):
            self._side = torch.cuda.Stream()
        self._side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._side):
            return self.materialise(placement, group=side_group())

    def materialise(self, placement: Placement, group=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight all-to-all: full weights of this rank's replicas, in replica order."""
        m, n, lay, tm = self.m, self.world, self.layer, self.timer
        rep_e, rep_r = placement.replica_expert, placement.replica_rank
        with tm.fwd(lay, "weight_gather") as rec:
            # The planner's shard rows: one per slot of every rank, in replica order.
            plan_rows = weight_gather_rows(placement)
            send_splits = plan_rows[self.rank].tolist()
            recv_splits = plan_rows[:, self.rank].tolist()
            send_experts = np.concatenate([rep_e[rep_r == d] for d in range(n)])
            mine = int(send_splits[self.rank])
            shard = tm.bwd_in(self.shard, lay, "weight_gather")
            rows = gather_rows(shard, send_experts)
            recv = all_to_all(rows, send_splits, recv_splits, group=group, layer=lay,
                              phase="weight_gather", grad_phase="grad_scatter")
            w1, w2 = unshard(recv, n, m.expert_dim, m.d_ffn, m.up_width // m.d_ffn)
            w1 = tm.bwd_out(w1, lay, "weight_gather")
            row_bytes = self.shard.shape[1] * self.shard.element_size()
            rec.bytes = (sum(send_splits) - mine) * row_bytes
            rec.bwd["bytes"] = (sum(recv_splits) - recv_splits[self.rank]) * row_bytes
            rec.bwd["phase"] = "grad_scatter"
        return w1, w2

    def forward(self, x: torch.Tensor, forced: np.ndarray | None = None) -> torch.Tensor:
        m, lay = self.m, self.layer
        t = x.shape[0]
        # Plan ahead (LAER-MoE): with last step's counts the layout is known before routing,
        # so the weight all-to-all starts now, on a side stream and its own communicator, and
        # overlaps the latent projection, routing, size exchange and token dispatch. The first
        # step has no history: it plans from its own counts, in line.
        ahead = None
        if self.prev_counts is not None:
            placement = self.layout(self.prev_counts, lay)
            self.last_placement = placement
            ahead = self._gather_ahead(placement)

        def plan(counts: np.ndarray) -> Placement:
            self.prev_counts = counts
            if ahead is not None:
                return self.last_placement
            self.last_placement = self.layout(counts, lay)
            return self.last_placement

        def weights(route) -> tuple[torch.Tensor, torch.Tensor]:
            if ahead is None:
                return self.materialise(self.last_placement)
            if x.is_cuda:
                torch.cuda.current_stream().wait_stream(self._side)
            return ahead

        z = self.to_items(x)
        with self.timer.fwd(lay, "router") as rec:
            forced_here = None if forced is None else forced[self.rank][None]
            # [T, H, k], all heads in one batched GEMM and one set of kernels
            local, gates = route_items(z, self.router, m.router, m.top_k, forced_here,
                                       mode=self.kernels,
                                       balancer=self.balancer)
            offset = torch.arange(m.num_heads, device=z.device)[None, :, None] * m.num_experts
            experts = local + offset
            rec.tokens = t * m.num_heads
        y = self.exchange(z.reshape(t * m.num_heads, -1), experts.reshape(t * m.num_heads, -1),
                          gates.reshape(t * m.num_heads, -1), plan, weights)
        return self.from_items(y.view(t, m.num_heads, -1))

    def reference_grads(self, ref: nn.Module):
        yield "router", self.router.grad, ref.w["router"].grad
        want = shard_experts(ref.w["w1"].grad, ref.w["w2"].grad, self.world, self.rank)
        yield "shard", self.shard.grad, want
        if self.latent:
            yield "down", self.down.grad, ref.w["down"].grad
            yield "up", self.up.grad, ref.w["up"].grad


def default_layout(m: ModelConfig, n: int) -> Layout:
    """The online planner: the planner's LAER-style fill over this layer's recent counts."""
    from runtime.plans import online_layout
    return online_layout(m, n)
