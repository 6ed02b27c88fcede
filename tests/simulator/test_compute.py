"""The compute model against the calibration figures it is built from."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.errors import InputError
from moesim.sim.compute import CALIBRATION_DIR, ComputeModel


def test_h200_matmul_hits_measured_rate():
    cm = ComputeModel.load("h200")
    t, flops = cm.gemm(np.array([8192]), 8192, 8192, 2)
    assert flops[0] == 2 * 8192**3
    assert t[0] == pytest.approx(flops[0] / 790e12 + cm.launch_overhead, rel=1e-9)


def _activation(cm: ComputeModel, tokens: float, ffn: int, mult: int = 1) -> float:
    """silu(h[:, :f]) * h[:, f:]: two kernels over 5 x tokens x ffn bf16 elements."""
    return mult * (2 * cm.launch_overhead + 5 * tokens * ffn * 2 / cm.rates["hbm"])


def test_grouped_gemm_hits_measured_rate_and_small_groups_are_slower():
    cm = ComputeModel.load("h200")
    big = np.full((1, 64), 4096)
    t, flops = cm.expert_ffn(big, 4096, 1408, 2, activation="unfused")
    # 64 experts x 4096 tokens x 6 x 4096 x 1408 FLOPs at the measured 609 TFLOP/s (the
    # grouped GEMMs), then the activation between them as its own (torch) kernels.
    assert flops[0] == pytest.approx(6 * 64 * 4096 * 4096 * 1408)
    assert t[0] == pytest.approx(flops[0] / 609e12 + 2 * cm.launch_overhead
                                 + _activation(cm, 64 * 4096, 1408), rel=1e-9)
    small = np.full((1, 64), 16)
    ts, fs = cm.expert_ffn(small, 4096, 1408, 2, activation="unfused")
    assert ts[0] / fs[0] > 3 * t[0] / flops[0]  # per FLOP at least 3x slower
    tb, fb = cm.expert_ffn(big, 4096, 1408, 2, backward=True, activation="unfused")
    assert fb[0] == 2 * flops[0] and tb[0] == pytest.approx(2 * t[0], rel=1e-9)


def _group_closed_form(cm: ComputeModel, m: float, dim: int, ffn: int) -> float:
    """One group's calibrated time at its padded size (whole 128-row tiles)."""
    padded = 6.0 * np.ceil(m / 128) * 128 * dim * ffn
    x, y = cm.curves["grouped_gemm"]
    return padded / (609e12 * float(np.interp(np.log10(padded), x, y)))


def _wave_floor(cm: ComputeModel, row_tiles: float, dim: int, ffn: int) -> float:
    """ceil(tiles / 132) waves of 128 x 256 tiles at the dense peak, up+gate then down."""
    per_sm = 790e12 / 132
    up = np.ceil(row_tiles * np.ceil(2 * ffn / 256) / 132) * 2 * 128 * 256 * dim / per_sm
    down = np.ceil(row_tiles * np.ceil(dim / 256) / 132) * 2 * 128 * 256 * ffn / per_sm
    return float(up + down)


def test_grouped_gemm_is_the_sum_of_its_groups():
    cm = ComputeModel.load("h200")
    rows = np.array([[16384, 9399, 2773, 1000, 300, 17, 0]])
    got = cm.grouped_gemm_seconds(rows, 2048, 1408)[0]
    want = sum(_group_closed_form(cm, m, 2048, 1408) for m in rows[0] if m > 0)
    assert want > _wave_floor(cm, np.ceil(rows / 128).sum(), 2048, 1408)  # many waves
    assert got == pytest.approx(want, rel=1e-12)
    # Skew with the same FLOPs: each group at its own size, not the mean's efficiency.
    mean = np.full((1, 6), rows.sum() / 6)
    assert cm.grouped_gemm_seconds(mean, 2048, 1408)[0] != pytest.approx(got, rel=1e-3)


def test_one_group_reduces_to_the_mean_formula():
    # A single group of whole tiles: what the model gave before it went per group.
    cm = ComputeModel.load("h200")
    flops = 6.0 * 4096 * 4096 * 1408
    x, y = cm.curves["grouped_gemm"]
    old = flops / (609e12 * float(np.interp(np.log10(flops), x, y)))
    assert cm.grouped_gemm_seconds(np.array([[4096]]), 4096, 1408)[0] == pytest.approx(old)


