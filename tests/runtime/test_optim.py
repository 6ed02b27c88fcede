"""runtime.optim: the learning-rate schedule against hand-worked values, the global gradient norm
against torch's clip_grad_norm_ (one rank) and a float64 brute force over every rank's gradients
(2 gloo ranks, EP: experts differ per rank), clipping, and fp32 master weights keeping updates
that bf16 parameters alone lose."""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import pytest
import torch

from moesim.config import RunConfig
from runtime.optim import MasterWeights, clip_grads, global_grad_norm, lr_at
from tests.runtime.harness import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "runtime-tiny.toml"


def _run(**kw) -> RunConfig:
    return dataclasses.replace(RunConfig(), **kw)


def test_lr_schedule_hand_values():
    # 13 steps, 4 of warm-up: the decay spans steps 4..12 (8 intervals); min 0.1 of peak 1.
    cos = _run(lr=1.0, steps=13, lr_warmup_steps=4, lr_schedule="cosine", lr_min_ratio=0.1)
    assert [lr_at(s, cos) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at(4, cos) == pytest.approx(1.0)
    assert lr_at(6, cos) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi / 4)))
    assert lr_at(8, cos) == pytest.approx(0.55)
    assert lr_at(12, cos) == pytest.approx(0.1)
    lin = dataclasses.replace(cos, lr_schedule="linear")
    assert lr_at(6, lin) == pytest.approx(1.0 - 0.9 * 0.25)
    assert lr_at(12, lin) == pytest.approx(0.1)
    const = _run(lr=3e-4, steps=10)
    assert {lr_at(s, const) for s in range(10)} == {3e-4}


def test_grad_norm_one_rank_matches_torch_and_clipping_scales_to_max():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    net(torch.randn(11, 5)).pow(2).sum().backward()
    ps = list(net.parameters())
    rep, sh = ps[:2], ps[2:]
    ref = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ps))
    assert global_grad_norm(rep, sh) == pytest.approx(float(ref), rel=1e-6)
    before = [p.grad.clone() for p in ps]
    coef = clip_grads(ps, float(ref), max_norm=0.5)
    assert coef == pytest.approx(0.5 / float(ref), rel=1e-5)
    after = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in ps))
    assert float(after) == pytest.approx(0.5, rel=1e-5)
    for b, p in zip(before, ps, strict=True):  # same direction
        torch.testing.assert_close(p.grad, b * coef)
    assert clip_grads(ps, 0.5, max_norm=1.0) == 1.0  # under the limit: untouched


def _two_rank_norm(rank, world, root):
    import torch.distributed as dist

    from moesim.config import load_config, with_overrides
    from runtime.comm import init_distributed
    from runtime.train import Trainer
    cfg = with_overrides(load_config(TINY), {"run.out_dir": f"{root}/out", "run.steps": 1})
    env = init_distributed("cpu")
    t = Trainer(cfg, env)
    t.run()
    norm = t.grad_norms[0]
    # Brute force: every rank's named gradients; replicated ones must agree and count once.
    names = {id(p): n for n, p in t.model.named_parameters()}
    rep = {names[id(p)] for p in t.model.replicated_parameters()}
    mine = {n: p.grad.double().clone() for n, p in t.model.named_parameters()}
    every = [None] * world
    dist.all_gather_object(every, mine)
    total = sum(g.pow(2).sum() for n, g in every[0].items() if n in rep)
    for r in range(world):
        for n, g in every[r].items():
            if n in rep:
                torch.testing.assert_close(g, every[0][n])
            else:
                total = total + g.pow(2).sum()
    assert norm == pytest.approx(float(torch.sqrt(total)), rel=1e-5)
    assert len({n for n in mine if n not in rep}) > 0  # there are per-rank expert weights


def test_global_grad_norm_over_two_ranks_counts_replicated_once():
    with tempfile.TemporaryDirectory() as root:
        run_ranks(2, _two_rank_norm, root, timeout_s=120)


def test_master_weights_keep_updates_bf16_loses():
    # A bf16 value of 1.0 has resolution 2^-7 below 2 (2^-8 just below 1): AdamW steps of
    # ~lr = 1e-3 round away each time; fp32 masters accumulate them.
    def train(enabled: bool) -> torch.Tensor:
        p = torch.nn.Parameter(torch.ones(4, dtype=torch.bfloat16))
        mw = MasterWeights([p], enabled)
        opt = mw.optimizer(lr=1e-3)
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            p.grad = torch.ones_like(p)
            mw.grads_to_masters()
            opt.step()
            mw.masters_to_params()
        return p.detach().float()

    assert (train(False) == 1.0).all()  # pure bf16: every update lost
    kept = train(True)
    # 20 Adam steps of lr (bias-corrected, constant gradient) plus decoupled weight decay.
    assert kept.sub(1.0 - 20e-3).abs().max() < 2**-8
    fp32 = MasterWeights([torch.nn.Parameter(torch.ones(2))], True)
    assert not fp32.enabled  # an fp32 model is its own master
