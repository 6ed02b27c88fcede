"""Fully Sharded Expert Parallel with per-pass re-layout, as LAER-MoE runs it (arXiv 2602.11686;
code: PKU-DAIR/Hetu-Galvatron branch laer-moe, galvatron/core/runtime/moe/: prefetch/
fsdp_patch.py for the weights, smart_routing.py and fused_kernel.py for the tokens).

Weights: every expert's parameters, w1 then w2 flattened, are cut into N flat shards of
ceil(P / N) elements (planner.traffic.shard_elements; zero-padded at the end); rank j holds
shard j of every expert ([E_total, S], LAER-MoE's FSDP flat parameter reshaped
(experts, world, -1)). Per pass a layout (a planner Placement) fills every one of a rank's C
slots, duplicates allowed. The layer then
  1. gathers weights: an all-to-all in which rank j sends its shard of every slot of every
     rank (a duplicate is sent once per slot, as `_all_to_all_flat_param_type1` does); a rank
     merges the N shards of each slot into the flat expert (`_Merge`);
  2. dispatches tokens to replicas with the planner's integer splits (planner.traffic: the
     node-local "smart routing" for LAER's layouts), runs each replica's tokens through its
     first slot's weights, and combines as EP does;
  3. frees the gathered weights after the forward (FSDP's storage resize, `_Freed`) and
     gathers them again into the same storages when backward reaches the layer, before its
     expert backward (("bwd", "weight_gather"));
  4. returns the weight gradients by the reverse all-to-all of the gather (("bwd",
     "grad_scatter")): every slot's gradient shard goes back to its owner, which sums them
     over the replicas (gather_rows' one-pass gather-reduce), the reduce-scatter of FSDP.

Overlap, LAER-MoE's order: the next FSEP layer's weight all-to-all is issued right after this
layer's token dispatch (`all_to_all_with_event(..., nxt_dispatcher.forward_event)` in
smart_routing.py), so it overlaps this layer's experts, combine and the next layer's attention
and routing; the first layer's gathers before its routing. In backward the previous layer's
re-gather is issued when this layer's backward starts (LAER: after its combine all-to-all).
On CUDA the weight all-to-alls run on a side stream over their own communicator
(runtime.comm.side_group), and autograd runs the gradient return there too, so it overlaps
the next layer's backward (LAER delays it to that layer's backward); on the CPU (gloo) they
run in order. Layouts come from runtime.plans (planned from the layer's earlier passes, or
replayed from plan.json) and are known before the routing unless planner.oracle.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
from torch import nn

from moesim.config import ModelConfig
from planner.placement import Placement
from planner.traffic import shard_elements, weight_gather_rows
from runtime.comm import DistEnv, all_to_all, side_group
from runtime.kernels_bridge import route_items
from runtime.moe_layer import MoELayerBase, gather_rows
from runtime.plans import Layouts


def flat_experts(w1: torch.Tensor, w2: torch.Tensor, n: int) -> torch.Tensor:
    """[E, N * S]: every expert's w1 then w2 flattened, zero-padded to N shards of S."""
    e = w1.shape[0]
    flat = torch.cat([w1.reshape(e, -1), w2.reshape(e, -1)], dim=1)
    s = -(-flat.shape[1] // n)
    return torch.nn.functional.pad(flat, (0, n * s - flat.shape[1]))


def shard_experts(w1: torch.Tensor, w2: torch.Tensor, n: int, j: int) -> torch.Tensor:
    """Rank j's shard [E, S] of full weights w1 [E, dim, up], w2 [E, F, dim]."""
    flat = flat_experts(w1, w2, n)
    s = flat.shape[1] // n
    return flat[:, j * s:(j + 1) * s].contiguous()


class _Merge(torch.autograd.Function):
    """Received shards [n * c, S] (source-major, slot-minor) -> w1 [c, dim, up], w2 [c, F, dim],
    views of one merged buffer [c, n * S] (a view of the received one when n == 1). The
    backward writes both gradients and the padding's zeros into one buffer of the received
    layout: two passes, where autograd's slices would zero-fill and add a full buffer each."""

    @staticmethod
    def forward(ctx, recv, n, dim, up, f):
        c = recv.shape[0] // n
        full = recv.view(n, c, -1).transpose(0, 1).reshape(c, -1)
        ctx.n, ctx.shape = n, (c, dim, up, f, full.shape[1])
        a = dim * up
        return full[:, :a].view(c, dim, up), full[:, a:a + f * dim].view(c, f, dim)

    @staticmethod
    def backward(ctx, g1, g2):
        n = ctx.n
        c, dim, up, f, width = ctx.shape
        ref = g1 if g1 is not None else g2
        parts = [ref.new_zeros((c, dim * up)) if g1 is None else g1.reshape(c, -1),
                 ref.new_zeros((c, f * dim)) if g2 is None else g2.reshape(c, -1)]
        pad = width - dim * up - f * dim
        if pad:
            parts.append(ref.new_zeros((c, pad)))
        merged = torch.cat(parts, dim=1)
        grad = ref.new_empty((n * c, width // n))
        grad.view(n, c, -1).copy_(merged.view(c, n, -1).transpose(0, 1))
        return grad, None, None, None, None


class _Freed:
    """A layer's gathered weights between its forward and its backward. FSDP's way
    (`_free_storage` in LAER-MoE's fsdp_patch.py): after the forward the storages of the
    tensors autograd saved are resized to nothing; when backward reaches the layer they are
    resized back and the weights gathered again into them (through `.data`, so autograd's
    version counters do not move), before the expert backward reads them."""

    def __init__(self, layer: FSEPMoE, placement: Placement, first: np.ndarray | None,
                 w1: torch.Tensor, w2: torch.Tensor) -> None:
        self.layer, self.placement, self.first = layer, placement, first
        self.tensors = (w1, w2)
        stores = {}
        for w in (w1, w2):
            st = w.untyped_storage()
            stores[st.data_ptr()] = (st, st.nbytes())
        self.stores = list(stores.values())
        self.ready = None
        self.restored = False

    def free(self) -> None:
        for st, _ in self.stores:
            st.resize_(0)

    def restore(self) -> None:
        """Gather the weights again into their storages (on the side stream on CUDA)."""
        if self.restored:
            return
        self.restored = True
        if not self.tensors[0].is_cuda:
            self._fill()
            return
        side = self.layer._stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._fill()
            self.ready = torch.cuda.Event()
            self.ready.record(side)

    def _fill(self) -> None:
        for st, nbytes in self.stores:
            st.resize_(nbytes)
        r1, r2 = self.layer._gather(self.placement, "bwd", grad=False)
        if self.first is not None:
            idx = torch.as_tensor(self.first, device=r1.device)
            r1, r2 = r1.index_select(0, idx), r2.index_select(0, idx)
        w1, w2 = self.tensors
        w1.data.copy_(r1)
        w2.data.copy_(r2)

    def wait(self) -> None:
        """The current stream waits for the re-gather (CUDA)."""
        self.restore()
        if self.ready is not None:
            cur = torch.cuda.current_stream()
            cur.wait_event(self.ready)
            for w in self.tensors:
                w.record_stream(cur)


class FSEPMoE(MoELayerBase):
    strategy = "fsep"

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                 env: DistEnv, layout: Layouts | None = None) -> None:
        super().__init__(m, weights, layer, env)
        self.router = nn.Parameter(weights["router"].clone())
        self.shard = nn.Parameter(shard_experts(weights["w1"], weights["w2"], env.world,
                                                env.rank))
        assert self.shard.shape[1] == shard_elements(m, env.world)
        self.layouts = layout or default_layout(m, env.world)
        # Weights are freed after forward and gathered again for backward (LAER-MoE, FSDP).
        self.traffic_options = {"fsep_backward_gather": True}
        self.next: FSEPMoE | None = None  # the next FSEP layer of the model (its prefetch)
        self.prev: FSEPMoE | None = None
        self.last_placement: Placement | None = None
        self._ahead: tuple[Placement, tuple] | None = None

    def replicated_parameters(self) -> list[nn.Parameter]:
        return [*super().replicated_parameters(), self.router]

    def link(self, prev: FSEPMoE | None = None, next_: FSEPMoE | None = None) -> None:
        """The model's neighbouring FSEP layers (for the prefetches), kept out of the module
        tree (nn.Module would register them as submodules)."""
        if prev is not None:
            self.__dict__["prev"] = prev
        if next_ is not None:
            self.__dict__["next"] = next_

    @property
    def prev_counts(self) -> dict | None:
        """The layout source's state of this layer (kept by checkpoints)."""
        state = getattr(self.layouts, "state", None)
        return state(self.layer) if state else None

    @prev_counts.setter
    def prev_counts(self, st: dict | None) -> None:
        restore = getattr(self.layouts, "restore", None)
        if restore:
            restore(self.layer, st)

    # --- weights ------------------------------------------------------------------------
    def _stream(self):
        if not hasattr(self, "_side"):
            self._side = torch.cuda.Stream()
        return self._side

    def _gather(self, placement: Placement, pass_: str, grad: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight all-to-all: full weights of this rank's slots, in slot order (on the
        side stream and communicator on CUDA)."""
        if not self.shard.is_cuda:
            return self._gather_here(placement, pass_, grad, None)
        side = self._stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            return self._gather_here(placement, pass_, grad, side_group())

    def _gather_here(self, placement: Placement, pass_: str, grad: bool, group):
        m, n, lay, tm = self.m, self.world, self.layer, self.timer
        plan_rows = weight_gather_rows(placement)
        send = plan_rows[self.rank].tolist()
        recv_splits = plan_rows[:, self.rank].tolist()
        experts = np.concatenate([placement.slot_experts(d) for d in range(n)])
        row_bytes = self.shard.shape[1] * self.shard.element_size()
        t0 = tm.now()
        with torch.set_grad_enabled(grad):
            shard = self.shard if grad else self.shard.detach()
            if grad:
                shard = tm.bwd_in(shard, lay, "weight_gather")
            rows = gather_rows(shard, experts) if grad else shard.index_select(
                0, torch.as_tensor(experts, device=shard.device))
            recv = all_to_all(rows, send, recv_splits, group=group, layer=lay,
                              phase="weight_gather", grad_phase="grad_scatter", pass_=pass_)
            w1, w2 = _Merge.apply(recv, n, m.expert_dim, m.up_width, m.d_ffn)
            if grad:
                w1 = tm.bwd_out(w1, lay, "weight_gather")
        if pass_ == "bwd":
            tm.record(lay, "bwd", "weight_gather", t0, tm.now(),
                      (sum(recv_splits) - recv_splits[self.rank]) * row_bytes)
        return w1, w2

    def _weights_for(self, placement: Placement) -> tuple[torch.Tensor, torch.Tensor]:
        """This pass's gathered weights: prefetched by the previous layer, or gathered now."""
        if self._ahead is not None and self._ahead[0] is placement:
            w = self._ahead[1]
        else:
            with self.timer.fwd(self.layer, "weight_gather") as rec:
                w = self._gather(placement, "fwd")
                self._account(rec, placement)
        self._ahead = None
        if w[0].is_cuda:
            cur = torch.cuda.current_stream()
            cur.wait_stream(self._stream())
            for t in w:  # made on the side stream, used (then freed) on this one
                t.record_stream(cur)
        return w

    def _account(self, rec, placement: Placement) -> None:
        rows = weight_gather_rows(placement)
        row_bytes = self.shard.shape[1] * self.shard.element_size()
        rec.bytes = int(rows[self.rank].sum() - rows[self.rank, self.rank]) * row_bytes
        rec.bwd["bytes"] = int(rows[:, self.rank].sum() - rows[self.rank, self.rank]) * \
            row_bytes
        rec.bwd["phase"] = "grad_scatter"

    def prefetch(self) -> None:
        """Start this layer's weight gather for its coming pass (called by the previous
        layer right after its token dispatch); nothing when the layout needs the pass's own
        counts."""
        placement = self.layouts.before(self.layer)
        if placement is None:
            return
        with self.timer.fwd(self.layer, "weight_gather") as rec:
            self._ahead = (placement, self._gather(placement, "fwd"))
            self._account(rec, placement)

    # --- the layer ----------------------------------------------------------------------
    def forward(self, x: torch.Tensor, forced: np.ndarray | None = None) -> torch.Tensor:
        m, lay = self.m, self.layer
        t = x.shape[0]
        known = self.layouts.before(lay)
        state: dict = {"placement": known}

        def plan(counts: np.ndarray) -> Placement:
            p = self.layouts.after(lay, counts)
            if state["placement"] is None:
                state["placement"] = p
            self.last_placement = state["placement"]
            return state["placement"]

        def weights(route) -> tuple[torch.Tensor, torch.Tensor]:
            # The tokens are on their way: the next layer's weights go next (LAER-MoE).
            if self.next is not None:
                self.next.prefetch()
            placement = state["placement"]
            w1, w2 = state.pop("w") if "w" in state else self._weights_for(placement)
            first = self._first_slots(placement)
            if first is not None:  # duplicates: each replica computes on its first slot
                idx = torch.as_tensor(first, device=w1.device)
                w1, w2 = w1.index_select(0, idx), w2.index_select(0, idx)
            state["freed"] = _Freed(self, placement, first, w1, w2)
            return w1, w2

        if known is not None:
            # Gathered already by the previous layer's prefetch, or now, before routing.
            state["w"] = self._weights_for(known)
        z = self.to_items(x)
        with self.timer.fwd(lay, "router") as rec:
            forced_here = None if forced is None else forced[self.rank][None]
            local, gates = route_items(z, self.router, m.router, m.top_k, forced_here,
                                       mode=self.kernels, balancer=self.balancer)
            offset = torch.arange(m.num_heads, device=z.device)[None, :, None] * m.num_experts
            experts = local + offset
            rec.tokens = t * m.num_heads
        y = self.exchange(z.reshape(t * m.num_heads, -1), experts.reshape(t * m.num_heads, -1),
                          gates.reshape(t * m.num_heads, -1), plan, weights)
        freed = state.pop("freed")
        state.clear()
        out = self.from_items(y.view(t, m.num_heads, -1))
        if not out.requires_grad:
            return out
        freed.free()  # FSDP: nothing of the weights is kept for the backward
        prev = self.prev

        def hook(g, freed=freed, prev=prev):
            # Backward reaches this layer: its weights must be back before its experts'
            # backward; the previous FSEP layer's start coming (LAER-MoE's prefetch).
            freed.wait()
            pending = prev._pending() if prev is not None else None
            if pending is not None:
                pending.restore()
            return g
        self._pending = weakref.ref(freed)
        out.register_hook(hook)
        return out

    def _first_slots(self, placement: Placement) -> np.ndarray | None:
        sel = placement.replica_rank == self.rank
        k = placement.replica_slots[sel]
        if (k == 1).all():
            return None
        return np.cumsum(k) - k

    def reference_grads(self, ref: nn.Module):
        yield "router", self.router.grad, ref.w["router"].grad
        want = shard_experts(ref.w["w1"].grad, ref.w["w2"].grad, self.world, self.rank)
        yield "shard", self.shard.grad, want
        if self.latent:
            yield "down", self.down.grad, ref.w["down"].grad
            yield "up", self.up.grad, ref.w["up"].grad


def default_layout(m: ModelConfig, n: int) -> Layouts:
    """The online planner with LAER-MoE's greedy (planner.schedule, planner.laer)."""
    from moesim.config import PlannerConfig
    from runtime.plans import online_layout
    # One slot more than an even share, so hot experts get replicas.
    return online_layout(m, n, PlannerConfig(solver="laer",
                                             slots_per_rank=-(-m.total_experts // n) + 1))
