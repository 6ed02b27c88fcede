"""The step programs of EP, HP and FSEP as tables of phases, and the one builder that turns a
table into operations (`moesim.sim.executor`).

A table is the rows of one layer, forward and backward, in issue order. A row names its phase
(moesim.results.PHASES), pass, stream, the rows of the same layer it waits for, and the cost
function that gives its time, FLOPs and tokens (compute) or its collective and bytes (comm)
from the layer's planner inputs. Four fields shape the schedule without code:
- `after`: keys of earlier rows of the layer; "<in" is the previous layer's output in this
  pass (the first layer's: whatever came before). A row whose `when` is false is left out and
  is transparent: rows after it wait for what it would have waited for.
- `chunks`: "one" (one op), or the row is split into the table's `split(ctx)` chunks: "all"
  of them here, or only the "first" / the "rest" (two rows of one key issued at different
  places, e.g. FSEP's first weight chunk before the router). Chunk j of a chunked row waits for
  chunk j of a chunked dependency; an unchunked row waits for every chunk.
- `lag`: the row is issued `lag` layers later in the pass, at its place in that layer's rows
  (FSEP's gradient scatter of layer l runs during layer l-1's backward); a negative lag issues
  it earlier (a prefetch). Rows lagged past the last layer are issued after it, in table order.
- `when(ctx, lin)`: whether the row exists for this layer (a latent projection only on a
  Multi-Head LatentMoE model, a gradient sync only when there are replicas to sync).
`steps` rows run once per step after the last backward layer.

Whole-iteration work adds rows (or tables for other layer kinds), not builders.

Assumptions (see docs/simulator.md):
- Traffic and token counts come from `planner.traffic.layer_traffic` for each MoE group and
  layer; nothing here computes traffic. Byte matrices of the groups are laid block-diagonally
  over the cluster's ranks (group g holds ranks g*G .. g*G + G - 1).
- Compute times come from `moesim.sim.compute`. Phases hold what the runtime times in them:
  the EP/FSEP expert phase includes the two regroup gathers around the grouped GEMM; a permute
  has the sorts and syncs of its strategy (EP_PERMUTE, HP_PERMUTE).
- Every all-to-all also copies the block a rank sends itself (the diagonal, which never
  reaches the network) at HBM speed, concurrently with its network transfers.
- Parameters replicated across MoE groups (experts when the group is smaller than the cluster)
  all-reduce their gradients per layer over the data-parallel rings (same local index); the
  router and HP latent projections, replicated on every rank, all-reduce once per step in one
  bucket after the last backward layer (DDP-style), on the comm stream.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.config import Config
from moesim.sim.collectives import CollectiveResult, Traffic
from moesim.sim.compute import ComputeModel
from moesim.sim.executor import Op, Program

COMPUTE, COMM = "compute", "comm"
IN = "<in"


@dataclass
class LayerInputs:
    """What one layer needs, over all ranks of the cluster (groups laid block-diagonally)."""

    phases: dict[tuple[str, str], Traffic]     # (pass, phase) -> bytes between ranks
    expert_tokens: np.ndarray                  # int64[N, E_total]
    tokens: np.ndarray                         # int64[N]: tokens each rank brings
    routed: np.ndarray                         # int64[N]: (sub-)tokens each rank routes
    dp_bytes: float                            # gradient bytes per rank replicated over groups
    # (pass, phase) -> float64[N]: bytes of the phase's all-to-all a rank sends itself (the
    # diagonal the network never sees; a local copy, `ComputeModel.local_copy`)
    local: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)
    # Expert tensor parallel (whole iterations, etp > 1): the rows each rank's experts compute
    # once its ETP group has all-gathered what its members received (int64[N, E_total]), and
    # the gathered buffer of the largest group (bytes).
    etp_expert_tokens: np.ndarray | None = None
    etp_gather_bytes: float = 0.0
    copies: dict[str, np.ndarray] = field(default_factory=dict)  # LayerTraffic.copies
    owned: np.ndarray | None = None            # int64[N]: LayerTraffic.owned_param_bytes
    replicated: float = 0.0                    # LayerTraffic.replicated_param_bytes


@dataclass
class StrategyContext:
    cfg: Config
    compute: ComputeModel
    a2a: Callable[[Traffic], CollectiveResult]
    dp_all_reduce: Callable[[float], CollectiveResult]
    all_reduce_all: Callable[[float], CollectiveResult]
    replicated_bytes: float                    # router / latent weights per layer, per rank
    groups: int = 1                            # data-parallel copies of the MoE group
    n: int = 0                                 # ranks the program runs on (one stage's)
    # The whole iteration (moesim.sim.iteration): the scope, whether this is the
    # iteration's last micro-batch (gradients are reduced after it), and the stage's dense
    # collectives: collective(kind, group, buffer bytes) -> CollectiveResult over the stage.
    scope: str = "moe"
    last_micro_batch: bool = True
    collective: Callable[[str, str, float], CollectiveResult] | None = None
    layout: Any = None                         # planner.parallel.Layout
    strategy: str = ""
    stage: int = 0
    # int64[groups, G] positions of the MoE groups: each group's all-to-all starts when its
    # own ranks are ready (None: the whole program is one group).
    moe_groups: np.ndarray | None = None

    @property
    def group_ranks(self) -> int:
        """Ranks of one MoE group."""
        return self.n // max(self.groups, 1)


# A compute row's cost: (seconds, FLOPs, tokens) per rank; a comm row's: the collective (run
# when the op is issued) and the bytes each rank sends, for a `share` of the phase's traffic,
# optionally followed by the collective's independent groups (int64[G, k] positions; see
# moesim.sim.executor.Op.groups).
Work = tuple[np.ndarray, np.ndarray | None, np.ndarray | None]
ComputeCost = Callable[[StrategyContext, LayerInputs, str], Work]
CommCost = Callable[[StrategyContext, LayerInputs, str, str, float],
                    tuple[Callable[[], CollectiveResult], np.ndarray]]


@dataclass(frozen=True)
class Row:
    """One phase of a layer's program (see the module docstring for the fields)."""

    phase: str
    pass_: str
    stream: str
    cost: Callable
    after: tuple[str, ...] = ()
    key: str = ""
    chunks: str = "one"            # "one" | "all" | "first" | "rest"
    lag: int = 0
    when: Callable[[StrategyContext, Any], bool] | None = None
    split: Callable[[StrategyContext], int] | None = None  # chunks; None: the table's
    label: str = ""                # the pass its ops record, when not pass_ ("recompute")

    @property
    def name(self) -> str:
        return self.key or self.phase


