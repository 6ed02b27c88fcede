"""The decoder's non-MoE phase costs and Megatron's model FLOPs, against closed forms."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.config import config_from_dict
from moesim.sim import decoder
from moesim.sim.compute import ComputeModel

MODELS = Path(__file__).resolve().parents[2] / "configs" / "models"


def _model(**kw):
    return config_from_dict({"model": kw}).model


def _hf(name: str, **kw):
    return config_from_dict({"model": {"hf_config": str(MODELS / f"{name}.json"), **kw}}).model


def _phase(costs, name):
    (c,) = [c for c in costs if c.phase == name]
    return c


def test_attention_flops_closed_form():
    # Causal: QK^T and PV over the lower triangle, 2 s^2 d per head and sequence forward.
    m = _model(d_model=2048, attn_heads=16, seq_len=4096)
    tokens = 3 * 4096
    assert decoder.attention_flops(m, tokens) == 3 * 16 * 2 * 4096**2 * 128
    cm = ComputeModel.load("h200")
    fwd = _phase(decoder.layer_costs(m, cm, tokens, 0, "fwd"), "attention")
    bwd = _phase(decoder.layer_costs(m, cm, tokens, 0, "bwd"), "attention")
    assert fwd.flops == 3 * 16 * 2 * 4096**2 * 128 and bwd.flops == 2.5 * fwd.flops
    # Different value and key widths (MLA's 192 / 128): s^2 (d_qk + d_v) per head.
    mla = _hf("deepseek-v3", seq_len=4096)
    assert decoder.attention_flops(mla, 4096, tp=8) == 16 * 4096**2 * (192 + 128)


def test_attention_time_is_flops_at_the_published_rate():
    # On an H200 calibration (GEMM 790 TFLOP/s, the reference), at a measured sequence
    # length, the rate is the FA3 paper's figure: FA2 causal forward at 8k, 333 TFLOP/s.
    cm = ComputeModel.load("h200")
    assert decoder.attention_rate(cm, 8192, "fa2", False) == pytest.approx(333e12)
    assert decoder.attention_rate(cm, 2048, "cudnn", True) == pytest.approx(465e12)
    # Between points: log-linear; outside: clamped.
    mid = decoder.attention_rate(cm, int(2048 * 2**0.5), "fa2", False)
    assert mid == pytest.approx((298e12 + 319e12) / 2, rel=1e-4)  # 2896 of 2896.3
    assert decoder.attention_rate(cm, 128, "fa2", False) == pytest.approx(191e12)
    m = _model(d_model=4096, attn_heads=32, kv_heads=8, seq_len=8192)
    c = _phase(decoder.layer_costs(m, cm, 8192, 0, "fwd"), "attention")
    assert c.seconds == pytest.approx(c.flops / 333e12 + cm.launch_overhead)
    # Q (32 heads), K and V (8 each), O, fp32 log-sum-exp: the compulsory bytes.
    assert c.nbytes == 8192 * (2 * 128 * (32 + 8 + 8 + 32) + 4 * 32)


def test_tensor_parallel_splits_gemms_and_sequence_parallel_the_norms():
    cm = ComputeModel.load("h200")
    m = _model(d_model=4096, attn_heads=32, kv_heads=8, num_layers=2, dense_layers=[0],
               d_ffn_dense=14336, seq_len=4096)
    one = {c.phase: c for c in decoder.layer_costs(m, cm, 8192, 0, "fwd")}
    t8 = {c.phase: c for c in decoder.layer_costs(m, cm, 8192, 0, "fwd", tp=8)}
    sp = {c.phase: c for c in decoder.layer_costs(m, cm, 8192, 0, "fwd", tp=8, sp=True)}
    # QKV: 2 T d (H + 2 Hkv) dh; the dense MLP: 2 T d 3 f; /8 under TP.
    assert one["qkv"].flops == 2 * 8192 * 4096 * (32 + 16) * 128
    assert one["dense_mlp"].flops == 2 * 8192 * 4096 * 3 * 14336
    for ph in ("qkv", "attention", "attn_out", "dense_mlp"):
        assert t8[ph].flops == pytest.approx(one[ph].flops / 8)
    assert t8["attn_norm"].nbytes == one["attn_norm"].nbytes  # replicated without SP
    assert sp["attn_norm"].nbytes == pytest.approx(one["attn_norm"].nbytes / 8)
    assert one["attn_norm"].nbytes == 2 * 8192 * 4096 * 2  # read x, write y
    bwd = {c.phase: c for c in decoder.layer_costs(m, cm, 8192, 0, "bwd")}
    assert bwd["dense_mlp"].flops == 2 * one["dense_mlp"].flops


def test_phases_per_layer_kind_and_recompute():
    cm = ComputeModel.load("h200")
    m = _hf("deepseek-v3", seq_len=4096)
    dense = [c.phase for c in decoder.layer_costs(m, cm, 4096, 0, "fwd", tp=8, sp=True)]
    moe = [c.phase for c in decoder.layer_costs(m, cm, 4096, 3, "fwd", tp=8, sp=True)]
    assert dense[-1] == "dense_mlp" and moe[-1] == "shared_expert"
    assert dense[:6] == ["attn_norm", "qkv", "attention", "attn_out", "residual", "mlp_norm"]
    full = decoder.layer_costs(m, cm, 4096, 3, "recompute", tp=8, recompute="full")
    assert [c.phase for c in full] == [c.phase for c in
                                       decoder.layer_costs(m, cm, 4096, 3, "fwd", tp=8)]
    sel = decoder.layer_costs(m, cm, 4096, 3, "recompute", tp=8, recompute="selective")
    assert [c.phase for c in sel] == ["attention"]
    assert decoder.layer_costs(m, cm, 4096, 3, "recompute") == []
    mix = _hf("mixtral-8x7b-e8k2")
    assert "shared_expert" not in [c.phase for c in decoder.layer_costs(mix, cm, 4096, 0, "fwd")]


def test_output_and_optimizer_bytes():
    cm = ComputeModel.load("h200")
    m = _model(d_model=1024, vocab_size=32000, attn_heads=8)
    fwd = {c.phase: c for c in decoder.output_costs(m, cm, 8192, "fwd")}
    assert fwd["lm_head"].flops == 2 * 8192 * 1024 * 32000
    # fp32 cast (read bf16, write fp32) and log-softmax (read, write fp32).
    assert fwd["loss"].nbytes == 8192 * 32000 * (2 + 4 + 8)
    bwd = {c.phase: c for c in decoder.output_costs(m, cm, 8192, "bwd", tp=4)}
    assert bwd["loss"].nbytes == 8192 * 8000 * (4 + 12 + 4 + 2)
    # AdamW, mixed precision, fused: 7 fp32 tensor passes + the bf16 copy = 30 B/param.
    opt = decoder.optimizer_cost(cm, 1e9, 2)
    assert opt.nbytes == 30e9
    assert opt.seconds == pytest.approx(cm.launch_overhead + 30e9 / cm.rates["hbm"])
    assert decoder.optimizer_cost(cm, 1e9, 2, "pure", "foreach").nbytes == 44e9
    emb = decoder.embedding_cost(m, cm, 8192, "fwd")
    assert emb.nbytes == 2 * 8192 * 1024 * 2


@pytest.mark.parametrize("name", ["mixtral-8x7b-e8k2", "qwen3-30b-a3b", "deepseek-v3",
                                  "olmoe-1b-7b", "deepseek-v2-lite"])
def test_model_flops_are_six_per_active_weight_plus_causal_attention(name):
    """Megatron's count, against the parameter count the config gives independently: 6 FLOPs
    per token per active GEMM weight (embedding, norms and routers are not GEMMs; MLA's two
    low-rank norms Megatron counts as if they were) plus causal attention, 6 s H (d_qk + d_v)
    / 2 a layer."""
    m = _hf(name, seq_len=4096)
    s, L = 4096, m.num_layers
    gemm_weights = (m.active_params - m.embedding_params - m.norm_params
                    - L * 2 * m.norm_params - m.num_moe_layers * m.router_params)
    if m.qk_norm:
        gemm_weights -= L * (m.attn_heads + m.num_kv_heads) * m.qk_head_dim
    attn = 6 * L * s * m.attn_heads * (m.qk_head_dim + m.v_dim) / 2
    assert decoder.model_flops(m, 4096) == pytest.approx(4096 * (6 * gemm_weights + attn),
                                                         rel=1e-12)


def test_model_flops_gpt_closed_form():
    # Megatron's GPT formula (Narayanan et al. 2021) with causal attention and SwiGLU of f:
    # 6 T (l (4 h^2 + h s + 3 h f) + h V) for MHA.
    h, s, f, V, L = 1024, 2048, 2816, 32000, 4
    m = _model(d_model=h, attn_heads=8, seq_len=s, d_ffn=f, num_experts=1, top_k=1,
               vocab_size=V, num_layers=L)
    T = 2 * s
    assert decoder.model_flops(m, T) == 6 * T * (L * (4 * h * h + h * s + 3 * h * f) + h * V)


def test_megatron_loss_bytes():
    cm = ComputeModel.load("h200")
    m = _model(d_model=1024, vocab_size=32000, attn_heads=8)
    fwd = {c.phase: c for c in decoder.output_costs(m, cm, 8192, "fwd", tp=8, loss="megatron")}
    bwd = {c.phase: c for c in decoder.output_costs(m, cm, 8192, "bwd", tp=8, loss="megatron")}
    assert fwd["loss"].nbytes == 8192 * 4000 * (2 + 32)
    assert bwd["loss"].nbytes == 8192 * 4000 * (16 + 2)
    with pytest.raises(ValueError):
        decoder.output_costs(m, cm, 8192, "fwd", loss="fused")


def test_model_flops_before_the_causal_halving():
    # Megatron 2024: 12 B s l h^2 (1 + g/a + s/h) q/h + ... : the attention core doubled.
    m = _hf("mixtral-8x7b-e8k2", seq_len=4096)
    core = 6 * m.num_layers * 4096 * m.attn_heads * 2 * m.qk_head_dim / 2
    full = decoder.model_flops(m, 4096, causal=False)
    assert full - decoder.model_flops(m, 4096) == pytest.approx(4096 * core, rel=1e-12)


@pytest.mark.parametrize("name, tokens, step_s, gpus, tflops", [
    # NeMo AutoModel's published DGX-H100 BF16 rows (docs/validation/published/
    # throughput.csv): global batch x 4096 tokens, step time, GPUs, reported TFLOP/s per GPU.
    ("qwen3-30b-a3b", 512 * 4096, 21.773, 8, 277),
    ("deepseek-v3", 512 * 4096, 8.18, 256, 250),
    ("deepseek-v3", 8192 * 4096, 37.87, 1024, 216),
])
def test_model_flops_reproduce_published_tflops(name, tokens, step_s, gpus, tflops):
    m = _hf(name, seq_len=4096)
    assert decoder.model_flops(m, tokens) / step_s / gpus / 1e12 == pytest.approx(tflops,
                                                                                  abs=0.5)
