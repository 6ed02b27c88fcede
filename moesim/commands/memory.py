"""`moesim memory --config C` (or `--run DIR`): the peak memory per GPU of a training
configuration (moesim.sim.memory), term by term for its worst pipeline stage, and whether it
fits: "fits: X GiB of Y" or "does not fit: needs X GiB of Y". `--runtime` (implied by --run)
estimates the job as runtime/train.py trains it, for comparison with the run's
torch.cuda.max_memory_allocated."""

from __future__ import annotations

import argparse
from pathlib import Path

from moesim.config import load_config, parse_override
from moesim.errors import InputError
from moesim.sim.memory import GIB, estimate_config


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("memory", help="peak memory per GPU of a configuration, and whether "
                       "it fits", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="experiment config (TOML)")
    src.add_argument("--run", type=Path, help="runtime run directory (its config.toml, "
                     "which records the job's ranks)")
    p.add_argument("--runtime", action="store_true", help="as runtime/train.py trains it "
                   "(model dtype everywhere, torch AdamW and cross-entropy)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable)")
    p.set_defaults(func=cmd_memory)


def cmd_memory(args: argparse.Namespace) -> int:
    overrides = dict(map(parse_override, args.set))
    if args.run is not None:
        path = args.run / "config.toml"
        if not path.is_file():
            raise InputError(args.run, "config.toml", "not a run directory (no config.toml)")
        cfg = load_config(path, overrides)
    else:
        cfg = load_config(args.config, overrides)
    est = estimate_config(cfg, runtime=args.runtime or args.run is not None)
    stage = f" (pipeline stage {est.stage} of {len(est.stages)})" if len(est.stages) > 1 else ""
    print(f"peak memory per GPU{stage}, {cfg.source}:")
    for term, b in est.terms.items():
        print(f"  {term:<14} {b / GIB:9.3f} GiB")
    print(f"  {'total':<14} {est.peak_gib:9.3f} GiB (+ {est.reserve_gib:.1f} GiB reserve for "
          "the CUDA context, NCCL and fragmentation)")
    print(est.verdict())
    return 0
