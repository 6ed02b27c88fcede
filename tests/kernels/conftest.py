"""CPU tests of the Triton kernels, run by Triton's interpreter.

``TRITON_INTERPRET`` must be set when ``triton.jit`` defines the kernels (it picks the
interpreter then), so it is set here, when pytest loads this folder, and ``kernels`` is imported
at once. It is then unset again, and set only around each test of this folder, so that tests
elsewhere in the same session (and the processes they spawn) are not slowed down by the
interpreter: ``kernels.backend.use_triton`` checks the live variable on CPU tensors.

If something imported the kernels before this file ran, they are compiled-mode functions that
cannot run on CPU tensors: the ``interpreted`` fixture then fails every test here rather than
let them pass on the torch fallback.
"""

import os

_saved = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"
import kernels  # noqa: E402, F401  (defines the kernels in interpreter mode)

if _saved is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _saved

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def interpreted(monkeypatch: pytest.MonkeyPatch) -> None:
    from kernels import backend

    if not backend.INTERPRET:
        pytest.fail("kernels were imported before TRITON_INTERPRET=1 was set; run this folder "
                    "on its own: python3 -m pytest tests/kernels")  # fmt: skip
    monkeypatch.setenv("TRITON_INTERPRET", "1")
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
