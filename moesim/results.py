"""The Result table: what happened in a step, written identically by the simulator and the
runtime so that `analysis` can put simulated and measured steps side by side.

One row per (step, layer, rank, pass, phase): when the phase started and ended on that rank
(seconds from the start of the step), and the bytes it moved, tokens it touched and FLOPs it
did. Phases use the names in PHASES; `stream` says where the phase ran (STREAMS: "compute", or
one of the communication streams COMM_STREAMS).
Files are Parquet or CSV by extension, with the run's metadata (source, strategy, config) kept
in the Parquet key-value metadata or a sidecar `<file>.meta.json` for CSV.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import STRATEGIES
from moesim.errors import InputError

SCHEMA_VERSION = 1
META_KEY = b"moesim.result"

PHASES = (
    "router",         # gate scores and top-k
    "latent_down",    # HP: projection of tokens to the latent (and its backward)
    "latent_up",      # HP: projection of the latent back to d_model
    "permute",        # local gather into expert- or rank-contiguous order
    "dispatch",       # all-to-all of tokens (or latents) to where their experts run
    "expert",         # expert FFN GEMMs
    "combine",        # all-to-all back, and the weighted sum
    "weight_gather",  # FSEP: all-to-all of weight shards to materialise experts
    "grad_scatter",   # FSEP: gradient shards back to their owners
    "grad_sync",      # weight-gradient all-reduce / reduce-scatter (EP and HP data parallel)
    # The rest of a whole training iteration (moesim.sim.decoder costs, the iteration program)
    "embed",          # token embedding (first pipeline stage)
    "attn_norm",      # the norm before attention
    "qkv",            # Q, K, V projections (and RoPE, qk-norm)
    "attention",      # the fused attention core
    "attn_out",       # attention output projection
    "residual",       # the layer's residual adds
    "mlp_norm",       # the norm before the MLP / MoE
    "dense_mlp",      # a dense layer's MLP
    "shared_expert",  # an MoE layer's shared experts
    "final_norm",     # the norm after the last layer
    "lm_head",        # the logits GEMM
    "loss",           # cross-entropy
    "optimizer",      # the AdamW step
    "tp_all_gather",      # tensor/sequence parallel: all-gather before a TP block
    "tp_reduce_scatter",  # sequence parallel: reduce-scatter after a TP block
    "tp_all_reduce",      # tensor parallel without SP: all-reduce after a TP block
    "pp_send",            # pipeline: activations (fwd) or their gradients (bwd) to the next stage
    "dp_all_reduce",      # data parallel: gradient all-reduce (DDP)
    "dp_reduce_scatter",  # data parallel: gradient reduce-scatter (ZeRO / FSDP)
    "dp_all_gather",      # data parallel: weight all-gather (ZeRO-1/2 after the step, ZeRO-3)
)
# "recompute": the forward run again before the backward (activation checkpointing).
PASSES = ("fwd", "bwd", "recompute")
# "comm": collectives on the critical path (expert all-to-alls, tensor parallel); "dp": data
# parallel gradient and weight collectives on their own stream; "pp": pipeline sends.
STREAMS = ("compute", "comm", "dp", "pp")
COMM_STREAMS = ("comm", "dp", "pp")

COLUMNS = {
    "source": "string",      # "sim" or "real"
    "strategy": "string",    # moesim.config.STRATEGIES: "ep", "hp", "fsep", "hpxep"
    "step": "int64",
    "layer": "int64",
    "rank": "int64",
    "pass": "string",
    "phase": "string",
    "stream": "string",
    "start_s": "float64",
    "end_s": "float64",
    "bytes": "int64",
    "tokens": "int64",
    "flops": "float64",
}


def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in COLUMNS.items()})


def check_frame(df: pd.DataFrame, source: str) -> pd.DataFrame:
    """Validate columns, categories and times; return the frame with canonical dtypes."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(source, missing[0], f"missing column; need {', '.join(COLUMNS)}")
    try:
        df = df[list(COLUMNS)].astype(COLUMNS)
    except (ValueError, TypeError) as e:
        raise InputError(source, "columns", f"wrong column type: {e}") from None
    for col, allowed in (("phase", PHASES), ("pass", PASSES), ("stream", STREAMS),
                         ("source", ("sim", "real")), ("strategy", STRATEGIES)):
        bad = ~df[col].isin(allowed)
        if bad.any():
            raise InputError(source, col, f"{df[col][bad].iloc[0]!r} is not one of "
                             f"{', '.join(allowed)}")
    if (df["end_s"] < df["start_s"]).any():
        raise InputError(source, "end_s", "a phase ends before it starts")
    for col in ("bytes", "tokens", "flops"):
        if (df[col] < 0).any():
            raise InputError(source, col, "must be >= 0")
    return df.reset_index(drop=True)


def write_results(df: pd.DataFrame, path: str | Path, meta: dict | None = None) -> None:
    """Write a Result table atomically; `meta` (JSON-able) travels with it."""
    path = Path(path)
    df = check_frame(df, str(path))
    meta_json = json.dumps({"schema_version": SCHEMA_VERSION, **(meta or {})}, sort_keys=True)
    if path.suffix == ".csv":
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False)
        write_text_atomic(path.with_name(path.name + ".meta.json"), meta_json)
    elif path.suffix == ".parquet":
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({META_KEY: meta_json.encode()})
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    else:
        raise InputError(path, "path", "results are written as .parquet or .csv")


def read_results(path: str | Path) -> tuple[pd.DataFrame, dict]:
    """Read and validate a Result table; return it with its metadata."""
    path = Path(path)
    if not path.exists():
        raise InputError(path, "file", "no such file")
    try:
        if path.suffix == ".csv":
            df = pd.read_csv(path)
            side = path.with_name(path.name + ".meta.json")
            meta = json.loads(side.read_text()) if side.exists() else {}
        elif path.suffix == ".parquet":
            table = pq.read_table(path)
            raw = (table.schema.metadata or {}).get(META_KEY, b"{}")
            meta = json.loads(raw)
            df = table.to_pandas()
        else:
            raise InputError(path, "path", "results are read from .parquet or .csv")
    except (pa.ArrowInvalid, OSError, pd.errors.ParserError, json.JSONDecodeError) as e:
        raise InputError(path, "file", f"not a readable result file: {e}") from None
    return check_frame(df, str(path)), meta
