"""The dense parallelisms of a training job: process groups laid on the GPUs, and every byte of
their collectives (tensor/sequence parallel, pipeline sends, data parallel with ZeRO/FSDP).

Process groups are laid out as Megatron-Core's RankGenerator does (megatron/core/
parallel_state.py, `RankGenerator` and `generate_masks`): the dimensions of
`parallel.order` (fastest first, default "tp-ep-dp-pp") are the digits of the rank, so with
tp innermost a TP group is tp consecutive GPUs of one node. The dense layers decompose the
GPUs as tp x dp x pp (ep = 1); the MoE layers, with Megatron's "MoE parallel folding", as
etp x ep x edp x pp over the same order (tp reads etp, dp the expert data-parallel group
edp), so tp x dp = etp x ep x edp and both share the pipeline stages. A group of kind X is the
set of ranks that agree on every coordinate but X's.

Bytes, per rank (all collectives are rings in `moesim.sim.collectives`, so a k-member
all-reduce sends 2(k-1)/k of its buffer, an all-gather or reduce-scatter (k-1)/k):
- Tensor parallel (`tp_activation_bytes`): the block input/output of one micro-batch,
  tokens x d_model x dtype. With sequence parallel each TP block all-gathers it before its
  column-parallel GEMM and reduce-scatters after its row-parallel one (backward: the
  mirrors, and a second all-gather of the input for the weight gradient, as Megatron's
  LinearWithGradAccumulationAndAsyncCommunication does); without, one all-reduce after the
  block forward and one before it backward.
- Pipeline (`pp_send_bytes`): one micro-batch's activation to the next stage (its gradient
  back), the rank's sequence shard with sequence parallel (tokens / tp), else all of it.
- Expert tensor parallel (`etp_gather_bytes`): the rows an ETP group's members received from
  their EP all-to-alls, all-gathered before the experts and reduce-scattered after them.
- Data parallel (`grad_buckets`, `weight_collective_bytes`): per-rank gradients of the
  stage's weights in buckets of `dp_bucket_params` parameters (Megatron-Core DDP: max(40M,
  1M x dp)), filled in backward order, dense weights and expert weights in separate buffers
  over their own groups (dp, edp). ZeRO 0 all-reduces a bucket; ZeRO 1/2 reduce-scatter it
  and all-gather the updated weights; ZeRO 3 all-gathers each layer's weights before its
  forward and again before its backward and reduce-scatters its gradients after the
  backward, every micro-batch (torch FSDP without no_sync): 3 x the weights per micro-batch.
  Gradients move in fp32 with mixed precision (Megatron's bf16 runs accumulate and reduce in
  fp32), else in the model dtype; weights in the model dtype.
Ignored: bucket padding to multiples of dp, NCCL's own chunking, the vocab-parallel loss's
small all-reduces beyond their bytes (tokens x 4 bytes, two of them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from moesim.config import Config, ModelConfig
from moesim.errors import InputError

DIMS = ("tp", "ep", "dp", "pp")
_STAGE_GROUPS: dict = {}


@dataclass(frozen=True)
class Layout:
    """Sizes of every parallel dimension and the rank order; `groups(kind)` lays them out."""

    gpus: int
    tp: int
    pp: int
    dp: int
    ep: int
    etp: int
    edp: int
    order: tuple[str, ...] = DIMS

    @property
    def stage_size(self) -> int:
        return self.gpus // self.pp

    def _grid(self, expert: bool) -> np.ndarray:
        """Ranks as an array indexed [coordinate of the slowest dim, ..., of the fastest]."""
        size = ({"tp": self.etp, "ep": self.ep, "dp": self.edp, "pp": self.pp} if expert else
                {"tp": self.tp, "ep": 1, "dp": self.dp, "pp": self.pp})
        return np.arange(self.gpus).reshape([size[d] for d in reversed(self.order)])

    def groups(self, kind: str) -> np.ndarray:
        """int64[G, k]: the G groups of kind `kind` ("tp", "dp", "pp" of the dense layers;
        "ep", "etp", "edp" of the MoE layers), each listing its k ranks in rank order."""
        expert = kind in ("ep", "etp", "edp")
        dim = {"etp": "tp", "edp": "dp"}.get(kind, kind)
        grid = self._grid(expert)
        axis = len(self.order) - 1 - self.order.index(dim)
        return np.moveaxis(grid, axis, -1).reshape(-1, grid.shape[axis]).astype(np.int64)

    def stage(self, s: int) -> np.ndarray:
        """int64[gpus / pp]: the ranks of pipeline stage s, ascending. Position i of every
        stage holds the ranks that agree on every coordinate but pp (pipeline peers)."""
        return np.sort(self.groups("pp")[:, s])

    def stage_groups(self, kind: str, s: int) -> np.ndarray:
        """The groups of `kind` inside stage s, as positions in `stage(s)`."""
        key = (self, kind, s)
        if key not in _STAGE_GROUPS:
            _STAGE_GROUPS[key] = self._stage_groups(kind, s)
        return _STAGE_GROUPS[key]

    def _stage_groups(self, kind: str, s: int) -> np.ndarray:
        ranks = self.stage(s)
        pos = np.full(self.gpus, -1, dtype=np.int64)
        pos[ranks] = np.arange(len(ranks))
        g = self.groups(kind)
        g = g[np.isin(g[:, 0], ranks)]
        return pos[g]


def layout(cfg: Config) -> Layout:
    """The job's Layout from [parallel] and the cluster; InputError naming the field when the
    sizes do not divide."""
    p, n = cfg.parallel, cfg.cluster.num_gpus
    src = cfg.source
    for name, v in (("tp", p.tp), ("pp", p.pp)):
        if n % v:
            raise InputError(src, f"parallel.{name}", f"{v} does not divide the cluster's "
                             f"{n} GPUs")
    if n % (p.tp * p.pp):
        raise InputError(src, "parallel.tp", f"tp x pp = {p.tp * p.pp} does not divide the "
                         f"cluster's {n} GPUs")
    stage = n // p.pp
    dp = stage // p.tp
    if stage % p.etp:
        raise InputError(src, "parallel.etp", f"{p.etp} does not divide a pipeline stage's "
                         f"{stage} GPUs")
    ep = p.degree or stage // p.etp
    if stage % (ep * p.etp):
        raise InputError(src, "parallel.degree", f"the MoE group of {ep} ranks x etp "
                         f"{p.etp} does not divide a pipeline stage's {stage} GPUs")
    return Layout(n, p.tp, p.pp, dp, ep, p.etp, stage // (ep * p.etp),
                  tuple(p.order.split("-")))


# --- bytes ----------------------------------------------------------------------------------
def ring_sent(kind: str, members: int, buffer_bytes: float) -> float:
    """Bytes one member of a `members`-rank ring sends for a collective over a buffer of
    `buffer_bytes` (the whole buffer of one member: all-reduce 2(k-1)/k, all-gather and
    reduce-scatter (k-1)/k)."""
    if members < 2:
        return 0.0
    f = 2.0 if kind == "all_reduce" else 1.0
    return f * (members - 1) / members * buffer_bytes


def tp_activation_bytes(model: ModelConfig, tokens: int) -> float:
    """The activation a TP block gathers or reduces: one micro-batch's `tokens` (entering the
    TP group) x d_model x dtype."""
    return float(tokens) * model.d_model * model.dtype_bytes


def pp_send_bytes(model: ModelConfig, tokens: int, tp: int, sp: bool) -> float:
    """A stage's activation (or its gradient) a rank sends its pipeline peer, per micro-batch."""
    return tp_activation_bytes(model, tokens) / (tp if sp and tp > 1 else 1)


