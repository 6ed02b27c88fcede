"""The step programs of EP, HP and FSEP, and the discrete-event executor that runs them.

A program is a list of operations in issue order, each on one stream of every rank ("compute"
or "comm") with explicit dependencies on earlier operations. The executor runs one SimPy
process per stream, vectorised over ranks: an operation's start on rank r is the later of its
stream being free on r and its dependencies having finished on r, so per-rank skew (a rank with
more expert tokens finishes later) carries through. Overlap comes only from the dependencies
and the two streams: nothing is assumed to hide behind anything else.

Assumptions (see docs/simulator.md):
- A collective starts when its last participant is ready (NCCL semantics, a barrier at the
  start); ranks finish it at different times (`Collectives.rank_end`). One comm stream per
  rank, so collectives run one at a time on the network and never share it with each other.
- Traffic and token counts come from `planner.traffic.layer_traffic` for each MoE group and
  layer; nothing here computes traffic. Byte matrices of the groups are laid block-diagonally
  over the cluster's ranks (group g holds ranks g*G .. g*G + G - 1).
- Compute times come from `moesim.sim.compute`; the attention and dense parts of the model are not
  simulated (the MoE part of a step only). Phases hold what the runtime times in them: the
  EP/FSEP expert phase includes the two regroup gathers around the grouped GEMM; a permute
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

import numpy as np
import simpy

from moesim.config import Config
from moesim.sim.collectives import CollectiveResult, Traffic
from moesim.sim.compute import ComputeModel


@dataclass
class Op:
    """One operation on every rank of the cluster."""

    layer: int
    pass_: str                 # "fwd" | "bwd"
    phase: str                 # moesim.results.PHASES
    stream: str                # "compute" | "comm"
    deps: list[int]
    dur: np.ndarray | None = None                                  # compute: seconds per rank
    comm: Callable[[], CollectiveResult] | None = None             # comm: the collective
    nbytes: np.ndarray | None = None                               # int64[N]: bytes sent
    tokens: np.ndarray | None = None                               # int64[N]
    flops: np.ndarray | None = None                                # float64[N]
    chunk: int = -1
    # Filled by the executor.
    start: np.ndarray = field(default=None, repr=False)            # type: ignore[assignment]
    end: np.ndarray = field(default=None, repr=False)              # type: ignore[assignment]
    result: CollectiveResult | None = field(default=None, repr=False)


class Program:
    """Builder: `add` returns the op's index for later dependencies."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ops: list[Op] = []

    def add(self, op: Op) -> int:
        z = np.zeros(self.n, dtype=np.int64)
        op.nbytes = z if op.nbytes is None else op.nbytes
        op.tokens = z if op.tokens is None else op.tokens
        op.flops = np.zeros(self.n) if op.flops is None else op.flops
        self.ops.append(op)
        return len(self.ops) - 1


def execute(prog: Program) -> float:
    """Run the program; fill every op's per-rank start/end. Returns the step time."""
    env = simpy.Environment()
    n = prog.n
    done = [env.event() for _ in prog.ops]

    def stream(name: str):
        free = np.zeros(n)
        for i, op in enumerate(prog.ops):
            if op.stream != name:
                continue
            if op.deps:
                yield simpy.AllOf(env, [done[d] for d in op.deps])
            ready = free.copy()
            for d in op.deps:
                np.maximum(ready, prog.ops[d].end, out=ready)
            if name == "compute":
                op.start = ready
                op.end = ready + op.dur
                free = op.end
                yield env.timeout(max(float(op.end.max()) - env.now, 0.0))
            else:
                t0 = max(float(ready.max()), env.now)
                yield env.timeout(t0 - env.now)
                res = op.comm()
                op.result = res
                op.start = np.full(n, t0)
                op.end = t0 + res.rank_end
                free = np.full(n, t0 + res.duration)
                yield env.timeout(res.duration)
            done[i].succeed()

    env.process(stream("compute"))
    env.process(stream("comm"))
    env.run()
    missing = [i for i, e in enumerate(done) if not e.triggered]
    if missing:  # a dependency on a later op of the other stream: a program bug
        raise RuntimeError(f"step program deadlocked at op {missing[0]}: {prog.ops[missing[0]]}")
    return float(max(op.end.max() for op in prog.ops)) if prog.ops else 0.0


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


