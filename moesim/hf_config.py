"""Model shapes from a Hugging Face `config.json`, as ModelConfig fields (no torch, no
transformers: the JSON is read as the transformers config classes define its fields).

Families, chosen by `model_type`, else by the fields present (the LAER-MoE artifact's JSONs
have no model_type and Mixtral's field names):
- mixtral (`num_local_experts`): every layer MoE, expert width `intermediate_size`.
- qwen2_moe (Qwen1.5-MoE, Qwen2-MoE; `shared_expert_intermediate_size`): experts of
  `moe_intermediate_size`, one shared expert of `shared_expert_intermediate_size`, biases on
  Q, K and V (Qwen2's attention always has them), dense layers where `mlp_only_layers` or
  `decoder_sparse_step` say (layer i is MoE when i is not in mlp_only_layers and
  (i + 1) % decoder_sparse_step == 0), of `intermediate_size`.
- qwen3_moe: as qwen2_moe without the shared expert, with `head_dim`, `attention_bias` and
  the per-head query/key RMSNorm.
- deepseek_v2, deepseek_v3 (`n_routed_experts`): `n_shared_experts` shared experts of
  `moe_intermediate_size`, the first `first_k_dense_replace` layers (and those off
  `moe_layer_freq`) dense of `intermediate_size`, multi-head latent attention (`q_lora_rank`,
  null for V2-Lite; `kv_lora_rank`, `qk_nope_head_dim` + `qk_rope_head_dim`, `v_head_dim`),
  `scoring_func` sigmoid (V3) or softmax (V2) as the router.
- olmoe (`num_experts` alone): every layer MoE, expert width `intermediate_size`, query/key
  RMSNorm.
Common: `num_hidden_layers`, `hidden_size`, `num_attention_heads`, `num_key_value_heads`
(default: the query heads), `head_dim` (when given), `vocab_size`, `tie_word_embeddings`
(default false, as in every family above). `max_position_embeddings` is not the training
sequence: `model.seq_len` stays the config's.

Not imported (the simulator does not model them): DeepSeek-V3's multi-token-prediction layers
(`num_nextn_predict_layers`), the group-limited routing (`n_group`, `topk_group`: the trace
says which experts are chosen), Qwen2-MoE's shared-expert gate (d_model weights a layer),
sliding windows, RoPE scaling, dropout and aux-loss coefficients.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moesim.errors import InputError

FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe")

# Every ModelConfig field an import may set: a TOML that sets them all never reads the JSON.
IMPORTED_FIELDS = ("name", "num_layers", "dense_layers", "d_model", "d_ffn", "d_ffn_dense",
                   "shared_experts", "d_ffn_shared", "num_experts", "top_k", "router",
                   "vocab_size", "attention", "attn_heads", "kv_heads", "attn_head_dim",
                   "v_head_dim", "q_lora_rank", "kv_lora_rank", "qk_rope_head_dim",
                   "qkv_bias", "qk_norm", "norm", "tie_embeddings")


class _Fields:
    """Typed access to the JSON's fields; a bad one is an InputError naming file and field."""

    def __init__(self, raw: dict, source: str) -> None:
        self.raw, self.source = raw, source

    def int(self, key: str, default: int | None = None, lo: int = 1) -> int:
        if key not in self.raw or self.raw[key] is None:
            if default is None:
                raise InputError(self.source, key, "missing (needed for the model shape)")
            return default
        v = self.raw[key]
        if isinstance(v, bool) or not isinstance(v, int):
            raise InputError(self.source, key, f"expected an integer, got {v!r}")
        if v < lo:
            raise InputError(self.source, key, f"{v} is below the minimum {lo}")
        return v

    def bool(self, key: str, default: bool) -> bool:
        v = self.raw.get(key, default)
        if not isinstance(v, bool):
            raise InputError(self.source, key, f"expected true or false, got {v!r}")
        return v

    def str(self, key: str, default: str) -> str:
        v = self.raw.get(key, default)
        if not isinstance(v, str):
            raise InputError(self.source, key, f"expected a string, got {v!r}")
        return v

    def int_list(self, key: str) -> list[int]:
        v = self.raw.get(key) or []
        if not isinstance(v, list) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in v):
            raise InputError(self.source, key, f"expected a list of layer indices, got {v!r}")
        return v


def family_of(raw: dict, source: str) -> str:
    """The family: `model_type` when given, else what the fields say."""
    mt = raw.get("model_type")
    if mt is not None:
        if mt not in FAMILIES:
            raise InputError(source, "model_type", f"{mt!r} is not an MoE family moesim "
                             f"imports; known: {', '.join(FAMILIES)}")
        return mt
    if "num_local_experts" in raw:
        return "mixtral"
    if "n_routed_experts" in raw:
        return "deepseek_v3" if raw.get("scoring_func") == "sigmoid" else "deepseek_v2"
    if "num_experts" in raw and "moe_intermediate_size" in raw:
        return "qwen2_moe" if "shared_expert_intermediate_size" in raw else "qwen3_moe"
    if "num_experts" in raw:
        return "olmoe"
    raise InputError(source, "model_type", "missing, and no expert field (num_local_experts, "
                     "n_routed_experts, num_experts) says which MoE family this is")


