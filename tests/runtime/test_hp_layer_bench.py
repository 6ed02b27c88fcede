"""benchmarks/hp_layer.py (the HP layer before and after the kernels) end to end on gloo with
2 ranks: both runs of each model finish, their configs say which kernels ran, and `moesim
validate` replays them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from moesim.sim.replay import simulate_run

ROOT = Path(__file__).resolve().parents[2]


def test_hp_layer_bench_runs_and_validates(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", str(ROOT / "benchmarks" / "hp_layer.py"), "--out", str(tmp_path), "--cpu",
           "--steps", "2", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert {r["kernels"] for r in summary["results"]} == {"baseline", "auto"}
    for kernels in ("baseline", "auto"):
        run = tmp_path / "runs" / f"hp-cpu-{kernels}"
        cfg = tomllib.loads((run / "config.toml").read_text())
        assert cfg["run"]["kernels"] == kernels and cfg["model"]["expert_kind"] == "gelu"
        measured, simulated = simulate_run(run)
        assert set(measured["rank"]) == set(simulated["rank"]) == {0, 1}
