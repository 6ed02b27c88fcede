"""Run a function on N gloo processes (torch.multiprocessing spawn) with a file rendezvous:
no TCP port is chosen, so tests cannot collide on one."""

from __future__ import annotations

import os
import tempfile
import traceback
from datetime import timedelta

import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, fn, args, errq, timeout_s):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world, timeout=timedelta(seconds=timeout_s))
        fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:  # report to the parent, which fails the test with it
        errq.put((rank, traceback.format_exc()))
        raise SystemExit(1) from None


def run_ranks(world: int, fn, *args, timeout_s: float = 60.0) -> None:
    ctx = mp.get_context("spawn")
    errq = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rdzv")
        procs = [ctx.Process(target=_worker, args=(r, world, init_file, fn, args, errq,
                                                   timeout_s)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout_s * 3)
        alive = [p for p in procs if p.is_alive()]
        for p in alive:
            p.kill()
        errors = []
        while not errq.empty():
            errors.append(errq.get())
        if errors:
            rank, tb = sorted(errors)[0]
            raise AssertionError(f"rank {rank} failed:\n{tb}")
        if alive:
            raise AssertionError(f"{len(alive)} ranks hung")
        bad = [p.exitcode for p in procs if p.exitcode != 0]
        assert not bad, f"exit codes {bad}"
