"""Load balancing for learned routing: the auxiliary losses, the aux-loss-free expert bias and
capacity-factor dispatch with token dropping, each chosen in the config's [routing] section
and recorded in the run directory (config.toml; meta.json holds the losses and the bias).

Formulas follow Megatron-Core (megatron/core/transformer/moe/router.py, moe_utils.py) and the
Head Parallel paper's code (kerner-lab/Sparse-GPT-Pretraining), with E experts per head, k
experts per token, p[t, e] the router's scores over all E experts (softmax; for a sigmoid
router sigmoid(logit) / sum over e, as Megatron's compute_routing_scores_for_aux_loss), and
c[e] the tokens whose top-k includes e (before any drop):

- switch (GShard) loss of a batch B:  L(B) = E * sum_e f_e P_e,  f_e = c_e / (k |B|),
  P_e = mean_{t in B} p[t, e]   (switch_load_balancing_loss_func); 1 when routing is uniform.
- "aux_loss": L of each rank's micro-batch, averaged over ranks and heads (Megatron's default
  level: the micro-batch).
- "seq_aux_loss": L of each sequence, averaged over all sequences and heads
  (sequence_load_balancing_loss_func, DeepSeek-V2).
- "global_aux_loss": L of the global batch (all ranks' tokens), f from the all-reduced counts
  (Qiu et al. 2025, "global-batch load balancing"; Megatron's global_aux_loss).
- z-loss: mean over tokens of logsumexp(logits)^2 (ST-MoE, z_loss_func).
- expert bias (aux-loss-free, DeepSeek-V3): a per-expert bias b added to the scores used for
  the top-k choice only (the gates stay the unbiased scores): to the sigmoid scores for a
  sigmoid router (Megatron, DeepSeek-V3), to the logits for a softmax router (the HP paper's
  code, whose gates are a softmax over the k selected logits). After every step, from the
  load l_e of the global batch: "sign" b += u * sign(mean(l) - l_e) (Megatron
  get_updated_expert_bias); "centered_sign" additionally subtracts the mean of the signs, which
  keeps b centred without changing any top-k (kerner-lab gradient_accumulation.py).
- capacity: C = ceil(T * k / E * capacity_factor) tokens per expert for a rank's T tokens (per
  head), as Megatron's get_capacity(num_tokens * topk, ...). An expert chosen by more tokens
  keeps C of them: those of largest gate ("probs") or the first in token order ("position");
  the others lose that expert (their output is the rest of their gates' sum, not
  renormalised, as Megatron). With pad_to_capacity every expert receives exactly min(C, T) rows
  per rank, the missing ones padded with tokens of gate 0 (the first tokens not routed there).
  The token counts planner.traffic computes for the same routing apply the same rule
  (planner.capacity), so the runtime moves exactly the planner's bytes.

The losses are summed over the layers and added to the language-model loss, each scaled by its
coefficient; each rank adds the terms of the items it holds divided by the number of terms in
the whole job, so the sum over ranks (the gradients are summed) is the averages above.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from moesim.config import RoutingConfig


def aux_scores(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The scores p[..., e] the auxiliary losses use, fp32: softmax, or the sigmoid scores
    normalised to sum to 1 over the experts."""
    logits = logits.float()
    if kind == "softmax":
        return torch.softmax(logits, dim=-1)
    s = torch.sigmoid(logits)
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def switch_loss(scores: torch.Tensor, counts: torch.Tensor, k: int) -> torch.Tensor:
    """L = E * sum_e f_e P_e for each batch: scores [..., n, E], counts [..., E] of those n
    tokens -> [...]."""
    n, e = scores.shape[-2:]
    f = counts.detach().float() / (k * n)
    return e * (f * scores.mean(dim=-2)).sum(dim=-1)


def global_switch_term(scores: torch.Tensor, counts_global: torch.Tensor, tokens_global: int,
                       k: int) -> torch.Tensor:
    """This batch's share of the global-batch loss E * sum_e f^G_e P^G_e: f^G from the global
    counts [..., E], P^G summed over these tokens only (scores [..., n, E]) / tokens_global."""
    e = scores.shape[-1]
    f = counts_global.detach().float() / (k * tokens_global)
    return e * (f * scores.sum(dim=-2) / tokens_global).sum(dim=-1)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Per-token logsumexp(logits)^2, [...] from [..., E]."""
    return torch.logsumexp(logits.float(), dim=-1) ** 2


def capacity(tokens: int, experts: int, k: int, factor: float) -> int:
    """Tokens one expert takes from a batch of `tokens` tokens (Megatron's get_capacity with
    num_tokens * topk)."""
    return math.ceil(tokens * k / experts * factor)


def bias_step(load: torch.Tensor, rate: float, rule: str) -> torch.Tensor:
    """The change of the expert bias from one step's load [..., E]."""
    s = torch.sign(load.float().mean(dim=-1, keepdim=True) - load.float())
    if rule == "centered_sign":
        s = s - s.mean(dim=-1, keepdim=True)
    return rate * s


