"""The calibration CSV's vocabulary, shared by who writes it (`moesim calibrate`,
runtime.calibrate) and who reads it (moesim.sim.compute): where the files live and how the
grouped GEMM curves measured at an expert shape are named."""

from __future__ import annotations

from pathlib import Path

CALIBRATION_DIR = Path(__file__).resolve().parents[1] / "configs" / "calibration"
RATE_OPS = ("gemm", "grouped_gemm", "hbm", "gather")
CURVE_OPS = ("gemm", "grouped_gemm")
# Grouped GEMM curves measured at a given expert shape: op "grouped_gemm@<dim>x<ffn>". An
# expert of that shape uses its own curve, any other the plain "grouped_gemm" one.
SHAPED = "grouped_gemm"
# Their backward (input and weight gradients, twice the forward's FLOPs), measured at a shape:
# op "grouped_gemm_bwd@<dim>x<ffn>", size = the group's forward FLOPs. Without one the backward
# costs twice the forward.
BACKWARD = "grouped_gemm_bwd"


def shape_of(op: str) -> tuple[int, int] | None:
    """(dim, ffn) of a "grouped_gemm@<dim>x<ffn>" curve name, None if malformed."""
    try:
        dim, ffn = op.split("@", 1)[1].lower().split("x")
        return int(dim), int(ffn)
    except ValueError:
        return None


def shaped_op(dim: int, ffn: int) -> str:
    """The curve name of grouped GEMMs with experts of `dim` x `ffn`."""
    return f"{SHAPED}@{dim}x{ffn}"
