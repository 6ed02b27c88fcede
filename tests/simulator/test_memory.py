"""The memory estimator against a small config computed by hand, Korthikanti et al.'s
activation formulas, and the ZeRO / pipeline / recompute rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from moesim.config import config_from_dict, load_config
from moesim.errors import InputError
from moesim.sim import memory
from moesim.sim.memory import GIB, Training

ROOT = Path(__file__).resolve().parents[2]


def _model(**kw):
    return config_from_dict({"model": kw}).model


# d 64, 4 query heads of 16, 2 KV heads, layer 0 dense (ffn 128), layer 1 MoE (4 experts of
# 32, top-2), vocab 100, sequences of 8, bf16.
SMALL = dict(d_model=64, attn_heads=4, kv_heads=2, num_layers=2, dense_layers=[0],
             d_ffn_dense=128, num_experts=4, top_k=2, d_ffn=32, vocab_size=100, seq_len=8)


def test_small_config_by_hand():
    m = _model(**SMALL)
    # Parameters: attention q 64x64 + k, v 64x32 each + out 64x64 = 12288 a layer; norms
    # 2 x 64 a layer; dense MLP 3 x 64 x 128; experts 4 x 3 x 64 x 32; router 64 x 4;
    # embedding and LM head 100 x 64 each; final norm 64.
    params = 2 * 12288 + 2 * 128 + 24576 + 24576 + 256 + 2 * 6400 + 64
    assert m.total_params == params == 87104
    t = Training(micro_batch=2, precision="pure", loss="torch")
    est = memory.estimate(m, t, capacity_gib=1.0)
    # pure bf16: weight 2 + gradient 2 + two moments 4 bytes a parameter.
    assert est.terms["weights"] + est.terms["gradients"] + est.terms["optimizer"] == 8 * params
    # Saved bytes a token. Attention: norm input 128 + 1/rms 4 + QKV input 128 + Q, K, V
    # 2 (64 + 32 + 32) + output 128 + log-sum-exp 4 x 4 heads = 660.
    # Dense MLP: norm 128 + 4, input 128, first GEMM out 2 x 256, activation out 2 x 128
    # = 1028. MoE: norm 128 + 4, input 128, fp32 probs 16, int64 indices 2 x 8, per row (2
    # rows) expert input 128, first GEMM out 128, activation out 64, expert out 128 = 1188.
    # Output: final norm 128 + 4, head input 128, bf16 logits + fp32 log-softmax 6 x 100.
    per_token = 2 * 660 + 1028 + 1188 + (128 + 4 + 128 + 600)
    tokens = 2 * 8
    assert est.terms["activations"] == per_token * tokens
    # Transient: the larger block's backward (the MoE block, 1188) beats the loss's two fp32
    # gradients (8 x 100 = 800).
    assert est.terms["transient"] == 1188 * tokens
    # An all-to-all copy: 2 rows x 64 x 2 bytes a token.
    assert est.terms["comm_buffers"] == 256 * tokens
    assert est.peak == 8 * params + per_token * tokens + 1188 * tokens + 256 * tokens
    assert est.peak == 790272


def _gpt(**kw):
    # A GPT block as Korthikanti et al. count it: MHA, hidden h, one dense MLP of 4h
    # (SwiGLU here: 3 matrices, so the MLP's hidden tensors are 8h + 4h instead of 8h + 8h).
    return _model(d_model=1024, attn_heads=16, num_layers=2, dense_layers=[0],
                  d_ffn_dense=4096, num_experts=1, top_k=1, seq_len=2048, **kw)


@pytest.mark.parametrize("tp, sp", [(1, False), (4, False), (4, True), (8, True)])
def test_attention_activations_follow_korthikanti(tp, sp):
    """Korthikanti et al. 2022, section 4: the attention block saves 11 sbh + 5 as^2 b bytes
    (sbh: elements at 2 bytes); without dropout (its sbh mask) and with FlashAttention (no s^2
    tensors) 10 sbh, plus the LayerNorm input 2 sbh. Tensor parallel without SP divides the
    8 sbh after the QKV input by t; with SP everything is divided by t."""
    m = _gpt()
    h = 1024
    acts = memory.attention_activations(m, tp, sp)
    fp32 = acts.pop("attn_norm.rstd") + acts.pop("attention.lse")
    expect = (4 * h + 8 * h / tp) if not sp else 12 * h / tp
    assert sum(acts.values()) == pytest.approx(expect)
    assert fp32 == pytest.approx(4 * (1 / tp if sp else 1) + 4 * 16 / tp)


@pytest.mark.parametrize("tp, sp", [(1, False), (4, False), (4, True)])
def test_gelu_gpt_block_is_korthikantis_34_sbh_less_the_masks(tp, sp):
    """Korthikanti et al. eq. (2) and section 4.2: a GPT layer saves sbh (34 + 5as/h) bytes;
    (10 + 24/t) sbh with TP; 34 sbh / t with TP and SP. Less the two dropout masks (sbh each,
    outside the t split) and the s^2 terms, with a 4h GELU MLP: 32, 8 + 24/t, 32/t."""
    m = _gpt(expert_kind="gelu")
    h = 1024
    acts = memory.attention_activations(m, tp, sp) | memory.mlp_activations(m, 0, tp, sp)
    for k in ("attn_norm.rstd", "attention.lse", "mlp_norm.rstd"):
        acts.pop(k)
    expect = 32 * h / tp if sp else (8 + 24 / tp) * h
    assert sum(acts.values()) == pytest.approx(expect)


@pytest.mark.parametrize("tp, sp", [(1, False), (4, True)])
def test_mlp_activations_follow_korthikanti(tp, sp):
    """The MLP block: Korthikanti's 19 sbh for a 4h GELU MLP is input 2, GELU input 8, GELU
    output 8, mask 1; with SwiGLU of 4h the first GEMM writes 2 x 4h (16 sbh) and the
    activation 4h (8 sbh); plus the LayerNorm input 2 sbh."""
    m = _gpt()
    h = 1024
    acts = memory.mlp_activations(m, 0, tp, sp)
    acts.pop("mlp_norm.rstd")
    a = 1 / tp if sp else 1
    assert sum(acts.values()) == pytest.approx(4 * h * a + (16 + 8) * h / tp)


def test_recompute_and_pipeline_in_flight():
    m = _model(**SMALL)
    base = dict(micro_batch=2, micro_batches=8, precision="pure")
    none = memory.estimate(m, Training(**base), 1.0)
    full = memory.estimate(m, Training(**base, recompute="full"), 1.0)
    # Full recompute keeps each layer's input only (64 x 2 bytes a token); the layer being
    # back-propagated holds its activations again (the larger layer: 660 + 1188).
    assert full.terms["activations"] == (2 * 128 + 128 + 4 + 128 + 4 * 100) * 16
    assert full.terms["transient"] == (660 + 1188 + 1188) * 16
    # Selective (core attention): only the log-sum-exp goes.
    sel = memory.estimate(m, Training(**base, recompute="selective"), 1.0)
    assert none.terms["activations"] - sel.terms["activations"] == 2 * 16 * 16
    # 1F1B over 2 stages: stage 0 holds min(2, 8) micro-batches, stage 1 one.
    pp = memory.estimate(m, Training(**base, pp=2), 1.0)
    s0, s1 = pp.stages
    assert s0["activations"] == 2 * 660 * 16 + 2 * 1028 * 16
    # The last stage: Megatron's loss keeps the fp32 softmax (4 x 100) beside the norm and
    # head inputs.
    assert s1["activations"] == (660 + 1188 + 128 + 4 + 128 + 400) * 16
    assert memory.stage_layers(_model(num_layers=7), 3) == [[0, 1, 2], [3, 4], [5, 6]]


def test_zero_stages_shard_what_they_say():
    m = _model(**SMALL)
    dense, expert = memory.stage_params(m, [0, 1], Training(), True, True)
    assert dense + expert == m.total_params
    kw = dict(dp=4, ep=2)
    e = {z: memory.estimate(m, Training(**kw, zero=z), 1.0).terms for z in range(4)}
    # Mixed precision: 2 + 4 + 12 bytes; experts over ep=2 and replicated dp x tp / ep = 2.
    n_rank = dense + expert / 2
    assert e[0]["weights"] == 2 * n_rank and e[0]["gradients"] == 4 * n_rank
    assert e[0]["optimizer"] == 12 * n_rank
    assert e[1]["optimizer"] == pytest.approx(12 * (dense / 4 + expert / 2 / 2))
    assert e[1]["gradients"] == e[0]["gradients"]
    assert e[2]["gradients"] == pytest.approx(4 * (dense / 4 + expert / 2 / 2))
    # ZeRO-3 in mixed precision as torch FSDP2: fp32 shards (the master), fp32 gradient
    # shards, two fp32 moments: 4 + 4 + 8 over the replicas.
    shard = dense / 4 + expert / 2 / 2
    assert (e[3]["weights"], e[3]["gradients"], e[3]["optimizer"]) == pytest.approx(
        (4 * shard, 4 * shard, 8 * shard))
    # ...and the bf16 weights of 1 + 1 layers gathered: the larger layer's rank share (the
    # dense layer, attention 12288 + norms 128 + MLP 24576, over the MoE layer's 12288 +
    # 128 + experts 24576 / ep 2 + router 256).
    assert e[3]["comm_buffers"] - e[2]["comm_buffers"] == 2 * 2 * (12288 + 128 + 24576)


def test_fsep_materialised_experts():
    m = _model(**SMALL)
    kw = dict(micro_batch=2, ep=4, dp=4, strategy="fsep", fsep_slots=3)
    gather = memory.estimate(m, Training(**kw), 1.0).terms["fsep_experts"]
    keep = memory.estimate(m, Training(**kw, fsep_backward_gather=False), 1.0)
    one = 3 * m.expert_params * 2
    # Prefetch 2 + the running layer vs the one MoE layer kept; fp32 gradients of one layer.
    assert gather == 3 * one + 3 * m.expert_params * 4
    assert keep.terms["fsep_experts"] == 1 * one + 3 * m.expert_params * 4
    assert memory.estimate(m, Training(micro_batch=2), 1.0).terms["fsep_experts"] == 0


def test_mixtral_on_the_laer_cluster_fits_and_a_big_one_does_not():
    mix = config_from_dict({"model": {"hf_config": str(ROOT / "configs/models/"
                                                       "mixtral-8x7b-e8k2.json"),
                                      "seq_len": 8192}}).model
    megatron = Training(micro_batch=1, micro_batches=64, tp=8, sp=True, dp=4, ep=8, zero=1,
                        recompute="full")
    est = memory.estimate(mix, megatron, memory.GPU_MEMORY_GIB["a100"])
    # Experts 8 x 32 layers x 3 x 4096 x 14336 over ep 8: 5.64e9 weights a rank, 2 bytes.
    assert est.terms["weights"] / GIB == pytest.approx(10.9, abs=0.1)
    assert est.fits and est.verdict().startswith("fits ")
    flat = Training(micro_batch=1, dp=32, ep=1)  # every expert on every GPU
    big = memory.estimate(mix, flat, memory.GPU_MEMORY_GIB["a100"])
    assert not big.fits
    assert big.verdict() == (f"does not fit: needs {big.peak_gib + 2.0:.1f} GiB of 80.0")


def test_runtime_configs_and_capacity(tmp_path):
    cfg = load_config(ROOT / "configs" / "runtime-h200x2.toml")
    est = memory.estimate_config(cfg, runtime=True)
    t = memory.training_from_config(cfg, runtime=True)
    assert (t.micro_batch, t.ep, t.dp, t.precision, t.loss) == (8, 2, 2, "pure", "torch")
    assert est.capacity_gib == pytest.approx(143771 / 1024) and est.fits
    p = tmp_path / "c.toml"
    p.write_text('[cluster]\ngpu = "mi300x"\n')
    with pytest.raises(InputError, match=r"cluster\.gpu_memory_gib"):
        memory.gpu_capacity_gib(load_config(p))
    p.write_text('[cluster]\ngpu = "mi300x"\ngpu_memory_gib = 192.0\n')
    assert memory.gpu_capacity_gib(load_config(p)) == 192.0
    p.write_text("[model]\nseq_len = 1000\n")
    with pytest.raises(InputError, match=r"run\.tokens_per_rank"):
        memory.training_from_config(load_config(p))


def test_whole_iteration_config_fields(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text(f'[model]\nhf_config = "{ROOT}/configs/models/mixtral-8x7b-e8k2.json"\n'
                 'seq_len = 8192\n[cluster]\nnodes = 4\ngpus_per_node = 8\n'
                 '[parallel]\ntp = 8\ndegree = 8\nzero = 1\n'
                 '[train]\nscope = "iteration"\nmicro_batches = 64\nrecompute = "full"\n')
    cfg = load_config(p)
    t = memory.training_from_config(cfg)
    assert (t.tp, t.sp, t.pp, t.dp, t.ep, t.expert_dp, t.zero) == (8, True, 1, 4, 8, 4, 1)
    assert (t.micro_batch, t.micro_batches, t.recompute, t.precision, t.loss) == \
        (1, 64, "full", "mixed", "megatron")
    # The runtime trains its own way whatever [train] says.
    rt = memory.training_from_config(cfg, runtime=True, micro_batch=1)
    assert (rt.tp, rt.precision, rt.loss, rt.dp) == (1, "pure", "torch", 32)


def test_interleaved_pipeline_holds_korthikantis_factor():
    # First stage, pp 4, vp 8, many micro-batches: 2 x 3 + 7 x 4 + 1 = 35 chunks of 1/8 of
    # the stage's layers: 35 / 32 = 1 + (p - 1) / (p v) of 1F1B's p micro-batches.
    m = _model(num_layers=32, num_experts=8, top_k=2)
    flat = memory.estimate(m, Training(pp=4, micro_batches=64), 1.0).stages[0]
    inter = memory.estimate(m, Training(pp=4, vp=8, micro_batches=64), 1.0).stages[0]
    assert inter["activations"] / flat["activations"] == pytest.approx(35 / 32)
    # Few micro-batches cap it: 2 micro-batches x 8 chunks.
    few = memory.estimate(m, Training(pp=4, vp=8, micro_batches=2), 1.0).stages[0]
    assert few["activations"] / flat["activations"] == pytest.approx(2 / 4)


def test_memory_command(tmp_path, capsys):
    from moesim.cli import main

    assert main(["memory", "--config", str(ROOT / "configs" / "runtime-h200x2.toml"),
                 "--runtime"]) == 0
    out = capsys.readouterr().out
    est = memory.estimate_config(load_config(ROOT / "configs" / "runtime-h200x2.toml"),
                                 runtime=True)
    assert f"{est.peak_gib:9.3f} GiB" in out and out.strip().endswith(est.verdict())
    p = tmp_path / "big.toml"
    p.write_text(f'[model]\nhf_config = "{ROOT}/configs/models/mixtral-8x7b-e8k2.json"\n'
                 'seq_len = 4096\n[cluster]\ngpu = "a100"\n[parallel]\ndegree = 1\n'
                 '[train]\nscope = "iteration"\n')
    assert main(["memory", "--config", str(p)]) == 0
    assert "does not fit: needs" in capsys.readouterr().out
    assert main(["memory", "--run", str(tmp_path)]) == 2  # no config.toml: one line, exit 2
    assert "config.toml" in capsys.readouterr().err