def test_tiles_and_waves():
    cm = ComputeModel.load("h200")
    g = cm.grouped_gemm_seconds
    # A group pays whole 128-row tiles: 1 row costs a full tile, 129 rows two.
    many = np.full((1, 64), 1)
    assert g(many, 2048, 1408)[0] == pytest.approx(g(many * 128, 2048, 1408)[0], rel=1e-12)
    assert g(np.full((1, 64), 129), 2048, 1408)[0] == pytest.approx(
        g(np.full((1, 64), 256), 2048, 1408)[0], rel=1e-12)
    # One small group fills 11 + 8 of 132 SMs: one wave of each GEMM, far above its share of
    # the many-group calibration.
    one = g(np.array([[128]]), 2048, 1408)[0]
    assert one == pytest.approx(_wave_floor(cm, 1, 2048, 1408), rel=1e-12)
    assert one > 3 * _group_closed_form(cm, 128, 2048, 1408)


def test_router_is_its_kernels():
    cm = ComputeModel.load("h200")
    n, dim, e, k = np.array([16384.0]), 2048, 64, 8
    gemm_t, gemm_f = cm.gemm(n, dim, e, 2)
    t, f = cm.router(n, dim, e, k, 2)
    per_item = 6 * e + 8 * e + (4 * e + 12 * k) + (16 * k + 8) + 24 * k
    assert f[0] == gemm_f[0]
    assert t[0] == pytest.approx(gemm_t[0] + 8 * cm.launch_overhead
                                 + n[0] * per_item / 4.2e12, rel=1e-12)
    # Forced routing: 4 more launches (upload, expansion, layout), nothing else.
    tf, _ = cm.router(n, dim, e, k, 2, forced=True)
    assert tf[0] - t[0] == pytest.approx(4 * cm.launch_overhead, rel=1e-9)
    tb, _ = cm.router(n, dim, e, k, 2, backward=True)
    assert tb[0] > t[0]
    assert cm.router(np.array([0]), dim, e, k, 2)[0][0] == 0.0


def test_sort_permute_combine_and_local_copy_closed_forms():
    cm = ComputeModel.load("h200")
    # h200.csv's assumed sort: 8 radix passes of 32 bytes + a histogram pass at HBM speed,
    # ten launches; the same as a file without the rows gets.
    assert cm.defaulted == ()
    a = np.array([131072.0])
    sort = 10 * 4e-6 + a[0] / (4.2e12 / 264)
    assert cm.sort(a)[0] == pytest.approx(sort, rel=1e-7)
    row = 4096
    gather = 2 * a[0] * row / 3.7e12 + 4e-6
    index = 2 * sort + (4 * 4e-6 + 64 * a[0] / 4.2e12)
    want = (2 * 4e-6 + 8 * a[0] / 4.2e12) + index + gather + 3 * cm.sync_overhead
    assert cm.permute(a, row, 8, sorts=2, syncs=3)[0] == pytest.approx(want, rel=1e-7)
    # The host split adds its time: the index kernels are queued after it.
    assert cm.split_overhead == 2e-4
    assert cm.permute(a, row, 8, sorts=2, syncs=3, splits=1)[0] == pytest.approx(want + 2e-4,
                                                                                rel=1e-7)
    back = 2 * 4e-6 + 24 * a[0] / 4.2e12 + 4e-6 + (a[0] + a[0] / 8) * row / 4.2e12
    assert cm.permute(a, row, 8, backward=True)[0] == pytest.approx(back, rel=1e-12)
    comb = 3 * 4e-6 + 40 * a[0] / 4.2e12 + 4e-6 + (a[0] + a[0] / 8) * row / 4.2e12
    assert cm.combine(a, row, 8)[0] == pytest.approx(comb, rel=1e-12)
    assert cm.regroup(a, row)[0] == pytest.approx(2 * gather + 2 * 4e-6 + 24 * a[0] / 4.2e12)
    assert cm.local_copy(np.array([1e9]))[0] == pytest.approx(2e9 / 4.2e12, rel=1e-12)
    for fn in (cm.sort, lambda x: cm.permute(x, row, 8), lambda x: cm.combine(x, row, 8)):
        assert fn(np.array([0.0]))[0] == 0.0  # a rank with nothing to move costs nothing


