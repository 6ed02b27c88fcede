"""The "nccl" collective model: each term against a hand-worked closed form, the ideal limit
against the plain max-min model, PXN routes, the fitted terms against their fit points, and
the nccl-tests reader/writer."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest

from moesim.config import ClusterConfig
from moesim.errors import InputError
from moesim.sim.collectives import Collectives, heap_tree_edges
from moesim.sim.nccl import LinkTerms, NcclTerms, load_terms
from moesim.sim.nccl_fit import Point, PointSimulator, fit
from moesim.sim.nccl_tests import format_table, parse, parse_sizes
from moesim.sim.network import FlowNetwork
from moesim.sim.topology import LINK_KINDS, build_topology, load_topology_file
from tests.simulator.helpers import star

GB = 1e9
ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


def _dgx(nodes=1, **kw):
    base = dict(preset="dgx-h100", nodes=nodes, network_model="nccl", nvlink_latency_us=0.0,
                nic_latency_us=0.0, fabric_latency_us=0.0)
    base.update(kw)
    return build_topology(ClusterConfig(**base))


def _flat(protocols=("Simple",), **links) -> NcclTerms:
    """No latency, no saturation: only the term under test is on."""
    t = dataclasses.replace(NcclTerms.ideal(), protocols=protocols)
    return t.with_links(**links) if links else t


# --- NCCL's terms against hand-worked values ----------------------------------------------
def test_latency_table_closed_forms():
    t = NcclTerms(latency_scale=1.0)
    # ring all-reduce, 8 ranks on one node, LL: base 6.6 + 2 (n-1) NVLink steps of 0.6 us
    assert t.latency("ring", "LL", "all_reduce", 8, 1) == pytest.approx((6.6 + 14 * 0.6) * 1e-6)
    # ring all-gather on 16 ranks / 2 nodes, Simple: 15 steps, 1 on the network (14 us); the
    # intra steps at least 3 x 1 us of proxy overhead
    assert t.latency("ring", "Simple", "all_gather", 16, 2) == \
        pytest.approx((8.4 + 14 * 3.4 + 1 * 14.0) * 1e-6)
    # all-reduce ring across 2 nodes: 2 * nodes steps cross the network
    assert t.latency("ring", "LL128", "all_reduce", 16, 2) == \
        pytest.approx((14.0 + 26 * 1.9 + 4 * 4.0) * 1e-6)
    # tree, 4 nodes x 8: 2 ((8-1) intra + log2(4) inter)
    assert t.latency("tree", "LL", "all_reduce", 32, 4) == \
        pytest.approx((6.8 + 2 * (7 * 0.6 + 2 * 5.0)) * 1e-6)
    assert t.latency("nvls", "Simple", "all_reduce", 8, 1) == pytest.approx(23e-6)
    assert t.latency("nvls_tree", "Simple", "all_reduce", 32, 4) == \
        pytest.approx((23 + 2 * 2 * 14) * 1e-6)
    assert dataclasses.replace(t, latency_scale=2.0).latency("nvls", "Simple", "all_reduce",
                                                            8, 1) == pytest.approx(46e-6)


def test_protocol_fractions():
    t = NcclTerms()
    assert t.fraction("ring", "LL", "all_reduce", 1, 8) == pytest.approx(1 / 4)
    assert t.fraction("ring", "LL", "all_gather", 1, 8) == pytest.approx(1 / 3)
    assert t.fraction("ring", "LL128", "all_gather", 2, 8) == pytest.approx(0.92)
    assert t.fraction("ring", "LL128", "all_gather", 2, 1) == pytest.approx(0.7)
    assert t.fraction("tree", "Simple", "all_reduce", 2, 8) == pytest.approx(0.92)
    assert t.fraction("tree", "LL128", "all_reduce", 2, 8) == pytest.approx(0.92 * 120 / 128)
    assert t.fraction("nvls", "Simple", "all_reduce", 1, 8) == 1.0


def test_saturation_curve():
    lt = LinkTerms(0.8, 1e6, 2.0)
    assert lt.factor(1e6) == pytest.approx(0.4)              # half of eta at b_half
    assert lt.factor(1e9) == pytest.approx(0.8 / (1 + 1e-6))
    assert lt.factor(1e5) == pytest.approx(0.8 / 101)
    assert LinkTerms(0.9, 0.0).factor(10.0) == pytest.approx(0.9)   # off: constant


def test_p2p_concurrency_from_nccl_channels():
    t = NcclTerms(p2p_channels=32, p2p_ops_per_channel=8)
    assert t.p2p_peers(64) == 128      # 2 channels a peer while 2 x 64 <= 4 x 32
    assert t.p2p_peers(65) == 256      # one channel a peer beyond
    assert NcclTerms(p2p_channels=2, p2p_ops_per_channel=2).p2p_peers(8) == 4


def test_algorithm_candidates():
    t = NcclTerms()
    assert t.algorithms("all_reduce", 1, True, True) == ["ring", "nvls"]
    assert t.algorithms("all_reduce", 4, True, True) == ["ring", "tree", "nvls_tree"]
    assert t.algorithms("all_reduce", 4, True, False) == ["ring", "tree"]
    assert t.algorithms("reduce_scatter", 4, True, True) == ["ring"]


# --- flows of each algorithm against closed forms ----------------------------------------
@pytest.mark.parametrize("n", [4, 8])
def test_ring_protocol_scales_bandwidth_time(tmp_path, n):
    topo = load_topology_file(star(tmp_path / "s.toml", n, 100.0))
    s = 64e6
    net = FlowNetwork(topo, 0.0)
    ring = 2 * (n - 1) / n * s / (100 * GB)
    simple = Collectives(net, 0.0, _flat()).all_reduce(np.arange(n)[None], s)
    assert simple.duration == pytest.approx(ring, rel=1e-9)
    assert (simple.algorithm, simple.protocol) == ("ring", "Simple")
    ll128 = Collectives(net, 0.0, _flat(("LL128",))).all_reduce(np.arange(n)[None], s)
    assert ll128.duration == pytest.approx(ring / 0.92, rel=1e-9)


def test_link_efficiency_divides_rate(tmp_path):
    topo = load_topology_file(star(tmp_path / "s.toml", 4, 100.0))
    s = 64e6
    coll = Collectives(FlowNetwork(topo, 0.0), 0.0, _flat(nvlink=LinkTerms(0.5, 0.0)))
    # the star's links are NVLink-class (one machine)
    res = coll.all_gather(np.arange(4)[None], s)
    assert res.duration == pytest.approx(0.75 * s / (50 * GB), rel=1e-9)


def test_nvls_moves_s_plus_s_over_n_per_gpu():
    topo = _dgx(1)
    s = 256e6
    terms = _flat(nvls=LinkTerms(0.7, 0.0))
    coll = Collectives(FlowNetwork(topo, 0.0), 0.0, terms, algorithms=("nvls",))
    res = coll.all_reduce(np.arange(8)[None], s)
    assert res.algorithm == "nvls"
    assert res.duration == pytest.approx((s + s / 8) / (450 * GB * 0.7), rel=1e-9)


def test_tree_two_nodes_closed_form():
    """2 x 8 GPUs, one channel per rail: each chain GPU sends 2c - 2 shares of S/c over
    NVLink; each rail's head sends S/c through its NIC (both trees, both ways)."""
    topo = _dgx(2)
    s = 1e9
    coll = Collectives(FlowNetwork(topo, 0.0), 0.0, _flat(), algorithms=("tree",))
    res = coll.all_reduce(np.arange(16)[None], s)
    c = 8
    nvl = (2 * c - 2) / c * s / (450 * GB)
    nic = s / c / (50 * GB)
    assert res.algorithm == "tree"
    assert res.duration == pytest.approx(max(nvl, nic) / 0.92, rel=1e-9)


