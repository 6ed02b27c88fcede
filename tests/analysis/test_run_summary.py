"""The numbers the figures plot, against hand computation on small Result tables."""

import numpy as np
import pandas as pd
import pytest
from result_factory import DEFAULT_PROGRAM, meta_for, result_frame

from analysis.inputs import ResultFile, meta_param
from analysis.run_summary import load_imbalance, phase_times, rank_loads, step_times, summarize


def _file(df, meta, name="run"):
    from pathlib import Path
    return ResultFile(Path(f"{name}.parquet"), df, meta)


def test_step_time_is_latest_end_per_step():
    df = result_frame("ep", ranks=4, steps=2, layers=3)
    per_layer_pass = sum(d for _, _, d, _ in DEFAULT_PROGRAM["ep"])
    st = step_times(df)
    assert list(st["step"]) == [0, 1]
    np.testing.assert_allclose(st["step_time_s"], 2 * 3 * per_layer_pass)


def test_step_time_takes_the_slowest_rank():
    df = result_frame("ep", ranks=2, steps=1, layers=1)
    df.loc[(df["rank"] == 1) & (df["phase"] == "combine") & (df["pass"] == "bwd"), "end_s"] += 0.5
    assert step_times(df)["step_time_s"].iloc[0] == pytest.approx(df["end_s"].max())


def test_phase_times_mean_over_ranks_and_steps_sum_over_layers_and_passes():
    df = result_frame("ep", ranks=4, steps=2, layers=3)
    # Drop the expert rows of rank 3: its expert time is 0, so the mean over 4 ranks is 3/4.
    df = df[~((df["rank"] == 3) & (df["phase"] == "expert"))]
    pt = phase_times(df).set_index("phase")["time_s"]
    assert pt["dispatch"] == pytest.approx(2 * 3 * 4e-4)
    assert pt["expert"] == pytest.approx(2 * 3 * 1e-3 * 3 / 4)


def test_rank_loads_and_imbalance():
    loads = np.array([[[100, 100, 100, 100], [130, 90, 90, 90]]])  # [step, layer, rank]
    df = result_frame("ep", ranks=4, steps=1, layers=2, loads=loads)
    rl = rank_loads(df)
    assert list(rl[rl["layer"] == 1]["tokens"]) == [130, 90, 90, 90]
    # layer 0 balanced: 0; layer 1: 130 / 100 - 1 = 0.3
    np.testing.assert_allclose(load_imbalance(loads[0]), [0.0, 0.3])
    assert load_imbalance(np.zeros(4)) == 0.0


def test_summarize_by_hand():
    ranks, layers, steps = 4, 2, 3
    loads = np.tile(np.array([120, 80, 100, 100]), (steps, layers, 1))
    df = result_frame("ep", ranks=ranks, steps=steps, layers=layers, loads=loads)
    row = summarize(_file(df, meta_for("ep", top_k=4, tokens_per_rank=1024))).iloc[0]
    per_layer_pass = sum(d for _, _, d, _ in DEFAULT_PROGRAM["ep"])
    step = 2 * layers * per_layer_pass
    assert row["num_gpus"] == ranks and row["steps"] == steps
    assert row["step_time_s"] == pytest.approx(step)
    assert row["tokens_per_step"] == 1024 * ranks
    assert row["throughput_tok_s"] == pytest.approx(1024 * ranks / step)
    # dispatch and combine: 8 MiB each per (layer, pass)
    assert row["comm_bytes_per_gpu"] == pytest.approx(2 * layers * 2 * (8 << 20))
    assert row["comm_time_s"] == pytest.approx(2 * layers * 8e-4)
    assert row["imbalance"] == pytest.approx(0.2)
    # loads 120, 80, 100, 100: std = sqrt((400 + 400) / 4) = 14.14, mean 100
    assert row["imbalance_cv"] == pytest.approx(np.sqrt(200) / 100)
    assert row["top_k"] == 4 and row["model"] == "test-moe"


def test_tokens_per_step_falls_back_to_router_tokens():
    df = result_frame("hp", ranks=2, steps=1, layers=2, tokens_per_rank=300)
    row = summarize(_file(df, {})).iloc[0]
    assert row["tokens_per_step"] == 600
    assert pd.isna(row["top_k"])


def test_meta_param_lookup_order():
    assert meta_param({"config": {"model": {"top_k": 2}}, "top_k": 9}, "model.top_k") == 2
    assert meta_param({"model": {"top_k": 3}}, "model.top_k") == 3
    assert meta_param({"top_k": 4}, "model.top_k") == 4
    assert meta_param({}, "model.top_k") is None
