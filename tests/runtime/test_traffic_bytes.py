"""planner/ is the single source of every byte: each strategy's runtime layer, on 2 and 4 gloo
processes, moves in every all-to-all phase exactly the bytes that planner.traffic's matrices
give for the placement and routing the layer used (row `rank` sent, column `rank` received,
the rank's own block included), forward and backward, and no phase the planner lacks."""

from __future__ import annotations

import numpy as np
import torch

from runtime.comm import DistEnv, record_bytes
from tests.runtime.harness import run_ranks
from tests.runtime.test_layers_numerics import ReplicatedLayouts, T, forced_counts, model


def _check(rank, world, strategy, latent, use_forced, layout):
    from planner.traffic import layer_traffic
    from runtime.experts import init_moe_weights
    from runtime.layers import build_layer
    m = model(strategy, latent)
    forced = forced_counts(m, world, seed=11) if use_forced else None
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo")
    kw = {"layout": ReplicatedLayouts()} if layout == "replicated" else {}
    layer = build_layer(strategy, m, init_moe_weights(m, seed=3), layer=2, env=env, **kw)
    x = torch.randn(T, m.d_model, generator=torch.Generator().manual_seed(rank),
                    requires_grad=True)
    with record_bytes() as log:
        y = layer(x, forced=forced)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    counts = layer.seen_counts()
    placement = layer.last_placement if strategy == "fsep" else layer.placement
    want = layer_traffic(m, placement, counts)
    got = {k[1:] for k in log.sent}
    assert {k[0] for k in log.sent} == {2}, log.sent.keys()
    assert got == set(want.phases), (sorted(got), sorted(want.phases))
    for key, mtx in want.phases.items():
        np.testing.assert_array_equal(log.sent[(2, *key)], mtx[rank], err_msg=f"sent {key}")
        np.testing.assert_array_equal(log.received[(2, *key)], mtx[:, rank],
                                      err_msg=f"received {key}")
        assert np.array_equal(want.rows[key] * want.row_bytes[key], mtx)
    if strategy != "hp":
        assert layer.last_traffic is not None
        assert np.array_equal(layer.last_traffic.tokens, want.tokens)


def _check_all(rank, world, cases):
    for case in cases:
        try:
            _check(rank, world, *case)
        except AssertionError as e:
            raise AssertionError(f"case (strategy, latent, forced, layout) = {case}: {e}") \
                from e


CASES = [("ep", False, True, ""), ("ep", True, False, ""), ("hp", True, True, ""),
         ("fsep", False, True, "replicated"), ("fsep", True, False, ""),
         ("fsep", False, True, "")]


def test_bytes_equal_planner_2_ranks():
    run_ranks(2, _check_all, CASES)


def test_bytes_equal_planner_4_ranks():
    run_ranks(4, _check_all, CASES)
