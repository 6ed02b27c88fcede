"""`moesim run`: train the MoE transformer for real. Inside torchrun (WORLD_SIZE set) it runs in
this process; otherwise it starts `torchrun --standalone --nproc-per-node N -m runtime.train`
(one node; multi-node jobs call torchrun with its rendezvous flags directly)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def register(sub: argparse._SubParsersAction) -> None:
    from runtime.train import build_parser
    p = sub.add_parser("run", help="train the MoE transformer with EP, HP or FSEP (torchrun)",
                       description=__doc__.split("\n")[0])
    build_parser(p)
    p.add_argument("--nproc", type=int, default=1,
                   help="processes (GPUs) when not already under torchrun")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from moesim.config import load_config
    load_config(args.config)  # bad input: one line and exit 2 before anything starts
    if "WORLD_SIZE" in os.environ or args.nproc == 1:
        from runtime.train import main_args
        return main_args(args)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={args.nproc}", "-m", "runtime.train", "--config",
           str(args.config)]
    for s in args.set:
        cmd += ["--set", s]
    if args.out:
        cmd += ["--out", args.out]
    if args.resume:
        cmd.append("--resume")
    return subprocess.call(cmd)
