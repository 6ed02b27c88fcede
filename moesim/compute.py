"""The GPU compute model: kernel times from FLOPs and bytes over a device's measured rates.

time = max(FLOPs / (rate * efficiency(size)), bytes / HBM bandwidth) + launches * overhead

`rate` is the device's measured peak for the operation (GEMM, grouped GEMM), `efficiency` a
size-dependent curve (log-linear interpolation between calibration points, clamped at both
ends) that captures how small GEMMs under-fill the GPU; memory-bound kernels (permute, combine)
run at the measured gather bandwidth. The numbers come from a CSV per GPU kind under
configs/calibration/ (`<gpu>.csv`, see h200.csv for the format).

Assumptions: a grouped GEMM's efficiency follows the *mean* FLOPs per non-empty group (tile
quantisation inside a group is ignored); GEMMs run alone on the GPU (no contention with
communication kernels for SMs or HBM); backward of a GEMM costs twice its forward (input and
weight gradients) at the same efficiency; elementwise ops (activation, router softmax) are
folded into their GEMM's memory traffic.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.errors import InputError

CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"
RATE_OPS = ("gemm", "grouped_gemm", "hbm", "gather")
CURVE_OPS = ("gemm", "grouped_gemm")


@dataclass(frozen=True)
class ComputeModel:
    gpu: str
    rates: dict[str, float]                            # FLOP/s or bytes/s per op
    curves: dict[str, tuple[np.ndarray, np.ndarray]]   # op -> (log10 size, efficiency)
    launch_overhead: float                             # seconds per kernel

    @classmethod
    def load(cls, gpu: str, path: str | Path | None = None) -> ComputeModel:
        """Read `configs/calibration/<gpu>.csv` (or `path`); InputError names what is wrong."""
        path = Path(path) if path else CALIBRATION_DIR / f"{gpu}.csv"
        src = str(path)
        if not path.exists():
            known = sorted(p.stem for p in CALIBRATION_DIR.glob("*.csv"))
            raise InputError(src, "cluster.gpu", f"no calibration for GPU kind {gpu!r}; "
                             f"known: {', '.join(known) or 'none'}")
        try:
            df = pd.read_csv(path, comment="#", dtype={"record": str, "op": str})
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise InputError(src, "file", f"not readable CSV: {e}") from None
        for col in ("record", "op", "size", "value"):
            if col not in df.columns:
                raise InputError(src, col, "missing column; need record, op, size, value")
        vals = pd.to_numeric(df["value"], errors="coerce")
        if vals.isna().any() or (vals <= 0).any():
            row = int(np.argmax((vals.isna() | (vals <= 0)).to_numpy()))
            raise InputError(src, f"value (row {row + 1})", "must be a positive number")
        rates, curves, overhead = {}, {}, None
        for op in RATE_OPS:
            sel = df[(df.record == "rate") & (df.op == op)]
            if len(sel) != 1:
                raise InputError(src, f"rate.{op}", "need exactly one row")
            rates[op] = float(sel.value.iloc[0])
        sel = df[(df.record == "overhead") & (df.op == "kernel")]
        if len(sel) != 1:
            raise InputError(src, "overhead.kernel", "need exactly one row")
        overhead = float(sel.value.iloc[0])
        for op in CURVE_OPS:
            sel = df[(df.record == "curve") & (df.op == op)]
            size = pd.to_numeric(sel["size"], errors="coerce").to_numpy(dtype=float)
            eff = sel.value.to_numpy(dtype=float)
            if len(sel) < 1 or np.isnan(size).any() or (size <= 0).any():
                raise InputError(src, f"curve.{op}", "need rows with positive sizes")
            if (eff > 1.0).any():
                raise InputError(src, f"curve.{op}", "efficiencies are fractions <= 1")
            order = np.argsort(size)
            if (np.diff(size[order]) <= 0).any():
                raise InputError(src, f"curve.{op}", "sizes must be distinct")
            curves[op] = (np.log10(size[order]), eff[order])
        bad = set(df.record) - {"rate", "overhead", "curve"}
        if bad:
            raise InputError(src, "record", f"unknown record {sorted(bad)[0]!r}")
        return cls(gpu, rates, curves, overhead)

    def efficiency(self, op: str, size: np.ndarray) -> np.ndarray:
        x, y = self.curves[op]
        return np.interp(np.log10(np.maximum(np.asarray(size, dtype=float), 1.0)), x, y)

    def gemm(self, m: np.ndarray, k: int, n: int, dtype_bytes: int,
             backward: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """[m x k] @ [k x n] per rank (m may be an array): (seconds, FLOPs). Backward is the
        input and weight gradient GEMMs: twice the FLOPs and launches."""
        m = np.asarray(m, dtype=np.float64)
        mult = 2 if backward else 1
        flops = 2.0 * m * k * n * mult
        eff = self.efficiency("gemm", 2.0 * m * k * n)
        byt = (m * k + k * n + m * n) * dtype_bytes * mult
        t = np.maximum(flops / (self.rates["gemm"] * eff), byt / self.rates["hbm"])
        t = np.where(m > 0, t + mult * self.launch_overhead, 0.0)
        return t, flops

    def expert_ffn(self, expert_tokens: np.ndarray, dim: int, ffn: int, dtype_bytes: int,
                   backward: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Gated-FFN experts as grouped GEMMs on each rank. `expert_tokens` int[N, E]: rows
        of each group. Forward 6 * tokens * dim * ffn FLOPs (up+gate and down), backward
        twice that; bytes: each non-empty expert's weights plus the activations in and out."""
        rows = np.asarray(expert_tokens, dtype=np.float64)
        mult = 2 if backward else 1
        tokens = rows.sum(axis=1)
        groups = (rows > 0).sum(axis=1)
        flops = 6.0 * tokens * dim * ffn * mult
        per_group = np.divide(flops / mult, groups, out=np.zeros_like(flops), where=groups > 0)
        eff = self.efficiency("grouped_gemm", per_group)
        byt = (groups * 3.0 * dim * ffn + tokens * (2 * dim + 3 * ffn)) * dtype_bytes * mult
        t = np.maximum(np.divide(flops, self.rates["grouped_gemm"] * eff,
                                 out=np.zeros_like(flops), where=eff > 0),
                       byt / self.rates["hbm"])
        # Two grouped GEMMs forward (up+gate, down), four backward.
        t = np.where(tokens > 0, t + 2 * mult * self.launch_overhead, 0.0)
        return t, flops

    def gather(self, nbytes: np.ndarray) -> np.ndarray:
        """A row gather/scatter (permute, unpermute, weighted combine) moving `nbytes` out:
        read and write, at the measured gather bandwidth."""
        b = np.asarray(nbytes, dtype=np.float64)
        return np.where(b > 0, 2.0 * b / self.rates["gather"] + self.launch_overhead, 0.0)
