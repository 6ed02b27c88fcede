"""Per-GPU peak memory of a training iteration: what torch's caching allocator holds at the
step's high point (what `torch.cuda.max_memory_allocated` reads), and whether it fits.

peak(stage) = weights + gradients + optimizer states                 (persistent)
            + in_flight(stage) x activations of one micro-batch     (saved for backward)
            + communication buffers, FSEP's materialised experts    (gathered weights)
            + the largest transient working set                     (loss, a block's backward)
and the GPU's peak is the largest stage's. Each term, and what it assumes:

- Weights on a rank: the stage's layers' attention, norms, dense MLPs, shared experts,
  routers (and Multi-Head LatentMoE projections) over tensor parallel `tp` (norms and
  routers replicated), the embedding on the first stage and the LM head on the last (both
  vocab-parallel over tp; a tied LM head is held again by the last stage when pp > 1, as
  Megatron does). Routed experts over the expert group: total / (ep x etp) (EP and HP own
  whole experts; FSEP's flat 1/ep shards are the same bytes).
- Precision (`precision`): "mixed" (Megatron): weights in model.dtype, fp32 main gradients,
  fp32 master weights and Adam moments, 2 + 4 + 12 bytes a parameter for bf16 (under ZeRO-3,
  torch FSDP2's 4 + 4 + 8: the fp32 shards are the master weights); "pure" (runtime/: torch
  AdamW on bf16 parameters): dtype for all four, 2 + 2 + 4.
- ZeRO (`zero`) over the data-parallel replicas of each weight (dense: dp; experts: the
  expert data-parallel group dp x tp / (ep x etp)): 1 shards the optimizer states (Megatron's
  distributed optimizer), 2 also the gradients, 3 (FSDP) also the weights, with the
  unsharded weights of `1 + zero3_prefetch` layers gathered at a time (a buffer).
- Activations of one micro-batch, per layer and token, enumerated tensor by tensor as in
  Korthikanti et al. 2022 (arXiv 2205.05198, section 4; their GPT block gives 34 sbh + 5as^2b
  bytes, of which the dropout masks (2 sbh) and the s x s scores (5as^2b) do not exist here:
  dropout is 0 and attention is FlashAttention, which saves Q, K, V, its output and the fp32
  log-sum-exp; tests/simulator/test_memory.py checks the enumeration reproduces their 32 sbh
  for a GPT block, with and without sequence parallel). Saved per layer: each norm's input
  (and its fp32 1/rms), the QKV GEMM's input, Q/K/V (after RoPE; qk-norm's inputs), the
  attention output (also the out-projection's input), the MLP's input, first GEMM output
  and activation output; an MoE layer saves the router's input and fp32 probabilities, the
  permutation indices, and per routed (token, expert) row the expert input, first GEMM
  output, activation output and expert output (the combine's gate gradient needs it);
  Multi-Head LatentMoE also the latent before and after the experts. With sequence parallel
  the norm inputs and the tensors Megatron saves before its all-gathers are 1/tp.
  Recompute (`recompute`): "full" keeps each layer's input only, and the layer being
  back-propagated holds its whole activations again (transient); "selective" (Megatron's
  core_attn) drops what the attention kernel saves beyond its inputs and output: only the
  log-sum-exp, since FlashAttention never stores the s x s scores that Korthikanti's
  selective recompute removes.
- Routed rows a rank computes: `moe_rows_per_token` x its tokens (balanced: top_k x heads);
  give the hottest rank's ratio from planner/ (max of LayerTraffic.rank_tokens() / tokens)
  for a skewed trace.
- Pipeline 1F1B: stage i holds min(pp - i, micro_batches) micro-batches' activations at its
  peak; without PP one (gradient accumulation frees each before the next); interleaved with
  `vp` chunks a rank, Megatron-Core's warm-up count (see _in_flight). Layers split evenly
  (the first stages take the remainder).
- Last stage: the final norm and LM head inputs, and the loss as implemented (`loss`):
  "torch" (runtime/train.py: the bf16 logits stay referenced, the fp32 log-softmax is saved;
  its backward adds the NLL gradient and the log-softmax gradient, fp32), "torch_nocast"
  (the same in the model dtype, no fp32 copy) or "megatron" (its
  vocab-parallel cross-entropy keeps the fp32 softmax, computes the gradient in place and
  casts it back to bf16).
- Communication buffers: the largest all-to-all send or receive copy of the MoE layer not
  already saved (rows x expert width), sequence parallel's all-gathered layer input
  (tokens x d_model, Megatron's global buffer), ZeRO-3's gathered weights, and FSEP's
  materialised experts: `fsep_slots` full experts a layer, for `1 + fsep_prefetch` layers
  when the backward gathers them again (parallel.fsep_backward_gather), else for every MoE
  layer of the stage and micro-batch in flight (the forward's copies are kept for the
  backward, as runtime/ does), plus their full gradients before the reduce-scatter (one
  layer).
- Transient: the larger of the loss's backward working set (last stage) and a block's
  backward, which holds gradients as large as the block's saved activations (the output
  gradient in, the input gradients out).
Not counted (outside torch's allocator or below its resolution): the CUDA context, NCCL's own
buffers, cuBLAS/cuDNN workspaces, allocator fragmentation and rounding. `fits` leaves
`reserve_gib` for them (assumed 2 GiB: the CUDA context takes about 0.5 GiB on Hopper, each
NCCL communicator tens to hundreds of MiB).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from moesim.config import Config, ModelConfig
from moesim.errors import InputError

GIB = 2.0**30
# GPU memory as nvidia-smi reports it (MiB): H200 SXM 143771, H100 SXM 81559, A100 80GB
# 81920, A100 40GB 40960 (datasheets: 141 GB, 80 GB, 80 GB, 40 GB).
GPU_MEMORY_GIB = {"h200": 143771 / 1024, "h100": 81559 / 1024, "a100": 80.0,
                  "a100-40gb": 40.0}
RESERVE_GIB = 2.0
LOSSES = ("torch", "torch_nocast", "megatron")


@dataclass(frozen=True)
class Training:
    """How one iteration is laid out on the GPUs: what memory depends on besides the model."""

    micro_batch: int = 1           # sequences per micro-batch
    micro_batches: int = 1         # micro-batches per iteration (per pipeline)
    tp: int = 1                    # tensor parallel
    sp: bool = False               # sequence parallel (with tp)
    pp: int = 1                    # pipeline stages
    vp: int = 1                    # virtual stages (model chunks) per pipeline rank
    dp: int = 1                    # data-parallel replicas of the dense weights
    ep: int = 1                    # ranks an MoE layer's experts spread over (EP/HP/FSEP group)
    etp: int = 1                   # expert tensor parallel
    zero: int = 0                  # 0 (DDP) .. 3 (FSDP)
    zero3_prefetch: int = 1        # ZeRO-3: layers gathered ahead of the one running
    recompute: str = "none"        # none | selective | full
    precision: str = "mixed"       # mixed | pure
    loss: str = "megatron"         # torch | megatron
    strategy: str = "ep"           # ep | hp | fsep
    fsep_slots: int = 0            # FSEP: experts a rank materialises per layer
    fsep_prefetch: int = 2         # FSEP: layers gathered ahead (LAER-MoE: two)
    fsep_backward_gather: bool = True
    moe_rows_per_token: float = 0.0  # routed rows per local token on the hottest rank; 0: k x heads
    norm_impl: str = "fused"       # fused (saves x, 1/rms) | composite (torch ops: also x/rms)

    def __post_init__(self) -> None:
        if self.recompute not in ("none", "selective", "full"):
            raise ValueError(f"recompute {self.recompute!r}")
        if self.norm_impl not in ("fused", "composite"):
            raise ValueError(f"norm_impl {self.norm_impl!r}")
        if self.precision not in ("mixed", "pure") or self.loss not in LOSSES:
            raise ValueError(f"precision {self.precision!r} / loss {self.loss!r}")
        if not 0 <= self.zero <= 3:
            raise ValueError(f"zero {self.zero}")
        if (self.dp * self.tp) % (self.ep * self.etp):
            raise ValueError(f"ep x etp = {self.ep * self.etp} must divide dp x tp = "
                             f"{self.dp * self.tp}")

    @property
    def expert_dp(self) -> int:
        """Replicas of each expert weight (Megatron's expert data-parallel group)."""
        return self.dp * self.tp // (self.ep * self.etp)

    @property
    def gpus(self) -> int:
        return self.dp * self.tp * self.pp


@dataclass
class Memory:
    """Peak memory of the worst stage, by term (bytes), and the GPU's capacity."""

    stage: int
    terms: dict[str, float]
    capacity_gib: float
    reserve_gib: float = RESERVE_GIB
    stages: list[dict[str, float]] = field(default_factory=list)

    @property
    def peak(self) -> float:
        return sum(self.terms.values())

    @property
    def peak_gib(self) -> float:
        return self.peak / GIB

    @property
    def fits(self) -> bool:
        return self.peak_gib + self.reserve_gib <= self.capacity_gib

    def verdict(self) -> str:
        """'fits: X GiB of Y' or 'does not fit: needs X GiB of Y' (X with the reserve)."""
        need = self.peak_gib + self.reserve_gib
        word = "fits" if self.fits else "does not fit: needs"
        return f"{word} {need:.1f} GiB of {self.capacity_gib:.1f}"


# -- activations ---------------------------------------------------------------------------
def _norm(name: str, p: int, d: int, a: float, impl: str) -> dict[str, float]:
    """A norm's saved tensors: its input and fp32 1/rms; torch's composite RMSNorm (pow,
    mean, rsqrt, two multiplies: the CPU path) also keeps x / rms for the weight's multiply."""
    out = {f"{name}.in": p * d * a, f"{name}.rstd": 4 * a}
    if impl == "composite":
        out[f"{name}.normed"] = p * d * a
    return out


def attention_activations(model: ModelConfig, tp: int, sp: bool,
                          recompute: str = "none", norm_impl: str = "fused"
                          ) -> dict[str, float]:
    """Bytes per token one attention block saves for its backward, by tensor."""
    p, d = model.dtype_bytes, model.d_model
    a = 1.0 / tp if sp else 1.0
    h = math.ceil(model.attn_heads / tp)
    dq, dv = model.qk_head_dim, model.v_dim
    out = _norm("attn_norm", p, d, a, norm_impl)
    if model.attention == "mla":
        out["q_a/kv_a.in"] = p * d * a
        if model.q_lora_rank:
            out["q_norm.in"] = out["q_b.in"] = p * model.q_lora_rank
        out["kv_norm.in"] = p * (model.kv_lora_rank + model.qk_rope_head_dim)
        out["kv_b.in"] = p * model.kv_lora_rank
        hk = h
    else:
        out["qkv.in"] = p * d * a
        hk = math.ceil(model.num_kv_heads / tp)
        if model.qk_norm:
            out["qk_norm.in"] = p * (h + hk) * dq
    out["attention.qkv"] = p * (h * dq + hk * (dq + dv))
    out["attention.out"] = p * h * dv       # also the out-projection's input
    if recompute != "selective":
        out["attention.lse"] = 4.0 * h
    return out


def mlp_activations(model: ModelConfig, layer: int, tp: int, sp: bool,
                    rows_per_token: float = 0.0, etp: int = 1, norm_impl: str = "fused"
                    ) -> dict[str, float]:
    """Bytes per token one MLP block (dense, or MoE with its shared experts) saves."""
    p, d, m = model.dtype_bytes, model.d_model, model.mlp_matrices
    a = 1.0 / tp if sp else 1.0
    out = _norm("mlp_norm", p, d, a, norm_impl) | {"mlp.in": p * d * a}
    if not model.is_moe(layer):
        f = math.ceil(model.d_ffn_dense / tp)
        out |= {"dense.fc1_out": p * (m - 1) * f, "dense.act_out": p * f}
        return out
    if model.shared_experts:
        f = math.ceil(model.shared_experts * model.shared_ffn / tp)
        out |= {"shared.fc1_out": p * (m - 1) * f, "shared.act_out": p * f}
    heads, k = model.num_heads, model.top_k
    rows = rows_per_token or heads * k
    # MoE tokens are the sequence-parallel shard when sp (each TP rank routes its own).
    out["router.probs"] = 4.0 * model.total_experts * a
    out["permute.index"] = 8.0 * heads * k * a
    if heads > 1:
        out["latent.down_out"] = p * model.latent_dim * a
        out["latent.up_in"] = p * model.latent_dim * a
    de, f = model.expert_dim, math.ceil(model.d_ffn / etp)
    out |= {"experts.in": p * rows * de * a, "experts.fc1_out": p * rows * (m - 1) * f * a,
            "experts.act_out": p * rows * f * a, "experts.out": p * rows * de * a}
    return out


def layer_activations(model: ModelConfig, layer: int, t: Training) -> float:
    """Bytes per token decoder layer `layer` keeps from its forward to its backward."""
    if t.recompute == "full":
        return model.dtype_bytes * model.d_model * (1.0 / t.tp if t.sp else 1.0)
    return (sum(attention_activations(model, t.tp, t.sp, t.recompute, t.norm_impl).values())
            + sum(mlp_activations(model, layer, t.tp, t.sp, t.moe_rows_per_token,
                                  t.etp, t.norm_impl).values()))


def _block_peak(model: ModelConfig, layer: int, t: Training) -> float:
    """Bytes per token of the larger block's saved activations (its backward's gradients)."""
    att = sum(attention_activations(model, t.tp, t.sp, norm_impl=t.norm_impl).values())
    mlp = sum(mlp_activations(model, layer, t.tp, t.sp, t.moe_rows_per_token, t.etp,
                              t.norm_impl).values())
    return max(att, mlp)


def output_activations(model: ModelConfig, t: Training) -> tuple[float, float]:
    """(saved, backward transient) bytes per token of the last stage's norm, head and loss."""
    p, d = model.dtype_bytes, model.d_model
    a = 1.0 / t.tp if t.sp else 1.0
    v = math.ceil(model.vocab_size / t.tp)
    # The final norm's saved tensors and the LM head's input.
    saved = sum(_norm("final_norm", p, d, a, t.norm_impl).values()) + p * d * a
    if t.loss == "torch":
        return saved + (p + 4) * v, 8.0 * v     # bf16 logits + fp32 log-softmax; two grads
    if t.loss == "torch_nocast":
        return saved + 2.0 * p * v, 2.0 * p * v  # logits + log-softmax; two grads, model dtype
    return saved + 4.0 * v, float(p * v)        # fp32 softmax; its bf16 gradient


# -- weights ---------------------------------------------------------------------------------
def stage_layers(model: ModelConfig, pp: int) -> list[list[int]]:
    """Decoder layers of each pipeline stage: even split, the first stages take the rest."""
    base, extra = divmod(model.num_layers, pp)
    out, i = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(list(range(i, i + n)))
        i += n
    return out


def stage_params(model: ModelConfig, layers: list[int], t: Training, first: bool, last: bool
                 ) -> tuple[float, float]:
    """(dense, expert) parameters one rank of the stage holds, before ZeRO sharding."""
    dense = 0.0
    expert = 0.0
    for i in layers:
        parts = model.layer_params(i)
        dense += (parts["attention"] + parts.get("dense_mlp", 0)
                  + parts.get("shared_experts", 0)) / t.tp
        dense += parts["norms"] + parts.get("router", 0)
        expert += parts.get("experts", 0) / (t.ep * t.etp)
    if first:
        dense += model.embedding_params / t.tp
    if last:
        dense += model.norm_params
        if not model.tie_embeddings:
            dense += model.lm_head_params / t.tp
        elif not first:  # the last stage's copy of a tied embedding
            dense += model.embedding_params / t.tp
    return dense, expert


def _state_bytes(n: float, replicas: int, t: Training, p: int) -> dict[str, float]:
    """Weights, gradients and optimizer states of `n` parameters replicated `replicas` ways.
    Mixed precision under ZeRO-3 is torch FSDP2's: the fp32 shards are the master weights
    (4 / replicas), the model-dtype weights exist only gathered (comm_buffers)."""
    shard = lambda stage: replicas if t.zero >= stage else 1  # noqa: E731
    if t.precision == "mixed":
        weight_w, grad_w, opt_w = (4, 4, 8) if t.zero == 3 else (p, 4, 12)
    else:
        weight_w, grad_w, opt_w = p, p, 2 * p
    return {"weights": n * weight_w / shard(3), "gradients": n * grad_w / shard(2),
            "optimizer": n * opt_w / shard(1)}


# -- the estimate ----------------------------------------------------------------------------
def estimate(model: ModelConfig, t: Training, capacity_gib: float,
             reserve_gib: float = RESERVE_GIB) -> Memory:
    """Peak memory per GPU: the worst pipeline stage's terms."""
    p = model.dtype_bytes
    tokens = t.micro_batch * model.seq_len
    a = 1.0 / t.tp if t.sp else 1.0
    stages = []
    for s, layers in enumerate(stage_layers(model, t.pp)):
        first, last = s == 0, s == t.pp - 1
        dense, expert = stage_params(model, layers, t, first, last)
        terms = {k: v for k, v in _state_bytes(dense, t.dp, t, p).items()}
        for k, v in _state_bytes(expert, t.expert_dp, t, p).items():
            terms[k] += v
        in_flight = _in_flight(t, s)
        act = sum(layer_activations(model, i, t) for i in layers)
        trans = 0.0
        if t.recompute == "full" and layers:
            saved_all = dataclasses.replace(t, recompute="none")
            trans = max(layer_activations(model, i, saved_all) for i in layers)
        trans += max((_block_peak(model, i, t) for i in layers), default=0.0)
        if last:
            saved, loss_trans = output_activations(model, t)
            act += saved
            trans = max(trans, loss_trans)
        terms["activations"] = in_flight * act * tokens
        terms["transient"] = trans * tokens
        terms["comm_buffers"] = _buffers(model, layers, t, tokens, a)
        terms["fsep_experts"] = _fsep_experts(model, layers, t, in_flight)
        stages.append(terms)
    worst = max(range(len(stages)), key=lambda i: sum(stages[i].values()))
    return Memory(worst, stages[worst], capacity_gib, reserve_gib, stages)


def _in_flight(t: Training, stage: int) -> float:
    """Micro-batches' worth of the stage's activations held at its peak. 1F1B: min(pp -
    stage, micro_batches). Interleaved (vp model chunks a rank, Megatron-Core's schedule):
    the warm-up holds 2 (pp - stage - 1) + (vp - 1) pp chunk forwards, the first backward
    waits for one more, each chunk 1/vp of the stage's layers (on the first stage 1 + (pp -
    1) / (pp vp) times 1F1B's, Korthikanti et al. 2022, section 4.2.3)."""
    if t.vp == 1:
        return float(min(t.pp - stage, t.micro_batches))
    chunks = min(2 * (t.pp - stage - 1) + (t.vp - 1) * t.pp + 1, t.micro_batches * t.vp)
    return chunks / t.vp


def _buffers(model: ModelConfig, layers: list[int], t: Training, tokens: float, a: float
             ) -> float:
    p = model.dtype_bytes
    moe = [i for i in layers if model.is_moe(i)]
    out = 0.0
    if moe:
        rows = t.moe_rows_per_token or model.num_heads * model.top_k
        out += p * rows * model.expert_dim * tokens * a   # an all-to-all's unsaved copy
    if t.tp > 1 and t.sp:
        out += p * model.d_model * tokens                 # the all-gathered layer input
    if t.zero == 3 and layers:
        # The rank's share of a layer, unsharded: dense over tp, experts over ep x etp.
        per_layer = max(sum(stage_params(model, [i], t, False, False)) for i in layers)
        out += (1 + t.zero3_prefetch) * per_layer * p
    return out


def _fsep_experts(model: ModelConfig, layers: list[int], t: Training, in_flight: float
                  ) -> float:
    """FSEP's materialised experts: full weights of fsep_slots experts a layer, for the
    layers held at once, and one layer's full gradients before their reduce-scatter."""
    moe = [i for i in layers if model.is_moe(i)]
    if t.strategy != "fsep" or not moe or not t.fsep_slots:
        return 0.0
    p = model.dtype_bytes
    one = t.fsep_slots * model.expert_params * p / t.etp
    held = (1 + t.fsep_prefetch) if t.fsep_backward_gather else len(moe) * in_flight
    grad_w = 4 if t.precision == "mixed" else p
    return one * held + t.fsep_slots * model.expert_params * grad_w / t.etp


def training_from_config(cfg: Config, runtime: bool = False, **overrides) -> Training:
    """The Training layout of a config. The whole iteration (train.scope = "iteration"):
    [parallel] tp, sequence_parallel, pp, etp, zero and the MoE group (cfg.num_ranks), dp =
    GPUs / (tp x pp), [train] micro_batch_size, micro_batches, recompute, precision,
    loss_impl. Otherwise (the MoE-layer scope, and runtime/'s jobs): one micro-batch of
    run.tokens_per_rank tokens a rank, data-parallel dense weights, no TP/PP. `runtime`: as
    runtime/train.py trains whatever [train] says (every tensor in the model's dtype, torch's
    AdamW and cross-entropy on the whole logits). `overrides` set any Training field."""
    m, par, tr = cfg.model, cfg.parallel, cfg.train
    fsep = par.strategy == "fsep"
    base = {"ep": cfg.num_ranks, "etp": par.etp, "strategy": par.strategy,
            "fsep_slots": cfg.planner.slots_per_rank if fsep else 0,
            "fsep_backward_gather": par.fsep_backward_gather}
    if tr.scope == "iteration" and not runtime:
        base |= {"micro_batch": tr.micro_batch_size, "micro_batches": tr.micro_batches,
                 "tp": par.tp, "sp": par.sequence_parallel and par.tp > 1, "pp": par.pp,
                 "dp": max(cfg.cluster.num_gpus // (par.tp * par.pp), 1), "zero": par.zero,
                 "recompute": tr.recompute, "precision": tr.precision, "loss": tr.loss_impl}
    else:
        if cfg.run.tokens_per_rank % m.seq_len and "micro_batch" not in overrides:
            raise InputError(cfg.source, "run.tokens_per_rank", f"{cfg.run.tokens_per_rank} "
                             f"is not a multiple of model.seq_len = {m.seq_len}")
        base |= {"micro_batch": max(cfg.run.tokens_per_rank // m.seq_len, 1),
                 "dp": cfg.cluster.num_gpus, "etp": 1}
        base |= ({"precision": "pure", "loss": "torch",
                  "norm_impl": "composite" if cfg.run.device == "cpu" else "fused"}
                 if runtime else {"precision": tr.precision, "loss": tr.loss_impl})
    return Training(**{**base, **overrides})


def gpu_capacity_gib(cfg: Config) -> float:
    """The GPU's memory: cluster.gpu_memory_gib, else GPU_MEMORY_GIB of cluster.gpu."""
    if cfg.cluster.gpu_memory_gib:
        return cfg.cluster.gpu_memory_gib
    if cfg.cluster.gpu not in GPU_MEMORY_GIB:
        raise InputError(cfg.source, "cluster.gpu_memory_gib", f"no memory size known for "
                         f"GPU kind {cfg.cluster.gpu!r} ({', '.join(GPU_MEMORY_GIB)}): set it")
    return GPU_MEMORY_GIB[cfg.cluster.gpu]


def estimate_config(cfg: Config, runtime: bool = False, **overrides) -> Memory:
    """`estimate` for a config (training_from_config) on its cluster's GPU."""
    return estimate(cfg.model, training_from_config(cfg, runtime, **overrides),
                    gpu_capacity_gib(cfg))
