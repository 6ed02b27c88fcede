"""Step programs: HP's communication does not depend on top-k while EP's grows with it; the
schedule respects streams and dependencies; closed-form phase times; determinism."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config import config_from_dict
from moesim.sim.simulate import Simulator
from traces.generators import TraceSpec, generate

NO_LAT = {"nvlink_latency_us": 0.0, "nic_latency_us": 0.0, "fabric_latency_us": 0.0}


def _cfg(heads: int, top_k: int, nodes: int = 1, **parallel):
    model = {"num_layers": 2, "d_model": 2048, "d_ffn": 256, "num_experts": 16, "top_k": top_k}
    if heads > 1:
        model.update(num_heads=heads, head_dim=64)
    return config_from_dict({
        "model": model,
        "cluster": {"nodes": nodes, "collective_latency_us": 10.0, **NO_LAT},
        "parallel": {"degree": 8 * nodes, **parallel},
        "planner": {"solver": "laer", "slots_per_rank": 8},
    })


def _trace(heads: int, top_k: int, shards: int = 8):
    return generate(TraceSpec(kind="zipf", steps=1, layers=2, shards=shards, experts=16,
                              heads=heads, top_k=top_k, tokens_per_shard=1024, seed=1,
                              params={"exponent": 1.2}))


def _comm_time(out, phases=("dispatch", "combine")) -> float:
    """Summed durations of the token all-to-alls (from the collectives, not from end - start,
    whose rounding depends on when the collective started)."""
    return sum(op.result.duration for op in out.ops if op.phase in phases
               and op.stream == "comm")


def test_hp_comm_independent_of_top_k_ep_grows():
    hp, ep = [], []
    for k in (1, 2, 4):
        sim = Simulator(_cfg(8, k), _trace(8, k), "gen")
        hp.append(_comm_time(sim.simulate_step("hp", 0)))
        sim = Simulator(_cfg(1, k), _trace(1, k), "gen")
        ep.append(_comm_time(sim.simulate_step("ep", 0)))
    assert hp[0] > 0 and hp[0] == hp[1] == hp[2]
    assert ep[0] < ep[1] < ep[2]
    # Less than linear in k: k = 1 concentrates more tokens on the hottest expert's rank
    # (the top-k cap on an expert's share is 1/k), and the collective latency is fixed.
    assert ep[2] > 2 * ep[0]


def test_hp_dispatch_matches_closed_form():
    # 8 heads on 8 GPUs of one NVSwitch: each rank sends T x 1 head x 64 x 2 bytes to each of
    # the 7 others over its 450 GB/s port: (n-1)/n x S / B with S = T x 8 x 64 x 2.
    sim = Simulator(_cfg(8, 2), _trace(8, 2), "gen")
    f = sim.simulate_step("hp", 0).frame
    disp = f[(f["pass"] == "fwd") & (f["phase"] == "dispatch") & (f["layer"] == 0)]
    row = disp[disp["stream"] == "comm"]
    t = 1024
    s = t * 8 * 64 * 2
    want = 7 / 8 * s / 450e9 + 10e-6
    assert (row["end_s"] - row["start_s"]).to_numpy() == pytest.approx(np.full(8, want),
                                                                       rel=1e-9)
    assert (row["bytes"] == 7 * t * 64 * 2).all()
    # Packing the heads into the send buffer, before it on the compute stream: with 8 ranks one
    # strided copy of the latent (read + write at the HBM rate, one launch).
    pack = disp[disp["stream"] == "compute"]
    cm = sim.compute
    want_pack = 2 * s / cm.rates["hbm"] + cm.launch_overhead
    assert (pack["end_s"] - pack["start_s"]).to_numpy() == pytest.approx(
        np.full(8, want_pack), rel=1e-9)
    assert (pack.sort_values("rank")["end_s"].to_numpy()
            <= row.sort_values("rank")["start_s"].to_numpy() + 1e-15).all()


def test_streams_never_overlap_and_dependencies_hold():
    sim = Simulator(_cfg(1, 4, fsep_chunks=3), _trace(1, 4), "gen")
    out = sim.simulate_step("fsep", 0)
    f = out.frame
    for _key, g in f.groupby(["rank", "stream"]):
        g = g.sort_values("start_s")
        assert (g["start_s"].to_numpy()[1:] >= g["end_s"].to_numpy()[:-1] - 1e-15).all()
    for op in out.ops:
        for d in op.deps:
            assert (op.start >= out.ops[d].end - 1e-15).all()
    # FSEP: expert chunk c never starts before its weights are gathered.
    gathers = [o for o in out.ops if o.phase == "weight_gather" and o.pass_ == "fwd"
               and o.layer == 0]
    experts = [o for o in out.ops if o.phase == "expert" and o.pass_ == "fwd" and o.layer == 0]
    assert len(gathers) == len(experts) == 3
    for g, e in zip(gathers, experts, strict=True):
        assert (e.start >= g.end - 1e-15).all()
    # Overlap is real: a later chunk's gather runs while an earlier chunk computes.
    assert gathers[1].start[0] < experts[0].end[0]


def test_same_inputs_byte_identical_results():
    a = Simulator(_cfg(1, 4, nodes=2), _trace(1, 4, shards=16), "gen")
    b = Simulator(_cfg(1, 4, nodes=2), _trace(1, 4, shards=16), "gen")
    for s in ("ep", "fsep"):
        fa, fb = a.simulate_step(s, 0).frame, b.simulate_step(s, 0).frame
        assert fa.to_csv().encode() == fb.to_csv().encode()


def test_every_rank_has_every_phase_and_ep_imbalance_shows():
    sim = Simulator(_cfg(1, 4), _trace(1, 4), "gen")
    out = sim.simulate_step("ep", 0)
    f = out.frame
    assert set(f["rank"]) == set(range(8))
    ex = f[(f["phase"] == "expert") & (f["pass"] == "fwd")]
    loads = ex.groupby(["layer", "rank"])["tokens"].sum().unstack()
    want = float(np.mean(loads.max(axis=1) / loads.mean(axis=1) - 1))
    assert out.imbalance == pytest.approx(want)
    assert out.imbalance > 0.3  # zipf 1.2 over 16 experts on 8 ranks


def test_summary_separates_comm_combine_from_unpermute():
    from moesim.sim.simulate import summarize
    sim = Simulator(_cfg(1, 4), _trace(1, 4), "gen")
    out = sim.simulate_step("ep", 0)
    row = summarize([out], {"ep": 8}).iloc[0]
    f = out.frame
    comm = f[(f["phase"] == "combine") & (f["stream"] == "comm")]
    want = 1e3 * float((comm["end_s"] - comm["start_s"]).sum()) / 8
    assert row["combine_ms"] == pytest.approx(want)
    # Dispatch and combine move transposed matrices on a symmetric network: equal time.
    assert row["combine_ms"] == pytest.approx(row["dispatch_ms"], rel=1e-9)


def test_one_rank_all_to_all_is_a_local_copy():
    # One GPU: every byte of the dispatch stays on the rank. It is not free: NCCL copies it
    # at HBM speed after the collective's start-up latency (2 x bytes / the read+write rate).
    cfg = config_from_dict({
        "model": {"num_layers": 1, "d_model": 256, "d_ffn": 128, "num_experts": 8,
                  "top_k": 2},
        "cluster": {"nodes": 1, "gpus_per_node": 1, "collective_latency_us": 10.0, **NO_LAT},
        "parallel": {"degree": 1},
    })
    trace = generate(TraceSpec(kind="zipf", steps=1, layers=1, shards=1, experts=8, top_k=2,
                               tokens_per_shard=4096, seed=1, params={"exponent": 1.2}))
    out = Simulator(cfg, trace, "gen").simulate_step("ep", 0)
    f = out.frame
    for pass_, phase in (("fwd", "dispatch"), ("fwd", "combine"), ("bwd", "dispatch")):
        row = f[(f["pass"] == pass_) & (f["phase"] == phase) & (f["stream"] == "comm")]
        local = 4096 * 2 * 256 * 2
        assert (row["end_s"] - row["start_s"]).iloc[0] == pytest.approx(
            10e-6 + 2 * local / 4.2e12, rel=1e-9)
        assert row["bytes"].iloc[0] == 0  # not network traffic


def test_fsep_without_backward_gather_moves_no_backward_weights():
    # parallel.fsep_backward_gather = false (runtime/'s FSEP keeps the forward's weights): the
    # planner emits no ("bwd", "weight_gather") traffic, the program issues no such op, the
    # forward is unchanged, and the gradient scatter still runs.
    cfg_on = _cfg(1, 4, fsep_chunks=2)
    cfg_off = _cfg(1, 4, fsep_chunks=2, fsep_backward_gather=False)
    on = Simulator(cfg_on, _trace(1, 4), "gen").simulate_step("fsep", 0)
    off = Simulator(cfg_off, _trace(1, 4), "gen").simulate_step("fsep", 0)

    def ops(out, pass_, phase):
        return [o for o in out.ops if o.pass_ == pass_ and o.phase == phase]

    assert len(ops(on, "bwd", "weight_gather")) == 2 * 2  # chunks x layers
    assert ops(off, "bwd", "weight_gather") == []
    assert len(ops(off, "bwd", "grad_scatter")) == len(ops(on, "bwd", "grad_scatter")) == 4
    fwd = [(o.phase, float(o.end.max())) for o in off.ops if o.pass_ == "fwd"]
    assert fwd == [(o.phase, float(o.end.max())) for o in on.ops if o.pass_ == "fwd"]
    assert off.frame["end_s"].max() <= on.frame["end_s"].max() + 1e-12
