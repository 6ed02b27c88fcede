"""take_slices and gather_rows: the same values and gradients as index_select, for
permutations, k-fold expansions (rows and a middle dimension) and rows taken any number of times."""

import pytest
import torch

from runtime.moe_layer import take_slices


@pytest.mark.parametrize("k,dim", [(1, 0), (3, 0), (1, 1), (2, 1)])
def test_take_slices_matches_index_select(k: int, dim: int) -> None:
    g = torch.Generator().manual_seed(k * 10 + dim)
    shape = [5, 4, 3]
    x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
    order = torch.randperm(shape[dim] * k, generator=g)
    y = take_slices(x, order, k, dim)
    ref = x.index_select(dim, order // k)
    torch.testing.assert_close(y, ref, rtol=0, atol=0)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    (gref,) = torch.autograd.grad(ref, x, gy)
    torch.testing.assert_close(gx, gref)
    assert torch.autograd.gradcheck(lambda t: take_slices(t, order, k, dim), (x,))


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
