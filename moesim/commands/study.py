"""`moesim study run FILE...`: expand a study file (configs/studies/README.md), simulate every
run, and write its configs, Result tables, summary CSV, claims, figures and report
(analysis.study). `moesim study show FILE` lists the runs without simulating."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="run a study file (configs/studies/*.toml)",
                       description=__doc__.split("\n\n")[0])
    s = p.add_subparsers(dest="study_command", metavar="ACTION", required=True)
    r = s.add_parser("run", help="simulate every run of the study files and report")
    r.add_argument("files", type=Path, nargs="+", help="study TOML files")
    r.add_argument("--resume", action="store_true",
                   help="skip runs whose result file holds the same config, routing and runner")
    r.add_argument("--only", metavar="REGEX", help="run only the keys matching REGEX; the "
                   "others are reported from their result files")
    r.add_argument("--report-only", action="store_true",
                   help="simulate nothing; re-report from the result files")
    r.add_argument("--no-figures", action="store_true", help="skip the figures")
    r.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="simulate in N processes (default 1)")
    r.add_argument("--cache", type=Path, default=Path("/tmp/moesim-study-cache"),
                   help="where generated traces are kept (regenerable)")
    r.set_defaults(func=cmd_run)
    sh = s.add_parser("show", help="list a study's runs (key, arm, runner, labels)")
    sh.add_argument("files", type=Path, nargs="+")
    sh.set_defaults(func=cmd_show)


def cmd_run(args: argparse.Namespace) -> int:
    from analysis.study import load_study, run_study
    from analysis.study_report import write_outputs

    studies = [load_study(f) for f in args.files]  # every file checked before any run
    for study in studies:
        if args.report_only:
            write_outputs(study, figures=not args.no_figures)
        else:
            run_study(study, cache=args.cache, resume=args.resume, only=args.only,
                      figures=not args.no_figures, jobs=args.jobs)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from analysis.study import load_study

    for f in args.files:
        study = load_study(f)
        print(f"{study.name}: {len(study.runs)} runs -> {study.out}")
        for run in study.runs:
            labels = ", ".join(f"{k}={v}" for k, v in run.labels.items()
                               if k not in ("arm", "strategy"))
            print(f"  {run.key:32s} {run.runner:8s} {run.strategy:5s} {labels}")
    sys.stdout.flush()
    return 0
