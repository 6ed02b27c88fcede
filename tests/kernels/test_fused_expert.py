"""The fused thin-expert MLP (kernels/fused_expert.py) under the interpreter, against its
float64 torch reference: output and the three gradients, on ragged groups."""

import zlib

import pytest
import torch
from conftest import TOL, rel_err

from kernels.fused_expert import (
    FusedExpertConfig,
    fused_expert,
    fused_expert_forward,
    fused_expert_reference,
)


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _case(sizes, d, f, dtype, tail=0):
    g = _gen(tuple(sizes), d, f, dtype, tail)
    m = sum(sizes) + tail
    x = torch.randn(m, d, generator=g).to(dtype)
    w1 = (torch.randn(len(sizes), d, f, generator=g) / d ** 0.5).to(dtype)
    w2 = (torch.randn(len(sizes), f, d, generator=g) / f ** 0.5).to(dtype)
    offsets = torch.zeros(len(sizes) + 1, dtype=torch.int32)
    offsets[1:] = torch.cumsum(torch.tensor(sizes), 0)
    return x, w1, w2, offsets, g


# Ragged groups: empty ones, one row, a group of exactly one tile, groups spanning several
# tiles with a padded tail; D not a power of two; rows past the last group (zeros).
CASES = [
    ([5, 0, 16, 33, 1, 0], 16, 32, 0),
    ([40, 7], 24, 48, 3),
    ([0, 0, 17], 32, 16, 0),
]


@pytest.mark.parametrize("sizes,d,f,tail", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dx", ["recompute", "atomic"])
def test_matches_float64(sizes, d, f, tail, dtype, dx):
    x, w1, w2, offsets, g = _case(sizes, d, f, dtype, tail)
    cfg = FusedExpertConfig(block_m=16, block_f=16, dw_block_m=16, dw_block_f=16, dx=dx)
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    y = fused_expert(*leaves, offsets, cfg)
    ref_leaves = [t.double().requires_grad_(True) for t in (x, w1, w2)]
    ref = fused_expert_reference(*ref_leaves, offsets)
    tol = TOL[dtype] if dtype != torch.float32 else 1e-5
    assert y.dtype == dtype and rel_err(y, ref) <= tol
    if tail:
        assert (y[-tail:] == 0).all()
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy)
    ref.backward(dy.double())
    for name, got, want in zip(("dx", "dw1", "dw2"), leaves, ref_leaves, strict=True):
        assert got.grad.dtype == dtype, name
        assert rel_err(got.grad, want.grad) <= tol, name
    # Empty groups get exactly zero weight gradients.
    empty = torch.tensor(sizes) == 0
    assert (leaves[1].grad[empty] == 0).all() and (leaves[2].grad[empty] == 0).all()


def test_default_config_and_shape_errors():
    x, w1, w2, offsets, _ = _case([70, 3, 0, 64], 64, 128, torch.float32)
    y = fused_expert_forward(x, w1, w2, offsets)
    ref = fused_expert_reference(x.double(), w1.double(), w2.double(), offsets)
    assert rel_err(y, ref) <= 1e-5
    # The dW kernel's own chunk (32 here) differs from the forward's (16): both must agree.
    leaves = [t.clone().requires_grad_(True) for t in (x, w1, w2)]
    cfg = FusedExpertConfig(block_m=16, block_f=16, dw_block_m=32, dw_block_f=32)
    fused_expert(*leaves, offsets, cfg).backward(torch.ones_like(y))
    r = [t.double().requires_grad_(True) for t in (x, w1, w2)]
    fused_expert_reference(*r, offsets).backward(torch.ones_like(ref))
    for got, want in zip(leaves, r, strict=True):
        assert rel_err(got.grad, want.grad) <= 1e-5
    with pytest.raises(ValueError, match="multiple of 16"):
        fused_expert_forward(x[:, :8], w1[:, :8, :10], w2[:, :10, :8], offsets)
    with pytest.raises(ValueError, match="offsets"):
        fused_expert(x, w1, w2, offsets[:-1])
