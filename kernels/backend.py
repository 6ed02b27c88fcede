"""Which implementation a kernel call takes: the Triton kernel or its pure-torch reference.

Triton runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (its
interpreter, used by the CPU tests). The variable is read once, here, because ``triton.jit``
reads it when the kernels are defined: every kernel module imports this module before it
defines its kernels, so both agree. Anything else (CPU tensors on the gloo runtime, other
devices) takes the torch reference, which computes the same function.
"""

from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(t: torch.Tensor) -> bool:
    """True when a Triton kernel can run on ``t``'s device in this process.

    CPU tensors take the interpreter only while ``TRITON_INTERPRET=1`` is still set: the kernel
    tests unset it outside their own tests, so other tests in the same pytest process (and the
    processes they spawn) get the fast torch references on the CPU."""
    if t.device.type == "cuda":
        return True
    live = os.environ.get("TRITON_INTERPRET", "0") == "1"
    return INTERPRET and live and t.device.type == "cpu"