def model_fields(raw: dict, source: str = "<dict>", name: str = "") -> dict[str, Any]:
    """ModelConfig fields (IMPORTED_FIELDS) of a parsed config.json."""
    if not isinstance(raw, dict):
        raise InputError(source, "json", "expected a JSON object of config fields")
    fam = family_of(raw, source)
    f = _Fields(raw, source)
    layers = f.int("num_hidden_layers")
    heads = f.int("num_attention_heads")
    out: dict[str, Any] = {
        "name": name or fam, "num_layers": layers, "d_model": f.int("hidden_size"),
        "num_experts": 0, "top_k": f.int("num_experts_per_tok"),
        "vocab_size": f.int("vocab_size", lo=2), "attention": "gqa", "attn_heads": heads,
        "kv_heads": f.int("num_key_value_heads", heads), "attn_head_dim": f.int("head_dim", 0, 0),
        "v_head_dim": 0, "q_lora_rank": 0, "kv_lora_rank": 0, "qk_rope_head_dim": 0,
        "dense_layers": [], "d_ffn_dense": 0, "shared_experts": 0, "d_ffn_shared": 0,
        "router": "softmax", "qkv_bias": False, "qk_norm": False, "norm": "rmsnorm",
        "tie_embeddings": f.bool("tie_word_embeddings", False),
    }
    if fam in ("mixtral", "olmoe"):
        key = "num_local_experts" if fam == "mixtral" else "num_experts"
        out |= {"d_ffn": f.int("intermediate_size"), "num_experts": f.int(key)}
        if fam == "olmoe":
            out |= {"qk_norm": True, "qkv_bias": f.bool("attention_bias", False)}
    elif fam in ("qwen2_moe", "qwen3_moe"):
        step = f.int("decoder_sparse_step", 1)
        only = f.int_list("mlp_only_layers")
        dense = sorted({i for i in range(layers) if i in only or (i + 1) % step})
        out |= {"d_ffn": f.int("moe_intermediate_size"), "num_experts": f.int("num_experts"),
                "dense_layers": dense,
                "d_ffn_dense": f.int("intermediate_size") if dense else 0}
        if fam == "qwen2_moe":
            shared = f.int("shared_expert_intermediate_size", 0, 0)
            out |= {"qkv_bias": True, "shared_experts": 1 if shared else 0,
                    "d_ffn_shared": shared}
        else:
            out |= {"qkv_bias": f.bool("attention_bias", False), "qk_norm": True}
    else:  # deepseek_v2 / v3
        first = f.int("first_k_dense_replace", 0, 0)
        freq = f.int("moe_layer_freq", 1)
        dense = [i for i in range(layers) if i < first or i % freq]
        nope, rope = f.int("qk_nope_head_dim"), f.int("qk_rope_head_dim")
        if f.bool("attention_bias", False):
            raise InputError(source, "attention_bias", "MLA with biases is not modelled")
        scoring = f.str("scoring_func", "softmax")
        if scoring not in ("softmax", "sigmoid"):
            raise InputError(source, "scoring_func", f"{scoring!r}: expected softmax or sigmoid")
        ffn = f.int("moe_intermediate_size")
        out |= {"d_ffn": ffn, "num_experts": f.int("n_routed_experts"),
                "dense_layers": dense,
                "d_ffn_dense": f.int("intermediate_size") if dense else 0,
                "shared_experts": f.int("n_shared_experts", 0, 0), "d_ffn_shared": ffn,
                "attention": "mla", "kv_heads": 0, "attn_head_dim": nope + rope,
                "v_head_dim": f.int("v_head_dim"), "q_lora_rank": f.int("q_lora_rank", 0, 0),
                "kv_lora_rank": f.int("kv_lora_rank"), "qk_rope_head_dim": rope,
                "router": scoring}
    if out["top_k"] > out["num_experts"]:
        raise InputError(source, "num_experts_per_tok", f"{out['top_k']} exceeds the "
                         f"{out['num_experts']} experts")
    if len(out["dense_layers"]) == layers:
        raise InputError(source, "num_hidden_layers", "every layer is dense: not an MoE model")
    return out


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """ModelConfig fields of the config.json at `path` (named after the file's stem)."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file", "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, "json", f"not valid JSON: {e}") from None
    stem = path.stem if path.stem != "config" else path.parent.name
    return model_fields(raw, str(path), stem)
