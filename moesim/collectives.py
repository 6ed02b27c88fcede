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

from moesim.network import FlowNetwork, FlowSet
from moesim.topology import LINK_KINDS


@dataclass
class CollectiveResult:
    duration: float            # seconds from start until the last rank is done
    rank_end: np.ndarray       # float64[N]: when each rank is done (same origin)
    link_bytes: np.ndarray     # float64[len(LINK_KINDS)]: bytes carried per link class
    bytes: float               # network bytes (flow sizes summed, local data excluded)
    flows: int
    events: int


class Collectives:
    """Times collectives on a FlowNetwork. Results of identical collectives are cached (the
    network holds one collective at a time, so a collective's time is a function of its
    traffic alone)."""

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

    def _stages(self, stages: list[FlowSet]) -> CollectiveResult:
        n = self.num_ranks
        t0 = 0.0
        rank_end = np.zeros(n)
        link_bytes = np.zeros(self.net.topo.num_links)
        total = 0.0
        flows = events = 0
        for fs in stages:
            res = self.net.run(fs)
            link_bytes += res.link_bytes
            total += float(fs.nbytes.sum())
            flows += fs.num_flows
            events += res.events
            if fs.num_flows:
                end = t0 + res.finish
                np.maximum.at(rank_end, fs.src, end)
                np.maximum.at(rank_end, fs.dst, end)
                t0 = float(end.max())
        per_class = np.bincount(self.net.topo.link_kind, weights=link_bytes,
                                minlength=len(LINK_KINDS))
        rank_end = rank_end + self.alpha
        return CollectiveResult(t0 + self.alpha, rank_end, per_class, total, flows, events)

    def _cached(self, key: bytes, build) -> CollectiveResult:
        hit = self.cache.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        res = build()
        self.cache[key] = res
        return res

    # --- all-to-all ---------------------------------------------------------------------
    def all_to_all(self, matrix: np.ndarray, algorithm: str = "direct") -> CollectiveResult:
        """`matrix[src, dst]` bytes over all ranks of the topology (diagonal stays local)."""
        m = np.asarray(matrix, dtype=np.int64)
        return self._cached(self._key("a2a-" + algorithm, m),
                            lambda: self._stages(self._a2a_stages(m, algorithm)))

    def _a2a_stages(self, m: np.ndarray, algorithm: str) -> list[FlowSet]:
        n = self.num_ranks
        src, dst = np.nonzero(m)
        nbytes = m[src, dst].astype(np.float64)
        if algorithm == "direct":
            return [self.net.flowset(src, dst, nbytes)]
        machine = self.net.topo.machine
        sizes = np.bincount(machine)
        if (sizes != sizes[0]).any():
            raise ValueError("hierarchical all-to-all needs machines of equal size")
        g = int(sizes[0])
        local = np.arange(n) - machine * g  # ranks are machine-major in presets
        # Stage 1: to the GPU of the source's machine with the destination's local index.
        hop = machine[src] * g + local[dst]
        s1 = self.net.flowset(src, hop, nbytes)
        # Stage 2: between same-local-index GPUs of different machines.
        s2 = self.net.flowset(hop, dst, nbytes)
        return [s1, s2]

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
        key = self._key(kind, groups, np.array([size_bytes]))

        def build() -> CollectiveResult:
            src = groups.ravel()
            dst = np.roll(groups, -1, axis=1).ravel()
            fs = self.net.flowset(src, dst, np.full(len(src), factor * size_bytes),
                                  latency_hops=steps)
            res = self._stages([fs])
            # A ring advances in lockstep: every member is done when the slowest link is.
            members = np.zeros(self.num_ranks, dtype=bool)
            members[src] = True
            res.rank_end = np.where(members, res.duration, res.rank_end)
            return res
        return self._cached(key, build)

    def all_reduce(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("all_reduce", groups, size_bytes)

    def all_gather(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("all_gather", groups, size_bytes)

    def reduce_scatter(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("reduce_scatter", groups, size_bytes)
