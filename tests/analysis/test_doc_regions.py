"""analysis.doc_regions: regions are re-rendered in place, drift is detected, and a number
typed outside a region is found; analysis.validation.measured_steps reads the benchmark's
step, not the span of the phases."""

from __future__ import annotations

import json

import pytest

from analysis import doc_regions
from analysis.validation import measured_steps, strategy_errors
from moesim.errors import InputError


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setitem(doc_regions.REGIONS, "t.one", "tests.analysis.test_doc_regions:_one")
    return doc_regions


def _one(root) -> str:
    return "value 42\n"


def test_regions_render_in_place_and_drift_is_detected(tmp_path, registry):
    doc = tmp_path / "d.md"
    doc.write_text("# T\n\nprose\n<!-- generated: t.one -->\nold 7\n<!-- end: t.one -->\ntail\n")
    assert registry.drifted(doc, tmp_path) == ["t.one"]
    registry.update(doc, tmp_path)
    assert doc.read_text() == ("# T\n\nprose\n<!-- generated: t.one -->\nvalue 42\n"
                               "<!-- end: t.one -->\ntail\n")
    assert registry.drifted(doc, tmp_path) == []


def test_unknown_region_is_an_error(tmp_path):
    doc = tmp_path / "d.md"
    doc.write_text("<!-- generated: nope -->\n<!-- end: nope -->\n")
    with pytest.raises(InputError, match="nope"):
        doc_regions.update(doc, tmp_path)


def test_stray_numbers_outside_regions_code_and_links():
    text = ("# H200 top-8\nsee `x 12` and [a](f/1.png), h200x1, issue #7\n"
            "<!-- generated: a -->\n3.5 ms\n<!-- end: a -->\n```\n9 9\n```\n"
            "typed 3.2% and -22% and 1,024 here\n")
    assert doc_regions.stray_numbers(text) == [(9, "3.2%"), (9, "-22%"), (9, "1,024")]


def test_measured_step_is_the_benchmarks_own(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"benchmark": {"step_s": 0.011}}))
    assert measured_steps(tmp_path)[0] == [0.011]
    (tmp_path / "meta.json").write_text(json.dumps({"step_wall_s": [0.01, 0.02],
                                                    "benchmark": {"step_s": 0.011}}))
    assert measured_steps(tmp_path) == ([0.01, 0.02], "wall time per step")
    (tmp_path / "meta.json").write_text("{}")
    with pytest.raises(InputError, match=r"benchmark\.step_s"):
        measured_steps(tmp_path)


def test_strategy_errors_median_and_signed_worst():
    import pandas as pd
    d = pd.DataFrame({"strategy": ["ep"] * 3 + ["hp"], "run": ["a", "b", "c", "d"],
                      "step_error": [0.05, -0.30, 0.10, 0.02]})
    e = strategy_errors(d).set_index("strategy")
    assert e.loc["ep", "median_abs_error"] == pytest.approx(0.10)
    assert e.loc["ep", "worst_error"] == -0.30 and e.loc["ep", "worst_run"] == "b"
    assert e.loc["hp", "runs"] == 1


def test_add_set_scores_both_directions(tmp_path, monkeypatch):
    """A second device call's runs and calibration, added with --add-set: each set is scored
    with the other's calibration (out of sample, both directions) and its own (in sample)."""
    import shutil
    from pathlib import Path

    import pandas as pd

    import moesim.sim.compute as compute
    from benchmarks import validation as bv

    repo = Path(__file__).resolve().parents[2]
    cal_dir = tmp_path / "configs" / "calibration"
    cal_dir.mkdir(parents=True)
    monkeypatch.setattr(compute, "CALIBRATION_DIR", cal_dir)
    shutil.copy(repo / "configs/calibration/h200-measured.csv", cal_dir / "h200-a.csv")
    runs = tmp_path / "docs" / "validation" / "runs"
    new = tmp_path / "new"
    for name in ("h200x1-ep-k4-zipf", "h200x1-hp-k4-zipf"):
        shutil.copytree(repo / "docs/validation/runs" / name, runs / f"a-{name}")
        shutil.copytree(repo / "docs/validation/runs" / name, new / name)
    sets = tmp_path / "docs" / "validation" / "sets.toml"
    sets.write_text('primary = "h200-a"\n[[runs]]\nname = "a"\ndirs = '
                    '"docs/validation/runs/a-*"\ncall = "A"\ncommand = "c"\nmachine = "m"\n'
                    '[[calibration]]\nname = "h200-a"\nfile = "configs/calibration/h200-a.csv"'
                    '\ncall = "A"\n')
    b_cal = tmp_path / "b.csv"
    b_cal.write_text((repo / "configs/calibration/h200-s3-1540.csv").read_text())
    doc = tmp_path / "v.md"
    doc.write_text("# v\n")
    out = tmp_path / "docs" / "validation"
    assert bv.main(["--sets", str(sets), "--out", str(out), "--doc", str(doc), "--figures",
                    str(tmp_path / "fig"), "--add-set", "b", "--add-runs", str(new),
                    "--add-calibration", str(b_cal), "--call", "B"]) == 0
    oos = pd.read_csv(out / "out_of_sample.csv")
    rel = {(r.set, r.calibration): r.sample for r in oos.itertuples()}
    assert rel == {("a", "h200-a"): "in", ("a", "h200-b"): "out", ("b", "h200-a"): "out",
                   ("b", "h200-b"): "in"}
    # the same runs scored with the same calibration give the same error, whatever the set
    same = oos[oos["calibration"] == "h200-a"].groupby("set")["step_error"].apply(sorted)
    assert same["a"] == pytest.approx(same["b"])
