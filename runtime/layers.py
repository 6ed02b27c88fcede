"""The strategy registry: one MoE layer class per parallel strategy, one file each."""

from __future__ import annotations

import torch

from moesim.config import ModelConfig
from runtime.comm import DistEnv
from runtime.moe_layer import MoELayerBase


def build_layer(strategy: str, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                env: DistEnv, **kw) -> MoELayerBase:
    if strategy == "ep":
        from runtime.layers_ep import EPMoE
        return EPMoE(m, weights, layer, env)
    if strategy == "hp":
        from runtime.layers_hp import HPMoE
        return HPMoE(m, weights, layer, env)
    if strategy == "fsep":
        from runtime.layers_fsep import FSEPMoE
        return FSEPMoE(m, weights, layer, env, **kw)
    raise ValueError(f"unknown strategy {strategy!r}")