def _one(ctx: StrategyContext) -> int:
    return 1


@dataclass(frozen=True)
class Table:
    """A strategy's layer program: rows in issue order, the key of each pass's output, the
    number of chunks of its chunked rows, and rows run once per step after the backward."""

    name: str
    rows: tuple[Row, ...]
    out: dict[str, str]
    split: Callable[[StrategyContext], int] = _one
    steps: tuple[Row, ...] = ()


# --- the builder ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One layer of a pass: its table, the layer number its Result rows carry, and the inputs
    its cost functions and conditions read."""

    table: Table
    layer: int
    inputs: Any


def _chunk_ids(row: Row, k: int) -> list[int]:
    return {"one": [-1], "all": list(range(k)), "first": [0], "rest": list(range(1, k))}[
        row.chunks]


def _deps_of(entry: dict[int, list[int]], chunk: int) -> list[int]:
    """Ops a (chunk of a) row waits for from one dependency's entry {chunk: op ids}."""
    if chunk >= 0 and chunk in entry:
        return entry[chunk]
    return [d for ids in entry.values() for d in ids]


def _emit_row(prog: Program, ctx: StrategyContext, table: Table, row: Row, unit: Unit,
              entries: dict[str, dict[int, list[int]]], chain: Callable[[], list[int]],
              label: str, stage: int, ops: list[int]) -> None:
    k = (row.split or table.split)(ctx) if row.chunks != "one" else 1
    entry = entries.setdefault(row.name, {})
    for j in _chunk_ids(row, k):
        deps: list[int] = []
        for key in row.after:
            if key == IN:
                got = chain()
            elif key in entries:
                got = _deps_of(entries[key], j)
            else:
                raise ValueError(f"table {table.name}: {row.pass_} {row.name} waits for "
                                 f"{key!r}, which is not an earlier row of the layer")
            deps += [d for d in got if d not in deps]
        if row.when is not None and not row.when(ctx, unit.inputs):
            entry.setdefault(j, []).extend(deps)  # transparent: pass the dependencies on
            continue
        share = 1.0 if j < 0 else 1.0 / k
        if row.stream == COMPUTE:
            dur, flops, tokens = row.cost(ctx, unit.inputs, row.pass_)
            if j >= 0:
                dur = dur / k
                flops = None if flops is None else flops / k
                tokens = None if tokens is None else tokens // k + (j < tokens % k)
            op = Op(unit.layer, row.label or label, row.phase, row.stream, deps, dur=dur,
                    flops=flops, tokens=tokens, chunk=j, stage=stage)
        else:
            run, nbytes, *groups = row.cost(ctx, unit.inputs, row.pass_, row.phase, share)
            op = Op(unit.layer, row.label or label, row.phase, row.stream, deps, comm=run,
                    nbytes=nbytes, chunk=j, stage=stage, groups=groups[0] if groups else None)
        i = prog.add(op)
        entry.setdefault(j, []).append(i)
        ops.append(i)