def test_optional_rows_are_read_and_checked(tmp_path):
    optional = ("rate,sort,", "overhead,sort,", "overhead,sync,", "param,", "curve,grouped_gemm@")
    base = "".join(line for line in (CALIBRATION_DIR / "h200-measured.csv").read_text()
                   .splitlines(keepends=True) if not line.startswith(optional))
    p = tmp_path / "x.csv"
    p.write_text(base + "rate,sort,,1e10\noverhead,sort,,5e-5\noverhead,sync,,3e-5\n"
                 "param,sms,,78\n")
    cm = ComputeModel.load("x", p)
    assert cm.rates["sort"] == 1e10 and cm.sort_overhead == 5e-5 and cm.sync_overhead == 3e-5
    assert cm.params["sms"] == 78 and "param.sms" not in cm.defaulted
    assert cm.sort(np.array([1e6]))[0] == pytest.approx(5e-5 + 1e-4)
    p.write_text(base + "param,sms,,7.5\n")
    with pytest.raises(InputError, match=r"param\.sms"):
        ComputeModel.load("x", p)
    p.write_text(base + "rate,sort,,1e10\nrate,sort,,2e10\n")
    with pytest.raises(InputError, match=r"rate\.sort"):
        ComputeModel.load("x", p)
    # A file from before these rows existed still loads, with the same assumed values
    # h200.csv spells out.
    p.write_text(base)
    old = ComputeModel.load("x", p)
    assert {"rate.sort", "overhead.sort", "overhead.sync", "param.sms"} <= set(old.defaulted)
    h200 = ComputeModel.load("h200")
    assert old.rates["sort"] == pytest.approx(old.rates["hbm"] / 264)
    assert h200.rates["sort"] == pytest.approx(h200.rates["hbm"] / 264, rel=1e-7)
    assert h200.sort_overhead == pytest.approx(10 * h200.launch_overhead)
    assert old.params == h200.params and old.sync_overhead == h200.sync_overhead


def test_empty_rank_costs_nothing():
    cm = ComputeModel.load("h200")
    t, f = cm.expert_ffn(np.zeros((2, 4)), 64, 128, 2)
    assert (t == 0).all() and (f == 0).all()


def test_bad_calibration(tmp_path):
    with pytest.raises(InputError, match=r"cluster\.gpu"):
        ComputeModel.load("tpu-v9")
    p = tmp_path / "x.csv"
    p.write_text("record,op,size,value\nrate,gemm,,-1\n")
    with pytest.raises(InputError, match="value"):
        ComputeModel.load("x", p)
    p.write_text("record,op,size,value\nrate,gemm,,1\n")
    with pytest.raises(InputError, match=r"rate\.grouped_gemm"):
        ComputeModel.load("x", p)


def test_an_expert_shape_with_its_own_curve_uses_it(tmp_path):
    base = (CALIBRATION_DIR / "h200.csv").read_text()
    p = tmp_path / "x.csv"
    # Thin experts measured at half the efficiency of the plain curve, at every size.
    x, y = ComputeModel.load("h200").curves["grouped_gemm"]
    rows = "".join(f"curve,grouped_gemm@512x704,{10 ** a:.6g},{b / 2:.6g}\n"
                   for a, b in zip(x, y, strict=True))
    p.write_text(base + rows)
    cm, plain = ComputeModel.load("x", p), ComputeModel.load("h200")
    g = np.full((1, 128), 4096)
    assert cm.grouped_gemm_seconds(g, 512, 704)[0] == pytest.approx(
        2 * plain.grouped_gemm_seconds(g, 512, 704)[0], rel=1e-4)
    # Any other shape keeps the plain curve.
    assert cm.grouped_gemm_seconds(g, 2048, 1408)[0] == plain.grouped_gemm_seconds(
        g, 2048, 1408)[0]
    # A measured backward curve at the shape: backward = 2 x FLOPs / (rate x its efficiency)
    # for every group (whole tiles: 4096 rows), where there was 2 x the forward before.
    bwd = "".join(f"curve,grouped_gemm_bwd@512x704,{s:.6g},0.8\n" for s in (1e8, 1e12))
    p.write_text(base + rows + bwd)
    cb = ComputeModel.load("x", p)
    assert cb.grouped_gemm_seconds(g, 512, 704, backward=True)[0] == pytest.approx(
        128 * 2 * 6.0 * 4096 * 512 * 704 / (609e12 * 0.8), rel=1e-9)
    assert cm.grouped_gemm_seconds(g, 512, 704, backward=True)[0] == pytest.approx(
        2 * cm.grouped_gemm_seconds(g, 512, 704)[0], rel=1e-12)
    p.write_text(base + "curve,grouped_gemm@thin,1e9,0.5\n")
    with pytest.raises(InputError, match=r"curve\.grouped_gemm@thin"):
        ComputeModel.load("x", p)


