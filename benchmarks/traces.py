"""Trace generation, Parquet write and reload at the issue's scale, timed end to end.

    python -m benchmarks.traces [--steps 1000 --layers 32 --shards 256 --experts 64 --repeat 3]

Prints the median of each stage over the repeats and the achieved write/read rate in GB/s of
on-disk bytes; the ceiling for write+read is this disk's sequential bandwidth (measured by
`dd`, printed alongside) and for generation one standard-normal draw per count.

Each repeat writes a new file, as `moesim trace gen --out NEW` does (the previous repeat's file
is deleted outside the timed region). Replacing an existing file costs more on ext4, which
flushes the new file's data when a rename replaces another (auto_da_alloc): that case is timed
once at the end and printed on its own line.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from traces.generators import TraceSpec, generate
from traces.io import read_trace, write_trace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--shards", type=int, default=256)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--tokens-per-shard", type=int, default=4096)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    spec = TraceSpec(kind="zipf", steps=args.steps, layers=args.layers, shards=args.shards,
                     experts=args.experts, top_k=args.top_k,
                     tokens_per_shard=args.tokens_per_shard)
    times: dict[str, list[float]] = {"generate": [], "write": [], "read+validate": []}
    with tempfile.TemporaryDirectory(dir=".") as d:
        path = Path(d) / "bench.parquet"
        for _ in range(args.repeat):
            path.unlink(missing_ok=True)
            t0 = time.perf_counter()
            trace = generate(spec)
            t1 = time.perf_counter()
            write_trace(trace, path)
            t2 = time.perf_counter()
            back = read_trace(path)
            t3 = time.perf_counter()
            assert np.array_equal(back.counts, trace.counts)
            del back
            times["generate"].append(t1 - t0)
            times["write"].append(t2 - t1)
            times["read+validate"].append(t3 - t2)
        t4 = time.perf_counter()
        write_trace(trace, path)
        overwrite = time.perf_counter() - t4
        del trace
        size = path.stat().st_size
        dd = subprocess.run(["dd", "if=/dev/zero", f"of={d}/dd", "bs=16M", "count=64",
                             "conv=fdatasync"], capture_output=True, text=True).stderr
    cells = args.steps * args.layers * args.shards * args.experts
    print(f"trace {args.steps} steps x {args.layers} layers x {args.shards} shards x "
          f"{args.experts} experts = {cells / 1e6:.0f}M counts, file {size / 1e9:.2f} GB, "
          f"{os.cpu_count()} cores, {args.repeat} repeats (median), load average "
          f"{os.getloadavg()[0]:.2f} at the end")
    for stage, ts in times.items():
        med = statistics.median(ts)
        rate = f"{size / med / 1e9:.2f} GB/s" if stage != "generate" else \
            f"{cells / med / 1e6:.0f} M counts/s"
        print(f"  {stage:14s} {med:6.2f} s   {rate}")
    total = sum(statistics.median(ts) for ts in times.values())
    print(f"  {'total':14s} {total:6.2f} s   (target < 10 s)")
    print(f"  {'overwrite':14s} {overwrite:6.2f} s   (write onto an existing file, once)")
    print(f"  disk (dd, 1 GiB, fdatasync): {dd.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