def emit(prog: Program, ctx: StrategyContext, units: list[Unit], pass_: str,
         chain: list[int], *, label: str | None = None,
         only: Callable[[Row], bool] | None = None, stage: int = 0,
         wait: dict[int, list[int]] | None = None) -> tuple[list[int], list[list[int]]]:
    """Issue the rows of `pass_` of every unit (in pass order), the first unit waiting for
    `chain`, each next one for its predecessor's output (its table's `out`). A row's `lag`
    counts units of its own table. `label` is the pass the ops record ("recompute" re-issues
    the forward rows), `only` keeps some rows, `wait[u]` adds dependencies to unit u's input.
    Returns (the last unit's output ops, every unit's op ids)."""
    label = label or pass_
    rows = {id(u.table): [r for r in u.table.rows if r.pass_ == pass_
                          and (only is None or only(r))] for u in units}
    members: dict[int, list[int]] = {}
    for i, u in enumerate(units):
        members.setdefault(id(u.table), []).append(i)
    entries: list[dict[str, dict[int, list[int]]]] = [{} for _ in units]
    unit_ops: list[list[int]] = [[] for _ in units]

    def chain_in(i: int) -> list[int]:
        extra = (wait or {}).get(i, [])
        if i == 0:
            return chain + [d for d in extra if d not in chain]
        prev = units[i - 1]
        out = entries[i - 1].get(prev.table.out[pass_]) if pass_ in prev.table.out else None
        if out is None:
            raise ValueError(f"table {units[i].table.name}: unit {i} needs unit {i - 1}'s "
                             f"output before it is issued")
        got = _deps_of(out, -1)
        return got + [d for d in extra if d not in got]

    def issue(t: int, table_id: int, only_lagged: bool) -> None:
        who = members[table_id]
        for row in rows[table_id]:
            if only_lagged and row.lag == 0:
                continue
            pos = t - row.lag
            if 0 <= pos < len(who):
                i = who[pos]
                _emit_row(prog, ctx, units[i].table, row, units[i], entries[i],
                          lambda i=i: chain_in(i), label, stage, unit_ops[i])

    for i, u in enumerate(units):
        tid = id(u.table)
        who, t = members[tid], members[tid].index(i)
        lags = [r.lag for r in rows[tid]] or [0]
        if t == 0:  # prefetches of this table's first units
            for it in range(min(0, *lags), 0):
                issue(it, tid, True)
        issue(t, tid, False)
        if t == len(who) - 1:  # rows lagged past this table's last unit
            for it in range(len(who), len(who) + max(0, *lags)):
                issue(it, tid, True)
    if not units:
        return chain, unit_ops
    return chain_in(len(units)) if pass_ in units[-1].table.out else chain, unit_ops


def emit_pass(prog: Program, ctx: StrategyContext, table: Table, pass_: str,
              layers: list[tuple[int, Any]], chain: list[int]) -> list[int]:
    """Issue `table`'s rows of `pass_` for `layers` ((layer index, inputs) in pass order),
    the first waiting for `chain`; returns the ops of the last layer's output."""
    return emit(prog, ctx, [Unit(table, li, lin) for li, lin in layers], pass_, chain)[0]


def build_step(prog: Program, ctx: StrategyContext, table: Table,
               layers: list[LayerInputs]) -> None:
    """One training step of the MoE layers: every layer forward, every layer backward in
    reverse, then the table's once-per-step rows."""
    order = list(enumerate(layers))
    last = emit_pass(prog, ctx, table, "fwd", order, [])
    last = emit_pass(prog, ctx, table, "bwd", order[::-1], last)
    if table.steps:
        step = Table(table.name, table.steps, {"bwd": table.steps[-1].name})
        emit_pass(prog, ctx, step, "bwd", [(0, layers[0] if layers else None)], last)


