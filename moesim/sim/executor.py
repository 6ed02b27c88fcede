"""The discrete-event executor of step programs: operations on a compute and a comm stream of
every rank, with explicit dependencies.

A program is a list of operations in issue order, each on one stream of every rank with
dependencies on earlier operations. The executor runs one SimPy process per stream, vectorised
over ranks: an operation's start on rank r is the later of its stream being free on r and its
dependencies having finished on r, so per-rank skew (a rank with more expert tokens finishes
later) carries through. Overlap comes only from the dependencies and the streams: nothing is
assumed to hide behind anything else.

Assumed: a collective starts when its last participant is ready (NCCL semantics, a barrier at
the start); ranks finish it at different times (`CollectiveResult.rank_end`). One comm stream
per rank, so collectives run one at a time on the network and never share it with each other.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import simpy

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
