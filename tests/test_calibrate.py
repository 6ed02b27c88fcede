"""`moesim calibrate`: the rows it derives from timings, and that the compute model reads them."""

from __future__ import annotations

import pytest

import runtime.calibrate as cal
from moesim.cli import main
from moesim.errors import InputError
from moesim.sim.compute import ComputeModel


def test_rows_from_a_known_roofline(tmp_path, monkeypatch):
    # A fake timer whose GEMMs run at 1e9 FLOP/s plus a fixed 1 ms: efficiency has a closed form.
    calls = []

    def fake_timer(device):
        def run(fn, repeat, between=None):
            calls.append(fn)
            return 1e-3
        return run

    monkeypatch.setattr(cal, "_timer", fake_timer)
    rows = cal.measure("cpu", repeat=1)
    gemm = {size: v for r, op, size, v in rows if r == "curve" and op == "gemm"}
    busy = 1e-3 - 1e-3 / 200  # the timed millisecond less one launch overhead (1 ms / 200)
    best = max(2.0 * s**3 for s in cal.GEMM_SIZES_CPU) / busy
    rows_rate = {op: v for r, op, _, v in rows if r == "rate"}
    assert rows_rate["gemm"] == pytest.approx(best)
    for s in cal.GEMM_SIZES_CPU:
        assert gemm[2.0 * s**3] == pytest.approx(2.0 * s**3 / busy / best)
    assert rows_rate["hbm"] == pytest.approx(2 * (1 << 23) * 4 / 1e-3)
    assert {op for r, op, _, _ in rows if r == "curve"} == {"gemm", "grouped_gemm",
                                                             "grouped_gemm_bwd@128x64"}
    # The backward does twice the forward's FLOPs in the same (fake) millisecond less four
    # launches: it is the best rate, and the forward's efficiency is half of it, less.
    grouped = {size: v for r, op, size, v in rows if r == "curve" and op == "grouped_gemm"}
    bwd = {size: v for r, op, size, v in rows if r == "curve" and op == "grouped_gemm_bwd@128x64"}
    assert max(bwd.values()) == pytest.approx(1.0)
    top = max(grouped)
    assert grouped[top] / bwd[top] == pytest.approx((1e-3 - 4e-3 / 200) / (2 * (1e-3 - 2e-3 / 200)))
    path = tmp_path / "cpu.csv"
    cal.write_calibration(rows, path, "fake", "test")
    model = ComputeModel.load("cpu", path)
    assert model.rates["gemm"] == pytest.approx(best, rel=1e-5)
    assert model.launch_overhead == pytest.approx(1e-3 / 200, rel=1e-5)
    # The newer rows: flat timings give the sort rate of the largest size, a sync's bubble is
    # the timed millisecond less two launches; nothing is left to the defaults but the tile.
    assert model.rates["sort"] == pytest.approx(cal.SORT_KEYS_CPU[-1] / 1e-3, rel=1e-5)
    assert model.sync_overhead == pytest.approx(1e-3 - 2e-3 / 200, rel=1e-5)
    assert model.defaulted == ()
    assert model.params["tile_m"] == cal.TILE[0]


def test_extra_expert_shapes_get_their_own_curves(monkeypatch, tmp_path):
    # Timings that scale with the work: every shape reaches the same rate at its largest size.
    monkeypatch.setattr(cal, "_timer", lambda device: lambda fn, repeat, between=None: 1e-3)
    rows = cal.measure("cpu", repeat=1, expert_shapes=cal.parse_shapes("32x16, 64x8"))
    ops = {op for r, op, _, _ in rows if r == "curve"}
    assert ops == {"gemm", "grouped_gemm", "grouped_gemm@32x16", "grouped_gemm@64x8",
                   "grouped_gemm_bwd@128x64", "grouped_gemm_bwd@32x16", "grouped_gemm_bwd@64x8"}
    path = tmp_path / "c.csv"
    cal.write_calibration(rows, path, "fake", "test")
    assert "grouped_gemm@64x8" in ComputeModel.load("c", path).curves
    for bad in ("32", "32x", "0x4", "axb"):
        with pytest.raises(InputError, match="expert-shapes"):
            cal.parse_shapes(bad)


def test_sort_fit_recovers_a_line():
    keys = (4096, 1 << 20, 1 << 22)
    rate, fixed = cal.sort_fit(keys, [50e-6 + n / 1e10 for n in keys])
    assert rate == pytest.approx(1e10) and fixed == pytest.approx(50e-6)


def test_expert_gemms_loop_matches_dense():
    import torch

    x, a = torch.randn(6, 4), torch.randn(6, 3)
    w_up, w_down = torch.randn(2, 4, 6), torch.randn(2, 3, 4)
    up, down = cal._expert_gemms(x, a, w_up, w_down, torch.tensor([2, 6]))
    assert torch.allclose(up[:2], x[:2] @ w_up[0]) and torch.allclose(up[2:], x[2:] @ w_up[1])
    assert torch.allclose(down[2:], a[2:] @ w_down[1])


def test_cli_refuses_cuda_without_a_gpu(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal cannot be shown")
    assert main(["calibrate", "--device", "cuda", "--out", str(tmp_path / "x.csv")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_gelu_fused_and_router_curves(monkeypatch, tmp_path):
    # The new families on the CPU path (the fused kernel and the router take their torch
    # references here), with a flat fake timer: every point's rate is its work over 1 ms.
    monkeypatch.setattr(cal, "_timer", lambda device: lambda fn, repeat, between=None: 1e-3)
    rows = cal.measure("cpu", repeat=1, gelu_shapes=((32, 16),), router_shapes=((16, 32, 4),))
    ops = {op for r, op, _, _ in rows if r == "curve"}
    assert {"grouped_gemm_gelu@32x16", "grouped_gemm_gelu_bwd@32x16", "fused_expert@32x16",
            "fused_expert_bwd@32x16", "router_stream@16x32", "router_stream_bwd@16x32"} <= ops
    fused = {s: v for r, op, s, v in rows if op == "fused_expert@32x16"}
    # size = 4 t d f for t in the CPU's group tokens, efficiency = 8 groups' FLOPs / 1 ms less
    # one launch, over the best rate of every family.
    rate = next(v for r, op, _, v in rows if r == "rate" and op == "grouped_gemm")
    for t in cal.FUSED_GROUP_TOKENS_CPU:
        fl = 4.0 * t * 32 * 16
        assert fused[fl] == pytest.approx(8 * fl / (1e-3 - 1e-3 / 200) / rate)
    path = tmp_path / "c.csv"
    cal.write_calibration(rows, path, "fake", "test")
    cm = ComputeModel.load("c", path)
    assert cm.fused_expert_seconds([[16, 0]], 32, 16) is not None
    assert cm.router_stream_seconds([256.0], 16, 32) is not None
    assert cal.parse_router_shapes("128x64k4, 64x16") == ((128, 64, 4), (64, 16, 8))
    for bad in ("128x64k0", "128", "axbk2", "16x4k8"):
        with pytest.raises(InputError, match="router-shapes"):
            cal.parse_router_shapes(bad)
