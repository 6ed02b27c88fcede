"""Trace schema, files, generators and the `moesim trace` commands."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moesim.cli import main
from moesim.errors import InputError
from traces.generators import GENERATORS, TraceSpec, cap_probabilities, generate
from traces.io import read_trace, to_long_frame, write_long_csv, write_trace
from traces.schema import Trace, TraceMeta
from traces.stats import imbalance_table

SMALL = dict(steps=6, layers=3, shards=8, experts=16, top_k=4, tokens_per_shard=128)


def spec(kind: str = "zipf", **kw) -> TraceSpec:
    return TraceSpec(kind=kind, **{**SMALL, **kw})


@pytest.mark.parametrize("kind", sorted(GENERATORS))
@pytest.mark.parametrize("heads", [1, 2])
def test_every_generator_round_trips_through_parquet_and_csv(tmp_path, kind, heads):
    trace = generate(spec(kind, heads=heads))
    trace.validate("generated")
    write_trace(trace, tmp_path / "t.parquet", row_group_steps=4)  # several row groups
    back = read_trace(tmp_path / "t.parquet")
    assert np.array_equal(back.counts, trace.counts)
    assert back.meta == trace.meta
    write_long_csv(trace, tmp_path / "t.csv")
    assert np.array_equal(read_trace(tmp_path / "t.csv").counts, trace.counts)


def test_parquet_rows_in_any_order_read_back_the_same(tmp_path):
    trace = generate(spec())
    write_trace(trace, tmp_path / "t.parquet")
    table = pq.read_table(tmp_path / "t.parquet")
    shuffled = table.take(np.random.default_rng(1).permutation(table.num_rows))
    pq.write_table(shuffled.replace_schema_metadata(table.schema.metadata), tmp_path / "s.parquet")
    assert np.array_equal(read_trace(tmp_path / "s.parquet").counts, trace.counts)


def test_long_frame_is_the_design_schema():
    trace = generate(spec(steps=2, layers=1, shards=2, experts=4, top_k=2))
    df = to_long_frame(trace)
    assert list(df.columns) == ["step", "layer", "shard", "head", "expert", "tokens"]
    assert len(df) == trace.counts.size
    row = df.iloc[7]
    key = tuple(int(row[c]) for c in ["step", "layer", "shard", "head", "expert"])
    assert row["tokens"] == trace.counts[key]


def test_generated_totals_match_top_k_and_distinct_experts():
    for kind in GENERATORS:
        t = generate(spec(kind, heads=2, top_k=8, params={"exponent": 1.5}))
        assert (t.counts.sum(axis=-1) == 128 * 8).all()
        assert t.counts.max() <= 128  # a token visits an expert at most once


def test_same_seed_same_trace_other_seed_other_trace():
    a, b, c = generate(spec(seed=3)), generate(spec(seed=3)), generate(spec(seed=4))
    assert np.array_equal(a.counts, b.counts)
    assert not np.array_equal(a.counts, c.counts)


def test_normal_sampler_matches_multinomial_moments():
    # Closed form: a multinomial count has mean n p and variance n p (1 - p).
    kw = dict(steps=40, layers=1, shards=64, experts=8, top_k=2, tokens_per_shard=2000)
    p = cap_probabilities(GENERATORS["zipf"](spec(**kw), np.random.default_rng(
        np.random.SeedSequence(0).spawn(1)[0])), 0.5)[0, 0, 0]
    n = 2000 * 2
    for sampler in ("multinomial", "normal"):
        c = generate(spec(**kw, sampler=sampler)).counts[:, 0, :, 0, :].reshape(-1, 8)
        np.testing.assert_allclose(c.mean(0), n * p, rtol=0.01)
        np.testing.assert_allclose(c.var(0), n * p * (1 - p), rtol=0.15)


def test_table_normal_is_the_normal_quantiles():
    from scipy.special import ndtr

    from traces.generators import NORMAL_TABLE, standard_normal16
    t = NORMAL_TABLE.astype(np.float64)
    assert abs(t.mean()) < 1e-6 and abs(t.var() - 1) < 1e-5
    # Entry i sits at the normal's (i + 1/2) / 2^16 quantile (up to the unit-variance rescale).
    q = (np.arange(2**16) + 0.5) / 2**16
    assert np.abs(ndtr(t) - q).max() < 2e-5
    z = standard_normal16(np.random.default_rng(3), (400_000,)).astype(np.float64)
    zs = np.sort(z)
    ecdf_gap = np.abs(ndtr(zs) - (np.arange(zs.size) + 0.5) / zs.size).max()
    assert ecdf_gap < 4e-3  # KS: the 1% critical value at n = 4e5 is 2.6e-3, plus the 2^-16 grid


@given(st.lists(st.floats(0.01, 10), min_size=2, max_size=12), st.integers(1, 4))
def test_cap_probabilities_caps_and_keeps_the_sum(weights, k):
    k = min(k, len(weights))
    p = np.array(weights) / sum(weights)
    q = cap_probabilities(p, 1.0 / k)
    assert q.sum() == pytest.approx(1.0)
    assert (q <= 1.0 / k + 1e-9).all()
    uncapped = q < 1.0 / k - 1e-9
    if uncapped.sum() > 1:  # uncapped experts keep their relative weights
        ratio = q[uncapped] / p[uncapped]
        assert np.allclose(ratio, ratio[0])


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 4, 8]), st.integers(0, 1000))
def test_aggregation_conserves_tokens_exactly(ranks, seed):
    trace = generate(spec(shards=8, seed=seed))
    agg = trace.aggregate(ranks)
    assert agg.num_shards == ranks
    assert agg.meta.tokens_per_shard == 128 * 8 // ranks
    g = 8 // ranks
    for r in range(ranks):
        assert np.array_equal(agg.counts[:, :, r], trace.counts[:, :, r * g:(r + 1) * g].sum(2))
    agg.validate("aggregated")


def test_aggregation_needs_a_divisor():
    with pytest.raises(InputError, match="3 ranks do not divide"):
        generate(spec(shards=8)).aggregate(3)


def test_resample_spreads_and_repeats():
    t = generate(spec(steps=10, layers=4))
    r = t.resample(num_steps=5, num_layers=8)
    assert np.array_equal(r.counts[:, :4], t.counts[[0, 2, 4, 6, 8]])
    assert np.array_equal(r.counts[:, 4:], r.counts[:, :4])


def test_stats_against_hand_computation():
    counts = np.zeros((1, 1, 2, 1, 4), np.int32)
    counts[0, 0, 0, 0] = [4, 2, 1, 1]
    counts[0, 0, 1, 0] = [4, 2, 1, 1]
    t = Trace(counts, TraceMeta("m", "test", tokens_per_shard=4, top_k=2))
    t.validate("hand")
    row = imbalance_table(t).iloc[0]
    load = np.array([8, 4, 2, 2])
    assert row.max_over_mean == pytest.approx(8 / 4)
    assert row.cv == pytest.approx(load.std() / 4)
    assert row.top_share == pytest.approx(8 / 16)


# --- bad input --------------------------------------------------------------------------------

def _write_bad(tmp_path, mutate) -> str:
    trace = generate(spec())
    counts = trace.counts.copy()
    meta = trace.meta
    counts, meta = mutate(counts, meta)
    path = tmp_path / "bad.parquet"
    write_trace(Trace(counts, meta), path)
    return str(path)


@pytest.mark.parametrize("mutate, message", [
    (lambda c, m: (np.where(np.arange(c.size).reshape(c.shape) == 5, -3, c).astype(np.int32), m),
     "negative token count"),
    (lambda c, m: (c + (np.arange(c.size).reshape(c.shape) == 0), m), "token-expert pairs"),
    (lambda c, m: (c, dataclasses.replace(m, top_k=3)), "token-expert pairs"),
    (lambda c, m: (c, dataclasses.replace(m, top_k=99)), "metadata.top_k"),
    (lambda c, m: (c, dataclasses.replace(m, tokens_per_shard=int(c.max()) - 1,
                                          top_k=m.top_k)), "exceeds tokens_per_shard"),
])
def test_bad_counts_are_one_line_errors(tmp_path, mutate, message):
    path = _write_bad(tmp_path, mutate)
    with pytest.raises(InputError, match=message):
        read_trace(path)


def test_wrong_columns_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.parquet"
    write_trace(generate(spec()), good)
    table = pq.read_table(good)
    pq.write_table(table.drop(["layer"]).replace_schema_metadata(table.schema.metadata),
                   tmp_path / "nolayer.parquet")
    with pytest.raises(InputError, match="layer: missing column"):
        read_trace(tmp_path / "nolayer.parquet")
    pq.write_table(pa.table({"a": [1]}), tmp_path / "foreign.parquet")
    with pytest.raises(InputError, match="not a moesim trace"):
        read_trace(tmp_path / "foreign.parquet")
    raw = good.read_bytes()
    (tmp_path / "trunc.parquet").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(InputError, match="truncated"):
        read_trace(tmp_path / "trunc.parquet")
    md = dict(table.schema.metadata)
    meta = json.loads(md[b"moesim.trace"])
    meta["schema_version"] = 99
    md[b"moesim.trace"] = json.dumps(meta).encode()
    pq.write_table(table.replace_schema_metadata(md), tmp_path / "v99.parquet")
    with pytest.raises(InputError, match="schema_version"):
        read_trace(tmp_path / "v99.parquet")


def test_csv_errors_name_the_column(tmp_path):
    (tmp_path / "a.csv").write_text("step,layer,shard,expert,tokens\n0,0,0,0,-1\n")
    assert main(["trace", "convert", str(tmp_path / "a.csv"), str(tmp_path / "o.parquet"),
                 "--top-k", "1", "--tokens-per-shard", "1"]) == 2
    (tmp_path / "b.csv").write_text("step,layer,shard,expert,tokenz\n0,0,0,0,1\n")
    with pytest.raises(InputError, match="tokens: missing column"):
        from traces.io import read_long_csv
        read_long_csv(tmp_path / "b.csv", TraceMeta("m", "s", 1, 1))
    assert not (tmp_path / "o.parquet").exists()


# --- CLI --------------------------------------------------------------------------------------

def test_cli_gen_stats_convert_and_exit_codes(tmp_path, capsys):
    out = tmp_path / "t.parquet"
    args = ["trace", "gen", "--kind", "drifting", "--steps", "4", "--layers", "2", "--shards",
            "4", "--experts", "8", "--top-k", "2", "--tokens-per-shard", "64", "--out", str(out)]
    assert main(args) == 0
    assert main(["trace", "stats", str(out), "--csv", str(tmp_path / "s.csv")]) == 0
    assert "max_over_mean" in capsys.readouterr().out
    assert (tmp_path / "s.csv").read_text().startswith("layer,max_over_mean")
    assert main(["trace", "convert", str(out), str(tmp_path / "r.parquet"), "--ranks", "2"]) == 0
    assert read_trace(tmp_path / "r.parquet").num_shards == 2
    # bad input: exit 2, one line, nothing written
    assert main(["trace", "convert", str(out), str(tmp_path / "x.parquet"), "--ranks", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "ranks" in err
    assert not (tmp_path / "x.parquet").exists()
    assert main(["trace", "stats", str(tmp_path / "missing.parquet")]) == 2
    assert main([*args[:-1], str(tmp_path / "t.txt")]) == 2
    with pytest.raises(SystemExit) as e:
        main(["trace", "gen", "--kind", "nope", "--out", str(out)])
    assert e.value.code == 2


def test_cli_gen_takes_the_model_from_a_config(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\nname = "tiny"\nnum_layers = 2\nnum_experts = 8\ntop_k = 2\n'
                   'num_heads = 2\nhead_dim = 16\nd_model = 64\nattn_heads = 4\n')
    out = tmp_path / "t.parquet"
    assert main(["trace", "gen", "--config", str(cfg), "--steps", "2", "--shards", "2",
                 "--tokens-per-shard", "32", "--out", str(out)]) == 0
    t = read_trace(out)
    assert (t.num_layers, t.num_heads, t.num_experts, t.meta.top_k, t.meta.model) == \
        (2, 2, 8, 2, "tiny")


def test_no_partial_file_when_interrupted(tmp_path, monkeypatch):
    import traces.io as tio

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(tio.pq.ParquetWriter, "write_table", boom)
    with pytest.raises(KeyboardInterrupt):
        write_trace(generate(spec()), tmp_path / "t.parquet")
    assert list(tmp_path.iterdir()) == []