def test_ring_channels_stay_on_rails():
    """Multi-node rings enter and leave each machine on one rail: no flow crosses a spine."""
    topo = _dgx(4, fabric="rail", gpus_per_leaf=2, pxn=False)
    coll = Collectives(FlowNetwork(topo, 0.0), 0.0, _flat(), algorithms=("ring",))
    res = coll.all_reduce(np.arange(32)[None], 1e9)
    fabric = res.link_bytes[LINK_KINDS.index("fabric")]
    nic = res.link_bytes[LINK_KINDS.index("nic")]
    # 4 machines on 2 leaves per rail: machine 1 -> 2 and 3 -> 0 cross the spine; no more
    assert nic > 0 and fabric == pytest.approx(nic / 2, rel=1e-9)
    # each NIC carries 2 (n-1)/n S / c out and in: busbw = c x NIC rate
    n, c = 32, 8
    assert res.duration == pytest.approx(2 * (n - 1) / n * 1e9 / c / (50 * GB), rel=1e-9)


def test_heap_tree_edges_double_binary_tree():
    e = heap_tree_edges(8)
    assert len(e) == 14                      # two trees of 7 edges
    a, b = e[:7], e[7:]
    inner_a = set(a[:, 1])
    inner_b = set(b[:, 1])
    assert len(inner_a & inner_b) <= 1       # no node is inner in both (up to the middle)
    assert heap_tree_edges(1).shape == (0, 2)


