"""Where the runtime's hot loops come from: kernels/ when it provides them for the tensor's
device, torch's own grouped GEMM on CUDA, else the plain-torch loop (CPU and gloo).

The choice is made per call from the tensor's device and dtype, so one model runs on the CPU in
the tests and on the GPU in the benchmark without configuration."""

from __future__ import annotations

import functools

import torch

from runtime.upload import upload


@functools.cache
def _torch_grouped_mm():
    """torch._grouped_mm if it runs forward and backward here (probed once on the GPU).

    The probe's output gradient is a dense tensor, as in the layers: `_grouped_mm`'s backward
    rejects an expanded one (`.sum().backward()` gives strides [0, 0]), which once made this
    probe fail on every GPU and sent the runtime down the per-expert loop unnoticed."""
    fn = getattr(torch, "_grouped_mm", None)
    if fn is None or not torch.cuda.is_available():
        return None
    try:
        x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(2, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        y = fn(x, w, offs=torch.tensor([16, 64], device="cuda", dtype=torch.int32))
        y.backward(torch.randn_like(y))
        torch.cuda.synchronize()
    except (RuntimeError, TypeError, NotImplementedError) as e:
        print(f"runtime: torch._grouped_mm unusable here ({e}); using a loop", flush=True)
        return None
    return fn


def expert_backend(device: torch.device, dtype: torch.dtype) -> str:
    """Which grouped FFN a layer on `device` in `dtype` runs (recorded in run directories)."""
    if device.type == "cuda" and dtype == torch.bfloat16 and _torch_grouped_mm() is not None:
        return "torch._grouped_mm"
    return "loop"


class _DenseGrad(torch.autograd.Function):
    """Identity whose backward makes the gradient dense: `_grouped_mm`'s backward refuses
    expanded or strided gradients (e.g. from a sum or a broadcast downstream)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g.contiguous()


def _gmm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return _DenseGrad.apply(_torch_grouped_mm()(x, w, offs=offs))


def grouped_ffn(x: torch.Tensor, group_sizes, w1: torch.Tensor,
                w2: torch.Tensor, unfused: bool = False) -> torch.Tensor:
    """group_sizes: a list of ints or an int tensor (on the device: no host sync on GPU).
    SwiGLU or GELU experts by w1's width (runtime.experts.expert_kind_of)."""
    from runtime.experts import activate, expert_kind_of, ffn_loop
    fast = (x.is_cuda and x.dtype == torch.bfloat16 and x.shape[1] % 8 == 0
            and w2.shape[1] % 8 == 0 and _torch_grouped_mm() is not None)
    if not fast:
        if isinstance(group_sizes, torch.Tensor):
            group_sizes = group_sizes.tolist()
        return ffn_loop(x, group_sizes, w1, w2, unfused)
    if not isinstance(group_sizes, torch.Tensor):
        (group_sizes,) = upload(group_sizes, device=x.device)  # pinned: no stream stall
    offs = group_sizes.cumsum(0, dtype=torch.int32)
    h = _gmm(x, w1, offs)
    return _gmm(activate(h, expert_kind_of(w1, w2), unfused), w2, offs)
