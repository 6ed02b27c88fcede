"""The strategy registry: one MoE layer class per parallel strategy, one file each."""

from __future__ import annotations

import torch

from moesim.config import ModelConfig
from runtime.comm import DistEnv
from runtime.moe_layer import MoELayerBase


def build_layer(strategy: str, m: ModelConfig, weights: dict[str, torch.Tensor], layer: int,
                env: DistEnv, kernels: str = "auto", ep_variant: str = "moesim",
                hpxep_groups: int = 1, **kw) -> MoELayerBase:
    """`kernels`: run.kernels ("auto" or "baseline", MoELayerBase.kernels); `ep_variant`:
    parallel.ep_variant (EP only: "paper" runs the paper's EP baseline, MoELayerBase.paper_ep);
    `hpxep_groups`: HP x EP's head groups (runtime.layers_hpxep)."""
    if strategy == "ep":
        from runtime.layers_ep import EPMoE
        out = EPMoE(m, weights, layer, env)
    elif strategy == "hp":
        from runtime.layers_hp import HPMoE
        out = HPMoE(m, weights, layer, env)
    elif strategy == "fsep":
        from runtime.layers_fsep import FSEPMoE
        out = FSEPMoE(m, weights, layer, env, **kw)
    elif strategy == "hpxep":
        from runtime.layers_hpxep import HPxEPMoE
        out = HPxEPMoE(m, weights, layer, env, groups=hpxep_groups)
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    out.kernels = kernels
    out.paper_ep = strategy == "ep" and ep_variant == "paper"
    return out