def test_a_curve_of_known_shape_is_looked_up_by_rows(tmp_path):
    # The plain curve measured at 4096 x 1408: a 2048 x 1408 group of 128 rows is looked up
    # at the 128-row point, not at the 64-row one that has the same FLOPs (and half a tile
    # of waste in it already).
    base = (CALIBRATION_DIR / "h200.csv").read_text()
    p = tmp_path / "x.csv"
    p.write_text(base + "param,curve_dim,,4096\nparam,curve_ffn,,1408\n")
    cm = ComputeModel.load("x", p)
    assert cm._grouped_curve(2048, 1408) == ("grouped_gemm", 4096, 1408)
    g = np.full((1, 64), 128)
    x, y = cm.curves["grouped_gemm"]
    eff = float(np.interp(np.log10(6.0 * 128 * 4096 * 1408), x, y))
    assert cm.grouped_gemm_seconds(g, 2048, 1408)[0] == pytest.approx(
        64 * 6.0 * 128 * 2048 * 1408 / (609e12 * eff), rel=1e-12)
    p.write_text(base + "param,curve_dim,,4096\n")
    with pytest.raises(InputError, match="curve_dim"):
        ComputeModel.load("x", p)


@pytest.mark.parametrize("backward", [False, True])
@pytest.mark.parametrize("kind, launches, elements", [("unfused", (2, 4), (5, 10)),
                                                      ("kernel", (1, 1), (3, 5))])
def test_activation_adds_exactly_its_kernels(backward, kind, launches, elements):
    # Closed form of what a SwiGLU outside the GEMM epilogue adds: its launches and its bf16
    # elements per token and hidden unit through HBM (torch ops: gate read, silu written, both
    # read, product written; one kernel: h read, product written; backward h and the output
    # gradient read, dh written), on ranks that have tokens.
    cm = ComputeModel.load("h200")
    rows = np.array([[300, 0, 17, 4096], [0, 0, 0, 0]])
    dim, ffn, b = 64, 5632, int(backward)
    plain, f1 = cm.expert_ffn(rows, dim, ffn, 2, backward=backward, activation=kind)
    fused, f2 = cm.expert_ffn(rows, dim, ffn, 2, backward=backward, activation="fused")
    tokens = rows.sum(axis=1)
    act = launches[b] * cm.launch_overhead + elements[b] * tokens * ffn * 2 / cm.rates["hbm"]
    assert plain[0] - fused[0] == pytest.approx(act[0], rel=1e-9)
    assert plain[1] == fused[1] == 0.0 and np.array_equal(f1, f2)


@pytest.mark.parametrize("backward", [False, True])
def test_gelu_expert_costs_two_matrices_and_one_activation_kernel(backward):
    # The 2-matrix GELU expert: 4 x dim x ffn FLOPs a row (8 backward), and its activation is
    # one torch kernel each way (h read, gelu written; backward h and the gradient read, dh
    # written), whatever model.activation says short of the epilogue.
    cm = ComputeModel.load("h200")
    rows = np.array([[300, 0, 17, 4096]])
    dim, ffn, b = 128, 1024, int(backward)
    t, f = cm.expert_ffn(rows, dim, ffn, 2, backward=backward, activation="unfused",
                         kind="gelu")
    fused, _ = cm.expert_ffn(rows, dim, ffn, 2, backward=backward, activation="fused",
                             kind="gelu")
    assert f[0] == pytest.approx(4.0 * rows.sum() * dim * ffn * (1 + b))
    act = cm.launch_overhead + (2 + b) * rows.sum() * ffn * 2 / cm.rates["hbm"]
    assert t[0] - fused[0] == pytest.approx(act, rel=1e-9)
    swiglu, fs = cm.expert_ffn(rows, dim, ffn, 2, backward=backward, activation="fused")
    assert fs[0] == pytest.approx(1.5 * f[0]) and swiglu[0] > fused[0]


