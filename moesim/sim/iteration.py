"""A whole training iteration: every micro-batch through the decoder on every pipeline stage
(1F1B), tensor/sequence parallel collectives inside each layer, the MoE layers' EP, HP or
FSEP program inside, data-parallel gradient reduction overlapped with the backward (DDP
buckets, ZeRO 1-3), and the AdamW step.

The program is built from tables (moesim.sim.programs): one decoder-layer table per strategy,
composed of an attention part, a dense-MLP part (dense layers), the strategy's MoE table with
the MLP norm and shared experts (MoE layers), a residual part, and the activation
checkpointing's recompute rows (copies of the forward rows issued before the layer's
backward); an embedding table (first stage) and an output table (final norm, LM head, loss;
last stage). Non-MoE costs are moesim.sim.decoder's, every byte is planner/'s
(planner.parallel for the dense parallelisms, planner.traffic for the MoE layers).

Layout (planner.parallel.Layout): tp x dp x pp for the dense layers, etp x ep x edp x pp for
the MoE layers (Megatron's MoE parallel folding), ranks ordered by parallel.order. A program
spans one stage's ranks per lane (executor: a lane per stage and stream); stages run the 1F1B
order (moesim.sim.pipeline), sends between them on the "pp" stream. Gradient buckets and
weight gathers run on the "dp" stream, tensor-parallel and expert collectives on "comm".

Assumed, and where each bounds the answer:
- Every rank of a stage does the same non-MoE work (equal tokens per rank); the MoE layers'
  per-rank skew comes from the trace. Trace counts are rescaled to the tokens a rank routes
  (micro_batch_size x seq_len, / tp with sequence parallel), keeping each source's
  distribution over experts (largest remainder, exact totals).
- Micro-batch i of iteration t replays trace step t x micro_batches + i (+ the group's
  offset), so micro-batches route differently.
- Collectives of different lanes that overlap in time (a DP bucket during an expert
  all-to-all, two stages' collectives) are each timed alone on the network: their contention
  is ignored (a lower bound on communication time).
- Tensor-parallel collectives run on the comm stream, blocking what waits for them (no
  TP-comm overlap); sequence parallel re-gathers a block's input in the backward for the
  weight gradient (Megatron), overlapped with the block's first backward GEMMs.
- ZeRO-1/2 weight all-gathers of an iteration are issued at its start (the previous step's
  optimizer has finished), each bucket's first forward waiting for it (overlap_param_gather);
  ZeRO-3 gathers a layer's weights one layer ahead in the forward and again in the backward,
  and reduce-scatters its gradients after the layer's backward, every micro-batch (the
  embedding and the output too, without the prefetch). FSEP's
  expert shards are not ZeRO-3-gathered (FSEP gathers them itself); their gradients reduce
  over the expert data-parallel group in buckets.
- Activation checkpointing recomputes a layer's forward (full: every forward row, the MoE's
  all-to-alls and FSEP's gathers included; selective: the attention core) right before its
  backward, on the same streams.
- The optimizer runs once per stage after all its gradient reductions, on the rank's shard
  (ZeRO >= 1) or all its weights.
- MFU is Megatron's: model FLOPs (moesim.sim.decoder.model_flops) / (iteration time x GPUs x
  the GPU's dense bf16 peak from its datasheet, PEAK_FLOPS).
Symmetry: every rank of a stage is one vector lane, so per-rank work is computed once per
stage; collectives are solved once per traffic shape up to scale (Collectives' cache). Stages
are not yet folded onto each other: a stage whose collectives map onto another's by a
translation of the topology could reuse its solutions (Collectives._fluid's cache key is the
place to add it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from moesim.config import Config
from moesim.errors import InputError
from moesim.sim import decoder
from moesim.sim.collectives import CollectiveResult, Traffic
from moesim.sim.executor import Op, Program, execute
from moesim.sim.memory import Memory, Training, estimate, gpu_capacity_gib
from moesim.sim.pipeline import issue_order
from moesim.sim.programs import (
    COMM,
    COMPUTE,
    IN,
    TABLES,
    LayerInputs,
    Row,
    StrategyContext,
    Table,
    Unit,
    compose,
    emit,
)
from moesim.sim.simulate import Simulator, StepOutcome
from moesim.sim.topology import LINK_KINDS, Topology
from moesim.sim.variants import table_for
from planner import parallel
from planner.parallel import Bucket, Layout, UnitParams
from traces.schema import Trace

DP, PP = "dp", "pp"
F, B = "fwd", "bwd"
# Dense bf16 tensor-core peak of one GPU (datasheets, without sparsity): NVIDIA H100 SXM and
# H200 SXM 989.4 TFLOP/s, A100 SXM 312 TFLOP/s. MFU divides by these, as Megatron does.
PEAK_FLOPS = {"h200": 989.4e12, "h100": 989.4e12, "a100": 312e12, "a100-40gb": 312e12}


@dataclass
class LayerIn:
    """What one unit (a decoder layer, the embedding, the output) of one micro-batch needs."""

    layer: int
    moe: LayerInputs | None                       # an MoE layer's planner inputs
    costs: dict[str, dict[str, decoder.Cost]]     # pass -> phase -> non-MoE cost on a rank
    tokens: int                                   # tokens entering the TP group
    rows: int                                     # tokens a rank's norms and residuals see
    params: UnitParams


# --- cost functions of the dense rows ---------------------------------------------------------
def dense(phase: str):
    """A non-MoE compute phase: moesim.sim.decoder's cost for the unit, on every rank."""
    def cost(ctx: StrategyContext, u: LayerIn, pass_: str):
        c = u.costs[pass_][phase]
        tokens = u.rows if phase in ("attn_norm", "mlp_norm", "residual", "final_norm") \
            else u.tokens
        return (np.full(ctx.n, c.seconds), np.full(ctx.n, c.flops),
                np.full(ctx.n, tokens, dtype=np.int64))
    cost.__name__ = f"dense_{phase}"
    return cost


