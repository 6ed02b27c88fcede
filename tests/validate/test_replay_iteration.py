"""`moesim validate` on a run that timed its whole step (attention, norms, LM head, loss,
optimizer besides the MoE layers) replays whole iterations: measured times that are the
simulator's own scaled by a known factor come back with exactly that error on every phase."""

from __future__ import annotations

import pandas as pd
import pytest

from analysis.validation import compare
from moesim.config import load_config
from moesim.results import write_results
from moesim.sim.iteration import IterationSimulator
from moesim.sim.replay import _as_trained, simulate_run
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
seq_len = 256
vocab_size = 1024
[cluster]
preset = "h200x2"
nodes = 1
gpus_per_node = 2
[parallel]
strategy = "{strategy}"
[run]
steps = 2
tokens_per_rank = 512
"""


@pytest.mark.parametrize("strategy", ["ep", "fsep"])
def test_whole_step_run_is_replayed_as_iterations(tmp_path, strategy):
    run = tmp_path / strategy
    run.mkdir()
    (run / "config.toml").write_text(CONFIG.format(strategy=strategy))
    write_trace(generate(TraceSpec(kind="zipf", steps=2, layers=2, shards=2, experts=8,
                                   top_k=2, tokens_per_shard=512)), run / "trace.parquet")
    cfg = _as_trained(load_config(run / "config.toml"), "config")
    assert (cfg.train.scope, cfg.train.micro_batch_size, cfg.train.precision) == \
        ("iteration", 2, "pure")
    sim = IterationSimulator(cfg, read_trace(run / "trace.parquet"), "trace")
    frame = pd.concat([sim.simulate_iteration(strategy, s).frame for s in (0, 1)])
    scale = 0.8
    write_results(frame.assign(source="real", start_s=frame["start_s"] * scale,
                               end_s=frame["end_s"] * scale), run / "results.parquet")
    measured, simulated = simulate_run(run)
    assert {"attention", "optimizer", "lm_head", "expert"} <= set(simulated["phase"])
    comp = compare(measured, simulated, run)
    timed = comp[comp["measured_s"] > 0]
    assert {"step", "attention", "qkv", "loss", "optimizer", "dispatch"} <= set(timed["phase"])
    assert timed["rel_error"].to_numpy() == pytest.approx(1 / scale - 1, abs=1e-9)
