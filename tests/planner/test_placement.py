"""Placement constructors and validation."""

from __future__ import annotations

import numpy as np
import pytest
from planner_helpers import small_model

from moesim.errors import InputError
from planner.placement import (
    Placement,
    ep_hot_replicas,
    ep_placement,
    hp_placement,
    replicated_placement,
)


def test_ep_contiguous_blocks():
    p = ep_placement(8, 4)
    assert p.replica_rank.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert p.replica_expert.tolist() == list(range(8))
    assert np.all(p.replica_share == 1)
    # Uneven: sizes differ by at most one and stay contiguous.
    q = ep_placement(10, 4)
    sizes = np.bincount(q.replica_rank, minlength=4)
    assert sizes.max() - sizes.min() <= 1 and np.all(np.diff(q.replica_rank) >= 0)


def test_ep_given_owner_and_bad_owner():
    p = ep_placement(4, 2, owner=[1, 0, 1, 0])
    assert p.replica_rank.tolist() == [1, 0, 1, 0]
    with pytest.raises(InputError, match="owner"):
        ep_placement(4, 2, owner=[0, 1])
    with pytest.raises(InputError, match="replica_rank"):
        ep_placement(4, 2, owner=[0, 1, 2, 0])


def test_hp_head_mod_n_and_error():
    m = small_model(experts=3, heads=4)
    p = hp_placement(m, 2)
    # head h = g // 3 lives on rank h % 2
    assert p.replica_rank.tolist() == [(g // 3) % 2 for g in range(12)]
    with pytest.raises(InputError, match="num_heads"):
        hp_placement(m, 3)


def test_hot_replicas_replicate_the_hottest():
    load = np.array([100.0, 1, 1, 1, 1, 1, 1, 1])
    p = ep_hot_replicas(load, 4, extra=3)
    assert p.num_replicas == 11
    reps = p.replicas_of(0)
    assert len(reps) == 4  # 100/2 = 50 > 1 so expert 0 keeps winning
    assert np.allclose(p.replica_share[reps], 0.25)
    assert sorted(p.replica_rank[reps].tolist()) == [0, 1, 2, 3]
    with pytest.raises(InputError, match="extra"):
        ep_hot_replicas(load, 4, extra=8 * 3 + 1)


def test_hot_replicas_reduce_max_rank_load():
    rng = np.random.default_rng(3)
    load = rng.zipf(1.5, 32).astype(float)
    plain = ep_placement(32, 8).share_matrix().T @ load
    hot = ep_hot_replicas(load, 8, extra=8).share_matrix().T @ load
    assert hot.max() <= plain.max() + 1e-9
    assert np.isclose(hot.sum(), load.sum())


@pytest.mark.parametrize("field, kwargs", [
    ("replica_share", dict(replica_share=[0.5, 1.0])),
    ("replica_expert", dict(replica_expert=[0, 0], replica_share=[0.5, 0.5])),
    ("replicas", dict(replica_rank=[0, 0], replica_expert=[0, 0], replica_share=[0.5, 0.5])),
    ("replica_rank", dict(replica_rank=[0, 5])),
    ("strategy", dict(strategy="tp")),
])
def test_placement_validation(field, kwargs):
    base = dict(strategy="ep", num_ranks=2, num_experts=2, replica_expert=[0, 1],
                replica_rank=[0, 1], replica_share=[1.0, 1.0])
    base.update(kwargs)
    with pytest.raises(InputError) as e:
        Placement(**base)
    assert e.value.field == field


def test_replicated_placement_roundtrip():
    share = np.array([[0.5, 0.5, 0], [0, 0, 1.0], [0.2, 0.3, 0.5]])
    p = replicated_placement("fsep", 3, share)
    assert np.allclose(p.share_matrix(), share)
    assert p.replicas_per_rank().tolist() == [2, 2, 2]
    arr = p.replica_share
    with pytest.raises(ValueError):
        arr[0] = 3.0  # read-only