def compose(name: str, parts: list[tuple[str, Table, Callable[[Any], Any],
                                         Callable[[StrategyContext, Any], bool] | None]]
            ) -> Table:
    """One table from several, in forward order: (prefix, table, the part's inputs from the
    unit's, the part's condition). Keys become "prefix.key"; each part's "<in" is the previous
    part's output (backward: the next part's, as the backward runs the parts in reverse);
    forward rows keep the parts' order, backward rows reverse it. A part whose condition is
    false for a unit is transparent, like a row whose `when` is false."""
    def wrap(row: Row, prefix: str, get, cond, prev_out: str | None) -> Row:
        after = tuple((prev_out or IN) if a == IN else f"{prefix}.{a}" for a in row.after)
        inner = row.when

        def when(ctx, u, inner=inner, get=get, cond=cond):
            return (cond is None or cond(ctx, u)) and (inner is None or inner(ctx, get(u)))

        def cost(ctx, u, *args, cost=row.cost, get=get):
            return cost(ctx, get(u), *args)

        return dataclasses.replace(row, key=f"{prefix}.{row.name}", after=after, cost=cost,
                                   when=when if (cond or inner) else None,
                                   split=row.split or parts_split[prefix])

    parts_split = {prefix: t.split for prefix, t, _, _ in parts}
    fwd, bwd = [], []
    prev = None
    for prefix, t, get, cond in parts:
        fwd += [wrap(r, prefix, get, cond, prev) for r in t.rows if r.pass_ == "fwd"]
        prev = f"{prefix}.{t.out['fwd']}" if "fwd" in t.out else prev
    prev = None
    for prefix, t, get, cond in reversed(parts):
        bwd += [wrap(r, prefix, get, cond, prev) for r in t.rows if r.pass_ == "bwd"]
        prev = f"{prefix}.{t.out['bwd']}" if "bwd" in t.out else prev
    first, last = parts[0], parts[-1]
    return Table(name, tuple(fwd + bwd), {"fwd": f"{last[0]}.{last[1].out['fwd']}",
                                          "bwd": f"{first[0]}.{first[1].out['bwd']}"})


# --- cost functions -------------------------------------------------------------------------
def _with_local_copy(res: CollectiveResult, copy_s: np.ndarray,
                     latency: float) -> CollectiveResult:
    """The collective with each rank's self-block copied alongside its network transfers
    (NCCL copies it inside the same kernel, after the start-up latency): a rank is done when
    both are. HBM contention between the copy and the transfers is ignored (NVLink and NIC
    rates are a tenth of HBM's or less)."""
    if not np.any(copy_s > 0):
        return res
    end = np.maximum(res.rank_end, latency + copy_s)
    return dataclasses.replace(res, rank_end=end, duration=max(res.duration, float(end.max())))


def _packed(res: CollectiveResult, pack: np.ndarray, unpack: np.ndarray) -> CollectiveResult:
    """The collective after every rank's pack (it starts when the slowest rank's is done),
    each rank's unpack after its own part."""
    if not (np.any(pack > 0) or np.any(unpack > 0)):
        return res
    end = res.rank_end + float(pack.max()) + unpack
    return dataclasses.replace(res, rank_end=end, duration=float(end.max()))