@dataclass
class StrategyContext:
    cfg: Config
    compute: ComputeModel
    a2a: Callable[[Traffic], CollectiveResult]
    dp_all_reduce: Callable[[float], CollectiveResult]
    all_reduce_all: Callable[[float], CollectiveResult]
    replicated_bytes: float                    # router / latent weights per layer, per rank
    groups: int = 1                            # data-parallel copies of the MoE group


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


def _comm(prog: Program, ctx: StrategyContext, lin: LayerInputs, layer: int, pass_: str,
          phase: str, deps: list[int], traffic: Traffic | None = None, chunk: int = -1,
          share: float = 1.0) -> int:
    """An all-to-all of the phase's traffic (or `traffic`, a `share` of it, for chunks), with
    the copies that pack and unpack its buffers where the phase has them (FSEP's weights)."""
    t = lin.phases[(pass_, phase)] if traffic is None else traffic
    local = lin.local.get((pass_, phase))
    copy_s = (ctx.compute.local_copy(local * share) if local is not None
              else np.zeros(prog.n))
    latency = ctx.cfg.cluster.collective_latency_us * 1e-6
    pack, unpack = _weight_copies(ctx, lin, pass_, phase, t, share, prog.n)

    def run(t=t) -> CollectiveResult:
        return _packed(_with_local_copy(ctx.a2a(t), copy_s, latency), pack, unpack)

    return prog.add(Op(layer, pass_, phase, "comm", deps, comm=run, nbytes=t.sent(prog.n),
                       chunk=chunk))