def test_a2a_rounds_of_bounded_peers():
    topo = _dgx(1)
    m = np.full((8, 8), 8e6)
    few = dataclasses.replace(_flat(), p2p_channels=1, p2p_ops_per_channel=2, latency_scale=1.0)
    # 8 ranks: 1 channel a peer (2 x 8 > 4 x 1), so 2 peers at once: 7 shifts in 4 rounds
    res = Collectives(FlowNetwork(topo, 0.0), 0.0, few).all_to_all(m)
    per_round = 2 * 8e6 / (450 * GB)
    assert res.duration == pytest.approx(3 * per_round + 8e6 / (450 * GB) + 4 * 3.4e-6,
                                         rel=1e-9)


def test_pxn_routes_cross_rail_through_the_peer():
    topo = _dgx(2, fabric="rail", gpus_per_leaf=1, spines=2)
    assert topo.pxn
    r = topo.routes(np.array([0]), np.array([9]))   # n0.g0 -> n1.g1
    kinds = [LINK_KINDS[topo.link_kind[i]] for i in r.links]
    assert "fabric" in kinds                          # rail 1 of 2 single-node pods: a spine
    ends = [topo.link_label(i) for i in r.links]
    assert "n0.g0->n0.nvswitch" in ends and "n0.g1->leaf.p0.r1" in ends
    off = _dgx(2, fabric="rail", gpus_per_leaf=1, spines=2, pxn=False)
    ends_off = [off.link_label(i) for i in off.routes(np.array([0]), np.array([9])).links]
    assert "n0.g0->leaf.p0.r0" in ends_off


# --- the ideal limit is the plain max-min model -------------------------------------------
@pytest.mark.parametrize("fabric", ["rail", "fat-tree"])
def test_ideal_terms_equal_max_min_model(fabric):
    """With every term off (no latency table, full protocol bandwidth, no saturation,
    unbounded p2p concurrency) and no PXN, the nccl model is the ideal one."""
    kw = dict(nodes=2, fabric=fabric, pxn=False, gpus_per_leaf=8)
    topo = _dgx(**kw)
    rng = np.random.default_rng(0)
    m = rng.integers(0, 4 << 20, (16, 16)).astype(float)
    ideal = Collectives(FlowNetwork(topo, 0.02), 5e-6)
    nccl = Collectives(FlowNetwork(topo, 0.02), 5e-6, NcclTerms.ideal())
    a, b = ideal.all_to_all(m), nccl.all_to_all(m)
    assert b.duration == pytest.approx(a.duration, rel=1e-12)
    np.testing.assert_allclose(b.rank_end, a.rank_end, rtol=1e-12)
    np.testing.assert_allclose(b.link_bytes, a.link_bytes, rtol=1e-12)
    one = _dgx(1)
    g = np.arange(8)[None]
    r1 = Collectives(FlowNetwork(one, 0.0), 5e-6).all_reduce(g, 1e8)
    r2 = Collectives(FlowNetwork(one, 0.0), 5e-6, NcclTerms.ideal(), nvls=False
                     ).all_reduce(g, 1e8)
    assert r2.duration == pytest.approx(r1.duration, rel=1e-12)


def test_ideal_model_is_the_default_and_unchanged():
    c = ClusterConfig()
    assert c.network_model == "ideal"
    topo = build_topology(dataclasses.replace(c, nodes=2, pxn=True))
    assert not topo.pxn                      # PXN is a NCCL routing: the nccl model only


# --- fitted terms -------------------------------------------------------------------------
def test_fitted_terms_reproduce_their_fit_points():
    """configs/network/hopper.toml with the launch costs of network_published.csv gives the
    simulated times written there, and its fit points within the fit's own error."""
    from benchmarks.network import points_from_rows, read_rows

    rows = read_rows(ROOT / "docs/validation/network_measurements.csv")
    pts = points_from_rows(rows)
    with open(ROOT / "docs/validation/network_published.csv") as f:
        pub = list(csv.DictReader(f))
    assert len(pub) == len(pts) >= 30
    terms = load_terms("hopper")
    sim = PointSimulator()
    errs = []
    for p, row in zip(pts, pub, strict=True):
        t = sim.time(p, terms, float(row["launch_us"]) * 1e-6)
        assert t * 1e6 == pytest.approx(float(row["simulated_us"]), rel=1e-3, abs=0.01)
        if p.fit:
            errs.append(abs(t / p.measured_s - 1))
    assert np.median(errs) < 0.05


