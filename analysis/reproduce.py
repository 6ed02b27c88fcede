"""The papers' comparisons, set up in the simulator as study files, in one command:

    python -m analysis.reproduce                  # run every study in configs/studies/, render
    python -m analysis.reproduce --render-only    # re-render from the committed result files
    python -m analysis.reproduce --studies seed-hp topk --resume

Each study file (configs/studies/NAME.toml, format in configs/studies/README.md) is run by
analysis.study.run_study, exactly as `moesim study run FILE` runs it, into
docs/reproduction/NAME/ (configs/, results/, summary.csv, claims.csv, report.md) and its
figures into docs/figures/; then docs/reproduction.md and docs/reproduction/headline.csv are
rendered from those files (analysis.reproduction_doc).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from moesim.atomic import atomic_path, write_text_atomic
from moesim.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ROOT / "configs" / "studies"
DOCS = ROOT / "docs"


def load_all(folder: Path = STUDIES, names: list[str] | None = None, root: Path = ROOT):
    """Every study file of `folder` (or those named), checked and expanded."""
    from analysis.study import load_study, study_files

    studies = [load_study(p, root) for p in study_files(folder)]
    if names:
        known = {s.name for s in studies}
        for n in names:
            if n not in known:
                raise InputError(folder, n, f"no such study; known: {', '.join(sorted(known))}")
        studies = [s for s in studies if s.name in names]
    return studies


def render(studies, doc: Path, headline_csv: Path) -> None:
    from analysis.reproduction_doc import headline, render_doc
    from analysis.study_report import Fields

    fields = {s.name: Fields(s) for s in studies}
    with atomic_path(headline_csv) as tmp:
        headline(studies, fields).to_csv(tmp, index=False, float_format="%.6g")
    write_text_atomic(doc, render_doc(studies, doc, fields))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--render-only", action="store_true",
                   help="run nothing; re-report and re-render from the committed result files")
    p.add_argument("--studies", nargs="+", metavar="NAME", help="run only these studies (the "
                   "doc still renders every study from its files)")
    p.add_argument("--resume", action="store_true", help="skip runs that are up to date")
    p.add_argument("--no-figures", action="store_true")
    p.add_argument("--jobs", type=int, default=1, metavar="N", help="simulate in N processes")
    p.add_argument("--folder", type=Path, default=STUDIES, help="the study files")
    p.add_argument("--doc", type=Path, default=DOCS / "reproduction.md")
    p.add_argument("--cache", type=Path, default=Path("/tmp/moesim-study-cache"))
    args = p.parse_args(argv)
    try:
        from analysis.study import run_study
        from analysis.study_report import write_outputs

        every = load_all(args.folder)
        chosen = load_all(args.folder, args.studies) if args.studies else every
        for study in chosen:
            if args.render_only:
                write_outputs(study, figures=not args.no_figures)
            else:
                run_study(study, cache=args.cache, resume=args.resume,
                          figures=not args.no_figures, jobs=args.jobs)
        render(every, args.doc, args.doc.parent / "reproduction" / "headline.csv")
        print(f"wrote {args.doc}")
    except InputError as e:
        print(f"reproduce: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
