"""Small explicit topologies for the simulator tests."""

from __future__ import annotations

from pathlib import Path


def write_toml(path: Path, nodes: list[tuple[str, str]], links: list[tuple]) -> Path:
    """nodes: (name, kind); links: (src, dst, GB/s[, latency_us])."""
    lines = []
    for name, kind in nodes:
        lines += ["[[node]]", f'name = "{name}"', f'kind = "{kind}"', ""]
    for ln in links:
        src, dst, bw = ln[:3]
        lat = ln[3] if len(ln) > 3 else 0.0
        lines += ["[[link]]", f'src = "{src}"', f'dst = "{dst}"', f"bandwidth_gbs = {bw}",
                  f"latency_us = {lat}", ""]
    path.write_text("\n".join(lines))
    return path


def star(path: Path, n: int, bw: float, lat: float = 0.0) -> Path:
    """n GPUs on one non-blocking switch, each link `bw` GB/s each way."""
    nodes = [(f"g{i}", "gpu") for i in range(n)] + [("sw", "switch")]
    return write_toml(path, nodes, [(f"g{i}", "sw", bw, lat) for i in range(n)])


def dumbbell(path: Path, access: float, bottleneck: float) -> Path:
    """g0, g1 on switch a; g2, g3 on switch b; a-b is the bottleneck."""
    nodes = [(f"g{i}", "gpu") for i in range(4)] + [("a", "switch"), ("b", "switch")]
    links = [("g0", "a", access), ("g1", "a", access), ("g2", "b", access),
             ("g3", "b", access), ("a", "b", bottleneck)]
    return write_toml(path, nodes, links)
