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
