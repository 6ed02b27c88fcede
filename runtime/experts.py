"""The MoE layer's math, shared by the single-process reference and every parallel strategy.

Weights (full, as one process would hold them; strategies slice them):
  router   [H, dim, E]        one router per head (H = 1 for a standard MoE)
  w1       [H*E, dim, 2*F]    SwiGLU: gate = x @ w1[..., :F], up = x @ w1[..., F:]
           [H*E, dim, F]      GELU (model.expert_kind = "gelu"): up
  w2       [H*E, F, dim]      down
  down     [d_model, H*dh]    Multi-Head LatentMoE only: to the latent
  up       [H*dh, d_model]    Multi-Head LatentMoE only: back from the latent
Expert g = h * E + e (the trace/planner numbering). dim is d_model, or head_dim when H > 1.

The layer's function, for the items (tokens, or (token, head) sub-tokens) x_i:
  y_i = sum over the k chosen experts g of gate_ig * FFN_g(x_i), with
  FFN_g(x) = (silu(x w1g_gate) * (x w1g_up)) w2g       (SwiGLU)
  FFN_g(x) = gelu(x w1g) w2g                           (GELU: the 2-matrix expert of
             kerner-lab/Sparse-GPT-Pretraining src/model/modules/ffwd/mh_moe_hp_nrt.py,
             exact erf GELU, no gate, no bias)
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kernels.swiglu import swiglu
from moesim.config import ModelConfig
from runtime.routing import choose, router_probs


def init_moe_weights(m: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """The full weights of one MoE layer, fp32 on CPU, from `seed` alone: every rank builds the
    same tensors and keeps its slice, and the reference builds them too."""
    g = torch.Generator().manual_seed(seed)
    dim, f, h, e = m.expert_dim, m.d_ffn, m.num_heads, m.num_experts

    def randn(*shape: int, fan_in: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / fan_in ** 0.5

    w = {"router": randn(h, dim, e, fan_in=dim),
         "w1": randn(h * e, dim, m.up_width, fan_in=dim),
         "w2": randn(h * e, f, dim, fan_in=f)}
    if h > 1:
        w["down"] = randn(m.d_model, h * m.head_dim, fan_in=m.d_model)
        w["up"] = randn(h * m.head_dim, m.d_model, fan_in=h * m.head_dim)
    return w


def expert_kind_of(w1: torch.Tensor, w2: torch.Tensor) -> str:
    """"swiglu" when w1 holds gate and up (2F columns), "gelu" when it holds F."""
    return "swiglu" if w1.shape[-1] == 2 * w2.shape[-2] else "gelu"


def activate(h: torch.Tensor, kind: str, unfused: bool = False) -> torch.Tensor:
    """The activation between the experts' GEMMs: SwiGLU (kernels.swiglu, fused; `unfused`:
    torch's separate ops) or exact GELU (torch's one kernel each way)."""
    if kind == "gelu":
        return F.gelu(h)
    if unfused:
        f = h.shape[-1] // 2
        return F.silu(h[:, :f]) * h[:, f:]
    return swiglu(h)


def expert_ffn(x: torch.Tensor, group_sizes: list[int], w1: torch.Tensor,
               w2: torch.Tensor, unfused: bool = False) -> torch.Tensor:
    """Rows of x are grouped by expert (group i has group_sizes[i] rows and uses w1[i], w2[i]);
    returns each row's expert FFN (SwiGLU or GELU, from w1's width), same order. The grouped
    GEMM on GPU when it is there, else one matmul per group; `unfused` runs the activation as
    separate torch ops (the paper's EP baseline)."""
    from runtime import kernels_bridge
    return kernels_bridge.grouped_ffn(x, group_sizes, w1, w2, unfused=unfused)


def ffn_loop(x: torch.Tensor, group_sizes: list[int], w1: torch.Tensor,
             w2: torch.Tensor, unfused: bool = False) -> torch.Tensor:
    """The plain-torch grouped FFN: the CPU path and the reference for the fast ones (a SwiGLU
    activation is kernels.swiglu: its torch path on CPU, the fused kernel on GPU)."""
    kind = expert_kind_of(w1, w2)
    outs = []
    for i, part in enumerate(torch.split(x, list(group_sizes))):
        if part.shape[0] == 0:
            continue
        h = part @ w1[i]
        outs.append(activate(h, kind, unfused) @ w2[i])
    if not outs:
        return x.new_zeros((0, w2.shape[2]))
    return torch.cat(outs)


class ReferenceMoE(nn.Module):
    """The whole layer in one process, the numerics reference for EP, HP and FSEP."""

    def __init__(self, m: ModelConfig, weights: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.m = m
        self.w = nn.ParameterDict({k: nn.Parameter(v.clone()) for k, v in weights.items()})

    def forward(self, x: torch.Tensor, forced: np.ndarray | None = None,
                tokens_per_rank: int | None = None) -> torch.Tensor:
        """x [T, d_model]. `forced` [N, H, E] counts with tokens_per_rank tokens per source
        rank, in rank order (the reference sees the concatenation of every rank's tokens)."""
        m, w = self.m, self.w
        h, e = m.num_heads, m.num_experts
        z = x @ w["down"] if h > 1 else x
        t = x.shape[0]
        items = z.reshape(t, h, m.expert_dim)
        y = torch.zeros_like(items)
        for hd in range(h):
            probs = router_probs(items[:, hd] @ w["router"][hd], m.router)
            if forced is None:
                idx, gates = choose(probs, m.top_k, None)
            else:
                tr = tokens_per_rank or t
                parts = [choose(probs[s * tr:(s + 1) * tr], m.top_k, forced[s, hd])
                         for s in range(forced.shape[0])]
                idx = torch.cat([p[0] for p in parts])
                gates = torch.cat([p[1] for p in parts])
            for j in range(m.top_k):
                for ex in range(e):
                    sel = (idx[:, j] == ex).nonzero().squeeze(1)
                    if sel.numel() == 0:
                        continue
                    g = hd * e + ex
                    out = ffn_loop(items[sel, hd], [sel.numel()], w["w1"][g:g + 1],
                                   w["w2"][g:g + 1])
                    y[sel, hd] += gates[sel, j:j + 1].to(out.dtype) * out
        y = y.reshape(t, h * m.expert_dim)
        return y @ w["up"] if h > 1 else y
