"""Collectives as flows on the flow-level network.

Each collective becomes one or more stages of flows; a stage starts when the previous one has
finished on every rank (a conservative barrier: real implementations pipeline stages). The
collective starts when its last participant arrives (NCCL semantics: no rank finishes a
collective before all have joined; modelled as a barrier at the start) and costs a fixed
`collective_latency` on top of its flows (kernel launch and peer handshake).

- all-to-all, direct: one flow per (src, dst) with its bytes; every flow pays its route latency
  once. On a non-blocking switch with every rank sending S/n to every other, the time is
  (n-1)/n * S/B.
- all-to-all, hierarchical: stage 1 inside each machine moves every byte to the GPU with the
  destination's local index (rail), stage 2 crosses machines between GPUs of the same local
  index. Needs machines of equal size.
- ring all-reduce, all-gather, reduce-scatter: every rank streams to its ring successor
  2(n-1)/n * S (all-reduce) or (n-1)/n * S (the other two), where S is the full buffer; the
  route latency is paid once per ring step (2(n-1) or n-1 steps). Time 2(n-1)/n * S/B for
  all-reduce on links of bandwidth B. Many rings (e.g. one per data-parallel group) run as one
  flow set and share links.

Ignored: chunking and pipelining inside a collective beyond the fluid model, protocol choice
(LL/LL128/Simple), tree and NVLS algorithms, SM contention with compute.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from moesim.sim.network import FlowNetwork
from moesim.sim.topology import LINK_KINDS


@dataclass(frozen=True)
class Traffic:
    """Bytes between ranks as sparse triples (the off-diagonal entries that are > 0), sorted by
    (src, dst). Built from a dense [N, N] matrix with `Traffic.dense`; a 1024-GPU cluster of
    32-rank groups has 32k entries instead of a million."""

    src: np.ndarray     # int64[K]
    dst: np.ndarray     # int64[K]
    nbytes: np.ndarray  # float64[K]

    @classmethod
    def dense(cls, m: np.ndarray, offset: int = 0) -> Traffic:
        m = np.asarray(m)
        src, dst = np.nonzero(m)
        keep = src != dst
        src, dst = src[keep], dst[keep]
        return cls(src + offset, dst + offset, m[src, dst].astype(np.float64))

    @classmethod
    def concat(cls, parts: list[Traffic]) -> Traffic:
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))
        return cls(np.concatenate([p.src for p in parts]),
                   np.concatenate([p.dst for p in parts]),
                   np.concatenate([p.nbytes for p in parts]))

    def scaled(self, f: float) -> Traffic:
        return Traffic(self.src, self.dst, self.nbytes * f)

    def sent(self, n: int) -> np.ndarray:
        """int64[n]: bytes each rank sends."""
        return np.rint(np.bincount(self.src, weights=self.nbytes, minlength=n)).astype(np.int64)

    @property
    def total(self) -> float:
        return float(self.nbytes.sum())


@dataclass
class CollectiveResult:
    duration: float            # seconds from start until the last rank is done
    rank_end: np.ndarray       # float64[N]: when each rank is done (same origin)
    link_bytes: np.ndarray     # float64[len(LINK_KINDS)]: bytes carried per link class
    bytes: float               # network bytes (flow sizes summed, local data excluded)
    flows: int
    events: int


class Collectives:
    """Times collectives on a FlowNetwork. Stage solutions are cached up to scale (the network
    holds one collective at a time, so a collective's time is a function of its traffic
    alone; see `_fluid`)."""

    def __init__(self, net: FlowNetwork, collective_latency: float) -> None:
        self.net = net
        self.alpha = collective_latency
        self.cache: dict[bytes, CollectiveResult] = {}
        self.hits = 0

    @property
    def num_ranks(self) -> int:
        return self.net.topo.num_gpus

    def _key(self, kind: str, *arrays: np.ndarray) -> bytes:
        h = hashlib.sha1(kind.encode())
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(str(a.shape).encode())
            h.update(a.tobytes())
        return h.digest()

    def _fluid(self, t: Traffic, latency_hops: float) -> tuple:
        """Solve one stage; cached up to scale. All flows start together, so max-min rates do
        not depend on sizes and every finish time scales with them: a stage whose bytes are a
        multiple of a solved one (FSEP's chunks, HP's layers, a backward that mirrors the
        forward) is not solved again. The completion quantum scales the same way."""
        peak = float(t.nbytes.max())
        unit = t.nbytes / peak
        key = self._key(f"stage{latency_hops}", t.src, t.dst, unit)
        hit = self.cache.get(key)
        if hit is None:
            fs = self.net.flowset(t.src, t.dst, unit, latency_hops=latency_hops)
            res = self.net.run(fs)
            hit = (fs.src, fs.dst, res.finish - fs.latency, fs.latency, res.link_bytes,
                   fs.num_flows, res.events)
            self.cache[key] = hit
        else:
            self.hits += 1
        src, dst, fluid, lat, link_unit, flows, events = hit
        return src, dst, fluid * peak + lat, link_unit * peak, flows, events

    def _stages(self, stages: list[Traffic], latency_hops: float = 1.0) -> CollectiveResult:
        n = self.num_ranks
        t0 = 0.0
        rank_end = np.zeros(n)
        link_bytes = np.zeros(self.net.topo.num_links)
        total = 0.0
        flows = events = 0
        for t in stages:
            keep = (t.src != t.dst) & (t.nbytes > 0)
            t = Traffic(t.src[keep], t.dst[keep], t.nbytes[keep])
            if not len(t.src):
                continue
            src, dst, finish, lb, nf, ev = self._fluid(t, latency_hops)
            link_bytes += lb
            total += t.total
            flows += nf
            events += ev
            end = t0 + finish
            np.maximum.at(rank_end, src, end)
            np.maximum.at(rank_end, dst, end)
            t0 = float(end.max())
        per_class = np.bincount(self.net.topo.link_kind, weights=link_bytes,
                                minlength=len(LINK_KINDS))
        rank_end = rank_end + self.alpha
        return CollectiveResult(t0 + self.alpha, rank_end, per_class, total, flows, events)

    # --- all-to-all ---------------------------------------------------------------------
    def all_to_all(self, traffic: Traffic | np.ndarray,
                   algorithm: str = "direct") -> CollectiveResult:
        """`traffic` bytes between ranks of the topology (a Traffic, or a dense [src, dst]
        matrix whose diagonal stays local)."""
        t = traffic if isinstance(traffic, Traffic) else Traffic.dense(traffic)
        return self._stages(self._a2a_stages(t, algorithm))

    def _a2a_stages(self, t: Traffic, algorithm: str) -> list[Traffic]:
        if algorithm == "direct":
            return [t]
        machine = self.net.topo.machine
        sizes = np.bincount(machine)
        if (sizes != sizes[0]).any():
            raise ValueError("hierarchical all-to-all needs machines of equal size")
        g = int(sizes[0])
        local = np.arange(self.num_ranks) - machine * g  # ranks are machine-major
        # Stage 1: to the GPU of the source's machine with the destination's local index.
        hop = machine[t.src] * g + local[t.dst]
        # Stage 2: between same-local-index GPUs of different machines.
        return [Traffic(t.src, hop, t.nbytes), Traffic(hop, t.dst, t.nbytes)]

    # --- ring collectives ----------------------------------------------------------------
    def _rings(self, kind: str, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        """`groups` int[G, k]: G rings of k ranks each, run concurrently; `size_bytes` is the
        full buffer of one ring member."""
        groups = np.atleast_2d(np.asarray(groups, dtype=np.int64))
        k = groups.shape[1]
        if k < 2 or size_bytes <= 0:
            return CollectiveResult(0.0, np.zeros(self.num_ranks),
                                    np.zeros(len(LINK_KINDS)), 0.0, 0, 0)
        factor, steps = {"all_reduce": (2 * (k - 1) / k, 2 * (k - 1)),
                         "all_gather": ((k - 1) / k, k - 1),
                         "reduce_scatter": ((k - 1) / k, k - 1)}[kind]
        src = groups.ravel()
        dst = np.roll(groups, -1, axis=1).ravel()
        res = self._stages([Traffic(src, dst, np.full(len(src), factor * size_bytes))],
                           latency_hops=steps)
        # A ring advances in lockstep: every member is done when the slowest link is.
        members = np.zeros(self.num_ranks, dtype=bool)
        members[src] = True
        res.rank_end = np.where(members, res.duration, res.rank_end)
        return res

    def all_reduce(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("all_reduce", groups, size_bytes)

    def all_gather(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("all_gather", groups, size_bytes)

    def reduce_scatter(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("reduce_scatter", groups, size_bytes)