def capacity_keep(experts: torch.Tensor, gates: torch.Tensor, num_experts: int, cap: int,
                  policy: str) -> torch.Tensor:
    """bool [B, n, H, k]: which of the routed (token, slot) pairs an expert keeps, for blocks
    of n tokens (each block is one rank's batch, with its own capacity per expert and head).
    experts/gates [B, n, H, k]."""
    b, n, h, _ = experts.shape
    if cap >= n:
        return torch.ones_like(experts, dtype=torch.bool)
    routed = torch.zeros((b, n, h, num_experts), dtype=torch.bool, device=experts.device)
    routed.scatter_(-1, experts, True)
    if policy == "position":
        keep = routed & (torch.cumsum(routed.int(), dim=1) <= cap)
    else:
        dense = torch.zeros((b, n, h, num_experts), device=experts.device)
        dense.scatter_(-1, experts, gates.detach().float())
        top = torch.topk(dense, cap, dim=1).indices  # [B, cap, H, E]
        mask = torch.zeros_like(routed).scatter_(1, top, True)
        keep = routed & mask
    return keep.gather(-1, experts)


def capacity_slots(experts: torch.Tensor, gates: torch.Tensor, num_experts: int, cap: int,
                   policy: str, pad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows an expert layer with capacity receives from one batch of n items with H heads:
    (item [S], expert [S] (h * E + e), gate [S]), item-major then expert order; experts/gates
    [n, H, k]. Dropped pairs are left out; with `pad` every (head, expert) gets exactly
    min(cap, n) rows, the missing ones the first items not routed there, with gate 0."""
    n, h, _ = experts.shape
    keep = capacity_keep(experts[None], gates[None], num_experts, cap, policy)[0]
    dense_keep = torch.zeros((n, h, num_experts), dtype=torch.bool, device=experts.device)
    dense_gate = torch.zeros((n, h, num_experts), dtype=gates.dtype, device=experts.device)
    dense_keep.scatter_(-1, experts, keep)
    dense_gate = dense_gate.scatter(-1, experts, torch.where(keep, gates, 0))
    sent = dense_keep
    if pad:
        want = min(cap, n)
        short = want - dense_keep.sum(dim=0, keepdim=True)  # [1, H, E]
        free = ~dense_keep
        sent = dense_keep | (free & (torch.cumsum(free.int(), dim=0) <= short))
    item, head, e = torch.nonzero(sent, as_tuple=True)
    return item, head * num_experts + e, dense_gate[item, head, e]


class Balancer(nn.Module):
    """One MoE layer's balancing state: the expert bias of the heads it routes (a buffer, so
    it is checkpointed) and the loss terms and load of its last forward.

    `covers_all_ranks`: the layer routes every rank's items of its heads (HP: the head's rank
    receives all sub-tokens) rather than this rank's own (EP, FSEP), so its counts are already
    global and need no all-reduce."""

    def __init__(self, r: RoutingConfig, heads: int, total_heads: int, experts: int, k: int,
                 kind: str, world: int, seq_len: int, covers_all_ranks: bool) -> None:
        super().__init__()
        self.r, self.k, self.kind, self.world = r, k, kind, world
        self.heads, self.total_heads, self.experts = heads, total_heads, experts
        self.seq_len, self.covers_all = seq_len, covers_all_ranks
        self.register_buffer("bias", torch.zeros(heads, experts), persistent=True)
        self.loss: torch.Tensor | None = None  # this rank's share of the weighted sum
        self.parts: dict[str, torch.Tensor] = {}  # this rank's share of each unweighted loss
        self.load: torch.Tensor | None = None  # [heads, E] global load of the last forward

    @property
    def active(self) -> bool:
        r = self.r
        return r.load_balancing != "none" or r.z_loss_coeff > 0 or r.expert_bias

    def select(self, logits: torch.Tensor, probs: torch.Tensor, k: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k experts [n, H, k] and their gates (renormalised, from unbiased scores)."""
        if not self.r.expert_bias:
            vals, idx = torch.topk(probs, k, dim=-1, sorted=True)
            return idx, vals / vals.sum(dim=-1, keepdim=True)
        scored = logits.float() if self.kind == "softmax" else probs
        idx = torch.topk(scored.detach() + self.bias, k, dim=-1, sorted=True).indices
        vals = probs.gather(-1, idx)
        return idx, vals / vals.sum(dim=-1, keepdim=True)

    def observe(self, logits: torch.Tensor, experts: torch.Tensor, blocks: int) -> None:
        """Loss terms and load from one forward: logits [n, H, E], experts [n, H, k], the n
        items in `blocks` equal source blocks (one per rank whose tokens they are)."""
        if not self.active:
            return
        r, e, k = self.r, self.experts, self.k
        n = logits.shape[0] // blocks
        lg = logits.reshape(blocks, n, self.heads, e).transpose(1, 2)  # [B, H, n, E]
        ex = experts.reshape(blocks, n, self.heads, k).transpose(1, 2)  # [B, H, n, k]
        onehot = torch.zeros((*ex.shape[:-1], e), device=ex.device).scatter_(-1, ex, 1.0)
        counts = onehot.sum(dim=-2)  # [B, H, E]
        load = counts.sum(dim=0)  # [H, E]
        if not self.covers_all and self.world > 1:
            load = load.clone()
            dist.all_reduce(load)
        self.load = load.detach()
        parts: dict[str, torch.Tensor] = {}
        total_blocks = self.world  # source blocks in the whole job (HP: all held here)
        kind = r.load_balancing
        if kind != "none":
            scores = aux_scores(lg, self.kind)
            if kind == "aux_loss":
                terms = switch_loss(scores, counts, k)  # [B, H]
                parts["aux"] = terms.sum() / (total_blocks * self.total_heads)
            elif kind == "seq_aux_loss":
                s = self.seq_len
                seqs = n // s
                sc = scores.reshape(blocks, self.heads, seqs, s, e)
                c = onehot.reshape(blocks, self.heads, seqs, s, e).sum(dim=-2)
                terms = switch_loss(sc, c, k)  # [B, H, S]
                parts["aux"] = terms.sum() / (total_blocks * seqs * self.total_heads)
            else:  # global_aux_loss
                terms = global_switch_term(scores, load[None], total_blocks * n, k)
                parts["aux"] = terms.sum() / self.total_heads
        if r.z_loss_coeff > 0:
            parts["z"] = z_loss(lg).sum() / (total_blocks * n * self.total_heads)
        self.parts = parts
        loss = logits.new_zeros((), dtype=torch.float32)
        if "aux" in parts:
            loss = loss + r.aux_loss_coeff * parts["aux"]
        if "z" in parts:
            loss = loss + r.z_loss_coeff * parts["z"]
        self.loss = loss

    @torch.no_grad()
    def update_bias(self) -> None:
        """After the optimizer step: move the bias from the last forward's global load."""
        if self.r.expert_bias and self.load is not None:
            self.bias += bias_step(self.load, self.r.bias_update_rate, self.r.bias_update)


