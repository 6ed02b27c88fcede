"""Collectives as flows on the flow-level network.

Each collective becomes one or more stages of flows; a stage starts when the previous one has
finished on every rank (a conservative barrier: real implementations pipeline stages). The
collective starts when its last participant arrives (NCCL semantics: no rank finishes a
collective before all have joined; modelled as a barrier at the start).

Two cost models (`cluster.network_model`):

- "ideal" (`terms=None`): every flow runs at its max-min share of line rate (times
  `cluster.bandwidth_efficiency`, folded into the link capacities), pays its route latency
  (once per ring step for rings), and the collective a fixed `collective_latency` on top. One
  ring per group, direct all-to-all, one stage.
- "nccl" (`terms=NcclTerms`, `moesim.sim.nccl`): NCCL's algorithms, protocols and latency
  terms, flows slowed by their link class's saturation curve, and the fastest enabled
  (algorithm, protocol) kept, as NCCL's tuner does. `collective_latency` is then the host's
  launch cost alone; route latencies are in NCCL's per-step latencies.

Shapes of the traffic (both models):
- all-to-all, direct: one flow per (src, dst) with its bytes. On a non-blocking switch with every
  rank sending S/n to every other, the time is (n-1)/n * S/B. "nccl": grouped send/recv in
  shifts of at most `NcclTerms.p2p_peers` concurrent peers; more peers run in later rounds.
- all-to-all, hierarchical: stage 1 inside each machine moves every byte to the GPU with the
  destination's local index (rail), stage 2 crosses machines between GPUs of the same local
  index; "hierarchical" separates the stages by a barrier (an upper bound), "pipelined" runs
  them at once (DeepEP's normal kernels forward NVLink and RDMA chunks concurrently).
- ring all-reduce, all-gather, reduce-scatter: every rank streams to its ring successor
  2(n-1)/n * S (all-reduce) or (n-1)/n * S (the other two), where S is the full buffer. Time
  2(n-1)/n * S/B for all-reduce on links of bandwidth B. "ideal": one ring in rank order.
  "nccl": one channel per GPU of a machine when a group spans machines, each channel a ring
  that enters and leaves every machine on the same rail (machines visited alternately forward
  and backward), carrying 1/channels of the data, as NCCL's ring search lays them out.
- tree all-reduce ("nccl", several machines): per channel, a chain inside each machine and
  NCCL's double binary tree between machines (two trees, each half the data; the second the
  mirror of the first so that no machine is inner in both); reduce and broadcast pipelined,
  so every tree and chain edge carries its share both ways at once.
- NVLS all-reduce ("nccl", one machine on an NVSwitch): every GPU sends S + S/n and receives
  S + S/n through the switch (NCCL issue #1083), as flows between every pair of GPUs.
  NVLSTree (several machines): NVLS inside each machine, and the trees between machines on
  each rail carry that rail's 1/n shard.
- Many groups (one per data-parallel ring) run as one flow set and share links.

Ignored: chunking and pipelining inside a collective beyond the fluid model (absorbed in
"nccl"'s saturation curves), CollNet/SHARP in the network switch, SM contention with compute.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from moesim.config import ClusterConfig
from moesim.sim.nccl import NcclTerms, load_terms
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
    algorithm: str = ""        # "nccl": the algorithm and protocol that ran
    protocol: str = ""


def _empty(n: int) -> CollectiveResult:
    return CollectiveResult(0.0, np.zeros(n), np.zeros(len(LINK_KINDS)), 0.0, 0, 0)


def heap_tree_edges(n: int) -> np.ndarray:
    """int[n-1, 2] (child, parent) of the two trees of NCCL's double binary tree over n
    nodes, as (child, parent) rows of both: a heap-ordered binary tree, and its mirror
    (node r -> n-1-r), so that the leaves of one are the inner nodes of the other."""
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    child = np.arange(1, n)
    parent = (child - 1) // 2
    a = np.stack([child, parent], axis=1)
    b = (n - 1) - a
    return np.concatenate([a, b])


class Collectives:
    """Times collectives on a FlowNetwork (module docstring: "ideal" with `terms=None`,
    "nccl" with NCCL's terms). Stage solutions are cached up to scale (the network holds one
    collective at a time, so a collective's time is a function of its traffic alone; see
    `_fluid`)."""

    def __init__(self, net: FlowNetwork, collective_latency: float,
                 terms: NcclTerms | None = None, nvls: bool = True,
                 algorithms: tuple[str, ...] | None = None) -> None:
        self.net = net
        self.alpha = collective_latency
        self.terms = terms
        self.nvls = nvls
        self.allowed = algorithms    # NCCL_ALGO: restrict the choice (None: all enabled)
        self.cache: dict[bytes, tuple] = {}
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
        """Solve one stage; cached up to scale and transposition. All flows start together,
        so max-min rates do not depend on sizes and every finish time scales with them: a
        stage whose bytes are a multiple of a solved one (FSEP's chunks, HP's layers, a
        backward that mirrors the forward) is not solved again. The completion quantum scales
        the same way. On a topology whose every link has a reverse of the same capacity and
        latency, without PXN (its legs are not mirror images) and without incast (it counts
        senders, not receivers), the transposed stage (every flow reversed: a combine after
        its dispatch) has the same finish times, flow for flow: it is answered from the
        cache too."""
        peak = float(t.nbytes.max())
        unit = t.nbytes / peak
        order = np.lexsort((t.dst, t.src))
        kind = f"stage{latency_hops}"
        key = self._key(kind, t.src[order], t.dst[order], unit[order])
        hit = self.cache.get(key)
        swap = False
        if hit is None and self._mirror_ok():
            rev = np.lexsort((t.src, t.dst))
            hit = self.cache.get(self._key(kind, t.dst[rev], t.src[rev], unit[rev]))
            swap = hit is not None
        if hit is None:
            fs = self.net.flowset(t.src, t.dst, unit, latency_hops=latency_hops)
            res = self.net.run(fs)
            hit = (fs.src, fs.dst, res.finish - fs.latency, fs.latency, res.link_bytes,
                   fs.num_flows, res.events)
            self.cache[key] = hit
        else:
            self.hits += 1
        src, dst, fluid, lat, link_unit, flows, events = hit
        if swap:  # per-class link bytes are the same (a link and its reverse share a class)
            src, dst = dst, src
            link_unit = link_unit[self.net.topo.reverse_links()]
        return src, dst, fluid * peak + lat, link_unit * peak, flows, events

    def _mirror_ok(self) -> bool:
        topo = self.net.topo
        return not topo.pxn and self.net.incast == 0 and topo.reverse_links() is not None

    # --- flow classes and saturation ("nccl") ---------------------------------------------
    def _clean(self, t: Traffic) -> Traffic:
        keep = (t.src != t.dst) & (t.nbytes > 0)
        return Traffic(t.src[keep], t.dst[keep], t.nbytes[keep])

    def _slowed(self, t: Traffic, cls: str | None = None) -> Traffic:
        """The traffic with each flow's bytes divided by its class's saturation efficiency
        at its size: what the max-min solver then moves at line rate. Class: "nic" between
        machines, "nvlink" inside one, or `cls` for every flow (NVLS)."""
        if self.terms is None or not len(t.src):
            return t
        machine = self.net.topo.machine
        if cls is None:
            cross = machine[t.src] != machine[t.dst]
            eff = np.where(cross, self.terms.link("nic").factor(t.nbytes),
                           self.terms.link("nvlink").factor(t.nbytes))
        else:
            eff = self.terms.link(cls).factor(t.nbytes)
        return Traffic(t.src, t.dst, t.nbytes / eff)

    def _stages(self, stages: list[Traffic], latency_hops: float = 1.0,
                slowed: list[Traffic] | None = None) -> CollectiveResult:
        """Run the stages one after the other; `slowed` are the flow sets the solver sees
        ("nccl": bytes over saturation efficiency), the bytes accounted are `stages`'."""
        n = self.num_ranks
        t0 = 0.0
        rank_end = np.zeros(n)
        link_bytes = np.zeros(self.net.topo.num_links)
        total = 0.0
        flows = events = 0
        for i, t in enumerate(stages):
            t = self._clean(t)
            if not len(t.src):
                continue
            solve = self._clean(slowed[i]) if slowed is not None else t
            src, dst, finish, lb, nf, ev = self._fluid(solve, latency_hops)
            if slowed is not None:  # bytes carried per link are the traffic's, not the solver's
                fs = self.net.flowset(t.src, t.dst, t.nbytes)
                lb = fs.by_flow.T @ fs.nbytes
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
        return CollectiveResult(t0, rank_end, per_class, total, flows, events)

    def _finish(self, res: CollectiveResult, latency: float) -> CollectiveResult:
        """Add the collective's fixed costs (launch, and NCCL's latency) to every rank."""
        res.duration += latency
        res.rank_end = res.rank_end + latency
        return res

    # --- all-to-all ---------------------------------------------------------------------
    def all_to_all(self, traffic: Traffic | np.ndarray,
                   algorithm: str = "direct") -> CollectiveResult:
        """`traffic` bytes between ranks of the topology (a Traffic, or a dense [src, dst]
        matrix whose diagonal stays local)."""
        t = traffic if isinstance(traffic, Traffic) else Traffic.dense(traffic)
        t = self._clean(t)
        if self.terms is None:
            stages = self._a2a_stages(t, algorithm)
            if algorithm == "pipelined":
                stages = [Traffic.concat(stages)]
            return self._finish(self._stages(stages), self.alpha)
        stages = self._a2a_stages(t, algorithm)
        machine = self.net.topo.machine
        latency = self.alpha
        if algorithm == "pipelined":
            stages = [Traffic.concat(stages)]
        if algorithm == "direct":
            stages = self._p2p_rounds(t)
        for st in stages:
            if len(st.src):
                latency += self.terms.p2p_step(bool((machine[st.src] != machine[st.dst]).any()))
        res = self._stages(stages, latency_hops=0.0, slowed=[self._slowed(s) for s in stages])
        res.algorithm, res.protocol = algorithm, "Simple"
        return self._finish(res, latency)

    def _p2p_rounds(self, t: Traffic) -> list[Traffic]:
        """NCCL's grouped send/recv: each rank exchanges with peers in shifts (r -> r + s),
        at most `p2p_peers` shifts at once; more shifts run in later rounds."""
        if not len(t.src):
            return [t]
        peers = np.bincount(t.src, minlength=self.num_ranks).max()
        if peers <= self.terms.p2p_peers(2):   # the smallest concurrency NCCL gives
            return [t]
        # Groups are blocks of consecutive ranks: the shift is taken inside the block.
        g = _block_size(t, self.num_ranks)
        limit = self.terms.p2p_peers(g)
        if peers <= limit:
            return [t]
        shift = (t.dst - t.src) % g
        rnd = (shift - 1) // limit
        return [Traffic(t.src[rnd == r], t.dst[rnd == r], t.nbytes[rnd == r])
                for r in range(int(rnd.max()) + 1)]

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

    # --- ring, tree and NVLS collectives ----------------------------------------------------
    def _group_layout(self, groups: np.ndarray) -> tuple[np.ndarray, int]:
        """Members of each group by machine: int[G, machines, per machine] (sorted by machine,
        then rank), and the machine count; None when the groups' machines hold unequal
        numbers of members."""
        machine = self.net.topo.machine
        lay = []
        nodes = 0
        for grp in groups:
            grp = np.sort(grp)
            m = machine[grp]
            um, counts = np.unique(m, return_counts=True)
            if (counts != counts[0]).any():
                return None, len(um)
            order = np.lexsort((grp, m))
            lay.append(grp[order].reshape(len(um), counts[0]))
            nodes = max(nodes, len(um))
        shapes = {a.shape for a in lay}
        if len(shapes) != 1:
            return None, nodes
        return np.stack(lay), nodes

    def _ring_traffic(self, groups: np.ndarray, hop_bytes: float) -> Traffic:
        """The ring hops carrying `hop_bytes` in total between successive members."""
        lay, nodes = self._group_layout(groups) if self.terms is not None else (None, 1)
        if lay is None or nodes == 1 or lay.shape[2] == 1:
            src = groups.ravel()
            dst = np.roll(groups, -1, axis=1).ravel()
            if lay is not None and nodes > 1:  # one member per machine: machine order
                g = lay[:, :, 0]
                src, dst = g.ravel(), np.roll(g, -1, axis=1).ravel()
            return Traffic(src, dst, np.full(len(src), hop_bytes))
        g, m, c = lay.shape
        srcs, dsts = [], []
        for ch in range(c):
            rot = np.roll(lay, -ch, axis=2)                  # channel ch enters at rail ch
            seq = rot.copy()
            seq[:, 1::2] = rot[:, 1::2, ::-1]                # odd machines backwards
            ring = seq.reshape(g, m * c)
            srcs.append(ring.ravel())
            dsts.append(np.roll(ring, -1, axis=1).ravel())
        src, dst = np.concatenate(srcs), np.concatenate(dsts)
        return Traffic(src, dst, np.full(len(src), hop_bytes / c))

    def _tree_traffic(self, lay: np.ndarray, size: float, chain: bool = True) -> Traffic:
        """Tree all-reduce of `size` per member: per channel (one per rail), a chain in every
        machine and the double binary tree between machines on that rail, both ways."""
        _, m, c = lay.shape
        edges = heap_tree_edges(m)              # (child, parent) of both trees
        per_tree = size / (2 * c)
        src, dst, nb = [], [], []
        for ch in range(c):
            heads = lay[:, :, ch]                # [G, M]: the rail-ch GPU of every machine
            a, b = heads[:, edges[:, 0]].ravel(), heads[:, edges[:, 1]].ravel()
            src += [a, b]
            dst += [b, a]
            nb += [np.full(2 * len(a), per_tree)]
            if chain and c > 1:
                rot = np.roll(lay, -ch, axis=2)  # chain from the head down the machine
                u, v = rot[:, :, :-1].ravel(), rot[:, :, 1:].ravel()
                src += [u, v]
                dst += [v, u]
                nb += [np.full(2 * len(u), size / c)]
        return Traffic(np.concatenate(src), np.concatenate(dst), np.concatenate(nb))

    def _nvls_traffic(self, lay: np.ndarray, size: float) -> Traffic:
        """NVLS inside every machine: each GPU sends and receives S + S/c through the switch,
        spread over its c - 1 peers (S/c of it is its own shard, which also crosses)."""
        g, m, c = lay.shape
        per_pair = (size + size / c) / (c - 1)
        a = np.repeat(lay.reshape(g * m, c), c, axis=1).reshape(-1)
        b = np.tile(lay.reshape(g * m, c), (1, c)).reshape(-1)
        keep = a != b
        return Traffic(a[keep], b[keep], np.full(int(keep.sum()), per_pair))

    def _rings(self, kind: str, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        """`groups` int[G, k]: G collectives of k ranks each, run concurrently; `size_bytes`
        is the full buffer of one member."""
        groups = np.atleast_2d(np.asarray(groups, dtype=np.int64))
        k = groups.shape[1]
        if k < 2 or size_bytes <= 0:
            return _empty(self.num_ranks)
        factor, steps = {"all_reduce": (2 * (k - 1) / k, 2 * (k - 1)),
                         "all_gather": ((k - 1) / k, k - 1),
                         "reduce_scatter": ((k - 1) / k, k - 1)}[kind]
        members = np.zeros(self.num_ranks, dtype=bool)
        members[groups.ravel()] = True
        if self.terms is None:
            ring = self._ring_traffic(groups, factor * size_bytes)
            res = self._finish(self._stages([ring], latency_hops=steps), self.alpha)
        else:
            res = self._nccl(kind, groups, size_bytes, factor)
        # A collective advances in lockstep: every member is done when the slowest link is.
        res.rank_end = np.where(members, res.duration, res.rank_end)
        return res

    def _nccl(self, kind: str, groups: np.ndarray, size: float, factor: float
              ) -> CollectiveResult:
        """NCCL's choice: every enabled (algorithm, protocol), the fastest kept."""
        terms = self.terms
        k = groups.shape[1]
        lay, nodes = self._group_layout(groups)
        topo = self.net.topo
        algos = terms.algorithms(kind, nodes, topo.nvswitch, self.nvls)
        if lay is None or (nodes > 1 and lay.shape[2] == 1):
            # Unequal machines, or one member per machine: no chains and no NVLS inside.
            algos = [a for a in algos if a not in ("nvls", "nvls_tree")]
        if lay is None:
            algos = [a for a in algos if a != "tree"]
        if self.allowed is not None:
            algos = [a for a in algos if a in self.allowed] or algos[:1]
        best = None
        for algo in algos:
            flows, slowed = self._algo_traffic(algo, groups, lay, size, factor)
            res = self._stages([flows], latency_hops=0.0, slowed=[slowed])
            for proto in terms.protocols_for(algo):
                frac = terms.fraction(algo, proto, kind, nodes, k / max(nodes, 1))
                t = (res.duration / frac + self.alpha
                     + terms.latency(algo, proto, kind, k, nodes))
                if best is None or t < best[0]:
                    best = (t, algo, proto, res, frac)
        t, algo, proto, res, frac = best
        out = CollectiveResult(t, res.rank_end / frac + (t - res.duration / frac),
                               res.link_bytes, res.bytes, res.flows, res.events, algo, proto)
        return out

    def _algo_traffic(self, algo: str, groups: np.ndarray, lay, size: float, factor: float
                      ) -> tuple[Traffic, Traffic]:
        """(bytes, slowed bytes) an algorithm moves."""
        if algo == "ring":
            t = self._ring_traffic(groups, factor * size)
            return t, self._slowed(t)
        if algo == "tree":
            t = self._tree_traffic(lay, size)
            return t, self._slowed(t)
        if algo == "nvls":
            t = self._nvls_traffic(lay, size)
            return t, self._slowed(t, "nvls")
        # NVLSTree: NVLS in every machine, trees between machines on the rails' shards.
        intra = self._nvls_traffic(lay, size)
        inter = self._tree_traffic(lay, size, chain=False)
        t = Traffic.concat([intra, inter])
        return t, Traffic.concat([self._slowed(intra, "nvls"), self._slowed(inter)])

    def all_reduce(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("all_reduce", groups, size_bytes)

    def all_gather(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("all_gather", groups, size_bytes)

    def reduce_scatter(self, groups: np.ndarray, size_bytes: float) -> CollectiveResult:
        return self._rings("reduce_scatter", groups, size_bytes)


def _block_size(t: Traffic, n: int) -> int:
    """The size of the rank blocks the traffic stays inside (the MoE group): the smallest
    divisor g of n with src // g == dst // g for every flow."""
    for g in range(1, n + 1):
        if n % g == 0 and (t.src // g == t.dst // g).all():
            return g
    return n


def collectives_for(cluster: ClusterConfig, net: FlowNetwork) -> Collectives:
    """The collectives of a cluster config: its network model, terms and NVLS switch."""
    terms = load_terms(cluster.network_terms) if cluster.network_model == "nccl" else None
    net.incast = cluster.incast_coefficient
    return Collectives(net, cluster.collective_latency_us * 1e-6, terms, nvls=cluster.nvls)