def test_fused_expert_curve_is_used_only_where_faster_and_allowed(tmp_path):
    base = (CALIBRATION_DIR / "h200.csv").read_text()
    p = tmp_path / "x.csv"
    # The fused kernel at 50% of the grouped GEMM rate at every size, forward and backward.
    fused = "".join(f"curve,{fam}@128x1024,{s:.6g},0.5\n" for fam in
                    ("fused_expert", "fused_expert_bwd") for s in (1e6, 1e12))
    p.write_text(base + fused)
    cm = ComputeModel.load("x", p)
    rows = np.array([[100, 0, 64, 4096]])
    t_plain, _ = cm.expert_ffn(rows, 128, 1024, 2, kind="gelu")
    t_ok, _ = cm.expert_ffn(rows, 128, 1024, 2, kind="gelu", fused_ok=True)
    # Closed form: every group padded to whole 64-row tiles, 4 * rows * dim * ffn FLOPs at
    # half the rate, one launch.
    padded = np.array([128, 0, 64, 4096])
    want = (4.0 * padded * 128 * 1024).sum() / (609e12 * 0.5) + cm.launch_overhead
    assert cm.fused_expert_seconds(rows, 128, 1024)[0] == pytest.approx(want, rel=1e-9)
    # Backward: twice the FLOPs at the backward curve's 50%, two launches.
    tb, _ = cm.expert_ffn(rows, 128, 1024, 2, backward=True, kind="gelu", fused_ok=True)
    tb_plain, _ = cm.expert_ffn(rows, 128, 1024, 2, backward=True, kind="gelu")
    want_b = 2 * (want - cm.launch_overhead) + 2 * cm.launch_overhead
    assert cm.fused_expert_seconds(rows, 128, 1024, True)[0] == pytest.approx(want_b, rel=1e-9)
    # One choice for both passes: fused where its forward + backward is the shorter.
    fused = want + want_b < t_plain[0] + tb_plain[0]
    assert t_ok[0] == pytest.approx(want if fused else t_plain[0], rel=1e-9)
    assert tb[0] == pytest.approx(want_b if fused else tb_plain[0], rel=1e-9)
    # SwiGLU experts, wide experts, and an EP layer (fused_ok False) never take it.
    assert cm.expert_ffn(rows, 128, 1024, 2, fused_ok=True)[0][0] == cm.expert_ffn(
        rows, 128, 1024, 2)[0][0]
    assert cm.fused_expert_seconds(rows, 512, 1024) is None
    p.write_text(base + "curve,fused_expert@wide,1e9,0.5\n")
    with pytest.raises(InputError, match=r"curve\.fused_expert@wide"):
        ComputeModel.load("x", p)


def test_streaming_router_curve_replaces_the_dense_router_where_faster(tmp_path):
    base = (CALIBRATION_DIR / "h200.csv").read_text()
    p = tmp_path / "x.csv"
    curves = ("curve,router_stream@128x64,1e6,0.01\ncurve,router_stream@128x64,1e12,0.2\n"
              "curve,router_stream_bwd@128x64,1e6,0.01\n"
              "curve,router_stream_bwd@128x64,1e12,0.2\n")
    p.write_text(base + curves)
    cm, plain = ComputeModel.load("x", p), ComputeModel.load("h200")
    n = np.array([524288.0, 16.0])
    flops = 2.0 * n * 128 * 64
    eff = np.interp(np.log10(flops), [6, 12], [0.01, 0.2])
    stream_f = flops / (790e12 * eff) + 4 * cm.launch_overhead
    stream_b = flops / (790e12 * eff) + 3 * cm.launch_overhead
    dense_f, f = plain.router(n, 128, 64, 8, 2)
    dense_b, _ = plain.router(n, 128, 64, 8, 2, backward=True)
    # One choice for both passes (as the runtime times forward + backward together).
    use = stream_f + stream_b < dense_f + dense_b
    got_f, f2 = cm.router(n, 128, 64, 8, 2)
    got_b, _ = cm.router(n, 128, 64, 8, 2, backward=True)
    np.testing.assert_allclose(got_f, np.where(use, stream_f, dense_f), rtol=1e-9)
    np.testing.assert_allclose(got_b, np.where(use, stream_b, dense_b), rtol=1e-9)
    assert use[0] and np.array_equal(f, f2)
    # run.kernels = "baseline" (stream_ok False) or wide items keep the dense router.
    np.testing.assert_array_equal(cm.router(n, 128, 64, 8, 2, stream_ok=False)[0], dense_f)
    # A file with the forward curve alone: no joint choice possible, the dense router stays.
    p.write_text(base + "".join(ln + "\n" for ln in curves.splitlines() if "_bwd" not in ln))
    fwd_only = ComputeModel.load("x", p)
    np.testing.assert_array_equal(fwd_only.router(n, 128, 64, 8, 2)[0], dense_f)