def tp_collective(kind: str):
    """A tensor-parallel collective over the block's activation (planner.parallel)."""
    def cost(ctx: StrategyContext, u: LayerIn, pass_: str, phase: str, share: float):
        buf = parallel.tp_activation_bytes(ctx.cfg.model, u.tokens)
        sent = parallel.ring_sent(kind, ctx.cfg.parallel.tp, buf)
        return ((lambda: ctx.collective(kind, "tp", buf)), np.full(ctx.n, int(sent), np.int64),
                ctx.layout.stage_groups("tp", ctx.stage))
    return cost


def loss_all_reduce(ctx: StrategyContext, u: LayerIn, pass_: str, phase: str, share: float):
    """One of the vocab-parallel cross-entropy's two all-reduces (max, then sum)."""
    buf = parallel.loss_all_reduce_bytes(u.tokens)
    sent = parallel.ring_sent("all_reduce", ctx.cfg.parallel.tp, buf)
    return ((lambda: ctx.collective("all_reduce", "tp", buf)), np.full(ctx.n, int(sent), np.int64),
            ctx.layout.stage_groups("tp", ctx.stage))


def zero3(kind: str, group: str):
    """ZeRO-3 / FSDP: the unit's weights all-gathered, or its gradients reduce-scattered, over
    the dense (dp) or expert (edp) data-parallel group."""
    def cost(ctx: StrategyContext, u: LayerIn, pass_: str, phase: str, share: float):
        params = u.params.dense if group == "dp" else u.params.expert
        buf = parallel.weight_collective_bytes(ctx.cfg, kind, params)
        members = ctx.layout.dp if group == "dp" else ctx.layout.edp
        sent = parallel.ring_sent(kind, members, buf)
        return ((lambda: ctx.collective(kind, group, buf)), np.full(ctx.n, int(sent), np.int64),
                ctx.layout.stage_groups(group, ctx.stage))
    return cost


# --- conditions -----------------------------------------------------------------------------
def tp_sp(ctx, u) -> bool:
    return ctx.cfg.parallel.tp > 1 and ctx.cfg.parallel.sequence_parallel


def tp_no_sp(ctx, u) -> bool:
    return ctx.cfg.parallel.tp > 1 and not ctx.cfg.parallel.sequence_parallel


def is_moe(ctx, u) -> bool:
    return u.moe is not None


def is_dense(ctx, u) -> bool:
    return u.moe is None and u.layer >= 0


def has_shared(ctx, u) -> bool:
    return u.moe is not None and ctx.cfg.model.shared_experts > 0


def _z3(group: str, overlapped: bool | None = None):
    def f(ctx, u) -> bool:
        p = ctx.cfg.parallel
        if p.zero != 3 or (overlapped is not None and p.overlap_param_gather != overlapped):
            return False
        if group == "dp":
            return ctx.layout.dp > 1 and u.params.dense > 0
        # Expert weights: EP/HP experts are ZeRO-3-sharded over edp; FSEP shards its own.
        return ctx.layout.edp > 1 and u.params.expert > 0 and ctx.strategy != "fsep"
    return f


def with_sp(when):
    def f(ctx, u) -> bool:
        return tp_sp(ctx, u) and when(ctx, u)
    return f


def with_no_sp(when):
    def f(ctx, u) -> bool:
        return tp_no_sp(ctx, u) and when(ctx, u)
    return f


# --- the tables -------------------------------------------------------------------------------
def _tp_block(prefix: str, compute: tuple[str, ...], first_input: str) -> tuple[Row, ...]:
    """A TP block: (SP: all-gather) -> its compute phases -> (SP: reduce-scatter | all-reduce);
    backward: (SP: all-gather of the output gradient, and of the input again for the weight
    gradient of the first GEMM) -> the phases in reverse -> (reduce-scatter | all-reduce)."""
    rows = [Row("tp_all_gather", F, COMM, tp_collective("all_gather"), (IN,), key="ag",
                when=tp_sp)]
    prev = "ag"
    for ph in compute:
        rows.append(Row(ph, F, COMPUTE, dense(ph), (prev,)))
        prev = ph
    rows += [Row("tp_reduce_scatter", F, COMM, tp_collective("reduce_scatter"), (prev,),
                 key="rs", when=tp_sp),
             Row("tp_all_reduce", F, COMM, tp_collective("all_reduce"), ("rs",), key="ar",
                 when=tp_no_sp),
             Row("tp_all_gather", B, COMM, tp_collective("all_gather"), (IN,), key="ag_grad",
                 when=tp_sp),
             Row("tp_all_gather", B, COMM, tp_collective("all_gather"), (IN,), key="ag_in",
                 when=tp_sp)]
    prev = "ag_grad"
    for ph in reversed(compute):
        rows.append(Row(ph, B, COMPUTE, dense(ph), (prev, "ag_in") if ph == first_input
                        else (prev,)))
        prev = ph
    rows += [Row("tp_reduce_scatter", B, COMM, tp_collective("reduce_scatter"), (prev,),
                 key="rs", when=tp_sp),
             Row("tp_all_reduce", B, COMM, tp_collective("all_reduce"), ("rs",), key="ar",
                 when=tp_no_sp)]
    return tuple(rows)


