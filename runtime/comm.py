"""Process group set-up and the differentiable collectives the MoE layers are built from.

One process per GPU (or per CPU slot with gloo), started by torchrun: the rendezvous is
torchrun's own (env:// with MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK), so multi-node runs
need nothing here beyond torchrun's flags.

Every collective takes the group's timeout. A rank that dies mid-step leaves its peers blocked
in a collective; with NCCL the watchdog aborts the communicator after the timeout
(TORCH_NCCL_ASYNC_ERROR_HANDLING), and with gloo the blocked call raises after the timeout. In
both cases the survivors end with an error naming the collective, never a hang.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    backend: str


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistEnv:
    """Join the torchrun job (or a one-process job when launched without torchrun)."""
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    if dist.is_initialized():  # a caller (a test, a notebook) made the group already
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank = int(os.environ.get("RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "MASTER_ADDR" not in os.environ:  # plain `python -m runtime.train`: a job of one
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    dev = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        kw = {"device_id": dev} if use_cuda else {}
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=datetime.timedelta(seconds=timeout_s), **kw)
    return DistEnv(rank, world, local_rank, dev, backend)


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ByteLog:
    """Bytes this process's named all-to-alls moved, per (layer, pass, phase): `sent[key]`
    int64[world] rows-times-row-bytes to each rank, `received[key]` from each, the rank's own
    block included (it is part of the buffers). A test hook (tests/runtime/
    test_traffic_bytes.py checks it against planner.traffic): filled only inside
    `record_bytes()`, and only for calls that name their phase; repeated calls of one key
    (chunks) add up. The reverse exchange in backward is logged under ("bwd", grad_phase)."""

    def __init__(self) -> None:
        self.sent: dict[tuple[int, str, str], np.ndarray] = {}
        self.received: dict[tuple[int, str, str], np.ndarray] = {}
        self._lock = threading.Lock()

    def add(self, key: tuple[int, str, str], send: list[int], recv: list[int],
            row_bytes: int) -> None:
        with self._lock:
            for book, splits in ((self.sent, send), (self.received, recv)):
                v = np.asarray(splits, dtype=np.int64) * row_bytes
                book[key] = book[key] + v if key in book else v


_BYTE_LOG: ByteLog | None = None


@contextlib.contextmanager
def record_bytes() -> Iterator[ByteLog]:
    """Log the bytes of every named all-to-all (forward and backward) run inside."""
    global _BYTE_LOG
    prev, _BYTE_LOG = _BYTE_LOG, ByteLog()
    try:
        yield _BYTE_LOG
    finally:
        _BYTE_LOG = prev


def _log(name: tuple[int, str, str] | None, send: list[int], recv: list[int],
         x: torch.Tensor) -> None:
    log = _BYTE_LOG
    if log is not None and name is not None:
        log.add(name, send, recv, math.prod(x.shape[1:]) * x.element_size())


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with explicit splits; its gradient is the reverse exchange."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int],
                group, names) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        ctx.names = names
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        _log(names[0], in_splits, out_splits, x)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        gx = g.new_empty((sum(in_splits), *g.shape[1:]))
        dist.all_to_all_single(gx, g.contiguous(), in_splits, out_splits, group=ctx.group)
        _log(ctx.names[1], out_splits, in_splits, g)
        return gx, None, None, None, None


def all_to_all(x: torch.Tensor, send_splits: list[int], recv_splits: list[int],
               group=None, *, layer: int = -1, phase: str = "",
               grad_phase: str | None = None, pass_: str = "fwd") -> torch.Tensor:
    """Rows x[sum(send_splits[:d]):...] go to rank d; rows from rank s arrive in block s.
    `phase` names the exchange for `record_bytes` as (layer, pass_, phase), its reverse in
    backward as (layer, "bwd", grad_phase or phase)."""
    names = ((layer, pass_, phase), (layer, "bwd", grad_phase or phase)) if phase else \
        (None, None)
    return _AllToAll.apply(x, list(map(int, recv_splits)), list(map(int, send_splits)), group,
                           names)


def all_gather_counts(local: torch.Tensor, group=None) -> torch.Tensor:
    """Stack every rank's integer count tensor: the size exchange that precedes EP's dispatch."""
    world = dist.get_world_size(group)
    out = local.new_empty(world * local.numel())
    # all_gather_single replaced all_gather_into_tensor in torch 2.13; the GPUs carry 2.11.
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, local.reshape(-1).contiguous(), group=group)
    return out.view(world, *local.shape)


def all_reduce_grads(params: list[torch.nn.Parameter], group=None) -> None:
    """Sum the gradients of replicated (data-parallel) parameters over the ranks, in one flat
    buffer so it is one collective. The loss is a sum over every rank's tokens, so sum, not mean,
    keeps the gradients equal to the single-process reference."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    off = 0
    for g in grads:
        g.copy_(flat[off:off + g.numel()].view_as(g))
        off += g.numel()


_SIDE_GROUP = None


def side_group():
    """A second communicator over all ranks, for collectives that overlap the main stream's
    (FSEP's weight gather): NCCL runs one communicator's operations in order, so overlap needs
    its own. Created on first use; every rank reaches it at the same point of the same step."""
    global _SIDE_GROUP
    if _SIDE_GROUP is None:
        _SIDE_GROUP = dist.new_group(list(range(dist.get_world_size())))
    return _SIDE_GROUP