def _weight_copies(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str,
                   t: Traffic, share: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per rank of FSEP's copies around its weight all-to-alls (runtime.layers_fsep),
    before the collective (pack) and after it (unpack):
    - weight gather: the shards of every replica a rank serves are gathered into the send
      buffer (a row gather of all it sends, its own block included); the received shards
      are merged into whole experts by one copy of all it receives (none when the group is
      one rank: the merged weights are then views of the buffer).
    - gradient scatter: the replicas' weight gradients are copied into one send buffer (all
      it sends); the received shard gradients are summed per expert into the rank's shard
      (read all it receives, write its shard of every expert).
    Other phases have none."""
    zero = np.zeros(n)
    if phase not in ("weight_gather", "grad_scatter"):
        return zero, zero
    local = lin.local.get((pass_, phase), zero) * share
    sent = np.bincount(t.src, weights=t.nbytes, minlength=n) + local
    recv = np.bincount(t.dst, weights=t.nbytes, minlength=n) + local
    cm = ctx.compute
    if phase == "weight_gather":
        unpack = (cm.local_copy(recv) + 2 * cm.launch_overhead) if ctx.group_ranks > 1 else zero
        return cm.gather(sent), np.where(recv > 0, unpack, 0.0)
    shard = share * lin.owned
    pack = np.where(sent > 0, cm.local_copy(sent) + 2 * cm.launch_overhead, 0.0)
    reduce = (recv + shard) / cm.rates["hbm"] + cm.launch_overhead
    return pack, np.where(recv > 0, reduce, 0.0)


def a2a(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str, share: float):
    """An all-to-all of the phase's traffic (a `share` of it, for chunks), with its local copy
    and the copies that pack and unpack its buffers where the phase has them (FSEP's
    weights)."""
    t = lin.phases[(pass_, phase)]
    if share != 1.0:
        t = t.scaled(share)
    n = ctx.n
    local = lin.local.get((pass_, phase))
    copy_s = ctx.compute.local_copy(local * share) if local is not None else np.zeros(n)
    latency = ctx.cfg.cluster.collective_latency_us * 1e-6
    pack, unpack = _weight_copies(ctx, lin, pass_, phase, t, share, n)

    def run() -> CollectiveResult:
        return _packed(_with_local_copy(ctx.a2a(t), copy_s, latency), pack, unpack)

    return run, t.sent(n), _independent(ctx.moe_groups)


def _independent(groups: np.ndarray | None) -> np.ndarray | None:
    """Groups that start on their own, or None when there is only one."""
    return groups if groups is not None and len(groups) > 1 else None


def dp_all_reduce(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str,
                  share: float):
    """The layer's weights replicated over the MoE groups, all-reduced over the rings of
    ranks with the same local index."""
    d = max(ctx.groups, 1)
    sent = np.full(ctx.n, int(2 * (d - 1) / d * lin.dp_bytes), dtype=np.int64)
    rings = None if ctx.moe_groups is None else _independent(ctx.moe_groups.T)
    return (lambda b=lin.dp_bytes: ctx.dp_all_reduce(b)), sent, rings


def final_all_reduce(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str,
                     share: float):
    """One bucketed all-reduce over all ranks of the weights every rank holds (router, HP
    latent projections) of every layer, after the last backward layer."""
    total = ctx.replicated_bytes * ctx.cfg.model.num_moe_layers
    n = ctx.n
    sent = np.full(n, int(2 * (n - 1) / n * total), dtype=np.int64)
    return (lambda: ctx.all_reduce_all(total)), sent


# A permute's stable sorts, device-to-host syncs and host split work. EP and FSEP sort the
# assignments by expert, then by destination replica (runtime.dispatch.build_route), and sync
# once: the size exchange, whose counts the host needs for the all-to-all splits; the host then
# computes the splits and the layout while the GPU waits. HP sorts once and never syncs: its
# all-to-all sizes are known in advance (no size exchange).
EP_PERMUTE = {"sorts": 2, "syncs": 1, "splits": 1}
HP_PERMUTE = {"sorts": 1, "syncs": 0}


def _row_bytes(ctx: StrategyContext) -> int:
    m = ctx.cfg.model
    return m.expert_dim * m.dtype_bytes


def _assignments(ctx: StrategyContext, lin: LayerInputs) -> np.ndarray:
    """(token, expert) pairs a rank permutes: every routed (sub-)token, once per expert."""
    return lin.routed * ctx.cfg.model.top_k


def latent(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str) -> Work:
    """Multi-Head LatentMoE's projection to (latent_down) or from (latent_up) the latent."""
    m = ctx.cfg.model
    k, n = (m.d_model, m.latent_dim) if phase == "latent_down" else (m.latent_dim, m.d_model)
    t, f = ctx.compute.gemm(lin.tokens, k, n, m.dtype_bytes, backward=pass_ == "bwd")
    return t, f, lin.tokens


def latent_down(ctx, lin, pass_) -> Work:
    return latent(ctx, lin, pass_, "latent_down")


def latent_up(ctx, lin, pass_) -> Work:
    return latent(ctx, lin, pass_, "latent_up")


def _router(ctx: StrategyContext, lin: LayerInputs, pass_: str, tokens: np.ndarray) -> Work:
    """Routing of every (sub-)token a rank routes: the logits GEMM [routed x expert_dim] @
    [dim x E], softmax, top-k and the gate renormalisation (`ComputeModel.router`)."""
    m = ctx.cfg.model
    t, f = ctx.compute.router(lin.routed, m.expert_dim, m.num_experts, m.top_k, m.dtype_bytes,
                              pass_ == "bwd", forced=ctx.cfg.run.routing == "forced",
                              stream_ok=ctx.cfg.run.kernels == "auto")
    return t, f, tokens


def router(ctx, lin, pass_) -> Work:
    """EP, FSEP: the rank routes its own tokens (tokens counted as the rank's)."""
    return _router(ctx, lin, pass_, lin.tokens)


def head_router(ctx, lin, pass_) -> Work:
    """HP: the rank routes its heads' sub-tokens of every token of the group."""
    return _router(ctx, lin, pass_, lin.routed)


def _permute(ctx: StrategyContext, lin: LayerInputs, pass_: str, kind: dict) -> Work:
    m = ctx.cfg.model
    t = ctx.compute.permute(_assignments(ctx, lin), _row_bytes(ctx), m.top_k, **kind,
                            backward=pass_ == "bwd")
    return t, None, None


def ep_permute(ctx, lin, pass_) -> Work:
    return _permute(ctx, lin, pass_, EP_PERMUTE)


def hp_permute(ctx, lin, pass_) -> Work:
    return _permute(ctx, lin, pass_, HP_PERMUTE)


