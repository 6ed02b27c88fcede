"""planner.rates: the time model's rates from the calibration file and the cluster."""

from __future__ import annotations

import numpy as np
import pytest

from moesim.config import ClusterConfig, PlannerConfig
from moesim.errors import InputError
from planner.rates import planner_rates


def test_link_rates_closed_form():
    c = ClusterConfig(nodes=4, gpus_per_node=8, nvlink_gbs=300.0, nic_gbps=200.0,
                      bandwidth_efficiency=0.5)
    r = planner_rates(c)
    assert r.intra_bps == 150e9 and r.inter_bps == 12.5e9
    assert r.a2a_rate(8) == 150e9  # one node: NVLink only
    # 32 ranks: 7/31 of the bytes inside the node, 24/31 across, in parallel.
    assert np.isclose(r.a2a_rate(32), 1 / max(7 / 31 / 150e9, 24 / 31 / 12.5e9))
    assert r.link_rate(0, 7) == 150e9 and r.link_rate(7, 8) == 12.5e9


def test_gemm_rate_from_calibration(tmp_path):
    f = tmp_path / "x.csv"
    f.write_text("# a comment\nrecord,op,size,value\nrate,grouped_gemm,,5e14\n"
                 "curve,grouped_gemm,1e8,0.25\ncurve,grouped_gemm,1e10,1.0\n")
    r = planner_rates(ClusterConfig(), calibration=f)
    assert r.gemm_rate() == 5e14
    assert np.isclose(r.gemm_rate(1e9), 5e14 * 0.625)  # log-linear between the points
    assert r.gemm_rate(1e12) == 5e14 and r.gemm_rate(1.0) == 5e14 * 0.25  # clamped
    fixed = planner_rates(ClusterConfig(), PlannerConfig(gemm_tflops=100, a2a_gbps=50),
                          calibration=f)
    assert fixed.gemm_rate(1e9) == 1e14 and fixed.a2a_rate(64) == 50e9
    # The shipped H200 file: the calibrated rate, not a fixed default.
    assert planner_rates(ClusterConfig(gpu="h200")).gemm_flops == 609e12


def test_bad_calibration(tmp_path):
    f = tmp_path / "bad.csv"
    f.write_text("record,op,size,value\nrate,gemm,,1e14\n")
    with pytest.raises(InputError, match=r"rate\.grouped_gemm"):
        planner_rates(ClusterConfig(), calibration=f)
    with pytest.raises(InputError, match=r"cluster\.gpu"):
        planner_rates(ClusterConfig(gpu="nope"))