ATTENTION = Table("attention", (
    Row("dp_all_gather", F, DP, zero3("all_gather", "dp"), lag=-1, key="z3",
        when=_z3("dp", True)),
    Row("dp_all_gather", F, DP, zero3("all_gather", "dp"), key="z3", when=_z3("dp", False)),
    Row("dp_all_gather", F, DP, zero3("all_gather", "edp"), lag=-1, key="z3e",
        when=_z3("edp", True)),
    Row("dp_all_gather", F, DP, zero3("all_gather", "edp"), key="z3e",
        when=_z3("edp", False)),
    Row("attn_norm", F, COMPUTE, dense("attn_norm"), (IN, "z3", "z3e")),
    *(dataclasses.replace(r, after=tuple("attn_norm" if a == IN else a for a in r.after))
      if r.pass_ == F else r
      for r in _tp_block("attn", ("qkv", "attention", "attn_out"), "qkv")),
    Row("attn_norm", B, COMPUTE, dense("attn_norm"), ("ar",), key="attn_norm"),
    Row("dp_reduce_scatter", B, DP, zero3("reduce_scatter", "dp"), ("attn_norm",),
        key="z3_rs", when=_z3("dp")),
    Row("dp_reduce_scatter", B, DP, zero3("reduce_scatter", "edp"), ("attn_norm",),
        key="z3e_rs", when=_z3("edp")),
), out={F: "ar", B: "attn_norm"})

DENSE_MLP = Table("dense_mlp", (
    Row("mlp_norm", F, COMPUTE, dense("mlp_norm"), (IN,)),
    *(dataclasses.replace(r, after=tuple("mlp_norm" if a == IN else a for a in r.after))
      if r.pass_ == F else r for r in _tp_block("mlp", ("dense_mlp",), "dense_mlp")),
    Row("mlp_norm", B, COMPUTE, dense("mlp_norm"), ("ar",)),
), out={F: "ar", B: "mlp_norm"})

MLP_NORM = Table("mlp_norm", (
    Row("mlp_norm", F, COMPUTE, dense("mlp_norm"), (IN,)),
    Row("mlp_norm", B, COMPUTE, dense("mlp_norm"), (IN,)),
), out={F: "mlp_norm", B: "mlp_norm"})

SHARED = Table("shared_experts", _tp_block("shared", ("shared_expert",), "shared_expert"),
               out={F: "ar", B: "ar"})

# The residual adds, and ZeRO-3's backward gather of the layer's weights (prefetched one layer
# ahead), which the layer's backward (it starts here) waits for.
RESIDUAL = Table("residual", (
    Row("residual", F, COMPUTE, dense("residual"), (IN,)),
    Row("dp_all_gather", B, DP, zero3("all_gather", "dp"), lag=-1, key="z3",
        when=_z3("dp", True)),
    Row("dp_all_gather", B, DP, zero3("all_gather", "dp"), key="z3", when=_z3("dp", False)),
    Row("dp_all_gather", B, DP, zero3("all_gather", "edp"), lag=-1, key="z3e",
        when=_z3("edp", True)),
    Row("dp_all_gather", B, DP, zero3("all_gather", "edp"), key="z3e",
        when=_z3("edp", False)),
    Row("residual", B, COMPUTE, dense("residual"), (IN, "z3", "z3e")),
), out={F: "residual", B: "residual"})


def _recompute_rows(table: Table) -> tuple[Row, ...]:
    """The table's forward rows again, issued first in its backward with pass "recompute"
    (costs of the forward), and its first backward rows waiting for them. Data-parallel rows
    (ZeRO-3's gathers) are not repeated: the backward gathers the weights itself."""
    fwd = [r for r in table.rows if r.pass_ == F]

    def when(row: Row):
        def f(ctx, u, inner=row.when, phase=row.phase) -> bool:
            rc = ctx.cfg.train.recompute
            if rc == "none" or (rc == "selective" and phase != "attention"):
                return False
            return inner is None or inner(ctx, u)
        return f

    def fwd_cost(row: Row):
        def cost(ctx, u, pass_, *args, c=row.cost):
            return c(ctx, u, F, *args)
        return cost

    rc = []
    for r in fwd:
        if r.stream == DP:
            continue
        rc.append(dataclasses.replace(
            r, key=f"rc.{r.name}", pass_=B, label="recompute", lag=0,
            after=tuple(a if a == IN else f"rc.{a}" for a in r.after if a == IN or
                        any(x.name == a and x.stream != DP for x in fwd)),
            cost=fwd_cost(r), when=when(r)))
    out = f"rc.{table.out[F]}"
    bwd = [dataclasses.replace(r, after=tuple(out if a == IN else a for a in r.after))
           for r in table.rows if r.pass_ == B]
    return tuple(fwd + rc + bwd)


