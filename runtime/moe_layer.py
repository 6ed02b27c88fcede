"""What every distributed MoE layer shares: the latent projections of Multi-Head LatentMoE, the
routing of items, the token exchange through planner splits, and the weighted combine.

A layer is called on this rank's tokens x [T, d_model] and returns y [T, d_model]; with the
same full weights (runtime.experts.init_moe_weights) every strategy computes the same function
as runtime.experts.ReferenceMoE on the concatenation of all ranks' tokens. `forced` is the
global counts [N, H, E] of this (step, layer) under forced routing, else None. After a forward,
`last_counts` holds the counts the layer saw (this rank's row for EP/FSEP, gathered lazily for
the trace recorder by `seen_counts()`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kernels.backend import use_triton
from kernels.combine import gather_reduce
from moesim.config import ModelConfig
from planner.capacity import Capacity
from planner.traffic import LayerTraffic, layer_traffic
from runtime.balancing import Balancer, capacity_slots
from runtime.comm import DistEnv, all_gather_counts, all_to_all
from runtime.dispatch import build_route
from runtime.experts import expert_ffn
from runtime.routing import local_counts
from runtime.timing import PhaseTimer
from runtime.upload import upload


def inverse_perm(p: torch.Tensor) -> torch.Tensor:
    inv = torch.empty_like(p)
    inv[p] = torch.arange(p.numel(), device=p.device)
    return inv


class _TakeRows(torch.autograd.Function):
    """y = x.index_select(0, order // k), `order` a permutation of range(k * len(x)): every
    row of x is taken exactly k times. The backward sums each row's k gradients through the
    inverse permutation with the combine kernel's gather-reduce (kernels.combine, one pass;
    index_select and a sum where Triton does not run). index_select's own backward scatters
    with index_add (bf16 atomics): 6.7 ms against ~1 ms at 131k x 2048 rows on one H200, and
    not deterministic."""

    @staticmethod
    def forward(ctx, x, order, k):
        ctx.save_for_backward(order)
        ctx.k = k
        return x.index_select(0, order // k if k > 1 else order)

    @staticmethod
    def backward(ctx, g):
        (order,) = ctx.saved_tensors
        row_map = inverse_perm(order).view(-1, ctx.k)  # row_map[t, j]: y's row of copy j of t
        if ctx.k == 1:
            return g.index_select(0, row_map.view(-1)), None, None
        rows = g.reshape(g.shape[0], -1)
        if use_triton(rows):
            gx = gather_reduce(rows.contiguous(), row_map.to(torch.int32), None)
        else:
            gx = rows.index_select(0, row_map.reshape(-1)).view(*row_map.shape, -1).sum(1)
        return gx.view(row_map.shape[0], *g.shape[1:]), None, None


def take_rows(x: torch.Tensor, order: torch.Tensor, k: int = 1) -> torch.Tensor:
    """x.index_select(0, order // k) with a gather for a backward (see _TakeRows); k = 1 is a
    permutation."""
    return _TakeRows.apply(x, order, k)


class _GatherRows(torch.autograd.Function):
    """y = x.index_select(0, index) for any index (rows taken 0..m times). The backward sums
    each row's gradients with a ragged gather-reduce (kernels.combine.gather_reduce, padded)
    from a [rows, m] map built on the host with the index, instead of index_add's bf16 atomics:
    one pass, deterministic; FSEP's 1.1 GB of weight gradients took ~10 ms with index_add on
    one H200."""

    @staticmethod
    def forward(ctx, x, index, row_map):
        ctx.save_for_backward(index, row_map)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, g):
        index, row_map = ctx.saved_tensors
        rows, width = row_map.shape
        if not use_triton(g) or width == 0:
            gx = g.new_zeros((rows, *g.shape[1:]))
            return gx.index_add_(0, index, g), None, None
        flat = g.reshape(g.shape[0], -1)
        d = flat.shape[1]
        # A shard row is megabytes: cut every row into c pieces so that the kernel's one
        # program per output row becomes rows * c programs (64 rows would leave most SMs idle).
        c = 1
        while d % (2 * c) == 0 and d // (2 * c) >= 8192:
            c *= 2
        piece = torch.arange(c, device=g.device, dtype=torch.int32)
        rm = row_map.to(torch.int32)[:, None, :]
        sub = torch.where(rm >= 0, rm * c + piece[None, :, None], -1).reshape(rows * c, width)
        gx = gather_reduce(flat.contiguous().view(-1, d // c), sub, None, padded=True)
        return gx.view(rows, *g.shape[1:]), None, None


def gather_rows(x: torch.Tensor, index: np.ndarray) -> torch.Tensor:
    """x.index_select(0, index) with a one-pass gather-reduce backward (see _GatherRows).
    `index` is a host array (the FSEP send list): the backward's map is built from it here,
    and both go up in one pinned copy."""
    index = np.asarray(index, dtype=np.int64)
    rows = x.shape[0]
    counts = np.bincount(index, minlength=rows)
    width = int(counts.max()) if index.size else 0
    order = np.argsort(index, kind="stable")
    starts = np.cumsum(counts) - counts
    slot = np.arange(width)
    pick = np.minimum(starts[:, None] + slot[None, :], max(index.size - 1, 0))
    row_map = np.where(slot[None, :] < counts[:, None], order[pick] if index.size else -1, -1)
    index_d, row_map_d = upload(index, row_map, device=x.device)
    return _GatherRows.apply(x, index_d, row_map_d)


class MoELayerBase(nn.Module):
    strategy = ""

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                 env: DistEnv) -> None:
        super().__init__()
        self.m, self.layer, self.env = m, layer, env
        self.rank, self.world = env.rank, env.world
        self.timer = PhaseTimer(torch.device("cpu"), enabled=False)
        self.latent = m.num_heads > 1
        # run.kernels: "auto" takes the streaming router / fused experts where they measure
        # faster (runtime.kernels_bridge), "baseline" never (build_layer sets it).
        self.kernels = "auto"
        # parallel.ep_variant "paper": the EP baseline of kerner-lab/Sparse-GPT-Pretraining
        # (src/model/modules/ffwd/moe_ep.py) in `exchange` (build_layer sets it).
        self.paper_ep = False
        # Planner phases of `exchange`'s two all-to-alls (runtime.comm.record_bytes names).
        self.exchange_phases = ("dispatch", "combine")
        if self.latent:
            self.down = nn.Parameter(weights["down"].clone())
            self.up = nn.Parameter(weights["up"].clone())
        self.last_counts: torch.Tensor | None = None  # int64 [N, H, E] or this rank's [H, E]
        self.last_traffic: LayerTraffic | None = None
        # planner.traffic.layer_traffic options of this strategy's runtime (FSEP: whether
        # backward gathers the weights again)
        self.traffic_options: dict = {}
        # Load balancing (runtime.balancing), set by the model from the [routing] config.
        self.balancer: Balancer | None = None
        self.capacity: Capacity | None = None
        self.drop_policy = "probs"

    # Parameters every rank holds a full copy of: their gradients are summed over the ranks.
    def replicated_parameters(self) -> list[nn.Parameter]:
        return [self.down, self.up] if self.latent else []

    def to_items(self, x: torch.Tensor) -> torch.Tensor:
        """[T, d_model] -> items [T, H, dim] (the latent's heads, or the tokens themselves)."""
        if not self.latent:
            return x.unsqueeze(1)
        with self.timer.fwd(self.layer, "latent_down") as rec:
            x = self.timer.bwd_in(x, self.layer, "latent_down")
            z = self.timer.bwd_out(x @ self.down, self.layer, "latent_down")
            rec.flops = rec.bwd["flops"] = 2.0 * x.shape[0] * self.down.numel()
            rec.bwd["flops"] *= 2
        return z.view(x.shape[0], self.m.num_heads, self.m.head_dim)

    def from_items(self, y: torch.Tensor) -> torch.Tensor:
        t = y.shape[0]
        y = y.reshape(t, -1)
        if not self.latent:
            return y
        with self.timer.fwd(self.layer, "latent_up") as rec:
            y = self.timer.bwd_in(y, self.layer, "latent_up")
            out = self.timer.bwd_out(y @ self.up, self.layer, "latent_up")
            rec.flops = 2.0 * t * self.up.numel()
            rec.bwd["flops"] = 2 * rec.flops
        return out

    def exchange(self, items: torch.Tensor, assign: torch.Tensor, gates: torch.Tensor,
                 placement, expert_weights) -> torch.Tensor:
        """The EP/FSEP token path: items [n, dim], assign [n, k] global experts, gates [n, k].
        The "permute" phase holds the size exchange (every rank's per-expert counts), the
        planner's splits and the local gather. `expert_weights(route)` returns the (w1, w2) of
        the local replicas, in replica order."""
        k, lay, tm = self.m.top_k, self.layer, self.timer
        n, dim = items.shape
        with tm.fwd(lay, "permute") as rec:
            m = self.m
            counts_local = local_counts(assign, m.total_experts).view(m.num_heads, m.num_experts)
            counts = gather_global_counts(counts_local)
            self.last_counts = torch.from_numpy(counts)
            if callable(placement):  # FSEP: the layout may depend on this step's counts
                placement = placement(counts)
            traffic = self.plan_traffic(placement, counts)
            self.last_traffic = traffic
            slots = None if self.capacity is None else self._capacity_slots(assign, gates)
            flat = assign.reshape(-1) if slots is None else slots[1]
            route = build_route(placement, traffic.tokens, self.rank, flat, items.device)
            items = tm.bwd_in(items, lay, "permute")
            if self.paper_ep:
                # The paper's EP: tokens duplicated k times (a copy), permuted by expert, the
                # counts by a bincount (a host sync), a metadata all-to-all of the per-expert
                # counts and two host reads of its splits before the token all-to-all. The
                # splits used are still the planner's (the metadata carries the same numbers).
                send = take_rows(items.unsqueeze(1).expand(n, k, dim).reshape(n * k, dim),
                                 route.send_order, 1)
                _paper_metadata_exchange(flat, m.total_experts, self.world)
            elif slots is None:
                send = take_rows(items, route.send_order, k)
            else:  # rows kept (and padding) under capacity: any number per item
                send = items.index_select(0, slots[0][route.send_order])
            send = tm.bwd_out(send, lay, "permute")
            rec.tokens = rec.bwd["tokens"] = flat.numel()
        width = dim * send.element_size()
        with tm.fwd(lay, "dispatch") as rec:
            send = tm.bwd_in(send, lay, "dispatch")
            recv = tm.bwd_out(all_to_all(send, route.send_splits, route.recv_splits,
                                         layer=lay, phase=self.exchange_phases[0]), lay,
                              "dispatch")
            rec.bytes = _sent(route.send_splits, self.rank) * width
            rec.bwd["bytes"] = _sent(route.recv_splits, self.rank) * width
            rec.tokens = sum(route.send_splits)
        w1, w2 = expert_weights(route)
        with tm.fwd(lay, "expert") as rec:
            recv = tm.bwd_in(recv, lay, "expert")
            grouped = take_rows(recv, route.recv_to_group)
            out = expert_ffn(grouped, route.group_sizes, w1, w2, unfused=self.paper_ep)
            out = take_rows(out, inverse_perm(route.recv_to_group))
            out = tm.bwd_out(out, lay, "expert")
            rows = int(sum(route.group_sizes))
            rec.tokens = rec.bwd["tokens"] = rows
            rec.flops = self.m.expert_flops(rows)
            rec.bwd["flops"] = 2 * rec.flops
        with tm.fwd(lay, "combine") as rec:
            out = tm.bwd_in(out, lay, "combine")
            back = all_to_all(out, route.recv_splits, route.send_splits, layer=lay,
                              phase=self.exchange_phases[1])
            if self.paper_ep:
                # Unpermuted rows, then the weighted sum as separate fp32 torch ops.
                picked = back.index_select(0, inverse_perm(route.send_order)).view(n, k, dim)
                y = (picked.float() * gates.float()[..., None]).sum(1).to(back.dtype)
            elif slots is None:
                row_map = inverse_perm(route.send_order).view(n, k)
                y = weighted_sum(back, row_map, gates)
            else:
                g = slots[2][route.send_order].to(back.dtype)
                y = back.new_zeros((n, back.shape[1])).index_add(
                    0, slots[0][route.send_order], back * g[:, None])
            y = tm.bwd_out(y, lay, "combine")
            rec.bytes = _sent(route.recv_splits, self.rank) * width
            rec.bwd["bytes"] = _sent(route.send_splits, self.rank) * width
            rec.tokens = flat.numel()
        return y

    def plan_traffic(self, placement, counts: np.ndarray) -> LayerTraffic:
        """The planner's traffic for this step's global counts (the EP/FSEP exchange; HP x EP
        overrides it with its EP stage's)."""
        return layer_traffic(self.m, placement, counts, capacity=self.capacity,
                             **self.traffic_options)

    def _capacity_slots(self, assign: torch.Tensor, gates: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(item, global expert, gate) of every row sent under capacity (runtime.balancing:
        per head, this rank's tokens are one batch with capacity C per expert)."""
        m = self.m
        h, e = m.num_heads, m.num_experts
        t = assign.shape[0] // h
        local = assign.view(t, h, -1) - torch.arange(h, device=assign.device)[None, :, None] * e
        cap = self.capacity.per_expert(t, e, m.top_k)
        token, g, gate = capacity_slots(local, gates.view(t, h, -1), e, cap,
                                        self.drop_policy, self.capacity.pad)
        return token * h + g // e, g, gate

    def seen_counts(self) -> np.ndarray:
        """Global counts [N, H, E] of the last forward (for the trace recorder)."""
        c = self.last_counts
        if c.dim() == 2:
            c = all_gather_counts(c)
        return c.cpu().numpy()


def _paper_metadata_exchange(flat: torch.Tensor, experts: int, world: int) -> list[int]:
    """What moe_ep.py runs before its token all-to-all: per-expert counts by `torch.bincount`
    (reads the largest id back: a sync on CUDA), an all_to_all_single of each destination's
    [experts / world] counts, and the input and output splits read to the host (two syncs).
    Returns the received counts per source (equal to the planner's receive splits)."""
    counts = torch.bincount(flat, minlength=experts)
    if experts % world:
        return [int(counts.sum())]
    out = torch.empty_like(counts)
    if world > 1:
        dist.all_to_all_single(out, counts)
    else:
        out.copy_(counts)
    counts.view(world, -1).sum(1).tolist()
    return out.view(world, -1).sum(1).tolist()


def _sent(splits: list[int], rank: int) -> int:
    """Rows that leave the rank (the self-block is a local copy, not network traffic)."""
    return int(sum(splits) - splits[rank])


def weighted_sum(rows: torch.Tensor, row_map: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """out[i] = sum_j gates[i, j] * rows[row_map[i, j]]: the combine of kernels/ when it is
    there (one fused pass), else index_select and a sum."""
    try:
        from kernels.combine import combine
    except ImportError:
        combine = None
    if combine is not None:
        return combine(rows, row_map.to(torch.int32), gates.to(torch.float32))
    n, k = row_map.shape
    picked = rows.index_select(0, row_map.reshape(-1)).view(n, k, -1)
    return (picked * gates.unsqueeze(-1).to(rows.dtype)).sum(1)


def gather_global_counts(local: torch.Tensor) -> np.ndarray:
    """The size exchange before an EP/FSEP dispatch: every rank's [H, E] counts -> [N, H, E]."""
    if dist.get_world_size() == 1:
        return local.unsqueeze(0).cpu().numpy()
    return all_gather_counts(local).cpu().numpy()
