"""Every number quoted in docs/reproduction.md and docs/validation.md is regenerated here from
the committed result files, and the test fails when a doc (or a table beside it) drifts from
what those files give. Regenerate with the command each failure names."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RENDER_REPRO = "python -m analysis.reproduce --render-only"


def _csv(df) -> str:
    buf = io.StringIO()
    df.to_csv(buf, index=False, float_format="%.6g")
    return buf.getvalue()


@pytest.fixture(scope="module")
def studies():
    from analysis.reproduce import load_all
    return load_all()


def test_reproduction_doc_is_what_the_committed_results_give(studies):
    from analysis.reproduction_doc import headline, render_doc

    doc = ROOT / "docs" / "reproduction.md"
    assert render_doc(studies, doc) == doc.read_text(), \
        f"docs/reproduction.md drifted: {RENDER_REPRO}"
    head = ROOT / "docs" / "reproduction" / "headline.csv"
    assert _csv(headline(studies)) == head.read_text(), f"{head} drifted: {RENDER_REPRO}"


def test_each_study_summary_claims_and_report_are_current(studies):
    from analysis.study_report import Fields, claims, render_section, summary_frame, values

    for s in studies:
        f = Fields(s)
        cmd = f"moesim study run {s.path.relative_to(ROOT)} --report-only"
        assert _csv(summary_frame(f)) == (s.out / s.summary_file).read_text(), \
            f"{s.name}: summary drifted: {cmd}"
        assert _csv(claims(f, values(f))) == (s.out / "claims.csv").read_text(), \
            f"{s.name}: claims drifted: {cmd}"
        report = s.out / "report.md"
        assert render_section(s, report, f, level=1) in report.read_text(), \
            f"{s.name}: report drifted: {cmd}"
