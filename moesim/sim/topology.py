"""Cluster topologies: a directed networkx graph of GPUs and switches, and routes between GPUs.

Every edge is one direction of one link, with `bw` (bytes/s), `latency` (s) and `kind`
("nvlink", "nic", "fabric"; the class reported in summaries). GPUs are graph nodes with
`kind="gpu"`, a `rank` (0..N-1) and a `machine` (the server it sits in); everything else is a
switch. Routes are computed on demand, vectorised over GPU pairs:

- GPUs are endpoints, except for PXN: on a rail-optimised fabric with `cluster.pxn` (NCCL's
  default since 2.12, NCCL_PXN_DISABLE=0), a flow from GPU i of one node to GPU j != i of
  another first crosses NVLink to GPU j of its own node and leaves through that GPU's NIC, on
  the destination's rail, so it never crosses a spine (NCCL docs, NCCL_PXN_DISABLE; "Doubling
  all2all performance with NVIDIA Collective Communication Library 2.12", NVIDIA blog). Without
  PXN (or on explicit topologies) GPUs are never transit and cross-rail traffic climbs to a
  spine.
- Shortest paths by latency (integer nanoseconds, at least 1 per hop, so that equal-latency
  paths tie exactly); all equal-cost paths are used with an even split at every hop (ECMP as
  per-flow fluid spraying; hash collisions are not modelled, so ECMP is ideal load balancing).
- A route is a set of (link, weight) pairs: weight is the fraction of the flow on that link.

Presets (`PRESETS`): "dgx-h100" and "dgx-h200" (8 GPUs per node on an NVSwitch, 450 GB/s each way
per GPU; with nodes > 1, one 400 Gb/s NIC per GPU into a two-tier rail-optimised or fat-tree
fabric with configurable oversubscription) and "h200x2" (the lent machine: 2 H200s joined
directly by NV18, 450 GB/s each way). Explicit topologies load from TOML or GraphML.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import networkx as nx
import numpy as np
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import dijkstra

from moesim.config import ClusterConfig
from moesim.errors import InputError

LINK_KINDS = ("nvlink", "nic", "fabric")
PRESETS = {
    "dgx-h100": "DGX H100: 8 GPUs on NVSwitch (450 GB/s each way per GPU); nodes > 1 add one "
                "NIC per GPU into the cluster.fabric",
    "dgx-h200": "DGX H200: as dgx-h100 (NVLink 4, 450 GB/s each way per GPU)",
    "h200x2": "the lent 2xH200 machine: 2 GPUs joined directly by NV18 (450 GB/s each way)",
}
GB = 1e9
US = 1e-6


@dataclass
class Routes:
    """Routes of a batch of GPU pairs: pair i uses links[ptr[i]:ptr[i+1]] with weights."""

    ptr: np.ndarray       # int64[P + 1]
    links: np.ndarray     # int64[nnz]
    weights: np.ndarray   # float64[nnz]
    latency: np.ndarray   # float64[P]: the route's latency (s), averaged over ECMP paths


@dataclass
class Topology:
    """A validated cluster graph with its links as arrays (index = link id)."""

    graph: nx.DiGraph
    name: str
    gpus: list[str]                 # graph node of each rank
    machine: np.ndarray             # int64[N]: server of each rank
    link_ends: list[tuple[str, str]]
    capacity: np.ndarray            # float64[L], bytes/s
    latency: np.ndarray             # float64[L], s
    link_kind: np.ndarray           # int8[L], index into LINK_KINDS
    nvswitch: bool = False          # GPUs of a machine share an NVSwitch (NVLS possible)
    pxn: bool = False               # cross-rail flows go through the peer on the right rail
    _route_state: dict = field(default_factory=dict, repr=False)
    _reverse: dict = field(default_factory=dict, repr=False)

    @property
    def num_gpus(self) -> int:
        return len(self.gpus)

    @property
    def num_links(self) -> int:
        return len(self.capacity)

    @property
    def num_machines(self) -> int:
        return int(self.machine.max()) + 1

    # --- routing -------------------------------------------------------------------------
    def _prepare_routes(self) -> dict:
        """Switch-level distances and per-hop ECMP splits, attachments of every GPU."""
        st = self._route_state
        if st:
            return st
        g = self.graph
        gpu_set = set(self.gpus)
        switches = sorted(n for n in g.nodes if n not in gpu_set)
        sidx = {s: i for i, s in enumerate(switches)}
        ridx = {n: i for i, n in enumerate(self.gpus)}
        lid = {e: i for i, e in enumerate(self.link_ends)}
        cost_ns = np.maximum(1, np.round(self.latency * 1e9)).astype(np.int64)
        nsw = len(switches)
        rows, cols, vals = [], [], []
        for (u, v), i in lid.items():
            if u in sidx and v in sidx:
                rows.append(sidx[u])
                cols.append(sidx[v])
                vals.append(float(cost_ns[i]))
        if nsw:
            w = csr_matrix((vals, (rows, cols)), shape=(nsw, nsw))
            dist = dijkstra(w, directed=True) if len(vals) else np.full((nsw, nsw), np.inf)
            np.fill_diagonal(dist, 0.0)
        else:
            dist = np.zeros((0, 0))
        # Attachments: GPU -> switch (up) and switch -> GPU (down); direct GPU -> GPU links.
        up: list[list[tuple[int, int, float]]] = [[] for _ in self.gpus]
        down: list[list[tuple[int, int, float]]] = [[] for _ in self.gpus]
        direct = {}
        for (u, v), i in lid.items():
            if u in ridx and v in sidx:
                up[ridx[u]].append((sidx[v], i, float(cost_ns[i])))
            elif u in sidx and v in ridx:
                down[ridx[v]].append((sidx[u], i, float(cost_ns[i])))
            elif u in ridx and v in ridx:
                direct[(ridx[u], ridx[v])] = (i, float(cost_ns[i]))
        n = len(self.gpus)
        au = max([len(a) for a in up] + [1])
        ad = max([len(a) for a in down] + [1])
        up_sw = np.zeros((n, au), np.int64)
        up_link = np.zeros((n, au), np.int64)
        up_cost = np.full((n, au), np.inf)
        down_sw = np.zeros((n, ad), np.int64)
        down_link = np.zeros((n, ad), np.int64)
        down_cost = np.full((n, ad), np.inf)
        for r in range(n):
            for j, (s, i, c) in enumerate(sorted(up[r])):
                up_sw[r, j], up_link[r, j], up_cost[r, j] = s, i, c
            for j, (s, i, c) in enumerate(sorted(down[r])):
                down_sw[r, j], down_link[r, j], down_cost[r, j] = s, i, c
        adj: list[list[tuple[int, int, float]]] = [[] for _ in switches]
        for idx in range(len(rows)):
            u, v = rows[idx], cols[idx]
            adj[u].append((v, lid[(switches[u], switches[v])], vals[idx]))
        st.update(dist=dist, up_sw=up_sw, up_link=up_link, up_cost=up_cost, down_sw=down_sw,
                  down_link=down_link, down_cost=down_cost, direct=direct, adj=adj, nsw=nsw,
                  core={})
        return st

    def _core(self, s: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-hop ECMP split from switch s to switch t: (links, weights)."""
        st = self._route_state
        key = (s, t)
        if key in st["core"]:
            return st["core"][key]
        dist, adj = st["dist"], st["adj"]
        frac = {s: 1.0}
        acc: dict[int, float] = {}
        # Visit switches in decreasing distance to t: all of a node's inflow has arrived.
        frontier = [s]
        order = []
        seen = {s}
        while frontier:
            nxt = []
            for u in frontier:
                order.append(u)
                if u == t:
                    continue
                for v, _i, c in adj[u]:
                    if dist[v, t] + c == dist[u, t] and v not in seen:
                        seen.add(v)
                        nxt.append(v)
            frontier = nxt
        order.sort(key=lambda u: -dist[u, t])
        for u in order:
            f = frac.get(u, 0.0)
            if u == t or f == 0.0:
                continue
            hops = [(v, i) for v, i, c in adj[u] if dist[v, t] + c == dist[u, t]]
            for v, i in hops:
                acc[i] = acc.get(i, 0.0) + f / len(hops)
                frac[v] = frac.get(v, 0.0) + f / len(hops)
        links = np.array(sorted(acc), dtype=np.int64)
        out = (links, np.array([acc[i] for i in links], dtype=np.float64))
        st["core"][key] = out
        return out

    def reverse_links(self) -> np.ndarray | None:
        """int64[L]: the link from v to u of every link u -> v, when every link has one of the
        same capacity, latency and class (presets, bidirectional files); None otherwise."""
        st = self._reverse
        if "reverse" not in st:
            idx = {e: i for i, e in enumerate(self.link_ends)}
            rev = np.array([idx.get((v, u), -1) for u, v in self.link_ends], dtype=np.int64)
            ok = (rev >= 0).all() and np.array_equal(self.capacity[rev], self.capacity) and \
                np.array_equal(self.latency[rev], self.latency) and \
                np.array_equal(self.link_kind[rev], self.link_kind)
            st["reverse"] = rev if ok else None
        return st["reverse"]

    def local_index(self) -> np.ndarray:
        """int64[N]: each rank's index inside its machine (ranks are machine-major)."""
        first = np.searchsorted(self.machine, self.machine)
        return np.arange(self.num_gpus) - first

    def routes(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        """Routes for GPU pairs (src[i] -> dst[i], src != dst), vectorised over the pairs;
        with PXN, a pair between machines and rails is the route to the source machine's GPU
        on the destination's rail followed by that GPU's route to the destination."""
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        if not self.pxn:
            return self._routes(src, dst)
        local = self.local_index()
        first = np.searchsorted(self.machine, self.machine)
        proxy = first[src] + local[dst]
        via = (self.machine[src] != self.machine[dst]) & (local[src] != local[dst])
        if not via.any():
            return self._routes(src, dst)
        idx = np.nonzero(via)[0]
        direct = np.nonzero(~via)[0]
        parts = [(direct, self._routes(src[direct], dst[direct])),
                 (idx, self._routes(src[idx], proxy[idx])),
                 (idx, self._routes(proxy[idx], dst[idx]))]
        return _merge_routes(len(src), parts, self.num_links)

    def _routes(self, src: np.ndarray, dst: np.ndarray) -> Routes:
        st = self._prepare_routes()
        src = np.asarray(src, dtype=np.int64)
        dst = np.asarray(dst, dtype=np.int64)
        p = len(src)
        if (src == dst).any():
            raise ValueError("routes: a pair with src == dst stays on its GPU")
        dist = st["dist"]
        au, ad = st["up_sw"].shape[1], st["down_sw"].shape[1]
        combos = []
        costs = []
        for i in range(au):
            for j in range(ad):
                su, sd = st["up_sw"][src, i], st["down_sw"][dst, j]
                c = st["up_cost"][src, i] + st["down_cost"][dst, j]
                c = c + (dist[su, sd] if dist.size else np.inf)
                combos.append((i, j))
                costs.append(c)
        if st["direct"]:
            keys = np.array(list(st["direct"]), dtype=np.int64)
            vals = np.array([c for _, c in st["direct"].values()])
            dlink = np.array([i for i, _ in st["direct"].values()], dtype=np.int64)
            code = keys[:, 0] * self.num_gpus + keys[:, 1]
            order = np.argsort(code)
            pos = np.searchsorted(code[order], src * self.num_gpus + dst)
            pos = np.minimum(pos, len(code) - 1)
            hit = code[order][pos] == src * self.num_gpus + dst
            dcost = np.where(hit, vals[order][pos], np.inf)
            direct_link = dlink[order][pos]
            costs.append(dcost)
        cost = np.stack(costs, axis=1) if costs else np.full((p, 1), np.inf)
        best = cost.min(axis=1)
        if not np.isfinite(best).all():
            k = int(np.argmin(np.isfinite(best)))
            raise InputError(self.name, "links", f"GPU {self.gpus[src[k]]} (rank {src[k]}) "
                             f"cannot reach GPU {self.gpus[dst[k]]} (rank {dst[k]}): the "
                             "topology is disconnected")
        tie = cost == best[:, None]
        share = 1.0 / tie.sum(axis=1)
        pair_e, link_e, w_e = [], [], []
        for c, (i, j) in enumerate(combos):
            sel = np.nonzero(tie[:, c])[0]
            if not len(sel):
                continue
            wsel = share[sel]
            ul = st["up_link"][src[sel], i]
            dl = st["down_link"][dst[sel], j]
            pair_e += [sel, sel]
            link_e += [ul, dl]
            w_e += [wsel, wsel]
            su, sd = st["up_sw"][src[sel], i], st["down_sw"][dst[sel], j]
            key = su * max(st["nsw"], 1) + sd
            uk, inv = np.unique(key, return_inverse=True)
            parts = [self._core(int(k // max(st["nsw"], 1)), int(k % max(st["nsw"], 1)))
                     for k in uk]
            lens = np.array([len(x[0]) for x in parts], dtype=np.int64)
            if lens.sum():
                cl = np.concatenate([x[0] for x in parts])
                cw = np.concatenate([x[1] for x in parts])
                cptr = np.concatenate([[0], np.cumsum(lens)])
                n_each = lens[inv]
                rep_pair = np.repeat(sel, n_each)
                starts = np.repeat(cptr[inv], n_each)
                offs = np.arange(n_each.sum()) - np.repeat(np.cumsum(n_each) - n_each, n_each)
                pair_e.append(rep_pair)
                link_e.append(cl[starts + offs])
                w_e.append(cw[starts + offs] * np.repeat(wsel, n_each))
        if st["direct"]:
            sel = np.nonzero(tie[:, -1])[0]
            pair_e.append(sel)
            link_e.append(direct_link[sel])
            w_e.append(share[sel])
        pair_a = np.concatenate(pair_e) if pair_e else np.zeros(0, np.int64)
        link_a = np.concatenate(link_e) if link_e else np.zeros(0, np.int64)
        w_a = np.concatenate(w_e) if w_e else np.zeros(0)
        # Merge duplicate (pair, link) entries; order by pair then link (deterministic).
        key = pair_a * self.num_links + link_a
        uk, inv = np.unique(key, return_inverse=True)
        w = np.bincount(inv, weights=w_a, minlength=len(uk))
        pair_u, link_u = uk // self.num_links, uk % self.num_links
        ptr = np.concatenate([[0], np.cumsum(np.bincount(pair_u, minlength=p))]).astype(np.int64)
        lat = np.bincount(pair_u, weights=w * self.latency[link_u], minlength=p)
        return Routes(ptr, link_u.astype(np.int64), w, lat)

    def link_label(self, i: int) -> str:
        u, v = self.link_ends[i]
        return f"{u}->{v}"


def _merge_routes(p: int, parts: list[tuple[np.ndarray, Routes]], num_links: int) -> Routes:
    """Routes of p pairs from pieces (pair indices, their routes): entries of a pair that
    appears in several pieces add up (a PXN pair is its two legs), latencies too."""
    pair_e, link_e, w_e = [], [], []
    lat = np.zeros(p)
    for pairs, r in parts:
        if not len(pairs):
            continue
        counts = np.diff(r.ptr)
        pair_e.append(np.repeat(pairs, counts))
        link_e.append(r.links)
        w_e.append(r.weights)
        np.add.at(lat, pairs, r.latency)
    pair_a = np.concatenate(pair_e)
    link_a = np.concatenate(link_e)
    key = pair_a * num_links + link_a
    uk, inv = np.unique(key, return_inverse=True)
    w = np.bincount(inv, weights=np.concatenate(w_e), minlength=len(uk))
    pair_u, link_u = uk // num_links, uk % num_links
    ptr = np.concatenate([[0], np.cumsum(np.bincount(pair_u, minlength=p))]).astype(np.int64)
    return Routes(ptr, link_u.astype(np.int64), w, lat)


# --- construction and validation ---------------------------------------------------------
def _finish(g: nx.DiGraph, name: str, source: str) -> Topology:
    """Validate the graph and index it: GPUs by rank, links as arrays."""
    if g.number_of_nodes() == 0:
        raise InputError(source, "nodes", "the topology has no nodes")
    gpus = [n for n, d in g.nodes(data=True) if d.get("kind") == "gpu"]
    if not gpus:
        raise InputError(source, "nodes", "no node has kind = \"gpu\"")
    ranks = []
    for n in gpus:
        r = g.nodes[n].get("rank")
        ranks.append(r)
    if all(r is None for r in ranks):
        order = gpus  # declaration order
    else:
        if any(r is None for r in ranks):
            raise InputError(source, "rank", "give every GPU a rank, or none")
        if sorted(int(r) for r in ranks) != list(range(len(gpus))):
            raise InputError(source, "rank", f"GPU ranks must be 0..{len(gpus) - 1}, each once")
        order = [n for _, n in sorted((int(r), n) for r, n in zip(ranks, gpus, strict=True))]
    machine = np.array([int(g.nodes[n].get("machine", 0)) for n in order], dtype=np.int64)
    if (machine < 0).any():
        raise InputError(source, "machine", "machine indices must be >= 0")
    ends, cap, lat, kind = [], [], [], []
    for u, v, d in sorted(g.edges(data=True), key=lambda e: (str(e[0]), str(e[1]))):
        bw, la = d.get("bw"), d.get("latency", 0.0)
        where = f"link {u}->{v}"
        if bw is None or not isinstance(bw, (int, float)) or not math.isfinite(bw) or bw <= 0:
            raise InputError(source, f"{where}.bandwidth",
                             f"must be a positive number, got {bw!r}")
        if not isinstance(la, (int, float)) or not math.isfinite(la) or la < 0:
            raise InputError(source, f"{where}.latency", f"must be >= 0, got {la!r}")
        k = d.get("kind", "fabric")
        if k not in LINK_KINDS:
            raise InputError(source, f"{where}.kind", f"{k!r} is not one of "
                             f"{', '.join(LINK_KINDS)}")
        ends.append((u, v))
        cap.append(float(bw))
        lat.append(float(la))
        kind.append(LINK_KINDS.index(k))
    topo = Topology(g, name, order, machine, ends, np.array(cap), np.array(lat),
                    np.array(kind, dtype=np.int8))
    if len(order) > 1:
        # Every GPU reaches every other: check from rank 0 both ways, then all pairs cheaply
        # through the route builder (raises with the pair that fails).
        n = len(order)
        src = np.repeat(np.arange(n), n)
        dst = np.tile(np.arange(n), n)
        keep = src != dst
        if n <= 128:
            topo.routes(src[keep], dst[keep])
        else:
            others = np.arange(1, n)
            topo.routes(np.zeros(n - 1, np.int64), others)
            topo.routes(others, np.zeros(n - 1, np.int64))
    return topo


def _efficiency(c: ClusterConfig) -> float:
    """`bandwidth_efficiency` scales line rates in the "ideal" network model only; the "nccl"
    model has its own per-class efficiencies (moesim.sim.nccl) and sees line rates."""
    return c.bandwidth_efficiency if c.network_model == "ideal" else 1.0


def _link(g: nx.DiGraph, u: str, v: str, bw: float, lat: float, kind: str) -> None:
    g.add_edge(u, v, bw=bw, latency=lat, kind=kind)
    g.add_edge(v, u, bw=bw, latency=lat, kind=kind)


def dgx_cluster(c: ClusterConfig) -> Topology:
    """DGX nodes (8 GPUs on one NVSwitch each; NVSwitch modelled as one non-blocking crossbar
    with the per-GPU 450 GB/s each way as the only limit) and, with nodes > 1, a two-tier fabric.

    Fabric: every GPU has one NIC of `nic_gbps`. Leaves have `gpus_per_leaf` down ports.
    - rail: leaf (pod p, rail i) connects GPU i of the `gpus_per_leaf` nodes of pod p; flows
      between GPUs of the same rail in a pod stay on the leaf, all others cross a spine.
    - fat-tree: leaf connects `gpus_per_leaf` consecutive GPUs (whole nodes).
    Each leaf has one uplink to each of `spines` spines; uplinks total the down bandwidth
    divided by `oversubscription`. With one leaf no spine is built.
    Ignores: PCIe between GPU and NIC (a NIC runs at line rate), NVSwitch SHARP/multicast,
    switch buffers and the NIC's message rate.
    """
    g = nx.DiGraph()
    gpn = c.gpus_per_node
    eff = _efficiency(c)
    nvl = c.nvlink_gbs * GB * eff
    nic = c.nic_gbps / 8 * GB * eff
    for m in range(c.nodes):
        sw = f"n{m}.nvswitch"
        g.add_node(sw, kind="switch")
        for i in range(gpn):
            gpu = f"n{m}.g{i}"
            g.add_node(gpu, kind="gpu", rank=m * gpn + i, machine=m)
            if gpn > 1:
                _link(g, gpu, sw, nvl, c.nvlink_latency_us * US, "nvlink")
    if gpn == 1:
        g.remove_nodes_from([f"n{m}.nvswitch" for m in range(c.nodes)])
    if c.nodes > 1:
        per_leaf = c.gpus_per_leaf
        leaves: list[str] = []
        for m in range(c.nodes):
            for i in range(gpn):
                r = m * gpn + i
                if c.fabric == "rail":
                    pod = m // per_leaf
                    leaf = f"leaf.p{pod}.r{i}"
                else:
                    leaf = f"leaf{r // per_leaf}"
                if leaf not in g:
                    g.add_node(leaf, kind="switch")
                    leaves.append(leaf)
                _link(g, f"n{m}.g{i}", leaf, nic, c.nic_latency_us * US, "nic")
        if len(leaves) > 1:
            down = per_leaf * nic
            up_each = down / c.oversubscription / c.spines
            for s in range(c.spines):
                g.add_node(f"spine{s}", kind="switch")
                for leaf in leaves:
                    _link(g, leaf, f"spine{s}", up_each, c.fabric_latency_us * US, "fabric")
    topo = _finish(g, f"{c.preset}:{c.nodes}x{gpn}:{c.fabric}", f"preset {c.preset}")
    topo.nvswitch = gpn > 1
    topo.pxn = (c.network_model == "nccl" and c.pxn and c.fabric == "rail" and c.nodes > 1
                and gpn > 1)
    return topo


def h200x2(c: ClusterConfig) -> Topology:
    """The lent machine: 2 H200s joined directly by NV18 (18 NVLink 4 links, 450 GB/s each way).
    Measured NCCL all-to-all reaches 275 GB/s at 512 MiB (DESIGN.md); set
    cluster.bandwidth_efficiency and cluster.collective_latency_us to match measurements."""
    g = nx.DiGraph()
    bw = c.nvlink_gbs * GB * _efficiency(c)
    g.add_node("g0", kind="gpu", rank=0, machine=0)
    g.add_node("g1", kind="gpu", rank=1, machine=0)
    _link(g, "g0", "g1", bw, c.nvlink_latency_us * US, "nvlink")
    return _finish(g, "h200x2", "preset h200x2")


def load_topology_file(path: str | Path) -> Topology:
    """Read an explicit topology: TOML (see docs/simulator.md) or GraphML.

    TOML: `[[node]]` tables with `name`, `kind` ("gpu" or "switch"), optional `rank`, `machine`;
    `[[link]]` tables with `src`, `dst`, `bandwidth_gbs` (GB/s), `latency_us`, optional `kind`
    and `bidirectional` (default true: one edge each way). GraphML: node attributes `kind`,
    `rank`, `machine`; edge attributes `bandwidth_gbs`, `latency_us`, `kind`; an undirected
    GraphML file gives one edge each way.
    """
    path = Path(path)
    src = str(path)
    if not path.exists():
        raise InputError(src, "file", "no such file")
    g = nx.DiGraph()
    if path.suffix == ".toml":
        try:
            raw = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise InputError(src, "toml", f"not valid TOML: {e}") from None
        nodes, links = raw.get("node", []), raw.get("link", [])
        if not isinstance(nodes, list) or not isinstance(links, list):
            raise InputError(src, "node", "expected [[node]] and [[link]] tables")
        for k, nd in enumerate(nodes):
            if not isinstance(nd, dict) or not isinstance(nd.get("name"), str):
                raise InputError(src, f"node[{k}].name", "missing or not a string")
            kind = nd.get("kind", "switch")
            if kind not in ("gpu", "switch"):
                raise InputError(src, f"node[{k}].kind", f"{kind!r} is not gpu or switch")
            attrs = {"kind": kind}
            for a in ("rank", "machine"):
                if a in nd:
                    if not isinstance(nd[a], int) or isinstance(nd[a], bool):
                        raise InputError(src, f"node[{k}].{a}", "must be an integer")
                    attrs[a] = nd[a]
            g.add_node(nd["name"], **attrs)
        for k, ln in enumerate(links):
            if not isinstance(ln, dict):
                raise InputError(src, f"link[{k}]", "must be a table")
            for end in ("src", "dst"):
                if ln.get(end) not in g:
                    raise InputError(src, f"link[{k}].{end}", f"{ln.get(end)!r} is not a node")
            bw = ln.get("bandwidth_gbs")
            if not isinstance(bw, (int, float)) or isinstance(bw, bool) or bw <= 0:
                raise InputError(src, f"link[{k}].bandwidth_gbs",
                                 f"must be a positive number, got {bw!r}")
            lat = ln.get("latency_us", 0.0)
            if not isinstance(lat, (int, float)) or lat < 0:
                raise InputError(src, f"link[{k}].latency_us", f"must be >= 0, got {lat!r}")
            attrs = {"bw": float(bw) * GB, "latency": float(lat) * US,
                     "kind": ln.get("kind", "fabric")}
            g.add_edge(ln["src"], ln["dst"], **attrs)
            if ln.get("bidirectional", True):
                g.add_edge(ln["dst"], ln["src"], **attrs)
    elif path.suffix == ".graphml":
        try:
            raw_g = nx.read_graphml(path)
        except Exception as e:  # networkx raises assorted parse errors
            raise InputError(src, "graphml", f"not readable GraphML: {e}") from None
        for n, d in raw_g.nodes(data=True):
            attrs = {"kind": d.get("kind", "switch")}
            for a in ("rank", "machine"):
                if a in d:
                    attrs[a] = int(d[a])
            g.add_node(n, **attrs)
        for u, v, d in raw_g.edges(data=True):
            bw = d.get("bandwidth_gbs")
            if bw is None:
                raise InputError(src, f"link {u}->{v}.bandwidth_gbs", "missing")
            attrs = {"bw": float(bw) * GB, "latency": float(d.get("latency_us", 0.0)) * US,
                     "kind": d.get("kind", "fabric")}
            g.add_edge(u, v, **attrs)
            if not raw_g.is_directed():
                g.add_edge(v, u, **attrs)
    else:
        raise InputError(src, "file", "topologies load from .toml or .graphml")
    return _finish(g, path.stem, src)


def build_topology(c: ClusterConfig, source: str = "config") -> Topology:
    """The cluster of a config: its explicit topology file, else its preset."""
    if c.topology_file:
        return load_topology_file(c.topology_file)
    if c.preset in ("dgx-h100", "dgx-h200"):
        return dgx_cluster(c)
    if c.preset == "h200x2":
        if c.nodes != 1 or c.gpus_per_node != 2:
            raise InputError(source, "cluster.preset", "h200x2 is one machine with 2 GPUs: "
                             "set nodes = 1 and gpus_per_node = 2")
        return h200x2(c)
    raise InputError(source, "cluster.preset",
                     f"unknown preset {c.preset!r}; known: {', '.join(PRESETS)}")
