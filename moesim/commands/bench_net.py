"""`moesim bench-net`: simulated collective times and bus bandwidth in nccl-tests' table
format, so that a user's own nccl-tests output can be put beside them (and fed to `moesim
calibrate --nccl-tests`).

    moesim bench-net --cluster configs/dgx-h200-4node.toml --collective all_reduce \\
        --sizes 64K:1G [--nodes 2] [--algo ring] [--model nccl] [--terms hopper]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from moesim.atomic import atomic_path
from moesim.config import ClusterConfig, load_config
from moesim.errors import InputError
from moesim.sim.nccl import ALGORITHMS, load_terms
from moesim.sim.nccl_fit import Point, PointSimulator
from moesim.sim.nccl_tests import BINARIES, format_table, parse_sizes
from moesim.sim.topology import PRESETS

COLLECTIVES = {**{v: v for v in BINARIES.values()}, **BINARIES, "alltoall": "all_to_all"}


def cluster_from_args(args: argparse.Namespace) -> ClusterConfig:
    """--cluster (a config TOML, or a preset name) with --nodes / --gpus-per-node / --model /
    --terms / --launch-us on top."""
    c = args.cluster
    if c.endswith(".toml"):
        cluster = load_config(Path(c)).cluster
    elif c in PRESETS:
        cluster = ClusterConfig(preset=c)
    else:
        raise InputError("--cluster", c, f"want a config .toml or a preset ({', '.join(PRESETS)})")
    over = {}
    for name in ("nodes", "gpus_per_node"):
        v = getattr(args, name, None)
        if v is not None:
            if v < 1:
                raise InputError(f"--{name.replace('_', '-')}", str(v), "must be >= 1")
            over[name] = v
    if getattr(args, "model", None):
        over["network_model"] = args.model
    if getattr(args, "terms", None):
        over["network_terms"] = args.terms
    if getattr(args, "launch_us", None) is not None:
        if args.launch_us < 0:
            raise InputError("--launch-us", str(args.launch_us), "must be >= 0")
        over["collective_latency_us"] = args.launch_us
    return dataclasses.replace(cluster, **over)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench-net", help="simulated collectives in nccl-tests' table format",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--cluster", required=True, help="a config .toml (its [cluster]) or a preset")
    p.add_argument("--collective", required=True,
                   help=f"one of {', '.join(BINARIES.values())} (or the nccl-tests binary name)")
    p.add_argument("--sizes", default="64K:1G",
                   help="MIN:MAX[:FACTOR] as nccl-tests -b/-e/-f, or a list (default 64K:1G)")
    p.add_argument("--nodes", type=int, help="override cluster.nodes")
    p.add_argument("--gpus-per-node", type=int, help="override cluster.gpus_per_node")
    p.add_argument("--model", choices=("nccl", "ideal"), default="nccl",
                   help="network model (default nccl)")
    p.add_argument("--terms", help="network terms (configs/network/NAME.toml or a path)")
    p.add_argument("--launch-us", type=float, help="override cluster.collective_latency_us")
    p.add_argument("--algo", help=f"NCCL_ALGO: comma list of {', '.join(ALGORITHMS)}")
    p.add_argument("--dtype", default="float", help="element type shown (default float)")
    p.add_argument("--out", type=Path, help="also write the table to this file")
    p.set_defaults(func=cmd_bench_net)


def cmd_bench_net(args: argparse.Namespace) -> int:
    coll = COLLECTIVES.get(args.collective)
    if coll is None:
        raise InputError("--collective", args.collective,
                         f"want one of {', '.join(BINARIES.values())}")
    cluster = cluster_from_args(args)
    sizes = parse_sizes(args.sizes)
    algos = None
    if args.algo:
        algos = tuple(a.strip().lower() for a in args.algo.split(",") if a.strip())
        bad = [a for a in algos if a not in ALGORITHMS]
        if bad:
            raise InputError("--algo", bad[0], f"want {', '.join(ALGORITHMS)}")
    terms = load_terms(cluster.network_terms) if cluster.network_model == "nccl" else None
    n = cluster.num_gpus
    if n < 2:
        raise InputError("--cluster", "nodes", "a collective needs at least 2 GPUs")
    sim = PointSimulator(tolerance=cluster.completion_tolerance)
    times, notes = [], []
    for s in sizes:
        p = Point("bench-net", cluster, coll, float(s), 1.0, algorithms=algos)
        r = sim.run(p, terms, cluster.collective_latency_us * 1e-6)
        times.append(r.duration * 1e6)
        if r.algorithm:
            notes.append(f"{s:>12d} bytes: {r.algorithm}/{r.protocol}")
    header = [f"moesim bench-net: {coll} on {cluster.preset} {cluster.nodes} x "
              f"{cluster.gpus_per_node} ({n} ranks), network model {cluster.network_model}"
              + (f" (terms {terms.name})" if terms else "")
              + f", launch {cluster.collective_latency_us:g} us (simulated, not measured)"]
    text = format_table(coll, n, sizes, times, header, args.dtype,
                        ["algorithm/protocol per size:", *notes] if notes else None)
    print(text, end="")
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(text)
    return 0
