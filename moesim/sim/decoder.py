"""Compute and HBM-byte costs of the decoder's non-MoE phases, per pass, on one rank of a
tensor-parallel group; and the model FLOPs of an iteration as Megatron counts them (for MFU).

A decoder layer is attn_norm -> qkv -> attention -> attn_out -> (residual) -> mlp_norm -> the
MLP -> (residual). The MLP is the MoE layer (timed by the step programs from planner/ traffic;
its `shared_expert` phase is here) or, for the layers in `model.dense_layers`, `dense_mlp`.
Around the stack: `embed` (first pipeline stage), `final_norm`, `lm_head`, `loss` (last
stage), and the `optimizer` step. Every cost is one micro-batch of `tokens` tokens (whole
sequences of model.seq_len) entering the tensor-parallel group, seen from one of its ranks:

- Tensor parallel `tp`, Megatron's split: Q/K/V, the dense MLP's first matrix and the LM head
  column-parallel (heads, hidden units and vocabulary / tp), out-projection and the MLP's
  second matrix row-parallel; every rank computes on all `tokens` rows. K/V heads fewer than
  tp are replicated (ceil). MLA's down-projections (q_a, kv_a) run replicated on each rank.
- Sequence parallel `sp`: norms and residual adds on tokens / tp (else on all tokens on every
  rank). The collectives that move between the two layouts (all-gather / reduce-scatter, or
  the all-reduce without sp) are planner/parallel.py's bytes and the step program's; none
  is here.
- Passes: "fwd"; "bwd" (input and weight gradients: twice the forward GEMM FLOPs;
  FlashAttention's backward 2.5 times its forward, as it recomputes the scores); "recompute"
  (activation checkpointing, model.recompute semantics below: the forward again).

Kernel costs, and what each assumes:
- GEMMs are `ComputeModel.gemm` (calibrated rate and size curve, bytes as a roofline bound).
- FlashAttention's core (`attention`): causal, FLOPs per sequence and head s^2 (d_qk + d_v)
  forward (QK^T and PV on the lower triangle, Megatron's count), backward 2.5x. Its time is
  FLOPs / rate(s), bounded below by the compulsory HBM bytes (Q, K, V, O, the log-sum-exp;
  backward also dO, dQ, dK, dV). rate(s) is ASSUMED from FlashAttention-3's published H100
  SXM5 bf16 measurements (Shah et al. 2024, arXiv 2407.08608, Figures 5 and 6: head dim
  128, 16k tokens a batch, forward causal, backward without mask), by implementation
  (`model.attention_kernel`: "fa2", FlashAttention-2, what torch's SDPA flash backend runs;
  "cudnn", cuDNN's fused attention, Transformer Engine's default in Megatron-Core; "fa3"),
  interpolated log-linearly in s and clamped at 512 and 16k, scaled by the calibrated GEMM
  rate over 790 TFLOP/s (the H100/H200 die's measured dense bf16 rate, DESIGN.md): the same
  die runs both. Head dims other than 128 run at these rates (FA3's own figures: 64 is up to
  25% slower, 256 up to 20% faster). Until the runtime measures attention this is the one
  uncalibrated compute rate of a whole iteration.
- Memory-bound kernels (norms, RoPE, residual adds, the MLP activation, cross-entropy, the
  optimizer) cost launches x overhead + bytes / HBM rate, bytes being each kernel's reads
  and writes: RMSNorm/LayerNorm one fused kernel each way (forward reads x, writes y;
  backward reads x and dy, writes dx; the fp32 statistics and the weight gradient's
  reduction are ignored); RoPE one kernel on Q and K each way; qk-norm one per tensor;
  residual adds read two and write one; the MLP activation as `ComputeModel`'s ACTIVATION
  table for `model.activation` (GELU: one kernel reading and writing the hidden layer).
- Cross-entropy (`loss`) on the rank's vocab shard, as implemented (train.loss_impl):
  "torch", as runtime/train.py runs it: the logits cast to fp32, then log-softmax and NLL
  (forward: read bf16 + write fp32, read + write fp32; backward: the NLL gradient written,
  log-softmax backward reads it and its output and writes the gradient, the cast's backward
  reads fp32 and writes bf16); "torch_nocast", the same without the cast (log-softmax and
  its gradient in model.dtype); "megatron", its vocab-parallel cross-entropy in torch ops
  (forward: cast, max, subtract and exp in place, sum, divide in place: bf16 read + 8 fp32
  passes; backward: the one-hot subtraction and the scaling in place on the saved softmax,
  the cast back: 4 fp32 passes + bf16 write).
- The optimizer (`optimizer`): AdamW over the parameters a rank updates. "mixed" precision
  keeps fp32 main gradients, master weights and both moments and writes the bf16 copy;
  "pure" keeps everything in model.dtype (torch AdamW on bf16 parameters, what runtime/
  does). "fused" reads and writes each tensor once (Apex/TE FusedAdam, Megatron's);
  "foreach" is torch's default multi-tensor path, one pass per elementwise op (OPT_PASSES).
Ignored: kernel fusions beyond those named, dropout (0 in every imported family), bias
epilogues (free in the GEMM), the router (the MoE programs'), L2 reuse between kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.config import ModelConfig
from moesim.sim.compute import ACTIVATION, ComputeModel

PASSES = ("fwd", "bwd", "recompute")
RECOMPUTE = ("none", "selective", "full")
PRECISIONS = ("mixed", "pure")
OPTIMIZER_IMPLS = ("fused", "foreach")

# FlashAttention-3 paper (arXiv 2407.08608), H100 SXM5 bf16, head dim 128, TFLOP/s at
# sequence lengths 512 .. 16k: Figure 5 (forward, causal) and Figure 6 (backward).
ATTN_SEQ = np.array([512, 1024, 2048, 4096, 8192, 16384], dtype=float)
ATTN_TFLOPS = {
    "fa2": ((191, 260, 298, 319, 333, 335), (214, 260, 291, 310, 318, 322)),
    "cudnn": ((315, 410, 484, 518, 529, 539), (305, 408, 465, 499, 518, 516)),
    "fa3": ((292, 423, 521, 579, 602, 616), (316, 424, 501, 542, 559, 561)),
}
ATTN_REFERENCE_GEMM = 790e12  # the die's measured dense bf16 GEMM rate the tables scale by
ATTN_BWD_FLOPS = 2.5          # FlashAttention backward FLOPs / forward FLOPs

# Tensor passes (reads + writes of one parameter-sized tensor) of one AdamW step per
# parameter. fused: read grad, param, m, v; write param, m, v (7), plus the bf16 copy of a
# mixed-precision master weight. foreach (torch): lerp m (2r 1w), mul v (1r 1w), addcmul v
# (3r 1w), weight decay mul (1r 1w), sqrt (1r 1w), div (1r 1w), add eps (1r 1w),
# addcdiv param (3r 1w): 22.
OPT_PASSES = {"fused": 7, "foreach": 22}
OPT_LAUNCHES = {"fused": 1, "foreach": 8}  # multi-tensor launches per step (one per op)


@dataclass(frozen=True)
class Cost:
    """One phase of one pass on one rank."""

    phase: str
    seconds: float
    flops: float      # FLOPs executed (FlashAttention's backward recompute included)
    nbytes: float     # HBM bytes read and written (a lower bound for GEMMs)


def _check(pass_: str) -> None:
    if pass_ not in PASSES:
        raise ValueError(f"pass {pass_!r} is not one of {PASSES}")


def _mem(compute: ComputeModel, launches: int, nbytes: float) -> float:
    return launches * compute.launch_overhead + nbytes / compute.rates["hbm"] if nbytes else 0.0


def _gemm(compute: ComputeModel, m: float, k: int, n: int, p: int, bwd: bool
          ) -> tuple[float, float, float]:
    """(seconds, FLOPs, bytes) of [m x k] @ [k x n], backward its two gradient GEMMs."""
    t, f = compute.gemm(np.array([m]), k, n, p, backward=bwd)
    mult = 2 if bwd else 1
    return float(t[0]), float(f[0]), (m * k + k * n + m * n) * p * mult


class _Phase:
    """Accumulates one phase's kernels."""

    def __init__(self, name: str) -> None:
        self.name, self.s, self.f, self.b = name, 0.0, 0.0, 0.0

    def gemm(self, compute: ComputeModel, m: float, k: int, n: int, p: int, bwd: bool) -> None:
        s, f, b = _gemm(compute, m, k, n, p, bwd)
        self.s, self.f, self.b = self.s + s, self.f + f, self.b + b

    def mem(self, compute: ComputeModel, launches: int, nbytes: float) -> None:
        self.s += _mem(compute, launches, nbytes)
        self.b += nbytes

    def cost(self) -> Cost:
        return Cost(self.name, self.s, self.f, self.b)


