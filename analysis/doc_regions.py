"""Generated regions of hand-written docs: the numbers of a page like docs/validation.md live
between markers, and each region is rendered from committed files by a registered function,
so that tests/test_docs_drift.py can regenerate every one and fail when the page drifts.

    <!-- generated: validation.status -->
    ...rendered text...
    <!-- end: validation.status -->

    python -m analysis.doc_regions docs/validation.md          # re-render every region
    python -m analysis.doc_regions --check docs/validation.md  # exit 1 naming drifted regions

A region's renderer is "module:function", called with the repository root and returning the
region's markdown. Add yours to REGIONS (a section of docs/validation.md by another area
registers its own renderer here). Outside regions, code and links, a page checked with
`stray_numbers` may hold no number: a figure typed by hand is one a test cannot regenerate.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys
from pathlib import Path

from moesim.atomic import write_text_atomic
from moesim.errors import InputError

ROOT = Path(__file__).resolve().parents[1]

REGIONS: dict[str, str] = {
    "validation.status": "analysis.validation_doc:status",
    "validation.measured": "analysis.validation_doc:measured",
    "validation.out_of_sample": "analysis.validation_doc:out_of_sample",
    "validation.runs": "analysis.validation_doc:runs",
    "validation.phases": "analysis.validation_doc:phases",
    "validation.why": "analysis.validation_doc:why",
    "validation.calibrations": "analysis.validation_doc:calibrations",
    # Sections of docs/validation.md other areas own: each module provides region(root), the
    # section's markdown rendered from its committed CSVs alone (no date of the rendering).
    "validation.published": "benchmarks.published:region",
    "validation.network": "benchmarks.network:region",
    "runtime.balancing": "analysis.balancing_doc:table",
}

_REGION = re.compile(r"(<!-- generated: (?P<name>[\w.-]+) -->\n)(?P<body>.*?)"
                     r"(<!-- end: (?P=name) -->)", re.S)


def render_region(name: str, root: Path = ROOT) -> str:
    if name not in REGIONS:
        raise InputError("analysis.doc_regions", name, "no renderer registered for this region")
    module, _, fn = REGIONS[name].partition(":")
    text = getattr(importlib.import_module(module), fn)(root)
    return text if text.endswith("\n") else text + "\n"


def regions(text: str) -> list[tuple[str, str]]:
    """(name, body) of every region of a page."""
    return [(m["name"], m["body"]) for m in _REGION.finditer(text)]


def rendered(text: str, root: Path = ROOT) -> str:
    """The page with every region re-rendered."""
    return _REGION.sub(lambda m: m.group(1) + render_region(m["name"], root) + m.group(4), text)


def update(doc: Path, root: Path = ROOT) -> None:
    write_text_atomic(doc, rendered(Path(doc).read_text(), root))


def drifted(doc: Path, root: Path = ROOT) -> list[str]:
    text = Path(doc).read_text()
    return [name for name, body in regions(text) if body != render_region(name, root)]


_NUMBER = re.compile(r"(?<![\w.#/-])[+-]?\d[\d,.]*%?(?![\w])")


def stray_numbers(text: str) -> list[tuple[int, str]]:
    """(line, token) of each number outside generated regions, code, links and comments."""
    text = _REGION.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    text = re.sub(r"```.*?```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    text = re.sub(r"<!--.*?-->", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S)
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        line = re.sub(r"`[^`]*`", "", line)
        line = re.sub(r"\]\([^)]*\)", "]", line)
        out += [(i, m.group(0)) for m in _NUMBER.finditer(line)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m analysis.doc_regions", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("docs", type=Path, nargs="+")
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 on drift")
    args = p.parse_args(argv)
    try:
        bad = []
        for doc in args.docs:
            if args.check:
                bad += [f"{doc}: {n}" for n in drifted(doc)]
            else:
                update(doc)
                print(f"wrote {doc}")
    except InputError as e:
        print(f"doc_regions: error: {e}", file=sys.stderr)
        return 2
    if bad:
        print("drifted:\n" + "\n".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
