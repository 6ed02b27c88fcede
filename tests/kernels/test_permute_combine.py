import importlib
import zlib

import pytest
import torch
from conftest import TOL, rel_err

from kernels.combine import combine, combine_reference, unpermute
from kernels.permute import permute, permute_reference


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _experts(t: int, k: int, e: int, gen: torch.Generator, dtype=torch.int64) -> torch.Tensor:
    """k distinct experts per token, skewed so some experts get many rows and some none."""
    p = torch.rand(e, generator=gen) ** 4 + 1e-3
    return torch.multinomial(p.expand(t, e), k, generator=gen).to(dtype)


PERMUTE_CASES = [
    # (T, D, E, k, dtype): several counting-sort blocks, D with and without a masked tail,
    # a scan over more than one chunk of blocks (E=1024 -> 16-row blocks, 8-block chunks).
    (300, 64, 8, 4, torch.bfloat16),
    (100, 48, 64, 8, torch.float32),
    (40, 16, 1024, 4, torch.bfloat16),
    (7, 24, 5, 1, torch.float16),
]


@pytest.mark.parametrize("t,d,e,k,dtype", PERMUTE_CASES)
@pytest.mark.parametrize("int32_ids", [False, True])
def test_permute_matches_reference(t, d, e, k, dtype, int32_ids):
    gen = _gen(t, d, e, k, int32_ids)
    x = torch.randn(t, d, generator=gen).to(dtype)
    ex = _experts(t, k, e, gen, torch.int32 if int32_ids else torch.int64)
    out = permute(x, ex, e)
    ref = permute_reference(x.double(), ex, e)
    assert out.row_map.dtype == torch.int32 and out.offsets.dtype == torch.int32
    assert torch.equal(out.row_map, ref.row_map)
    assert torch.equal(out.offsets, ref.offsets)
    assert torch.equal(out.x_perm.double(), ref.x_perm)
    # Invariants, independent of the reference: every slot holds its token, buckets are
    # contiguous and sorted, token order kept inside a bucket.
    flat = out.row_map.reshape(-1).long()
    assert torch.equal(torch.sort(flat).values, torch.arange(t * k))
    assert torch.equal(out.x_perm[out.row_map.long()], x[:, None, :].expand(t, k, d))
    key_at_row = torch.empty(t * k, dtype=torch.int64)
    key_at_row[flat] = ex.reshape(-1).long()
    assert torch.all(key_at_row[1:] >= key_at_row[:-1])
    assert torch.equal(
        out.offsets[1:].long(), torch.cumsum(torch.bincount(ex.reshape(-1).long(), minlength=e), 0)
    )


