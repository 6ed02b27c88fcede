"""traces.fit and the `wander` generator: the generator's AR(1) and skew against closed forms,
the fit recovering the statistics (and, loosely, the parameters) of traces generated with known
parameters, per layer; `moesim trace fit` writing a fit that `trace gen --fit` turns back into a
trace; bad fit files as one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from traces.fit import Fit, fit_trace, goodness, summary
from traces.generators import TraceSpec, generate, wander
from traces.io import read_trace, write_trace


def _p(**params) -> np.ndarray:
    spec = TraceSpec(kind="wander", steps=4000, layers=1, shards=1, experts=8, top_k=1,
                     params=params)
    return wander(spec, np.random.default_rng(0))[:, 0, 0]


def test_wander_closed_forms():
    # No wander or jitter: exactly Zipf(s) in some order, every step.
    p = _p(exponent=1.0, spread=0.0, jitter=0.0)
    w = 1 / np.arange(1, 9)
    np.testing.assert_allclose(-np.sort(-p[0]), w / w.sum(), rtol=1e-12)
    assert np.ptp(p, axis=0).max() < 1e-15
    # exponent 0, no jitter: log p - mean log p is the AR(1) a, stationary sd 0.5, lag-k
    # autocorrelation 0.5^(k / half_life).
    p = _p(exponent=0.0, spread=0.5, jitter=0.0, half_life=10.0)
    a = np.log(p) - np.log(p).mean(axis=1, keepdims=True)
    a = a * np.sqrt(8 / 7)  # centring over 8 experts shrinks the variance by 7/8
    assert a.std() == pytest.approx(0.5, rel=0.05)
    for k in (1, 10, 30):
        r = np.mean(a[k:] * a[:-k]) / np.mean(a * a)
        assert r == pytest.approx(0.5 ** (k / 10), abs=0.04)
    # Bursts: a quarter of the steps, one expert 8x: its share jumps by ~8x where uniform.
    p = _p(exponent=0.0, spread=0.0, jitter=0.0, burst_prob=0.25, burst_experts=1,
           burst_factor=8.0)
    hit = p.max(axis=1) > 1 / 8 + 1e-9
    assert hit.mean() == pytest.approx(0.25, abs=0.03)
    np.testing.assert_allclose(p[hit].max(axis=1), 8 / 15)


def test_wander_rejects_bad_parameters():
    spec = TraceSpec(kind="wander", steps=4, layers=2, experts=4, top_k=1,
                     params={"exponent": [1.0, 2.0, 3.0]})
    with pytest.raises(InputError, match="exponent"):
        generate(spec)
    with pytest.raises(InputError, match="burst_prob"):
        generate(TraceSpec(kind="wander", steps=4, layers=1, experts=4, top_k=1,
                           params={"burst_prob": 2.0}))


TRUE = {"exponent": [0.6, 2.5], "half_life": [30.0, 4.0], "spread": [0.4, 0.3],
        "jitter": [0.05, 0.2], "burst_prob": [0.0, 0.0], "burst_factor": [8.0, 8.0],
        "burst_experts": [2, 2]}


@pytest.fixture(scope="module")
def known():
    spec = TraceSpec(kind="wander", steps=240, layers=2, shards=4, experts=16, top_k=2,
                     tokens_per_shard=8192, seed=3, params=TRUE)
    trace = generate(spec)
    return trace, fit_trace(trace)


def test_fit_recovers_statistics_and_parameters(known):
    trace, fit = known
    assert fit.shape == {"steps": 240, "layers": 2, "shards": 4, "heads": 1, "experts": 16}
    # Per-layer differences are found: a mild and a skewed, fast-moving layer.
    s, h = fit.params["exponent"], fit.params["half_life"]
    assert s[0] < 1.0 < 2.0 < s[1] < 3.0
    assert h[1] < 10 < h[0]
    assert max(fit.params["burst_prob"]) < 0.02  # next to no bursts invented
    gof = goodness(trace, fit, seed=1)  # another seed than the fit's own simulation
    err = summary(gof)
    assert err["max_over_mean"] < 0.15 and err["cv"] < 0.15
    assert err["tv_lag1"] < 0.15 and err["tv_lag10"] < 0.2
    # The zipf part alone cannot move: its drift error is of order one.
    assert summary(goodness(trace, fit, seed=1, zipf_only=True))["tv_lag10"] > 0.5


def test_fit_finds_bursts():
    params = {"exponent": 0.3, "spread": 0.05, "jitter": 0.02, "half_life": 20.0,
              "burst_prob": 0.1, "burst_experts": 1, "burst_factor": 6.0}
    trace = generate(TraceSpec(kind="wander", steps=300, layers=1, shards=2, experts=16,
                               top_k=2, tokens_per_shard=8192, seed=5, params=params))
    fit = fit_trace(trace)
    assert fit.params["burst_prob"][0] == pytest.approx(0.1, abs=0.04)
    assert fit.params["burst_factor"][0] == pytest.approx(6.0, rel=0.3)
    assert fit.params["burst_experts"] == [1]


def test_trace_fit_cli_round_trip(known, tmp_path, capsys):
    trace, _ = known
    write_trace(trace, tmp_path / "t.parquet")
    assert main(["trace", "fit", str(tmp_path / "t.parquet"), "--out", str(tmp_path / "f.json"),
                 "--goodness", str(tmp_path / "g.csv")]) == 0
    out = capsys.readouterr().out
    assert "goodness of fit" in out and "zipf part only" in out
    fit = Fit.read(tmp_path / "f.json")
    assert set(json.loads((tmp_path / "f.json").read_text())["notes"]["goodness"]) == \
        {"wander", "zipf_only"}
    assert main(["trace", "gen", "--kind", "wander", "--fit", str(tmp_path / "f.json"),
                 "--steps", "12", "--out", str(tmp_path / "g.parquet")]) == 0
    g = read_trace(tmp_path / "g.parquet")
    assert g.counts.shape == (12, 2, 4, 1, 16) and g.meta.top_k == 2
    assert g.meta.generator["params"]["exponent"] == fit.params["exponent"]


def test_bad_fit_file_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "wander", "shape": {"layers": 2}, "top_k": 2,
                               "tokens_per_shard": 8, "params": {"exponent": [1.0]}}))
    assert main(["trace", "gen", "--fit", str(bad), "--out", str(tmp_path / "x.parquet")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "params.exponent" in err and "bad.json" in err
    assert not (tmp_path / "x.parquet").exists()