def attention_rate(compute: ComputeModel, seq_len: int, kernel: str, backward: bool) -> float:
    """FLOP/s of the fused attention kernel at `seq_len` (see the module docstring)."""
    table = np.asarray(ATTN_TFLOPS[kernel][1 if backward else 0], dtype=float) * 1e12
    r = np.interp(math.log(max(seq_len, 1)), np.log(ATTN_SEQ), table)
    return float(r) * compute.rates["gemm"] / ATTN_REFERENCE_GEMM


def attention_flops(model: ModelConfig, tokens: float, tp: float = 1) -> float:
    """Forward FLOPs of the causal attention core on one rank: per sequence and head
    s^2 (d_qk + d_v), i.e. 2 s^2 d per head for d_qk = d_v, half the unmasked 4 s^2 d."""
    s = model.seq_len
    heads = model.attn_heads / tp
    return (tokens / s) * heads * s * s * (model.qk_head_dim + model.v_dim)


def _norm(compute: ComputeModel, ph: _Phase, rows: float, width: int, p: int, bwd: bool
          ) -> None:
    ph.mem(compute, 1, rows * width * p * (3 if bwd else 2))


def _mlp(compute: ComputeModel, ph: _Phase, model: ModelConfig, tokens: float, ffn: int,
         tp: int, bwd: bool) -> None:
    """A dense MLP of hidden width `ffn`, column- then row-parallel over tp."""
    d, p, mats = model.d_model, model.dtype_bytes, model.mlp_matrices
    f = math.ceil(ffn / tp)
    ph.gemm(compute, tokens, d, (mats - 1) * f, p, bwd)
    if mats == 3:
        launches, elements = ACTIVATION[model.activation][1 if bwd else 0]
    else:  # GELU: read and write the hidden layer (backward: also its gradient in)
        launches, elements = 1, (3 if bwd else 2)
    if launches:
        ph.mem(compute, launches, elements * tokens * f * p)
    ph.gemm(compute, tokens, f, d, p, bwd)


