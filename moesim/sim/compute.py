"""The GPU compute model: kernel times from FLOPs and bytes over a device's measured rates.

Every kernel is `launches * overhead + max(FLOPs / (rate * efficiency), bytes / bandwidth)`:
`rate` is the device's measured peak for the operation (GEMM, grouped GEMM), `efficiency` a
size-dependent curve (log-linear interpolation between calibration points, clamped at both
ends) that captures how small GEMMs under-fill the GPU; memory-bound kernels run at the
measured HBM or row-gather bandwidth. The numbers come from a CSV per GPU kind under
configs/calibration/ (`<gpu>.csv`, see h200.csv for the format; `moesim calibrate` writes it).

Models, and what each assumes:
- GEMM: one kernel, efficiency by its FLOPs (the square-GEMM curve: thin shapes are taken to
  behave like square ones of the same FLOPs).
- Grouped GEMM (the experts' gated FFN, `expert_ffn`): per group, not per mean. A group of m
  rows runs ceil(m / tile_m) row tiles, so it costs what a group of the padded size costs in
  the uniform-group calibration (the curve: efficiency of groups of that size, which already
  holds their own tile waste and weight reads); the groups' times add up. All groups' tiles
  share the SMs of one launch, so the sum is floored by the wave bound: ceil(tiles / SMs)
  waves of one tile each at the dense-GEMM peak, per GEMM. The floor binds when a launch has
  few waves (a few small groups: one 128-row group fills 11 of 132 SMs), which the
  many-group calibration cannot show; with many waves the curve's rate is below it. The
  GEMMs' bytes (every non-empty group's weights, the activations) are a roofline bound. The
  activation between the up and down GEMMs is its own memory-bound kernels, added (calibrate
  times the GEMMs without it; thin experts, e.g. HP's 512 x 704, spend a larger share there).
  A curve is measured at one expert shape. Curves of known shape (the plain one with `param
  curve_dim, curve_ffn`, extra ones as `grouped_gemm@<dim>x<ffn>`, `moesim calibrate
  --expert-shapes`) are looked up by rows per group at the exact, else the nearest, shape;
  a file whose curve has no shape (h200.csv's assumed one) by FLOPs per group. Shapes differ
  (measured on an H200: 512 x 704 experts run 15% below 4096 x 1408 ones at equal group
  FLOPs, and 3x above them at 2e9 FLOPs a group), so calibrate the model's shape. Backward
  (input and weight gradients, twice the FLOPs) runs on the measured backward curve of the
  nearest shape (`grouped_gemm_bwd@<dim>x<ffn>`) when the file has one, else costs twice the
  forward: thin experts' backward runs faster per FLOP than their forward (its weight
  gradient contracts over the group's rows). Ignored: the board's power state (sustained
  GEMMs run slower than GEMMs between memory-bound kernels; calibrate times them as in a
  step).
- Experts are SwiGLU (3 matrices) or the 2-matrix GELU expert of Multi-Head LatentMoE
  (`kind`, model.expert_kind): GELU experts have their own measured curves
  (`grouped_gemm_gelu@DxF`), else are looked up on the SwiGLU curves at the same rows; their
  activation is torch's one GELU kernel each way. HP's GELU experts (rows padded per group)
  take the fused expert kernel (`fused_expert_seconds`, kernels/fused_expert.py: both GEMMs
  and the GELU in one kernel, per-group padding to 64-row tiles) where its calibrated curve
  (`fused_expert@DxF`, `fused_expert_bwd@DxF`, nearest measured shape, activation included)
  is faster: the choice the runtime makes by measuring both. No fused curve, no fused kernel:
  nothing about thin experts is costed from a shape-free curve.
- Router (`router`): the logits GEMM, then softmax, top-k and the gate renormalisation as the
  separate small kernels they are (launches x overhead + bytes / HBM); or, where the file has
  the streaming router's curve (`router_stream@<dim>x<experts>`, its backward
  `router_stream_bwd@...`; kernels/stream_router.py: logits never written, top-k in
  registers) and it is faster, that kernel at its measured efficiency plus its launches.
- Permute (`permute`): a histogram of the expert ids, `sorts` stable sorts of the assignment
  keys (`sort`: a fixed cost per call + keys / sort rate, O(n) radix passes), the index-build
  passes, the row gather at the gather bandwidth, `syncs` device-to-host round trips
  (`overhead.sync`: EP's size exchange must bring the counts to the host for the all-to-all
  splits) and, after it, the host's work from the counts to the dispatch layout
  (`overhead.split`: the planner's splits and the index layout, which the GPU waits for). Its
  backward is the gather through the inverse permutation and the sum over the k copies of
  each token.
- Combine (`combine`): the fused weighted gather-reduce (k rows in, one row out per token).
- Regroup (`regroup`): EP/FSEP re-order received rows expert-major before the grouped GEMM and
  back after it: two row gathers.
- Local copy (`local_copy`): the block of an all-to-all a rank sends itself, a device-to-device
  copy (the HBM rate counts bytes read plus written, as calibrate measures a copy).

Ignored: host work between kernels (Python, numpy index building) beyond the launch
overhead, the syncs and the split named above, so the model is the GPU's time when the host
keeps it fed; contention with communication kernels for SMs or HBM; L2 reuse between
kernels; kernel fusion beyond what is listed. Bounded: the wave floor uses the dense-GEMM
peak (a lower bound).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.calibration import (
    BACKWARD,
    BACKWARD_GELU,
    CALIBRATION_DIR,
    CURVE_OPS,
    FUSED,
    FUSED_BWD,
    RATE_OPS,
    ROUTER_STREAM,
    ROUTER_STREAM_BWD,
    SHAPED,
    SHAPED_FAMILIES,
    SHAPED_GELU,
    family_of,
    shape_of,
)
from moesim.config import EXPERT_MATRICES
from moesim.errors import InputError

RECORDS = ("rate", "overhead", "curve", "param")
# Optional rows and the values assumed when a file lacks them (files written before they
# existed stay readable). Params: the GPU's SM count and the grouped GEMM's output tile.
PARAM_DEFAULTS = {"sms": 132.0, "tile_m": 128.0, "tile_n": 256.0}
# An LSD radix sort of int64 keys with int64 indices (torch.argsort on CUDA): 8 passes of 8
# bits, each reading and writing key and index (32 bytes), plus the histogram pass (8).
SORT_BYTES_PER_KEY = 8 * 32 + 8
# Kernels of one sort call when no measured fixed cost is given (iota, histogram, scan and
# the 8 passes land around this many launches).
SORT_LAUNCHES = 10
# Launches and elements per token and ffn unit that the gated activation silu(h[:, :f]) *
# h[:, f:] moves between the two GEMMs, forward and backward, by implementation
# (model.activation):
# - "unfused", torch ops: read the gate half and write silu (2), read both and write the
#   product (3); the backward runs the two ops' backward kernels (twice the traffic).
# - "kernel", one fused kernel each way (kernels/swiglu.py, what runtime/ runs on the GPU):
#   read h, write the product (2 + 1); backward read h and the output gradient, write dh
#   (2 + 1 + 2).
# - "fused", in the up GEMM's epilogue: no extra kernel or traffic.
# Thin experts with a wide hidden layer (64 x 5632 in the 4-node Multi-Head LatentMoE preset)
# are bound by this traffic, not by their FLOPs.
# The 2-matrix GELU expert's activation is torch's one elementwise kernel each way, fused or
# not: read h, write gelu(h) (1 + 1); backward read h and the gradient, write dh (1 + 1 + 1).
ACTIVATION = {"unfused": ((2, 5), (4, 10)), "kernel": ((1, 3), (1, 5)), "fused": ((0, 0), (0, 0))}
ACTIVATION_GELU = {"unfused": ((1, 2), (1, 3)), "kernel": ((1, 2), (1, 3)),
                   "fused": ((0, 0), (0, 0))}
# The fused GELU expert kernel runs only for thin experts (kernels/fused_expert.py: the expert
# input width, a head's, is one register tile) and pads each group to whole row tiles.
FUSED_MAX_DIM = 256
FUSED_TILE_M = 64
# A device-to-host round trip (a read of a count or a size), when no measured one is given.
SYNC_SECONDS = 20e-6
# Host time from the size exchange's counts to the dispatch's first kernel (the planner's
# integer splits and the send/receive layout, runtime.dispatch), when no measured one is
# given: 0.2 ms, what the dev box's CPU takes for 64 experts on one rank.
SPLIT_SECONDS = 200e-6


@dataclass(frozen=True)
class ComputeModel:
    gpu: str
    rates: dict[str, float]                            # FLOP/s, bytes/s or keys/s per op
    curves: dict[str, tuple[np.ndarray, np.ndarray]]   # op -> (log10 size, efficiency)
    launch_overhead: float                             # seconds per kernel
    params: dict[str, float] = field(default_factory=lambda: dict(PARAM_DEFAULTS))
    sort_overhead: float | None = None                 # seconds per sort call (None: launches)
    sync_overhead: float = SYNC_SECONDS                # seconds per device-to-host round trip
    split_overhead: float = SPLIT_SECONDS              # host seconds from counts to dispatch
    defaulted: tuple[str, ...] = ()                    # rows the file lacked, defaults used
    curve_shape: tuple[int, int] | None = None         # (dim, ffn) the plain grouped curve had

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
        bad = set(df.record) - set(RECORDS)
        if bad:
            raise InputError(src, "record", f"unknown record {sorted(bad)[0]!r}")

        def one(record: str, op: str, required: bool) -> float | None:
            sel = df[(df.record == record) & (df.op == op)]
            if len(sel) > 1 or (required and len(sel) != 1):
                raise InputError(src, f"{record}.{op}", "need exactly one row")
            return float(sel.value.iloc[0]) if len(sel) else None

        rates = {op: one("rate", op, True) for op in RATE_OPS}
        overhead = one("overhead", "kernel", True)
        defaulted = []
        sort = one("rate", "sort", False)
        if sort is None:
            sort = rates["hbm"] / SORT_BYTES_PER_KEY
            defaulted.append("rate.sort")
        rates["sort"] = sort
        sort_overhead = one("overhead", "sort", False)
        if sort_overhead is None:
            defaulted.append("overhead.sort")
        sync = one("overhead", "sync", False)
        if sync is None:
            sync = SYNC_SECONDS
            defaulted.append("overhead.sync")
        split = one("overhead", "split", False)
        if split is None:
            split = SPLIT_SECONDS
            defaulted.append("overhead.split")
        params = {}
        for name, default in PARAM_DEFAULTS.items():
            v = one("param", name, False)
            if v is None:
                defaulted.append(f"param.{name}")
            elif v != round(v):
                raise InputError(src, f"param.{name}", "must be a whole number")
            params[name] = default if v is None else v
        shape = [one("param", name, False) for name in ("curve_dim", "curve_ffn")]
        if (shape[0] is None) != (shape[1] is None):
            raise InputError(src, "param.curve_dim", "give both curve_dim and curve_ffn")
        curve_shape = None if shape[0] is None else (int(shape[0]), int(shape[1]))
        curves = {}
        shaped = sorted({op for op in df.op[df.record == "curve"] if "@" in op})
        for op in shaped:
            if family_of(op) not in SHAPED_FAMILIES or shape_of(op) is None:
                raise InputError(src, f"curve.{op}", f"name the shape as <family>@<dim>x<ffn> "
                                 f"with a family of {', '.join(SHAPED_FAMILIES)}, e.g. "
                                 f"{SHAPED}@512x704")
        for op in (*CURVE_OPS, *shaped):
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
        return cls(gpu, rates, curves, overhead, params, sort_overhead, sync, split,
                   tuple(defaulted), curve_shape)

    def efficiency(self, op: str, size: np.ndarray) -> np.ndarray:
        x, y = self.curves[op]
        return np.interp(np.log10(np.maximum(np.asarray(size, dtype=float), 1.0)), x, y)

    def _kernels(self, work: np.ndarray, launches: float, nbytes: np.ndarray,
                 rate: str = "hbm") -> np.ndarray:
        """`launches` memory-bound kernels moving `nbytes` in all, where `work` > 0."""
        t = launches * self.launch_overhead + np.asarray(nbytes, dtype=float) / self.rates[rate]
        return np.where(np.asarray(work) > 0, t, 0.0)

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

    def _grouped_curve(self, dim: int, ffn: int) -> tuple[str, int, int]:
        """(curve, dim, ffn at which to look a group up) for experts of dim x ffn. A curve of
        known shape is looked up at the group's rows (FLOPs of that many rows at the curve's
        shape): a padded group then lands on whole-tile calibration points, never on the
        sub-tile ones that carry tile waste already. The exact shape if measured; else the
        nearest (log distance) if the plain curve's shape is known, else the plain curve by
        the group's FLOPs (h200.csv's assumed curve)."""
        shapes = {shape_of(op): op for op in self.curves if op.startswith(f"{SHAPED}@")}
        if (dim, ffn) in shapes:
            return shapes[(dim, ffn)], dim, ffn
        if self.curve_shape is None:
            return SHAPED, dim, ffn
        shapes.setdefault(self.curve_shape, SHAPED)
        near = min(shapes, key=lambda s: (abs(np.log(s[0] / dim)) + abs(np.log(s[1] / ffn)),
                                          s))
        return shapes[near], near[0], near[1]

    def _nearest(self, family: str, dim: int, ffn: int) -> tuple[str, int, int] | None:
        """The measured curve of `family` at dim x ffn: the exact shape, else the nearest
        measured one (log distance); None when the file has none of that family."""
        shapes = {shape_of(op): op for op in self.curves if family_of(op) == family}
        if not shapes:
            return None
        near = min(shapes, key=lambda s: (abs(np.log(s[0] / dim)) + abs(np.log(s[1] / ffn)),
                                          s))
        return shapes[near], near[0], near[1]

    def _backward_curve(self, dim: int, ffn: int) -> tuple[str, int, int] | None:
        """The measured SwiGLU backward curve for experts of dim x ffn (`_nearest`)."""
        return self._nearest(BACKWARD, dim, ffn)

    def grouped_gemm_seconds(self, rows: np.ndarray, dim: int, ffn: int,
                             backward: bool = False, kind: str = "swiglu") -> np.ndarray:
        """Compute time of one expert FFN's grouped GEMMs over groups (`rows` [..., G] rows
        per group), launches, activation and the bytes bound excluded: max(sum over groups of
        the padded group's calibrated time, the wave floor of the up and the down GEMM:
        ceil(tiles / SMs) waves of one tile per SM at the dense-GEMM peak). Backward (twice
        the FLOPs) on the measured backward curve of the shape (`grouped_gemm_bwd@...`), else
        twice the forward. GELU experts (`kind`) use their own curves
        (`grouped_gemm_gelu@...`, `..._bwd@...`, nearest shape); a file without them looks a
        group up on the SwiGLU curves at the same rows (an approximation: its up GEMM is half
        as wide)."""
        rows = np.asarray(rows, dtype=np.float64)
        mats = EXPERT_MATRICES[kind]
        if kind == "gelu":
            fam = self._nearest(BACKWARD_GELU if backward else SHAPED_GELU, dim, ffn)
            if fam is None and backward and self._nearest(SHAPED_GELU, dim, ffn) is not None:
                return 2.0 * self.grouped_gemm_seconds(rows, dim, ffn, kind=kind)
            curve = fam
        else:
            curve = None
        if curve is None:
            bwd_curve = self._backward_curve(dim, ffn) if backward else None
            if backward and bwd_curve is None:
                return 2.0 * self.grouped_gemm_seconds(rows, dim, ffn, kind=kind)
            curve = bwd_curve or self._grouped_curve(dim, ffn)
        op, cdim, cffn = curve
        cmats = SHAPED_FAMILIES.get(family_of(op), 3) if "@" in op else 3
        tm, tn, sms = (self.params[k] for k in ("tile_m", "tile_n", "sms"))
        rate = self.rates["grouped_gemm"] / (2.0 if backward else 1.0)
        # The floor's tiles run at the dense-GEMM peak: no tile goes faster, so the floor is a
        # true lower bound and stays below the calibrated many-wave points it must reproduce.
        tile_rate = self.rates["gemm"] / sms
        row_tiles = np.ceil(rows / tm)
        padded_flops = 2.0 * mats * row_tiles * tm * dim * ffn
        eff = self.efficiency(op, 2.0 * cmats * row_tiles * tm * cdim * cffn)
        per_group = np.divide(padded_flops, rate * eff, out=np.zeros_like(padded_flops),
                              where=padded_flops > 0)
        tiles = row_tiles.sum(axis=-1)
        floor = np.zeros_like(tiles)
        for n, k in (((mats - 1) * ffn, dim), (dim, ffn)):  # up (+gate), then down
            waves = np.ceil(tiles * np.ceil(n / tn) / sms)
            floor = floor + waves * 2.0 * tm * tn * k / tile_rate
        return np.maximum(per_group.sum(axis=-1), floor * (2.0 if backward else 1.0))

    def fused_expert_seconds(self, rows: np.ndarray, dim: int, ffn: int,
                             backward: bool = False) -> np.ndarray | None:
        """The fused GELU expert kernel (kernels/fused_expert.py) over groups `rows` [..., G]:
        each group padded to whole FUSED_TILE_M-row tiles, at the measured efficiency of the
        nearest calibrated shape (`fused_expert@...`, `fused_expert_bwd@...`), launches
        included. None where the file has no such curve or the experts are too wide for it."""
        near = self._nearest(FUSED_BWD if backward else FUSED, dim, ffn)
        if near is None or dim > FUSED_MAX_DIM:
            return None
        op, cdim, cffn = near
        rows = np.asarray(rows, dtype=np.float64)
        padded = np.ceil(rows / FUSED_TILE_M) * FUSED_TILE_M
        flops = 4.0 * padded * dim * ffn * (2.0 if backward else 1.0)
        eff = self.efficiency(op, 4.0 * padded * cdim * cffn)
        rate = self.rates["grouped_gemm"]
        t = np.divide(flops, rate * eff, out=np.zeros_like(flops), where=flops > 0).sum(axis=-1)
        launches = 2 if backward else 1
        return np.where(rows.sum(axis=-1) > 0, t + launches * self.launch_overhead, 0.0)

    def expert_ffn(self, expert_tokens: np.ndarray, dim: int, ffn: int, dtype_bytes: int,
                   backward: bool = False, activation: str = "kernel", kind: str = "swiglu",
                   fused_ok: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """The experts on each rank (SwiGLU or GELU, `kind`): the up (+gate) and the down
        grouped GEMMs, and the activation between them. `expert_tokens` int[N, E]: rows of
        each group. Forward 2 x (weights of an expert) FLOPs per row, backward twice that.
        GEMMs: compute time per group (`grouped_gemm_seconds`), bounded below by their bytes
        (each non-empty expert's weights, the activations in and out of each GEMM).
        Activation: memory-bound kernels whose launches and traffic depend on how it is
        implemented (`activation`, see ACTIVATION / ACTIVATION_GELU: torch ops, one fused
        kernel each way, or the GEMM epilogue). With `fused_ok` (HP, whose rows come padded
        per group) and `activation` "kernel", GELU experts take the fused expert kernel where
        its calibrated forward + backward is lower, per rank (runtime.kernels_bridge picks by
        measured forward + backward the same way)."""
        rows = np.asarray(expert_tokens, dtype=np.float64)
        mult = 2 if backward else 1
        mats = EXPERT_MATRICES[kind]
        tokens = rows.sum(axis=1)
        groups = (rows > 0).sum(axis=1)
        flops = 2.0 * mats * tokens * dim * ffn * mult
        up = (mats - 1) * ffn
        byt = (groups * mats * dim * ffn + tokens * (2 * dim + up + ffn)) * dtype_bytes * mult
        t = np.maximum(self.grouped_gemm_seconds(rows, dim, ffn, backward, kind),
                       byt / self.rates["hbm"])
        # Two grouped GEMMs forward (up+gate, down), four backward.
        t = np.where(tokens > 0, t + 2 * mult * self.launch_overhead, 0.0)
        table = ACTIVATION_GELU if kind == "gelu" else ACTIVATION
        launches, elements = table[activation][1 if backward else 0]
        if launches:
            t = t + self._kernels(tokens, launches, elements * tokens * ffn * dtype_bytes)
        if fused_ok and kind == "gelu" and activation == "kernel":
            tf = self.fused_expert_seconds(rows, dim, ffn, backward)
            if tf is not None:
                # One choice for both passes, as the runtime's (it times forward + backward
                # together; the fused backward needs the fused forward's inputs only).
                other = self.expert_ffn(rows, dim, ffn, dtype_bytes, not backward, activation,
                                        kind, fused_ok=False)[0]
                tf_other = self.fused_expert_seconds(rows, dim, ffn, not backward)
                t = np.where(tf + tf_other < t + other, tf, t)
        return t, flops

    def gather(self, nbytes: np.ndarray) -> np.ndarray:
        """A row gather/scatter moving `nbytes` out: read and write, at the measured gather
        bandwidth, one launch."""
        b = np.asarray(nbytes, dtype=np.float64)
        return np.where(b > 0, 2.0 * b / self.rates["gather"] + self.launch_overhead, 0.0)

    def sort(self, keys: np.ndarray) -> np.ndarray:
        """One stable argsort of `keys` int64 keys: a fixed cost per call (measured, or
        SORT_LAUNCHES launches) plus keys / sort rate (O(n): radix passes over the keys)."""
        n = np.asarray(keys, dtype=np.float64)
        fixed = (self.sort_overhead if self.sort_overhead is not None
                 else SORT_LAUNCHES * self.launch_overhead)
        return np.where(n > 0, fixed + n / self.rates["sort"], 0.0)

    # Router kernels after the logits GEMM (all heads in one batched GEMM), as (launches,
    # bytes per item as a function of experts E and top-k): fp32 cast of the logits, softmax,
    # top-k, the renormalisation's sum and divide, and the heads' expert offsets (arange,
    # multiply, add) (runtime.routing.route).
    ROUTER_FWD = (8, lambda e, k: 6 * e + 8 * e + (4 * e + 12 * k) + (16 * k + 8) + 24 * k)
    # Forced routing (a benchmark's synthetic trace) chooses instead of top-k: the counts'
    # upload, the expansion (two kernels) and its layout copy, then a gather of the chosen
    # scores in top-k's place.
    FORCED_EXTRA_LAUNCHES = 4
    # Backward: renormalisation (3), top-k's scatter into zeros (2), softmax (1), cast (1).
    ROUTER_BWD = (7, lambda e, k: 24 * k + (4 * e + 12 * k) + 12 * e + 6 * e)

    # The streaming router (kernels/stream_router.py): one kernel forward (logits tile by
    # tile, top-k in registers, gates), then the heads' expert offsets (3 launches); backward
    # the gather kernel for the input gradient, the weight-gradient kernel and the sum of its
    # per-program partials (3 launches).
    STREAM_FWD_LAUNCHES = 4
    STREAM_BWD_LAUNCHES = 3

    def router_stream_seconds(self, items: np.ndarray, dim: int, experts: int,
                              backward: bool = False, forced: bool = False) -> np.ndarray | None:
        """The streaming top-k router over `items` per rank at the measured efficiency of the
        nearest calibrated shape (`router_stream@<dim>x<experts>`, size = the logits' FLOPs);
        None where the file has no such curve."""
        near = self._nearest(ROUTER_STREAM_BWD if backward else ROUTER_STREAM, dim, experts)
        if near is None:
            return None
        op, cdim, cexp = near
        n = np.asarray(items, dtype=np.float64)
        flops = 2.0 * n * dim * experts
        eff = self.efficiency(op, 2.0 * n * cdim * cexp)
        t = np.divide(flops, self.rates["gemm"] * eff, out=np.zeros_like(flops),
                      where=flops > 0)
        launches = self.STREAM_BWD_LAUNCHES if backward else self.STREAM_FWD_LAUNCHES
        if forced and not backward:
            launches += self.FORCED_EXTRA_LAUNCHES
        return np.where(n > 0, t + launches * self.launch_overhead, 0.0)

    def router(self, items: np.ndarray, dim: int, experts: int, top_k: int,
               dtype_bytes: int, backward: bool = False, forced: bool = False,
               stream_ok: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Routing of `items` (sub-)tokens per rank: the logits GEMM [items x dim] @ [dim x
        experts] (`gemm`), then the small kernels of ROUTER_FWD / ROUTER_BWD (and, `forced`,
        FORCED_EXTRA_LAUNCHES); or, with `stream_ok` (run.kernels "auto") and dim <= 256, the
        streaming router where the file has its curve and it is faster (runtime.kernels_bridge
        picks the faster the same way, by measurement)."""
        n = np.asarray(items, dtype=np.float64)
        t, flops = self.gemm(n, dim, experts, dtype_bytes, backward)
        launches, per_item = self.ROUTER_BWD if backward else self.ROUTER_FWD
        if forced and not backward:
            launches += self.FORCED_EXTRA_LAUNCHES
        t = t + self._kernels(n, launches, n * per_item(experts, top_k))
        stream = (self.router_stream_seconds(n, dim, experts, backward, forced)
                  if stream_ok and dim <= FUSED_MAX_DIM else None)
        if stream is None:
            return t, flops
        # One choice for both passes, as the runtime's (timed forward + backward together).
        other = self.router(n, dim, experts, top_k, dtype_bytes, not backward, forced,
                            stream_ok=False)[0]
        stream_other = self.router_stream_seconds(n, dim, experts, not backward, forced)
        if stream_other is None:
            return t, flops
        return np.where(stream + stream_other < t + other, stream, t), flops

    def permute(self, assignments: np.ndarray, row_bytes: int, top_k: int, sorts: int = 1,
                syncs: int = 1, splits: int = 0, backward: bool = False) -> np.ndarray:
        """Permute of `assignments` (token, expert) pairs per rank, each a row of `row_bytes`.
        Forward: histogram of the expert ids (cast + histogram), `sorts` stable sorts of the
        int64 keys, four index-build passes over int64 (repeat, key, take, divide by k), the
        row gather, `syncs` device-to-host round trips and `splits` times the host work from
        exchanged counts to the dispatch layout. The GPU waits for that host work (it follows
        the sync), and the sorts and index passes come after it (the layout's arrays are
        built on the host first, runtime.dispatch). Backward: the inverse permutation (two
        launches over int64) and one fused gather-reduce (kernels.combine: A rows in, A / k
        out, at HBM speed); no sync."""
        a = np.asarray(assignments, dtype=np.float64)
        if backward:
            return (self._kernels(a, 2, 24.0 * a)
                    + self._kernels(a, 1, a * row_bytes * (1.0 + 1.0 / top_k)))
        return (self._kernels(a, 2, 8.0 * a) + sorts * self.sort(a)
                + self._kernels(a, 4, 4 * 16.0 * a) + self.gather(a * row_bytes)
                + np.where(a > 0, syncs * self.sync_overhead + splits * self.split_overhead,
                           0.0))

    def combine(self, assignments: np.ndarray, row_bytes: int, top_k: int,
                backward: bool = False) -> np.ndarray:
        """The weighted combine (unpermute) of `assignments` rows into assignments / top_k
        tokens, one fused gather-reduce (kernels/combine.py). Forward: the inverse
        permutation and its int32 copy (3 launches, 40 bytes per row of indices and gates),
        then k rows in and one out per token at HBM speed (the kernel streams whole rows:
        99.6% of the copy rate on an H200, docs/benchmarks.md). Backward: one fused kernel
        (and its output allocation) reading the token gradient and the k rows (for the gate
        gradients) and writing the k row gradients."""
        a = np.asarray(assignments, dtype=np.float64)
        n = a / top_k
        if backward:
            return self._kernels(a, 2, (2 * a + n) * row_bytes)
        return self._kernels(a, 3, 40.0 * a) + self._kernels(a, 1, (a + n) * row_bytes)

    def duplicate(self, tokens: np.ndarray, row_bytes: int, top_k: int,
                  backward: bool = False) -> np.ndarray:
        """The paper EP's token duplication before its permute (moe_ep.py: expand + contiguous):
        read each of `tokens` rows once, write it k times, one launch; backward the sum of the
        k copies' gradients (read k rows, write one)."""
        t = np.asarray(tokens, dtype=np.float64)
        return self._kernels(t, 1, t * row_bytes * (1 + top_k))

    def combine_unfused(self, assignments: np.ndarray, row_bytes: int, top_k: int,
                        backward: bool = False) -> np.ndarray:
        """The paper EP's combine as separate torch ops (moe_ep.py: unpermute, then the weighted
        sum in fp32): the inverse permutation (2 launches over int64), the rows gathered back
        (read and write a row), cast to fp32 (read a row, write two row-widths), times the gates
        (read two, write two), summed over k (read two, write 2/k), cast back (3/k): 11 + 5/k
        row-widths per assignment in 5 launches. Backward, their gradients, taken as the same
        traffic in 7 launches (cast, broadcast-multiply, the gates' reduction, cast, the
        gather's scatter and its zero fill)."""
        a = np.asarray(assignments, dtype=np.float64)
        widths = 11.0 + 5.0 / top_k
        if backward:
            return self._kernels(a, 7, a * widths * row_bytes)
        return self._kernels(a, 2, 24.0 * a) + self._kernels(a, 5, a * widths * row_bytes)

    def regroup(self, rows: np.ndarray, row_bytes: int) -> np.ndarray:
        """EP/FSEP: received rows arrive source-major; the grouped GEMM wants them expert-major
        and the combine wants them back: two row gathers and the inverse permutation between
        them (two launches over int64). The same in backward (gathers through the inverses)."""
        r = np.asarray(rows, dtype=np.float64)
        return 2 * self.gather(r * row_bytes) + self._kernels(r, 2, 24.0 * r)

    def local_copy(self, nbytes: np.ndarray) -> np.ndarray:
        """The block of an all-to-all a rank sends itself: a device-to-device copy of `nbytes`.
        The HBM rate counts bytes read plus written (calibrate times a copy that way), so the
        copy takes 2 * nbytes / rate. No launch: it runs inside the collective's kernel."""
        return 2.0 * np.asarray(nbytes, dtype=np.float64) / self.rates["hbm"]
