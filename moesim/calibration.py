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
# The same for the 2-matrix GELU expert (model.expert_kind = "gelu"): its two grouped GEMMs
# (up dim x ffn, down ffn x dim; the activation is charged apart), forward and backward, size =
# the group's forward FLOPs (4 t dim ffn).
SHAPED_GELU = "grouped_gemm_gelu"
BACKWARD_GELU = "grouped_gemm_gelu_bwd"
# The fused GELU expert (kernels/fused_expert.py: both GEMMs and the GELU in one kernel, the
# hidden layer on chip), forward and its backward, size = the group's forward FLOPs (4 t dim
# ffn), at whole padded groups; activation included.
FUSED = "fused_expert"
FUSED_BWD = "fused_expert_bwd"
# The streaming top-k router (kernels/stream_router.py), op "router_stream@<dim>x<experts>",
# size = the logits' FLOPs of one call (2 items dim experts), value = fraction of the dense GEMM
# rate; its backward "router_stream_bwd@<dim>x<experts>" (same size).
ROUTER_STREAM = "router_stream"
ROUTER_STREAM_BWD = "router_stream_bwd"
# Every shaped curve family, and the weight matrices of the expert its FLOPs count.
SHAPED_FAMILIES = {SHAPED: 3, BACKWARD: 3, SHAPED_GELU: 2, BACKWARD_GELU: 2, FUSED: 2,
                   FUSED_BWD: 2, ROUTER_STREAM: 0, ROUTER_STREAM_BWD: 0}


def shape_of(op: str) -> tuple[int, int] | None:
    """(dim, ffn) of a "grouped_gemm@<dim>x<ffn>" curve name, None if malformed."""
    try:
        dim, ffn = op.split("@", 1)[1].lower().split("x")
        return int(dim), int(ffn)
    except ValueError:
        return None


def shaped_op(dim: int, ffn: int, family: str = SHAPED) -> str:
    """The curve name of `family` (grouped GEMMs by default) with experts of `dim` x `ffn`
    (for the router: `dim` x experts)."""
    return f"{family}@{dim}x{ffn}"


def family_of(op: str) -> str:
    """The family of a shaped curve name ("grouped_gemm_gelu@64x1024" -> "grouped_gemm_gelu")."""
    return op.split("@", 1)[0]
