"""The compute model against the calibration figures it is built from."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.compute import ComputeModel
from moesim.errors import InputError


def test_h200_matmul_hits_measured_rate():
    cm = ComputeModel.load("h200")
    t, flops = cm.gemm(np.array([8192]), 8192, 8192, 2)
    assert flops[0] == 2 * 8192**3
    assert t[0] == pytest.approx(flops[0] / 790e12 + cm.launch_overhead, rel=1e-9)


def test_grouped_gemm_hits_measured_rate_and_small_groups_are_slower():
    cm = ComputeModel.load("h200")
    big = np.full((1, 64), 4096)
    t, flops = cm.expert_ffn(big, 4096, 1408, 2)
    # 64 experts x 4096 tokens x 6 x 4096 x 1408 FLOPs at the measured 609 TFLOP/s.
    assert flops[0] == pytest.approx(6 * 64 * 4096 * 4096 * 1408)
    assert t[0] == pytest.approx(flops[0] / 609e12 + 2 * cm.launch_overhead, rel=1e-9)
    small = np.full((1, 64), 16)
    ts, fs = cm.expert_ffn(small, 4096, 1408, 2)
    assert ts[0] / fs[0] > 3 * t[0] / flops[0]  # per FLOP at least 3x slower
    tb, fb = cm.expert_ffn(big, 4096, 1408, 2, backward=True)
    assert fb[0] == 2 * flops[0] and tb[0] == pytest.approx(2 * t[0], rel=1e-9)


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
