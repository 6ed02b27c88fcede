"""Whole training iterations against closed forms: the 1F1B bubble, tensor-parallel and ZeRO
bytes, recompute, Megatron's process-group layout, bucket overlap; and the schedule's
invariants (streams, dependencies, determinism)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from moesim.config import config_from_dict
from moesim.sim.collectives import CollectiveResult
from moesim.sim.executor import Op, Program, execute
from moesim.sim.iteration import IterationSimulator, _union, rescale_counts
from moesim.sim.pipeline import issue_order, one_f_one_b
from planner import parallel
from traces.generators import TraceSpec, generate
from traces.schema import Trace

FAST_NET = {"nvlink_gbs": 1e6, "nvlink_latency_us": 0.0, "nic_latency_us": 0.0,
            "fabric_latency_us": 0.0, "collective_latency_us": 0.0}


def _cfg(gpus: int = 8, layers: int = 4, train: dict | None = None, cluster: dict | None = None,
         model: dict | None = None, **par):
    return config_from_dict({
        "model": {"num_layers": layers, "d_model": 512, "d_ffn": 512, "num_experts": 8,
                  "top_k": 2, "attn_heads": 8, "kv_heads": 4, "seq_len": 512,
                  "vocab_size": 4096, **(model or {})},
        "cluster": {"nodes": 1, "gpus_per_node": gpus, **(cluster or {})},
        "parallel": {"strategy": "ep", **par},
        "planner": {"solver": "laer", "slots_per_rank": 8},
        "train": {"scope": "iteration", **(train or {})},
    })


def _trace(layers: int = 4, shards: int = 8, uniform: bool = False, steps: int = 4):
    if uniform:  # every shard sends every expert the same: no skew anywhere
        spec = TraceSpec(kind="uniform", steps=steps, layers=layers, shards=shards, experts=8,
                         top_k=2, tokens_per_shard=512, seed=0)
        t = generate(spec)
        counts = np.full_like(t.counts, 512 * 2 // 8)
        return Trace(counts, t.meta)
    return generate(TraceSpec(kind="zipf", steps=steps, layers=layers, shards=shards,
                              experts=8, top_k=2, tokens_per_shard=512, seed=2,
                              params={"exponent": 1.0}))


# --- pipeline --------------------------------------------------------------------------------
def test_one_f_one_b_order():
    assert one_f_one_b(0, 4, 6) == [("fwd", 0), ("fwd", 1), ("fwd", 2), ("fwd", 3), ("bwd", 0),
                                    ("fwd", 4), ("bwd", 1), ("fwd", 5), ("bwd", 2), ("bwd", 3),
                                    ("bwd", 4), ("bwd", 5)]
    assert one_f_one_b(3, 4, 2) == [("fwd", 0), ("bwd", 0), ("fwd", 1), ("bwd", 1)]
    assert one_f_one_b(0, 4, 2) == [("fwd", 0), ("fwd", 1), ("bwd", 0), ("bwd", 1)]


@pytest.mark.parametrize("p, m", [(2, 1), (4, 4), (4, 8), (3, 7), (8, 2)])
def test_bubble_closed_form_on_uniform_stages(p, m):
    # One forward (f) and one backward (b) op per (stage, micro-batch), free sends: the 1F1B
    # iteration takes (m + p - 1)(f + b) and each stage idles (p - 1)/(m + p - 1) of it.
    f, b = 1.0, 2.0
    prog = Program(1)
    done: dict = {}
    for s, pass_, mb in issue_order(p, m):
        src = (s - 1, "fwd", mb) if pass_ == "fwd" else (s + 1, "bwd", mb)
        deps = [done[src]] if src in done else []
        if pass_ == "bwd" and s == p - 1:
            deps = [done[(s, "fwd", mb)]]
        dur = np.array([f if pass_ == "fwd" else b])
        done[(s, pass_, mb)] = prog.add(Op(0, pass_, "expert", "compute", deps, dur=dur,
                                           stage=s))
    t = execute(prog)
    assert t == pytest.approx((m + p - 1) * (f + b))
    for s in range(p):
        busy = sum(float(o.dur[0]) for o in prog.ops if o.stage == s)
        assert 1 - busy / t == pytest.approx((p - 1) / (m + p - 1))


@pytest.mark.parametrize("p, m", [(4, 6), (2, 3), (4, 2)])
def test_bubble_of_a_whole_iteration(p, m):
    # One MoE layer per stage, identical routing on every rank, a negligible embedding and LM
    # head, a free network: each rank's idle share of the pipelined part of the iteration is
    # the closed form (p - 1)/(m + p - 1), within the first and last stages' small extra work.
    cfg = _cfg(gpus=p, layers=p, pp=p, train={"micro_batches": m},
               model={"vocab_size": 2, "d_model": 4096, "d_ffn": 4096, "seq_len": 4096,
                      "attn_heads": 32, "kv_heads": 32},
               cluster=FAST_NET)
    sim = IterationSimulator(cfg, _trace(layers=p, shards=1, uniform=True), "uniform")
    f = sim.simulate_iteration("ep", 0).frame
    piped = f[f["phase"] != "optimizer"]
    t = float(piped["end_s"].max())
    busy = _union(piped["rank"].to_numpy(), piped["start_s"].to_numpy(),
                  piped["end_s"].to_numpy(), p)
    assert 1 - busy / t == pytest.approx(np.full(p, (p - 1) / (m + p - 1)), rel=0.02)


# --- layout -------------------------------------------------------------------------------------
def test_megatron_rank_order():
    cfg = _cfg(gpus=8, tp=2, pp=2, degree=4)
    lay = parallel.layout(cfg)
    assert (lay.dp, lay.ep, lay.edp) == (2, 4, 1)
    assert lay.groups("tp").tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups("dp").tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay.groups("pp").tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert lay.groups("ep").tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert lay.stage(1).tolist() == [4, 5, 6, 7]
    assert lay.stage_groups("tp", 1).tolist() == [[0, 1], [2, 3]]
    # dp before ep: the expert group is strided over the data-parallel dimension.
    lay2 = parallel.layout(dataclasses.replace(
        cfg, parallel=dataclasses.replace(cfg.parallel, order="tp-dp-ep-pp", degree=2)))
    assert lay2.groups("ep").tolist() == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert lay2.groups("edp").tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]


def test_layout_that_does_not_divide_names_the_field():
    from moesim.errors import InputError
    with pytest.raises(InputError, match=r"parallel\.tp"):
        parallel.layout(_cfg(gpus=8, tp=3))
    with pytest.raises(InputError, match=r"parallel\.degree"):
        parallel.layout(_cfg(gpus=8, tp=2, degree=3))


def test_grad_buckets_fill_in_backward_order():
    units = [parallel.UnitParams(-1, 10.0, 0.0), parallel.UnitParams(0, 30.0, 100.0),
             parallel.UnitParams(1, 30.0, 100.0), parallel.UnitParams(2, 15.0, 0.0)]
    got = parallel.grad_buckets(units, size=40)
    assert [(b.group, b.params, b.units) for b in got] == [
        ("dp", 45.0, (2, 1)), ("edp", 100.0, (1,)), ("edp", 100.0, (0,)),
        ("dp", 40.0, (0, -1))]


# --- bytes ----------------------------------------------------------------------------------
def _bytes(frame, phase, layer=None, pass_=None):
    sel = frame["phase"] == phase
    if layer is not None:
        sel &= frame["layer"] == layer
    if pass_ is not None:
        sel &= frame["pass"] == pass_
    return frame[sel].groupby("rank")["bytes"].sum()


def test_tensor_parallel_bytes_per_layer():
    # Sequence parallel: each TP block all-gathers and reduce-scatters its activation, (t-1)/t
    # each: together exactly an all-reduce's 2(t-1)/t. A dense layer has two TP blocks
    # (attention, MLP), an MoE layer one (its experts work on the sequence shard).
    t = 4
    cfg = _cfg(gpus=8, tp=t, model={"dense_layers": [1], "d_ffn_dense": 1024})
    out = IterationSimulator(cfg, _trace(layers=3), "z").simulate_iteration("ep", 0)
    act = 512 * 512 * 2  # micro-batch tokens x d_model x bf16
    f = out.frame
    for layer, blocks in ((0, 1), (1, 2)):
        both = (_bytes(f, "tp_all_gather", layer, "fwd")
                + _bytes(f, "tp_reduce_scatter", layer, "fwd"))
        assert (both == blocks * 2 * (t - 1) / t * act).all()
    assert parallel.ring_sent("all_reduce", t, act) == 2 * (t - 1) / t * act
    # The ring's time on the NVSwitch (450 GB/s a GPU): (t-1)/t x S / B + the latency.
    ag = next(o for o in out.ops if o.phase == "tp_all_gather" and o.layer == 1
          and o.pass_ == "fwd")
    lat = cfg.cluster.collective_latency_us * 1e-6 + (t - 1) * 2 * 0.5e-6
    assert ag.result.duration == pytest.approx((t - 1) / t * act / 450e9 + lat, rel=1e-6)


def _dense_params(cfg) -> float:
    lay = parallel.layout(cfg)
    return sum(u.dense for u in parallel.unit_params(cfg.model, lay, 0))


def test_zero3_moves_three_times_the_weights():
    cfg = _cfg(gpus=8, zero=3, degree=8, train={"precision": "pure"})
    out = IterationSimulator(cfg, _trace(), "z").simulate_iteration("ep", 0)
    f = out.frame
    dp = f[f["stream"] == "dp"].groupby("rank")["bytes"].sum()
    want = 3 * 7 / 8 * _dense_params(cfg) * 2
    assert dp.to_numpy() == pytest.approx(np.full(8, want), rel=1e-6)
    assert set(f.loc[f["stream"] == "dp", "phase"]) == {"dp_all_gather", "dp_reduce_scatter"}


@pytest.mark.parametrize("zero", [0, 1])
def test_ddp_and_distributed_optimizer_bytes(zero):
    cfg = _cfg(gpus=8, zero=zero, degree=8)  # mixed precision: fp32 gradients
    out = IterationSimulator(cfg, _trace(), "z").simulate_iteration("ep", 0)
    f = out.frame
    p = _dense_params(cfg)
    dp = f[f["stream"] == "dp"].groupby(["rank", "phase"])["bytes"].sum().unstack()
    if zero == 0:
        assert list(dp.columns) == ["dp_all_reduce"]
        assert dp["dp_all_reduce"].to_numpy() == pytest.approx(np.full(8, 2 * 7 / 8 * p * 4),
                                                               rel=1e-6)
    else:
        assert dp["dp_reduce_scatter"].to_numpy() == pytest.approx(np.full(8, 7 / 8 * p * 4),
                                                                   rel=1e-6)
        assert dp["dp_all_gather"].to_numpy() == pytest.approx(np.full(8, 7 / 8 * p * 2),
                                                               rel=1e-6)


# --- schedule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["full", "selective"])
def test_recompute_repeats_the_forward(mode):
    cfg = _cfg(gpus=4, tp=2, train={"recompute": mode})
    out = IterationSimulator(cfg, _trace(shards=4), "z").simulate_iteration("ep", 0)
    f = out.frame.assign(dur=lambda d: d["end_s"] - d["start_s"])
    comp = f[f["stream"] == "compute"]
    rc = comp[comp["pass"] == "recompute"].groupby(["layer", "phase"])["dur"].sum()
    fwd = comp[(comp["pass"] == "fwd") & (comp["layer"] >= 0)].groupby(["layer", "phase"])[
        "dur"].sum()
    if mode == "selective":
        assert set(rc.index.get_level_values("phase")) == {"attention"}
        fwd = fwd[fwd.index.get_level_values("phase") == "attention"]
    assert rc.to_numpy() == pytest.approx(fwd.reindex(rc.index).to_numpy(), rel=1e-9)
    assert len(rc) == len(fwd)
    # A layer's recompute runs right before its backward: after the next layer's backward.
    for layer in range(cfg.model.num_layers - 1):
        r0 = f[(f["pass"] == "recompute") & (f["layer"] == layer)].groupby("rank")[
            "start_s"].min()
        b1 = f[(f["pass"] == "bwd") & (f["layer"] == layer + 1)
               & (f["stream"] == "compute")].groupby("rank")["end_s"].max()
        assert (r0 >= b1 - 1e-12).all()


def test_gradient_buckets_overlap_the_backward_only_when_asked():
    base = dict(gpus=8, degree=8, layers=8, dp_bucket_params=1)
    on = IterationSimulator(_cfg(**base), _trace(layers=8), "z").simulate_iteration("ep", 0)
    off = IterationSimulator(_cfg(**base, overlap_grad_reduce=False), _trace(layers=8),
                             "z").simulate_iteration("ep", 0)
    for out, overlapped in ((on, True), (off, False)):
        f = out.frame
        last_bwd = f[(f["pass"] == "bwd") & (f["stream"] == "compute")
                     & (f["phase"] != "optimizer")]["end_s"].max()
        first = f[f["phase"] == "dp_all_reduce"]["start_s"].min()
        assert (first < last_bwd) == overlapped
    assert on.step_time < off.step_time


@pytest.mark.parametrize("strategy", ["ep", "hp", "fsep"])
def test_streams_never_overlap_and_dependencies_hold(strategy):
    model = {"num_heads": 8, "head_dim": 64} if strategy == "hp" else {}
    cfg = _cfg(gpus=8, tp=2, pp=2, zero=3, train={"micro_batches": 3, "recompute": "full"},
               strategy=strategy, fsep_chunks=2, model=model)
    trace = (generate(TraceSpec(kind="zipf", steps=2, layers=4, shards=4, experts=8, heads=8,
                                top_k=2, tokens_per_shard=256, seed=1,
                                params={"exponent": 1.2}))
             if strategy == "hp" else _trace(shards=4))
    out = IterationSimulator(cfg, trace, "z").simulate_iteration(strategy, 0)
    f = out.frame
    for _key, g in f.groupby(["rank", "stream"]):
        g = g.sort_values("start_s")
        assert (g["start_s"].to_numpy()[1:] >= g["end_s"].to_numpy()[:-1] - 1e-12).all()
    for op in out.ops:
        for d in op.deps:
            assert (op.start >= out.ops[d].end - 1e-12).all()
    assert set(f["pass"]) == {"fwd", "bwd", "recompute"}
    assert {"pp_send", "dispatch", "combine", "expert", "dp_all_gather", "dp_reduce_scatter",
            "tp_all_gather", "optimizer", "attention", "lm_head", "embed"} <= set(f["phase"])
    if strategy == "fsep":
        assert {"weight_gather", "grad_scatter"} <= set(f["phase"])
    if strategy == "hp":
        assert {"latent_down", "latent_up"} <= set(f["phase"])
    assert sorted(set(f["rank"])) == list(range(8))


def test_same_inputs_same_iteration():
    cfg = _cfg(gpus=8, tp=2, pp=2, train={"micro_batches": 2})
    a = IterationSimulator(cfg, _trace(shards=4), "z").simulate_iteration("ep", 1)
    b = IterationSimulator(cfg, _trace(shards=4), "z").simulate_iteration("ep", 1)
    assert a.frame.to_csv().encode() == b.frame.to_csv().encode()


def test_rescaled_counts_keep_totals_and_shape():
    rng = np.random.default_rng(0)
    c = rng.integers(0, 500, size=(2, 3, 4, 1, 8)).astype(np.int32)
    c[0, 0, 0, 0] = 0
    c[0, 0, 0, 0, 3] = 100  # one expert only
    out = rescale_counts(c, 1000, 2)
    nonzero = c.sum(axis=-1) > 0
    nonzero[0, 0, 0, 0] = False  # (its one expert caps at the tokens: checked below)
    assert (out.sum(axis=-1)[nonzero] == 2000).all()
    assert (out <= 1000).all() and out.dtype == c.dtype
    assert out[0, 0, 0, 0, 3] == 1000 and out[0, 0, 0, 0].sum() == 1000  # capped at tokens
    share = c / np.maximum(c.sum(axis=-1, keepdims=True), 1)
    assert np.abs(out / 2000 - share)[nonzero].max() < 1 / 2000 + 1e-12


def test_config_that_does_not_fit_is_not_timed(capsys, tmp_path):
    from pathlib import Path

    from moesim.cli import main
    root = Path(__file__).resolve().parents[2]
    rc = main(["simulate", "--config", str(root / "configs/mixtral-8x7b-fsep-4node.toml"),
               "--trace", str(root / "traces/data/mixtral-8x7b-c4.parquet"), "--set",
               "cluster.gpu_memory_gib=8", "--out", str(tmp_path / "r.parquet")])
    assert rc == 0
    text = capsys.readouterr().out
    assert "does not fit: needs" in text and "of 8.0" in text
    assert not (tmp_path / "r.parquet").exists()


def test_mixtral_cli_prints_the_iteration_summary(capsys, tmp_path):
    import json
    from pathlib import Path

    from moesim.cli import main
    from moesim.results import read_results
    root = Path(__file__).resolve().parents[2]
    rc = main(["simulate", "--config",
               str(root / "configs/mixtral-8x7b-megatron-ep8tp8-4node.toml"), "--trace",
               str(root / "traces/data/mixtral-8x7b-c4.parquet"), "--set",
               "model.num_layers=2", "--set", "train.micro_batch_size=2", "--set",
               "parallel.pp=2", "--set", "train.micro_batches=4",
               "--out", str(tmp_path / "r.parquet"), "--timeline", str(tmp_path / "t.json"),
               "--timeline-ranks", "32"])
    assert rc == 0
    text = capsys.readouterr().out
    for want in ("iteration time (ms)", "MFU", "exposed tp_all_gather", "exposed pp_send",
                 "exposed dispatch", "peak memory per GPU", "tp8 pp2 dp2 ep8 etp1 edp2"):
        assert want in text
    df, meta = read_results(tmp_path / "r.parquet")
    assert meta["scope"] == "iteration" and sorted(set(df["rank"])) == list(range(32))
    assert set(df["stream"]) == {"compute", "comm", "dp", "pp"}
    tl = json.loads((tmp_path / "t.json").read_text())
    tracks = {(e["pid"], e["tid"]) for e in tl["traceEvents"] if e["ph"] == "X"}
    assert len({p for p, _ in tracks}) == 32 and {t for _, t in tracks} == {0, 1, 2, 3}


def test_collective_result_layout_is_per_stage():
    # A stage's collective results cover the cluster; the program sees its stage's ranks.
    cfg = _cfg(gpus=8, pp=2, degree=4, train={"micro_batches": 2})
    out = IterationSimulator(cfg, _trace(shards=4), "z").simulate_iteration("ep", 0)
    for op in out.ops:
        assert len(op.start) == 4 and len(op.end) == 4
        if op.result is not None:
            assert isinstance(op.result, CollectiveResult)


def test_expert_tensor_parallel_gathers_and_splits_the_experts():
    # 8 GPUs, tp 2 and etp 2: two EP groups of 4 (one per etp coordinate); each rank computes
    # half of every expert's hidden units over the rows both members of its ETP group received.
    cfg = _cfg(gpus=8, tp=2, etp=2, degree=4)
    sim = IterationSimulator(cfg, _trace(shards=4), "z")
    lay = sim.layout
    assert (lay.ep, lay.etp, lay.edp) == (4, 2, 1)
    assert lay.groups("etp").tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert lay.groups("ep").tolist() == [[0, 2, 4, 6], [1, 3, 5, 7]]
    out = sim.simulate_iteration("ep", 0)
    f = out.frame
    lin = sim.layer_inputs("ep", 0, 0)
    rows = lin.expert_tokens.sum(axis=1)
    want = rows[[0, 1]].sum()
    ex = f[(f["phase"] == "expert") & (f["pass"] == "fwd") & (f["layer"] == 0)]
    assert ex.set_index("rank")["tokens"][[0, 1]].tolist() == [want, want]
    # The all-gather before the experts moves (etp-1)/etp of the largest group's rows.
    ag = f[(f["phase"] == "tp_all_gather") & (f["layer"] == 0) & (f["pass"] == "fwd")]
    width = cfg.model.d_model * 2
    big = max(rows[g].sum() for g in lay.groups("etp"))
    assert (ag.groupby("rank")["bytes"].sum() == 512 * 512 * 2 // 2 + big * width // 2).all()
    with pytest.raises(Exception, match="etp"):
        IterationSimulator(dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, strategy="fsep")), _trace(shards=4), "z").simulate_iteration("fsep", 0)


def test_sweep_runs_whole_iterations(tmp_path):
    from pathlib import Path

    import pandas as pd

    from moesim.cli import main
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "sweep.csv"
    rc = main(["sweep", "--config",
               str(root / "configs/mixtral-8x7b-megatron-ep8tp8-4node.toml"), "--trace",
               str(root / "traces/data/mixtral-8x7b-c4.parquet"), "--strategies", "ep",
               "--nodes", "1,2", "--set", "model.num_layers=2", "--set",
               "train.micro_batch_size=2", "--jobs", "1", "--out", str(out)])
    assert rc == 0
    d = pd.read_csv(out)
    assert d["layout"].tolist() == ["tp8 pp1 dp1 ep8 etp1 edp1", "tp8 pp1 dp2 ep8 etp1 edp2"]
    assert (d["mfu"] > 0).all() and (d["iteration_ms"] > 0).all()


@pytest.mark.parametrize("override, where", [
    ("parallel.tp=3", "parallel.tp"),
    ("parallel.tp=64", "parallel.tp"),
    ("parallel.pp=64", "parallel.pp"),
    ("parallel.degree=5", "parallel.degree"),
    ("parallel.sequence_parallel=false", "parallel.sequence_parallel"),
    ("parallel.order=tp-dp-pp", "parallel.order"),
    ("train.recompute=some", "train.recompute"),
])
def test_bad_iteration_input_is_one_line_exit_2(override, where, tmp_path):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run([sys.executable, "-m", "moesim", "simulate", "--config",
                        str(root / "configs/mixtral-8x7b-megatron-ep8tp8-4node.toml"),
                        "--trace", str(root / "traces/data/mixtral-8x7b-c4.parquet"),
                        "--set", override, "--out", str(tmp_path / "r.parquet")],
                       capture_output=True, text=True, cwd=root)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and where in r.stderr
    assert not (tmp_path / "r.parquet").exists()
