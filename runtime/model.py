"""A small MoE transformer: embedding, then blocks of (RMSNorm, causal self-attention, RMSNorm,
MoE layer), a final norm and the LM head. The MoE layer is a standard MoE (num_heads = 1) or a
Multi-Head LatentMoE (num_heads > 1), parallelised by the strategy in the config; everything
else is data parallel (each rank runs its own sequences with a full copy, gradients summed).

Parameters are initialised from the seed alone, identically on every rank, so that a run is
reproducible and each MoE layer can take its slice of the same full weights.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from moesim.config import Config
from runtime.balancing import attach_balancing
from runtime.comm import DistEnv
from runtime.experts import init_moe_weights
from runtime.layers import build_layer
from runtime.moe_layer import MoELayerBase


class Attention(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(b, s, d))


class Block(nn.Module):
    def __init__(self, cfg: Config, moe: MoELayerBase) -> None:
        super().__init__()
        d = cfg.model.d_model
        self.norm1 = nn.RMSNorm(d)
        self.attn = Attention(d, cfg.model.attn_heads)
        self.norm2 = nn.RMSNorm(d)
        self.moe = moe

    def forward(self, x: torch.Tensor, forced: np.ndarray | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        b, s, d = x.shape
        h = self.norm2(x).reshape(b * s, d)
        return x + self.moe(h, forced=forced).view(b, s, d)


class MoETransformer(nn.Module):
    def __init__(self, cfg: Config, env: DistEnv, layout=None) -> None:
        super().__init__()
        m = cfg.model
        torch.manual_seed(cfg.run.seed)  # the dense weights: the same on every rank
        self.embed = nn.Embedding(m.vocab_size, m.d_model)
        kw = {"layout": layout} if cfg.parallel.strategy == "fsep" and layout else {}
        layers = []
        for i in range(m.num_layers):
            w = init_moe_weights(m, seed=cfg.run.seed * 1000 + i)
            layers.append(Block(cfg, build_layer(cfg.parallel.strategy, m, w, i, env,
                                                      kernels=cfg.run.kernels,
                                                      ep_variant=cfg.parallel.ep_variant,
                                                      hpxep_groups=cfg.parallel.hpxep_groups
                                                      or cfg.cluster.nodes, **kw)))
        self.blocks = nn.ModuleList(layers)
        attach_balancing(cfg, env, self.moe_layers)
        if cfg.parallel.strategy == "fsep":  # LAER-MoE's prefetch: each layer knows the next
            moes = [b.moe for b in layers]
            for a, b in itertools.pairwise(moes):
                a.link(next_=b)
                b.link(prev=a)
        self.norm = nn.RMSNorm(m.d_model)
        self.head = nn.Linear(m.d_model, m.vocab_size, bias=False)

    @property
    def moe_layers(self) -> list[MoELayerBase]:
        return [b.moe for b in self.blocks]

    def balancing_loss(self) -> torch.Tensor | None:
        """This rank's share of the last forward's balancing losses (runtime.balancing)."""
        parts = [ly.balancer.loss for ly in self.moe_layers
                 if ly.balancer is not None and ly.balancer.loss is not None]
        return sum(parts) if parts else None

    def replicated_parameters(self) -> list[nn.Parameter]:
        """Parameters every rank holds whole: all but the experts' own (their gradients are
        summed over the ranks after backward)."""
        expert = {id(p) for layer in self.moe_layers for p in layer.parameters()}
        shared = [p for p in self.parameters() if id(p) not in expert]
        return shared + [p for layer in self.moe_layers for p in layer.replicated_parameters()]

    def forward(self, tokens: torch.Tensor, forced: list[np.ndarray] | None = None
                ) -> torch.Tensor:
        x = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            x = block(x, None if forced is None else forced[i])
        return self.head(self.norm(x))
