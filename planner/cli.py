"""`moesim plan --trace T --config C --out P`: a placement per (step, layer), written as a plan
file, with one line per (step, layer) on the load before and after, the LP bound and the gap."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from moesim.config import load_config, parse_override, with_overrides
from moesim.errors import InputError
from planner.placement import Placement, ep_hot_replicas, ep_placement, hp_placement
from planner.plan import Plan, write_plan
from planner.relayout import check_feasible, fsep_placement
from traces.io import read_trace


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="plan expert placement (FSEP re-layout ILP, EP, HP)",
                       description="Plan a placement for every (step, layer) of a trace and "
                       "write it as a plan file (JSON). FSEP uses [planner].solver.")
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--steps", type=int, help="plan only the first STEPS steps")
    p.add_argument("--quiet", action="store_true", help="no per-step lines")
    p.set_defaults(func=cmd_plan)


def _fmt(v: float) -> str:
    return "-" if not np.isfinite(v) else f"{v:.4f}"


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    if args.set:
        cfg = with_overrides(cfg, dict(parse_override(s) for s in args.set))
    model, pc, n = cfg.model, cfg.planner, cfg.num_ranks
    trace = read_trace(args.trace)
    if (trace.num_heads, trace.num_experts) != (model.num_heads, model.num_experts):
        raise InputError(args.trace, "experts", f"trace has {trace.num_heads} heads x "
                         f"{trace.num_experts} experts, config {args.config} has "
                         f"{model.num_heads} x {model.num_experts}")
    trace = trace.aggregate(n)
    steps = trace.num_steps if args.steps is None else min(args.steps, trace.num_steps)
    if steps < 1:
        raise InputError("--steps", "steps", "must be >= 1")
    strategy = cfg.parallel.strategy
    placements: dict[tuple[int, int], Placement] = {}
    stats: dict[tuple[int, int], dict] = {}
    if not args.quiet:
        print("step layer  tok_max/mean_before  tok_max/mean_after  time_max/mean  "
              "max_time_ms  lp_bound_ms  gap  solve_s  status")
    if strategy == "fsep":
        check_feasible(model.total_experts, n, pc.slots_per_rank)
    previous: dict[int, Placement] = {}
    for s in range(steps):
        for ly in range(trace.num_layers):
            counts = trace.counts[s, ly]
            load = counts.sum(axis=0).ravel()
            if strategy == "fsep":
                p, st = fsep_placement(model, pc, counts, n, previous=previous.get(ly),
                                       cluster=cfg.cluster)
                row = st.to_dict()
            else:
                if strategy == "hp":
                    p = hp_placement(model, n)
                elif pc.ep_hot_replicas:
                    p = ep_hot_replicas(load, n, pc.ep_hot_replicas)
                else:
                    p = ep_placement(model.total_experts, n)
                tok = p.share_matrix().T @ load
                before = ep_placement(model.total_experts, n).share_matrix().T @ load
                row = {"solver": strategy, "status": "fixed",
                       "tokens_max_mean": float(tok.max() / max(tok.mean(), 1e-12)),
                       "before_tokens_max_mean": float(before.max() /
                                                       max(before.mean(), 1e-12)),
                       "max_time": float("nan"), "mean_time": float("nan"),
                       "bound": float("nan"), "gap": float("nan"), "solve_s": 0.0}
            placements[s, ly] = p
            stats[s, ly] = row
            previous[ly] = p
            if not args.quiet:
                tmm = row["max_time"] / row["mean_time"] if row["mean_time"] == \
                    row["mean_time"] and row["mean_time"] else float("nan")
                print(f"{s:4d} {ly:5d}  {row['before_tokens_max_mean']:19.4f}  "
                      f"{row['tokens_max_mean']:18.4f}  {_fmt(tmm):>13}  "
                      f"{_fmt(row['max_time'] * 1e3):>11}  {_fmt(row['bound'] * 1e3):>11}  "
                      f"{_fmt(row['gap'])}  {row['solve_s']:.3f}  {row['status']}",
                      flush=True)
    meta = {"trace": str(args.trace), "config": str(args.config), "planner": {
        k: getattr(pc, k) for k in pc.__dataclass_fields__}, "model": model.name}
    plan = Plan(strategy, n, model.total_experts, pc.slots_per_rank, placements, stats, meta)
    write_plan(plan, args.out)
    print(f"wrote {args.out}: {len(placements)} placements", file=sys.stderr)
    return 0
