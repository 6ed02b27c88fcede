"""take_rows and gather_rows: the same values and gradients as index_select, for
permutations, k-fold expansions and rows taken any number of times. (On the GPU take_rows'
k-fold backward is kernels.combine.gather_reduce, tested in tests/kernels.)"""

import pytest
import torch

from runtime.moe_layer import take_rows


@pytest.mark.parametrize("k", [1, 2, 3])
def test_take_rows_matches_index_select(k: int) -> None:
    g = torch.Generator().manual_seed(k)
    x = torch.randn(5, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    order = torch.randperm(5 * k, generator=g)
    y = take_rows(x, order, k)
    ref = x.index_select(0, order // k)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gref,) = torch.autograd.grad(ref, x, gy)
    torch.testing.assert_close(gx, gref)
    assert torch.autograd.gradcheck(lambda t: take_rows(t, order, k), (x,))


@pytest.mark.parametrize("index", [[2, 0, 2, 2, 4], [1], [], [0, 1, 2, 3, 4, 0]])
def test_gather_rows_matches_index_select(index: list[int]) -> None:
    from runtime.moe_layer import gather_rows
    g = torch.Generator().manual_seed(len(index))
    x = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    idx = torch.tensor(index, dtype=torch.int64)
    y = gather_rows(x, idx)
    ref = x.index_select(0, idx)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gref,) = torch.autograd.grad(ref, x, gy)
    torch.testing.assert_close(gx, gref)
