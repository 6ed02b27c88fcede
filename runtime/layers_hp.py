"""Head Parallel for Multi-Head LatentMoE (arXiv 2602.04870).

Every token is projected down to its latent (H heads of head_dim) on its own rank; head h and
all of its experts live on rank h mod N (planner.placement.hp_placement), as in
kerner-lab/Sparse-GPT-Pretraining src/model/modules/ffwd/mh_moe_hp_nrt.py. One all-to-all sends
each rank every token's sub-tokens of the heads it holds: T * heads_on(dst) * head_dim elements
to every destination, fixed by the batch, so no sizes are exchanged and the bytes do not depend
on top-k or on the routing. Routing, the per-expert sort and the expert FFNs are then local to
the head's rank; the weighted per-head outputs come back by the reverse all-to-all, are
concatenated and projected up.

Kernels (`self.kernels`, run.kernels): "auto" routes with the streaming top-k router and runs
thin GELU experts in the fused expert kernel wherever they measure faster than the dense
router and the grouped GEMMs (runtime.kernels_bridge); "baseline" keeps the latter.

Replicated: the latent projections (gradients summed by the training loop). Owned by the head's
rank: the head's router and experts (no gradient exchange).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from moesim.config import ModelConfig
from moesim.errors import InputError
from planner.placement import hp_placement
from planner.traffic import head_rows
from runtime.comm import DistEnv, all_gather_counts, all_to_all
from runtime.kernels_bridge import head_expert_ffn, route_items
from runtime.moe_layer import MoELayerBase, inverse_perm, take_rows, weighted_sum
from runtime.routing import local_counts


class HPMoE(MoELayerBase):
    strategy = "hp"

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                 env: DistEnv) -> None:
        super().__init__(m, weights, layer, env)
        self.placement = hp_placement(m, env.world)
        e = m.num_experts
        head_rank = {int(g // e): int(r) for g, r in zip(self.placement.replica_expert,
                                                          self.placement.replica_rank,
                                                          strict=True)}
        self.heads_of = [sorted(h for h, r in head_rank.items() if r == d)
                         for d in range(env.world)]
        self.my_heads = self.heads_of[env.rank]
        # Head order of the send buffer (destination-major), and its inverse for the return.
        # Head h is on rank h mod N (hp_placement), so rank d's j-th head is j * N + d: viewing
        # the heads as [H/N, N] and moving N to the front packs the send buffer in one strided
        # copy (none with one rank). A gather over heads moved the latent twice and ran at a
        # third of the copy rate (~130 us against ~40 us for 67 MB on one H200).
        n = env.world
        if any(hs != list(range(d, m.num_heads, n)) for d, hs in enumerate(self.heads_of)):
            raise InputError("config", "model.num_heads", "the HP runtime packs heads for "
                             "head h on rank h mod N (planner.placement.hp_placement)")
        mine = torch.tensor(self.my_heads)
        experts = (mine[:, None] * e + torch.arange(e)).reshape(-1)
        self.router = nn.Parameter(weights["router"][mine].clone())
        self.w1 = nn.Parameter(weights["w1"][experts].clone())
        self.w2 = nn.Parameter(weights["w2"][experts].clone())
        self._rows: dict[int, np.ndarray] = {}  # tokens per rank -> planner dispatch rows

    def forward(self, x: torch.Tensor, forced: np.ndarray | None = None) -> torch.Tensor:
        m, lay, tm, n = self.m, self.layer, self.timer, self.world
        t, nh, dh, k = x.shape[0], len(self.my_heads), m.head_dim, m.top_k
        z = self.to_items(x)  # [T, H, dh]
        # The planner's rows (every rank brings T tokens: HP exchanges no sizes).
        if t not in self._rows:
            self._rows[t] = head_rows(m, self.placement, np.full(n, t))
        rows = self._rows[t]
        splits, recv_splits = rows[self.rank].tolist(), rows[:, self.rank].tolist()
        width = dh * z.element_size()
        with tm.fwd(lay, "dispatch") as rec:
            z = tm.bwd_in(z, lay, "dispatch")
            # [T, nh, N, dh] -> [N, T, nh, dh]: destination-major, local heads in order
            send = z.view(t, nh, n, dh).permute(2, 0, 1, 3).reshape(n * t * nh, dh)
            recv = tm.bwd_out(all_to_all(send, splits, recv_splits, layer=lay,
                                         phase="dispatch"), lay, "dispatch")
            rec.bytes = rec.bwd["bytes"] = (sum(splits) - splits[self.rank]) * width
            rec.tokens = sum(splits)
        items = recv.view(n * t, nh, dh)  # item (source, token, local head)
        with tm.fwd(lay, "router") as rec:
            forced_here = None if forced is None else np.asarray(forced)[:, self.my_heads]
            local, gates = route_items(items, self.router, m.router, k, forced_here,
                                       mode=self.kernels,
                                       balancer=self.balancer, blocks=n)
            offset = torch.arange(nh, device=items.device)[None, :, None] * m.num_experts
            assign = local + offset  # [n * t, nh, k]: expert ids among this rank's heads
            gates = gates.reshape(n * t * nh, k)
            rec.tokens = n * t * nh
        flat = assign.reshape(-1)
        # Every source's counts in one histogram (source s's ids shifted by s * nh * E).
        per_rank = nh * m.num_experts
        source = torch.arange(n * t, device=flat.device)[:, None, None] // t
        self.last_counts = local_counts(assign + source * per_rank, n * per_rank).view(
            n, nh, m.num_experts)
        with tm.fwd(lay, "permute") as rec:
            order = torch.argsort(flat, stable=True)
            sizes = self.last_counts.sum(0).view(-1)
            rows_in = tm.bwd_in(items.reshape(n * t * nh, dh), lay, "permute")
            rows = tm.bwd_out(take_rows(rows_in, order, k), lay, "permute")
            rec.tokens = rec.bwd["tokens"] = flat.numel()
        with tm.fwd(lay, "expert") as rec:
            rows = tm.bwd_in(rows, lay, "expert")
            out = tm.bwd_out(head_expert_ffn(rows, sizes, self.w1, self.w2, self.kernels,
                                             heads=nh), lay, "expert")
            rec.tokens = rec.bwd["tokens"] = flat.numel()
            rec.flops = m.expert_flops(flat.numel())
            rec.bwd["flops"] = 2 * rec.flops
        with tm.fwd(lay, "combine") as rec:
            out = tm.bwd_in(out, lay, "combine")
            y = weighted_sum(out, inverse_perm(order).view(n * t * nh, k), gates)
            back = all_to_all(y, recv_splits, splits, layer=lay,
                              phase="combine").view(n, t, nh, dh)
            # [N, T, nh, dh] -> [T, nh, N, dh] = [T, H, dh]: head j * N + d back in place
            y = tm.bwd_out(back.permute(1, 2, 0, 3).reshape(t, nh * n, dh), lay, "combine")
            rec.bytes = rec.bwd["bytes"] = (sum(splits) - splits[self.rank]) * width
            rec.tokens = sum(splits)
        return self.from_items(y)

    def seen_counts(self) -> np.ndarray:
        """Global [N, H, E]: every head's owner contributes its heads' counts."""
        parts = all_gather_counts(self.last_counts).cpu().numpy()  # [owner, N, nh, E]
        out = np.zeros((self.world, self.m.num_heads, self.m.num_experts), dtype=np.int64)
        for d, heads in enumerate(self.heads_of):
            out[:, heads] = parts[d]
        return out

    def reference_grads(self, ref: nn.Module):
        mine = torch.tensor(self.my_heads)
        e = self.m.num_experts
        experts = (mine[:, None] * e + torch.arange(e)).reshape(-1)
        yield "router", self.router.grad, ref.w["router"].grad[mine]
        yield "w1", self.w1.grad, ref.w["w1"].grad[experts]
        yield "w2", self.w2.grad, ref.w["w2"].grad[experts]
        yield "down", self.down.grad, ref.w["down"].grad
        yield "up", self.up.grad, ref.w["up"].grad
