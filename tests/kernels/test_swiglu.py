import zlib

import pytest
import torch
from conftest import TOL, rel_err

from kernels import backend
from kernels.swiglu import (
    swiglu,
    swiglu_backward_reference,
    swiglu_backward_triton,
    swiglu_reference,
    swiglu_triton,
    tile_shape,
)

# The saturating inputs overflow exp(-g) to inf on purpose (sigmoid -> 0); numpy, under the
# interpreter, warns about it.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _inputs(m: int, f: int, dtype: torch.dtype, *key):
    """h [M, 2F] (scale 3, a few saturating entries) and dout [M, F], never zeros."""
    gen = _gen(m, f, dtype, *key)
    h = 3 * torch.randn(m, 2 * f, generator=gen)
    if m * f >= 4:
        flat = h.view(-1)
        idx = torch.randint(0, flat.numel(), (4,), generator=gen)
        flat[idx] = torch.tensor([-90.0, 90.0, -30.0, 30.0])  # exp overflow / sigmoid at 0, 1
    dout = torch.randn(m, f, generator=gen)
    return h.to(dtype), dout.to(dtype)


def _ref64(h: torch.Tensor, dout: torch.Tensor):
    """float64 forward and autograd backward of the plain torch definition."""
    h64 = h.detach().double().requires_grad_(True)
    out64 = swiglu_reference(h64)
    out64.backward(dout.double())
    return out64.detach(), h64.grad


CASES = [
    # (M, F, dtype): F=704 (64-wide column tiles, even), odd F (masked tail), F=1408, F=1,
    # M not a multiple of the row tile.
    (37, 704, torch.bfloat16),
    (19, 1408, torch.float32),
    (50, 7, torch.float32),
    (33, 23, torch.bfloat16),
    (3, 1, torch.bfloat16),
    (70, 96, torch.float16),
]


@pytest.mark.parametrize("m,f,dtype", CASES)
def test_kernels_match_float64(m, f, dtype):
    h, dout = _inputs(m, f, dtype)
    ref, dref = _ref64(h, dout)
    # Poisoned outputs: every element must be written.
    out = swiglu_triton(h, out=torch.full((m, f), float("nan"), dtype=dtype))
    dh = swiglu_backward_triton(h, dout, dh=torch.full((m, 2 * f), float("nan"), dtype=dtype))
    assert out.dtype == dtype and dh.dtype == dtype
    # (bf16 lands near 3.3e-3 here: the interpreter's fp32 -> bf16 cast truncates, twice the
    # error of the GPU's round-to-nearest; TOL still holds.)
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(dh, dref) < TOL[dtype]


@pytest.mark.parametrize("m,f,dtype", [CASES[0], CASES[2], CASES[3]])
@pytest.mark.parametrize("path", ["triton", "torch"])
def test_autograd_matches_float64(m, f, dtype, path, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")  # the CPU/gloo runtime's path
    assert backend.use_triton(torch.empty(0)) == (path == "triton")
    h, dout = _inputs(m, f, dtype, path)
    hg = h.clone().requires_grad_(True)
    out = swiglu(hg)
    # One custom node straight onto h: no slice/chunk backward behind it.
    assert type(out.grad_fn).__name__ == "_SwiGLUFnBackward"
    assert [type(n).__name__ for n, _ in out.grad_fn.next_functions] == ["AccumulateGrad"]
    out.backward(dout)
    ref, dref = _ref64(h, dout)
    assert out.shape == (m, f) and out.dtype == dtype
    assert hg.grad.shape == (m, 2 * f) and hg.grad.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(hg.grad, dref) < TOL[dtype]
    with torch.no_grad():
        assert rel_err(swiglu(h), ref) < TOL[dtype]


def test_backward_reference_float64():
    # The closed form the torch path runs, against autograd of the definition (float64).
    h, dout = _inputs(41, 13, torch.float64)
    _, dref = _ref64(h, dout)
    assert rel_err(swiglu_backward_reference(h, dout), dref) < 1e-12


@pytest.mark.parametrize("path", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_zero_rows(path, dtype, monkeypatch):
    if path == "torch":
        monkeypatch.setenv("TRITON_INTERPRET", "0")
    h = torch.empty(0, 2 * 704, dtype=dtype, requires_grad=True)
    out = swiglu(h)
    assert out.shape == (0, 704) and out.dtype == dtype
    out.sum().backward()
    assert h.grad.shape == (0, 2 * 704)


def test_strided_inputs():
    # A row stride wider than 2F (a column slice of a wider buffer), a column-major h, and an
    # expanded output gradient (from .sum()).
    h, dout = _inputs(21, 40, torch.float32, "strided")
    wide = torch.randn(21, 100, generator=_gen("wide"))
    wide[:, :80] = h
    view = wide[:, :80]
    assert view.stride(0) == 100
    ref, dref = _ref64(h, dout)
    assert rel_err(swiglu_triton(view), ref) < TOL[torch.float32]
    assert rel_err(swiglu_backward_triton(view, dout), dref) < TOL[torch.float32]
    colmajor = h.t().contiguous().t().requires_grad_(True)
    out = swiglu(colmajor)
    out.sum().backward()
    _, dsum = _ref64(h, torch.ones_like(dout))
    assert rel_err(out, ref) < TOL[torch.float32]
    assert rel_err(colmajor.grad, dsum) < TOL[torch.float32]


def test_tile_shapes_and_errors():
    assert tile_shape(131072, 704, 4096) == (64, 64)
    assert tile_shape(131072, 1408, 4096) == (32, 128)
    assert tile_shape(5, 23, 4096) == (8, 32)
    with pytest.raises(ValueError):
        swiglu(torch.randn(4, 7))
    with pytest.raises(ValueError):
        swiglu(torch.randn(8))
