"""The re-layout time model: what one FSEP layout costs each rank, in seconds, for one step of
one layer (forward and backward). Deliberately simple and linear so the ILP stays an ILP; the
simulator has the detailed model.

For rank r, with `x[e, r]` the share of expert e's tokens it runs and `y[e, r]` = 1 when it
materialises e:

    t_r = sum_e x[e, r] * w[e, r]  +  g * sum_e y[e, r]

    w[e, r] = L_e * a  +  (L_e - c[r, e]) * b
    a = 3 * 2 * expert_params / gemm_rate          (fwd GEMMs 2*P FLOPs a token, bwd twice that)
    b = 4 * expert_dim * dtype_bytes / a2a_rate    (fwd dispatch + combine, bwd both: the bytes
                                                    of a token-expert pair r receives or sends
                                                    back; rank r's own tokens stay local)
    g = p * expert_params * dtype_bytes * (N-1)/N / a2a_rate
                                                   (per replica: p = weight_passes exposed
                                                    shard transfers; the fwd gather is on the
                                                    critical path, the bwd gather and the grad
                                                    scatter overlap backward compute under
                                                    LAER-MoE's chunked scheduling, so p = 1 by
                                                    default and 3 with no overlap)

gemm_rate and a2a_rate come from planner.rates: the GPU kind's calibrated grouped-GEMM rate
at the layer's mean expert group (tokens per expert x 2P FLOPs) and the cluster's links for
an all-to-all over the N ranks (`Rates.a2a_rate`), unless PlannerConfig.gemm_tflops /
a2a_gbps set them.

L_e is expert e's tokens this step and c[r, e] those that come from rank r (a source's tokens
are split over replicas by share, so rank r receives x[e, r] * (L_e - c[r, e]) from others).
Assumptions: compute and communication of a rank add up (no overlap credit, a conservative
ceiling that ranks layouts the same way as long as the overlap fraction is similar); the
outgoing side of the all-to-alls is fixed by the routing and not by the layout, so it is left
out; every GPU has the same rates.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from moesim.config import ModelConfig, PlannerConfig
from moesim.errors import InputError
from planner.rates import Rates, planner_rates


@dataclass(frozen=True, eq=False)
class LayoutCost:
    """Coefficients of the time model for one (step, layer) and N ranks."""

    w: np.ndarray  # float64[E_total, N]: seconds for rank r to take all of expert e's tokens
    g: float  # seconds per replica a rank materialises
    load: np.ndarray  # int64[E_total]: tokens per expert

    @property
    def num_experts(self) -> int:
        return self.w.shape[0]

    @property
    def num_ranks(self) -> int:
        return self.w.shape[1]

    def rank_time(self, share: np.ndarray) -> np.ndarray:
        """float64[N]: t_r for a share matrix float[E_total, N] (replica where share > 0)."""
        return (share * self.w).sum(axis=0) + self.g * (share > 0).sum(axis=0)

    def mean_time_floor(self) -> float:
        """The mean of t_r in the best case: every expert once, tokens where cheapest. Used to
        normalise the ILP so its numbers are O(1)."""
        return float((self.w.min(axis=1).sum() + self.g * self.num_experts) / self.num_ranks)


def as_source_counts(counts: np.ndarray, num_ranks: int) -> np.ndarray:
    """Routing of one (step, layer) as int64[N, E_total]. Accepts [N, H, E], [N, E_total], or
    a load vector [E_total] (then sources are taken as even, c[r, e] = L_e / N)."""
    c = np.asarray(counts)
    if c.ndim == 1:
        return np.broadcast_to(c.astype(np.float64) / num_ranks, (num_ranks, len(c)))
    if c.ndim == 3:
        c = c.reshape(c.shape[0], -1)
    if c.ndim != 2 or c.shape[0] != num_ranks:
        raise InputError("counts", "shape", f"expected [N, H, E], [N, E_total] or [E_total] "
                         f"with N = {num_ranks}, got {list(np.shape(counts))}")
    if (c < 0).any():
        raise InputError("counts", "tokens", "counts must be >= 0")
    return c.astype(np.float64)


def layout_cost(model: ModelConfig, planner: PlannerConfig, counts: np.ndarray,
                num_ranks: int, rates: Rates | None = None) -> LayoutCost:
    """The time model's coefficients for routing `counts` (see `as_source_counts`), at
    `rates` (default: `planner_rates(None, planner)`, the default cluster's)."""
    c = as_source_counts(counts, num_ranks)
    load = c.sum(axis=0)
    rates = rates or planner_rates(None, planner)
    gemm = rates.gemm_rate(2.0 * model.expert_params * float(load.mean()))
    bw = rates.a2a_rate(num_ranks)
    a = 6.0 * model.expert_params / gemm
    b = 4.0 * model.expert_dim * model.dtype_bytes / bw
    shard_in = model.expert_params * model.dtype_bytes * (num_ranks - 1) / num_ranks
    g = planner.weight_passes * shard_in / bw
    w = load[:, None] * a + (load[:, None] - c.T) * b
    return LayoutCost(w=w, g=g, load=np.rint(load).astype(np.int64))
