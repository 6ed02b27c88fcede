"""`moesim plot KIND`: paper-style figures (PNG and PDF) from result files; no GPU needed.

Kinds and what they read:
  scaling     throughput vs GPUs per strategy      Result tables or a run-summary table
  comm        comm bytes and time vs top-k         Result tables or a run-summary table
  breakdown   step-time breakdown, stacked bars    Result tables
  imbalance   per-rank load heatmaps over steps    Result tables (forward expert tokens)
  validation  simulated vs measured scatter        Result tables of both sources, or the
                                                   comparison table of `moesim validate`
  planner     planner solve time vs problem size   planner statistics table
  summary     (no figure) the run-summary table that scaling and comm plot, as CSV
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from analysis import breakdown, comm, imbalance, planner_perf, scaling, validation
from analysis.figure_files import FORMATS, save_figure
from analysis.inputs import read_result_files, read_table
from analysis.run_summary import SUMMARY_COLUMNS, summarize_files
from moesim.atomic import atomic_path
from moesim.errors import InputError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plot", help="paper-style figures from result files",
                       description="Draw a figure (PNG and PDF) from Result tables, run "
                       "summaries or planner statistics.")
    ksub = p.add_subparsers(dest="plot_kind", metavar="KIND", required=True)

    def kind(name: str, help_: str, *, results: bool = True, summary: bool = False,
             table: bool = False) -> argparse.ArgumentParser:
        k = ksub.add_parser(name, help=help_, description=help_)
        src = k.add_mutually_exclusive_group(required=True)
        if results:
            src.add_argument("--results", type=Path, nargs="+", metavar="FILE",
                             help="Result tables (.parquet or .csv), simulated or measured")
        if summary:
            src.add_argument("--summary", type=Path, metavar="FILE",
                             help="a run-summary table (see `moesim plot summary`)")
        if table:
            src.add_argument("--table", type=Path, metavar="FILE", help="a CSV/Parquet table")
        if name != "summary":
            k.add_argument("--out", type=Path, required=True, metavar="DIR",
                           help="folder for NAME.png and NAME.pdf")
            k.add_argument("--name", help=f"file name stem (default: {name})")
            k.add_argument("--format", nargs="+", choices=FORMATS, default=list(FORMATS))
            k.add_argument("--title", help="a title drawn on the figure")
        k.set_defaults(func=cmd_plot)
        return k

    kind("scaling", "throughput vs number of GPUs, per strategy", summary=True)
    kind("comm", "communication bytes and time vs top-k, per strategy", summary=True)
    kind("breakdown", "step-time breakdown per strategy, stacked by phase")
    im = kind("imbalance", "per-rank expert load over steps (heatmaps), e.g. EP vs FSEP")
    im.add_argument("--layer", type=int, default=0,
                    help="which MoE layer the heatmaps show (index among recorded layers)")
    src = im._mutually_exclusive_groups[0]
    src.add_argument("--trace", type=Path, metavar="FILE",
                     help="a routing trace: lay it out by EP and by the FSEP planner instead")
    im.add_argument("--config", type=Path,
                    help="with --trace: model and planner settings (solver, slots, hot "
                    "replicas) and the rank count")
    im.add_argument("--ranks", type=int, help="with --trace: ranks (default: the config's)")
    im.add_argument("--plan-ahead", action="store_true",
                    help="with --trace: lay out step s from step s-1's routing")
    kind("validation", "simulated vs measured phase and step times",
         table=True)
    pl = kind("planner", "planner solve time vs problem size", results=False, table=True)
    pl.add_argument("--x", default="num_experts", help="the problem-size column")
    sm = kind("summary", "write the run-summary table (one row per run and strategy)")
    sm.add_argument("--csv", type=Path, required=True, help="where to write it")


def _summary(args: argparse.Namespace) -> tuple[pd.DataFrame, str]:
    if getattr(args, "summary", None) is not None:
        return read_table(args.summary, {"strategy": "string"}), str(args.summary)
    files = read_result_files(args.results)
    return summarize_files(files), ", ".join(str(p) for p in args.results)


def _trace_panels(args: argparse.Namespace) -> list[imbalance.LoadPanel]:
    from moesim.config import load_config
    from traces.io import read_trace

    if args.config is None:
        raise InputError("--trace", "--config", "needs --config for the model and planner")
    cfg = load_config(args.config)
    trace = read_trace(args.trace)
    ranks = args.ranks or cfg.num_ranks
    return imbalance.panels_from_trace(trace, cfg, ranks, plan_ahead=args.plan_ahead)


def build_figure(args: argparse.Namespace) -> Figure:
    kind = args.plot_kind
    if kind in ("scaling", "comm"):
        table, src = _summary(args)
        if kind == "comm" and table["top_k"].isna().any():
            raise InputError(src, "top_k", "a run's top-k is unknown: its metadata has no "
                             "config.model.top_k (use a summary table with a top_k column)")
        plot = scaling.plot_scaling if kind == "scaling" else comm.plot_comm
        return plot(table, title=args.title, source=src)
    if kind == "breakdown":
        return breakdown.plot_breakdown(read_result_files(args.results), title=args.title)
    if kind == "imbalance":
        if args.trace is not None:
            panels = _trace_panels(args)
        else:
            panels = imbalance.panels_from_results(read_result_files(args.results))
        return imbalance.plot_imbalance(panels, layer=args.layer, title=args.title)
    if kind == "validation":
        if args.table is not None:
            comp = read_table(args.table, validation.REQUIRED)
            return validation.plot_validation(comp, title=args.title, source=str(args.table))
        comp = validation.comparison_from_results(read_result_files(args.results))
        return validation.plot_validation(comp, title=args.title)
    if kind == "planner":
        stats = read_table(args.table, {"solver": "string", "solve_time_s": "number"})
        return planner_perf.plot_planner_perf(stats, x=args.x, title=args.title,
                                              source=str(args.table))
    raise AssertionError(f"unhandled plot kind {kind}")


def cmd_plot(args: argparse.Namespace) -> int:
    if args.plot_kind == "summary":
        table, _ = _summary(args)
        if args.csv.suffix != ".csv":
            raise InputError(args.csv, "--csv", "the summary is written as .csv")
        with atomic_path(args.csv) as tmp:
            table[SUMMARY_COLUMNS].to_csv(tmp, index=False, float_format="%.6g")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
        print(f"wrote {args.csv}")
        return 0
    fig = build_figure(args)
    for path in save_figure(fig, args.out, args.name or args.plot_kind, args.format):
        print(f"wrote {path}")
    return 0
