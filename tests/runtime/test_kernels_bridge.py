"""runtime.kernels_bridge's HP expert path: cut at head boundaries, the same function."""

from __future__ import annotations

import torch

import runtime.kernels_bridge as kb


def test_head_grouped_ffn_cuts_at_heads_and_matches(monkeypatch):
    # Groups past the per-call limit are cut at head boundaries (each head holds rows / heads
    # rows): same output as one call over all groups.
    monkeypatch.setattr(kb, "GROUPED_MM_MAX_GROUPS", 8)
    g = torch.Generator().manual_seed(0)
    heads, e, r, d, f = 4, 4, 12, 6, 5
    sizes = torch.cat([torch.randint(0, e, (r,), generator=g).bincount(minlength=e)
                       for _ in range(heads)])
    x = torch.randn(heads * r, d, generator=g)
    w1, w2 = torch.randn(heads * e, d, f, generator=g), torch.randn(heads * e, f, d, generator=g)
    calls = []
    real = kb.grouped_ffn

    def spy(x_, s_, a_, b_, unfused=False):
        calls.append(a_.shape[0])
        return real(x_, s_, a_, b_, unfused)

    monkeypatch.setattr(kb, "grouped_ffn", spy)
    got = kb.head_grouped_ffn(x, sizes, w1, w2, heads)
    assert calls == [8, 8]
    torch.testing.assert_close(got, real(x, sizes.tolist(), w1, w2), rtol=0, atol=0)
