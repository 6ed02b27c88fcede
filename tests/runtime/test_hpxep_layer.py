"""HP x EP (runtime/layers_hpxep.py) on 4 gloo processes (2 head groups of 2 ranks, and 4 of
1): the same function as the single-process reference (outputs, input and weight gradients,
learned and forced routing, both expert kinds), and every all-to-all moves exactly
planner/hpxep.py's bytes."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from runtime.comm import DistEnv, record_bytes
from tests.runtime.harness import run_ranks
from tests.runtime.test_layers_numerics import T, forced_counts, model, reference


def _check(rank, world, groups, use_forced, kind):
    from planner.hpxep import hpxep_traffic
    from runtime.comm import all_reduce_grads
    from runtime.layers import build_layer
    m = dataclasses.replace(model("hp", True, 2, kind), num_experts=4)
    forced = forced_counts(m, world, seed=9) if use_forced else None
    w, x, y_ref, wgt, ref = reference(m, world, forced)
    env = DistEnv(rank, world, 0, torch.device("cpu"), "gloo")
    layer = build_layer("hpxep", m, w, layer=1, env=env, hpxep_groups=groups)
    sl = slice(rank * T, (rank + 1) * T)
    xr = x.detach()[sl].clone().requires_grad_(True)
    with record_bytes() as log:
        y = layer(xr, forced=forced)
        (y * wgt[sl]).sum().backward()
    torch.testing.assert_close(y, y_ref.detach()[sl], rtol=1e-5, atol=1e-5)
    all_reduce_grads(layer.replicated_parameters())
    torch.testing.assert_close(xr.grad, x.grad[sl], rtol=1e-5, atol=1e-5)
    for name, got, want in layer.reference_grads(ref):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=name)
    # Bytes: the planner's matrices for the counts the ranks routed.
    mid = layer.last_counts.numpy()
    want = hpxep_traffic(m, layer.placement, forced, groups, mid_counts=mid,
                         source_tokens=np.full(world, T)) if forced is not None else \
        hpxep_traffic(m, layer.placement, None, groups, mid_counts=mid,
                      source_tokens=np.full(world, T))
    assert {k[1:] for k in log.sent} == set(want.phases), sorted(log.sent)
    for key, mtx in want.phases.items():
        np.testing.assert_array_equal(log.sent[(1, *key)], mtx[rank], err_msg=f"sent {key}")
        np.testing.assert_array_equal(log.received[(1, *key)], mtx[:, rank],
                                      err_msg=f"received {key}")


def _check_all(rank, world, cases):
    for case in cases:
        try:
            _check(rank, world, *case)
        except AssertionError as e:
            raise AssertionError(f"case (groups, forced, kind) = {case}: {e}") from e


def test_hpxep_matches_reference_and_planner_4_ranks():
    run_ranks(4, _check_all, [(2, False, "swiglu"), (2, True, "gelu"), (4, True, "swiglu"),
                              (1, False, "gelu")])