def loss_all_reduce_bytes(tokens: int) -> float:
    """One of the vocab-parallel cross-entropy's all-reduces (the max, then the sum of the
    exponentials): one fp32 value per token."""
    return 4.0 * tokens


def stage_layers(model: ModelConfig, pp: int) -> list[list[int]]:
    """Decoder layers of each pipeline stage: an even split, the first stages take the rest
    (as moesim.sim.memory counts them)."""
    base, extra = divmod(model.num_layers, pp)
    out, i = [], 0
    for s in range(pp):
        k = base + (1 if s < extra else 0)
        out.append(list(range(i, i + k)))
        i += k
    return out


@dataclass(frozen=True)
class UnitParams:
    """Parameters one rank holds of one unit of a stage (the embedding, a decoder layer, or
    the output: final norm and LM head), before ZeRO sharding."""

    unit: int          # -1: embedding, 0..L-1: decoder layer, L: output
    dense: float       # replicated over the dp group
    expert: float      # replicated over the edp group


def unit_params(model: ModelConfig, lay: Layout, s: int) -> list[UnitParams]:
    """The units of stage s in forward order with their per-rank parameters: attention, dense
    MLP, shared experts, embedding and LM head split over tp; norms and routers (and
    Multi-Head LatentMoE's projections) replicated; routed experts over ep x etp. The last
    stage holds a tied embedding again when it is not the first (Megatron)."""
    layers = stage_layers(model, lay.pp)[s]
    out = []
    if s == 0:
        out.append(UnitParams(-1, model.embedding_params / lay.tp, 0.0))
    for i in layers:
        parts = model.layer_params(i)
        dense = (parts["attention"] + parts.get("dense_mlp", 0)
                 + parts.get("shared_experts", 0)) / lay.tp
        dense += parts["norms"] + parts.get("router", 0)
        out.append(UnitParams(i, dense, parts.get("experts", 0) / (lay.ep * lay.etp)))
    if s == lay.pp - 1:
        head = model.norm_params
        if not model.tie_embeddings:
            head += model.lm_head_params / lay.tp
        elif s != 0:
            head += model.embedding_params / lay.tp
        out.append(UnitParams(model.num_layers, head, 0.0))
    return out


