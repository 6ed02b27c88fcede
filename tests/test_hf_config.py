"""Hugging Face config.json import: the anchors' shapes, the other families' published parameter
counts, TOML overrides, and one-line errors naming the file and the field."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moesim.config import config_from_dict, config_to_dict, load_config, with_overrides
from moesim.errors import InputError
from moesim.hf_config import IMPORTED_FIELDS, model_fields, read_hf_config

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "configs" / "models"
ANCHORS = Path("/work/shared/anchors/laer-moe-ae")

# ../shared/anchors/README.md: the LAER-MoE models (layers as in the JSON; the run script
# overrides them), GQA with 8 KV heads, vocab 32000.
ANCHOR_SHAPES = {
    "mixtral-8x7b-e8k2": (32, 4096, 14336, 8, 2),
    "mixtral-8x7b-e16k4": (32, 4096, 7168, 16, 4),
    "mixtral-8x22b-e8k2": (56, 6144, 16384, 8, 2),
    "mixtral-8x22b-e16k4": (56, 6144, 8192, 16, 4),
    "qwen-8x7b-e8k2": (32, 4096, 14336, 8, 2),
    "qwen-8x7b-e16k4": (32, 4096, 7168, 16, 4),
}


@pytest.mark.parametrize("name", sorted(ANCHOR_SHAPES))
def test_anchor_jsons_give_the_readme_shapes(name):
    m = config_from_dict({"model": {"hf_config": str(MODELS / f"{name}.json")}}).model
    layers, d, ffn, experts, k = ANCHOR_SHAPES[name]
    assert (m.num_layers, m.d_model, m.d_ffn, m.num_experts, m.top_k) == (layers, d, ffn,
                                                                          experts, k)
    assert m.num_kv_heads == 8 and m.attn_heads == d // 128 and m.qk_head_dim == 128
    assert m.vocab_size == 32000 and m.num_moe_layers == layers and not m.tie_embeddings
    assert m.name == name and m.attention == "gqa"


def test_copies_equal_the_anchor_files():
    if not ANCHORS.is_dir():
        pytest.skip("the shared anchors are not mounted on this machine")
    for name in ANCHOR_SHAPES:
        assert (MODELS / f"{name}.json").read_bytes() == (ANCHORS / f"{name}.json").read_bytes()


# Published totals / active parameters (billions) and a tolerance: Mixtral 46.7B / 12.9B,
# Mixtral-8x22B 141B / 39B (mistral.ai), DeepSeek-V3 671B / 37B (arXiv 2412.19437, without the
# MTP module), Qwen1.5-MoE-A2.7B 14.3B / 2.7B and Qwen3-30B-A3B 30.5B / 3.3B (model cards),
# OLMoE 6.9B / 1.3B (arXiv 2409.02060), DeepSeek-V2-Lite 15.7B (model card).
PUBLISHED = {
    "mixtral-8x7b-e8k2": (46.7, 12.9), "mixtral-8x22b-e8k2": (141, 39),
    "deepseek-v3": (671, 37), "qwen1.5-moe-a2.7b": (14.3, 2.7), "qwen3-30b-a3b": (30.5, 3.3),
    "olmoe-1b-7b": (6.9, 1.3), "deepseek-v2-lite": (15.7, None),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_the_published_ones(name):
    m = config_from_dict({"model": {"hf_config": str(MODELS / f"{name}.json")}}).model
    total, active = PUBLISHED[name]
    assert m.total_params / 1e9 == pytest.approx(total, rel=0.01)
    if active is not None:  # published figures round to two digits: 4% covers 37 of 37.5
        assert m.active_params / 1e9 == pytest.approx(active, rel=0.04)


def test_families_map_their_fields():
    v3 = read_hf_config(MODELS / "deepseek-v3.json")
    assert v3["dense_layers"] == [0, 1, 2] and v3["d_ffn_dense"] == 18432
    assert (v3["attention"], v3["attn_head_dim"], v3["v_head_dim"], v3["qk_rope_head_dim"],
            v3["q_lora_rank"], v3["kv_lora_rank"]) == ("mla", 192, 128, 64, 1536, 512)
    assert v3["router"] == "sigmoid" and v3["shared_experts"] == 1 and v3["d_ffn_shared"] == 2048
    lite = read_hf_config(MODELS / "deepseek-v2-lite.json")
    assert lite["q_lora_rank"] == 0 and lite["router"] == "softmax" and lite["dense_layers"] == [0]
    q2 = read_hf_config(MODELS / "qwen1.5-moe-a2.7b.json")
    assert q2["qkv_bias"] and q2["shared_experts"] == 1 and q2["d_ffn_shared"] == 5632
    assert q2["dense_layers"] == [] and q2["d_ffn"] == 1408
    q3 = read_hf_config(MODELS / "qwen3-30b-a3b.json")
    assert q3["qk_norm"] and not q3["qkv_bias"] and q3["attn_head_dim"] == 128
    assert q3["kv_heads"] == 4
    ol = read_hf_config(MODELS / "olmoe-1b-7b.json")
    assert ol["qk_norm"] and ol["d_ffn"] == 1024 and ol["num_experts"] == 64
    assert set(v3) == set(IMPORTED_FIELDS)


def test_layer_patterns():
    # Qwen: MoE where (i + 1) % decoder_sparse_step == 0 and i not in mlp_only_layers.
    base = {"model_type": "qwen2_moe", "hidden_size": 64, "intermediate_size": 128,
            "moe_intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
            "num_experts": 8, "num_experts_per_tok": 2, "vocab_size": 100}
    assert model_fields({**base, "decoder_sparse_step": 2})["dense_layers"] == [0, 2, 4]
    assert model_fields({**base, "mlp_only_layers": [5]})["dense_layers"] == [5]
    # DeepSeek: MoE where i >= first_k_dense_replace and i % moe_layer_freq == 0.
    ds = {"model_type": "deepseek_v2", "hidden_size": 64, "intermediate_size": 128,
          "moe_intermediate_size": 32, "num_hidden_layers": 6, "num_attention_heads": 4,
          "n_routed_experts": 8, "num_experts_per_tok": 2, "vocab_size": 100,
          "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
          "first_k_dense_replace": 1, "moe_layer_freq": 2}
    assert model_fields(ds)["dense_layers"] == [0, 1, 3, 5]


def test_toml_fields_win_and_paths_are_relative_to_the_config(tmp_path):
    (tmp_path / "m").mkdir()
    shutil.copy(MODELS / "qwen-8x7b-e8k2.json", tmp_path / "m" / "q.json")
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nhf_config = "m/q.json"\nnum_layers = 32\nqkv_bias = true\n'
                    'seq_len = 8192\nname = "qwen-8x7b"\n')
    m = load_config(toml).model
    assert m.num_layers == 32 and m.qkv_bias and m.seq_len == 8192 and m.name == "qwen-8x7b"
    assert m.d_ffn == 14336 and Path(m.hf_config) == tmp_path / "m" / "q.json"
    # Written back and read again with the JSON gone: every field is in the table.
    cfg = load_config(toml)
    (tmp_path / "m" / "q.json").unlink()
    assert config_from_dict(config_to_dict(cfg), "elsewhere").model == m
    assert with_overrides(cfg, {"model.top_k": 1}).model.top_k == 1


def test_defaults_keep_old_configs_meaning():
    cfg = load_config(ROOT / "configs" / "dgx-h200-4node.toml")
    m = cfg.model
    assert m.num_moe_layers == m.num_layers == 8 and m.moe_layer_ids == tuple(range(8))
    assert m.num_kv_heads == m.attn_heads == 16 and m.qk_head_dim == 128 and m.hf_config == ""
    assert m.mlp_matrices == 3 and m.expert_params == 3 * 2048 * 1408


@pytest.mark.parametrize("raw, field, words", [
    ({"hidden_size": 8}, "model_type", "no expert field"),
    ({"model_type": "llama"}, "model_type", "not an MoE family"),
    ({"model_type": "mixtral", "hidden_size": 64}, "num_hidden_layers", "missing"),
    ({"model_type": "mixtral", "num_hidden_layers": 2, "num_attention_heads": 4,
      "hidden_size": -64}, "hidden_size", "below the minimum"),
    ({"model_type": "mixtral", "num_hidden_layers": 2.5}, "num_hidden_layers",
     "expected an integer"),
    ({"model_type": "mixtral", "num_hidden_layers": 2, "num_attention_heads": 4,
      "hidden_size": 64, "num_experts_per_tok": 4, "vocab_size": 10,
      "intermediate_size": 8, "num_local_experts": 2}, "num_experts_per_tok", "exceeds"),
    ({"model_type": "mixtral", "num_hidden_layers": 2, "num_attention_heads": 4,
      "hidden_size": 64, "num_experts_per_tok": 1, "vocab_size": 10,
      "intermediate_size": 8, "num_local_experts": 2, "tie_word_embeddings": "no"},
     "tie_word_embeddings", "expected true or false"),
])
def test_bad_fields_name_file_and_field(tmp_path, raw, field, words):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(raw))
    with pytest.raises(InputError) as e:
        read_hf_config(p)
    assert str(e.value).startswith(f"{p}: {field}: ") and words in str(e.value)
    assert "\n" not in str(e.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        read_hf_config(tmp_path / "none.json")
    (tmp_path / "x.json").write_text("{nope")
    with pytest.raises(InputError, match="not valid JSON"):
        read_hf_config(tmp_path / "x.json")
    toml = tmp_path / "c.toml"
    toml.write_text('[model]\nhf_config = "none.json"\n')
    with pytest.raises(InputError) as e:
        load_config(toml)
    assert str(e.value).startswith(str(tmp_path / "none.json"))


@pytest.mark.parametrize("model, field, words", [
    ({"dense_layers": [8]}, "model.dense_layers", "not a layer index"),
    ({"dense_layers": [1, 1], "d_ffn_dense": 64}, "model.dense_layers", "twice"),
    ({"num_layers": 2, "dense_layers": [0, 1], "d_ffn_dense": 64}, "model.dense_layers",
     "every layer is dense"),
    ({"dense_layers": [0]}, "model.d_ffn_dense", "must be > 0"),
    ({"attn_heads": 16, "kv_heads": 3}, "model.kv_heads", "must divide"),
    ({"attn_heads": 24}, "model.attn_heads", "must divide d_model"),
    ({"attention": "mla"}, "model.kv_lora_rank", "must be > 0"),
    ({"attention": "mla", "kv_lora_rank": 64, "attn_head_dim": 64, "qk_rope_head_dim": 64},
     "model.qk_rope_head_dim", "below attn_head_dim"),
    ({"kv_lora_rank": 64}, "model.kv_lora_rank", "MLA field"),
])
def test_model_checks(model, field, words):
    with pytest.raises(InputError) as e:
        config_from_dict({"model": model}, "c.toml")
    assert f"c.toml: {field}: " in str(e.value) and words in str(e.value)


def test_attention_widths():
    m = config_from_dict({"model": {"d_model": 2048, "attn_heads": 24, "attn_head_dim": 96,
                                    "kv_heads": 8, "qkv_bias": True}}).model
    # q 24 x 96, k and v 8 x 96 each, their biases, out 24 x 96 -> 2048.
    assert m.attention_params == 2048 * (24 + 16) * 96 + (24 + 16) * 96 + 24 * 96 * 2048
