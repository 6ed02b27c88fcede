"""`moesim simulate` and `moesim sweep` end to end on the bundled configs and traces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from moesim.cli import main
from moesim.results import read_results

ROOT = Path(__file__).resolve().parents[2]
CFG = ROOT / "configs" / "dgx-h200-4node.toml"
HP_CFG = ROOT / "configs" / "dgx-h200-4node-mhlatent.toml"
TRACE = ROOT / "traces" / "data" / "moe-e64-k8-zipf1.2.parquet"
HP_TRACE = ROOT / "traces" / "data" / "mhl-h32-e16-k2-zipf1.2.parquet"
SMALL = ["--set", "model.num_layers=2", "--set", "cluster.nodes=1", "--set",
         "parallel.degree=8"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moesim", *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_simulate_writes_everything_and_is_deterministic(tmp_path, capsys):
    outs = []
    for i in range(2):
        d = tmp_path / str(i)
        rc = main(["simulate", "--config", str(CFG), "--trace", str(TRACE), "--strategy",
                   "ep,fsep", "--steps", "1", *SMALL, "--out", str(d / "r.csv"),
                   "--timeline", str(d / "t.json"), "--plot", str(d / "p.png"),
                   "--summary", str(d / "s.csv")])
        assert rc == 0
        outs.append(d)
    table = capsys.readouterr().out
    assert "step time (ms)" in table and "FSEP" in table
    a, b = ((d / "r.csv").read_bytes() for d in outs)
    assert a == b  # byte-identical results for the same inputs
    df, meta = read_results(outs[0] / "r.csv")
    assert set(df["strategy"]) == {"ep", "fsep"} and meta["source"] == "sim"
    tl = json.loads((outs[0] / "t.json").read_text())
    tracks = {(e["pid"], e["tid"]) for e in tl["traceEvents"] if e["ph"] == "X"}
    assert len(tracks) == 2 * 2 * 8  # strategies x streams x ranks
    assert (outs[0] / "p.png").stat().st_size > 1000
    s = pd.read_csv(outs[0] / "s.csv")
    assert list(s["strategy"]) == ["ep", "fsep"]


def test_simulate_hp_with_its_own_model_and_trace(capsys):
    rc = main(["simulate", "--config", str(CFG), "--trace", str(TRACE), "--hp-config",
               str(HP_CFG), "--hp-trace", str(HP_TRACE), "--strategy", "ep,hp", "--steps",
               "1", "--set", "model.num_layers=2"])
    assert rc == 0
    assert "HP" in capsys.readouterr().out


@pytest.mark.parametrize("args, where", [
    (["--strategy", "ep,xp"], "--strategy: xp: unknown strategy"),
    (["--strategy", "hp"], "model.num_heads"),
    (["--plot", "x.jpg"], "--plot: use a .png name"),
    (["--set", "cluster.preset=dgx-z1"], "cluster.preset: unknown preset"),
    (["--set", "parallel.degree=3"], "parallel.degree"),
])
def test_bad_input_is_one_line_exit_2(args, where, tmp_path):
    r = _run(["simulate", "--config", str(CFG), "--trace", str(TRACE), "--steps", "1",
              "--out", str(tmp_path / "r.parquet"), *args])
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and where in r.stderr
    assert not (tmp_path / "r.parquet").exists()


def test_hp_trace_must_match_model(tmp_path):
    r = _run(["simulate", "--config", str(CFG), "--trace", str(TRACE), "--hp-config",
              str(HP_CFG), "--strategy", "hp", "--steps", "1"])
    assert r.returncode == 2 and "heads" in r.stderr


def test_sweep_is_resumable(tmp_path):
    out = tmp_path / "sweep.csv"
    args = ["sweep", "--config", str(CFG), "--trace", str(TRACE), "--strategies", "ep,fsep",
            "--nodes", "1,2", "--jobs", "2", "--out", str(out), "--set", "model.num_layers=2",
            "--set", "run.steps=1"]
    r = _run(args)
    assert r.returncode == 0, r.stderr
    df = pd.read_csv(out)
    assert len(df) == 4 and set(df["gpus"]) == {8, 16}
    r2 = _run(args)
    assert r2.returncode == 0 and "0 to run" in r2.stdout
    df2 = pd.read_csv(out)
    assert df.drop(columns="wall_s").equals(df2.drop(columns="wall_s"))
