"""The discrete-event executor of step programs: operations on the streams of every rank of a
pipeline stage, with explicit dependencies, in issue order.

A program is a list of operations in issue order, each on one stream ("compute", or a
communication stream of moesim.results.STREAMS) of every rank of one pipeline stage, with
dependencies on earlier operations. A lane is a (stage, stream); every stage has the same
number of ranks, and position i of one stage is the pipeline peer of position i of another, so
a dependency across stages is rank by rank. The executor walks the ops in issue order (a
topological order), vectorised over the stage's ranks: an operation's start on rank r is the
later of its lane being free on r and its dependencies having finished on r, so per-rank skew
(a rank with more expert tokens finishes later) carries through. Overlap comes only from the
dependencies and the streams: nothing is assumed to hide behind anything else.

Assumed: a collective group starts when its last participant is ready (NCCL semantics, a
barrier at the start); ranks finish it at different times (`CollectiveResult.rank_end`). The
groups of one op (every TP group of a stage, every MoE group) are timed on the network
together as if they started at once, then each is shifted to its own start: exact when the
groups share no link (TP and expert groups inside a node), an approximation when they do.
Collectives of one stream run one at a time; collectives of different lanes that overlap in
time are each timed on an otherwise empty network (their contention for shared links is
ignored: a lower bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from moesim.sim.collectives import CollectiveResult


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
    stage: int = 0                                                 # pipeline stage (lane)
    # A collective's independent groups (int64[G, k] positions): each starts when its own
    # members are ready. None: one group of every rank (a barrier over the stage).
    groups: np.ndarray | None = None
    # Filled by the executor.
    start: np.ndarray = field(default=None, repr=False)            # type: ignore[assignment]
    end: np.ndarray = field(default=None, repr=False)              # type: ignore[assignment]
    result: CollectiveResult | None = field(default=None, repr=False)


class Program:
    """Operations in issue order; `add` returns the op's index for later dependencies."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.ops: list[Op] = []

    def add(self, op: Op) -> int:
        z = np.zeros(self.n, dtype=np.int64)
        op.nbytes = z if op.nbytes is None else op.nbytes
        op.tokens = z if op.tokens is None else op.tokens
        op.flops = np.zeros(self.n) if op.flops is None else op.flops
        if any(d >= len(self.ops) for d in op.deps):
            raise ValueError(f"op {len(self.ops)} ({op.pass_} {op.phase}) depends on a later "
                             "op: a program is built in issue order")
        self.ops.append(op)
        return len(self.ops) - 1


def execute(prog: Program) -> float:
    """Run the program; fill every op's per-rank start/end. Returns the step time.

    Ops are taken in issue order, which is a topological order (every dependency is issued
    first), so each op's start is known when it is reached: on each rank, the later of its
    lane being free and its dependencies' ends. A compute op then ends after its duration; a
    collective starts, for each of its groups (`Op.groups`, default: all ranks one group),
    when the group's last member is ready, and each rank ends when the collective's result
    says it does; the lane is busy until the group's last rank is done."""
    n = prog.n
    free: dict[tuple[int, str], np.ndarray] = {}
    for op in prog.ops:
        lane = (op.stage, op.stream)
        f = free.get(lane)
        ready = np.zeros(n) if f is None else f.copy()
        for d in op.deps:
            np.maximum(ready, prog.ops[d].end, out=ready)
        if op.stream == "compute":
            op.start = ready
            op.end = ready + op.dur
            free[lane] = op.end
            continue
        res = op.comm()
        op.result = res
        if op.groups is None:
            t0 = float(ready.max())
            op.start = np.full(n, t0)
            op.end = t0 + res.rank_end
            free[lane] = np.full(n, t0 + res.duration)
        else:
            g = op.groups
            start = np.zeros(n) if f is None else f.copy()
            start[g] = ready[g].max(axis=1, keepdims=True)
            op.start = start
            op.end = start + res.rank_end
            busy = op.end.copy()
            busy[g] = op.end[g].max(axis=1, keepdims=True)
            free[lane] = busy
    return float(max(op.end.max() for op in prog.ops)) if prog.ops else 0.0
