"""Plan files: per (step, layer) the replicas of a Placement and how they were found.

JSON, schema version 1:

    {"schema_version": 1, "kind": "moesim.plan", "strategy": "fsep", "num_ranks": N,
     "num_experts": E_total, "slots_per_rank": C, "meta": {...},
     "entries": [{"step": s, "layer": l, "replicas": [[expert, rank, share, slots], ...],
                  "routing": "shares" | "node_local", "node_size": G, "stats": {...}}, ...]}

`slots` (slots the replica fills, duplicates allowed; default 1), `routing` (default
"shares") and `node_size` (default 0) are optional, so schema-1 files without them still load.

`read_plan` validates everything (types, ranges, every expert served, shares summing to 1,
slots) and raises InputError naming the file and the field; `write_plan` writes atomically.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesim.atomic import write_text_atomic
from moesim.config import STRATEGIES
from moesim.errors import InputError
from planner.placement import Placement

SCHEMA_VERSION = 1
KIND = "moesim.plan"


@dataclass(frozen=True, eq=False)
class Plan:
    strategy: str
    num_ranks: int
    num_experts: int
    slots_per_rank: int
    placements: dict[tuple[int, int], Placement]
    stats: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def placement(self, step: int, layer: int) -> Placement:
        """The placement of (step, layer); InputError if the plan has none."""
        try:
            return self.placements[step, layer]
        except KeyError:
            raise InputError("plan", "entries", f"no entry for step {step} layer {layer}") \
                from None


def _jsonable(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN
    if isinstance(v, np.generic):
        return _jsonable(v.item())
    return v


def plan_to_dict(plan: Plan) -> dict:
    entries = []
    for (s, ly), p in sorted(plan.placements.items()):
        reps = [[int(e), int(r), float(sh), int(k)] for e, r, sh, k in
                zip(p.replica_expert, p.replica_rank, p.replica_share, p.replica_slots,
                    strict=True)]
        stats = {k: _jsonable(v) for k, v in plan.stats.get((s, ly), {}).items()}
        entries.append({"step": s, "layer": ly, "replicas": reps, "routing": p.routing,
                        "node_size": p.node_size, "stats": stats})
    return {"schema_version": SCHEMA_VERSION, "kind": KIND, "strategy": plan.strategy,
            "num_ranks": plan.num_ranks, "num_experts": plan.num_experts,
            "slots_per_rank": plan.slots_per_rank, "meta": plan.meta, "entries": entries}


def write_plan(plan: Plan, path: str | Path) -> None:
    write_text_atomic(path, json.dumps(plan_to_dict(plan), indent=1, allow_nan=False) + "\n")


def _int(raw: dict, key: str, src: str, where: str, lo: int = 0) -> int:
    v = raw.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v < lo:
        raise InputError(src, f"{where}{key}", f"missing or not an integer >= {lo}: {v!r}")
    return v


def read_plan(path: str | Path) -> Plan:
    """Read and validate a plan file."""
    path = Path(path)
    src = str(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(src, "file", "no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(src, "file", f"not valid JSON: {e}") from None
    return plan_from_dict(raw, src)


def plan_from_dict(raw: Any, src: str = "<plan>") -> Plan:
    if not isinstance(raw, dict):
        raise InputError(src, "file", "must be a JSON object")
    if raw.get("kind") != KIND:
        raise InputError(src, "kind", f"{raw.get('kind')!r} is not {KIND!r}: not a plan file")
    if raw.get("schema_version") != SCHEMA_VERSION:
        raise InputError(src, "schema_version", f"{raw.get('schema_version')!r} is not "
                         f"supported (this moesim reads {SCHEMA_VERSION})")
    strategy = raw.get("strategy")
    if strategy not in STRATEGIES:
        raise InputError(src, "strategy", f"{strategy!r} is not one of {', '.join(STRATEGIES)}")
    n = _int(raw, "num_ranks", src, "", 1)
    e_total = _int(raw, "num_experts", src, "", 1)
    slots = _int(raw, "slots_per_rank", src, "", 1)
    meta = raw.get("meta", {})
    if not isinstance(meta, dict):
        raise InputError(src, "meta", "must be an object")
    entries = raw.get("entries")
    if not isinstance(entries, list):
        raise InputError(src, "entries", "missing or not a list")
    placements: dict[tuple[int, int], Placement] = {}
    stats: dict[tuple[int, int], dict] = {}
    for i, ent in enumerate(entries):
        where = f"entries[{i}]"
        if not isinstance(ent, dict):
            raise InputError(src, where, "must be an object")
        key = (_int(ent, "step", src, f"{where}."), _int(ent, "layer", src, f"{where}."))
        if key in placements:
            raise InputError(src, where, f"second entry for step {key[0]} layer {key[1]}")
        reps = ent.get("replicas")
        ok = isinstance(reps, list) and len(reps) > 0 and all(
            isinstance(t, list) and len(t) in (3, 4)
            and all(isinstance(v, int) and not isinstance(v, bool) for v in t[:2] + t[3:])
            and isinstance(t[2], (int, float)) and not isinstance(t[2], bool) for t in reps)
        if not ok:
            raise InputError(src, f"{where}.replicas",
                             "must be a non-empty list of [expert, rank, share(, slots)]")
        arr = np.array([t[:3] + (t[3:] or [1]) for t in reps], dtype=np.float64)
        routing = ent.get("routing", "shares")
        node_size = ent.get("node_size", 0)
        if not isinstance(node_size, int) or isinstance(node_size, bool):
            raise InputError(src, f"{where}.node_size", "must be an integer")
        try:
            p = Placement(strategy, n, e_total, arr[:, 0].astype(np.int64),
                          arr[:, 1].astype(np.int64), arr[:, 2], source=src,
                          replica_slots=arr[:, 3].astype(np.int64), routing=routing,
                          node_size=node_size)
        except InputError as e:
            raise InputError(src, f"{where}.{e.field}", e.message) from None
        used = p.slots_per_rank()
        if strategy == "fsep" and used.max() > slots:
            raise InputError(src, f"{where}.replicas", f"rank {int(used.argmax())} fills "
                             f"{int(used.max())} slots, more than slots_per_rank = {slots}")
        st = ent.get("stats", {})
        if not isinstance(st, dict):
            raise InputError(src, f"{where}.stats", "must be an object")
        placements[key] = p
        stats[key] = st
    return Plan(strategy, n, e_total, slots, placements, stats, meta)
