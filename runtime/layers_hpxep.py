"""HP x EP for Multi-Head LatentMoE: Head Parallel across head groups, EP inside a group.

The N ranks form G head groups of N / G ranks (planner/hpxep.py, which places and sizes
everything here): head h belongs to group h mod G, its experts in contiguous blocks over the
group's ranks. Each rank projects its tokens to the latent, cuts them into N / G equal parts and
sends part j's sub-tokens of group g's heads to rank (g, j): the HP all-to-all, fixed by the
batch (no size exchange). A rank routes what it received with its group's head routers, then
runs the EP token path inside its group (runtime.moe_layer.exchange: the size exchange, the
planner's splits for the EP stage, the all-to-all to the experts' ranks and back, the weighted
combine); the combined sub-tokens return by the reverse HP all-to-all and are projected up.

Parameters: the latent projections and the routers of every head on every rank (a head's router
only gets gradients on its group's ranks: the training loop's sum over the ranks is that group's
sum); the experts on their rank.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moesim.config import ModelConfig
from planner.hpxep import _parts, check_groups, hpxep_placement, hpxep_traffic
from runtime.comm import DistEnv, all_to_all
from runtime.kernels_bridge import route_items
from runtime.moe_layer import MoELayerBase
from runtime.routing import forced_choice_blocks


class HPxEPMoE(MoELayerBase):
    strategy = "hpxep"

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                 env: DistEnv, groups: int = 1) -> None:
        super().__init__(m, weights, layer, env)
        self.groups = check_groups(m, env.world, groups)
        self.per = env.world // groups
        self.group, self.local = divmod(env.rank, self.per)
        self.placement = hpxep_placement(m, env.world, groups)
        self.owned = np.flatnonzero(self.placement.replica_rank == env.rank)
        experts = torch.from_numpy(self.placement.replica_expert[self.owned])
        self.my_heads = list(range(self.group, m.num_heads, groups))
        self.router = nn.Parameter(weights["router"].clone())
        self.w1 = nn.Parameter(weights["w1"][experts].clone())
        self.w2 = nn.Parameter(weights["w2"][experts].clone())
        self.exchange_phases = ("ep_dispatch", "ep_combine")
        self._t_src: np.ndarray | None = None

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [*super().replicated_parameters(), self.router]

    def plan_traffic(self, placement, counts: np.ndarray):
        """The EP stage's traffic from the counts each rank routed (`counts` here are the
        global [N, H, E] pairs of the ranks' routed items, what exchange gathered)."""
        return hpxep_traffic(self.m, placement, None, self.groups, mid_counts=counts,
                             source_tokens=self._t_src)

    def _forced_ids(self, forced: np.ndarray, parts: np.ndarray, t: int,
                    device: torch.device) -> torch.Tensor:
        """Experts [items, heads of my group, k] of the items this rank received under forced
        routing: each source's counts dealt over all its tokens (runtime.routing), the slice of
        my part of them, sources in order (the planner's mid_counts_of deals the same way)."""
        heads = self.my_heads
        out = []
        start = int(parts[: self.local].sum())
        for s in range(self.world):
            ids = forced_choice_blocks(np.asarray(forced)[s:s + 1, heads], t, self.m.top_k,
                                       device)
            out.append(ids[start:start + int(parts[self.local])])
        return torch.cat(out)

    def forward(self, x: torch.Tensor, forced: np.ndarray | None = None) -> torch.Tensor:
        m, lay, tm, n, g = self.m, self.layer, self.timer, self.world, self.groups
        t, dh, k = x.shape[0], m.head_dim, m.top_k
        hg = m.num_heads // g
        self._t_src = np.full(n, t, dtype=np.int64)
        parts = _parts(np.int64(t), self.per)  # this rank's (and every source's) token parts
        z = self.to_items(x)  # [T, H, dh]
        with tm.fwd(lay, "dispatch") as rec:
            z = tm.bwd_in(z, lay, "dispatch")
            # Head i * G + g of group g: [T, hg, G, dh] -> [G, T, hg, dh]; a group's tokens are
            # its parts in order, so the buffer is destination-major (g, j).
            send = z.view(t, hg, g, dh).permute(2, 0, 1, 3).reshape(g * t * hg, dh)
            send_splits = [int(parts[d % self.per]) * hg for d in range(n)]
            recv_splits = [int(parts[self.local]) * hg] * n
            recv = tm.bwd_out(all_to_all(send, send_splits, recv_splits, layer=lay,
                                         phase="dispatch"), lay, "dispatch")
            rec.tokens = sum(send_splits)
        items = recv.view(-1, hg, dh)  # (source, my part's token, my group's head)
        ni = items.shape[0]
        with tm.fwd(lay, "router") as rec:
            heads = torch.tensor(self.my_heads, device=items.device)
            router = self.router.index_select(0, heads)
            if forced is None:
                local, gates = route_items(items, router, m.router, k, mode=self.kernels)
            else:
                from runtime.routing import router_probs
                idx = self._forced_ids(forced, parts, t, items.device)
                logits = torch.bmm(items.transpose(0, 1), router).transpose(0, 1)
                vals = router_probs(logits, m.router).gather(-1, idx)
                local, gates = idx, vals / vals.sum(-1, keepdim=True)
            assign = local + heads[None, :, None] * m.num_experts  # global expert ids
            rec.tokens = ni * hg
        y = self.exchange(items.reshape(ni * hg, dh), assign.reshape(ni * hg, k),
                          gates.reshape(ni * hg, k), self.placement,
                          lambda route: (self.w1, self.w2))
        with tm.fwd(lay, "combine") as rec:
            y = tm.bwd_in(y.view(ni, hg, dh).reshape(ni * hg, dh), lay, "combine")
            back = all_to_all(y, recv_splits, send_splits, layer=lay, phase="combine")
            back = back.view(g, t, hg, dh).permute(1, 2, 0, 3).reshape(t, hg * g, dh)
            y = tm.bwd_out(back, lay, "combine")
            rec.tokens = sum(send_splits)
        return self.from_items(y)

    def reference_grads(self, ref: nn.Module):
        e = torch.from_numpy(self.placement.replica_expert[self.owned])
        yield "router", self.router.grad, ref.w["router"].grad
        yield "w1", self.w1.grad, ref.w["w1"].grad[e]
        yield "w2", self.w2.grad, ref.w["w2"].grad[e]
        yield "down", self.down.grad, ref.w["down"].grad
        yield "up", self.up.grad, ref.w["up"].grad
