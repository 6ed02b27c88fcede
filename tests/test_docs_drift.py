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


@pytest.fixture(scope="module")
def fields(studies):
    from analysis.study_report import Fields
    return {s.name: Fields(s) for s in studies}


def test_reproduction_doc_is_what_the_committed_results_give(studies, fields):
    from analysis.reproduction_doc import headline, render_doc

    doc = ROOT / "docs" / "reproduction.md"
    assert render_doc(studies, doc, fields) == doc.read_text(), \
        f"docs/reproduction.md drifted: {RENDER_REPRO}"
    head = ROOT / "docs" / "reproduction" / "headline.csv"
    assert _csv(headline(studies, fields)) == head.read_text(), \
        f"{head} drifted: {RENDER_REPRO}"


def test_each_study_summary_claims_and_report_are_current(studies, fields):
    from analysis.study_report import claims, render_section, summary_frame, values

    for s in studies:
        f = fields[s.name]
        cmd = f"moesim study run {s.path.relative_to(ROOT)} --report-only"
        assert _csv(summary_frame(f)) == (s.out / s.summary_file).read_text(), \
            f"{s.name}: summary drifted: {cmd}"
        assert _csv(claims(f, values(f))) == (s.out / "claims.csv").read_text(), \
            f"{s.name}: claims drifted: {cmd}"
        report = s.out / "report.md"
        assert render_section(s, report, f, level=1) in report.read_text(), \
            f"{s.name}: report drifted: {cmd}"


def test_study_results_are_what_the_simulator_gives_today(studies, tmp_path):
    """A canary per study: its first run simulated again must give the committed step time,
    or the committed results (and every number drawn from them) are stale."""
    from analysis.study import make_trace, simulate_frames
    from analysis.study_report import simulated_fields
    from moesim.config import config_from_dict
    from moesim.results import write_results

    for s in studies:
        run = next((r for r in s.runs if r.runner == "simulate"), None)
        if run is None:
            continue
        cfg = config_from_dict(run.config, run.key)
        frame, _ = simulate_frames(run, cfg, make_trace(run, cfg, tmp_path, ROOT), "canary")
        write_results(frame, tmp_path / "canary.parquet", {"config": run.config})
        now = simulated_fields(tmp_path / "canary.parquet")[0]["step_ms"]
        then = simulated_fields(s.results_path(run))[0]["step_ms"]
        assert now == pytest.approx(then, rel=1e-9), (
            f"{s.name}/{run.key}: the simulator now gives {now:.4f} ms, the committed result "
            f"{then:.4f} ms: python -m analysis.reproduce")


VALIDATE = "python -m benchmarks.validation --sets docs/validation/sets.toml --out docs/validation"


def test_validation_doc_regions_are_what_the_committed_files_give():
    from analysis.doc_regions import drifted, regions, stray_numbers

    doc = ROOT / "docs" / "validation.md"
    text = doc.read_text()
    assert {n for n, _ in regions(text)} >= {"validation.status", "validation.out_of_sample",
                                             "validation.runs"}
    assert drifted(doc) == [], f"{doc} drifted: {VALIDATE} --render-only"
    # docs/reproduction.md is generated whole (test above); here prose sits beside regions
    assert stray_numbers(text) == [], (
        "numbers typed outside generated regions: render them in a region whose function is "
        "registered in analysis.doc_regions.REGIONS")



def test_runtime_doc_regions_are_what_the_committed_files_give():
    """docs/runtime.md's generated regions (the balancing runs) from their committed CSVs."""
    from analysis.doc_regions import drifted, regions

    doc = ROOT / "docs" / "runtime.md"
    assert "runtime.balancing" in {n for n, _ in regions(doc.read_text())}
    assert drifted(doc) == [], f"{doc} drifted: python -m benchmarks.balancing --render-only"

def test_validation_scores_are_what_the_simulator_gives_today():
    """The shipped calibration's per-run scores, simulated again from the committed runs."""
    import pandas as pd

    from analysis.validation import load_sets, score_run

    sets = load_sets(ROOT / "docs" / "validation" / "sets.toml", ROOT)
    committed = pd.read_csv(ROOT / "docs" / "validation" / "summary.csv").set_index("run")
    for rs in sets.runs:
        for run in rs.dirs:
            s = score_run(run, {"cluster.gpu": sets.primary})
            c = committed.loc[run.name]
            assert s["measured_step_s"] == pytest.approx(c["measured_step_s"], rel=1e-5)
            assert s["simulated_step_s"] == pytest.approx(c["simulated_step_s"], rel=1e-5), \
                f"{run.name}: the simulator drifted from docs/validation: {VALIDATE}"


def test_readme_layout_table_matches_the_tree_and_architecture():
    import re

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Layout"):readme.index("## Gallery")]
    listed = {p.rstrip("/") for p in re.findall(r"^\| `([^`]+)`", table, re.M)}
    listed |= {p.rstrip("/") for p in re.findall(r", `([\w/.]+/)`", table)}
    for p in listed:
        assert (ROOT / p).exists(), f"README's layout lists {p}, which does not exist"
    packages = {"moesim", "moesim/sim", "moesim/commands", "traces", "planner", "kernels",
                "runtime", "analysis", "configs", "benchmarks", "docs"}
    assert packages <= listed, f"README's layout misses {sorted(packages - listed)}"
    arch = (ROOT / "docs" / "architecture.md").read_text()
    for p in packages - {"docs", "configs", "benchmarks"}:
        assert f"`{p}/" in arch or f"`{p.replace('/', '.')}" in arch, p
