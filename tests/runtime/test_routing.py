"""Forced routing: the device-built choice equals the host reference, meets the counts exactly
and never sends an item to one expert twice."""

import numpy as np
import pytest
import torch

from runtime.routing import forced_choice, forced_choice_blocks
from traces.generators import TraceSpec, generate


@pytest.mark.parametrize("kind,k", [("uniform", 2), ("zipf", 8), ("bursty", 4)])
def test_forced_choice_on_device_matches_host_reference(kind: str, k: int) -> None:
    n, e = 300, 16
    counts = generate(TraceSpec(kind=kind, steps=1, layers=1, shards=1, experts=e, top_k=k,
                                tokens_per_shard=n, seed=3)).counts[0, 0, 0, 0]
    idx = forced_choice_blocks(counts[None, None], n, k, torch.device("cpu"))[:, 0]
    assert np.array_equal(idx.numpy(), forced_choice(counts, n, k))
    assert np.array_equal(np.bincount(idx.reshape(-1).numpy(), minlength=e), counts)
    assert all(len(set(row)) == k for row in idx.tolist())


def test_forced_choice_rejects_counts_that_do_not_fit() -> None:
    with pytest.raises(ValueError, match="do not fit"):
        forced_choice_blocks(np.array([[[5, 1]]]), 3, 2, torch.device("cpu"))


def test_forced_choice_blocks_matches_per_block_reference() -> None:
    rng = np.random.default_rng(4)
    b, h, e, n, k = 3, 2, 5, 7, 3
    counts = np.stack([[rng.multinomial(n * k, [1 / e] * e) for _ in range(h)]
                       for _ in range(b)])
    counts = np.minimum(counts, n)  # the schema's bound; redistribute what was cut
    for bi in range(b):
        for hi in range(h):
            c = counts[bi, hi]
            while c.sum() < n * k:
                c[np.argmin(c)] += 1
    idx = forced_choice_blocks(counts, n, k, torch.device("cpu")).numpy()
    assert idx.shape == (b * n, h, k)
    for bi in range(b):
        for hi in range(h):
            want = forced_choice(counts[bi, hi], n, k)
            assert np.array_equal(idx[bi * n:(bi + 1) * n, hi], want)
