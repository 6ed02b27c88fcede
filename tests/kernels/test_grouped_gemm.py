import importlib
import zlib

import pytest
import torch
from conftest import TOL, rel_err

from kernels.grouped_gemm import grouped_mm, grouped_mm_reference

gg = importlib.import_module("kernels.grouped_gemm")  # the module, not the function

# Both forward kernels: the pointer kernel (what "auto" picks under the interpreter) and the
# persistent TMA kernel (what "auto" picks on Hopper), where this Triton's interpreter has
# tensor descriptors. Shapes TMA cannot take (K rows not 16-byte aligned) fall back by
# themselves, so "tma" runs both kernels across the cases.
KERNELS = ["pointer", pytest.param("tma", marks=pytest.mark.skipif(
    not gg.HAS_TMA, reason="no tl.make_tensor_descriptor in this Triton"))]  # fmt: skip

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
@pytest.mark.parametrize("kernel", KERNELS)
def test_grouped_mm_forward_backward(sizes, tail, k, n, dtype, use_offsets, kernel):
    gen = _gen(sizes, tail, k, n, use_offsets)
    g = len(sizes)
    sizes_t = torch.tensor(sizes)
    m = sum(sizes) + tail
    x = torch.randn(m, k, generator=gen).to(dtype).requires_grad_(True)
    w = (torch.randn(g, k, n, generator=gen) / k**0.5).to(dtype).requires_grad_(True)
    if use_offsets:
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes_t, 0)])
        out = grouped_mm(x, w, offsets, kernel=kernel)
    else:
        out = grouped_mm(x, w, group_sizes=sizes_t.int(), kernel=kernel)
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


@pytest.mark.parametrize("kernel", KERNELS)
def test_grouped_mm_transposed_weight_view(kernel):
    # w given as a transposed view (stride (K*N, 1, K)): the kernel takes any strides.
    gen = _gen("t")
    sizes = torch.tensor([19, 0, 13])
    x = torch.randn(32, 24, generator=gen).bfloat16()
    w = torch.randn(3, 40, 24, generator=gen).bfloat16().transpose(1, 2)
    out = grouped_mm(x, w, group_sizes=sizes, kernel=kernel)
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


@pytest.mark.skipif(not gg.HAS_TMA, reason="no tl.make_tensor_descriptor in this Triton")
def test_tma_kernel_selection_and_tail_rows():
    # Which operands the TMA kernel takes, and that it writes zeros (not NaN) for rows past the
    # last group even when x holds NaN there.
    gen = _gen("tma")
    x = torch.randn(40, 32, generator=gen).bfloat16()
    x[-6:] = float("nan")
    w = torch.randn(3, 32, 48, generator=gen).bfloat16()
    w_kc = w.transpose(1, 2).contiguous().transpose(1, 2)
    out = torch.empty(40, 48, dtype=torch.bfloat16)

    def sel(t: torch.Tensor, bk: int = 16):
        return gg._tma_operands(x, t, (t.stride(0), t.stride(1), t.stride(2)), 48, out, bk)

    assert sel(w) == (True, 48)  # [G*K, N], N contiguous
    assert sel(w_kc) == (False, 32)  # [G*N, K], K contiguous
    assert sel(w, bk=64) is None  # K = 32 is not a whole number of K steps
    gap = torch.randn(3, 40, 48).bfloat16()[:, :32]  # groups 40 rows apart: no single 2-D view
    assert sel(gap) is None
    sizes = torch.tensor([10, 0, 24])
    for ww in (w, w_kc):
        y = grouped_mm(x, ww, group_sizes=sizes, kernel="tma")
        ref = grouped_mm_reference(x[:34].double(), ww.double(), group_sizes=sizes)
        assert torch.all(y[34:] == 0)
        assert rel_err(y[:34], ref) < TOL[torch.bfloat16]