def _qkv(compute: ComputeModel, ph: _Phase, model: ModelConfig, tokens: float, tp: int,
         bwd: bool) -> None:
    d, p = model.d_model, model.dtype_bytes
    h = math.ceil(model.attn_heads / tp)
    dq, dv = model.qk_head_dim, model.v_dim
    rw = 3 if bwd else 2
    if model.attention == "mla":
        rope, kv = model.qk_rope_head_dim, model.kv_lora_rank
        if model.q_lora_rank:
            ph.gemm(compute, tokens, d, model.q_lora_rank, p, bwd)
            _norm(compute, ph, tokens, model.q_lora_rank, p, bwd)
            ph.gemm(compute, tokens, model.q_lora_rank, h * dq, p, bwd)
        else:
            ph.gemm(compute, tokens, d, h * dq, p, bwd)
        ph.gemm(compute, tokens, d, kv + rope, p, bwd)
        _norm(compute, ph, tokens, kv, p, bwd)
        ph.gemm(compute, tokens, kv, h * (dq - rope + dv), p, bwd)
        # RoPE on the rotary parts, and the per-head key built from its nope part and the
        # one shared rotary key (a copy writing every head's key).
        ph.mem(compute, 2, rw * tokens * (h + 1) * rope * p)
        ph.mem(compute, 1, tokens * h * dq * p * (2 if bwd else 1))
        return
    hk = math.ceil(model.num_kv_heads / tp)
    ph.gemm(compute, tokens, d, h * dq + hk * (dq + dv), p, bwd)
    if model.qk_norm:
        ph.mem(compute, 2, rw * tokens * (h + hk) * dq * p)
    ph.mem(compute, 2, rw * tokens * (h + hk) * dq * p)  # RoPE on Q and K


def _attention(compute: ComputeModel, ph: _Phase, model: ModelConfig, tokens: float, tp: int,
               bwd: bool) -> None:
    p = model.dtype_bytes
    h = math.ceil(model.attn_heads / tp)
    hk = h if model.attention == "mla" else math.ceil(model.num_kv_heads / tp)
    dq, dv = model.qk_head_dim, model.v_dim
    fwd_flops = attention_flops(model, tokens, model.attn_heads / h)
    q, k, v, o = tokens * h * dq * p, tokens * hk * dq * p, tokens * hk * dv * p, \
        tokens * h * dv * p
    lse = tokens * h * 4
    if bwd:
        flops, nbytes = ATTN_BWD_FLOPS * fwd_flops, 2 * (q + k + v) + 2 * o + lse
    else:
        flops, nbytes = fwd_flops, q + k + v + o + lse
    rate = attention_rate(compute, model.seq_len, model.attention_kernel, bwd)
    ph.s += max(flops / rate, nbytes / compute.rates["hbm"]) + compute.launch_overhead
    ph.f += flops
    ph.b += nbytes


