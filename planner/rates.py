"""The rates behind the planner's time models (planner.cost, planner.laer): how fast a GPU runs
the experts' grouped GEMMs and how fast it moves all-to-all bytes, taken from the GPU kind's
calibration file and the cluster, not from fixed numbers.

- GEMM: the calibrated grouped-GEMM rate (`rate,grouped_gemm` of configs/calibration/
  <cluster.gpu>.csv, the file the simulator's compute model reads: moesim.calibration names
  it), times the calibrated efficiency of the plain `grouped_gemm` curve at a given group
  size when the file has that curve (log-linear between points, clamped at both ends, as
  moesim.sim.compute does it). The planner reads the CSV itself: planner/ may not import
  moesim.sim.
- Links: NVLink `cluster.nvlink_gbs` each way inside a node; between nodes the GPU's NIC,
  `cluster.nic_gbps / 8` (rail-optimised: one NIC a GPU) divided by the fabric's
  `oversubscription`; both times `cluster.bandwidth_efficiency`. An all-to-all over N ranks
  laid on nodes of G GPUs sends (G - 1)/(N - 1) of its bytes inside the node and the rest
  across, both at once, so a GPU moves B bytes in max(B_intra / nvlink, B_inter / nic):
  `a2a_rate(N)` is B over that time.
What this ignores: latency and message-size effects, contention beyond the per-GPU links, and
the shape of a particular topology file (the planner reads the cluster section's numbers).
`PlannerConfig.gemm_tflops` / `a2a_gbps` > 0 override either rate (a stated assumption).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from moesim.calibration import CALIBRATION_DIR, SHAPED
from moesim.config import ClusterConfig, PlannerConfig
from moesim.errors import InputError


@dataclass(frozen=True)
class Rates:
    """Per-GPU rates: FLOP/s of the grouped GEMM at full efficiency, bytes/s each way."""

    gemm_flops: float
    intra_bps: float  # bytes per second, NVLink inside a node
    inter_bps: float  # bytes per second, the GPU's share of the fabric
    gpus_per_node: int
    curve: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # log10 FLOPs, eff.
    a2a_override: float = 0.0  # bytes/s: PlannerConfig.a2a_gbps when set

    def gemm_rate(self, group_flops: float | None = None) -> float:
        """FLOP/s of one expert group of `group_flops` (the peak without a size or curve)."""
        if group_flops is None or self.curve is None:
            return self.gemm_flops
        x, y = self.curve
        return self.gemm_flops * float(np.interp(np.log10(max(group_flops, 1.0)), x, y))

    def a2a_rate(self, num_ranks: int) -> float:
        """Bytes/s a GPU sends (and receives) in an even all-to-all over `num_ranks` ranks
        laid node by node."""
        if self.a2a_override:
            return self.a2a_override
        n, g = num_ranks, self.gpus_per_node
        if n <= 1:
            return self.intra_bps
        local = min(n, g)
        intra = (local - 1) / (n - 1)
        inter = (n - local) / (n - 1)
        return 1.0 / max(intra / self.intra_bps, inter / self.inter_bps)

    def link_rate(self, src: int, dst: int) -> float:
        """Bytes/s between two ranks: NVLink inside a node, the fabric between nodes."""
        g = self.gpus_per_node
        return self.intra_bps if src // g == dst // g else self.inter_bps


@lru_cache(maxsize=16)
def _calibration(path: str) -> tuple[float, tuple | None]:
    """(grouped GEMM rate, plain grouped_gemm curve or None) of a calibration CSV."""
    src = Path(path)
    if not src.exists():
        known = sorted(p.stem for p in CALIBRATION_DIR.glob("*.csv"))
        raise InputError(path, "cluster.gpu", f"no calibration for this GPU kind; known: "
                         f"{', '.join(known) or 'none'}")
    rate = None
    pts: list[tuple[float, float]] = []
    with src.open(newline="") as f:
        rows = csv.reader(line for line in f if not line.lstrip().startswith("#"))
        header = next(rows, None)
        if header is None or header[:4] != ["record", "op", "size", "value"]:
            raise InputError(path, "file", "need the columns record, op, size, value")
        for row in rows:
            if len(row) < 4:
                continue
            record, op, size, value = row[:4]
            try:
                if record == "rate" and op == "grouped_gemm":
                    rate = float(value)
                elif record == "curve" and op == SHAPED:
                    pts.append((float(size), float(value)))
            except ValueError:
                raise InputError(path, f"{record}.{op}", f"not a number: {value!r}") from None
    if rate is None or not rate > 0:
        raise InputError(path, "rate.grouped_gemm", "missing or not positive")
    curve = None
    if pts:
        pts.sort()
        curve = (tuple(np.log10([p[0] for p in pts])), tuple(p[1] for p in pts))
    return rate, curve


def planner_rates(cluster: ClusterConfig | None = None, planner: PlannerConfig | None = None,
                  calibration: str | Path | None = None) -> Rates:
    """The planner's rates for `cluster` (default: the default cluster) from its GPU's
    calibration file (or `calibration`), with `planner`'s explicit overrides."""
    cluster = cluster or ClusterConfig()
    planner = planner or PlannerConfig()
    path = Path(calibration) if calibration else CALIBRATION_DIR / f"{cluster.gpu}.csv"
    if planner.gemm_tflops > 0:
        rate, curve = planner.gemm_tflops * 1e12, None
    else:
        rate, curve = _calibration(str(path))
    eff = cluster.bandwidth_efficiency
    intra = cluster.nvlink_gbs * 1e9 * eff
    inter = cluster.nic_gbps / 8 * 1e9 * eff / cluster.oversubscription
    return Rates(rate, intra, inter, cluster.gpus_per_node, curve,
                 planner.a2a_gbps * 1e9 if planner.a2a_gbps > 0 else 0.0)
