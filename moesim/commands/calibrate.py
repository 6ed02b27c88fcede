"""`moesim calibrate`: measure this machine's compute rates into a calibration CSV
(`runtime.calibrate`, on a GPU), or fit the network model's terms to nccl-tests output
(`--nccl-tests FILE ...`, no GPU needed).

    moesim calibrate --device cuda --out configs/calibration/h200.csv
    moesim calibrate --nccl-tests all_reduce.txt alltoall.txt --cluster configs/x.toml \\
        --out configs/network/mycluster.toml [--terms hopper]

With --nccl-tests every file is one nccl-tests run (`all_reduce_perf` & co., any number of
ranks and nodes: read from its "#  Rank" lines); the cluster gives the topology (NVLink and NIC
rates, fabric), its nodes and GPUs per node taken from each file. The fit (moesim.sim.nccl_fit)
starts from --terms (default the cluster's network_terms) and frees what the files can show:
the link classes their traffic crosses (nvlink inside a node, nic between nodes, nvls for
all-reduce on an NVSwitch), NCCL's latency scale, and the launch cost. The output TOML is read by
`cluster.network_terms = "PATH"`; the fitted launch cost is printed, for
`cluster.collective_latency_us`.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
from pathlib import Path

from moesim.atomic import atomic_path
from moesim.errors import InputError
from moesim.sim.nccl import load_terms
from moesim.sim.nccl_fit import Point, PointSimulator, fit
from moesim.sim.nccl_tests import read


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("calibrate", help="measure compute rates into a calibration CSV, or "
                       "fit network terms to nccl-tests output",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True,
                   help="CSV (compute) or TOML (--nccl-tests) to write")
    net = p.add_argument_group("network (--nccl-tests)")
    net.add_argument("--nccl-tests", nargs="+", type=Path, metavar="FILE",
                     help="nccl-tests output files to fit the network terms to")
    net.add_argument("--cluster", help="a config .toml or a preset: the topology the runs "
                     "used (nodes and GPUs per node come from each file)")
    net.add_argument("--terms", help="terms to start from (default: the cluster's)")
    net.add_argument("--collective", default="", help="the collective, when a file does not "
                     "name it")
    gpu = p.add_argument_group("compute (GPU measurement, runtime.calibrate)")
    gpu.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    gpu.add_argument("--repeat", type=int, default=10)
    gpu.add_argument("--d-model", type=int, default=4096,
                     help="expert input width of the grouped GEMM curve (GPU)")
    gpu.add_argument("--d-ffn", type=int, default=1408,
                     help="expert hidden width of the grouped GEMM curve (GPU)")
    gpu.add_argument("--experts", type=int, default=64, help="groups of the grouped GEMM curve")
    gpu.add_argument("--expert-shapes", default="", metavar="DxF[,DxF...]",
                     help="extra expert shapes with their own grouped GEMM curve, e.g. 512x704")
    p.set_defaults(func=cmd_calibrate)


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.nccl_tests:
        return cmd_network(args)
    from runtime.calibrate import cmd_calibrate as measure
    return measure(args)


def cmd_network(args: argparse.Namespace) -> int:
    from moesim.commands.bench_net import cluster_from_args

    if not args.cluster:
        raise InputError("--cluster", "cluster", "needed with --nccl-tests: the topology the "
                         "runs used (a config .toml or a preset)")
    ns = argparse.Namespace(cluster=args.cluster, model="nccl", terms=args.terms)
    base_cluster = cluster_from_args(ns)
    terms = load_terms(base_cluster.network_terms)
    points, classes = [], set()
    for f in args.nccl_tests:
        t = read(f, args.collective)
        gpn = t.ranks // t.nodes
        if gpn * t.nodes != t.ranks:
            raise InputError(str(f), "ranks", f"{t.ranks} ranks do not split evenly over "
                             f"{t.nodes} hosts")
        cluster = dataclasses.replace(base_cluster, nodes=t.nodes, gpus_per_node=gpn)
        classes.add("nvlink" if t.nodes == 1 else "nic")
        if t.nodes > 1 and gpn > 1:
            classes.add("nvlink")
        if t.collective == "all_reduce" and gpn > 1 and cluster.nvls:
            classes.add("nvls")
        for s, us in zip(t.sizes, t.times_us, strict=True):
            points.append(Point(f.name, cluster, t.collective, float(s), us * 1e-6))
    free = [f"{c}.{a}" for c in sorted(classes) for a in ("efficiency", "half_bytes",
                                                          "exponent")]
    free += ["latency_scale", "launch.default"]
    if len(points) < len(free):
        raise InputError(str(args.nccl_tests[0]), "sizes", f"{len(points)} sizes cannot fit "
                         f"{len(free)} terms: run nccl-tests over more sizes (-b 64K -e 1G)")
    sim = PointSimulator()
    res = fit(points, terms, free, {"default": base_cluster.collective_latency_us}, sim=sim)
    launch = res.launch_us["default"]
    print("| file | collective | ranks | size | measured us | fitted us | error | algorithm |")
    print("|---|---|---|---|---|---|---|---|")
    errs = []
    for p in points:
        r = sim.run(p, res.terms, launch * 1e-6)
        errs.append(abs(r.duration / p.measured_s - 1))
        print(f"| {p.source} | {p.collective} | {p.ranks} | {int(p.size)} | "
              f"{p.measured_s * 1e6:.2f} | {r.duration * 1e6:.2f} | "
              f"{r.duration / p.measured_s - 1:+.1%} | {r.algorithm}/{r.protocol} |")
    name = args.out.stem
    out_terms = dataclasses.replace(res.terms, name=name,
                                    source=", ".join(str(f) for f in args.nccl_tests))
    header = [f"moesim network terms fitted by `moesim calibrate --nccl-tests` "
              f"({datetime.date.today().isoformat()})",
              f"files: {', '.join(str(f) for f in args.nccl_tests)}; cluster {args.cluster}",
              f"free terms: {', '.join(free)}; median |fit/measured - 1| "
              f"{statistics.median(errs):.1%} over {len(points)} points",
              f"launch cost fitted with them: {launch:.2f} us "
              "(set cluster.collective_latency_us to it)"]
    with atomic_path(args.out) as tmp:
        tmp.write_text(out_terms.to_toml(header))
    print(f"\nmedian |fit/measured - 1| {statistics.median(errs):.1%}; launch {launch:.2f} us; "
          f"wrote {args.out} (cluster.network_terms = \"{args.out}\")")
    return 0
