"""NCCL's cost terms, for the flow-level collectives of `moesim.sim.collectives`.

A collective run by algorithm `a` and protocol `p` costs

    t = launch + latency_scale * lat(a, p, collective, ranks, nodes)
        + T_flows(a) / fraction(a, p)

where `T_flows(a)` is the flow-level max-min solution (`moesim.sim.network`) of the bytes the
algorithm moves over the topology, each flow's bytes divided by its link class's saturation
efficiency `eta / (1 + (b_half / b) ** k)` at its size `b`; `lat` and `fraction` are NCCL's
own terms; `launch` is `cluster.collective_latency_us` (host launch and handshake). Like NCCL
(`ncclTopoGetAlgoTime`: the minimum predicted time over the enabled algorithms and
protocols), the model runs every enabled pair and keeps the fastest.

Terms and where each comes from:
- Latency, per algorithm and protocol (`BASE_LAT_US`, `HW_LAT_US`, `latency`): NCCL
  src/graph/tuning.cc (2.19-2.21): a base per (algorithm, protocol) plus a per-step latency of
  the hardware (NVLink or network). Ring: 2(n-1) steps for all-reduce, n-1 for all-gather and
  reduce-scatter, of which 2 * nodes (all-reduce) or nodes - 1 cross the network, and a
  network step is at least 3 x 1 us of proxy overhead with Simple (`getNetOverhead`). Tree:
  2 ((ranks per node - 1) intra + log2(nodes) inter). NVLS: one intra step (plus one inter
  step across nodes). NVLSTree: intra + 2 log2(nodes) inter. `latency_scale` (fitted)
  multiplies the table, which NCCL itself tunes per release.
- Protocol bandwidth (`fraction`): tuning.cc again. LL moves 8 bytes of which 4 are a flag and
  NCCL charges it 1/4 of the bandwidth (ring, multi-node or all-reduce; 1/3 otherwise; tree
  1/3.8); LL128 moves 120 of every 128 bytes: 0.92 on rings (0.7 with one GPU per node), 7/9
  on a single-node tree, 120/128 on a multi-node tree; Simple moves full-size chunks (trees
  keep 0.92). NVLS and NVLSTree run Simple only.
- Algorithm choice (`algorithms`): all-reduce may use ring, tree (several nodes), NVLS (one
  node on an NVSwitch, NVLink SHARP) and NVLSTree (several nodes on NVSwitches); all-gather and
  reduce-scatter use rings (NCCL issue #1083: NVLS reduce-scatter sends S per GPU against
  (n-1)/n S for the ring, so NCCL keeps the ring).
- NVLS bytes: NCCL issue #1083 (S. Jeaugey): an NVLS all-reduce of S on N GPUs sends S + S/N
  and receives S + S/N per GPU through the switch (reduce-scatter by multimem.ld_reduce, then
  all-gather by multimem.st); the flows carry exactly that, at the "nvls" class's efficiency.
- All-to-all as grouped point-to-point (`p2p_peers`): NCCL runs ncclSend/ncclRecv in a group,
  peer by peer in shifts (rank r sends to r + s, receives from r - s), over `p2p_channels`
  channels of at most `p2p_ops_per_channel` operations each (NCCL_MAX_DEV_WORK_P2P_PER_BATCH =
  8), every peer on 2 channels, halved while 2 ranks > 4 p2p channels (src/graph/paths.cc,
  2.28). Peers beyond that concurrency run in later rounds; each round pays one p2p step
  (NCCL's tuner has no p2p entry; the ring Simple step of the slowest hardware crossed is
  used). PXN (rail fabrics, `moesim.sim.topology`) routes a flow to another rail through the
  NVLink peer on the destination's rail (NCCL_PXN_DISABLE=0, the default since 2.12).
- Saturation (`LinkTerms`): per link class (nvlink, nic, nvls), fitted on published
  measurements (docs/validation.md, "Network"), not from NCCL: bandwidth rises with message
  size for reasons the fluid model does not see (channel count chosen by size, pipeline fill,
  chunking). At one class, eta is the fraction of line rate reached by large messages.

Ignored: NCCL's per-channel bandwidth caps (`perChMax*Bw`) and tree correction factors
(the fitted curves absorb them), CollNet / SHARP in the IB switch, PAT (one GPU per node,
2.23+), user buffer registration, CUDA graphs.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path

from moesim.errors import InputError

PROTOCOLS = ("LL", "LL128", "Simple")
ALGORITHMS = ("ring", "tree", "nvls", "nvls_tree")
COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")
LINK_CLASSES = ("nvlink", "nic", "nvls")
NETWORK_DIR = Path(__file__).resolve().parents[2] / "configs" / "network"
US = 1e-6

# NCCL src/graph/tuning.cc: latencies in us. baseLat[algorithm][protocol].
BASE_LAT_US = {
    "tree": {"LL": 6.8, "LL128": 14.0, "Simple": 0.0},
    "ring": {"LL": 6.6, "LL128": 14.0, "Simple": 8.4},
    "nvls": {"LL": 0.0, "LL128": 0.0, "Simple": 0.0},
    "nvls_tree": {"LL": 0.0, "LL128": 0.0, "Simple": 0.0},
}
# hwLat[hardware][algorithm][protocol]: one step on NVLink or the network.
HW_LAT_US = {
    "nvlink": {"tree": {"LL": 0.6, "LL128": 1.25, "Simple": 28.0},
               "ring": {"LL": 0.6, "LL128": 1.9, "Simple": 3.4},
               "nvls": {"Simple": 23.0}, "nvls_tree": {"Simple": 23.0}},
    "net": {"tree": {"LL": 5.0, "LL128": 8.5, "Simple": 28.0},
            "ring": {"LL": 2.7, "LL128": 4.0, "Simple": 14.0},
            "nvls": {"Simple": 18.0}, "nvls_tree": {"Simple": 14.0}},
}
NET_OVERHEAD_US = 1.0   # getNetOverhead (x86 Intel; AMD hosts 2), x3 for Simple


@dataclass(frozen=True)
class LinkTerms:
    """Saturation of one link class: flows of `b` bytes reach `eta / (1 + (half/b)^k)` of
    the line rate."""

    efficiency: float = 1.0
    half_bytes: float = 0.0
    exponent: float = 1.0

    def factor(self, nbytes):
        """Fraction of line rate at message size `nbytes` (scalar or array)."""
        if self.half_bytes <= 0:
            return self.efficiency + 0.0 * nbytes
        return self.efficiency / (1.0 + (self.half_bytes / nbytes) ** self.exponent)


@dataclass(frozen=True)
class NcclTerms:
    """The fitted and the NCCL-given terms of the collective cost model (module docstring).
    `ideal()` turns every term off: no latency table, full protocol bandwidth, no saturation,
    unbounded p2p concurrency; what is left is the plain max-min flow model."""

    name: str = "default"
    latency_scale: float = 1.0
    links: dict = field(default_factory=lambda: {c: LinkTerms() for c in LINK_CLASSES})
    p2p_channels: int = 32
    p2p_ops_per_channel: int = 8
    protocols: tuple = PROTOCOLS
    net_overhead_us: float = NET_OVERHEAD_US
    source: str = ""

    @classmethod
    def ideal(cls) -> NcclTerms:
        return cls(name="ideal", latency_scale=0.0, protocols=("Simple",),
                   p2p_channels=1 << 30, p2p_ops_per_channel=1, net_overhead_us=0.0)

    def link(self, cls: str) -> LinkTerms:
        return self.links.get(cls, LinkTerms())

    def with_links(self, **links: LinkTerms) -> NcclTerms:
        return replace(self, links={**self.links, **links})

    # --- NCCL's terms ----------------------------------------------------------------------
    def fraction(self, algo: str, proto: str, coll: str, nodes: int, ppn: float) -> float:
        """Protocol bandwidth fraction (tuning.cc's model refinements)."""
        if proto == "Simple":
            return 0.92 if algo == "tree" else 1.0
        if algo == "ring":
            if proto == "LL":
                return 1 / 4 if (nodes > 1 or coll == "all_reduce") else 1 / 3
            return 0.7 if ppn < 2 else 0.92
        if algo == "tree":
            if proto == "LL":
                return 0.92 / 3.8
            return 0.92 * (7 / 9 if nodes == 1 else 120 / 128)
        return 1.0

    def latency(self, algo: str, proto: str, coll: str, ranks: int, nodes: int) -> float:
        """Seconds of NCCL's latency term for the collective (x latency_scale)."""
        if self.latency_scale == 0.0 or ranks < 2:
            return 0.0
        intra_hw = "nvlink"
        lat = BASE_LAT_US[algo][proto]
        intra = HW_LAT_US[intra_hw][algo][proto]
        inter = HW_LAT_US["net"][algo][proto]
        ppn = ranks // max(nodes, 1)
        if algo == "ring":
            steps = 2 * (ranks - 1) if coll == "all_reduce" else ranks - 1
            inter_steps = (2 * nodes if nodes > 1 else 0) if coll == "all_reduce" else nodes - 1
            if nodes > 1:
                overhead = self.net_overhead_us * (3 if proto == "Simple" else 1)
                intra = max(intra, overhead)
            lat += (steps - inter_steps) * intra + inter_steps * inter
        elif algo == "tree":
            lat += 2 * ((ppn - 1) * intra + _log2i(nodes) * inter)
        elif algo == "nvls":
            lat = intra + (inter if nodes > 1 else 0.0)
        elif algo == "nvls_tree":
            lat = intra + 2 * _log2i(nodes) * inter
        return self.latency_scale * lat * US

    def algorithms(self, coll: str, nodes: int, nvswitch: bool, nvls: bool) -> list[str]:
        """The algorithms NCCL may pick for the collective on this placement."""
        if coll != "all_reduce":
            return ["ring"]
        algos = ["ring"]
        if nodes > 1:
            algos.append("tree")
        if nvswitch and nvls:
            algos.append("nvls" if nodes == 1 else "nvls_tree")
        return algos

    def protocols_for(self, algo: str) -> tuple:
        return ("Simple",) if algo in ("nvls", "nvls_tree") else self.protocols

    def p2p_peers(self, ranks: int) -> int:
        """Peers a rank exchanges with at once in a grouped send/recv: channels x operations
        per channel / channels per peer (paths.cc: 2 per peer, halved while 2 n > 4 x p2p
        channels)."""
        per_peer = 2
        while per_peer * ranks > self.p2p_channels * 4 and per_peer > 1:
            per_peer //= 2
        return max(1, self.p2p_channels * self.p2p_ops_per_channel // per_peer)

    def p2p_step(self, network: bool) -> float:
        """Seconds one round of grouped send/recv costs (the ring Simple step of the slowest
        hardware crossed: the tuner has no p2p entry)."""
        if self.latency_scale == 0.0:
            return 0.0
        hw = "net" if network else "nvlink"
        lat = HW_LAT_US[hw]["ring"]["Simple"]
        if network:
            lat = max(lat, 3 * self.net_overhead_us)
        return self.latency_scale * lat * US

    # --- files -------------------------------------------------------------------------------
    def to_toml(self, header: list[str]) -> str:
        lines = [f"# {h}" for h in header]
        lines += [f'name = "{self.name}"', f"latency_scale = {self.latency_scale:.6g}",
                  f"p2p_channels = {self.p2p_channels}",
                  f"p2p_ops_per_channel = {self.p2p_ops_per_channel}",
                  f"net_overhead_us = {self.net_overhead_us:.6g}",
                  "protocols = [" + ", ".join(f'"{p}"' for p in self.protocols) + "]",
                  f'source = "{self.source}"']
        for c in LINK_CLASSES:
            lt = self.link(c)
            lines += ["", f"[link.{c}]", f"efficiency = {lt.efficiency:.6g}",
                      f"half_bytes = {lt.half_bytes:.6g}", f"exponent = {lt.exponent:.6g}"]
        return "\n".join(lines) + "\n"


def _log2i(n: int) -> int:
    return math.floor(math.log2(n)) if n > 1 else 0


def load_terms(name: str) -> NcclTerms:
    """Read network terms: a path to a TOML file, or the name of one in configs/network/."""
    path = Path(name)
    if path.suffix != ".toml":
        path = NETWORK_DIR / f"{name}.toml"
    src = str(path)
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in NETWORK_DIR.glob("*.toml")))
        raise InputError(src, "cluster.network_terms", f"no such network terms file (known: "
                         f"{known or 'none'})")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InputError(src, "toml", f"not valid TOML: {e}") from None
    links = {}
    for c in LINK_CLASSES:
        sec = raw.get("link", {}).get(c, {})
        vals = {}
        for k, lo in (("efficiency", 1e-6), ("half_bytes", 0.0), ("exponent", 1e-3)):
            v = sec.get(k, getattr(LinkTerms(), k))
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= lo or \
                    not math.isfinite(v) or (k == "efficiency" and v > 1.0):
                raise InputError(src, f"link.{c}.{k}", f"must be a number >= {lo:g}"
                                 + (" and <= 1" if k == "efficiency" else "") + f", got {v!r}")
            vals[k] = float(v)
        links[c] = LinkTerms(**vals)
    out = {}
    for k, lo, typ in (("latency_scale", 0.0, float), ("p2p_channels", 1, int),
                       ("p2p_ops_per_channel", 1, int), ("net_overhead_us", 0.0, float)):
        v = raw.get(k, getattr(NcclTerms(), k))
        if not isinstance(v, (int, float)) or isinstance(v, bool) or v < lo or \
                (typ is int and int(v) != v):
            raise InputError(src, k, f"must be {'an integer' if typ is int else 'a number'} "
                             f">= {lo}, got {v!r}")
        out[k] = typ(v)
    protos = raw.get("protocols", list(PROTOCOLS))
    if not isinstance(protos, list) or not protos or any(p not in PROTOCOLS for p in protos):
        raise InputError(src, "protocols", f"a non-empty list of {', '.join(PROTOCOLS)}")
    return NcclTerms(name=str(raw.get("name", path.stem)), links=links, protocols=tuple(protos),
                     source=str(raw.get("source", "")), **out)