def test_fit_recovers_known_terms(tmp_path):
    """Points simulated with known terms; the fit from other values finds them again."""
    topo_cfg = ClusterConfig(preset="dgx-h100", nodes=1, network_model="nccl",
                             nvlink_latency_us=0.0)
    truth = dataclasses.replace(NcclTerms(latency_scale=1.3), protocols=("Simple",)
                                ).with_links(nvlink=LinkTerms(0.75, 0.0))
    sim = PointSimulator()
    pts = []
    for s in (1 << 20, 1 << 24, 1 << 28):
        p = Point("x", topo_cfg, "all_gather", float(s), 1.0)
        p.measured_s = sim.time(p, truth, 8e-6)
        pts.append(p)
    start = dataclasses.replace(truth, latency_scale=1.0).with_links(nvlink=LinkTerms(0.5, 0.0))
    res = fit(pts, start, ["nvlink.efficiency", "latency_scale"], {"default": 8.0}, sim=sim)
    assert res.terms.link("nvlink").efficiency == pytest.approx(0.75, rel=1e-3)
    assert res.terms.latency_scale == pytest.approx(1.3, rel=1e-2)


def test_bad_terms_file_names_the_field(tmp_path):
    p = tmp_path / "t.toml"
    p.write_text("[link.nic]\nefficiency = 1.5\n")
    with pytest.raises(InputError, match=r"link\.nic\.efficiency"):
        load_terms(str(p))
    with pytest.raises(InputError, match="no such network terms"):
        load_terms("nope")


# --- nccl-tests tables ----------------------------------------------------------------------
NCCL_TESTS = """# nThread 1 nGpus 1 minBytes 65536 maxBytes 1048576 step: 2(factor)
#  Rank  0 Group  0 Pid   1 on nodeA device  0 [0x18] NVIDIA H100 80GB HBM3
#  Rank  1 Group  0 Pid   2 on nodeA device  1 [0x2a] NVIDIA H100 80GB HBM3
#  Rank  2 Group  0 Pid   3 on nodeB device  0 [0x18] NVIDIA H100 80GB HBM3
#  Rank  3 Group  0 Pid   4 on nodeB device  1 [0x2a] NVIDIA H100 80GB HBM3
#       size         count      type   redop    root     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)
       65536         16384     float     sum      -1    37.85    1.73    3.25      0
      131072         32768     float     sum      -1    43.10    3.04    5.70      0
     1048576        262144     float     sum      -1    87.08   12.04   22.58      0
# Avg bus bandwidth    : 10.5
"""


def test_parse_nccl_tests_output():
    t = parse("# Collective test starting: all_reduce_perf\n" + NCCL_TESTS, "x.txt")
    assert (t.collective, t.ranks, t.nodes) == ("all_reduce", 4, 2)
    assert t.sizes == [65536, 131072, 1048576]
    assert t.times_us == [37.85, 43.10, 87.08]
    with pytest.raises(InputError, match="collective"):
        parse(NCCL_TESTS, "x.txt")


def test_format_round_trips_through_parse():
    text = format_table("all_to_all", 8, [1 << 20, 1 << 24], [30.0, 400.0], ["hdr"])
    hosts = "".join(f"#  Rank {i} Group 0 Pid {i} on h{i // 4} device {i} [0] GPU\n"
                    for i in range(8))
    t = parse(hosts + text, "y", collective="all_to_all")
    assert t.sizes == [1 << 20, 1 << 24] and t.times_us == [30.0, 400.0]
    assert (t.ranks, t.nodes) == (8, 2)
    busbw = float(text.splitlines()[5].split()[7])
    assert busbw == pytest.approx((1 << 20) / 30e-6 / 1e9 * 7 / 8, abs=0.01)


def test_parse_sizes():
    assert parse_sizes("64K:1M") == [65536, 131072, 262144, 524288, 1048576]
    assert parse_sizes("1M:64M:8") == [1 << 20, 8 << 20, 64 << 20]
    assert parse_sizes("1G,65536") == [1 << 30, 65536]
    with pytest.raises(InputError):
        parse_sizes("1M:64K")


