"""IO-aware Triton kernels for the MoE runtime, each beside its pure-torch reference.

- ``kernels.router.route``: fused scores, top-k, renormalisation, per-expert counts
  (single router ``[T, E]`` or Multi-Head LatentMoE ``[T, H, E]``).
- ``kernels.permute.permute``: token rows into expert- (or rank-) contiguous order.
- ``kernels.combine.combine`` / ``unpermute``: weighted sum of expert rows back to tokens.
- ``kernels.grouped_gemm.grouped_mm``: variable-size grouped GEMM, forward and backward.
- ``kernels.swiglu.swiglu``: the expert FFN's SwiGLU activation, forward and backward fused.
- ``kernels.fused_expert.fused_expert``: thin GELU experts over (head, expert) row groups,
  both GEMMs and the GELU in one kernel (the hidden layer never reaches memory).
- ``kernels.stream_router.stream_route``: streaming top-k router for many heads (the
  ``[items x experts]`` logits never reach memory; aux-loss-free bias before the top-k).

Each public function takes the Triton kernel on CUDA tensors (and on CPU under
``TRITON_INTERPRET=1``) and the torch reference otherwise; see ``kernels.backend``.
"""

from kernels.combine import combine, combine_reference, unpermute
from kernels.fused_expert import FusedExpertConfig, fused_expert, fused_expert_reference
from kernels.grouped_gemm import grouped_mm, grouped_mm_reference
from kernels.permute import Permuted, permute, permute_reference
from kernels.router import Route, route, route_reference
from kernels.stream_router import RouterConfig, stream_route, stream_route_reference
from kernels.swiglu import swiglu, swiglu_reference

__all__ = [
    "FusedExpertConfig",
    "Permuted",
    "Route",
    "RouterConfig",
    "combine",
    "combine_reference",
    "fused_expert",
    "fused_expert_reference",
    "grouped_mm",
    "grouped_mm_reference",
    "permute",
    "permute_reference",
    "route",
    "route_reference",
    "stream_route",
    "stream_route_reference",
    "swiglu",
    "swiglu_reference",
    "unpermute",
]
