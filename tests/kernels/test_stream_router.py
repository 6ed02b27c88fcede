"""The streaming top-k router (kernels/stream_router.py) under the interpreter, against its
float64 torch reference: choices exactly, gates, and both gradients."""

import zlib

import pytest
import torch
from conftest import TOL, rel_err

from kernels.stream_router import (
    RouterConfig,
    stream_route,
    stream_route_forward,
    stream_route_reference,
)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(n, h, d, e, dtype, *key):
    g = _gen(n, h, d, e, dtype, *key)
    items = torch.randn(n, h, d, generator=g).to(dtype)
    router = (torch.randn(h, d, e, generator=g) / d ** 0.5).to(dtype)
    return items, router, g


# (n, H, D, E, k, score, block_e): several expert tiles (block_e below E), E not a multiple
# of the tile, D not a power of two, k = 1, k = E, n not a multiple of the item tile.
CASES = [
    (37, 3, 16, 40, 4, "softmax", 16),
    (20, 2, 24, 16, 8, "sigmoid", 16),
    (70, 1, 32, 48, 1, "softmax", 16),
    (9, 2, 16, 5, 5, "softmax", None),
    (33, 4, 16, 64, 8, "softmax", None),
]


@pytest.mark.parametrize("n,h,d,e,k,score,block_e", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_and_backward_match_float64(n, h, d, e, k, score, block_e, dtype, with_bias):
    items, router, g = _inputs(n, h, d, e, dtype, score, with_bias)
    bias = (0.5 * torch.randn(h, e, generator=g)) if with_bias else None
    cfg = RouterConfig(block_e=block_e, bwd_splits=2)
    x = items.clone().requires_grad_(True)
    r = router.clone().requires_grad_(True)
    experts, gates = stream_route(x, r, k, score, bias, config=cfg)
    x64 = items.double().requires_grad_(True)
    r64 = router.double().requires_grad_(True)
    ref_e, ref_g = stream_route_reference(x64, r64, k, score, bias)
    assert torch.equal(experts, ref_e)
    assert gates.dtype == torch.float32
    assert rel_err(gates, ref_g) <= 1e-5
    dg = torch.randn(n, h, k, generator=g)
    gates.backward(dg)
    ref_g.backward(dg.double())
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    assert x.grad.dtype == dtype and r.grad.dtype == dtype
    assert rel_err(x.grad, x64.grad) <= tol
    assert rel_err(r.grad, r64.grad) <= tol


def test_bias_changes_the_choice_not_the_gates():
    # A large bias on expert 3 of head 0 puts it in every item's top-k; its gate is still
    # computed from the unbiased logit (the aux-loss-free rule).
    items, router, _ = _inputs(25, 2, 16, 32, torch.float32, "bias")
    bias = torch.zeros(2, 32)
    bias[0, 3] = 100.0
    experts, gates = stream_route(items, router, 4, "softmax", bias)
    assert (experts[:, 0, 0] == 3).all() and not (experts[:, 1] == 3).all()
    logits = torch.einsum("nhd,hde->nhe", items.double(), router.double())
    chosen = torch.gather(logits, -1, experts)
    assert rel_err(gates, torch.softmax(chosen, -1)) <= 1e-5


def test_ties_go_to_the_lower_expert():
    # Identical router columns give bit-identical logits: the lower index must win, in every
    # tile arrangement.
    items, router, _ = _inputs(19, 1, 16, 48, torch.float32, "ties")
    router[:, :, 40] = router[:, :, 7]
    router[:, :, 20] = router[:, :, 7]
    for block_e in (16, 64):
        experts, _ = stream_route(items, router, 6, config=RouterConfig(block_e=block_e))
        ref, _ = stream_route_reference(items.double(), router.double(), 6)
        assert torch.equal(experts, ref)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_forced_choice_keeps_the_router_gates(score):
    n, h, e, k = 30, 3, 40, 4
    items, router, g = _inputs(n, h, 16, e, torch.float32, "forced", score)
    forced = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(n * h)]).view(n, h, k)
    x = items.clone().requires_grad_(True)
    experts, gates = stream_route(x, router, k, score, forced=forced,
                                  config=RouterConfig(block_e=16))
    assert torch.equal(experts, forced)
    x64 = items.double().requires_grad_(True)
    _, ref_g = stream_route_reference(x64, router.double(), k, score, forced=forced)
    assert rel_err(gates, ref_g) <= 1e-5
    dg = torch.randn(n, h, k, generator=g)
    gates.backward(dg)
    ref_g.backward(dg.double())
    assert rel_err(x.grad, x64.grad) <= 1e-5


def test_strided_items_and_empty_input():
    # Items as a view of a wider buffer (the HP layer's receive buffer is one): any n and H
    # strides with D contiguous.
    buf = torch.randn(15, 4, 20, generator=_gen("strided"))
    items = buf[:, 1:3, :16]
    router = torch.randn(2, 16, 24, generator=_gen("r")) / 4
    experts, gates, _ = stream_route_forward(items, router, 3, config=RouterConfig(block_e=16))
    ref_e, ref_g = stream_route_reference(items.double(), router.double(), 3)
    assert torch.equal(experts, ref_e) and rel_err(gates, ref_g) <= 1e-5
    e0, g0, _ = stream_route_forward(items[:0], router, 3)
    assert e0.shape == (0, 2, 3) and g0.shape == (0, 2, 3)
    with pytest.raises(ValueError, match="top_k"):
        stream_route(items, router, 25)
