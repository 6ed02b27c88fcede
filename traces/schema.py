"""The routing trace: for each step and layer, how many tokens each source shard sends to each
expert of each head.

In memory a trace is a dense integer array `counts[step, layer, shard, head, expert]` plus
`TraceMeta`. A standard MoE has one head. Every token of a shard visits `top_k` distinct experts
of each head, so for every (step, layer, shard, head)

    counts.sum(expert) == tokens_per_shard * top_k    and    0 <= counts <= tokens_per_shard.

A trace recorded with S shards is usable for any N ranks that divide S: `aggregate(N)` sums
contiguous groups of S/N shards (rank r holds shards r*S/N .. (r+1)*S/N - 1), which is how a
data-parallel batch is split.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from moesim.errors import InputError

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class TraceMeta:
    model: str
    source: str
    tokens_per_shard: int
    top_k: int
    generator: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> TraceMeta:
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(source, "metadata", f"not valid JSON: {e}") from None
        if not isinstance(raw, dict):
            raise InputError(source, "metadata", "must be a JSON object")
        version = raw.get("schema_version")
        if version != SCHEMA_VERSION:
            raise InputError(source, "metadata.schema_version",
                             f"{version!r} is not supported (this moesim reads {SCHEMA_VERSION})")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise InputError(source, f"metadata.{sorted(unknown)[0]}", "unknown field")
        for key, tp in (("model", str), ("source", str), ("tokens_per_shard", int),
                        ("top_k", int)):
            if not isinstance(raw.get(key), tp) or isinstance(raw.get(key), bool):
                raise InputError(source, f"metadata.{key}", f"missing or not a {tp.__name__}")
        for key in ("tokens_per_shard", "top_k"):
            if raw[key] < 1:
                raise InputError(source, f"metadata.{key}", f"must be >= 1, got {raw[key]}")
        return cls(**raw)


@dataclass(frozen=True)
class CountSummary:
    """What validation needs from a block of counts [..., experts]: the smallest and largest
    count, and whether any (step, layer, shard, head) total differs from tokens x top_k."""

    min: int
    max: int
    bad_total: bool

    @classmethod
    def of(cls, block: np.ndarray, want: int) -> CountSummary:
        if block.size == 0:
            return cls(0, 0, False)
        lo = 0 if block.dtype.kind == "u" else int(block.min())
        return cls(lo, int(block.max()),
                   bool((block.sum(axis=-1, dtype=np.int64) != want).any()))

    @classmethod
    def merge(cls, parts) -> CountSummary:
        parts = list(parts)
        return cls(min(p.min for p in parts), max(p.max for p in parts),
                   any(p.bad_total for p in parts))


@dataclass(frozen=True)
class Trace:
    counts: np.ndarray  # int32 [steps, layers, shards, heads, experts]
    meta: TraceMeta

    @property
    def num_steps(self) -> int:
        return self.counts.shape[0]

    @property
    def num_layers(self) -> int:
        return self.counts.shape[1]

    @property
    def num_shards(self) -> int:
        return self.counts.shape[2]

    @property
    def num_heads(self) -> int:
        return self.counts.shape[3]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[4]

    @property
    def tokens_per_step(self) -> int:
        return self.meta.tokens_per_shard * self.num_shards

    def validate(self, source: str, summary: CountSummary | None = None) -> None:
        """Check the invariants in the module docstring; raise InputError on the first breach.
        `summary`: the counts' CountSummary when the caller already streamed them (the trace
        reader does, while copying); the bad entry is located only when there is one."""
        c = self.counts
        if c.ndim != 5:
            raise InputError(source, "counts", f"expected 5 dimensions, got shape {c.shape}")
        if not np.issubdtype(c.dtype, np.integer):
            raise InputError(source, "counts", f"expected integer counts, got {c.dtype}")
        if min(c.shape) == 0:
            raise InputError(source, "counts", f"empty trace, shape {c.shape}")
        if self.meta.top_k > self.num_experts:
            raise InputError(source, "metadata.top_k",
                             f"{self.meta.top_k} exceeds the {self.num_experts} experts per head")
        want = self.meta.tokens_per_shard * self.meta.top_k
        cap = self.meta.tokens_per_shard
        if summary is None:
            # One pass per step slice on a thread per core (numpy releases the GIL).
            step = max(1, -(-c.shape[0] // (os.cpu_count() or 1)))
            with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
                summary = CountSummary.merge(pool.map(
                    lambda i: CountSummary.of(c[i:i + step], want),
                    range(0, c.shape[0], step)))
        names = ("step", "layer", "shard", "head", "expert")
        if summary.min < 0:
            where = ", ".join(f"{n} {i}" for n, i in zip(names, np.argwhere(c < 0)[0], strict=True))
            raise InputError(source, "tokens", f"negative token count at {where}")
        if summary.max > cap:
            where = ", ".join(f"{n} {i}" for n, i in zip(names, np.argwhere(c > cap)[0],
                                                          strict=True))
            raise InputError(source, "tokens", f"count at {where} exceeds tokens_per_shard = "
                             f"{cap} (a token visits distinct experts)")
        if summary.bad_total:
            totals = c.sum(axis=4, dtype=np.int64)
            s, ly, sh, h = np.argwhere(totals != want)[0]
            got = totals[s, ly, sh, h]
            raise InputError(source, "tokens",
                             f"step {s} layer {ly} shard {sh} head {h} sends {got} "
                             f"token-expert pairs; tokens_per_shard x top_k = {want}")

    def aggregate(self, ranks: int) -> Trace:
        """Sum contiguous shard groups so the trace has `ranks` shards; counts are conserved."""
        s = self.num_shards
        if ranks < 1 or s % ranks:
            raise InputError(self.meta.source, "ranks",
                             f"{ranks} ranks do not divide the trace's {s} shards")
        if ranks == s:
            return self
        g = s // ranks
        shape = (self.num_steps, self.num_layers, ranks, g, self.num_heads, self.num_experts)
        counts = self.counts.reshape(shape).sum(axis=3, dtype=np.int32)
        meta = dataclasses.replace(self.meta, tokens_per_shard=self.meta.tokens_per_shard * g)
        return Trace(counts, meta)

    def select(self, steps: np.ndarray | None = None, layers: np.ndarray | None = None) -> Trace:
        """Keep the given step and layer indices (in that order; repeats allowed)."""
        c = self.counts
        if steps is not None:
            c = c[np.asarray(steps)]
        if layers is not None:
            c = c[:, np.asarray(layers)]
        return Trace(np.ascontiguousarray(c), self.meta)

    def resample(self, num_steps: int | None = None, num_layers: int | None = None) -> Trace:
        """Pick `num_steps` steps and `num_layers` layers spread evenly over the trace; when more
        are asked for than the trace has, its steps (layers) are repeated in order."""
        return self.select(
            None if num_steps is None else _spread(self.num_steps, num_steps),
            None if num_layers is None else _spread(self.num_layers, num_layers),
        )

    def expert_load(self) -> np.ndarray:
        """Tokens each expert receives: [steps, layers, heads, experts], summed over shards."""
        return self.counts.sum(axis=2, dtype=np.int64)


def _spread(have: int, want: int) -> np.ndarray:
    if want < 1:
        raise InputError("resample", "count", f"must be >= 1, got {want}")
    if want <= have:
        return (np.arange(want) * have) // want
    return np.arange(want) % have