def test_permute_rank_major_buckets():
    # 16 experts on 4 ranks, placed round-robin (expert e on rank e % 4): bucket_of puts the
    # dispatch buffer in rank-major, expert-minor order.
    gen = _gen("rank")
    t, d, e, k, ranks = 90, 32, 16, 4, 4
    x = torch.randn(t, d, generator=gen).bfloat16()
    ex = _experts(t, k, e, gen)
    rank_of = torch.arange(e) % ranks
    local = torch.arange(e) // ranks
    bucket_of = rank_of * (e // ranks) + local
    out = permute(x, ex, e, bucket_of)
    ref = permute_reference(x, ex, e, bucket_of)
    assert torch.equal(out.row_map, ref.row_map) and torch.equal(out.offsets, ref.offsets)
    assert torch.equal(out.x_perm, ref.x_perm)
    # Rank r's rows are exactly its tokens' copies.
    for r in range(ranks):
        lo, hi = out.offsets[r * (e // ranks)], out.offsets[(r + 1) * (e // ranks)]
        assert int(hi - lo) == int((rank_of[ex] == r).sum())
    by_rank = permute(x, ex, e, rank_of.int(), num_buckets=ranks)
    ref_rank = permute_reference(x, ex, e, rank_of, num_buckets=ranks)
    assert torch.equal(by_rank.row_map, ref_rank.row_map)
    assert torch.equal(by_rank.offsets, ref_rank.offsets)


@pytest.mark.parametrize("programs,chunk_keys,k", [(2, 4, 3), (3, 8, 3), (1, 32, 8)])
def test_permute_index_launch_shapes(programs, chunk_keys, k):
    # Small launch shapes force what large inputs exercise on the GPU: several chunk tiles per
    # program (40 one-token chunks on 2 programs), chunks of whole tokens that are no power of
    # two (2 tokens x 3 keys), a single program, and buckets shared by several keys of a token.
    pm = importlib.import_module("kernels.permute")  # the package re-exports the function

    cfg = pm.PermuteConfig(index_programs=programs, index_chunk_keys=chunk_keys)
    gen = _gen("shapes", programs, chunk_keys, k)
    t, d, e = 40, 24, 12
    x = torch.randn(t, d, generator=gen).bfloat16()
    ex = _experts(t, k, e, gen)
    for bucket_of, nb in ((None, None), (torch.arange(e) % 5, 5)):
        out = pm.permute(x, ex, e, bucket_of, nb, config=cfg)
        ref = permute_reference(x, ex, e, bucket_of, nb)
        assert torch.equal(out.row_map, ref.row_map)
        assert torch.equal(out.offsets, ref.offsets)
        assert torch.equal(out.x_perm, ref.x_perm)
        row_map, offsets = pm.permute_indices(ex, e, bucket_of, nb, config=cfg)
        assert torch.equal(row_map, ref.row_map) and torch.equal(offsets, ref.offsets)


def test_permute_gradient():
    gen = _gen("pgrad")
    t, d, e, k = 30, 40, 6, 3
    x = torch.randn(t, d, generator=gen).requires_grad_(True)
    ex = _experts(t, k, e, gen)
    out = permute(x, ex, e)
    g = torch.randn(out.x_perm.shape, generator=gen)
    (out.x_perm * g).sum().backward()
    x64 = x.detach().double().requires_grad_(True)
    (permute_reference(x64, ex, e).x_perm * g.double()).sum().backward()
    assert rel_err(x.grad, x64.grad) < 1e-5


COMBINE_CASES = [(50, 48, 3, torch.bfloat16), (33, 64, 8, torch.float32),
                 (20, 100, 2, torch.float16), (5, 16, 1, torch.float32)]  # fmt: skip


@pytest.mark.parametrize("t,d,k,dtype", COMBINE_CASES)
@pytest.mark.parametrize("weighted", [True, False])
def test_combine_forward_backward(t, d, k, dtype, weighted):
    gen = _gen(t, d, k, weighted)
    extra = 3  # rows no token points at (e.g. padding): must get zero gradient
    row_map = torch.randperm(t * k + extra, generator=gen)[: t * k].view(t, k).int()
    y = torch.randn(t * k + extra, d, generator=gen).to(dtype).requires_grad_(True)
    w = torch.rand(t, k, generator=gen).requires_grad_(True) if weighted else None
    out = combine(y, row_map, w)
    assert out.dtype == dtype
    g = torch.randn(t, d, generator=gen).to(dtype)
    (out.float() * g.float()).sum().backward()

    y64 = y.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True) if weighted else None
    ref = combine_reference(y64, row_map, w64)
    (ref * g.double()).sum().backward()
    assert rel_err(out, ref) < TOL[dtype]
    assert rel_err(y.grad, y64.grad) < TOL[dtype]
    unused = torch.ones(t * k + extra, dtype=torch.bool)
    unused[row_map.reshape(-1).long()] = False
    assert torch.all(y.grad[unused] == 0)
    if weighted:
        assert rel_err(w.grad, w64.grad) < 1e-5


def test_permute_then_unpermute_is_identity_times_k():
    gen = _gen("roundtrip")
    t, d, e, k = 64, 32, 8, 4
    x = torch.randn(t, d, generator=gen).bfloat16()
    ex = _experts(t, k, e, gen)
    p = permute(x, ex, e)
    # k = 4 equal bf16 copies summed in fp32 is exactly 4x: an exact test of both kernels.
    assert torch.equal(unpermute(p.x_perm, p.row_map), (4 * x.float()).bfloat16())


def test_bad_arguments():
    with pytest.raises(TypeError):
        permute(torch.randn(4, 8), torch.zeros(4, 2), 4)
    with pytest.raises(ValueError):
        permute(torch.randn(4, 8), torch.zeros(3, 2, dtype=torch.int64), 4)
    with pytest.raises(ValueError):
        combine(torch.randn(8, 4), torch.zeros(4, 2, dtype=torch.int32), torch.rand(4, 3))
