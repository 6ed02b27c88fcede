"""`moesim validate`: a run whose measured times are the simulator's own, scaled by a known
factor, must come back with exactly that error on every phase and step."""

from __future__ import annotations

import shutil

import pandas as pd
import pytest

from analysis.validation import compare
from moesim.cli import main
from moesim.config import load_config
from moesim.results import write_results
from moesim.sim.replay import simulate_run
from moesim.sim.simulate import Simulator
from traces.generators import TraceSpec, generate
from traces.io import read_trace, write_trace

CONFIG = """
[model]
name = "tiny"
num_layers = 2
d_model = 256
d_ffn = 128
num_experts = 8
top_k = 2
attn_heads = 4
[cluster]
preset = "h200x2"
nodes = 1
gpus_per_node = 2
[parallel]
strategy = "{strategy}"
[run]
steps = 2
"""


def make_run(tmp_path, strategy: str, scale: float):
    run = tmp_path / strategy
    run.mkdir()
    (run / "config.toml").write_text(CONFIG.format(strategy=strategy))
    write_trace(generate(TraceSpec(kind="zipf", steps=2, layers=2, shards=2, experts=8,
                                   top_k=2, tokens_per_shard=256)), run / "trace.parquet")
    cfg = load_config(run / "config.toml")
    sim = Simulator(cfg, read_trace(run / "trace.parquet"), "trace")
    frame = pd.concat([sim.simulate_step(strategy, s).frame for s in (0, 1)])
    measured = frame.assign(source="real", start_s=frame["start_s"] * scale,
                            end_s=frame["end_s"] * scale)
    write_results(measured, run / "results.parquet")
    return run


@pytest.mark.parametrize("strategy", ["ep", "fsep"])
def test_known_scale_gives_known_error(tmp_path, strategy):
    run = make_run(tmp_path, strategy, scale=1.25)
    comp = compare(*simulate_run(run), run)
    assert set(comp["phase"]) >= {"step", "expert", "dispatch", "combine"}
    assert (comp["step"] == "0").any() and (comp["step"] == "1").any()
    timed = comp[comp["measured_s"] > 0]
    assert timed["rel_error"].to_numpy() == pytest.approx(1 / 1.25 - 1, abs=1e-9)


def test_cli_writes_table_and_plot_and_rejects_bad_runs(tmp_path, capsys):
    run = make_run(tmp_path, "ep", scale=1.0)
    assert main(["validate", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step-time error 0.0%" in out
    assert (run / "validate" / "comparison.csv").exists()
    assert (run / "validate" / "validation.png").exists()
    shutil.copytree(run, tmp_path / "broken")
    (tmp_path / "broken" / "trace.parquet").unlink()
    assert main(["validate", "--run", str(tmp_path / "broken")]) == 2
    assert "trace.parquet: missing" in capsys.readouterr().err
    assert main(["validate", "--run", str(tmp_path / "nope")]) == 2


def test_set_overrides_the_runs_config(tmp_path, capsys):
    # The run's times are the h200.csv simulation; simulating it with another calibration must
    # move the error off zero, and an unknown field is a one-line input error.
    run = make_run(tmp_path, "ep", scale=1.0)
    same = compare(*simulate_run(run), run)
    other = compare(*simulate_run(run, {"cluster.gpu": "h200-measured"}), run)
    assert same["rel_error"].abs().max() == pytest.approx(0, abs=1e-9)
    assert other["rel_error"].abs().max() > 0.01
    assert main(["validate", "--run", str(run), "--set", "cluster.nope=1"]) == 2
    assert "cluster.nope" in capsys.readouterr().err