def layer_table(strategy: str, cfg: Config | None = None) -> Table:
    """The decoder layer of a whole iteration for one MoE strategy (its table under `cfg`:
    moesim.sim.variants.table_for)."""
    t = compose(f"layer-{strategy}", [
        ("attn", ATTENTION, _same, None),
        ("mlp", DENSE_MLP, _same, is_dense),
        ("norm", MLP_NORM, _same, is_moe),
        ("moe", TABLES[strategy] if cfg is None else table_for(cfg, strategy), _moe_of, is_moe),
        ("shared", SHARED, _same, has_shared),
        ("res", RESIDUAL, _same, None),
    ])
    return dataclasses.replace(t, rows=_recompute_rows(t))


def _same(u):
    return u


def _moe_of(u):
    return u.moe


EMBED = Table("embed", (
    Row("dp_all_gather", F, DP, zero3("all_gather", "dp"), key="z3", when=_z3("dp")),
    Row("embed", F, COMPUTE, dense("embed"), (IN, "z3")),
    Row("tp_reduce_scatter", F, COMM, tp_collective("reduce_scatter"), ("embed",), key="rs",
        when=tp_sp),
    Row("tp_all_reduce", F, COMM, tp_collective("all_reduce"), ("rs",), key="ar",
        when=tp_no_sp),
    Row("dp_all_gather", B, DP, zero3("all_gather", "dp"), key="z3", when=_z3("dp")),
    Row("tp_all_gather", B, COMM, tp_collective("all_gather"), (IN,), key="ag", when=tp_sp),
    Row("embed", B, COMPUTE, dense("embed"), ("ag", "z3")),
    Row("dp_reduce_scatter", B, DP, zero3("reduce_scatter", "dp"), ("embed",), key="z3_rs",
        when=_z3("dp")),
), out={F: "ar", B: "embed"})

OUTPUT = Table("output", (
    Row("dp_all_gather", F, DP, zero3("all_gather", "dp"), key="z3", when=_z3("dp")),
    Row("final_norm", F, COMPUTE, dense("final_norm"), (IN, "z3")),
    Row("tp_all_gather", F, COMM, tp_collective("all_gather"), ("final_norm",), key="ag",
        when=tp_sp),
    Row("lm_head", F, COMPUTE, dense("lm_head"), ("ag",)),
    Row("loss", F, COMPUTE, dense("loss"), ("lm_head",)),
    Row("tp_all_reduce", F, COMM, loss_all_reduce, ("loss",), key="max",
        when=lambda ctx, u: ctx.cfg.parallel.tp > 1),
    Row("tp_all_reduce", F, COMM, loss_all_reduce, ("max",), key="sum",
        when=lambda ctx, u: ctx.cfg.parallel.tp > 1),
    Row("dp_all_gather", B, DP, zero3("all_gather", "dp"), key="z3", when=_z3("dp")),
    Row("loss", B, COMPUTE, dense("loss"), (IN, "z3")),
    Row("lm_head", B, COMPUTE, dense("lm_head"), ("loss",)),
    Row("tp_reduce_scatter", B, COMM, tp_collective("reduce_scatter"), ("lm_head",), key="rs",
        when=tp_sp),
    Row("tp_all_reduce", B, COMM, tp_collective("all_reduce"), ("rs",), key="ar",
        when=tp_no_sp),
    Row("final_norm", B, COMPUTE, dense("final_norm"), ("ar",)),
    Row("dp_reduce_scatter", B, DP, zero3("reduce_scatter", "dp"), ("final_norm",),
        key="z3_rs", when=_z3("dp")),
), out={F: "sum", B: "final_norm"})


# --- the iteration --------------------------------------------------------------------------
@dataclass
class IterationOutcome(StepOutcome):
    """A StepOutcome for a whole iteration, with what its summary needs."""

    tokens: int = 0                    # tokens of the global batch
    model_flops: float = 0.0           # Megatron's count, the whole iteration
    peak_flops: float = 0.0            # per GPU
    memory: Memory | None = None
    layout: Layout | None = None
    stage_ranks: list[np.ndarray] = field(default_factory=list, repr=False)


def rescale_counts(counts: np.ndarray, tokens: int, top_k: int) -> np.ndarray:
    """Counts [..., shards, heads, experts] rescaled so each (shard, head) routes `tokens` x
    top_k (token, expert) pairs, keeping its distribution over experts: floors of the scaled
    counts, the remainder to the largest fractions (ties: lower expert id). No count exceeds
    `tokens` (a token visits an expert once)."""
    c = counts.astype(np.float64)
    total = c.sum(axis=-1, keepdims=True)
    want = float(tokens) * top_k
    scaled = np.divide(c * want, total, out=np.zeros_like(c), where=total > 0)
    base = np.floor(scaled + 1e-9)
    left = (want - base.sum(axis=-1, keepdims=True)).astype(np.int64)
    frac = scaled - base
    e = c.shape[-1]
    order = np.argsort(-frac, axis=-1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.broadcast_to(np.arange(e), order.shape), axis=-1)
    out = base + (rank < left)
    out = np.minimum(out, tokens)
    return out.astype(counts.dtype)


