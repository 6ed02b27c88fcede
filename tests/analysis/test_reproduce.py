"""analysis.reproduce: arms are valid configs, and the doc's tables come from the result files
(here synthetic Result tables standing in for the simulator's)."""

import tomllib

import numpy as np
import pandas as pd
import pytest
from result_factory import result_frame

from analysis import reproduce as R
from moesim.config import config_from_dict
from moesim.results import write_results


def test_every_arm_is_a_valid_config_and_round_trips_through_toml():
    for study, make in R.STUDIES.items():
        for arm in make():
            assert arm.study == study
            config_from_dict(arm.config, arm.key)
            assert tomllib.loads(R.to_toml(arm.config)) == {k: v for k, v in arm.config.items()
                                                            if v}


def test_hp_arms_match_parameters_and_flops():
    arms = {a.name: config_from_dict(a.config, a.key).model for a in R.hp_arms()}
    for size in R.HP_SIZES:
        ep, hp, hp2 = arms[f"{size}-ep"], arms[f"{size}-hp"], arms[f"{size}-hp2x"]
        for m in (hp, hp2):  # same expert parameters per layer
            assert m.total_experts * m.expert_params == ep.total_experts * ep.expert_params
            # same expert FLOPs per token: heads x top-k x expert size
            assert m.num_heads * m.top_k * m.expert_params == ep.top_k * ep.expert_params
        assert hp.latent_dim == ep.d_model


def _fake_results(out, arms, step_scale, loads_for):
    for arm in arms:
        cfg = config_from_dict(arm.config, arm.key)
        n = cfg.num_ranks
        df = result_frame(arm.strategy, ranks=n, steps=3, layers=2,
                          time_scale=step_scale[arm.name], loads=loads_for(arm.name, n))
        write_results(df, out / "results" / f"{arm.key}.parquet",
                      {"config": {"model": {"top_k": cfg.model.top_k, "name": cfg.model.name},
                                  "run": {"tokens_per_rank": 1024}}})


def test_render_only_fills_tables_from_results(tmp_path, monkeypatch):
    out, figs, doc = tmp_path / "repro", tmp_path / "figs", tmp_path / "reproduction.md"
    arms = R.fsep_arms()
    scale = {"ep": 1.5, "ep-hot": 1.25, "fsep": 1.0}
    ep_loads = np.array([130, 70, 100, 100, 100, 100, 100, 100])  # max/mean - 1 = 0.3

    def loads(name, n):
        row = ep_loads if name != "fsep" else np.full(n, 100)
        return np.tile(row, (3, 2, 1))
    _fake_results(out, arms, scale, loads)
    code = R.main(["--render-only", "--studies", "fsep", "--out", str(out), "--figures",
                   str(figs), "--doc", str(doc)])
    assert code == 0
    head = pd.read_csv(out / "headline.csv").set_index("claim")
    # same program per arm, scaled: the speed-up is the ratio of the scales
    assert head.loc["FSEP vs baseline speed-up", "sim_value"] == pytest.approx(1.5)
    text = doc.read_text()
    assert "1.50x vs EP, 1.25x vs EP + hot replicas" in text
    assert "max/mean - 1: 30% -> 0%" in text
    assert (figs / "imbalance_heatmap.png").exists() and (figs / "breakdown_fsep.pdf").exists()
    s = pd.read_csv(out / "summary.csv")
    assert list(s["arm"]) == ["ep", "ep-hot", "fsep"]


def test_render_only_without_results_is_a_clean_error(tmp_path, capsys):
    assert R.main(["--render-only", "--studies", "fsep", "--out", str(tmp_path)]) == 2
    assert "no result for this arm" in capsys.readouterr().err
