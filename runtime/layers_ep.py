"""Expert Parallel: experts partitioned over the ranks (contiguous blocks, planner.placement.
ep_placement); each rank routes its own tokens, the ranks exchange their per-expert counts (the
size exchange), planner.traffic turns the counts into the all-to-all splits, tokens go to their
experts' owners, and come back by the reverse all-to-all for the weighted combine.

Router (and the latent projections of Multi-Head LatentMoE) are replicated: their gradients
are summed over the ranks by the training loop.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moesim.config import ModelConfig
from planner.placement import ep_placement
from runtime.comm import DistEnv
from runtime.kernels_bridge import route_items
from runtime.moe_layer import MoELayerBase


class EPMoE(MoELayerBase):
    strategy = "ep"

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                 env: DistEnv) -> None:
        super().__init__(m, weights, layer, env)
        self.placement = ep_placement(m.total_experts, env.world)
        self.owned = np.flatnonzero(self.placement.replica_rank == env.rank)
        experts = torch.from_numpy(self.placement.replica_expert[self.owned])
        self.router = nn.Parameter(weights["router"].clone())
        self.w1 = nn.Parameter(weights["w1"][experts].clone())
        self.w2 = nn.Parameter(weights["w2"][experts].clone())

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [*super().replicated_parameters(), self.router]

    def forward(self, x: torch.Tensor, forced: np.ndarray | None = None) -> torch.Tensor:
        m, lay = self.m, self.layer
        t = x.shape[0]
        z = self.to_items(x)  # [T, H, dim]
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
                          gates.reshape(t * m.num_heads, -1), self.placement,
                          lambda route: (self.w1, self.w2))
        return self.from_items(y.view(t, m.num_heads, -1))

    def reference_grads(self, ref: nn.Module):
        """(name, this rank's gradient, the reference's matching slice) for the tests."""
        e = torch.from_numpy(self.placement.replica_expert[self.owned])
        yield "router", self.router.grad, ref.w["router"].grad
        yield "w1", self.w1.grad, ref.w["w1"].grad[e]
        yield "w2", self.w2.grad, ref.w["w2"].grad[e]
        if self.latent:
            yield "down", self.down.grad, ref.w["down"].grad
            yield "up", self.up.grad, ref.w["up"].grad