class IterationSimulator(Simulator):
    """Simulates whole training iterations (`train.scope = "iteration"`) of one config and
    trace; `simulate_step` still gives the MoE part of a step (the runtime's MoE benchmarks)."""

    def __init__(self, cfg: Config, trace: Trace, trace_source: str,
                 topo: Topology | None = None) -> None:
        self.layout = parallel.layout(cfg)
        self._check(cfg)
        super().__init__(cfg, trace, trace_source, topo)
        p = cfg.parallel
        if self.layout.etp > 1:
            self.etp_groups = self.layout.stage_groups("etp", 0)
        m = cfg.model
        self.tokens = cfg.train.micro_batch_size * m.seq_len  # per micro-batch and TP group
        self.rows = self.tokens // p.tp if (p.sequence_parallel and p.tp > 1) else self.tokens
        self.trace = Trace(rescale_counts(self.trace.counts, self.rows, m.top_k),
                           dataclasses.replace(self.trace.meta, tokens_per_shard=self.rows))
        self._costs: dict = {}

    @staticmethod
    def _check(cfg: Config) -> None:
        p, m = cfg.parallel, cfg.model
        if p.tp > 1 and not p.sequence_parallel and m.num_moe_layers:
            raise InputError(cfg.source, "parallel.sequence_parallel", "MoE layers with tp > 1 "
                             "need sequence parallel (as Megatron-Core requires)")
        if p.tp > 1 and m.seq_len * cfg.train.micro_batch_size % p.tp:
            raise InputError(cfg.source, "parallel.tp", f"{p.tp} does not divide the "
                             f"micro-batch's {m.seq_len * cfg.train.micro_batch_size} tokens")
        if m.attn_heads % p.tp:
            raise InputError(cfg.source, "parallel.tp", f"{p.tp} does not divide the "
                             f"model's {m.attn_heads} attention heads (model.attn_heads)")
        if p.pp > m.num_layers:
            raise InputError(cfg.source, "parallel.pp", f"{p.pp} stages for "
                             f"{m.num_layers} layers")

    def _moe_layout(self) -> tuple[int, int, np.ndarray]:
        lay = self.layout
        return lay.ep, lay.stage_size, lay.stage_groups("ep", 0)

    # --- inputs ----------------------------------------------------------------------------
    def _dense_costs(self, layer: int) -> dict[str, dict[str, decoder.Cost]]:
        m, p = self.cfg.model, self.cfg.parallel
        sp = p.sequence_parallel and p.tp > 1
        key = "embed" if layer == -1 else "output" if layer == m.num_layers else m.is_moe(layer)
        if key not in self._costs:
            out = {}
            for pass_ in (F, B):
                if layer == -1:
                    cs = [decoder.embedding_cost(m, self.compute, self.tokens, pass_, tp=p.tp)]
                elif layer == m.num_layers:
                    cs = decoder.output_costs(m, self.compute, self.tokens, pass_, tp=p.tp,
                                              sp=sp, loss=self.cfg.train.loss_impl)
                else:
                    cs = decoder.layer_costs(m, self.compute, self.tokens, layer, pass_,
                                             tp=p.tp, sp=sp)
                out[pass_] = {c.phase: c for c in cs}
            self._costs[key] = out
        return self._costs[key]

    def _units(self, strategy: str, stage: int, step: int, mb: int,
               table: Table) -> list[Unit]:
        m = self.cfg.model
        moe_index = {li: j for j, li in enumerate(m.moe_layer_ids)}
        out = []
        for up in parallel.unit_params(m, self.layout, stage):
            li = up.unit
            tab = EMBED if li == -1 else OUTPUT if li == m.num_layers else table
            moe = None
            if 0 <= li < m.num_layers and m.is_moe(li):
                moe = self.layer_inputs(strategy, step * self.cfg.train.micro_batches + mb,
                                        moe_index[li])
            layer = -1 if li == m.num_layers else li
            out.append(Unit(tab, layer, LayerIn(li, moe, self._dense_costs(li), self.tokens,
                                                self.rows, up)))
        return out

    # --- collectives -----------------------------------------------------------------------
    def _stage_context(self, strategy: str, stage: int, account) -> StrategyContext:
        lay = self.layout
        ranks = lay.stage(stage)
        identity = len(ranks) == self.n
        algo = self.cfg.parallel.a2a_algorithm

        def local(res: CollectiveResult) -> CollectiveResult:
            account(res)
            if identity:
                return res
            return dataclasses.replace(res, rank_end=res.rank_end[ranks])

        def a2a(t: Traffic) -> CollectiveResult:
            if not identity:
                t = Traffic(ranks[t.src], ranks[t.dst], t.nbytes)
            return local(self.coll.all_to_all(t, algo))

        groups = {}

        def collective(kind: str, group: str, buffer: float) -> CollectiveResult:
            if group not in groups:
                g = lay.groups(group)
                groups[group] = g[np.isin(g[:, 0], ranks)]
            return local(getattr(self.coll, kind)(groups[group], buffer))

        return StrategyContext(cfg=self.cfg, compute=self.compute, a2a=a2a,
                               dp_all_reduce=None, all_reduce_all=None,  # type: ignore[arg-type]
                               replicated_bytes=0.0, groups=len(self.moe_groups),
                               n=lay.stage_size, scope="iteration", collective=collective,
                               layout=lay, strategy=strategy, stage=stage,
                               moe_groups=self.moe_groups)

    def _p2p(self, stage: int, to: int, nbytes: float, account) -> CollectiveResult:
        src, dst = self.layout.stage(stage), self.layout.stage(to)
        res = self.coll.all_to_all(Traffic(src, dst, np.full(len(src), nbytes)))
        account(res)
        return dataclasses.replace(res, rank_end=res.rank_end[src])

    # --- the program -----------------------------------------------------------------------
    def build_iteration(self, strategy: str, step: int, account) -> Program:
        cfg, lay = self.cfg, self.layout
        m, p, tr = cfg.model, cfg.parallel, cfg.train
        mbs = tr.micro_batches
        table = layer_table(strategy, cfg)
        prog = Program(lay.stage_size)
        ctxs = [self._stage_context(strategy, s, account) for s in range(lay.pp)]
        send = parallel.pp_send_bytes(m, self.tokens, p.tp, p.sequence_parallel)
        layers = parallel.stage_layers(m, lay.pp)
        unit_params = [parallel.unit_params(m, lay, s) for s in range(lay.pp)]
        buckets = [parallel.grad_buckets(u, parallel.bucket_size(cfg, lay))
                   for u in unit_params]
        if p.zero == 3:  # ZeRO-3 reduces dense (and EP/HP expert) gradients per layer
            buckets = [[b for b in bs if b.group == "edp" and strategy == "fsep"]
                       for bs in buckets]
        # ZeRO-1/2, overlapped: the weights' all-gathers open the iteration.
        gathers: list[dict[int, list[int]]] = [{} for _ in range(lay.pp)]
        if p.zero in (1, 2) and p.overlap_param_gather:
            for s in range(lay.pp):
                pos = {u.unit: i for i, u in enumerate(unit_params[s])}
                for b in reversed(buckets[s]):
                    op = self._bucket_op(prog, ctxs[s], s, b, "all_gather", [])
                    if op is not None:
                        first = min(pos[u] for u in b.units)
                        gathers[s].setdefault(first, []).append(op)
        sends: dict[tuple[int, str, int], int] = {}
        fwd_out: dict[tuple[int, int], list[int]] = {}
        last_bwd: dict[int, list[list[int]]] = {}
        for s, pass_, mb in issue_order(lay.pp, mbs):
            ctx = dataclasses.replace(ctxs[s], last_micro_batch=mb == mbs - 1)
            units = self._units(strategy, s, step, mb, table)
            if pass_ == F:
                chain = [sends[(s - 1, F, mb)]] if s > 0 else []
                out, _ = emit(prog, ctx, units, F, chain, stage=s,
                              wait=gathers[s] if mb == 0 else None)
                fwd_out[(s, mb)] = out
                if s < lay.pp - 1:
                    sends[(s, F, mb)] = self._send(prog, s, s + 1, F, layers[s][-1], out,
                                                   send, account)
            else:
                chain = ([sends[(s + 1, B, mb)]] if s < lay.pp - 1 else fwd_out[(s, mb)])
                out, unit_ops = emit(prog, ctx, units[::-1], B, chain, stage=s)
                if mb == mbs - 1:
                    last_bwd[s] = unit_ops[::-1]
                if s > 0:
                    sends[(s, B, mb)] = self._send(prog, s, s - 1, B, layers[s][0], out,
                                                   send, account)
        for s in range(lay.pp):
            self._step_ops(prog, ctxs[s], s, unit_params[s], buckets[s], last_bwd[s])
        return prog

    def _send(self, prog: Program, s: int, to: int, pass_: str, layer: int, deps: list[int],
              nbytes: float, account) -> int:
        sent = np.full(prog.n, int(nbytes), dtype=np.int64)
        return prog.add(Op(layer, pass_, "pp_send", PP, list(deps), stage=s, nbytes=sent,
                           comm=lambda: self._p2p(s, to, nbytes, account),
                           groups=np.arange(prog.n, dtype=np.int64)[:, None]))

    def _bucket_op(self, prog: Program, ctx: StrategyContext, s: int, b: Bucket, kind: str,
                   deps: list[int]) -> int | None:
        members = parallel.group_size(self.layout, b.group)
        if members < 2:
            return None
        buf = parallel.weight_collective_bytes(self.cfg, kind, b.params)
        sent = np.full(prog.n, int(parallel.ring_sent(kind, members, buf)), dtype=np.int64)
        phase = {"all_reduce": "dp_all_reduce", "reduce_scatter": "dp_reduce_scatter",
                 "all_gather": "dp_all_gather"}[kind]
        return prog.add(Op(-1, B if kind != "all_gather" else F, phase, DP, deps, stage=s,
                           nbytes=sent, comm=lambda: ctx.collective(kind, b.group, buf),
                           groups=self.layout.stage_groups(b.group, s)))

    def _step_ops(self, prog: Program, ctx: StrategyContext, s: int, units: list[UnitParams],
                  buckets: list[Bucket], unit_ops: list[list[int]]) -> None:
        """Gradient buckets (after the backward of their last unit, or after the whole
        backward without overlap), the optimizer step, and (ZeRO 1/2 without overlap) the
        weights' all-gathers after it."""
        p = self.cfg.parallel
        pos = {u.unit: i for i, u in enumerate(units)}
        everything = sorted({i for ops in unit_ops for i in ops})
        reduced = []
        kind = "all_reduce" if p.zero == 0 else "reduce_scatter"
        for b in buckets:
            deps = (sorted({i for u in b.units for i in unit_ops[pos[u]]})
                    if p.overlap_grad_reduce else everything)
            op = self._bucket_op(prog, ctx, s, b, kind, deps)
            if op is not None:
                reduced.append(op)
        z3 = [i for i in everything if prog.ops[i].phase == "dp_reduce_scatter"]
        lay = self.layout
        params = 0.0
        for u in units:
            dense_shard = lay.dp if p.zero >= 1 else 1
            exp_shard = lay.edp if p.zero >= 1 else 1
            params += parallel.shard(u.dense, dense_shard) + parallel.shard(u.expert, exp_shard)
        c = decoder.optimizer_cost(self.compute, params, self.cfg.model.dtype_bytes,
                                   self.cfg.train.precision, self.cfg.train.optimizer_impl)
        opt = prog.add(Op(-1, B, "optimizer", COMPUTE, reduced + z3 + everything[-1:],
                          stage=s, dur=np.full(prog.n, c.seconds)))
        if p.zero in (1, 2) and not p.overlap_param_gather:
            for b in buckets:
                self._bucket_op(prog, ctx, s, b, "all_gather", [opt])

    # --- one iteration ---------------------------------------------------------------------
    def rows_per_token(self, strategy: str, step: int = 0) -> float:
        """(token, expert) rows the hottest rank computes per token it brings, over the MoE
        layers of the first stage and micro-batch (the memory estimator's skew input)."""
        m = self.cfg.model
        first = [li for li in parallel.stage_layers(m, self.layout.pp)[0] if m.is_moe(li)]
        ids = {li: j for j, li in enumerate(m.moe_layer_ids)}
        worst = 0.0
        for li in first:
            lin = self.layer_inputs(strategy, step * self.cfg.train.micro_batches, ids[li])
            worst = max(worst, float(lin.expert_tokens.sum(axis=1).max()) / max(self.rows, 1))
        return worst

    def memory(self, strategy: str, step: int = 0) -> Memory:
        """Peak memory per GPU of the iteration (moesim.sim.memory)."""
        return estimate(self.cfg.model, self.training(strategy, self.rows_per_token(strategy,
                                                                                    step)),
                        gpu_capacity_gib(self.cfg))

    def simulate_iteration(self, strategy: str, step: int) -> IterationOutcome:
        """One whole iteration; a configuration that does not fit in GPU memory is not timed
        (its outcome has no rows and `memory.fits` is False)."""
        cfg = self.cfg
        if self.layout.etp > 1 and strategy != "ep":
            raise InputError(cfg.source, "parallel.etp", f"expert tensor parallel splits EP's "
                             f"experts; {strategy.upper()} needs etp = 1")
        mem = self.memory(strategy, step)
        lay = self.layout
        tokens = cfg.train.micro_batch_size * cfg.model.seq_len * cfg.train.micro_batches \
            * lay.dp
        if not mem.fits:
            return IterationOutcome(
                strategy, step, float("nan"), pd.DataFrame(), np.zeros(len(LINK_KINDS)), 0.0,
                0.0, 0, 0, 0.0, tokens=tokens,
                model_flops=decoder.model_flops(cfg.model, tokens),
                peak_flops=PEAK_FLOPS.get(cfg.cluster.gpu, float("nan")), memory=mem,
                layout=lay)
        stats = {"link": np.zeros(len(LINK_KINDS)), "bytes": 0.0, "time": 0.0, "flows": 0,
                 "events": 0}

        def account(res: CollectiveResult) -> CollectiveResult:
            stats["link"] += res.link_bytes
            stats["bytes"] += res.bytes
            stats["time"] += res.duration
            stats["flows"] += res.flows
            stats["events"] += res.events
            return res

        prog = self.build_iteration(strategy, step, account)
        t = execute(prog)
        stage_ranks = [self.layout.stage(s) for s in range(self.layout.pp)]
        frame, phase_time = self._frame_stages(prog, strategy, step, stage_ranks)
        moe = [o for o in prog.ops if o.phase == "expert" and o.pass_ == F]
        imb = 0.0
        if moe:
            loads = np.stack([o.tokens for o in moe]).astype(float)
            mean = loads.mean(axis=1)
            imb = float(np.mean(np.where(mean > 0, loads.max(axis=1) / np.maximum(mean, 1e-300)
                                         - 1.0, 0.0)))
        return IterationOutcome(
            strategy, step, t, frame, stats["link"], stats["bytes"], stats["time"],
            stats["flows"], stats["events"], imb, phase_time=phase_time, ops=prog.ops,
            tokens=tokens, model_flops=decoder.model_flops(cfg.model, tokens),
            peak_flops=PEAK_FLOPS.get(cfg.cluster.gpu, float("nan")), memory=mem,
            layout=lay, stage_ranks=stage_ranks)

    def training(self, strategy: str, rows_per_token: float = 0.0) -> Training:
        """The memory estimator's view of this iteration (moesim.sim.memory)."""
        cfg = self.cfg
        p, t, lay = cfg.parallel, cfg.train, self.layout
        return Training(micro_batch=t.micro_batch_size, micro_batches=t.micro_batches,
                        tp=p.tp, sp=p.sequence_parallel and p.tp > 1, pp=p.pp, dp=lay.dp,
                        ep=lay.ep, etp=lay.etp, zero=p.zero, recompute=t.recompute,
                        precision=t.precision, loss=t.loss_impl, strategy=strategy,
                        fsep_slots=cfg.planner.slots_per_rank if strategy == "fsep" else 0,
                        fsep_backward_gather=p.fsep_backward_gather,
                        moe_rows_per_token=rows_per_token)

    def _frame_stages(self, prog: Program, strategy: str, step: int,
                      stage_ranks: list[np.ndarray]) -> tuple[pd.DataFrame, dict]:
        df, phase_time = self._frame(prog, strategy, step)
        rank = np.concatenate([stage_ranks[o.stage] for o in prog.ops]) if prog.ops else \
            np.zeros(0, dtype=np.int64)
        df["rank"] = rank.astype(np.int64)
        return df, phase_time


