"""Capacity-factor dispatch in the planner's traffic, against counts worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest
from planner_helpers import small_model

from moesim.config import RoutingConfig
from moesim.errors import InputError
from planner.capacity import Capacity
from planner.placement import ep_placement, hp_placement
from planner.traffic import layer_traffic


def test_capacity_is_megatrons_ceil_of_the_balanced_share():
    # 10 tokens, top-2, 4 experts: balanced share 5; factor 1.1 -> ceil(5.5) = 6
    assert Capacity(1.1).per_expert(10, 4, 2) == 6
    assert Capacity(1.0).per_expert(10, 4, 2) == 5
    assert Capacity(0.5).per_expert(7, 4, 1) == 1  # ceil(0.875)
    assert Capacity.from_config(RoutingConfig()) is None  # capacity_factor 0: dropless
    with pytest.raises(InputError, match="capacity_factor"):
        Capacity(0.0)


def test_ep_traffic_drops_and_pads_rows_over_capacity():
    m = small_model(experts=4, top_k=2)
    # 2 sources x 10 tokens, top-2 -> 20 pairs each
    c = np.array([[[9, 5, 4, 2]], [[1, 1, 8, 10]]])
    p = ep_placement(4, 2)  # experts 0, 1 on rank 0; 2, 3 on rank 1
    t = layer_traffic(m, p, c, capacity=Capacity(1.0))  # C = 5
    kept = np.array([[5, 5, 4, 2], [1, 1, 5, 5]])
    assert np.array_equal(t.expert_tokens.sum(axis=0), kept.sum(axis=0))
    assert np.array_equal(t.dropped, [[4, 0, 0, 0], [0, 0, 3, 5]]) and t.padded is None
    width = m.d_model * m.dtype_bytes
    assert np.array_equal(t.phases[("fwd", "dispatch")],
                          np.array([[10, 6], [2, 10]]) * width)
    pad = layer_traffic(m, p, c, capacity=Capacity(1.0, pad=True))
    # every expert gets exactly min(C, T) = 5 rows from each source, whatever was routed
    assert np.array_equal(pad.tokens, np.full((2, 4), 5))
    assert np.array_equal(pad.phases[("fwd", "dispatch")], np.full((2, 2), 10) * width)
    assert np.array_equal(pad.padded, [[0, 0, 1, 3], [4, 4, 0, 0]])
    big = layer_traffic(m, p, c, capacity=Capacity(4.0, pad=True))  # C = 20 > T = 10
    assert np.array_equal(big.tokens, np.full((2, 4), 10))
    loose = layer_traffic(m, p, c, capacity=Capacity(2.0))  # C = 10: nothing dropped
    assert not loose.dropped.any()
    assert np.array_equal(loose.phases[("fwd", "dispatch")],
                          layer_traffic(m, p, c).phases[("fwd", "dispatch")])


def test_hp_dispatch_is_fixed_but_its_expert_rows_shrink():
    m = small_model(experts=4, top_k=1, heads=2, head_dim=4)
    c = np.array([[[4, 0, 0, 0], [1, 1, 1, 1]], [[0, 0, 0, 4], [2, 2, 0, 0]]])  # T = 4
    p = hp_placement(m, 2)
    full = layer_traffic(m, p, c)
    cap = layer_traffic(m, p, c, capacity=Capacity(2.0))  # C = ceil(4/4*2) = 2
    assert np.array_equal(cap.phases[("fwd", "dispatch")], full.phases[("fwd", "dispatch")])
    assert cap.expert_tokens.sum() == (2 + 2) + 8  # head 0 keeps 2 of 4 twice; head 1 all 8
