"""Where the runtime's hot loops come from: kernels/ when it provides them for the tensor's
device, torch's own grouped GEMM on CUDA, else the plain-torch loop (CPU and gloo).

The choice is made per call from the tensor's device and dtype, so one model runs on the CPU in
the tests and on the GPU in the benchmark without configuration."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.cache
def _torch_grouped_mm():
    """torch._grouped_mm if it runs forward and backward here (probed once on the GPU)."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or not torch.cuda.is_available():
        return None
    try:
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fn(x, w, offs=torch.tensor([16, 64], device="cuda", dtype=torch.int32)).sum().backward()
        torch.cuda.synchronize()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        print(f"runtime: torch._grouped_mm unusable here ({e}); using a loop", flush=True)
        return None
    return fn


def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _torch_grouped_mm()(x, w, offs=offs)


def grouped_ffn(x: torch.Tensor, group_sizes, w1: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """group_sizes: a list of ints or an int tensor (on the device: no host sync on GPU)."""
    from runtime.experts import ffn_loop
    fast = (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0
            and w2.shape[1] % 8 == 0 and _torch_grouped_mm() is not None)
    if not fast:
        if isinstance(group_sizes, torch.Tensor):
            group_sizes = group_sizes.tolist()
        return ffn_loop(x, group_sizes, w1, w2)
    sizes = torch.as_tensor(group_sizes, device=x.device, dtype=torch.int32)
    offs = sizes.cumsum(0, dtype=torch.int32)
    f = w2.shape[1]
    h = _gmm(x, w1, offs)
    return _gmm(F.silu(h[:, :f]) * h[:, f:], w2, offs)