def layer_costs(model: ModelConfig, compute: ComputeModel, tokens: float, layer: int,
                pass_: str, *, tp: int = 1, sp: bool = False, recompute: str = "none"
                ) -> list[Cost]:
    """The non-MoE phases of decoder layer `layer` for one micro-batch of `tokens` tokens on
    one rank of a `tp`-way group: attn_norm, qkv, attention, attn_out, residual, mlp_norm,
    and dense_mlp (a dense layer) or shared_expert (an MoE layer with shared experts).
    `pass_` "recompute" is what activation checkpointing runs again before the backward:
    `recompute` "full", the whole forward above; "selective", the attention core alone
    (Megatron's core_attn recompute); "none", nothing."""
    _check(pass_)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r} is not one of {RECOMPUTE}")
    if pass_ == "recompute":
        if recompute == "none":
            return []
        fwd = layer_costs(model, compute, tokens, layer, "fwd", tp=tp, sp=sp)
        return fwd if recompute == "full" else [c for c in fwd if c.phase == "attention"]
    bwd = pass_ == "bwd"
    d, p = model.d_model, model.dtype_bytes
    rows = tokens / tp if sp else tokens  # the norms' and residuals' tokens
    out = []
    ph = _Phase("attn_norm")
    _norm(compute, ph, rows, d, p, bwd)
    out.append(ph.cost())
    ph = _Phase("qkv")
    _qkv(compute, ph, model, tokens, tp, bwd)
    out.append(ph.cost())
    ph = _Phase("attention")
    _attention(compute, ph, model, tokens, tp, bwd)
    out.append(ph.cost())
    ph = _Phase("attn_out")
    ph.gemm(compute, tokens, math.ceil(model.attn_heads / tp) * model.v_dim, d, p, bwd)
    out.append(ph.cost())
    ph = _Phase("residual")  # two adds (forward) / two gradient sums (backward)
    ph.mem(compute, 2, 2 * 3 * rows * d * p)
    out.append(ph.cost())
    ph = _Phase("mlp_norm")
    _norm(compute, ph, rows, d, p, bwd)
    out.append(ph.cost())
    if not model.is_moe(layer):
        ph = _Phase("dense_mlp")
        _mlp(compute, ph, model, tokens, model.d_ffn_dense, tp, bwd)
        out.append(ph.cost())
    elif model.shared_experts:
        ph = _Phase("shared_expert")
        _mlp(compute, ph, model, tokens, model.shared_experts * model.shared_ffn, tp, bwd)
        out.append(ph.cost())
    return out


def embedding_cost(model: ModelConfig, compute: ComputeModel, tokens: float, pass_: str,
                   *, tp: int = 1) -> Cost:
    """The token embedding (first pipeline stage): a row gather of `tokens` rows forward
    (each rank of a vocab-parallel embedding writes all rows, zeros outside its shard),
    their scatter-add into the weight gradient backward. Recompute: none (its output is the
    first layer's checkpointed input)."""
    _check(pass_)
    nbytes = tokens * model.d_model * model.dtype_bytes
    if pass_ == "recompute":
        return Cost("embed", 0.0, 0.0, 0.0)
    s = float(compute.gather(np.array([nbytes]))[0])
    return Cost("embed", s, 0.0, 2 * nbytes)