# --- CLI ----------------------------------------------------------------------------------------
def test_bench_net_prints_nccl_tests_table(capsys):
    from moesim.cli import main

    assert main(["bench-net", "--cluster", "dgx-h100", "--collective", "all_reduce_perf",
                 "--sizes", "1M:4M", "--nodes", "2"]) == 0
    out = capsys.readouterr().out
    t = parse("".join(f"#  Rank {i} Group 0 Pid {i} on h{i // 8} device {i} [0] GPU\n"
                      for i in range(16)) + out, "bench", collective="all_reduce")
    assert t.sizes == [1 << 20, 2 << 20, 4 << 20]
    assert all(b > a for a, b in zip(t.times_us, t.times_us[1:], strict=False))
    assert "algorithm/protocol per size" in out


def test_bench_net_bad_input_exit_2(capsys):
    from moesim.cli import main

    assert main(["bench-net", "--cluster", "dgx-h100", "--collective", "broadcast"]) == 2
    assert "--collective" in capsys.readouterr().err


def test_calibrate_nccl_tests_fits_and_writes_terms(tmp_path, capsys):
    """A run simulated with known terms, written as nccl-tests output, calibrates back."""
    from moesim.cli import main

    cluster = ClusterConfig(preset="dgx-h100", nodes=1, gpus_per_node=4, network_model="nccl")
    sim = PointSimulator()
    truth = load_terms("hopper").with_links(nvlink=LinkTerms(0.7, 2e5, 1.0))
    sizes = [1 << s for s in range(16, 31, 2)]
    times = [sim.time(Point("x", cluster, "all_gather", float(s), 1.0), truth, 12e-6) * 1e6
             for s in sizes]
    hosts = "".join(f"#  Rank {i} Group 0 Pid {i} on h0 device {i} [0] GPU\n" for i in range(4))
    f = tmp_path / "ag.txt"
    f.write_text("# Collective test starting: all_gather_perf\n" + hosts +
                 format_table("all_gather", 4, sizes, times, ["truth"]))
    out = tmp_path / "mine.toml"
    assert main(["calibrate", "--nccl-tests", str(f), "--cluster", "dgx-h100",
                 "--out", str(out)]) == 0
    got = load_terms(str(out))
    printed = capsys.readouterr().out
    launch = float(printed.split("; launch ")[1].split(" us")[0]) * 1e-6
    for s, t in zip(sizes, times, strict=True):
        p = Point("x", cluster, "all_gather", float(s), 1.0)
        assert sim.time(p, got, launch) == pytest.approx(t * 1e-6, rel=0.05)
    assert "median |fit/measured - 1|" in printed


def test_incast_penalty_on_the_receivers_link():
    """Two senders of another node into one GPU: its NIC downlink carries 2 x B at
    cap / (1 + c (2 - 1)); one sender alone is not penalised."""
    topo = _dgx(2, fabric="fat-tree", gpus_per_leaf=16)    # one leaf: only NIC links
    b = 64e6
    m2 = np.zeros((16, 16))
    m2[8, 0] = m2[9, 0] = b
    m1 = np.zeros((16, 16))
    m1[8, 0] = b
    nic = 50 * GB
    for c in (0.0, 0.5):
        coll = Collectives(FlowNetwork(topo, 0.0, incast=c), 0.0)
        assert coll.all_to_all(m2).duration == pytest.approx(2 * b / nic * (1 + c), rel=1e-9)
        assert coll.all_to_all(m1).duration == pytest.approx(b / nic, rel=1e-9)


def test_transposed_stage_is_answered_from_the_cache():
    """A combine (every flow of the dispatch reversed) on a symmetric topology without PXN
    has the dispatch's finish times: solved once, and equal to solving it afresh."""
    topo = _dgx(2, pxn=False, fabric="fat-tree", gpus_per_leaf=8)
    rng = np.random.default_rng(3)
    m = rng.integers(1, 8 << 20, (16, 16)).astype(float)
    coll = Collectives(FlowNetwork(topo, 0.02), 1e-6)
    fwd = coll.all_to_all(m)
    back = coll.all_to_all(m.T)
    assert coll.hits == 1
    fresh = Collectives(FlowNetwork(topo, 0.02), 1e-6).all_to_all(m.T)
    assert back.duration == pytest.approx(fresh.duration, rel=1e-12)
    np.testing.assert_allclose(back.rank_end, fresh.rank_end, rtol=1e-12)
    np.testing.assert_allclose(back.link_bytes, fresh.link_bytes, rtol=1e-12)
    assert fwd.duration == pytest.approx(back.duration, rel=1e-12)
    pxn = Collectives(FlowNetwork(_dgx(2, fabric="rail", gpus_per_leaf=1), 0.02), 1e-6,
                      NcclTerms.ideal())
    pxn.all_to_all(m)
    pxn.all_to_all(m.T)
    assert pxn.hits == 0                     # PXN legs are not mirror images: solved again
