"""The optimizer side of a training step, as real trainers do it: the learning-rate schedule,
gradient clipping by the global norm, and fp32 master weights under a bf16 model.

- `lr_at(step, run)`: linear warm-up over `run.lr_warmup_steps` (step s takes
  lr (s + 1) / warmup, so the first step already moves), then `run.lr_schedule`: "constant",
  "linear" or "cosine" decay from `run.lr` to `run.lr_min_ratio * run.lr` at the last step
  (Megatron-Core's OptimizerParamScheduler: its decay styles, warm-up and min_lr). A pure
  function of the step, so a resumed run continues the same schedule with no state.
- `global_grad_norm(replicated, sharded)`: the L2 norm of the whole model's gradient across
  ranks. Replicated parameters (already all-reduced, equal on every rank) count once; the
  experts' parameters are distinct on every rank (EP experts, FSEP shards, HP heads), so their
  squares are summed over the ranks (one all-reduce of one number). Megatron's
  clip_grad_norm_fp32 does the same over its model-parallel group. `clip_grads` scales every
  gradient by min(1, max_norm / (norm + 1e-6)) (torch.nn.utils.clip_grad_norm_'s rule).
- `MasterWeights`: with `train.precision = "mixed"` and a bf16 model, AdamW steps fp32 copies
  of the parameters (its moments are fp32 too) from fp32 copies of the gradients, and the bf16
  parameters are rounded from the masters after each step: updates smaller than bf16's
  resolution (2^-8 relative) accumulate instead of vanishing. "pure" steps the bf16 parameters
  themselves. An fp32 model needs no copies: the parameters are their own masters.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from moesim.config import RunConfig


def lr_at(step: int, run: RunConfig) -> float:
    """The learning rate of `step` (0-based) out of `run.steps`."""
    peak, warm = run.lr, run.lr_warmup_steps
    if step < warm:
        return peak * (step + 1) / warm
    if run.lr_schedule == "constant":
        return peak
    lo = peak * run.lr_min_ratio
    span = max(run.steps - 1 - warm, 1)
    frac = min(max((step - warm) / span, 0.0), 1.0)
    if run.lr_schedule == "linear":
        return peak - (peak - lo) * frac
    return lo + 0.5 * (peak - lo) * (1.0 + math.cos(math.pi * frac))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def global_grad_norm(replicated: list[torch.Tensor], sharded: list[torch.Tensor],
                     group=None) -> float:
    """L2 norm of the model's gradient over all ranks (module docstring), in fp32."""
    def sq(ps):
        gs = [p.grad.detach().float() for p in ps if p.grad is not None]
        return torch.stack([g.pow(2).sum() for g in gs]).sum() if gs else None

    rep, sh = sq(replicated), sq(sharded)
    dev = next((p.grad.device for p in [*replicated, *sharded] if p.grad is not None),
               torch.device("cpu"))
    rep = rep if rep is not None else torch.zeros((), device=dev)
    sh = sh if sh is not None else torch.zeros((), device=dev)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(sh, group=group)
    return float(torch.sqrt(rep + sh))


def clip_grads(params: list[torch.Tensor], norm: float, max_norm: float) -> float:
    """Scale the gradients so that their global norm is at most max_norm; the factor used."""
    coef = min(1.0, max_norm / (norm + 1e-6))
    if coef < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return coef


class MasterWeights:
    """fp32 master copies of low-precision parameters (module docstring). `params` are the
    model's; the optimizer built by `optimizer()` steps the masters."""

    def __init__(self, params: list[torch.nn.Parameter], enabled: bool) -> None:
        self.params = params
        self.enabled = enabled and any(p.dtype != torch.float32 for p in params)
        self.masters = ([p.detach().float().clone().requires_grad_(True) for p in params]
                        if self.enabled else params)

    def optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.masters, lr=lr)

    def grads_to_masters(self) -> None:
        if not self.enabled:
            return
        for p, m in zip(self.params, self.masters, strict=True):
            m.grad = None if p.grad is None else p.grad.detach().float()

    @torch.no_grad()
    def masters_to_params(self) -> None:
        if not self.enabled:
            return
        for p, m in zip(self.params, self.masters, strict=True):
            p.copy_(m)

    def state_dict(self) -> list[torch.Tensor] | None:
        return [m.detach().clone() for m in self.masters] if self.enabled else None

    @torch.no_grad()
    def load_state_dict(self, masters: list[torch.Tensor] | None) -> None:
        if self.enabled and masters is not None:
            for m, saved in zip(self.masters, masters, strict=True):
                m.copy_(saved)
