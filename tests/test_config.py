"""Config loading: every rule gives one error naming the file, the field and what is allowed."""

from __future__ import annotations

import pytest

from moesim.config import Config, load_config, parse_override, with_overrides
from moesim.errors import InputError


def write(tmp_path, text: str):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_and_values(tmp_path):
    cfg = load_config(write(tmp_path, "[model]\ntop_k = 2\n[cluster]\nnodes = 4\n"))
    assert cfg.model.top_k == 2 and cfg.cluster.num_gpus == 32 and cfg.num_ranks == 32
    assert cfg.model.latent_dim == cfg.model.d_model
    hp = load_config(write(tmp_path, "[model]\nnum_heads = 4\nhead_dim = 128\n"))
    assert hp.model.latent_dim == 512 and hp.model.expert_dim == 128
    assert hp.model.total_experts == 4 * hp.model.num_experts


@pytest.mark.parametrize("text, field, words", [
    ("[model]\ntop_k = 'x'\n", "model.top_k", "expected int"),
    ("[model]\ntop_k = 0\n", "model.top_k", "below the minimum 1"),
    ("[model]\ntop_k = 99\n", "model.top_k", "exceeds num_experts"),
    ("[model]\ndtype = 'int4'\n", "model.dtype", "not one of bf16, fp16, fp32, fp8"),
    ("[model]\ntopk = 2\n", "model.topk", "unknown field; allowed: name"),
    ("[modle]\n", "modle", "unknown section"),
    ("[parallel]\nstrategy = 'tp'\n", "parallel.strategy", "not one of ep, hp, fsep"),
    ("[model]\nnum_heads = 4\n", "model.head_dim", "must be > 0"),
    ("[planner]\nmip_gap = 2.0\n", "planner.mip_gap", "above the maximum"),
    ("[run]\nsteps = true\n", "run.steps", "expected int"),
    ("model = 3\n", "model", "must be a table"),
    ("[model\n", "toml", "not valid TOML"),
])
def test_errors_name_file_field_and_allowed(tmp_path, text, field, words):
    with pytest.raises(InputError) as e:
        load_config(write(tmp_path, text))
    msg = str(e.value)
    assert msg.startswith(str(tmp_path / "c.toml")) and f": {field}: " in msg and words in msg


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_config(tmp_path / "none.toml")


def test_overrides_are_validated():
    cfg = with_overrides(Config(), dict([parse_override("model.top_k=2")]))
    assert cfg.model.top_k == 2
    with pytest.raises(InputError, match=r"model\.top_k"):
        with_overrides(cfg, {"model.top_k": -1})
    with pytest.raises(InputError, match="no such config field"):
        with_overrides(cfg, {"model.nope": 1})


def test_gelu_experts_have_two_matrices():
    from moesim.config import ModelConfig
    sw = ModelConfig(d_model=256, d_ffn=512, num_heads=4, head_dim=64, num_experts=16, top_k=4)
    ge = ModelConfig(d_model=256, d_ffn=512, num_heads=4, head_dim=64, num_experts=16, top_k=4,
                     expert_kind="gelu")
    assert sw.expert_params == 3 * 64 * 512 and sw.up_width == 1024
    assert ge.expert_params == 2 * 64 * 512 and ge.up_width == 512
    assert ge.expert_flops(10) == 2.0 * 10 * 2 * 64 * 512
