"""Experiment configuration: one frozen dataclass per TOML section, validated once on load.

A config file has the sections [model], [cluster], [parallel], [planner] and [run]; each maps
onto the dataclass of the same name below. Every field is typed and may carry limits in its
metadata (`choices`, `min`, `max`); `load_config` checks them all and raises `InputError`
naming the file, the field and what is allowed. Code past the loader trusts the config.
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
STRATEGIES = ("ep", "hp", "fsep")


def _f(default: Any, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, doc: str = "") -> Any:
    meta = {"choices": choices, "min": lo, "max": hi, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """The MoE model. With `num_heads` > 1 it is a Multi-Head LatentMoE: each token is projected
    to a latent of `num_heads * head_dim`, and each head routes its sub-token to `top_k` of its
    own `num_experts` experts, whose FFNs work in `head_dim` with hidden size `d_ffn`."""

    name: str = _f("moe", doc="a label carried into traces and results")
    num_layers: int = _f(8, lo=1, doc="MoE layers")
    d_model: int = _f(2048, lo=1)
    d_ffn: int = _f(1408, lo=1, doc="expert FFN hidden size")
    num_experts: int = _f(64, lo=1, doc="experts per head (all experts when num_heads = 1)")
    top_k: int = _f(8, lo=1, doc="experts each token (sub-token) visits")
    num_heads: int = _f(1, lo=1, doc="Multi-Head LatentMoE heads; 1 is a standard MoE")
    head_dim: int = _f(0, lo=0, doc="latent width per head; required when num_heads > 1")
    dtype: str = _f("bf16", choices=tuple(DTYPE_BYTES))
    router: str = _f("softmax", choices=("softmax", "sigmoid"))
    activation: str = _f("kernel", choices=("unfused", "kernel", "fused"),
                         doc="the experts' SwiGLU: 'unfused' as separate torch ops; 'kernel' "
                             "one fused memory-bound kernel forward and one backward (what "
                             "runtime/ runs, kernels/swiglu.py); 'fused' in the up GEMM's "
                             "epilogue, moving no extra bytes")
    vocab_size: int = _f(32000, lo=2, doc="runtime model only")
    seq_len: int = _f(2048, lo=1, doc="runtime model only")
    attn_heads: int = _f(16, lo=1, doc="runtime model only")

    def _check(self) -> list[tuple[str, str]]:
        errs = []
        if self.top_k > self.num_experts:
            errs.append(("top_k", f"{self.top_k} exceeds num_experts = {self.num_experts}"))
        if self.num_heads > 1 and self.head_dim == 0:
            errs.append(("head_dim", "must be > 0 when num_heads > 1"))
        if self.d_model % self.attn_heads:
            errs.append(("attn_heads", f"must divide d_model = {self.d_model}"))
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
        """Weights of one expert: gated FFN, up (2 x dim x ffn) and down (ffn x dim)."""
        return 3 * self.expert_dim * self.d_ffn


@dataclass(frozen=True)
class ClusterConfig:
    """The machines: a named preset, or an explicit topology file (TOML or GraphML)."""

    preset: str = _f("dgx-h200", doc="topology preset name (see `moesim topo list`)")
    topology_file: str = _f("", doc="explicit topology; overrides preset when set")
    nodes: int = _f(1, lo=1)
    gpus_per_node: int = _f(8, lo=1)
    gpu: str = _f("h200", doc="GPU kind: selects the compute calibration file")
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
                                     doc="fraction of line rate a flow can reach (protocol)")
    collective_latency_us: float = _f(10.0, lo=0.0,
                                      doc="fixed cost of launching and synchronising one "
                                      "collective (NCCL kernel launch, handshake)")
    completion_tolerance: float = _f(0.02, lo=0.0, hi=0.5,
                                     doc="flow-level network: flows finishing within this "
                                     "fraction of the next completion time end in one event")

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
    """How the MoE layers are parallelised."""

    strategy: str = _f("ep", choices=STRATEGIES)
    degree: int = _f(0, lo=0, doc="ranks in the MoE group; 0 means every GPU of the cluster")
    ep_dedup: bool = _f(False, doc="EP: send a token once per node (DeepEP-style dispatch)")
    fsep_chunks: int = _f(4, lo=1, doc="FSEP: chunks that overlap shard gathers with compute")
    fsep_backward_gather: bool = _f(True, doc="FSEP: gather the experts' weights again for the "
                                    "backward (FSDP-style: freed in between); false keeps the "
                                    "forward's materialised weights, as runtime/ does")
    a2a_algorithm: str = _f("direct", choices=("direct", "hierarchical"),
                            doc="simulator: all-to-all as direct pairwise flows, or intra-node "
                            "then inter-node (same-rail) stages")
    dp_grad_sync: bool = _f(True, doc="simulator: all-reduce gradients of parameters replicated "
                            "across MoE groups (experts when degree < GPUs; router, latent "
                            "projections) after each layer's backward")


@dataclass(frozen=True)
class PlannerConfig:
    """Expert placement and the FSEP re-layout solver."""

    slots_per_rank: int = _f(8, lo=1, doc="FSEP: experts a rank may materialise at once")
    solver: str = _f("highs", choices=("highs", "cbc", "greedy", "laer"))
    time_limit_s: float = _f(10.0, lo=0.0)
    mip_gap: float = _f(0.01, lo=0.0, hi=1.0)
    change_penalty: float = _f(0.0, lo=0.0, doc="cost per replica moved between steps")
    ep_hot_replicas: int = _f(0, lo=0, doc="EP baseline: extra replicas of the hottest experts")
    threads: int = _f(1, lo=1, doc="solver threads; 1 keeps plans deterministic")
    gemm_tflops: float = _f(600.0, lo=1e-9, doc="re-layout time model: grouped GEMM TFLOP/s "
                            "per GPU (H200 bf16, DESIGN.md)")
    a2a_gbps: float = _f(200.0, lo=1e-9, doc="re-layout time model: all-to-all GB/s each GPU "
                         "receives (H200 NVLink, 16-128 MiB messages, DESIGN.md)")
    weight_passes: int = _f(1, lo=0, hi=3, doc="re-layout time model: weight-shard transfers "
                            "a replica exposes (fwd gather; 3 adds the bwd gather and the grad "
                            "scatter when they are not overlapped)")
    locality: bool = _f(False, doc="re-layout: count which source rank tokens come from (a "
                        "local replica saves their dispatch); off treats sources as even, "
                        "which makes ranks symmetric and the ILP faster")


@dataclass(frozen=True)
class RunConfig:
    """What to run: steps, seed, and where outputs go."""

    steps: int = _f(1, lo=1)
    seed: int = _f(0, lo=0)
    tokens_per_rank: int = _f(4096, lo=1, doc="tokens each rank brings to a step")
    out_dir: str = _f("out")
    # The fields below drive the real runtime (runtime/); the simulator ignores them.
    data: str = _f("synthetic", doc="runtime: 'synthetic' (seeded random tokens) or the path "
                   "of a UTF-8 text file read as byte tokens (vocab 256)")
    routing: str = _f("learned", choices=("learned", "forced"),
                      doc="runtime: 'learned' routes by the router's top-k; 'forced' takes each "
                      "layer's expert choices from a synthetic trace (routing_kind) so that the "
                      "load is controlled, the router still weighs the chosen experts")
    routing_kind: str = _f("uniform", choices=("uniform", "zipf", "drifting", "bursty"),
                           doc="runtime, forced routing: the traces.generators kind")
    routing_exponent: float = _f(1.2, lo=0.0, doc="runtime, forced zipf/drifting: skew")
    plan: str = _f("", doc="runtime, FSEP: a plan.json to replay; empty: plan online each step")
    lr: float = _f(3e-4, lo=0.0, doc="runtime: AdamW learning rate")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"),
                     doc="runtime: cuda with NCCL when available, else cpu with gloo")
    timeout_s: float = _f(300.0, lo=1.0, doc="runtime: collective timeout; a dead rank ends "
                          "the job with an error after this long instead of hanging")
    checkpoint_every: int = _f(0, lo=0, doc="runtime: checkpoint every N steps; 0: never")
    log_every: int = _f(1, lo=1, doc="runtime: print the loss every N steps")
    trace_out: bool = _f(True, doc="runtime: record the routing seen as trace.parquet")

    def _check(self) -> list[tuple[str, str]]:
        errs = []
        if self.data != "synthetic" and not Path(self.data).is_file():
            errs.append(("data", f"{self.data!r} is neither 'synthetic' nor a readable file"))
        if self.plan and not Path(self.plan).is_file():
            errs.append(("plan", f"{self.plan!r}: no such file"))
        return errs


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    run: RunConfig = field(default_factory=RunConfig)
    source: str = field(default="<defaults>", compare=False)

    @property
    def num_ranks(self) -> int:
        return self.parallel.degree or self.cluster.num_gpus


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "cluster": ClusterConfig,
    "parallel": ParallelConfig,
    "planner": PlannerConfig,
    "run": RunConfig,
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


def config_from_dict(raw: dict, source: str = "<dict>") -> Config:
    """Build and validate a Config from parsed TOML (section -> field -> value)."""
    for key, val in raw.items():
        if key not in SECTIONS:
            raise InputError(source, key, f"unknown section; allowed: {', '.join(SECTIONS)}")
        if not isinstance(val, dict):
            raise InputError(source, key, "must be a table ([section])")
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
