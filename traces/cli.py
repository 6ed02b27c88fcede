"""`moesim trace gen | stats | convert | import | fit`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from moesim.atomic import atomic_path
from moesim.config import load_config
from moesim.errors import InputError
from traces.generators import GENERATORS, TraceSpec, generate
from traces.importers import (
    FORMATS,
    expand_histogram,
    import_hf,
    import_megatron,
    import_smartmoe,
)
from traces.io import read_long_csv, read_trace, write_long_csv, write_trace
from traces.schema import TraceMeta
from traces.stats import format_table, imbalance_table

KIND_PARAMS = {
    "uniform": [],
    "zipf": ["exponent"],
    "drifting": ["exponent", "period"],
    "bursty": ["burst_prob", "burst_experts", "burst_factor"],
    "wander": ["exponent"],
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("trace", help="generate, inspect and convert routing traces",
                       description="Routing traces: step, layer, shard, head, expert -> tokens.")
    tsub = p.add_subparsers(dest="trace_command", metavar="SUBCOMMAND", required=True)

    g = tsub.add_parser("gen", help="generate a synthetic trace",
                        description="Generate a seeded synthetic routing trace (Parquet).")
    g.add_argument("--kind", choices=sorted(GENERATORS), default="zipf")
    g.add_argument("--config", type=Path,
                   help="take layers, experts, heads, top-k and model name from this config")
    g.add_argument("--steps", type=int, help="default 100 (--fit: the fitted trace's)")
    g.add_argument("--layers", type=int)
    g.add_argument("--shards", type=int,
                   help="default 16 (--fit: the fitted trace's); source shards (data-parallel "
                   "batches); any N dividing it can use it")
    g.add_argument("--experts", type=int, help="experts per head")
    g.add_argument("--heads", type=int, help="Multi-Head LatentMoE heads (1: standard MoE)")
    g.add_argument("--top-k", type=int)
    g.add_argument("--tokens-per-shard", type=int, help="default 4096 (--fit: the fitted "
                   "trace's)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--exponent", type=float, default=1.2, help="zipf, drifting: skew")
    g.add_argument("--period", type=int, default=10, help="drifting: steps between moves")
    g.add_argument("--burst-prob", type=float, default=0.1, help="bursty: P(burst) per layer")
    g.add_argument("--burst-experts", type=int, default=2, help="bursty: experts per burst")
    g.add_argument("--burst-factor", type=float, default=8.0, help="bursty: weight boost")
    g.add_argument("--sampler", choices=("auto", "multinomial", "normal"), default="auto")
    g.add_argument("--fit", type=Path, help="wander: the per-layer parameters of a fit JSON "
                   "(`trace fit --out`); shape defaults to the fitted trace's")
    g.add_argument("--model", help="model label stored in the trace")
    g.add_argument("--out", type=Path, required=True)
    g.set_defaults(func=cmd_gen)

    s = tsub.add_parser("stats", help="per-layer load imbalance of a trace",
                        description="Per-layer imbalance: max/mean load, CV, top-expert share.")
    s.add_argument("trace", type=Path)
    s.add_argument("--csv", type=Path, help="also write the table as CSV")
    s.set_defaults(func=cmd_stats)

    c = tsub.add_parser("convert", help="convert, aggregate or resample a trace",
                        description="Convert between Parquet and long-form CSV (by extension); "
                        "optionally aggregate shards to N ranks and resample steps/layers.")
    c.add_argument("src", type=Path)
    c.add_argument("dst", type=Path)
    c.add_argument("--ranks", type=int, help="aggregate shards into this many ranks")
    c.add_argument("--steps", type=int, help="resample to this many steps")
    c.add_argument("--layers", type=int, help="resample to this many layers")
    c.add_argument("--top-k", type=int, help="for CSV input without a metadata line")
    c.add_argument("--tokens-per-shard", type=int, help="for CSV input without a metadata line")
    c.add_argument("--model", default="unknown", help="for CSV input without a metadata line")
    c.set_defaults(func=cmd_convert)

    i = tsub.add_parser("import", help="import routing recorded by another tool",
                        description="Turn recorded routing into a moesim trace (Parquet). "
                        "Formats (traces/importers.py): smartmoe (SmartMoE-AE training logs, "
                        ".tar.xz or folder), histogram (per-layer expert counts CSV such as "
                        "OLMoE's, sampled into N steps), megatron (Megatron-Core router trace "
                        "folder of router_trace_rank{R}.jsonl), hf (Hugging Face "
                        "output_router_logits dumps, .pt or .npz, one file per step).")
    i.add_argument("format", choices=FORMATS)
    i.add_argument("src", type=Path, help="the recorded file or folder")
    i.add_argument("out", type=Path, help="the trace to write (.parquet)")
    i.add_argument("--top-k", type=int, help="smartmoe (default 2), hf (required): experts "
                   "per token")
    i.add_argument("--experts", type=int, help="megatron (required): experts per layer")
    i.add_argument("--shards", type=int, help="hf: equal token groups (default 1); histogram: "
                   "shards to sample (default 16)")
    i.add_argument("--micro-batches-as-shards", action="store_true",
                   help="smartmoe: one shard per (rank, micro-batch) instead of per rank")
    i.add_argument("--model", help="histogram: which model of the file (default: the first); "
                   "other formats: the label stored in the trace")
    i.add_argument("--domain", help="histogram: which domain (default: the first)")
    i.add_argument("--steps", type=int, default=100, help="histogram: steps to sample")
    i.add_argument("--tokens-per-shard", type=int, default=4096, help="histogram: tokens each "
                   "shard routes per step")
    i.add_argument("--concentration", type=float, default=0.0, help="histogram: Dirichlet "
                   "concentration of per-step drift (0: the histogram's distribution every step)")
    i.add_argument("--seed", type=int, default=0, help="histogram: sampling seed")
    i.set_defaults(func=cmd_import)

    f = tsub.add_parser("fit", help="fit a generator to a recorded trace",
                        description="Estimate the 'wander' generator's parameters per layer "
                        "(skew, drift half-life and spread, jitter, bursts) from a trace, "
                        "and report how well a trace generated from them matches it "
                        "(traces/fit.py).")
    f.add_argument("trace", type=Path)
    f.add_argument("--out", type=Path, help="write the fit as JSON (for trace gen --fit)")
    f.add_argument("--goodness", type=Path, help="write the per-layer goodness of fit (CSV)")
    f.add_argument("--trace-out", type=Path, help="write the generated trace (.parquet)")
    f.add_argument("--seed", type=int, default=0)
    f.set_defaults(func=cmd_fit)


def _spec_from_args(args: argparse.Namespace) -> TraceSpec:
    fields = {"layers": args.layers, "experts": args.experts, "heads": args.heads,
              "top_k": args.top_k, "model": args.model}
    if args.config:
        m = load_config(args.config).model
        cfg = {"layers": m.num_layers, "experts": m.num_experts, "heads": m.num_heads,
               "top_k": m.top_k, "model": m.name}
        fields = {k: v if v is not None else cfg[k] for k, v in fields.items()}
    defaults = {"layers": 8, "experts": 64, "heads": 1, "top_k": 8, "model": "synthetic"}
    fields = {k: v if v is not None else defaults[k] for k, v in fields.items()}
    params = {name: getattr(args, name) for name in KIND_PARAMS[args.kind]}
    return TraceSpec(kind=args.kind, steps=args.steps or 100, shards=args.shards or 16,
                     tokens_per_shard=args.tokens_per_shard or 4096, seed=args.seed,
                     params=params,
                     sampler=args.sampler, **fields)


def cmd_gen(args: argparse.Namespace) -> int:
    if args.out.suffix != ".parquet":
        raise InputError(args.out, "--out", "trace gen writes Parquet: use a .parquet name")
    if args.fit:
        from traces.fit import Fit
        spec = Fit.read(args.fit).spec(steps=args.steps, shards=args.shards,
                                       tokens_per_shard=args.tokens_per_shard, seed=args.seed)
    else:
        spec = _spec_from_args(args)
    t0 = time.perf_counter()
    trace = generate(spec, progress=sys.stderr.isatty())
    t1 = time.perf_counter()
    write_trace(trace, args.out)
    t2 = time.perf_counter()
    print(f"wrote {args.out}: {spec.steps} steps x {spec.layers} layers x {spec.shards} shards x "
          f"{spec.heads} heads x {spec.experts} experts, top-{spec.top_k}, "
          f"{spec.tokens_per_shard} tokens/shard ({trace.meta.generator['sampler']} sampler; "
          f"generate {t1 - t0:.2f} s, write {t2 - t1:.2f} s)")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    trace = read_trace(args.trace)
    df = imbalance_table(trace)
    print(f"{args.trace}: {trace.num_steps} steps, {trace.num_layers} layers, "
          f"{trace.num_shards} shards, {trace.num_heads} heads, {trace.num_experts} experts, "
          f"top-{trace.meta.top_k}, source {trace.meta.source}")
    print(format_table(df))
    if args.csv:
        with atomic_path(args.csv) as tmp:
            df.to_csv(tmp, index=False)
        print(f"wrote {args.csv}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    for path, flag in ((args.src, "src"), (args.dst, "dst")):
        if path.suffix not in (".parquet", ".csv"):
            raise InputError(path, flag, "use a .parquet or .csv name")
    if args.src.suffix == ".csv" and (args.top_k or args.tokens_per_shard):
        if not (args.top_k and args.tokens_per_shard):
            raise InputError(args.src, "--top-k", "give both --top-k and --tokens-per-shard")
        meta = TraceMeta(model=args.model, source=f"csv:{args.src.name}",
                         tokens_per_shard=args.tokens_per_shard, top_k=args.top_k)
        trace = read_long_csv(args.src, meta)
    else:
        trace = read_trace(args.src)
    if args.ranks:
        trace = trace.aggregate(args.ranks)
    if args.steps or args.layers:
        trace = trace.resample(args.steps, args.layers)
    if args.dst.suffix == ".csv":
        write_long_csv(trace, args.dst)
    else:
        write_trace(trace, args.dst)
    print(f"wrote {args.dst}: {trace.num_steps} steps x {trace.num_layers} layers x "
          f"{trace.num_shards} shards x {trace.num_heads} heads x {trace.num_experts} experts")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    if args.out.suffix != ".parquet":
        raise InputError(args.out, "out", "trace import writes Parquet: use a .parquet name")
    if not args.src.exists():
        raise InputError(args.src, "src", "no such file or folder")
    t0 = time.perf_counter()
    label = {"model": args.model} if args.model else {}
    if args.format == "smartmoe":
        trace = import_smartmoe(args.src, top_k=args.top_k or 2,
                                micro_batches_as_shards=args.micro_batches_as_shards, **label)
    elif args.format == "histogram":
        trace = expand_histogram(args.src, steps=args.steps, shards=args.shards or 16,
                                 tokens_per_shard=args.tokens_per_shard, model=args.model,
                                 domain=args.domain, concentration=args.concentration,
                                 seed=args.seed)
    elif args.format == "megatron":
        if not args.experts:
            raise InputError(args.src, "--experts", "megatron traces do not record the "
                             "number of experts: pass --experts")
        trace = import_megatron(args.src, args.experts, **label)
    else:
        if not args.top_k:
            raise InputError(args.src, "--top-k", "router logits do not say top-k: pass --top-k")
        trace = import_hf(args.src, args.top_k, shards=args.shards or 1, **label)
    t1 = time.perf_counter()
    write_trace(trace, args.out)
    print(f"wrote {args.out}: {trace.num_steps} steps x {trace.num_layers} layers x "
          f"{trace.num_shards} shards x {trace.num_heads} heads x {trace.num_experts} experts, "
          f"top-{trace.meta.top_k}, {trace.meta.tokens_per_shard} tokens/shard "
          f"(import {t1 - t0:.1f} s, write {time.perf_counter() - t1:.2f} s)")
    return 0


def cmd_fit(args: argparse.Namespace) -> int:
    import pandas as pd

    from traces.fit import PARAMS, STAT_COLUMNS, fit_trace, goodness, summary

    trace = read_trace(args.trace)
    t0 = time.perf_counter()
    fit = fit_trace(trace, seed=args.seed)
    t1 = time.perf_counter()
    gof = goodness(trace, fit, seed=args.seed)
    base = goodness(trace, fit, seed=args.seed, zipf_only=True)
    print(f"{args.trace}: fitted 'wander' per layer in {t1 - t0:.1f} s")
    table = pd.DataFrame({"layer": range(trace.num_layers), **fit.params})
    print(table[["layer", *PARAMS]].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print("\ngoodness of fit (recorded vs generated, per layer):")
    cols = ["layer"] + [f"{c}_{w}" for c in ("max_over_mean", "tv_lag1", "tv_lag10")
                        for w in ("real", "fit")] + ["ks_max_over_mean"]
    print(gof[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    s_full, s_zipf = summary(gof), summary(base)
    print("\nmedian |relative error| over layers (KS: median distance):")
    print(pd.DataFrame({"statistic": [*STAT_COLUMNS, "ks_max_over_mean"],
                        "wander fit": [s_full[c] for c in [*STAT_COLUMNS, "ks_max_over_mean"]],
                        "zipf part only": [s_zipf[c] for c in [*STAT_COLUMNS,
                                                                "ks_max_over_mean"]]}
                       ).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    fit.notes["goodness"] = {"wander": s_full, "zipf_only": s_zipf}
    if args.out:
        with atomic_path(args.out) as tmp:
            tmp.write_text(fit.to_json())
        print(f"wrote {args.out}")
    if args.goodness:
        with atomic_path(args.goodness) as tmp:
            gof.to_csv(tmp, index=False, float_format="%.6g")
        print(f"wrote {args.goodness}")
    if args.trace_out:
        from traces.generators import generate
        write_trace(generate(fit.spec(seed=args.seed)), args.trace_out)
        print(f"wrote {args.trace_out}")
    return 0
