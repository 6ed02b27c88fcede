"""CPU tests of the Triton kernels, run by Triton's interpreter.

``TRITON_INTERPRET`` must be set before ``triton.jit`` defines the kernels (it picks the
interpreter at definition time), so it is set here, when pytest loads this folder, before any
test module imports ``kernels``. If something imported the kernels earlier in the session, the
kernels are compiled-mode functions that cannot run on CPU tensors: the ``interpreted`` fixture
then fails every test here rather than let them pass on the torch fallback.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest
import torch


@pytest.fixture(autouse=True)
def interpreted() -> None:
    from kernels import backend

    if not backend.INTERPRET:
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set; run this folder "
                    "on its own: python3 -m pytest tests/kernels")  # fmt: skip
    assert backend.use_triton(torch.empty(0))


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; NaN anywhere gives inf (never passes)."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out64).all():
        return float("inf")
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-300)).item()


# Tolerances from device/METHOD.md: fp32 arithmetic lands far under 1e-3 (we ask 1e-5 where
# the kernel does plain fp32 math), bf16 results between 1e-3 and 1e-2.
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