def output_costs(model: ModelConfig, compute: ComputeModel, tokens: float, pass_: str,
                 *, tp: int = 1, sp: bool = False, loss: str = "torch") -> list[Cost]:
    """The last pipeline stage's final_norm, lm_head (column-parallel over the vocabulary)
    and loss (cross-entropy on the rank's vocab shard; the max/sum all-reduces of a
    vocab-parallel loss are the step program's). Recompute: none (Megatron checkpoints
    transformer layers, not the output layer)."""
    _check(pass_)
    if pass_ == "recompute":
        return []
    bwd = pass_ == "bwd"
    d, p = model.d_model, model.dtype_bytes
    v = math.ceil(model.vocab_size / tp)
    out = []
    ph = _Phase("final_norm")
    _norm(compute, ph, tokens / tp if sp else tokens, d, p, bwd)
    out.append(ph.cost())
    ph = _Phase("lm_head")
    ph.gemm(compute, tokens, d, v, p, bwd)
    out.append(ph.cost())
    ph = _Phase("loss")
    logits = tokens * v
    if loss == "torch":
        if bwd:
            ph.mem(compute, 4, logits * (4 + (4 + 4 + 4) + (4 + p)))
        else:
            ph.mem(compute, 3, logits * ((p + 4) + (4 + 4)))
    elif loss == "torch_nocast":
        if bwd:
            ph.mem(compute, 3, logits * 4 * p)
        else:
            ph.mem(compute, 2, logits * 2 * p)
    elif loss == "megatron":
        if bwd:
            ph.mem(compute, 3, logits * (4 * 4 + p))
        else:
            ph.mem(compute, 6, logits * (p + 8 * 4))
    else:
        raise ValueError(f"loss {loss!r} is not 'torch', 'torch_nocast' or 'megatron'")
    out.append(ph.cost())
    return out


def optimizer_cost(compute: ComputeModel, params: float, dtype_bytes: int,
                   precision: str = "mixed", impl: str = "fused") -> Cost:
    """One AdamW step over `params` parameters on a rank (its shard under ZeRO/FSDP)."""
    if precision not in PRECISIONS or impl not in OPTIMIZER_IMPLS:
        raise ValueError(f"precision {precision!r} / impl {impl!r}")
    width = 4 if precision == "mixed" else dtype_bytes
    nbytes = params * (OPT_PASSES[impl] * width + (dtype_bytes if precision == "mixed" else 0))
    return Cost("optimizer", _mem(compute, OPT_LAUNCHES[impl], nbytes), 0.0, nbytes)


def model_flops(model: ModelConfig, tokens: float, causal: bool = True) -> float:
    """Model FLOPs of one iteration over `tokens` tokens (global batch x sequence), forward
    and backward, as Megatron-LM counts them for its reported TFLOP/s and MFU:
    `num_floating_point_operations` in megatron/training/training.py (NVIDIA/Megatron-LM,
    read at 001b00c2; Narayanan et al. 2021, arXiv 2104.04473, appendix): 3 x (2 FLOPs per
    multiply-add) x every GEMM's weights per token, causal attention at half the s x s
    scores, SwiGLU MLPs at 3 matrices, routed experts at top_k, shared experts, dense layers,
    the logits GEMM; no norms, router, embedding or recompute. MLA as Megatron's branch
    (q_lora, kv_lora with its norm, the rotary key). Multi-Head LatentMoE as Megatron's
    latent MoE (moe_latent_size = num_heads x head_dim): the experts on the latent and its
    two projections. `causal` False counts the whole s x s score matrix, as Megatron-LM did
    before it halved it for the causal mask (its 2024 releases, e.g. Megatron-Core 0.9:
    `12 B s l h^2 (... + s / h ...)`); tables published then used that count."""
    d, m = model.d_model, model.mlp_matrices
    s = model.seq_len if causal else 2 * model.seq_len  # the core terms carry s / 2
    h, dq, dv = model.attn_heads, model.qk_head_dim, model.v_dim
    if model.attention == "mla":
        rope, nope = model.qk_rope_head_dim, model.qk_head_dim - model.qk_rope_head_dim
        q = (model.q_lora_rank * (d + h * dq + 1) if model.q_lora_rank else d * h * dq)
        attn = (q + model.kv_lora_rank * (d + h * (nope + dv) + 1) + d * rope + h * dv * d
                + s * h * dq / 2 + s * h * dv / 2)
    else:
        hk = model.num_kv_heads
        attn = d * (h * dq + hk * dq + hk * dv) + h * dq * s / 2 * 2 + h * dv * d
        if dq != dv:  # Megatron's GQA branch assumes one head width; count each exactly
            attn += h * s / 2 * (dv - dq)
    if model.num_heads > 1:
        routed = model.top_k * m * model.d_ffn * model.latent_dim + 2 * d * model.latent_dim
    else:
        routed = model.top_k * m * model.d_ffn * d
    shared = model.shared_experts * model.shared_ffn * m * d
    dense = m * model.d_ffn_dense * d
    per_token = (model.num_layers * attn + model.num_moe_layers * (routed + shared)
                 + len(model.dense_layers) * dense + d * model.vocab_size)
    return 3 * 2 * tokens * per_token