def _weight_copies(ctx: StrategyContext, lin: LayerInputs, pass_: str, phase: str,
                   t: Traffic, share: float, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Seconds per rank of FSEP's copies around its weight all-to-alls (runtime.layers_fsep),
    before the collective (pack) and after it (unpack):
    - weight gather: the shards of every replica a rank serves are gathered into the send
      buffer (a row gather of all it sends, its own block included); the received shards
      are merged into whole experts by one copy of all it receives (none with one rank: the
      merged weights are views of the buffer).
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
    cm, degree = ctx.compute, ctx.cfg.parallel.degree or ctx.cfg.cluster.num_gpus
    if phase == "weight_gather":
        unpack = (cm.local_copy(recv) + 2 * cm.launch_overhead) if degree > 1 else zero
        return cm.gather(sent), np.where(recv > 0, unpack, 0.0)
    m = ctx.cfg.model
    shard = share * m.total_experts * m.expert_params * m.dtype_bytes / degree
    pack = np.where(sent > 0, cm.local_copy(sent) + 2 * cm.launch_overhead, 0.0)
    reduce = (recv + shard) / cm.rates["hbm"] + cm.launch_overhead
    return pack, np.where(recv > 0, reduce, 0.0)


def _packed(res: CollectiveResult, pack: np.ndarray, unpack: np.ndarray) -> CollectiveResult:
    """The collective after every rank's pack (it starts when the slowest rank's is done),
    each rank's unpack after its own part."""
    if not (np.any(pack > 0) or np.any(unpack > 0)):
        return res
    end = res.rank_end + float(pack.max()) + unpack
    return dataclasses.replace(res, rank_end=end, duration=float(end.max()))


def _cmp(prog: Program, layer: int, pass_: str, phase: str, deps: list[int],
         dur: np.ndarray, flops: np.ndarray | None = None, tokens: np.ndarray | None = None,
         chunk: int = -1) -> int:
    return prog.add(Op(layer, pass_, phase, "compute", deps, dur=dur, flops=flops,
                       tokens=tokens, chunk=chunk))


# A permute's stable sorts, device-to-host syncs and host split work. EP and FSEP sort the
# assignments by expert, then by destination replica (runtime.dispatch.build_route), and sync
# once: the size exchange, whose counts the host needs for the all-to-all splits; the host then
# computes the splits and the layout while the GPU waits. HP sorts once by expert and never
# syncs: its all-to-all sizes are known in advance (no size exchange).
EP_PERMUTE = {"sorts": 2, "syncs": 1, "splits": 1}
HP_PERMUTE = {"sorts": 1, "syncs": 0}


def _expert(ctx: StrategyContext, lin: LayerInputs, backward: bool, regroup: bool = True):
    """The experts' grouped FFN; with `regroup` (EP, FSEP: rows arrive source-major) the two
    row gathers into and out of expert-major order, which the runtime times as expert too."""
    m = ctx.cfg.model
    t, f = ctx.compute.expert_ffn(lin.expert_tokens, m.expert_dim, m.d_ffn, m.dtype_bytes,
                                  backward=backward, activation=m.activation,
                                  kind=m.expert_kind, fused_ok=not regroup)
    if regroup:
        t = t + ctx.compute.regroup(lin.expert_tokens.sum(axis=1), _row_bytes(ctx))
    return t, f


def _row_bytes(ctx: StrategyContext) -> int:
    m = ctx.cfg.model
    return m.expert_dim * m.dtype_bytes


def _assignments(ctx: StrategyContext, lin: LayerInputs) -> np.ndarray:
    """(token, expert) pairs a rank permutes: every routed (sub-)token, once per expert."""
    return lin.routed * ctx.cfg.model.top_k


def _permute(ctx: StrategyContext, lin: LayerInputs, backward: bool,
             kind: dict[str, int] = EP_PERMUTE) -> np.ndarray:
    m = ctx.cfg.model
    return ctx.compute.permute(_assignments(ctx, lin), _row_bytes(ctx), m.top_k, **kind,
                               backward=backward)


def _unpermute(ctx: StrategyContext, lin: LayerInputs, backward: bool) -> np.ndarray:
    """The weighted combine on the compute stream (phase "combine")."""
    return ctx.compute.combine(_assignments(ctx, lin), _row_bytes(ctx), ctx.cfg.model.top_k,
                               backward=backward)


def _grad_sync(prog: Program, ctx: StrategyContext, lin: LayerInputs, layer: int,
               deps: list[int]) -> None:
    if ("bwd", "grad_sync") in lin.phases and lin.phases[("bwd", "grad_sync")].total > 0:
        _comm(prog, ctx, lin, layer, "bwd", "grad_sync", deps)
    if ctx.cfg.parallel.dp_grad_sync and lin.dp_bytes > 0:
        d = max(ctx.groups, 1)
        sent = np.full(prog.n, int(2 * (d - 1) / d * lin.dp_bytes), dtype=np.int64)
        prog.add(Op(layer, "bwd", "grad_sync", "comm", deps,
                    comm=lambda b=lin.dp_bytes: ctx.dp_all_reduce(b), nbytes=sent))


def _router(ctx: StrategyContext, lin: LayerInputs, backward: bool):
    """Routing of every (sub-)token a rank routes: the logits GEMM [routed x expert_dim] @
    [dim x E], softmax, top-k and the gate renormalisation (`ComputeModel.router`)."""
    m = ctx.cfg.model
    return ctx.compute.router(lin.routed, m.expert_dim, m.num_experts, m.top_k, m.dtype_bytes,
                              backward, forced=ctx.cfg.run.routing == "forced")


def _latent(prog: Program, ctx: StrategyContext, lin: LayerInputs, layer: int, pass_: str,
            phase: str, deps: list[int]) -> list[int]:
    """Multi-Head LatentMoE's projection to (latent_down) or from (latent_up) the latent, on a
    model with heads; standard MoE has none (returns `deps` unchanged)."""
    m = ctx.cfg.model
    if m.num_heads < 2:
        return deps
    k, n = (m.d_model, m.latent_dim) if phase == "latent_down" else (m.latent_dim, m.d_model)
    t, f = ctx.compute.gemm(lin.tokens, k, n, m.dtype_bytes, backward=pass_ == "bwd")
    return [_cmp(prog, layer, pass_, phase, deps, t, f, lin.tokens)]


def build_ep(prog: Program, ctx: StrategyContext, layers: list[LayerInputs]) -> None:
    """EP: router, permute, dispatch, experts, combine; backward mirrors it, with the expert
    weight gradients inside the expert backward."""
    last = []
    for li, lin in enumerate(layers):
        rt, rf = _router(ctx, lin, False)
        down = _latent(prog, ctx, lin, li, "fwd", "latent_down", last)
        a = _cmp(prog, li, "fwd", "router", down, rt, rf, lin.tokens)
        b = _cmp(prog, li, "fwd", "permute", [a], _permute(ctx, lin, False))
        c = _comm(prog, ctx, lin, li, "fwd", "dispatch", [b])
        et, ef = _expert(ctx, lin, False)
        d = _cmp(prog, li, "fwd", "expert", [c], et, ef, lin.expert_tokens.sum(1))
        e = _comm(prog, ctx, lin, li, "fwd", "combine", [d])
        f = _cmp(prog, li, "fwd", "combine", [e], _unpermute(ctx, lin, False))
        last = _latent(prog, ctx, lin, li, "fwd", "latent_up", [f])
    for li in reversed(range(len(layers))):
        lin = layers[li]
        up = _latent(prog, ctx, lin, li, "bwd", "latent_up", last)
        a = _cmp(prog, li, "bwd", "combine", up, _unpermute(ctx, lin, True))
        b = _comm(prog, ctx, lin, li, "bwd", "combine", [a])
        et, ef = _expert(ctx, lin, True)
        c = _cmp(prog, li, "bwd", "expert", [b], et, ef, lin.expert_tokens.sum(1))
        d = _comm(prog, ctx, lin, li, "bwd", "dispatch", [c])
        e = _cmp(prog, li, "bwd", "permute", [d], _permute(ctx, lin, True))
        rt, rf = _router(ctx, lin, True)
        f = _cmp(prog, li, "bwd", "router", [e], rt, rf, lin.tokens)
        _grad_sync(prog, ctx, lin, li, [c])
        last = _latent(prog, ctx, lin, li, "bwd", "latent_down", [f])
    _final_sync(prog, ctx, last)


def _head_pack(prog: Program, ctx: StrategyContext, lin: LayerInputs) -> np.ndarray:
    """HP's send buffer: with head h on rank h mod N the latent's heads are made
    destination-major by one strided copy of T x latent (a view, free, when the group is one
    rank); its mirror after the combine's all-to-all, and the same in backward.
    runtime/layers_hp.py does exactly that around each all-to-all, on the compute stream."""
    m = ctx.cfg.model
    nbytes = lin.tokens.astype(np.float64) * m.latent_dim * m.dtype_bytes
    if prog.n // ctx.groups == 1:
        return np.zeros_like(nbytes)
    return np.where(nbytes > 0, ctx.compute.local_copy(nbytes) + ctx.compute.launch_overhead,
                    0.0)


def build_hp(prog: Program, ctx: StrategyContext, layers: list[LayerInputs]) -> None:
    """HP (Multi-Head LatentMoE): project down to the latent, all-to-all the latent (each rank
    gets its heads' slices of every token), route and run experts locally, all-to-all back,
    project up. The all-to-all bytes are the planner's (fixed by the batch); packing the
    heads into the send buffer and unpacking them is compute-stream work timed as part of the
    dispatch and combine phases (`_head_pack`)."""
    gpu, m = ctx.compute, ctx.cfg.model
    db, lat = m.dtype_bytes, m.latent_dim
    last = []
    for li, lin in enumerate(layers):
        pack = _head_pack(prog, ctx, lin)
        dt, df = gpu.gemm(lin.tokens, m.d_model, lat, db)
        a = _cmp(prog, li, "fwd", "latent_down", last, dt, df, lin.tokens)
        a = _cmp(prog, li, "fwd", "dispatch", [a], pack)
        b = _comm(prog, ctx, lin, li, "fwd", "dispatch", [a])
        rt, rf = _router(ctx, lin, False)
        c = _cmp(prog, li, "fwd", "router", [b], rt, rf, lin.routed)
        d = _cmp(prog, li, "fwd", "permute", [c], _permute(ctx, lin, False, HP_PERMUTE))
        et, ef = _expert(ctx, lin, False, regroup=False)
        e = _cmp(prog, li, "fwd", "expert", [d], et, ef, lin.expert_tokens.sum(1))
        f = _cmp(prog, li, "fwd", "combine", [e], _unpermute(ctx, lin, False))
        g = _comm(prog, ctx, lin, li, "fwd", "combine", [f])
        g = _cmp(prog, li, "fwd", "combine", [g], pack)
        ut, uf = gpu.gemm(lin.tokens, lat, m.d_model, db)
        h = _cmp(prog, li, "fwd", "latent_up", [g], ut, uf, lin.tokens)
        last = [h]
    for li in reversed(range(len(layers))):
        lin = layers[li]
        pack = _head_pack(prog, ctx, lin)
        ut, uf = gpu.gemm(lin.tokens, lat, m.d_model, db, backward=True)
        a = _cmp(prog, li, "bwd", "latent_up", last, ut, uf, lin.tokens)
        a = _cmp(prog, li, "bwd", "combine", [a], pack)
        b = _comm(prog, ctx, lin, li, "bwd", "combine", [a])
        c = _cmp(prog, li, "bwd", "combine", [b], _unpermute(ctx, lin, True))
        et, ef = _expert(ctx, lin, True, regroup=False)
        d = _cmp(prog, li, "bwd", "expert", [c], et, ef, lin.expert_tokens.sum(1))
        e = _cmp(prog, li, "bwd", "permute", [d], _permute(ctx, lin, True, HP_PERMUTE))
        rt, rf = _router(ctx, lin, True)
        f = _cmp(prog, li, "bwd", "router", [e], rt, rf, lin.routed)
        g = _comm(prog, ctx, lin, li, "bwd", "dispatch", [f])
        g = _cmp(prog, li, "bwd", "dispatch", [g], pack)
        dt, df = gpu.gemm(lin.tokens, m.d_model, lat, db, backward=True)
        h = _cmp(prog, li, "bwd", "latent_down", [g], dt, df, lin.tokens)
        _grad_sync(prog, ctx, lin, li, [d])
        last = [h]
    _final_sync(prog, ctx, last)


def _chunks(t: Traffic, k: int) -> list[Traffic]:
    """k equal chunks (fractional bytes: the fluid network does not care, and equal chunks
    are solved once, see Collectives._fluid)."""
    return [t.scaled(1.0 / k)] * k


def build_fsep(prog: Program, ctx: StrategyContext, layers: list[LayerInputs]) -> None:
    """FSEP (LAER-MoE): experts' weights are sharded over the group; each layer the ranks
    gather the shards of the replicas the re-layout gave them (in `fsep_chunks` chunks), the
    tokens go to the replicas, and chunk c's expert GEMMs start once chunk c's weights and the
    tokens are in, overlapping the later chunks' gathers. Backward re-gathers the weights
    (FSDP-style; not with parallel.fsep_backward_gather = false), and scatters the
    weight-gradient shards back to their owners chunk by chunk as each chunk's backward GEMMs
    finish. The first chunk's gather has no dependency on the
    layer's compute, so it prefetches while the router runs."""
    k = ctx.cfg.parallel.fsep_chunks
    last: list[int] = []
    for li, lin in enumerate(layers):
        gathers = _chunks(lin.phases[("fwd", "weight_gather")], k)
        g0 = _comm(prog, ctx, lin, li, "fwd", "weight_gather", [], gathers[0], chunk=0,
                   share=1 / k)
        rt, rf = _router(ctx, lin, False)
        down = _latent(prog, ctx, lin, li, "fwd", "latent_down", last)
        a = _cmp(prog, li, "fwd", "router", down, rt, rf, lin.tokens)
        b = _cmp(prog, li, "fwd", "permute", [a], _permute(ctx, lin, False))
        c = _comm(prog, ctx, lin, li, "fwd", "dispatch", [b])
        g = [g0] + [_comm(prog, ctx, lin, li, "fwd", "weight_gather", [], gathers[j], chunk=j,
                          share=1 / k)
                    for j in range(1, k)]
        et, ef = _expert(ctx, lin, False)
        prev = []
        for j in range(k):
            prev = [_cmp(prog, li, "fwd", "expert", [c, g[j], *prev], et / k, ef / k,
                         lin.expert_tokens.sum(1) // k + (j < lin.expert_tokens.sum(1) % k),
                         chunk=j)]
        e = _comm(prog, ctx, lin, li, "fwd", "combine", prev)
        f = _cmp(prog, li, "fwd", "combine", [e], _unpermute(ctx, lin, False))
        last = _latent(prog, ctx, lin, li, "fwd", "latent_up", [f])
    pending: list[tuple[int, list[int], list[np.ndarray], LayerInputs]] = []
    for li in reversed(range(len(layers))):
        lin = layers[li]
        # Without a backward gather (parallel.fsep_backward_gather = false: the forward's
        # weights were kept) the expert backward waits only for the combine's gradient.
        regather = ("bwd", "weight_gather") in lin.phases
        scatters = _chunks(lin.phases[("bwd", "grad_scatter")], k)
        if regather:
            gathers = _chunks(lin.phases[("bwd", "weight_gather")], k)
            g0 = _comm(prog, ctx, lin, li, "bwd", "weight_gather", [], gathers[0], chunk=0,
                       share=1 / k)
        up = _latent(prog, ctx, lin, li, "bwd", "latent_up", last)
        a = _cmp(prog, li, "bwd", "combine", up, _unpermute(ctx, lin, True))
        b = _comm(prog, ctx, lin, li, "bwd", "combine", [a])
        g = ([g0] + [_comm(prog, ctx, lin, li, "bwd", "weight_gather", [], gathers[j],
                           chunk=j, share=1 / k) for j in range(1, k)]) if regather else [b] * k
        # The previous layer's gradient scatters go after this layer's gathers on the comm
        # stream, so they overlap this layer's expert backward.
        for pli, pdeps, pscat, plin in pending:
            for j in range(k):
                _comm(prog, ctx, plin, pli, "bwd", "grad_scatter", [pdeps[j]], pscat[j],
                      chunk=j, share=1 / k)
            _grad_sync(prog, ctx, plin, pli, pdeps[-1:])
        pending = []
        et, ef = _expert(ctx, lin, True)
        chunks_done = []
        prev = []
        for j in range(k):
            prev = [_cmp(prog, li, "bwd", "expert", [b, g[j], *prev], et / k, ef / k,
                         lin.expert_tokens.sum(1) // k + (j < lin.expert_tokens.sum(1) % k),
                         chunk=j)]
            chunks_done.append(prev[0])
        d = _comm(prog, ctx, lin, li, "bwd", "dispatch", prev)
        e = _cmp(prog, li, "bwd", "permute", [d], _permute(ctx, lin, True))
        rt, rf = _router(ctx, lin, True)
        f = _cmp(prog, li, "bwd", "router", [e], rt, rf, lin.tokens)
        pending.append((li, chunks_done, scatters, lin))
        last = _latent(prog, ctx, lin, li, "bwd", "latent_down", [f])
    for pli, pdeps, pscat, plin in pending:
        for j in range(k):
            _comm(prog, ctx, plin, pli, "bwd", "grad_scatter", [pdeps[j]], pscat[j], chunk=j,
                  share=1 / k)
        _grad_sync(prog, ctx, plin, pli, pdeps[-1:])
    _final_sync(prog, ctx, last)


def _final_sync(prog: Program, ctx: StrategyContext, deps: list[int]) -> None:
    """One bucketed all-reduce of the weights every rank holds (router, HP latent projections)
    over all ranks, after the last backward layer."""
    nlayers = ctx.cfg.model.num_layers
    total = ctx.replicated_bytes * nlayers
    if ctx.cfg.parallel.dp_grad_sync and total > 0 and prog.n > 1:
        n = prog.n
        sent = np.full(n, int(2 * (n - 1) / n * total), dtype=np.int64)
        prog.add(Op(0, "bwd", "grad_sync", "comm", deps,
                    comm=lambda: ctx.all_reduce_all(total), nbytes=sent))


BUILDERS = {"ep": build_ep, "hp": build_hp, "fsep": build_fsep}