# --- summary ----------------------------------------------------------------------------------
def _union(rank: np.ndarray, start: np.ndarray, end: np.ndarray, n: int) -> np.ndarray:
    """float64[n]: per rank, the length of the union of its [start, end) intervals."""
    out = np.zeros(n)
    keep = end > start
    rank, start, end = rank[keep], start[keep], end[keep]
    if not len(rank):
        return out
    big = float(end.max()) * 2 + 1.0
    s = start + rank * big
    e = end + rank * big
    order = np.argsort(s, kind="stable")
    s, e, r = s[order], e[order], rank[order]
    reach = np.maximum.accumulate(e)
    new = np.ones(len(s), dtype=bool)
    new[1:] = s[1:] > reach[:-1]
    first = np.nonzero(new)[0]
    seg_end = np.maximum.reduceat(e, first)
    np.add.at(out, r[first], seg_end - s[first])
    return out


def exposed_comm(frame: pd.DataFrame, n_ranks: int) -> tuple[dict[str, float], float, float]:
    """Mean over ranks of the communication time no compute overlaps, per comm phase (a
    collective kind) and for all of them together, and of the time a rank does nothing
    (the pipeline bubble and waits). Kinds exposed at the same moment each count it."""
    f = frame
    rank = f["rank"].to_numpy()
    st, en = f["start_s"].to_numpy(), f["end_s"].to_numpy()
    comp = (f["stream"] == COMPUTE).to_numpy()
    busy = _union(rank[comp], st[comp], en[comp], n_ranks)
    out = {}
    for phase in sorted(set(f.loc[~comp, "phase"])):
        sel = comp | ((f["phase"] == phase).to_numpy() & ~comp)
        out[phase] = float((_union(rank[sel], st[sel], en[sel], n_ranks) - busy).mean())
    allu = _union(rank, st, en, n_ranks)
    total = float(en.max()) if len(en) else 0.0
    return out, float((allu - busy).mean()), float((total - allu).mean())


