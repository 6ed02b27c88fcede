"""One simulated training step (the MoE layers, forward and backward) for a strategy: from a
config and a routing trace to the Result table, a summary and a timeline.

How the cluster is split: the MoE group has G = `parallel.degree` ranks (0: every GPU), and the
cluster holds N / G groups side by side (data parallel). Group g runs ranks g*G .. g*G+G-1 and
replays the trace aggregated to G shards at trace step (step + g) mod steps, so that groups see
different (but equally distributed) routing. Each group's placement and traffic come from
planner/ (EP: contiguous blocks, or the hot-replica baseline; HP: head h on rank h mod G;
FSEP: `planner.schedule.FsepSchedule`, by `planner.solver`, from the layer's earlier trace
steps unless `planner.oracle`). The model's layers are the trace's,
resampled evenly when the model has more or fewer layers than the trace.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from moesim.config import Config
from moesim.errors import InputError
from moesim.results import COLUMNS, STREAMS
from moesim.sim.collectives import CollectiveResult, Traffic, collectives_for
from moesim.sim.compute import ComputeModel
from moesim.sim.executor import Program, execute
from moesim.sim.network import FlowNetwork
from moesim.sim.programs import LayerInputs, StrategyContext, build_step
from moesim.sim.topology import LINK_KINDS, Topology, build_topology
from moesim.sim.variants import table_for
from planner.capacity import Capacity
from planner.parallel import etp_gather_bytes
from planner.placement import ep_hot_replicas, ep_placement, hp_placement
from planner.traffic import layer_traffic
from traces.schema import Trace


@dataclass
class StepOutcome:
    strategy: str
    step: int
    step_time: float
    frame: pd.DataFrame
    link_bytes: np.ndarray           # per LINK_KINDS
    comm_bytes: float                # network bytes of all collectives
    comm_time: float                 # summed collective durations
    flows: int
    events: int
    imbalance: float                 # mean over layers of max/mean - 1 of expert tokens
    wall_s: float = 0.0              # host seconds this step took to simulate
    phase_time: dict[tuple[str, str], float] = field(default_factory=dict)  # mean per rank
    ops: list = field(default_factory=list, repr=False)


def _check_trace(cfg: Config, trace: Trace, source: str, g: int) -> None:
    m = cfg.model
    if trace.num_heads != m.num_heads:
        raise InputError(source, "heads", f"the trace has {trace.num_heads} heads, the model "
                         f"{m.num_heads} ({cfg.source}: model.num_heads)")
    if trace.num_experts != m.num_experts:
        raise InputError(source, "experts", f"the trace has {trace.num_experts} experts per "
                         f"head, the model {m.num_experts} ({cfg.source}: model.num_experts)")
    if trace.meta.top_k != m.top_k:
        raise InputError(source, "metadata.top_k", f"the trace routes top-{trace.meta.top_k}, "
                         f"the model top-{m.top_k} ({cfg.source}: model.top_k)")
    if trace.num_shards % g:
        raise InputError(source, "shards", f"the MoE group of {g} ranks does not divide the "
                         f"trace's {trace.num_shards} shards (set parallel.degree)")


class Simulator:
    """Simulates steps of one config and trace on one cluster; reusable over strategies."""

    def __init__(self, cfg: Config, trace: Trace, trace_source: str,
                 topo: Topology | None = None) -> None:
        self.cfg = cfg
        self.n = cfg.cluster.num_gpus
        self.g, self.width, self.moe_groups = self._moe_layout()
        self.etp_groups: np.ndarray | None = None  # int64[groups, etp] positions, etp > 1
        _check_trace(cfg, trace, trace_source, self.g)
        self.trace = trace.aggregate(self.g)
        # The trace's layers are the model's MoE layers.
        if self.trace.num_layers != cfg.model.num_moe_layers:
            self.trace = self.trace.resample(num_layers=cfg.model.num_moe_layers)
        self.trace_source = trace_source
        self.topo = topo or build_topology(cfg.cluster, cfg.source)
        if self.topo.num_gpus != self.n:
            raise InputError(cfg.source, "cluster.nodes", f"the topology has "
                             f"{self.topo.num_gpus} GPUs, nodes x gpus_per_node = {self.n}")
        self.compute = ComputeModel.load(cfg.cluster.gpu)
        self.net = FlowNetwork(self.topo, cfg.cluster.completion_tolerance)
        self.coll = collectives_for(cfg.cluster, self.net)
        self._traffic: dict = {}
        self._schedule = None  # planner.schedule.FsepSchedule, made on first use
        self._at: tuple[int, int] | None = None  # (trace step, layer) being planned

    def _moe_layout(self) -> tuple[int, int, np.ndarray]:
        """(ranks of a MoE group, ranks a program spans, the groups as int64[groups, G]
        positions in the program): the MoE part of a step spans the cluster, groups side
        by side (group g: ranks g*G .. g*G + G - 1)."""
        g = self.cfg.parallel.degree or self.n
        if self.n % g:
            raise InputError(self.cfg.source, "parallel.degree",
                             f"{g} does not divide the cluster's {self.n} GPUs")
        return g, self.n, np.arange(self.n, dtype=np.int64).reshape(self.n // g, g)

    # --- planner -----------------------------------------------------------------------
    def _placement(self, strategy: str, counts: np.ndarray):
        m, g = self.cfg.model, self.g
        if strategy == "hp":
            if m.num_heads < 2:
                raise InputError(self.cfg.source, "model.num_heads", "HP needs a Multi-Head "
                                 "LatentMoE model (num_heads > 1); give HP its own config "
                                 "and trace (--hp-config, --hp-trace)")
            return hp_placement(m, g)
        if strategy == "hpxep":
            from planner.hpxep import hpxep_placement
            return hpxep_placement(m, g, self._hpxep_groups())
        if strategy == "ep":
            extra = self.cfg.planner.ep_hot_replicas
            if extra:
                return ep_hot_replicas(counts.sum(axis=0).reshape(-1), g, extra)
            return ep_placement(m.total_experts, g)
        # FSEP: planner.schedule's layout for this (pass, layer): planned from the layer's
        # earlier passes (or, with planner.oracle, from this one), by planner.solver.
        tstep, layer = self._at
        if self._schedule is None:
            from planner.schedule import FsepSchedule
            self._schedule = FsepSchedule(m, self.cfg.planner, g, self.cfg.cluster)
        return self._schedule.placement(tstep, layer, lambda s: self.trace.counts[s, layer])

    def _hpxep_groups(self) -> int:
        """HP x EP head groups of a MoE group: parallel.hpxep_groups, else one per node."""
        gpn = self.cfg.cluster.gpus_per_node
        return self.cfg.parallel.hpxep_groups or max(1, self.g // gpn if self.g >= gpn else 1)

    def _layer_traffic(self, strategy: str, tstep: int, layer: int):
        key = (strategy, tstep, layer)
        if key not in self._traffic:
            counts = self.trace.counts[tstep, layer]
            self._at = (tstep, layer)
            placement = self._placement(strategy, counts)
            gpn = self.cfg.cluster.gpus_per_node if (strategy == "ep" and
                                                     self.cfg.parallel.ep_dedup) else 0
            if gpn and self.g % gpn:
                gpn = 0  # a group inside one node: nothing to deduplicate
            if strategy == "hpxep":
                from planner.hpxep import hpxep_traffic
                lt = hpxep_traffic(self.cfg.model, placement, counts, self._hpxep_groups())
            else:
                lt = layer_traffic(self.cfg.model, placement, counts, gpus_per_node=gpn,
                                   fsep_backward_gather=self.cfg.parallel.fsep_backward_gather,
                                   capacity=Capacity.from_config(self.cfg.routing))
            self._traffic[key] = (lt, {k: Traffic.dense(v) for k, v in lt.phases.items()})
        return self._traffic[key]

    def layer_inputs(self, strategy: str, step: int, layer: int) -> LayerInputs:
        """One MoE layer over the program's ranks: every group's planner traffic laid on the
        group's positions (`moe_groups`). `layer` is the MoE layer (the trace's layer)."""
        n = self.width
        groups = len(self.moe_groups)
        m = self.cfg.model
        parts: dict[tuple[str, str], list[Traffic]] = {}
        local: dict[tuple[str, str], np.ndarray] = {}
        copies: dict[str, np.ndarray] = {}
        et = np.zeros((n, m.total_experts), dtype=np.int64)
        tokens = np.zeros(n, dtype=np.int64)
        routed = np.zeros(n, dtype=np.int64)
        owned = np.zeros(n, dtype=np.int64)
        replicated = 0
        # Groups replaying the same trace step get the same traffic: place it on all of them
        # at once (a 1024-GPU cluster of 8-rank groups has 128 groups but a few trace steps).
        by_step: dict[int, list[int]] = {}
        for gi in range(groups):
            by_step.setdefault((step + gi) % self.trace.num_steps, []).append(gi)
        order: dict[tuple[str, str], list[np.ndarray]] = {}
        for tstep, gis in by_step.items():
            lt, sparse = self._layer_traffic(strategy, tstep, layer)
            sl = self.moe_groups[gis]                                   # [k, G]
            for key, t in sparse.items():
                parts.setdefault(key, []).append(Traffic(
                    sl[:, t.src].ravel(), sl[:, t.dst].ravel(), np.tile(t.nbytes, len(gis))))
                order.setdefault(key, []).append(np.repeat(gis, len(t.src)))
            for key, mtx in lt.phases.items():
                # The diagonal never reaches the network, but it is still copied.
                local.setdefault(key, np.zeros(n))[sl] = np.diag(mtx)
            for key, v in lt.copies.items():
                copies.setdefault(key, np.zeros(n, dtype=np.int64))[sl] = v
            et[sl] = lt.expert_tokens
            tokens[sl] = lt.source_tokens
            routed[sl] = lt.routed
            owned[sl] = lt.owned_param_bytes
            replicated = max(replicated, lt.replicated_param_bytes)
        # Parameters only one rank of a group holds are replicated over the groups: their
        # gradients all-reduce over the ranks of the same local index.
        dp = float(owned.mean()) if groups > 1 else 0.0
        phases = {}
        for key, v in parts.items():
            # Entries in group order (each group's in the planner's order), as group by group.
            t = Traffic.concat(v)
            by = np.argsort(np.concatenate(order[key]), kind="stable")
            phases[key] = Traffic(t.src[by], t.dst[by], t.nbytes[by])
        etp_et, etp_bytes = None, 0.0
        if self.etp_groups is not None:
            # Expert tensor parallel: each member computes (1/etp of) every row its ETP
            # group received.
            total = et[self.etp_groups].sum(axis=1)            # [groups, E_total]
            etp_et = np.zeros_like(et)
            etp_et[self.etp_groups] = total[:, None, :]
            etp_bytes = etp_gather_bytes(m, float(total.sum(axis=1).max()))
        return LayerInputs(phases, et, tokens, routed, dp, local, copies=copies, owned=owned,
                           replicated=float(replicated), etp_expert_tokens=etp_et,
                           etp_gather_bytes=etp_bytes)

    # --- collectives -------------------------------------------------------------------
    def _dp_rings(self) -> np.ndarray:
        return self.moe_groups.T  # [G rings, groups members]: same local index

    def simulate_step(self, strategy: str, step: int) -> StepOutcome:
        cfg = self.cfg
        layers = [self.layer_inputs(strategy, step, li)
                  for li in range(cfg.model.num_moe_layers)]
        stats = {"link": np.zeros(len(LINK_KINDS)), "bytes": 0.0, "time": 0.0, "flows": 0,
                 "events": 0}

        def account(res: CollectiveResult) -> CollectiveResult:
            stats["link"] += res.link_bytes
            stats["bytes"] += res.bytes
            stats["time"] += res.duration
            stats["flows"] += res.flows
            stats["events"] += res.events
            return res

        algo = cfg.parallel.a2a_algorithm
        if algo != "direct" and len(set(np.bincount(self.topo.machine))) != 1:
            raise InputError(cfg.source, "parallel.a2a_algorithm",
                             "hierarchical all-to-all needs machines of equal size")
        ctx = StrategyContext(
            cfg=cfg, compute=self.compute,
            a2a=lambda mtx: account(self.coll.all_to_all(mtx, algo)),
            dp_all_reduce=lambda b: account(self.coll.all_reduce(self._dp_rings(), b)),
            all_reduce_all=lambda b: account(self.coll.all_reduce(
                np.arange(self.n)[None, :], b)),
            replicated_bytes=float(np.mean([lin.replicated for lin in layers])),
            groups=self.n // self.g,
            n=self.n,
            moe_groups=self.moe_groups,
        )
        prog = Program(self.n)
        build_step(prog, ctx, table_for(self.cfg, strategy), layers)
        step_time = execute(prog)
        frame, phase_time = self._frame(prog, strategy, step)
        loads = np.stack([lin.expert_tokens.sum(axis=1) for lin in layers]).astype(float)
        mean = loads.mean(axis=1)
        imb = float(np.mean(np.where(mean > 0, loads.max(axis=1) / np.maximum(mean, 1e-300)
                                     - 1.0, 0.0)))
        return StepOutcome(strategy, step, step_time, frame, stats["link"], stats["bytes"],
                           stats["time"], stats["flows"], stats["events"], imb,
                           phase_time=phase_time, ops=prog.ops)

    def _frame(self, prog: Program, strategy: str, step: int):
        n = prog.n
        ops = prog.ops
        k = len(ops)
        rank = np.tile(np.arange(n), k)
        cols = {
            "source": _strings(["sim"] * k, n),
            "strategy": _strings([strategy] * k, n),
            "step": np.full(k * n, step, dtype=np.int64),
            "layer": np.repeat([o.layer for o in ops], n).astype(np.int64),
            "rank": rank.astype(np.int64),
            "pass": _strings([o.pass_ for o in ops], n),
            "phase": _strings([o.phase for o in ops], n),
            "stream": _strings([o.stream for o in ops], n),
            "start_s": np.concatenate([o.start for o in ops]),
            "end_s": np.concatenate([o.end for o in ops]),
            "bytes": np.concatenate([o.nbytes for o in ops]).astype(np.int64),
            "tokens": np.concatenate([o.tokens for o in ops]).astype(np.int64),
            "flops": np.concatenate([o.flops for o in ops]).astype(np.float64),
        }
        df = pd.DataFrame(cols)[list(COLUMNS)]
        # Rows of zero duration and zero work are kept: they say the phase ran (empty) there.
        phase_time: dict[tuple[str, str, str], float] = {}
        for o in ops:
            key = (o.pass_, o.phase, o.stream)
            phase_time[key] = phase_time.get(key, 0.0) + float((o.end - o.start).sum())
        return df, {k: v / n for k, v in sorted(phase_time.items())}


_STR = pd.Series(["x"]).dtype  # the string dtype pandas infers (pandas 3: pyarrow "str")


def _strings(per_op: list[str], n: int):
    """One string column of a Result frame: each op's value repeated over its n ranks. Built
    as an Arrow dictionary (one code per row) and cast once, which is ~10x faster than
    converting an object array of a million rows."""
    cats, codes = np.unique(np.asarray(per_op, dtype=object), return_inverse=True)
    rows = np.repeat(codes.astype(np.int32), n)
    if pd.api.types.is_object_dtype(_STR):
        return cats[rows]
    arr = pa.DictionaryArray.from_arrays(pa.array(rows), pa.array(list(cats), pa.large_string()))
    return pd.array(arr.cast(pa.large_string()), dtype=_STR)


def run_strategies(sims: dict[str, Simulator], steps: list[int],
                   progress: bool = False) -> list[StepOutcome]:
    """Simulate every (strategy, step); strategies may use different Simulators (HP has its
    own model and trace)."""
    from tqdm import tqdm
    out = []
    jobs = [(s, st) for s in sims for st in steps]
    for s, st in tqdm(jobs, desc="simulate", unit="step", disable=not progress, leave=False):
        t0 = time.perf_counter()
        o = sims[s].simulate_step(s, st)
        o.wall_s = time.perf_counter() - t0
        out.append(o)
    return out


def summarize(outcomes: list[StepOutcome], n: dict[str, int]) -> pd.DataFrame:
    """One row per strategy: means over steps."""
    rows = []
    by: dict[str, list[StepOutcome]] = {}
    for o in outcomes:
        by.setdefault(o.strategy, []).append(o)
    for s, os_ in by.items():
        df = pd.concat([o.frame for o in os_])
        ranks = n[s]
        steps = len(os_)
        dur = df["end_s"] - df["start_s"]
        comm = df["stream"] == "comm"
        busy = dur.groupby([df["step"], df["rank"], df["stream"]]).sum()
        compute_busy = busy.xs("compute", level="stream").groupby("step").max().mean()
        sent = float(df.loc[comm, "bytes"].sum())
        row = {
            "strategy": s,
            "gpus": ranks,
            "step_ms": 1e3 * float(np.mean([o.step_time for o in os_])),
            "compute_ms": 1e3 * float(compute_busy),
            "comm_ms": 1e3 * float(dur[comm].sum()) / (ranks * steps),
            "exposed_comm_ms": 1e3 * (float(np.mean([o.step_time for o in os_]))
                                      - float(compute_busy)),
        }
        for ph in ("dispatch", "combine", "weight_gather", "grad_scatter", "grad_sync",
                   "expert"):
            # "combine" is also the name of the compute-side unpermute: count the stream
            # the table row is about.
            stream = "compute" if ph == "expert" else "comm"
            sel = (df["phase"] == ph) & (df["stream"] == stream)
            row[f"{ph}_ms"] = 1e3 * float(dur[sel].sum()) / (ranks * steps)
        row["sent_GB_per_gpu"] = sent / (ranks * steps) / 1e9
        link = np.sum([o.link_bytes for o in os_], axis=0) / steps
        for k, name in enumerate(LINK_KINDS):
            row[f"{name}_GB"] = float(link[k]) / 1e9
        ctime = float(np.mean([o.comm_time for o in os_]))
        row["achieved_GBps_per_gpu"] = (float(np.mean([o.comm_bytes for o in os_])) / ranks
                                        / ctime / 1e9) if ctime > 0 else 0.0
        row["imbalance"] = float(np.mean([o.imbalance for o in os_]))
        row["flows"] = int(np.mean([o.flows for o in os_]))
        row["events"] = int(np.mean([o.events for o in os_]))
        rows.append(row)
    return pd.DataFrame(rows)


def chrome_trace(outcomes: list[StepOutcome], max_ranks: int) -> dict:
    """Chrome/Perfetto trace: a process per (strategy, rank), a thread per stream; steps laid
    one after another. Only ranks below `max_ranks` are written (a 1024-GPU step has
    millions of slices). Ops of a pipeline stage (whole iterations) carry the stage's ranks
    (`stage_ranks` of the outcome); others run on ranks 0..N-1."""
    events: list[dict] = []
    pid_of: dict[tuple[str, int], int] = {}
    offset: dict[str, float] = {}
    tid_of = {s: i for i, s in enumerate(STREAMS)}
    for o in outcomes:
        base = offset.get(o.strategy, 0.0)
        stage_ranks = getattr(o, "stage_ranks", None) or None
        for op in o.ops:
            ranks = (stage_ranks[op.stage] if stage_ranks is not None
                     else np.arange(len(op.start)))
            for i in np.nonzero(ranks < max_ranks)[0]:
                r = int(ranks[i])
                key = (o.strategy, r)
                if key not in pid_of:
                    pid = len(pid_of)
                    pid_of[key] = pid
                    events.append({"ph": "M", "name": "process_name", "pid": pid,
                                   "args": {"name": f"{o.strategy} rank {r}"}})
                    for s, tid in tid_of.items():
                        events.append({"ph": "M", "name": "thread_name", "pid": pid,
                                       "tid": tid, "args": {"name": s}})
                start, end = float(op.start[i]), float(op.end[i])
                if end <= start:
                    continue
                name = f"{op.pass_} {op.phase}" + (f" c{op.chunk}" if op.chunk >= 0 else "")
                events.append({
                    "ph": "X", "name": name, "cat": op.stream, "pid": pid_of[key],
                    "tid": tid_of[op.stream],
                    "ts": round((base + start) * 1e6, 3), "dur": round((end - start) * 1e6, 3),
                    "args": {"layer": op.layer, "step": o.step, "bytes": int(op.nbytes[i]),
                             "tokens": int(op.tokens[i]), "flops": float(op.flops[i])},
                })
        offset[o.strategy] = base + o.step_time
    return {"traceEvents": events, "displayTimeUnit": "ms"}
