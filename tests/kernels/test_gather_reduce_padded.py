"""The ragged gather-reduce (``gather_reduce(..., padded=True)``: negative entries of the map
add nothing) against a float64 loop, and FSEP's ``gather_rows`` backward, which uses it with
rows cut into pieces, against ``index_add``."""

import pytest
import torch

from kernels.combine import gather_reduce
from tests.kernels.conftest import TOL, rel_err


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [False, True])
def test_padded_gather_reduce_matches_loop(dtype: torch.dtype, weighted: bool) -> None:
    g = torch.Generator().manual_seed(7)
    y = torch.randn(11, 37, generator=g).to(dtype)
    row_map = torch.randint(0, 11, (6, 3), generator=g, dtype=torch.int32)
    row_map[torch.rand(6, 3, generator=g) < 0.4] = -1
    row_map[2] = -1  # a row with nothing to sum is zero
    w = torch.rand(6, 3, generator=g) if weighted else None
    out = gather_reduce(y, row_map, w, padded=True)
    ref = torch.zeros(6, 37, dtype=torch.float64)
    for t in range(6):
        for j in range(3):
            r = int(row_map[t, j])
            if r >= 0:
                ref[t] += (float(w[t, j]) if weighted else 1.0) * y[r].double()
    assert out.dtype == dtype
    assert torch.all(out[2] == 0)
    assert rel_err(out, ref) < TOL[dtype]


def test_gather_rows_backward_is_a_segment_sum() -> None:
    from runtime.moe_layer import gather_rows
    g = torch.Generator().manual_seed(3)
    # Rows wide enough to be cut into pieces (32768 -> 2 x 16384), taken 0, 1 and 3 times.
    x = torch.randn(4, 2, 16384, generator=g, requires_grad=True)
    index = [3, 0, 3, 1, 3]
    y = gather_rows(x, index)
    torch.testing.assert_close(y, x[index], rtol=0, atol=0)
    gy = torch.randn(y.shape, generator=g)
    (gx,) = torch.autograd.grad(y, x, gy)
    ref = torch.zeros(4, 2, 16384, dtype=torch.float64).index_add_(
        0, torch.tensor(index), gy.double())
    assert torch.all(gx[2] == 0)
    assert rel_err(gx, ref) < TOL[torch.float32]
