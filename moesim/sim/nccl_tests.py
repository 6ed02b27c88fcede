"""nccl-tests tables: read the output of `all_reduce_perf` & co., and write simulated times in
the same format so that both can be read side by side.

nccl-tests conventions (github NVIDIA/nccl-tests, doc/PERFORMANCE.md), which every table here
follows: `size` is the bytes of the buffer the test names (all-reduce: the buffer; all-gather:
the gathered output, n x the per-rank part; reduce-scatter: the input, n x the per-rank
output; all-to-all: each rank's whole send buffer, size/n to every rank); algbw = size / time;
busbw = algbw x 2(n-1)/n for all-reduce and x (n-1)/n for all-gather, reduce-scatter and
all-to-all (the bandwidth one link must carry, comparable with the hardware's).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from moesim.errors import InputError

BINARIES = {"all_reduce_perf": "all_reduce", "all_gather_perf": "all_gather",
            "reduce_scatter_perf": "reduce_scatter", "alltoall_perf": "all_to_all"}
DTYPE_BYTES = {"float": 4, "half": 2, "bfloat16": 2, "double": 8, "int8": 1, "uint8": 1,
               "int32": 4, "uint32": 4, "int64": 8, "uint64": 8, "fp8_e4m3": 1, "fp8_e5m2": 1}


def bus_factor(collective: str, n: int) -> float:
    return 2 * (n - 1) / n if collective == "all_reduce" else (n - 1) / n


@dataclass
class Table:
    """One nccl-tests run: the collective, ranks, nodes, and per size the out-of-place time."""

    collective: str
    ranks: int
    nodes: int
    sizes: list[int] = field(default_factory=list)
    times_us: list[float] = field(default_factory=list)
    dtype: str = "float"
    source: str = ""


def parse(text: str, source: str = "<text>", collective: str = "") -> Table:
    """Read nccl-tests output. The collective comes from the "Collective test starting" line,
    the binary named in the text, or `collective`; ranks and nodes from the "#  Rank" lines
    (the host after "on")."""
    coll = collective
    if not coll:
        m = re.search(r"Collective test starting:\s*(\w+)", text)
        name = m.group(1) if m else next((b for b in BINARIES if b in text), "")
        coll = BINARIES.get(name, "")
    if coll not in BINARIES.values():
        raise InputError(source, "collective", "cannot tell which collective this is; pass "
                         f"--collective ({', '.join(BINARIES.values())})")
    hosts, ranks = set(), 0
    for m in re.finditer(r"#\s*Rank\s+\d+.*?\bon\s+(\S+)\s+device", text):
        ranks += 1
        hosts.add(m.group(1))
    has_root = bool(re.search(r"#\s+size\s+count\s+type\s+redop\s+root", text))
    t = Table(coll, ranks, max(len(hosts), 1), source=source)
    for line in text.splitlines():
        tok = line.split()
        if len(tok) < 5 or not tok[0].isdigit() or not tok[1].isdigit():
            continue
        size, dtype = int(tok[0]), tok[2]
        rest = tok[3:]
        if rest and not _num(rest[0]):      # redop ("sum", "none")
            rest = rest[1:]
        if has_root and rest:               # root (-1)
            rest = rest[1:]
        if len(rest) < 3 or not all(_num(x) for x in rest[:3]) or size <= 0:
            continue
        t.sizes.append(size)
        t.times_us.append(float(rest[0]))
        t.dtype = dtype
    if not t.sizes:
        raise InputError(source, "table", "no nccl-tests result lines (size count type ... "
                         "time algbw busbw)")
    if t.ranks < 2:
        raise InputError(source, "ranks", "no '#  Rank N ... on HOST device' lines: cannot "
                         "tell how many ranks ran (need at least 2)")
    return t


def _num(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def read(path: str | Path, collective: str = "") -> Table:
    path = Path(path)
    if not path.exists():
        raise InputError(str(path), "file", "no such file")
    try:
        text = path.read_text()
    except UnicodeDecodeError:
        raise InputError(str(path), "file", "not a text file") from None
    return parse(text, str(path), collective)


def format_table(collective: str, ranks: int, sizes: list[int], times_us: list[float],
                 header: list[str], dtype: str = "float", notes: list[str] | None = None
                 ) -> str:
    """Times in nccl-tests' layout (out-of-place and in-place columns, the same simulated
    time in both; "#wrong" is N/A: nothing is checked)."""
    eb = DTYPE_BYTES.get(dtype, 4)
    redop = "none" if collective == "all_to_all" else "sum"
    per = 1 if collective == "all_reduce" else ranks
    lines = [f"# {h}" for h in header] + [
        "#",
        "#                                                              out-of-place      "
        "                 in-place          ",
        "#       size         count      type   redop    root     time   algbw   busbw #wrong"
        "     time   algbw   busbw #wrong",
        "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)       "
        "     (us)  (GB/s)  (GB/s)       ",
    ]
    bus = []
    for size, t in zip(sizes, times_us, strict=True):
        alg = size / (t * 1e3)
        b = alg * bus_factor(collective, ranks)
        bus.append(b)
        cell = f"{_t(t):>8s} {alg:7.2f} {b:7.2f}    N/A"
        lines.append(f"{size:12d}  {size // eb // per:12d}  {dtype:>8s}  {redop:>6s}  {-1:6d}"
                     f"  {cell} {cell}")
    lines += ["# Out of bounds values : 0 OK",
              f"# Avg bus bandwidth    : {sum(bus) / max(len(bus), 1):.4g} ", "#"]
    lines += [f"# {n}" for n in notes or []]
    return "\n".join(lines) + "\n"


def _t(us: float) -> str:
    return f"{us:.2f}" if us < 1e4 else f"{us:.0f}"


def parse_size(text: str) -> int:
    """"64K", "1M", "1G", "65536" -> bytes (powers of 1024, as nccl-tests' -b/-e)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*", text, re.I)
    if not m:
        raise InputError("--sizes", text, "want a size like 65536, 64K, 1M or 1G")
    mult = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * mult)


def parse_sizes(text: str) -> list[int]:
    """"64K:1G" (powers of two, as -b 64K -e 1G -f 2), "64K:1G:4" (factor 4) or a list."""
    text = text.strip()
    if ":" in text:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise InputError("--sizes", text, "want MIN:MAX or MIN:MAX:FACTOR")
        lo, hi = parse_size(parts[0]), parse_size(parts[1])
        f = int(parts[2]) if len(parts) == 3 and parts[2].strip().isdigit() else 2
        if lo < 1 or hi < lo or f < 2:
            raise InputError("--sizes", text, "need 1 <= MIN <= MAX and FACTOR >= 2")
        out = []
        s = lo
        while s <= hi:
            out.append(s)
            s *= f
        return out
    sizes = [parse_size(p) for p in text.split(",") if p.strip()]
    if not sizes or min(sizes) < 1:
        raise InputError("--sizes", text, "want at least one positive size")
    return sizes
