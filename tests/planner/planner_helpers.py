"""Shared builders for planner tests: small models and consistent routing counts."""

from __future__ import annotations

import numpy as np

from moesim.config import ModelConfig


def small_model(experts: int = 8, top_k: int = 2, heads: int = 1, head_dim: int = 0,
                d_model: int = 16, d_ffn: int = 8, dtype: str = "bf16") -> ModelConfig:
    return ModelConfig(num_experts=experts, top_k=top_k, num_heads=heads,
                       head_dim=head_dim or (4 if heads > 1 else 0), d_model=d_model,
                       d_ffn=d_ffn, attn_heads=1, dtype=dtype)


def routed_counts(rng: np.random.Generator, ranks: int, heads: int, experts: int, top_k: int,
                  tokens: int, skew: float = 1.0) -> np.ndarray:
    """Counts [N, H, E] from real per-token top-k choices (distinct experts per token)."""
    w = 1.0 / np.arange(1, experts + 1) ** skew
    w = w[rng.permutation(experts)]
    out = np.zeros((ranks, heads, experts), dtype=np.int64)
    for r in range(ranks):
        for h in range(heads):
            for _ in range(tokens):
                chosen = rng.choice(experts, size=top_k, replace=False, p=w / w.sum())
                out[r, h, chosen] += 1
    return out
