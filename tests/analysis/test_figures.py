"""Each figure module: the table it plots, checked by hand, and a figure that renders."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from result_factory import meta_for, result_frame

from analysis import breakdown, comm, imbalance, planner_perf, scaling, validation
from analysis.figure_files import save_figure
from analysis.inputs import ResultFile
from moesim.errors import InputError


def _rf(df, name, meta=None):
    return ResultFile(Path(f"{name}.parquet"), df, meta or {})


def _summary(rows):
    return pd.DataFrame(rows)


def test_scaling_table_averages_repeats_and_divides_by_ep():
    s = _summary([
        {"strategy": "ep", "num_gpus": 8, "throughput_tok_s": 100.0},
        {"strategy": "ep", "num_gpus": 8, "throughput_tok_s": 120.0},
        {"strategy": "hp", "num_gpus": 8, "throughput_tok_s": 165.0},
        {"strategy": "hp", "num_gpus": 16, "throughput_tok_s": 300.0},
    ])
    t = scaling.scaling_table(s).set_index(["strategy", "num_gpus"])
    assert t.loc[("ep", 8), "throughput_tok_s"] == 110.0
    assert t.loc[("hp", 8), "speedup_vs_ep"] == pytest.approx(1.5)
    assert np.isnan(t.loc[("hp", 16), "speedup_vs_ep"])  # no EP run at 16 GPUs
    scaling.plot_scaling(s).savefig(Path("/dev/null"), format="png")


def test_scaling_missing_column_names_it():
    with pytest.raises(InputError, match="throughput_tok_s"):
        scaling.scaling_table(pd.DataFrame({"strategy": ["ep"], "num_gpus": [8]}), "x.csv")


def test_comm_table():
    s = _summary([
        {"strategy": "ep", "top_k": 2, "comm_bytes_per_gpu": 2.0, "comm_time_s": 1.0},
        {"strategy": "ep", "top_k": 2, "comm_bytes_per_gpu": 4.0, "comm_time_s": 3.0},
        {"strategy": "hp", "top_k": 2, "comm_bytes_per_gpu": 1.0, "comm_time_s": 1.0},
    ])
    t = comm.comm_table(s).set_index(["strategy", "top_k"])
    assert t.loc[("ep", 2), "comm_bytes_per_gpu"] == 3.0
    assert t.loc[("ep", 2), "comm_time_s"] == 2.0


def test_breakdown_tables_by_hand():
    files = [_rf(result_frame("ep", layers=2), "ep"), _rf(result_frame("hp", layers=2), "hp"),
             _rf(result_frame("ep", layers=2, source="real", time_scale=1.1), "ep_real")]
    phases, steps = breakdown.breakdown_tables(files)
    assert list(steps["bar"]) == ["EP (sim)", "EP (real)", "HP (sim)"]
    ep = phases[phases["bar"] == "EP (sim)"].set_index("phase")
    assert ep.loc["expert", "time_s"] == pytest.approx(2 * 2 * 1e-3)
    assert ep.loc["dispatch", "stream"] == "comm"
    # back-to-back phases: the stack equals the step time
    assert ep["time_s"].sum() == pytest.approx(steps.set_index("bar").loc["EP (sim)",
                                                                          "step_time_s"])


def test_imbalance_panels_from_results_and_placements():
    loads = np.array([[[130, 90, 90, 90]], [[100, 100, 100, 100]]])  # [step, layer, rank]
    df = result_frame("ep", ranks=4, steps=2, layers=1, loads=loads)
    (panel,) = imbalance.panels_from_results([_rf(df, "ep")])
    np.testing.assert_array_equal(panel.loads, loads)
    assert panel.imbalance == pytest.approx(0.15)  # (0.3 + 0) / 2
    t = imbalance.imbalance_table([panel])
    np.testing.assert_allclose(t["imbalance"], [0.3, 0.0])
    # placement: expert 0 split 50/50 over ranks 0 and 1; expert 1 on rank 1
    got = imbalance.placement_rank_loads(np.array([100, 40]), np.array([0, 0, 1]),
                                         np.array([0, 1, 1]), np.array([0.5, 0.5, 1.0]), 3)
    np.testing.assert_allclose(got, [50, 90, 0])
    with pytest.raises(InputError, match="layer"):
        imbalance.plot_imbalance([panel], layer=3)


def test_validation_pairs_sources_and_scores():
    sim = result_frame("ep", layers=1)
    real = result_frame("ep", layers=1, source="real", time_scale=1.25)
    comp = validation.comparison_from_results([_rf(sim, "s"), _rf(real, "r")])
    step = comp[comp["phase"] == "step"].iloc[0]
    assert step["simulated_s"] / step["measured_s"] == pytest.approx(0.8)
    stats = validation.error_stats(comp)
    assert stats["step_mape"] == pytest.approx(0.2)
    assert stats["phase_mape"] == pytest.approx(0.2)
    with pytest.raises(InputError, match="source"):
        validation.comparison_from_results([_rf(sim, "s")])


def test_planner_solve_time_table():
    stats = pd.DataFrame({"solver": ["highs"] * 3 + ["greedy"], "num_experts": [64, 64, 64, 64],
                          "solve_time_s": [1.0, 3.0, 2.0, 0.01]})
    t = planner_perf.solve_time_table(stats).set_index("solver")
    assert t.loc["highs", "median_s"] == 2.0
    assert (t.loc["highs", "min_s"], t.loc["highs", "max_s"]) == (1.0, 3.0)
    assert t.loc["highs", "runs"] == 3


def test_save_figure_is_deterministic(tmp_path):
    files = [_rf(result_frame(s), s, meta_for(s)) for s in ("ep", "hp", "fsep")]
    a = save_figure(breakdown.plot_breakdown(files), tmp_path / "a", "b")
    b = save_figure(breakdown.plot_breakdown(files), tmp_path / "b", "b")
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
    assert not list((tmp_path / "a").glob(".*.tmp"))  # atomic: no temporaries left


def test_imbalance_panels_from_trace_use_planner_placements():
    from moesim.config import config_from_dict
    from traces.generators import TraceSpec, generate

    trace = generate(TraceSpec(kind="zipf", steps=3, layers=2, shards=8, experts=8, top_k=2,
                               tokens_per_shard=16384, params={"exponent": 1.0}))
    cfg = config_from_dict({"model": {"num_experts": 8, "top_k": 2, "num_layers": 2},
                            "planner": {"solver": "laer", "slots_per_rank": 4,
                                        "ep_hot_replicas": 2}})
    ep, hot, fsep = imbalance.panels_from_trace(trace, cfg, 4)
    # EP on 4 ranks: rank r holds experts 2r and 2r+1
    load = trace.expert_load()[:, :, 0, :]  # [S, L, E]
    np.testing.assert_array_equal(ep.loads, load.reshape(3, 2, 4, 2).sum(axis=-1))
    for p in (hot, fsep):  # tokens are conserved by every placement
        np.testing.assert_allclose(p.loads.sum(axis=-1), ep.loads.sum(axis=-1))
    assert fsep.imbalance < hot.imbalance < ep.imbalance
