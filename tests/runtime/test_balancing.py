"""Load balancing (runtime.balancing) against values worked out by hand, capacity dispatch in
the EP exchange against a per-token reference, and the aux-loss-free bias evening out the load
of a small training run."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch

from moesim.config import ModelConfig, RoutingConfig
from runtime.balancing import (
    Balancer,
    bias_step,
    capacity,
    capacity_keep,
    capacity_slots,
    switch_loss,
)
from tests.runtime.harness import run_ranks

# 4 tokens, 2 experts, top-1; logits log(p) so that softmax(logits) = p exactly.
P = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]], dtype=torch.float64)


def balancer(**kw) -> Balancer:
    r = RoutingConfig(**{"aux_loss_coeff": 1.0, **kw})
    return Balancer(r, heads=1, total_heads=1, experts=2, k=1, kind="softmax", world=2,
                    seq_len=2, covers_all_ranks=True)


def observe(b: Balancer) -> dict[str, float]:
    logits = P.log().float()[:, None, :]  # [n, H, E]
    experts = logits.argmax(dim=-1, keepdim=True)  # tokens 0, 1, 3 -> expert 0; 2 -> 1
    b.observe(logits, experts, blocks=2)  # two source blocks: tokens {0, 1} and {2, 3}
    return {k: float(v) for k, v in b.parts.items()}


def test_switch_loss_is_e_times_sum_of_f_times_p():
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert float(switch_loss(P, torch.tensor([3.0, 1.0]), k=1)) == pytest.approx(1.15)
    uniform = torch.full((6, 3), 1 / 3)
    assert float(switch_loss(uniform, torch.tensor([4.0, 4.0, 4.0]), k=2)) == pytest.approx(1)


def test_each_level_of_the_aux_loss_matches_the_hand_value():
    # micro-batch: block {0,1}: f = (1, 0), P = (.85, .15) -> 1.7; block {2,3}: f = (.5, .5),
    # P = (.45, .55) -> 1.0; mean over the 2 ranks' batches 1.35
    assert observe(balancer(load_balancing="aux_loss"))["aux"] == pytest.approx(1.35)
    # sequences of 2 tokens are the same two batches here
    assert observe(balancer(load_balancing="seq_aux_loss"))["aux"] == pytest.approx(1.35)
    # global batch: f over all 4 tokens, the two blocks' shares add up to 1.15
    assert observe(balancer(load_balancing="global_aux_loss"))["aux"] == pytest.approx(1.15)
    b = balancer(load_balancing="none", z_loss_coeff=1.0)
    # logsumexp(log p) = log(sum p) = 0 for every token: z-loss 0; shift the logits by 1
    assert observe(b)["z"] == pytest.approx(0.0, abs=1e-6)
    logits = (P.log() + 1.0).float()[:, None, :]
    b.observe(logits, logits.argmax(-1, keepdim=True), blocks=2)
    assert float(b.parts["z"]) == pytest.approx(1.0)  # (0 + 1)^2 per token


def test_seq_aux_loss_differs_from_the_batch_loss_when_sequences_differ():
    b = balancer(load_balancing="seq_aux_loss")
    b.world = 1  # one batch of two sequences {0,1}, {2,3}
    logits = P.log().float()[:, None, :]
    b.observe(logits, logits.argmax(-1, keepdim=True), blocks=1)
    assert float(b.parts["aux"]) == pytest.approx((1.7 + 1.0) / 2)
    a = balancer(load_balancing="aux_loss")
    a.world = 1
    a.observe(logits, logits.argmax(-1, keepdim=True), blocks=1)
    assert float(a.parts["aux"]) == pytest.approx(1.15)


def test_aux_loss_gradient_lowers_the_hot_experts_score():
    b = balancer(load_balancing="aux_loss")
    logits = P.log().float()[:, None, :].clone().requires_grad_(True)
    b.observe(logits, logits.detach().argmax(-1, keepdim=True), blocks=1)
    b.loss.backward()
    # expert 0 takes 3 of 4 tokens: the loss pushes its logits down relative to expert 1
    assert (logits.grad[:, 0, 0] > logits.grad[:, 0, 1]).all()


def test_bias_update_rules():
    load = torch.tensor([[6.0, 2.0, 0.0, 0.0]])  # mean 2
    assert bias_step(load, 0.1, "sign")[0].tolist() == pytest.approx([-0.1, 0.0, 0.1, 0.1])
    # centred: the signs' mean (0.25) subtracted
    assert bias_step(load, 0.1, "centered_sign")[0].tolist() == \
        pytest.approx([-0.125, -0.025, 0.075, 0.075])


def test_bias_enters_the_choice_but_not_the_gates():
    b = balancer(expert_bias=True, load_balancing="none")
    b.experts = 3
    b.bias = torch.tensor([[-0.2, 0.0, 0.0]])
    logits = torch.tensor([[[1.0, 0.9, 0.0]]])
    probs = torch.softmax(logits, -1)
    idx, gates = b.select(logits, probs, 1)
    assert idx.tolist() == [[[1]]] and gates.tolist() == [[[1.0]]]
    idx, gates = b.select(logits, probs, 2)
    assert idx.tolist() == [[[1, 0]]]  # 0.9 > 1.0 - 0.2 > 0.0
    p0, p1 = probs[0, 0, 0], probs[0, 0, 1]
    assert gates[0, 0].tolist() == pytest.approx([float(p1 / (p0 + p1)), float(p0 / (p0 + p1))])


def test_capacity_keeps_by_gate_or_by_position_and_pads():
    assert capacity(tokens=5, experts=2, k=1, factor=0.8) == 2  # ceil(2.5 * 0.8)
    ex = torch.tensor([0, 0, 0, 1, 0]).view(1, 5, 1, 1)
    g = torch.tensor([0.5, 0.9, 0.7, 0.6, 0.8]).view(1, 5, 1, 1)
    # expert 0 is chosen by tokens 0, 1, 2, 4 and keeps 2 of them
    assert capacity_keep(ex, g, 2, 2, "probs").view(-1).tolist() == [False, True, False, True,
                                                                   True]
    assert capacity_keep(ex, g, 2, 2, "position").view(-1).tolist() == [True, True, False,
                                                                      True, False]
    assert capacity_keep(ex, g, 2, 5, "probs").all()  # capacity >= tokens: nothing dropped
    item, expert, gate = capacity_slots(ex[0], g[0], 2, 2, "position", pad=True)
    # expert 0: tokens 0, 1; expert 1: token 3 and one padding row (token 0, gate 0)
    assert item.tolist() == [0, 0, 1, 3] and expert.tolist() == [0, 1, 0, 1]
    assert gate.tolist() == pytest.approx([0.5, 0.0, 0.9, 0.6])


def _capacity_case(rank, world, policy, pad):
    from planner.capacity import Capacity
    from runtime.comm import DistEnv
    from runtime.experts import ffn_loop, init_moe_weights
    from runtime.layers_ep import EPMoE
    from runtime.routing import router_probs
    m = ModelConfig(num_layers=1, d_model=12, d_ffn=8, num_experts=8, top_k=2, dtype="fp32",
                    attn_heads=2)
    t = 12
    w = init_moe_weights(m, seed=5)
    env = DistEnv(rank=rank, world=world, local_rank=rank, device=torch.device("cpu"),
                  backend="gloo")
    layer = EPMoE(m, w, 0, env)
    layer.capacity, layer.drop_policy = Capacity(1.0, pad=pad), policy
    x = torch.randn(world * t, m.d_model, generator=torch.Generator().manual_seed(9))
    mine = x[rank * t:(rank + 1) * t].clone().requires_grad_(True)
    y = layer(mine)
    # Reference: per token of this rank, each top-k expert it keeps (C = ceil(12*2/8) = 3).
    probs = router_probs(mine.detach() @ w["router"][0], m.router)
    vals, idx = torch.topk(probs, 2, dim=-1)
    gates = vals / vals.sum(-1, keepdim=True)
    cap = 3
    keep = torch.zeros_like(idx, dtype=torch.bool)
    for e in range(8):
        rows = [(i, j) for i in range(t) for j in range(2) if idx[i, j] == e]
        if policy == "position":
            chosen = rows[:cap]
        else:
            chosen = sorted(rows, key=lambda r: -float(gates[r]))[:cap]
        for r in chosen:
            keep[r] = True
    ref = torch.zeros(t, m.d_model)
    for i in range(t):
        for j in range(2):
            if keep[i, j]:
                e = int(idx[i, j])
                ref[i] += gates[i, j] * ffn_loop(mine.detach()[i:i + 1], [1], w["w1"][e:e + 1],
                                                 w["w2"][e:e + 1])[0]
    assert torch.allclose(y, ref, atol=1e-5), (y - ref).abs().max()
    kept = int(keep.sum())
    lt = layer.last_traffic
    want = world * 8 * cap if pad else None
    assert int(lt.tokens[rank].sum()) == (8 * cap if pad else kept)
    if pad:
        assert int(lt.tokens.sum()) == want
    y.sum().backward()
    assert torch.isfinite(layer.router.grad).all() and layer.router.grad.abs().sum() > 0


@pytest.mark.parametrize("policy,pad", [("probs", False), ("position", False), ("probs", True)])
def test_capacity_dispatch_matches_a_per_token_reference(policy, pad):
    run_ranks(2, _capacity_case, policy, pad, timeout_s=60)


def _bias_case(rank, world, rule, out):
    from runtime.balancing import Balancer, after_step
    from runtime.comm import DistEnv
    from runtime.experts import init_moe_weights
    from runtime.layers_ep import EPMoE
    m = ModelConfig(num_layers=1, d_model=12, d_ffn=8, num_experts=8, top_k=2, dtype="fp32",
                    attn_heads=2)
    w = init_moe_weights(m, seed=5)
    w["router"][0, :, 0] += 0.15  # with inputs of mean 1: expert 0 first for nearly all
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo")
    layer = EPMoE(m, w, 0, env)
    r = RoutingConfig(expert_bias=True, bias_update_rate=0.05, bias_update=rule)
    layer.balancer = Balancer(r, heads=1, total_heads=1, experts=8, k=2, kind="softmax",
                              world=world, seq_len=16, covers_all_ranks=False)
    x = torch.randn(256, m.d_model, generator=torch.Generator().manual_seed(rank)) + 1.0
    imbalance = []
    for _ in range(60):  # the same batch each step: only the bias moves the routing
        layer(x)
        load = layer.last_counts.sum(axis=0)[0].float()
        imbalance.append(float(load.max() / load.mean()))
        after_step([layer])
    if rank == 0:
        np.save(out, np.array(imbalance))


@pytest.mark.parametrize("rule", ["sign", "centered_sign"])
def test_expert_bias_reduces_the_measured_imbalance_over_steps(rule):
    """2 ranks route 256 tokens each with a router that sends nearly every token to expert 0
    (max/mean load close to the top-2 ceiling of 4); 60 bias updates bring it near 1."""
    with tempfile.TemporaryDirectory() as d:
        run_ranks(2, _bias_case, rule, f"{d}/imb.npy", timeout_s=60)
        imb = np.load(f"{d}/imb.npy")
    assert imb[0] > 2.5, imb[:5]
    assert imb[-10:].mean() < 1.3, imb[-10:]
    assert imb[-10:].mean() < 0.5 * imb[:10].mean()
