"""planner/hpxep.py: HP x EP placement and traffic against closed forms."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config import ModelConfig
from moesim.errors import InputError
from planner.hpxep import hpxep_placement, hpxep_traffic, mid_counts_of
from planner.placement import hp_placement
from planner.traffic import layer_traffic
from traces.generators import TraceSpec, generate

M = ModelConfig(d_model=64, d_ffn=32, num_experts=8, top_k=2, num_heads=4, head_dim=16)


def _counts(n: int, seed: int = 3, tokens: int = 10) -> np.ndarray:
    spec = TraceSpec(kind="zipf", steps=1, layers=1, shards=n, experts=M.num_experts,
                     heads=M.num_heads, top_k=M.top_k, tokens_per_shard=tokens, seed=seed)
    return generate(spec).counts[0, 0]


def test_placement_heads_on_groups_experts_in_blocks():
    p = hpxep_placement(M, 8, 2)  # 2 groups of 4 ranks
    rank = dict(zip(p.replica_expert.tolist(), p.replica_rank.tolist(), strict=True))
    for h in range(4):
        for e in range(8):
            assert rank[h * 8 + e] == (h % 2) * 4 + e * 4 // 8
    with pytest.raises(InputError, match="hpxep_groups"):
        hpxep_placement(M, 8, 3)
    with pytest.raises(InputError, match="hpxep_groups"):
        hpxep_placement(M, 8, 8)  # 8 groups for 4 heads


def test_traffic_closed_forms():
    n, g = 8, 2
    counts = _counts(n)
    lt = hpxep_traffic(M, hpxep_placement(M, n, g), counts, g)
    t = 10  # tokens a source
    per = n // g
    parts = [t // per + (j < t % per) for j in range(per)]  # 3, 3, 2, 2
    width = M.head_dim * M.dtype_bytes
    hp = lt.phases[("fwd", "dispatch")]
    for s in range(n):
        for d in range(n):
            assert hp[s, d] == parts[d % per] * (M.num_heads // g) * width
    assert np.array_equal(lt.phases[("fwd", "combine")], hp.T)
    assert np.array_equal(lt.phases[("bwd", "dispatch")], hp.T)
    ep = lt.phases[("fwd", "ep_dispatch")] // width
    # The EP stage stays inside each group (block diagonal) and moves every routed pair.
    for a in range(n):
        for b in range(n):
            if a // per != b // per:
                assert ep[a, b] == 0
    assert ep.sum() == n * t * M.num_heads * M.top_k
    assert np.array_equal(lt.routed, hp.sum(0) // width)
    assert lt.expert_tokens.sum() == counts.sum()
    # Every rank routes top-k pairs for each sub-token of its group's heads it got.
    mid = mid_counts_of(M, counts, g)
    assert mid.sum() == counts.sum()
    # Per head, a source's pairs are what its tokens chose: summed over parts and groups.
    np.testing.assert_array_equal(mid.reshape(g, per, 4, 8).sum(axis=1)[
        np.arange(4) % g, np.arange(4)], counts.sum(0))


def test_one_rank_a_group_is_hp():
    # G = N: the HP stage is HP's dispatch (per-head ranks h mod N), the EP stage local only.
    n = 4
    counts = _counts(n, seed=5, tokens=12)
    lt = hpxep_traffic(M, hpxep_placement(M, n, n), counts, n)
    hp = layer_traffic(M, hp_placement(M, n), counts)
    assert np.array_equal(lt.phases[("fwd", "dispatch")], hp.phases[("fwd", "dispatch")])
    ep = lt.phases[("fwd", "ep_dispatch")]
    assert np.array_equal(ep, np.diag(np.diag(ep)))
    np.testing.assert_array_equal(lt.expert_tokens, hp.expert_tokens)


def test_mid_counts_given_by_the_runtime_are_checked():
    n, g = 4, 2
    counts = _counts(n)
    p = hpxep_placement(M, n, g)
    mid = mid_counts_of(M, counts, g)
    t = np.full(n, 10)
    lt = hpxep_traffic(M, p, None, g, mid_counts=mid, source_tokens=t)
    np.testing.assert_array_equal(lt.tokens, hpxep_traffic(M, p, counts, g).tokens)
    bad = mid.copy()
    bad[0, 0, 0] += 1
    with pytest.raises(InputError, match="mid_counts"):
        hpxep_traffic(M, p, None, g, mid_counts=bad, source_tokens=t)