def unpermute(ctx: StrategyContext, lin: LayerInputs, pass_: str) -> Work:
    """The weighted combine on the compute stream (phase "combine")."""
    t = ctx.compute.combine(_assignments(ctx, lin), _row_bytes(ctx), ctx.cfg.model.top_k,
                            backward=pass_ == "bwd")
    return t, None, None


def _expert(ctx: StrategyContext, lin: LayerInputs, pass_: str, regroup: bool) -> Work:
    """The experts' grouped FFN on the rank's rows; with expert tensor parallel on the rows
    its ETP group gathered, each rank holding 1/etp of every expert's hidden units."""
    m = ctx.cfg.model
    rows, ffn = lin.expert_tokens, m.d_ffn
    if lin.etp_expert_tokens is not None:
        rows, ffn = lin.etp_expert_tokens, -(-m.d_ffn // ctx.layout.etp)
    t, f = ctx.compute.expert_ffn(rows, m.expert_dim, ffn, m.dtype_bytes,
                                  backward=pass_ == "bwd", activation=m.activation,
                                  kind=m.expert_kind,
                                  fused_ok=not regroup and ctx.cfg.run.kernels == "auto")
    if regroup:
        t = t + ctx.compute.regroup(rows.sum(axis=1), _row_bytes(ctx))
    return t, f, rows.sum(1)


def experts_regrouped(ctx, lin, pass_) -> Work:
    """EP, FSEP: the experts' grouped FFN with the two row gathers into and out of
    expert-major order (rows arrive source-major), which the runtime times as expert too."""
    return _expert(ctx, lin, pass_, regroup=True)


def experts(ctx, lin, pass_) -> Work:
    """HP: the grouped FFN on rows the local permute already put expert-major."""
    return _expert(ctx, lin, pass_, regroup=False)


def head_pack(ctx: StrategyContext, lin: LayerInputs, pass_: str) -> Work:
    """HP's send buffer: with head h on rank h mod G the latent's heads are made
    destination-major by one strided copy of T x latent, and its mirror after the combine's
    all-to-all, the same in backward (runtime/layers_hp.py, on the compute stream). A group of
    one rank keeps every head, so the latent already is in destination order: a view, free.
    The bytes are the planner's (`LayerTraffic.copies["head_pack"]`, none for one rank)."""
    nbytes = lin.copies.get("head_pack", np.zeros(len(lin.tokens))).astype(np.float64)
    t = np.where(nbytes > 0, ctx.compute.local_copy(nbytes) + ctx.compute.launch_overhead, 0.0)
    return t, None, None


def etp_collective(kind: str) -> CommCost:
    """Expert tensor parallel: the rows an EP rank received all-gathered over its ETP group
    before the experts (forward; its reduce-scatter after them), as Megatron-Core's all-to-all
    dispatcher does with expert_tensor_parallel_size > 1. The ring moves the largest group's
    gathered rows (groups are timed together with one buffer size: an upper bound for the
    others)."""
    def cost(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str, share: float):
        from planner.parallel import ring_sent
        buf = lin.etp_gather_bytes
        sent = np.full(ctx.n, int(ring_sent(kind, ctx.layout.etp, buf)), dtype=np.int64)
        return ((lambda: ctx.collective(kind, "etp", buf)), sent,
                ctx.layout.stage_groups("etp", ctx.stage))
    cost.__name__ = f"etp_{kind}"
    return cost


# --- conditions -----------------------------------------------------------------------------
def has_latent(ctx: StrategyContext, lin: LayerInputs) -> bool:
    return ctx.cfg.model.num_heads > 1


def has_etp(ctx: StrategyContext, lin: LayerInputs) -> bool:
    return lin.etp_expert_tokens is not None


def _has_traffic(key: tuple[str, str]) -> Callable[[StrategyContext, LayerInputs], bool]:
    def f(ctx: StrategyContext, lin: LayerInputs) -> bool:
        t = lin.phases.get(key)
        return t is not None and t.total > 0
    f.__name__ = f"has_{key[0]}_{key[1]}"
    return f


def has_phase(key: tuple[str, str]) -> Callable[[StrategyContext, LayerInputs], bool]:
    def f(ctx: StrategyContext, lin: LayerInputs) -> bool:
        return key in lin.phases
    f.__name__ = f"has_{key[0]}_{key[1]}"
    return f


def dp_synced(ctx: StrategyContext, lin: LayerInputs) -> bool:
    """The MoE part of a step syncs the groups' replicated weights per layer; a whole
    iteration reduces every gradient in its data-parallel buckets instead."""
    return ctx.scope == "moe" and ctx.cfg.parallel.dp_grad_sync and lin.dp_bytes > 0


def replicated_synced(ctx: StrategyContext, lin: LayerInputs) -> bool:
    """The step's bucket of every-rank weights has bytes to move (2(n-1)/n of it)."""
    total = ctx.replicated_bytes * ctx.cfg.model.num_moe_layers
    return (ctx.scope == "moe" and ctx.cfg.parallel.dp_grad_sync
            and 2 * (ctx.n - 1) / ctx.n * total > 0)


_replica_traffic = _has_traffic(("bwd", "grad_sync"))


def replica_synced(ctx: StrategyContext, lin: LayerInputs) -> bool:
    """Replicated experts (EP's hot replicas) sum their gradients: once per iteration, after
    its last micro-batch."""
    return ctx.last_micro_batch and _replica_traffic(ctx, lin)


# --- the tables -----------------------------------------------------------------------------
F, B = "fwd", "bwd"
FINAL_SYNC = (Row("grad_sync", B, COMM, final_all_reduce, after=(IN,), when=replicated_synced,
                  key="final_sync"),)

# EP: router, permute, dispatch, experts, combine; backward mirrors it, with the expert weight
# gradients inside the expert backward and the replicas' gradient syncs after it.
EP = Table("ep", (
    Row("latent_down", F, COMPUTE, latent_down, (IN,), when=has_latent),
    Row("router", F, COMPUTE, router, ("latent_down",)),
    Row("permute", F, COMPUTE, ep_permute, ("router",)),
    Row("dispatch", F, COMM, a2a, ("permute",), key="dispatch_a2a"),
    Row("tp_all_gather", F, COMM, etp_collective("all_gather"), ("dispatch_a2a",),
        key="etp_ag", when=has_etp),
    Row("expert", F, COMPUTE, experts_regrouped, ("etp_ag",)),
    Row("tp_reduce_scatter", F, COMM, etp_collective("reduce_scatter"), ("expert",),
        key="etp_rs", when=has_etp),
    Row("combine", F, COMM, a2a, ("etp_rs",), key="combine_a2a"),
    Row("combine", F, COMPUTE, unpermute, ("combine_a2a",)),
    Row("latent_up", F, COMPUTE, latent_up, ("combine",), when=has_latent),
    Row("latent_up", B, COMPUTE, latent_up, (IN,), when=has_latent),
    Row("combine", B, COMPUTE, unpermute, ("latent_up",)),
    Row("combine", B, COMM, a2a, ("combine",), key="combine_a2a"),
    Row("tp_all_gather", B, COMM, etp_collective("all_gather"), ("combine_a2a",),
        key="etp_ag", when=has_etp),
    Row("expert", B, COMPUTE, experts_regrouped, ("etp_ag",)),
    Row("tp_reduce_scatter", B, COMM, etp_collective("reduce_scatter"), ("expert",),
        key="etp_rs", when=has_etp),
    Row("dispatch", B, COMM, a2a, ("etp_rs",), key="dispatch_a2a"),
    Row("permute", B, COMPUTE, ep_permute, ("dispatch_a2a",)),
    Row("router", B, COMPUTE, router, ("permute",)),
    Row("grad_sync", B, COMM, a2a, ("expert",), key="replica_sync", when=replica_synced),
    Row("grad_sync", B, COMM, dp_all_reduce, ("expert",), key="dp_sync", when=dp_synced),
    Row("latent_down", B, COMPUTE, latent_down, ("router",), when=has_latent),
), out={F: "latent_up", B: "latent_down"}, steps=FINAL_SYNC)

# HP (Multi-Head LatentMoE): project down to the latent, pack the heads, all-to-all the latent
# (each rank gets its heads' slices of every token), route and run experts locally, all-to-all
# back, unpack, project up. The all-to-all bytes are the planner's (fixed by the batch).
HP = Table("hp", (
    Row("latent_down", F, COMPUTE, latent_down, (IN,)),
    Row("dispatch", F, COMPUTE, head_pack, ("latent_down",), key="pack"),
    Row("dispatch", F, COMM, a2a, ("pack",), key="dispatch_a2a"),
    Row("router", F, COMPUTE, head_router, ("dispatch_a2a",)),
    Row("permute", F, COMPUTE, hp_permute, ("router",)),
    Row("expert", F, COMPUTE, experts, ("permute",)),
    Row("combine", F, COMPUTE, unpermute, ("expert",)),
    Row("combine", F, COMM, a2a, ("combine",), key="combine_a2a"),
    Row("combine", F, COMPUTE, head_pack, ("combine_a2a",), key="unpack"),
    Row("latent_up", F, COMPUTE, latent_up, ("unpack",)),
    Row("latent_up", B, COMPUTE, latent_up, (IN,)),
    Row("combine", B, COMPUTE, head_pack, ("latent_up",), key="unpack"),
    Row("combine", B, COMM, a2a, ("unpack",), key="combine_a2a"),
    Row("combine", B, COMPUTE, unpermute, ("combine_a2a",)),
    Row("expert", B, COMPUTE, experts, ("combine",)),
    Row("permute", B, COMPUTE, hp_permute, ("expert",)),
    Row("router", B, COMPUTE, head_router, ("permute",)),
    Row("dispatch", B, COMM, a2a, ("router",), key="dispatch_a2a"),
    Row("dispatch", B, COMPUTE, head_pack, ("dispatch_a2a",), key="pack"),
    Row("latent_down", B, COMPUTE, latent_down, ("pack",)),
    Row("grad_sync", B, COMM, a2a, ("expert",), key="replica_sync", when=replica_synced),
    Row("grad_sync", B, COMM, dp_all_reduce, ("expert",), key="dp_sync", when=dp_synced),
), out={F: "latent_up", B: "latent_down"}, steps=FINAL_SYNC)


def fsep_chunks(ctx: StrategyContext) -> int:
    return ctx.cfg.parallel.fsep_chunks


# FSEP (LAER-MoE): experts' weights are flat-sharded over the group; each layer the ranks
# gather full copies of the experts of their slots (in `fsep_chunks` chunks), the tokens go to
# the replicas, and chunk c's expert GEMMs start once chunk c's weights and the tokens are in.
# LAER-MoE's overlap (PKU-DAIR/Hetu-Galvatron branch laer-moe, galvatron/core/runtime/moe/
# smart_routing.py: the token all-to-alls are issued `all_to_all_with_event` with the next /
# previous layer's dispatcher's event): the next layer's weight all-to-all is issued right
# after this layer's token dispatch (lag -1: layer l+1's gather sits after layer l's dispatch;
# layer 0's before the first layer), so it overlaps this layer's experts and everything up to
# the next layer's experts; in backward, the previous layer's re-gather (FSDP frees the
# weights after forward; none with parallel.fsep_backward_gather = false) is issued right
# after this layer's combine all-to-all; the weight-gradient scatter is delayed to the next
# layer's backward (lag 1). One comm stream: LAER-MoE's weight communicator runs beside the
# token one and they share the links; here they take turns (FIFO), the same bytes in the same
# time over both, but the token all-to-all behind a gather finishes later than with sharing.
FSEP = Table("fsep", (
    Row("latent_down", F, COMPUTE, latent_down, (IN,), when=has_latent),
    Row("router", F, COMPUTE, router, ("latent_down",)),
    Row("permute", F, COMPUTE, ep_permute, ("router",)),
    Row("dispatch", F, COMM, a2a, ("permute",), key="dispatch_a2a"),
    Row("weight_gather", F, COMM, a2a, chunks="all", lag=-1),
    Row("expert", F, COMPUTE, experts_regrouped, ("dispatch_a2a", "weight_gather"),
        chunks="all"),
    Row("combine", F, COMM, a2a, ("expert",), key="combine_a2a"),
    Row("combine", F, COMPUTE, unpermute, ("combine_a2a",)),
    Row("latent_up", F, COMPUTE, latent_up, ("combine",), when=has_latent),
    Row("latent_up", B, COMPUTE, latent_up, (IN,), when=has_latent),
    Row("combine", B, COMPUTE, unpermute, ("latent_up",)),
    Row("combine", B, COMM, a2a, ("combine",), key="combine_a2a"),
    Row("weight_gather", B, COMM, a2a, chunks="all", lag=-1,
        when=has_phase((B, "weight_gather"))),
    Row("grad_scatter", B, COMM, a2a, ("expert",), chunks="all", lag=1),
    Row("grad_sync", B, COMM, a2a, ("expert",), key="replica_sync", lag=1,
        when=replica_synced),
    Row("grad_sync", B, COMM, dp_all_reduce, ("expert",), key="dp_sync", lag=1,
        when=dp_synced),
    Row("expert", B, COMPUTE, experts_regrouped, ("combine_a2a", "weight_gather"),
        chunks="all"),
    Row("dispatch", B, COMM, a2a, ("expert",), key="dispatch_a2a"),
    Row("permute", B, COMPUTE, ep_permute, ("dispatch_a2a",)),
    Row("router", B, COMPUTE, router, ("permute",)),
    Row("latent_down", B, COMPUTE, latent_down, ("router",), when=has_latent),
), out={F: "latent_up", B: "latent_down"}, split=fsep_chunks, steps=FINAL_SYNC)

TABLES = {"ep": EP, "hp": HP, "fsep": FSEP}
