"""Capacity-factor dispatch in the traffic: how many token rows each expert really receives
when experts take at most their capacity (Megatron-Core's moe_expert_capacity_factor).

For a source rank with T tokens (sub-tokens of one head, for Multi-Head LatentMoE) routed
top-k over E experts, an expert takes C = ceil(T * k / E * factor) of them (Megatron's
get_capacity(num_tokens * topk, E, factor), per rank as its router applies it). Of c routed
rows it keeps min(c, C); which ones (largest gate or first in position) does not change the
count. With padding (moe_pad_expert_input_to_capacity) it receives exactly min(C, T) rows, the
missing ones padding of gate 0 that is still sent and computed. runtime.balancing drops and
pads the same rows per rank, so the runtime moves the bytes computed here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.config import RoutingConfig
from moesim.errors import InputError


@dataclass(frozen=True)
class Capacity:
    factor: float
    pad: bool = False

    def __post_init__(self) -> None:
        if not self.factor > 0:
            raise InputError("routing", "capacity_factor", f"must be > 0, got {self.factor}")

    @classmethod
    def from_config(cls, r: RoutingConfig) -> Capacity | None:
        """None for dropless routing (capacity_factor 0)."""
        return cls(r.capacity_factor, r.pad_to_capacity) if r.capacity_factor > 0 else None

    def per_expert(self, tokens: int, experts: int, top_k: int) -> int:
        """C for a batch of `tokens` tokens."""
        return math.ceil(tokens * top_k / experts * self.factor)

    def rows(self, counts: np.ndarray, tokens: np.ndarray, top_k: int) -> np.ndarray:
        """Rows each expert receives, int64 [N, H, E], from the routed counts [N, H, E] of
        sources with tokens[src] tokens each."""
        e = counts.shape[-1]
        cap = np.array([self.per_expert(int(t), e, top_k) for t in tokens], dtype=np.int64)
        cap = cap[:, None, None]
        if self.pad:
            return np.broadcast_to(np.minimum(cap, tokens[:, None, None]), counts.shape).copy()
        return np.minimum(counts.astype(np.int64), cap)