def _layout_text(lay: Layout) -> str:
    return f"tp{lay.tp} pp{lay.pp} dp{lay.dp} ep{lay.ep} etp{lay.etp} edp{lay.edp}"


def summarize_iterations(outcomes: list[IterationOutcome]) -> pd.DataFrame:
    """One row per strategy, means over iterations: iteration time, throughput, Megatron's
    TFLOP/s per GPU and MFU, compute busy, exposed communication (all, and per collective
    kind), idle (bubble) time, peak memory."""
    rows = []
    by: dict[str, list[IterationOutcome]] = {}
    for o in outcomes:
        by.setdefault(o.strategy, []).append(o)
    for s, os_ in by.items():
        lay = os_[0].layout
        n = lay.gpus
        o = os_[0]
        if o.memory is not None and not o.memory.fits:
            rows.append({"strategy": s, "gpus": n, "layout": _layout_text(lay),
                         "peak_memory_gib": o.memory.peak_gib,
                         "memory_capacity_gib": o.memory.capacity_gib, "fits": False,
                         "memory": o.memory.verdict()})
            continue
        t = float(np.mean([o.step_time for o in os_]))
        kinds: dict[str, list[float]] = {}
        exp_all, idle, busy = [], [], []
        for o in os_:
            k, e, i = exposed_comm(o.frame, n)
            for key, v in k.items():
                kinds.setdefault(key, []).append(v)
            exp_all.append(e)
            idle.append(i)
            f = o.frame
            comp = f["stream"] == COMPUTE
            b = _union(f["rank"].to_numpy()[comp], f["start_s"].to_numpy()[comp],
                       f["end_s"].to_numpy()[comp], n)
            busy.append(float(b.max()))
        flops = float(np.mean([x.model_flops for x in os_]))
        row = {
            "strategy": s, "gpus": n, "layout": _layout_text(lay),
            "iteration_ms": 1e3 * t,
            "tokens_per_s": o.tokens / t if t > 0 else 0.0,
            "tflops_per_gpu": flops / t / n / 1e12 if t > 0 else 0.0,
            "mfu": flops / (t * n * o.peak_flops) if t > 0 else 0.0,
            "compute_ms": 1e3 * float(np.mean(busy)),
            "exposed_comm_ms": 1e3 * float(np.mean(exp_all)),
            "idle_ms": 1e3 * float(np.mean(idle)),
        }
        for key in sorted(kinds):
            row[f"exposed_{key}_ms"] = 1e3 * float(np.mean(kinds[key]))
        if o.memory is not None:
            row["peak_memory_gib"] = o.memory.peak_gib
            row["memory_capacity_gib"] = o.memory.capacity_gib
            row["fits"] = bool(o.memory.fits)
            row["memory"] = o.memory.verdict()
        row["imbalance"] = float(np.mean([x.imbalance for x in os_]))
        row["flows"] = int(np.mean([x.flows for x in os_]))
        row["events"] = int(np.mean([x.events for x in os_]))
        rows.append(row)
    return pd.DataFrame(rows)
