"""The table builder on hand-made tables: chunks, lag, transparent rows, dependency errors, and
the schedule it gives against hand-worked times."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config import Config
from moesim.sim.collectives import CollectiveResult
from moesim.sim.executor import Program, execute
from moesim.sim.programs import (
    COMM,
    COMPUTE,
    IN,
    LayerInputs,
    Row,
    StrategyContext,
    Table,
    emit_pass,
)

N = 2


def _ctx() -> StrategyContext:
    return StrategyContext(cfg=Config(), compute=None, a2a=None, dp_all_reduce=None,  # type: ignore[arg-type]
                           all_reduce_all=None, replicated_bytes=0.0, n=N)


def _lin() -> LayerInputs:
    z = np.zeros(N, dtype=np.int64)
    return LayerInputs({}, np.zeros((N, 1), dtype=np.int64), z, z, 0.0)


def work(seconds: float):
    def cost(ctx, lin, pass_):
        return np.full(N, seconds), np.full(N, 10.0), np.array([7, 8])
    return cost


def coll(seconds: float):
    def cost(ctx, lin, pass_, phase, share):
        d = seconds * share
        res = CollectiveResult(d, np.full(N, d), np.zeros(3), 0.0, 0, 0)
        return (lambda: res), np.zeros(N, dtype=np.int64)
    return cost


def _run(table: Table, layers: int = 3):
    prog = Program(N)
    emit_pass(prog, _ctx(), table, "fwd", [(i, _lin()) for i in range(layers)], [])
    return prog, execute(prog)


def test_chain_chunks_and_lag_give_the_hand_worked_schedule():
    # Per layer: compute a (1 s), then 2 chunks of comm c (2 s in all), each chunk followed
    # by its compute chunk d (1 s each, 0.5 per chunk); e (a lagged comm of 1 s) after d, issued
    # one layer later.
    table = Table("t", (
        Row("router", "fwd", COMPUTE, work(1.0), (IN,), key="a"),
        Row("dispatch", "fwd", COMM, coll(2.0), ("a",), key="c", chunks="all"),
        Row("grad_sync", "fwd", COMM, coll(1.0), ("d",), key="e", lag=1),
        Row("expert", "fwd", COMPUTE, work(1.0), ("c",), key="d", chunks="all"),
    ), out={"fwd": "d"}, split=lambda ctx: 2)
    prog, t = _run(table)
    names = [(o.layer, o.phase, o.chunk) for o in prog.ops]
    # e of layer l is issued after layer l+1's comm chunks, the last one after the last layer.
    assert names.index((0, "grad_sync", -1)) > names.index((1, "dispatch", 1))
    assert names.index((0, "grad_sync", -1)) < names.index((1, "expert", 0))
    assert names[-1] == (2, "grad_sync", -1)
    # Layer 0: a [0,1], c0 [1,2], c1 [2,3], d0 [2,2.5], d1 [3,3.5]. Layer 1: a waits for all
    # of layer 0's d [3.5,4.5]; c0 [4.5,5.5], c1 [5.5,6.5]; layer 0's e [6.5,7.5] after them on
    # the comm stream; d0 [5.5,6], d1 [6.5,7]. Layer 2 ends at 11 (e1 [10,11]), e2 [11,12].
    end = {(o.layer, o.phase, o.chunk): float(o.end[0]) for o in prog.ops}
    assert end[(0, "expert", 1)] == pytest.approx(3.5)
    assert end[(1, "dispatch", 1)] == pytest.approx(6.5)
    assert end[(0, "grad_sync", -1)] == pytest.approx(7.5)
    assert end[(1, "expert", 1)] == pytest.approx(7.0)
    assert t == pytest.approx(12.0)
    # Chunked compute splits FLOPs evenly and tokens by whole units.
    d = [o for o in prog.ops if o.phase == "expert" and o.layer == 0]
    assert [list(o.tokens) for o in d] == [[4, 4], [3, 4]]
    assert all(float(o.flops[0]) == 5.0 for o in d)


def test_absent_row_is_transparent():
    skip = Row("latent_down", "fwd", COMPUTE, work(5.0), (IN,), key="b",
               when=lambda ctx, lin: False)
    table = Table("t", (
        Row("router", "fwd", COMPUTE, work(1.0), (IN,), key="a"),
        Row("dispatch", "fwd", COMM, coll(1.0), ("a",), key="c"),
        skip,
        Row("expert", "fwd", COMPUTE, work(1.0), ("b",), key="d"),
    ), out={"fwd": "d"})
    prog, _ = _run(table, layers=2)
    assert all(o.phase != "latent_down" for o in prog.ops)
    # d waits for what b would have waited for (the previous layer's d), not for c.
    ops = prog.ops
    first_d = next(i for i, o in enumerate(ops) if o.phase == "expert")
    assert ops[first_d].deps == []  # layer 0: nothing before
    second_d = next(i for i, o in enumerate(ops) if o.phase == "expert" and o.layer == 1)
    assert ops[second_d].deps == [first_d]


def test_waiting_for_a_later_row_is_an_error():
    table = Table("t", (
        Row("router", "fwd", COMPUTE, work(1.0), ("d",), key="a"),
        Row("expert", "fwd", COMPUTE, work(1.0), ("a",), key="d"),
    ), out={"fwd": "d"})
    with pytest.raises(ValueError, match="not an earlier row"):
        _run(table)


def test_prefetch_lag_issues_rows_early():
    table = Table("t", (
        Row("weight_gather", "fwd", COMM, coll(1.0), (), key="g", lag=-1),
        Row("expert", "fwd", COMPUTE, work(1.0), (IN, "g"), key="d"),
    ), out={"fwd": "d"})
    prog, _ = _run(table, layers=3)
    names = [(o.layer, o.phase) for o in prog.ops]
    assert names[:3] == [(0, "weight_gather"), (1, "weight_gather"), (0, "expert")]
    end = {(o.layer, o.phase): float(o.end[0]) for o in prog.ops}
    # Gathers back to back on the comm stream; each layer's compute waits for its own.
    assert end[(0, "weight_gather")] == 1.0 and end[(1, "weight_gather")] == 2.0
    assert end[(0, "expert")] == 2.0 and end[(1, "expert")] == 3.0
    assert end[(2, "weight_gather")] == 3.0 and end[(2, "expert")] == 4.0
