"""The device benchmark (benchmarks/runtime.py) end to end on gloo with 4 ranks, as the
4- and 8-GPU calls will run it: every strategy finishes, each run directory is written with the
collective latency its own sweep measured, and `moesim validate` replays it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from moesim.sim.replay import simulate_run

ROOT = Path(__file__).resolve().parents[2]


def test_device_script_runs_on_4_ranks_and_its_runs_validate(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "4", str(ROOT / "benchmarks" / "runtime.py"), "--out", str(tmp_path), "--cpu",
           "--steps", "2", "--warmup", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    names = {r["name"] for r in summary["layers"]}
    assert names == {f"{s}-k2-{r}" for s in ("ep", "hp", "fsep") for r in ("uniform", "zipf")}
    assert summary["meta"]["world"] == 4
    for name in ("ep-k2-zipf", "hp-k2-zipf", "fsep-k2-zipf"):
        run = tmp_path / "runs" / name
        cfg = tomllib.loads((run / "config.toml").read_text())
        assert cfg["cluster"]["gpus_per_node"] == 4 and cfg["cluster"]["collective_latency_us"] > 0
        if name.startswith("fsep"):  # the weight schedule the runtime ran, for the replay
            assert cfg["parallel"]["fsep_chunks"] == 1
            assert cfg["parallel"]["fsep_backward_gather"] is True  # freed, gathered again
        measured, simulated = simulate_run(run)
        assert set(measured["rank"]) == set(simulated["rank"]) == {0, 1, 2, 3}
