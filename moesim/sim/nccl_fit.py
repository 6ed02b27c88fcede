"""Fit the "nccl" network model's terms to measured collective times.

A measured point is a collective of `size` bytes (nccl-tests conventions, see
`moesim.sim.nccl_tests`) on a cluster config, with its time; or an all-to-all of an explicit
byte matrix (MoE dispatch kernels). `PointSimulator` times it under given terms; `fit` finds the
free terms (link-class efficiency, half-saturation size, exponent; NCCL's latency scale; launch
costs per named group of points) that minimise the squared log-ratio of simulated to measured
time over the points marked for fitting, by bounded least squares (scipy's trust-region
reflective method). Deterministic: a fixed start, no random restarts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np
from scipy.optimize import least_squares

from moesim.config import ClusterConfig
from moesim.sim.collectives import Collectives, Traffic
from moesim.sim.nccl import LINK_CLASSES, LinkTerms, NcclTerms
from moesim.sim.network import FlowNetwork
from moesim.sim.topology import Topology, build_topology

# Bounds of the free terms, in the space the optimiser works in.
BOUNDS = {"efficiency": (0.05, 1.0), "half_bytes": (0.0, 9.0),   # log10 bytes
          "exponent": (0.3, 3.0), "latency_scale": (-1.0, 1.0),  # log10
          "launch": (0.0, 500.0)}                                 # us


@dataclass
class Point:
    """One measured collective."""

    source: str
    cluster: ClusterConfig
    collective: str                    # all_reduce | all_gather | reduce_scatter | all_to_all
    size: float                        # nccl-tests "size" bytes (or the matrix's row sum)
    measured_s: float
    traffic: Traffic | None = None     # all_to_all: explicit bytes between ranks
    algorithms: tuple | None = None    # NCCL_ALGO restriction
    a2a_algorithm: str = "direct"
    launch: str = "default"            # which fitted launch cost applies
    fit: bool = True
    meta: dict = field(default_factory=dict)

    @property
    def ranks(self) -> int:
        return self.cluster.num_gpus


class PointSimulator:
    """Times points under given terms; topologies and routes are built once per cluster."""

    def __init__(self, tolerance: float = 0.0) -> None:
        self.tolerance = tolerance
        self._topos: dict[ClusterConfig, tuple[Topology, FlowNetwork]] = {}

    def network(self, cluster: ClusterConfig) -> FlowNetwork:
        if cluster not in self._topos:
            topo = build_topology(cluster, "point")
            self._topos[cluster] = (topo, FlowNetwork(topo, self.tolerance))
        return self._topos[cluster][1]

    def collectives(self, p: Point, terms: NcclTerms | None, launch_s: float) -> Collectives:
        return Collectives(self.network(p.cluster), launch_s, terms, nvls=p.cluster.nvls,
                           algorithms=p.algorithms)

    def run(self, p: Point, terms: NcclTerms | None, launch_s: float):
        """The CollectiveResult of the point."""
        coll = self.collectives(p, terms, launch_s)
        n = p.ranks
        if p.collective == "all_to_all":
            t = p.traffic
            if t is None:
                m = np.full((n, n), p.size / n)
                t = Traffic.dense(m)
            return coll.all_to_all(t, p.a2a_algorithm)
        groups = np.arange(n)[None, :]
        return {"all_reduce": coll.all_reduce, "all_gather": coll.all_gather,
                "reduce_scatter": coll.reduce_scatter}[p.collective](groups, p.size)

    def time(self, p: Point, terms: NcclTerms | None, launch_s: float) -> float:
        return self.run(p, terms, launch_s).duration


@dataclass
class FitResult:
    terms: NcclTerms
    launch_us: dict[str, float]
    free: list[str]
    cost: float
    evaluations: int


def _get(terms: NcclTerms, launch: dict, name: str) -> float:
    if name == "latency_scale":
        return math.log10(max(terms.latency_scale, 1e-3))
    if name.startswith("launch."):
        return launch[name.split(".", 1)[1]]
    cls, attr = name.split(".")
    v = getattr(terms.link(cls), attr)
    return math.log10(max(v, 1.0)) if attr == "half_bytes" else v


def _set(terms: NcclTerms, launch: dict, names: list[str], x: np.ndarray
         ) -> tuple[NcclTerms, dict]:
    launch = dict(launch)
    links = dict(terms.links)
    scale = terms.latency_scale
    for name, v in zip(names, x, strict=True):
        if name == "latency_scale":
            scale = 10.0 ** v
        elif name.startswith("launch."):
            launch[name.split(".", 1)[1]] = float(v)
        else:
            cls, attr = name.split(".")
            val = 10.0 ** v if attr == "half_bytes" else float(v)
            links[cls] = replace(links.get(cls, LinkTerms()), **{attr: val})
    return replace(terms, links=links, latency_scale=scale), launch


def _bound(name: str) -> tuple[float, float]:
    if name.startswith("launch."):
        return BOUNDS["launch"]
    if name == "latency_scale":
        return BOUNDS["latency_scale"]
    return BOUNDS[name.split(".")[1]]


def free_terms(classes: tuple[str, ...] = LINK_CLASSES, latency: bool = True,
               launches: tuple[str, ...] = ("default",)) -> list[str]:
    names = [f"{c}.{a}" for c in classes for a in ("efficiency", "half_bytes", "exponent")]
    if latency:
        names.append("latency_scale")
    return names + [f"launch.{g}" for g in launches]


def fit(points: list[Point], base: NcclTerms | list[NcclTerms], free: list[str],
        launch_us: dict[str, float] | None = None, sim: PointSimulator | None = None,
        max_nfev: int = 400, priors: dict[str, tuple[float, float]] | None = None
        ) -> FitResult:
    """Least-squares fit from `base`, or from each of a list of starting terms, keeping the
    lowest cost (the model's algorithm choice makes the cost piecewise: several starts find
    the basin a single one can miss). See `_fit`."""
    if isinstance(base, list):
        results = [_fit(points, b, free, launch_us, sim, max_nfev, priors) for b in base]
        best = min(results, key=lambda r: r.cost)
        best.evaluations = sum(r.evaluations for r in results)
        return best
    return _fit(points, base, free, launch_us, sim, max_nfev, priors)


def _fit(points: list[Point], base: NcclTerms, free: list[str],
         launch_us: dict[str, float] | None = None, sim: PointSimulator | None = None,
         max_nfev: int = 400, priors: dict[str, tuple[float, float]] | None = None
         ) -> FitResult:
    """Least-squares fit of the `free` terms to the points with `fit=True`. `priors` (term ->
    (mean, sigma), in the optimiser's space: log10 for latency_scale and half_bytes) add a
    residual (x - mean) / sigma each: a term the points do not constrain stays at its prior
    (NCCL's own latency table, say) instead of drifting to a bound."""
    sim = sim or PointSimulator()
    launch = dict(launch_us or {})
    for p in points:
        launch.setdefault(p.launch, 10.0)
    use = [p for p in points if p.fit]
    if not use:
        raise ValueError("no points to fit")
    x0 = np.array([_get(base, launch, n) for n in free])
    lo = np.array([_bound(n)[0] for n in free])
    hi = np.array([_bound(n)[1] for n in free])
    x0 = np.clip(x0, lo + 1e-9, hi - 1e-9)
    evals = [0]

    prior = [(free.index(n), m, sd) for n, (m, sd) in (priors or {}).items() if n in free]

    def resid(x: np.ndarray) -> np.ndarray:
        evals[0] += 1
        terms, lat = _set(base, launch, free, x)
        r = [math.log(sim.time(p, terms, lat[p.launch] * 1e-6) / p.measured_s) for p in use]
        return np.array(r + [(x[i] - m) / sd for i, m, sd in prior])

    # soft_l1: a noisy published point (nccl-tests' single runs) may not pull the others.
    res = least_squares(resid, x0, bounds=(lo, hi), x_scale="jac", max_nfev=max_nfev,
                        diff_step=1e-3, loss="soft_l1", f_scale=0.1)
    terms, lat = _set(base, launch, free, res.x)
    return FitResult(terms, lat, free, float(2 * res.cost), evals[0])