def bucket_size(cfg: Config, lay: Layout) -> int:
    """Parameters per gradient bucket: parallel.dp_bucket_params, else Megatron-Core's
    default max(40M, 1M x dp)."""
    return cfg.parallel.dp_bucket_params or max(40_000_000, 1_000_000 * lay.dp)


@dataclass(frozen=True)
class Bucket:
    """Gradients of some units reduced in one collective over the `group` ("dp" or "edp")."""

    group: str
    params: float                  # per rank
    units: tuple[int, ...]         # unit ids (UnitParams.unit), in backward order


def grad_buckets(units: list[UnitParams], size: int) -> list[Bucket]:
    """Buckets in the order they become ready: units taken in backward order, a bucket closes
    once it holds `size` parameters or more; dense and expert gradients in separate buckets.
    Empty groups hold no bucket."""
    out = []
    for group in ("dp", "edp"):
        cur, members = 0.0, []
        for u in reversed(units):
            n = u.dense if group == "dp" else u.expert
            if n <= 0:
                continue
            cur += n
            members.append(u.unit)
            if cur >= size:
                out.append(Bucket(group, cur, tuple(members)))
                cur, members = 0.0, []
        if members:
            out.append(Bucket(group, cur, tuple(members)))
    # Ready order: by the position in backward order of each bucket's last unit.
    rank = {u.unit: i for i, u in enumerate(reversed(units))}
    return sorted(out, key=lambda b: (rank[b.units[-1]], b.group))


def weight_collective_bytes(cfg: Config, kind: str, params: float) -> float:
    """The buffer of a data-parallel collective over `params` parameters: weights (an
    all-gather) in the model dtype, gradients (all-reduce, reduce-scatter) in
    `grad_bytes_per_param`."""
    width = cfg.model.dtype_bytes if kind == "all_gather" else grad_bytes_per_param(cfg)
    return float(params) * width


def etp_gather_bytes(model: ModelConfig, rows: float) -> float:
    """Expert tensor parallel: the buffer an ETP group all-gathers before its experts, the
    (token, expert) rows its members received x the expert input width x dtype."""
    return float(rows) * model.expert_dim * model.dtype_bytes


def grad_bytes_per_param(cfg: Config) -> int:
    """Gradient element size in the reduction: fp32 with mixed precision, else the dtype."""
    return 4 if cfg.train.precision == "mixed" else cfg.model.dtype_bytes


def group_size(lay: Layout, group: str) -> int:
    return {"dp": lay.dp, "edp": lay.edp, "tp": lay.tp, "ep": lay.ep, "etp": lay.etp,
            "pp": lay.pp}[group]


def shard(params: float, members: int) -> float:
    """A rank's 1/members share of `params` (ZeRO), rounded up to whole parameters."""
    return float(math.ceil(params / members)) if members > 1 else params
