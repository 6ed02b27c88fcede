import zlib

import pytest
import torch
from conftest import TOL, rel_err

from kernels.grouped_gemm import grouped_mm, grouped_mm_reference

# The interpreter path uses 16x16x16 tiles, so these sizes give groups of several row tiles,
# partial tiles, empty groups, K and N tails, and rows past the last group.
CASES = [
    # (group sizes, tail rows, K, N, dtype)
    ([5, 0, 37, 16, 0, 3], 4, 40, 24, torch.bfloat16),
    ([32, 17, 1], 0, 64, 48, torch.bfloat16),
    ([0, 0, 0], 5, 16, 16, torch.bfloat16),
    ([21, 9, 0, 30], 0, 24, 40, torch.float32),
    ([0], 0, 32, 16, torch.float16),
    ([9, 0, 20], 2, 12, 8, torch.bfloat16),  # N and K under one tile
]


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


@pytest.mark.parametrize("sizes,tail,k,n,dtype", CASES)
@pytest.mark.parametrize("use_offsets", [True, False])
def test_grouped_mm_forward_backward(sizes, tail, k, n, dtype, use_offsets):
    gen = _gen(sizes, tail, k, n, use_offsets)
    g = len(sizes)
    sizes_t = torch.tensor(sizes)
    m = sum(sizes) + tail
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(g, k, n, generator=gen) / k**0.5).to(dtype).requires_grad_(True)
    if use_offsets:
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes_t, 0)])
        out = grouped_mm(x, w, offsets)
    else:
        out = grouped_mm(x, w, group_sizes=sizes_t.int())
    assert out.shape == (m, n) and out.dtype == dtype
    dy = torch.randn(m, n, generator=gen).to(dtype)
    out.backward(dy)

    x64 = x.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    ref = grouped_mm_reference(x64, w64, group_sizes=sizes_t)
    ref.backward(dy.double())
    # Rows outside every group are zeros, in the output and in dX.
    assert torch.all(out[sum(sizes) :] == 0)
    assert torch.all(x.grad[sum(sizes) :] == 0)
    if sum(sizes) > 0:
        assert rel_err(out, ref) < TOL[dtype]
        assert rel_err(x.grad, x64.grad) < TOL[dtype]
    for gi, s in enumerate(sizes):
        if s == 0:
            assert torch.all(w.grad[gi] == 0), "empty group must get a zero weight gradient"
        else:
            assert rel_err(w.grad[gi], w64.grad[gi]) < TOL[dtype]


def test_grouped_mm_transposed_weight_view():
    # w given as a transposed view (stride (K*N, 1, K)): the kernel takes any strides.
    gen = _gen("t")
    sizes = torch.tensor([19, 0, 13])
    x = torch.randn(32, 24, generator=gen).bfloat16()
    w = torch.randn(3, 40, 24, generator=gen).bfloat16().transpose(1, 2)
    out = grouped_mm(x, w, group_sizes=sizes)
    ref = grouped_mm_reference(x.double(), w.double(), group_sizes=sizes)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


def test_bad_arguments():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError):
        grouped_mm(x, torch.randn(2, 7, 3), group_sizes=torch.tensor([2, 2]))
    with pytest.raises(ValueError):
        grouped_mm(x, torch.randn(2, 8, 3))
    with pytest.raises(ValueError):
        grouped_mm(x, torch.randn(2, 8, 3), torch.tensor([0, 4]))
    with pytest.raises(TypeError):
        grouped_mm(x, torch.randn(2, 8, 3).double(), group_sizes=torch.tensor([2, 2]))
