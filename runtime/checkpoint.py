"""Checkpoints: one file per rank per step (its experts differ), written atomically, and a
`latest` pointer that rank 0 moves only after every rank has written: a crash mid-checkpoint
leaves the previous checkpoint in force.

A checkpoint holds the model and optimizer state, the step, the FSEP planners' last counts and
what the run has logged so far (losses, routing counts, Result rows), so that `--resume` both
continues bit-for-bit and ends with the same output files as an uninterrupted run.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from moesim.atomic import atomic_path, write_text_atomic
from moesim.errors import InputError


def save(ckpt_dir: Path, step: int, rank: int, state: dict) -> None:
    folder = ckpt_dir / f"step_{step:08d}"
    with atomic_path(folder / f"rank{rank}.pt") as tmp:
        torch.save(state, tmp)
    dist.barrier()
    if rank == 0:
        write_text_atomic(ckpt_dir / "latest", folder.name + "\n")
    dist.barrier()


def load_latest(ckpt_dir: Path, rank: int) -> dict | None:
    pointer = ckpt_dir / "latest"
    if not pointer.exists():
        return None
    path = ckpt_dir / pointer.read_text().strip() / f"rank{rank}.pt"
    if not path.exists():
        raise InputError(path, "file", "the latest checkpoint has no file for this rank "
                         "(resumed with a different number of ranks?)")
    return torch.load(path, weights_only=False)
