"""Trace files: Parquet (the native form) and long-form CSV (for exchange with other tools).

Parquet layout, schema version 1: one row per (step, layer) with columns

    step: int32, layer: int32, tokens: fixed_size_binary

where `tokens` holds the dense [shard, head, expert] block of counts in C order, little-endian,
as the dtype named in the metadata (uint16 when every count fits, else int32). The file's
key-value metadata holds `moesim.trace` (TraceMeta as JSON) and `moesim.shape`
([shards, heads, experts] and the dtype). A long table with one row per (step, layer, shard,
head, expert) would hold 64x the rows for a 64-expert model: 524M rows, ~12 GB, for a
1000-step x 32-layer x 256-shard trace; `to_long_frame` gives that form when wanted.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.atomic import atomic_path
from moesim.errors import InputError
from traces.schema import CountSummary, Trace, TraceMeta

META_KEY = b"moesim.trace"
SHAPE_KEY = b"moesim.shape"
LONG_COLUMNS = ["step", "layer", "shard", "head", "expert", "tokens"]


def write_trace(trace: Trace, path: str | Path, row_group_steps: int = 64) -> None:
    """Write `trace` to Parquet atomically (a temporary file, then a rename)."""
    path = Path(path)
    c = trace.counts
    steps, layers = c.shape[:2]
    dtype = np.dtype("<u2") if int(c.max(initial=0)) < 2**16 and int(c.min(initial=0)) >= 0 \
        else np.dtype("<i4")
    block = int(np.prod(c.shape[2:])) * dtype.itemsize
    shape_meta = {"shards": c.shape[2], "heads": c.shape[3], "experts": c.shape[4],
                  "dtype": dtype.str}
    schema = pa.schema(
        [("step", pa.int32()), ("layer", pa.int32()), ("tokens", pa.binary(block))],
        metadata={META_KEY: trace.meta.to_json().encode(),
                  SHAPE_KEY: json.dumps(shape_meta).encode()},
    )
    grid_layer = np.tile(np.arange(layers, dtype=np.int32), row_group_steps)
    # One staging buffer for every row group: a fresh large array per group is page-faulted
    # anew each time, which cost more than the cast itself.
    stage = np.empty((min(row_group_steps, steps), *c.shape[1:]), dtype=dtype)
    with atomic_path(path) as tmp:
        with pq.ParquetWriter(tmp, schema, compression="none", use_dictionary=False,
                              write_statistics=False) as writer:
            for s0 in range(0, steps, row_group_steps):
                chunk = c[s0:s0 + row_group_steps]
                rows = chunk.shape[0] * layers
                buf = stage[:chunk.shape[0]]
                np.copyto(buf, chunk, casting="unsafe")
                tokens = pa.FixedSizeBinaryArray.from_buffers(
                    pa.binary(block), rows, [None, pa.py_buffer(buf)])
                step_col = np.repeat(np.arange(s0, s0 + chunk.shape[0], dtype=np.int32), layers)
                writer.write_table(pa.Table.from_arrays(
                    [pa.array(step_col), pa.array(grid_layer[:rows]), tokens], schema=schema))


def read_trace(path: str | Path, validate: bool = True) -> Trace:
    """Read a trace (Parquet, or long-form CSV by extension) and check it."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "no such file")
    if path.suffix == ".csv":
        return read_long_csv(path)
    src = str(path)
    try:
        # Memory-mapped: the plain-encoded pages are read from the page cache in place, ~5x
        # faster than read() into Arrow buffers for a 1 GB trace here.
        pf = pq.ParquetFile(path, memory_map=True)
        table = pf.read()
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(src, "file", f"not a readable Parquet file (truncated?): {e}") from None
    md = pf.schema_arrow.metadata or {}
    if META_KEY not in md or SHAPE_KEY not in md:
        raise InputError(src, "metadata", "missing moesim.trace metadata: not a moesim trace")
    meta = TraceMeta.from_json(md[META_KEY].decode(), src)
    shape = _shape_meta(md[SHAPE_KEY], src)
    for name, tp in (("step", pa.int32()), ("layer", pa.int32())):
        if name not in table.column_names or table.schema.field(name).type != tp:
            raise InputError(src, name, f"missing column or not {tp}")
    dtype = np.dtype(shape["dtype"])
    block = shape["shards"] * shape["heads"] * shape["experts"]
    if "tokens" not in table.column_names or \
            table.schema.field("tokens").type != pa.binary(block * dtype.itemsize):
        raise InputError(src, "tokens", f"missing column or not fixed_size_binary"
                         f"({block * dtype.itemsize})")
    steps_col = table.column("step").to_numpy()
    layers_col = table.column("layer").to_numpy()
    steps, layers = int(steps_col.max(initial=-1)) + 1, int(layers_col.max(initial=-1)) + 1
    if len(steps_col) == 0 or steps * layers != len(steps_col) or steps_col.min() < 0 \
            or layers_col.min() < 0:
        raise InputError(src, "step", "rows do not cover each (step, layer) exactly once")
    order = steps_col.astype(np.int64) * layers + layers_col
    if not np.array_equal(np.sort(order), np.arange(steps * layers)):
        raise InputError(src, "step", "rows do not cover each (step, layer) exactly once")
    # Copy chunk by chunk straight into the int32 array (combining the chunks first costs a
    # second full copy), in pieces small enough to stay in cache while the validation summary
    # (min, max, per-shard totals) reads them again: one pass over the data in all.
    flat = np.empty((steps * layers, block), dtype=np.int32)
    chunks = table.column("tokens").chunks
    starts = np.cumsum([0] + [len(ch) for ch in chunks])
    want = meta.tokens_per_shard * meta.top_k
    piece = max(1, 2**18 // block)

    def copy(i: int) -> CountSummary:
        ch, n = chunks[i], len(chunks[i])
        src = np.frombuffer(ch.buffers()[1], dtype=dtype, count=n * block,
                            offset=ch.offset * block * dtype.itemsize).reshape(n, block)
        parts = []
        for a in range(0, n, piece):
            part = src[a:a + piece]
            flat[starts[i] + a:starts[i] + a + len(part)] = part
            if validate:
                parts.append(CountSummary.of(part.reshape(len(part), -1, shape["experts"]),
                                             want))
        return CountSummary.merge(parts) if parts else CountSummary(0, 0, False)

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        summary = CountSummary.merge(pool.map(copy, range(len(chunks))))
    if np.array_equal(order, np.arange(steps * layers)):  # written in order: no shuffle
        counts = flat
    else:
        counts = np.empty_like(flat)
        counts[order] = flat
    trace = Trace(counts.reshape(steps, layers, shape["shards"], shape["heads"],
                                 shape["experts"]), meta)
    if validate:
        trace.validate(src, summary)
    return trace


def _shape_meta(raw: bytes, src: str) -> dict:
    try:
        shape = json.loads(raw)
    except json.JSONDecodeError as e:
        raise InputError(src, "metadata.shape", f"not valid JSON: {e}") from None
    for key in ("shards", "heads", "experts"):
        if not isinstance(shape.get(key), int) or shape[key] < 1:
            raise InputError(src, f"metadata.shape.{key}", "missing or not a positive integer")
    if shape.get("dtype") not in ("<u2", "<i4"):
        raise InputError(src, "metadata.shape.dtype", f"{shape.get('dtype')!r} not <u2 or <i4")
    return shape


def to_long_frame(trace: Trace) -> pd.DataFrame:
    """One row per (step, layer, shard, head, expert): the DESIGN.md schema, spelled out."""
    idx = np.indices(trace.counts.shape).reshape(5, -1)
    data = dict(zip(LONG_COLUMNS[:5], idx, strict=True))
    data["tokens"] = trace.counts.reshape(-1)
    return pd.DataFrame(data)


def write_long_csv(trace: Trace, path: str | Path) -> None:
    """Long-form CSV with the metadata as a leading '# moesim.trace {json}' comment line."""
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(f"# moesim.trace {trace.meta.to_json()}\n")
            to_long_frame(trace).to_csv(f, index=False)


def read_long_csv(path: str | Path, meta: TraceMeta | None = None) -> Trace:
    """Read long-form CSV (columns step, layer, shard, [head,] expert, tokens). The metadata
    comes from a leading '# moesim.trace {json}' line or from `meta`."""
    src = str(path)
    with open(path) as f:
        first = f.readline()
    if first.startswith("# moesim.trace "):
        meta = TraceMeta.from_json(first[len("# moesim.trace "):], src)
    if meta is None:
        raise InputError(src, "metadata", "no '# moesim.trace {...}' line; pass --top-k and "
                         "--tokens-per-shard")
    try:
        df = pd.read_csv(path, comment="#")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
        raise InputError(src, "file", f"not readable CSV: {e}") from None
    if "head" not in df.columns:
        df["head"] = 0
    missing = [c for c in LONG_COLUMNS if c not in df.columns]
    if missing:
        raise InputError(src, missing[0], f"missing column; need {', '.join(LONG_COLUMNS)}")
    extra = [c for c in df.columns if c not in LONG_COLUMNS]
    if extra:
        raise InputError(src, extra[0], f"unknown column; allowed {', '.join(LONG_COLUMNS)}")
    for col in LONG_COLUMNS:
        if not pd.api.types.is_integer_dtype(df[col]):
            raise InputError(src, col, "must hold integers only")
        if col != "tokens" and (df[col] < 0).any():
            raise InputError(src, col, "indices must be >= 0")
    if (df["tokens"] < 0).any():
        row = int(np.argmax(df["tokens"].to_numpy() < 0))
        raise InputError(src, "tokens", f"negative token count on data row {row + 1}")
    shape = tuple(int(df[c].max()) + 1 for c in LONG_COLUMNS[:5])
    counts = np.zeros(shape, dtype=np.int32)
    idx = tuple(df[c].to_numpy() for c in LONG_COLUMNS[:5])
    np.add.at(counts, idx, df["tokens"].to_numpy(dtype=np.int32))
    dup = df.duplicated(subset=LONG_COLUMNS[:5])
    if dup.any():
        raise InputError(src, "expert", f"duplicate row for one key on data row "
                         f"{int(np.argmax(dup.to_numpy())) + 1}")
    trace = Trace(counts, meta)
    trace.validate(src)
    return trace
