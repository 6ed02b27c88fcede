import zlib

import pytest
import torch
from conftest import rel_err

from kernels.router import route, route_reference, route_triton


def _brute_force(logits: torch.Tensor, k: int, score: str, renorm: bool):
    """Independent definition, one token at a time in python: sort by (-logit, index)."""
    x = logits.double().reshape(logits.shape[0], -1, logits.shape[-1])
    t, h, e = x.shape
    w = torch.empty(t, h, k, dtype=torch.float64)
    ex = torch.empty(t, h, k, dtype=torch.int64)
    counts = torch.zeros(h, e, dtype=torch.int64)
    for i in range(t):
        for hh in range(h):
            row = x[i, hh].tolist()
            order = sorted(range(e), key=lambda j, row=row: (-row[j], j))[:k]
            p = torch.softmax(x[i, hh], 0) if score == "softmax" else torch.sigmoid(x[i, hh])
            sel = p[order]
            w[i, hh] = sel / sel.sum() if renorm else sel
            ex[i, hh] = torch.tensor(order)
            counts[hh, order] += 1
    shape = (*logits.shape[:-1], k)
    return w.reshape(shape), ex.reshape(shape), counts.reshape((*logits.shape[1:-1], e))


CASES = [
    # (shape, top_k, score, renormalize, dtype)
    ((37, 16), 4, "softmax", True, torch.float32),
    ((64, 64), 8, "softmax", True, torch.bfloat16),
    ((50, 12), 3, "sigmoid", True, torch.float32),
    ((33, 24), 2, "sigmoid", False, torch.bfloat16),
    ((20, 4, 8), 2, "softmax", True, torch.float32),
    ((19, 3, 10), 3, "sigmoid", True, torch.bfloat16),
    ((9, 7), 7, "softmax", False, torch.float32),
    ((300, 6), 1, "softmax", True, torch.float16),
]


@pytest.mark.parametrize("shape,k,score,renorm,dtype", CASES)
def test_route_matches_float64_reference(shape, k, score, renorm, dtype):
    gen = torch.Generator().manual_seed(zlib.crc32(repr((shape, k, score)).encode()))
    logits = (3 * torch.randn(shape, generator=gen)).to(dtype)
    out = route_triton(logits, k, score, renorm)
    ref = route_reference(logits.double(), k, score, renorm)
    assert out.weights.dtype == torch.float32 and out.experts.dtype == torch.int64
    assert out.counts.dtype == torch.int32
    assert torch.equal(out.experts, ref.experts)
    assert torch.equal(out.counts, ref.counts)
    assert rel_err(out.weights, ref.weights) < 1e-5
    assert out.counts.sum() == shape[0] * k * (shape[1] if len(shape) == 3 else 1)


@pytest.mark.parametrize("shape,k,score,renorm", [((12, 6), 3, "softmax", True),
                                                  ((7, 2, 5), 2, "sigmoid", False)])  # fmt: skip
def test_reference_matches_brute_force(shape, k, score, renorm):
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ref = route_reference(logits.double(), k, score, renorm)
    w, ex, counts = _brute_force(logits, k, score, renorm)
    assert torch.equal(ref.experts, ex)
    assert torch.equal(ref.counts.long(), counts)
    assert rel_err(ref.weights, w) < 1e-12


def test_ties_go_to_lower_index():
    # Small integers in bf16: many exact ties within each row.
    gen = torch.Generator().manual_seed(11)
    logits = torch.randint(-2, 3, (40, 16), generator=gen).to(torch.bfloat16)
    out = route_triton(logits, 5)
    w, ex, counts = _brute_force(logits, 5, "softmax", True)
    assert torch.equal(out.experts, ex)
    assert torch.equal(out.counts.long(), counts)
    assert rel_err(out.weights, w) < 1e-5


@pytest.mark.parametrize("score,renorm", [("softmax", True), ("softmax", False),
                                          ("sigmoid", True)])  # fmt: skip
def test_route_gradient(score, renorm):
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(24, 2, 12, generator=gen).requires_grad_(True)
    out = route(logits, 3, score, renorm)
    g = torch.randn(out.weights.shape, generator=gen)
    (out.weights * g).sum().backward()
    x64 = logits.detach().double().requires_grad_(True)
    ref = route_reference(x64, 3, score, renorm)
    (ref.weights * g.double()).sum().backward()
    assert torch.equal(out.experts, ref.experts)
    assert rel_err(logits.grad, x64.grad) < 1e-5


def test_bad_arguments():
    with pytest.raises(ValueError):
        route(torch.randn(4, 8), 9)
    with pytest.raises(ValueError):
        route(torch.randn(4, 8), 2, score="relu")
    with pytest.raises(ValueError):
        route(torch.randn(8), 2)
