"""`moesim simulate` (one cluster, EP / HP / FSEP side by side) and `moesim sweep` (a grid of
strategies x cluster sizes x traces, in parallel processes, resumable).

HP runs a Multi-Head LatentMoE model, which needs its own trace (with heads). `--hp-config`
and `--hp-trace` give HP its [model], [parallel] and [planner] sections and its routing; the
cluster, run settings and everything else come from `--config`; `--set` overrides apply to
both. Without them HP uses
`--config` and `--trace`, which then must describe a Multi-Head LatentMoE model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import (
    STRATEGIES,
    Config,
    config_from_dict,
    config_to_dict,
    load_config,
    parse_override,
    with_overrides,
)
from moesim.errors import InputError
from moesim.results import write_results
from traces.io import read_trace

TABLE_ROWS = [
    ("step_ms", "step time (ms)"),
    ("compute_ms", "compute busy, slowest rank (ms)"),
    ("exposed_comm_ms", "step - compute (ms)"),
    ("comm_ms", "comm stream busy (ms/rank)"),
    ("dispatch_ms", "  dispatch (ms/rank)"),
    ("combine_ms", "  combine (ms/rank)"),
    ("weight_gather_ms", "  weight_gather (ms/rank)"),
    ("grad_scatter_ms", "  grad_scatter (ms/rank)"),
    ("grad_sync_ms", "  grad_sync (ms/rank)"),
    ("expert_ms", "expert GEMMs (ms/rank)"),
    ("sent_GB_per_gpu", "sent per GPU (GB)"),
    ("nvlink_GB", "NVLink bytes, all links (GB)"),
    ("nic_GB", "NIC bytes, all links (GB)"),
    ("fabric_GB", "fabric bytes, all links (GB)"),
    ("achieved_GBps_per_gpu", "achieved comm GB/s per GPU"),
    ("imbalance", "expert load max/mean - 1"),
    ("flows", "flows simulated"),
    ("events", "network events"),
    ("wall_s", "simulator wall time (s)"),
]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("simulate", help="simulate EP, HP and FSEP steps on a cluster",
                       description="Simulate the MoE layers of training steps (forward and "
                       "backward) for each strategy and print them side by side.")
    _common(p)
    p.add_argument("--strategy", default=None,
                   help="comma-separated strategies (default: the config's parallel.strategy)")
    p.add_argument("--steps", type=int, help="steps to simulate (default: run.steps)")
    p.add_argument("--out", type=Path, help="Result table (.parquet or .csv)")
    p.add_argument("--summary", type=Path, help="summary table, one row per strategy (.csv)")
    p.add_argument("--timeline", type=Path, help="Chrome/Perfetto trace JSON")
    p.add_argument("--timeline-ranks", type=int, default=16,
                   help="ranks written to the timeline (default 16)")
    p.add_argument("--plot", type=Path, help="step-time breakdown figure (.png)")
    p.set_defaults(func=cmd_simulate)

    s = sub.add_parser("sweep", help="simulate a grid of strategies x cluster sizes x traces",
                       description="Run every (strategy, nodes, trace) point in parallel "
                       "processes; finished points are kept under OUT.parts/ and not re-run. "
                       "A top-k sweep is a list of traces generated with different --top-k "
                       "(each point takes model.top_k from its trace).")
    _common(s, sweep=True)
    s.add_argument("--strategies", default="ep,hp,fsep")
    s.add_argument("--nodes", default=None, help="comma-separated node counts "
                   "(default: cluster.nodes)")
    s.add_argument("--traces", default=None,
                   help="comma-separated traces for EP/FSEP (default: --trace)")
    s.add_argument("--hp-traces", default=None,
                   help="comma-separated traces for HP, paired with --traces by position "
                   "(default: --hp-trace)")
    s.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    s.add_argument("--out", type=Path, required=True, help="one results table (.csv/.parquet)")
    s.set_defaults(func=cmd_sweep)


def _common(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--trace", type=Path, required=not sweep)
    p.add_argument("--hp-config", type=Path, help="HP's model/parallel/planner sections")
    p.add_argument("--hp-trace", type=Path, help="HP's (multi-head) trace")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable)")


def _strategies(text: str, flag: str) -> list[str]:
    out = [s.strip() for s in text.split(",") if s.strip()]
    for s in out:
        if s not in STRATEGIES:
            raise InputError(flag, s, f"unknown strategy; choose from {', '.join(STRATEGIES)}")
    if not out:
        raise InputError(flag, "value", "no strategy given")
    return out


def _configs(args: argparse.Namespace) -> tuple[Config, Config | None]:
    overrides = dict(parse_override(t) for t in args.set)
    cfg = load_config(args.config, overrides)
    hp = None
    if args.hp_config:
        h = load_config(args.hp_config)
        raw = config_to_dict(cfg)
        for section in ("model", "parallel", "planner"):
            raw[section] = config_to_dict(h)[section]
        hp = config_from_dict(raw, f"{args.config} + {args.hp_config}")
        # --set applies to HP's sections too (model.num_layers=2 shortens both models).
        hp = with_overrides(hp, overrides) if overrides else hp
    return cfg, hp


def _strategy_inputs(strategy: str, cfg: Config, hp: Config | None, trace: Path,
                     hp_trace: Path | None) -> tuple[Config, Path]:
    if strategy in ("hp", "hpxep"):
        return (hp or cfg), (hp_trace or trace)
    return cfg, trace


def cmd_simulate(args: argparse.Namespace) -> int:
    from moesim.sim.simulate import Simulator, chrome_trace, run_strategies, summarize

    cfg, hp = _configs(args)
    strategies = _strategies(args.strategy or cfg.parallel.strategy, "--strategy")
    if args.timeline_ranks < 1:
        raise InputError("--timeline-ranks", "value", "must be >= 1")
    for path, flag in ((args.out, "--out"), (args.plot, "--plot"), (args.timeline, "--timeline"),
                       (args.summary, "--summary")):
        want = {"--out": (".parquet", ".csv"), "--plot": (".png",), "--timeline": (".json",),
                "--summary": (".csv",)}[flag]
        if path is not None and path.suffix not in want:
            raise InputError(path, flag, f"use a {' or '.join(want)} name")
    steps = args.steps if args.steps is not None else cfg.run.steps
    if steps < 1:
        raise InputError("--steps", "value", "must be >= 1")
    sims, cfg_of = {}, {}
    traces_cache: dict[Path, object] = {}
    topo = None
    iteration = cfg.train.scope == "iteration"
    if iteration:
        from moesim.sim.iteration import IterationSimulator as Simulator
    for s in strategies:
        c, t = _strategy_inputs(s, cfg, hp, args.trace, args.hp_trace)
        if t not in traces_cache:
            traces_cache[t] = read_trace(t)
        sims[s] = Simulator(c, traces_cache[t], str(t), topo=topo)
        topo = sims[s].topo
        cfg_of[s] = c
    if iteration:
        return _simulate_iterations(args, cfg, sims, cfg_of, strategies, steps)
    t0 = time.perf_counter()
    outcomes = run_strategies(sims, list(range(steps)), progress=sys.stderr.isatty())
    wall = time.perf_counter() - t0
    summary = summarize(outcomes, {s: sims[s].n for s in sims})
    walls = pd.Series({s: sum(o.wall_s for o in outcomes if o.strategy == s) for s in sims})
    summary["wall_s"] = summary["strategy"].map(walls)
    _print_table(summary, cfg, steps, wall)
    frame = pd.concat([o.frame for o in outcomes], ignore_index=True)
    meta = {"source": "sim", "config": config_to_dict(cfg), "trace": str(args.trace),
            "strategies": strategies,
            "configs": {s: config_to_dict(c) for s, c in cfg_of.items()},
            "traces": {s: sims[s].trace_source for s in sims}}
    if args.out:
        write_results(frame, args.out, meta)
        print(f"wrote {args.out} ({len(frame)} rows)")
    if args.summary:
        with atomic_path(args.summary) as tmp:
            summary.to_csv(tmp, index=False, float_format="%.6g")
        print(f"wrote {args.summary}")
    if args.timeline:
        text = json.dumps(chrome_trace(outcomes, args.timeline_ranks), separators=(",", ":"))
        write_text_atomic(args.timeline, text)
        print(f"wrote {args.timeline} (open in ui.perfetto.dev or chrome://tracing)")
    if args.plot:
        _plot(frame, meta, args.plot, cfg)
        print(f"wrote {args.plot}")
    return 0


ITERATION_ROWS = [
    ("layout", "layout"),
    ("iteration_ms", "iteration time (ms)"),
    ("tokens_per_s", "tokens / s"),
    ("tflops_per_gpu", "model TFLOP/s per GPU"),
    ("mfu", "MFU (Megatron: model FLOPs / peak)"),
    ("compute_ms", "compute busy, slowest rank (ms)"),
    ("exposed_comm_ms", "exposed communication (ms/rank)"),
    ("exposed_*", "  exposed {} (ms/rank)"),
    ("idle_ms", "idle: bubble and waits (ms/rank)"),
    ("peak_memory_gib", "peak memory per GPU (GiB)"),
    ("memory", "memory"),
    ("imbalance", "expert load max/mean - 1"),
    ("wall_s", "simulator wall time (s)"),
]


def _simulate_iterations(args: argparse.Namespace, cfg: Config, sims: dict, cfg_of: dict,
                         strategies: list[str], steps: int) -> int:
    """`moesim simulate` with train.scope = "iteration": whole training iterations."""
    from tqdm import tqdm

    from moesim.sim.iteration import summarize_iterations
    from moesim.sim.simulate import chrome_trace
    t0 = time.perf_counter()
    outcomes = []
    jobs = [(s, st) for s in sims for st in range(steps)]
    walls: dict[str, float] = {}
    for s, st in tqdm(jobs, desc="simulate", unit="iter", disable=not sys.stderr.isatty(),
                      leave=False):
        t1 = time.perf_counter()
        o = sims[s].simulate_iteration(s, st)
        o.wall_s = time.perf_counter() - t1
        walls[s] = walls.get(s, 0.0) + o.wall_s
        outcomes.append(o)
    wall = time.perf_counter() - t0
    summary = summarize_iterations(outcomes)
    summary["wall_s"] = summary["strategy"].map(walls)
    c, m, tr = cfg.cluster, cfg.model, cfg.train
    print(f"{c.preset if not c.topology_file else c.topology_file}: {c.nodes} x "
          f"{c.gpus_per_node} GPUs, fabric {c.fabric}; {m.name}: {m.num_layers} layers "
          f"({m.num_moe_layers} MoE); {steps} iteration(s) of {tr.micro_batches} micro-batch(es) "
          f"x {tr.micro_batch_size} x {m.seq_len} tokens per data-parallel rank, "
          f"recompute {tr.recompute}, ZeRO {cfg.parallel.zero}")
    cols = list(summary["strategy"])
    width = 40
    cw = max([26] + [len(str(v)) + 2 for k in ("layout", "memory") if k in summary.columns
                     for v in summary[k]])
    print(" " * width + "".join(f"{s.upper():>{cw}}" for s in cols))
    kinds = sorted({k for k in summary.columns if k.startswith("exposed_")
                    and k != "exposed_comm_ms"})
    for key, label in ITERATION_ROWS:
        keys = [(k, label.format(k[len("exposed_"):-len("_ms")])) for k in kinds] \
            if key == "exposed_*" else [(key, label)]
        for k, lab in keys:
            if k not in summary.columns:
                continue
            cells = []
            for v in summary[k].to_numpy():
                if isinstance(v, str):
                    cells.append(f"{v:>{cw}}")
                elif v is None or (isinstance(v, float) and np.isnan(v)):
                    cells.append(f"{'-':>{cw}}")
                elif k == "mfu":
                    cells.append(f"{100 * v:>{cw - 1}.1f}%")
                else:
                    cells.append(f"{v:>{cw}.4g}")
            print(f"{lab:<{width}}{''.join(cells)}")
    print(f"(simulated in {wall:.2f} s)")
    timed = [o for o in outcomes if len(o.frame)]
    meta = {"source": "sim", "scope": "iteration", "config": config_to_dict(cfg),
            "trace": str(args.trace), "strategies": strategies,
            "configs": {s: config_to_dict(c) for s, c in cfg_of.items()},
            "traces": {s: sims[s].trace_source for s in sims}}
    if args.out and timed:
        frame = pd.concat([o.frame for o in timed], ignore_index=True)
        write_results(frame, args.out, meta)
        print(f"wrote {args.out} ({len(frame)} rows)")
    if args.summary:
        with atomic_path(args.summary) as tmp:
            summary.to_csv(tmp, index=False, float_format="%.6g")
        print(f"wrote {args.summary}")
    if args.timeline and timed:
        text = json.dumps(chrome_trace(timed, args.timeline_ranks), separators=(",", ":"))
        write_text_atomic(args.timeline, text)
        print(f"wrote {args.timeline} (open in ui.perfetto.dev or chrome://tracing)")
    if args.plot and timed:
        frame = pd.concat([o.frame for o in timed], ignore_index=True)
        _plot(frame, meta, args.plot, cfg)
        print(f"wrote {args.plot}")
    return 0


def _print_table(summary: pd.DataFrame, cfg: Config, steps: int, wall: float) -> None:
    c = cfg.cluster
    print(f"{c.preset if not c.topology_file else c.topology_file}: {c.nodes} x "
          f"{c.gpus_per_node} GPUs, fabric {c.fabric}, {steps} step(s), MoE part of each "
          f"step (forward + backward, {cfg.model.num_layers} layers)")
    cols = list(summary["strategy"])
    width = max(len(label) for _, label in TABLE_ROWS) + 2
    print(" " * width + "".join(f"{s.upper():>12}" for s in cols))
    for key, label in TABLE_ROWS:
        if key not in summary.columns:
            continue
        vals = summary[key].to_numpy()
        cells = "".join(f"{v:>12.0f}" if key in ("flows", "events") else f"{v:>12.4g}"
                        for v in vals)
        print(f"{label:<{width}}{cells}")
    print(f"(simulated in {wall:.2f} s)")


def _plot(frame: pd.DataFrame, meta: dict, path: Path, cfg: Config) -> None:
    """The step-time breakdown, stacked by phase per strategy: the analysis package's figure
    (`moesim plot breakdown` draws the same from a Result file)."""
    from analysis.breakdown import plot_breakdown
    from analysis.figure_files import save_figure
    from analysis.inputs import ResultFile

    c = cfg.cluster
    what = "Training iteration" if cfg.train.scope == "iteration" else "MoE step"
    title = f"{what} on {c.nodes}x{c.gpus_per_node} {c.gpu.upper()} (simulated)"
    fig = plot_breakdown([ResultFile(Path("sim"), frame, meta)], title=title)
    save_figure(fig, path.parent, path.stem, formats=("png",))


# --- sweep ---------------------------------------------------------------------------------
def _file_digest(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _sweep_point(point: dict) -> dict:
    """Run one sweep point in a worker process; returns its summary row."""
    from moesim.sim.simulate import Simulator, run_strategies, summarize

    cfg = config_from_dict(point["config"], point["config_source"])
    trace = read_trace(point["trace"])
    t0 = time.perf_counter()
    if cfg.train.scope == "iteration":
        from moesim.sim.iteration import IterationSimulator, summarize_iterations
        sim = IterationSimulator(cfg, trace, point["trace"])
        outs = [sim.simulate_iteration(point["strategy"], st) for st in range(cfg.run.steps)]
        row = summarize_iterations(outs).iloc[0].to_dict()
    else:
        sim = Simulator(cfg, trace, point["trace"])
        outs = run_strategies({point["strategy"]: sim}, list(range(cfg.run.steps)))
        row = summarize(outs, {point["strategy"]: sim.n}).iloc[0].to_dict()
    row.update(nodes=cfg.cluster.nodes, degree=sim.g, trace=point["trace"],
               top_k=cfg.model.top_k, num_heads=cfg.model.num_heads,
               wall_s=time.perf_counter() - t0, point=point["key"])
    return row


def cmd_sweep(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    cfg, hp = _configs(args)
    strategies = _strategies(args.strategies, "--strategies")
    if args.out.suffix not in (".csv", ".parquet"):
        raise InputError(args.out, "--out", "use a .csv or .parquet name")
    if args.jobs < 1:
        raise InputError("--jobs", "value", "must be >= 1")
    try:
        nodes = [int(x) for x in (args.nodes or str(cfg.cluster.nodes)).split(",")]
    except ValueError:
        raise InputError("--nodes", "value", f"{args.nodes!r} is not a list of integers") \
            from None
    if any(n < 1 for n in nodes):
        raise InputError("--nodes", "value", "node counts must be >= 1")
    traces = [Path(t) for t in (args.traces.split(",") if args.traces else [args.trace])]
    if any(t is None for t in traces):
        raise InputError("--trace", "value", "give --trace or --traces")
    hp_traces = ([Path(t) for t in args.hp_traces.split(",")] if args.hp_traces
                 else [args.hp_trace] * len(traces))
    if len(hp_traces) != len(traces):
        raise InputError("--hp-traces", "value", f"{len(hp_traces)} HP traces for "
                         f"{len(traces)} traces: pair them by position")
    points = []
    for ti, (tr, htr) in enumerate(zip(traces, hp_traces, strict=True)):
        for s in strategies:
            c, t = _strategy_inputs(s, cfg, hp, tr, htr)
            if not t.exists():
                raise InputError(t, "file", "no such file")
            meta = read_trace(t, validate=False).meta
            for n in nodes:
                raw = config_to_dict(c)
                raw["cluster"]["nodes"] = n
                gpus = n * raw["cluster"]["gpus_per_node"]
                # A group larger than the cluster shrinks to it (a whole iteration's 0 means
                # the whole pipeline stage, which planner.parallel resolves).
                if raw["parallel"]["degree"] or raw["train"]["scope"] != "iteration":
                    raw["parallel"]["degree"] = min(raw["parallel"]["degree"] or gpus, gpus)
                raw["model"]["top_k"] = meta.top_k
                raw["parallel"]["strategy"] = s
                checked = config_from_dict(raw, c.source)  # validate before spawning
                key = hashlib.sha1(json.dumps(
                    {"c": config_to_dict(checked), "t": _file_digest(t), "s": s},
                    sort_keys=True).encode()).hexdigest()[:16]
                points.append({"strategy": s, "config": raw, "config_source": c.source,
                               "trace": str(t), "key": key, "trace_index": ti})
    parts = args.out.with_name(args.out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    todo = [p for p in points if not (parts / f"{p['key']}.json").exists()]
    print(f"sweep: {len(points)} points, {len(points) - len(todo)} already done, "
          f"{len(todo)} to run on {args.jobs} processes")
    bar = tqdm(total=len(points), initial=len(points) - len(todo), unit="pt",
               desc="sweep", disable=not sys.stderr.isatty())
    if todo:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            futs = {pool.submit(_sweep_point, p): p for p in todo}
            for fut in as_completed(futs):
                p = futs[fut]
                try:
                    row = fut.result()
                except InputError as e:
                    raise InputError(e.source, e.field, f"{e.message} (sweep point "
                                     f"{p['strategy']}, {p['config']['cluster']['nodes']} "
                                     f"nodes, {p['trace']})") from None
                write_text_atomic(parts / f"{p['key']}.json", json.dumps(row, default=float))
                bar.update(1)
    bar.close()
    rows = [json.loads((parts / f"{p['key']}.json").read_text()) for p in points]
    df = pd.DataFrame(rows)
    with atomic_path(args.out) as tmp:
        if args.out.suffix == ".csv":
            df.to_csv(tmp, index=False, float_format="%.6g")
        else:
            df.to_parquet(tmp, index=False)
    print(f"wrote {args.out} ({len(df)} points)")
    return 0