def attach_balancing(cfg, env, layers) -> None:
    """Give each MoE layer its Balancer and capacity from the config's [routing] section (the
    layers' constructors stay free of it)."""
    from moesim.errors import InputError
    from planner.capacity import Capacity

    r, m = cfg.routing, cfg.model
    capacity = Capacity.from_config(r)
    if capacity is not None and cfg.parallel.strategy == "hp":
        raise InputError(cfg.source, "routing.capacity_factor", "the HP runtime is dropless "
                         "(capacity dispatch runs with EP and FSEP; the simulator and planner "
                         "model it for HP too)")
    if r.load_balancing == "seq_aux_loss" and cfg.run.tokens_per_rank % m.seq_len:
        raise InputError(cfg.source, "run.tokens_per_rank", "seq_aux_loss needs whole "
                         f"sequences of model.seq_len = {m.seq_len}")
    for ly in layers:
        ly.capacity, ly.drop_policy = capacity, r.drop_policy
        b = Balancer(r, heads=ly.router.shape[0], total_heads=m.num_heads,
                     experts=m.num_experts, k=m.top_k, kind=m.router, world=env.world,
                     seq_len=m.seq_len, covers_all_ranks=ly.strategy == "hp")
        ly.balancer = b.to(ly.router.device) if b.active else None


def after_step(layers) -> dict[str, list[float]]:
    """After the optimizer step: update every layer's expert bias from its last load and
    return the step's balancing losses per layer, summed over the ranks (the job's values)."""
    import numpy as np

    names = ("aux", "z")
    parts = torch.zeros(len(layers), len(names))
    for i, ly in enumerate(layers):
        b = ly.balancer
        if b is None:
            continue
        for j, n in enumerate(names):
            if n in b.parts:
                parts[i, j] = float(b.parts[n].detach())
        b.update_bias()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(parts)
    return {n: np.round(parts[:, j].numpy(), 8).tolist() for j, n in enumerate(names)}
