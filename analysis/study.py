"""Studies: a TOML file (configs/studies/*.toml, format in configs/studies/README.md) names a
base config and routing, axes to sweep, arms (strategy + overrides), and what to report; this
module expands it into runs, simulates them, and writes their configs, Result tables and summary.
`moesim study run FILE` and `python -m analysis.reproduce` both go through `run_study`.

    study = load_study("configs/studies/seed-fsep.toml")
    for run in study.runs: ...                     # one per (axis points x arm)
    run_study(study)                               # OUT/configs, OUT/results, OUT/summary.csv

Runners (an arm's `runner`): "simulate" (moesim.sim, every step of `run.steps`) and "layout"
(planner only: the per-GPU expert load of each step's placement, no simulation). Runs whose
config, routing and runner are identical are simulated once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.study_expr import Expr
from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import SECTIONS, Config, config_from_dict, config_to_dict
from moesim.errors import InputError

SOURCES = {
    "paper-code": "the paper's public code",
    "artifact": "the paper's artifact (its scripts and the data behind its figures)",
    "paper": "the paper's text (abstract)",
    "seed": "the seed summary only: these shapes, cluster or figures appear nowhere in the "
            "paper's code or artifact",
    "moesim": "moesim's own study (no paper claim)",
}
RUNNERS = ("simulate", "layout")
NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
IDENT = re.compile(r"^[a-z][a-z0-9_]*$")  # arms and axes: expressions name them
LAYOUT_COLUMNS = ["step", "layer", "rank", "tokens"]


def _err(source: object, field_: str, msg: str) -> InputError:
    return InputError(source, field_, msg)


def _take(table: Any, allowed: dict[str, type | tuple[type, ...]], source: object, where: str,
          required: Iterable[str] = ()) -> dict[str, Any]:
    """Check a TOML table's keys and value types; return it."""
    if not isinstance(table, dict):
        raise _err(source, where, "must be a table")
    for k, v in table.items():
        if k not in allowed:
            raise _err(source, f"{where}.{k}" if where else k,
                       f"unknown key; allowed: {', '.join(allowed)}")
        tp = allowed[k]
        if not isinstance(v, tp) or (isinstance(v, bool) and bool not in
                                     (tp if isinstance(tp, tuple) else (tp,))):
            raise _err(source, f"{where}.{k}" if where else k,
                       f"expected {getattr(tp, '__name__', tp)}, got {v!r}")
    for k in required:
        if k not in table:
            raise _err(source, f"{where}.{k}" if where else k, "required")
    return table


# ---------------------------------------------------------------------------------------------
# The study file, expanded.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Run:
    """One simulated (or laid-out) run: config, routing, runner and labels."""

    key: str
    arm: str
    runner: str
    config: dict[str, dict[str, Any]]  # every section, every field
    trace: dict[str, Any]
    labels: dict[str, Any]
    layout: dict[str, Any] = field(default_factory=dict)

    @property
    def strategy(self) -> str:
        return self.config["parallel"]["strategy"]

    def digest(self) -> str:
        blob = json.dumps([self.runner, self.config, self.trace, self.layout], sort_keys=True,
                          default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Study:
    path: Path
    name: str
    title: str
    paper: str
    source: str
    source_note: str
    assumptions: list[str]
    order: int
    runs: list[Run]
    out: Path
    figures: Path
    summary_file: str
    report: dict[str, Any]  # summary, table, values, claim, figure, reference: as in the file
    issue: str = ""
    root: Path = Path(".")

    @property
    def file(self) -> str:
        """The study file as written in docs: relative to the root when inside it."""
        try:
            return self.path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return self.path.as_posix()

    def results_path(self, run: Run) -> Path:
        return self.out / "results" / f"{run.key}.parquet"

    def config_path(self, run: Run) -> Path:
        return self.out / "configs" / f"{run.key}.toml"


def _defaults() -> dict[str, dict[str, Any]]:
    return {name: dataclasses.asdict(cls()) for name, cls in SECTIONS.items()}


def _apply(raw: dict[str, dict[str, Any]], sets: dict[str, Any], source: object,
           where: str, exprs: list[tuple[str, Expr]]) -> None:
    """Dotted overrides into `raw`; values written "= expr" are queued in `exprs`."""
    for dotted, value in sets.items():
        section, _, name = dotted.partition(".")
        if section not in raw or name not in raw[section]:
            raise _err(source, f"{where}.{dotted}", "no such config field")
        if isinstance(value, str) and value.startswith("="):
            exprs.append((dotted, Expr(value[1:], source, f"{where}.{dotted}")))
        else:
            raw[section][name] = value


def _resolve(raw: dict[str, dict[str, Any]], exprs: list[tuple[str, Expr]],
             source: object) -> Config:
    """Evaluate the queued "= expr" fields in order (each sees the ones before), validate."""
    for dotted, expr in exprs:
        def lookup(name: str, attr: str | None, _e: Expr = expr) -> Any:
            if attr is None or name not in raw or attr not in raw[name]:
                raise _err(source, _e.field, f"{_e.text!r}: {name}.{attr} is not a config "
                           "field")
            return raw[name][attr]
        section, _, name = dotted.partition(".")
        value = expr(lookup)
        if isinstance(value, float) and value.is_integer() and isinstance(raw[section][name],
                                                                          int):
            value = int(value)
        raw[section][name] = value
    return config_from_dict(raw, str(source))


# Trace sources beside a generator `kind`: a trace `file`, a recorded trace to `import`
# (traces.importers: import = FORMAT, src = PATH, read where it lies, never copied), or a
# `fit` JSON (traces.fit) to generate from. Each may pick evenly spread `steps` and a list
# of `layers`; an axis point or arm giving only those keys narrows the source it merges into.
TRACE_SOURCES = ("kind", "file", "import", "fit")
SOURCE_KEYS = {"file": {"file", "steps", "layers"},
               "import": {"import", "src", "top_k", "steps", "layers"},
               "fit": {"fit", "steps", "layers"}}
SELECT_KEYS = ("steps", "layers")


def _trace_table(t: Any, source: object, where: str) -> dict[str, Any]:
    if not isinstance(t, dict):
        raise _err(source, where, "must be a table (kind = ..., or file = ...)")
    given = [k for k in TRACE_SOURCES if k in t]
    if len(given) > 1:
        raise _err(source, where, f"one source: {' or '.join(given)}")
    if not given:
        if set(t) <= set(SELECT_KEYS):
            return dict(t)  # narrows a source given elsewhere (checked once merged)
        raise _err(source, where, "needs kind (a generator), file (a trace), import (a "
                   "recorded trace) or fit (a fit JSON)")
    if given[0] in SOURCE_KEYS:
        extra = set(t) - SOURCE_KEYS[given[0]]
        if extra:
            raise _err(source, f"{where}.{sorted(extra)[0]}", f"not a key of a "
                       f"{given[0]} trace; allowed: {', '.join(sorted(SOURCE_KEYS[given[0]]))}")
        if given[0] == "import" and "src" not in t:
            raise _err(source, f"{where}.src", "an imported trace needs src (its path)")
    if "layers" in t and not (isinstance(t["layers"], list) and t["layers"] and all(
            isinstance(x, int) and x >= 0 for x in t["layers"])):
        raise _err(source, f"{where}.layers", "a list of layer indices")
    if "steps" in t and not (isinstance(t["steps"], int) and t["steps"] >= 1):
        raise _err(source, f"{where}.steps", "a positive number of steps")
    return dict(t)


def _matches(labels: dict[str, Any], where: dict[str, Any]) -> bool:
    for k, v in where.items():
        allowed = v if isinstance(v, list) else [v]
        if labels.get(k) not in allowed:
            return False
    return True


def load_study(path: str | Path, root: str | Path | None = None) -> Study:
    """Read, check and expand a study file. Relative paths in it (base config, trace files,
    outputs) are taken from `root` (default: the current directory)."""
    path = Path(path)
    root = Path(root) if root is not None else Path.cwd()
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise _err(path, "file", "no such study file") from None
    except tomllib.TOMLDecodeError as e:
        raise _err(path, "toml", str(e)) from None
    src = path
    _take(raw, {"study": dict, "outputs": dict, "base": dict, "axis": list, "arm": list,
                "reference": dict, "summary": dict, "table": list, "values": dict,
                "claim": list, "figure": list}, src, "", required=("study", "arm"))
    st = _take(raw["study"], {"name": str, "title": str, "paper": str, "source": str,
                              "source_note": str, "assumptions": list, "order": int, "key": str,
                              "issue": str}, src, "study", required=("name", "title", "source"))
    name = st["name"]
    if not NAME.match(name):
        raise _err(src, "study.name", f"{name!r}: lower-case letters, digits, '-', '_' only")
    if st["source"] not in SOURCES:
        raise _err(src, "study.source", f"{st['source']!r} is not one of {', '.join(SOURCES)}")
    if not all(isinstance(a, str) for a in st.get("assumptions", [])):
        raise _err(src, "study.assumptions", "a list of strings")
    outs = _take(raw.get("outputs", {}), {"dir": str, "figures": str, "summary": str}, src,
                 "outputs")
    out = root / outs.get("dir", f"docs/reproduction/{name}")
    figures = root / outs.get("figures", "docs/figures")

    base = _take(raw.get("base", {}), {"config": str, "trace": dict, "set": dict,
                                       **{s: dict for s in SECTIONS}}, src, "base")
    base_raw = _defaults()
    if "config" in base:
        cpath = root / base["config"]
        try:
            file_raw = tomllib.loads(cpath.read_text())
        except (FileNotFoundError, tomllib.TOMLDecodeError) as e:
            raise _err(src, "base.config", f"{base['config']}: {e}") from None
        config_from_dict(file_raw, str(cpath))  # its own errors name its own file
        for s, vals in file_raw.items():
            base_raw[s].update(vals)
    for s in SECTIONS:
        for k, v in base.get(s, {}).items():
            if k not in base_raw[s]:
                raise _err(src, f"base.{s}.{k}", "no such config field")
            base_raw[s][k] = v
    base_exprs: list[tuple[str, Expr]] = []
    _apply(base_raw, base.get("set", {}), src, "base.set", base_exprs)
    base_trace = _trace_table(base["trace"], src, "base.trace") if "trace" in base else None

    axes = []
    for i, ax in enumerate(raw.get("axis", [])):
        where = f"axis[{i}]"
        _take(ax, {"name": str, "point": list}, src, where, required=("name", "point"))
        if not IDENT.match(ax["name"]):
            raise _err(src, f"{where}.name", f"{ax['name']!r}: not a plain name")
        points = []
        for j, pt in enumerate(ax["point"]):
            pw = f"{where}.point[{j}]"
            _take(pt, {"label": (str, int, float), "set": dict, "trace": dict, "labels": dict},
                  src, pw, required=("label",))
            points.append(pt)
        if not points:
            raise _err(src, f"{where}.point", "an axis needs at least one point")
        axes.append((ax["name"], points))

    arms = []
    seen_arms = set()
    for i, arm in enumerate(raw["arm"]):
        where = f"arm[{i}]"
        _take(arm, {"name": str, "strategy": str, "runner": str, "set": dict, "trace": dict,
                    "labels": dict, "only": dict, "no_dedup_reason": str, "layout": dict},
              src, where, required=("name",))
        if not IDENT.match(arm["name"]) or arm["name"] in seen_arms or arm["name"] in SECTIONS:
            raise _err(src, f"{where}.name", f"{arm['name']!r}: unique, lower-case letters, "
                       "digits and '_' (expressions name it), not a config section")
        seen_arms.add(arm["name"])
        if arm.get("runner", "simulate") not in RUNNERS:
            raise _err(src, f"{where}.runner", f"one of {', '.join(RUNNERS)}")
        _take(arm.get("layout", {}), {"plan_from": str}, src, f"{where}.layout")
        if arm.get("layout", {}).get("plan_from", "previous") not in ("previous", "same"):
            raise _err(src, f"{where}.layout.plan_from", "'previous' (the step before, as "
                       "LAER-MoE plans) or 'same' (an oracle)")
        arms.append(arm)
    if not arms:
        raise _err(src, "arm", "a study needs at least one arm")

    template = st.get("key")
    runs: list[Run] = []
    keys: set[str] = set()
    for combo in itertools.product(*[[(n, p) for p in pts] for n, pts in axes]):
        for i, arm in enumerate(arms):
            where = f"arm[{i}]"
            labels: dict[str, Any] = {}
            for axis_name, pt in combo:
                labels[axis_name] = pt["label"]
                labels.update(pt.get("labels", {}))
            if not _matches(labels, arm.get("only", {})):
                continue
            labels.update(arm.get("labels", {}))
            labels["arm"] = arm["name"]
            cfg_raw = json.loads(json.dumps(base_raw))
            exprs = list(base_exprs)
            trace = dict(base_trace) if base_trace else None
            for axis_name, pt in combo:
                _apply(cfg_raw, pt.get("set", {}), src, f"axis {axis_name}={pt['label']}.set",
                       exprs)
                if "trace" in pt:
                    trace = _merge_trace(trace, pt["trace"], src, f"axis {axis_name}.trace")
            if "strategy" in arm:
                cfg_raw["parallel"]["strategy"] = arm["strategy"]
            _apply(cfg_raw, arm.get("set", {}), src, f"{where}.set", exprs)
            if "trace" in arm:
                trace = _merge_trace(trace, arm["trace"], src, f"{where}.trace")
            if trace is None or not any(k in trace for k in TRACE_SOURCES):
                raise _err(src, "base.trace", "no routing: give base.trace (or a trace on "
                           "every arm or axis point)")
            key_parts = [str(pt["label"]) for _, pt in combo] + [arm["name"]]
            key = template.format(**labels) if template else "-".join(key_parts)
            key = re.sub(r"[^A-Za-z0-9_.-]+", "_", key)
            if key in keys:
                raise _err(src, "study.key", f"two runs are both named {key!r}")
            keys.add(key)
            cfg = _resolve(cfg_raw, exprs, f"{path}:{key}")
            d = config_to_dict(cfg)
            labels["strategy"] = d["parallel"]["strategy"]
            _baseline_rule(d, arm, src, where)
            runs.append(Run(key, arm["name"], arm.get("runner", "simulate"), d, trace,
                            labels, dict(arm.get("layout", {}))))
    if not runs:
        raise _err(src, "arm.only", "no run is left after the arms' `only` filters")
    report = {k: raw[k] for k in ("reference", "summary", "table", "values", "claim", "figure")
              if k in raw}
    _check_report(report, src, runs)
    return Study(path, name, st["title"], st.get("paper", ""), st["source"],
                 st.get("source_note", ""), list(st.get("assumptions", [])),
                 st.get("order", 100), runs, out, figures, outs.get("summary", "summary.csv"),
                 report, st.get("issue", ""), root)


def _merge_trace(base: dict | None, new: Any, src: object, where: str) -> dict:
    new = dict(new) if isinstance(new, dict) else new
    if not isinstance(new, dict):
        raise _err(src, where, "must be a table")
    if base is None or any(k in new for k in TRACE_SOURCES) or set(new) <= set(SELECT_KEYS):
        new = _trace_table(new, src, where)
    if base is None:
        return new
    if any(k in new for k in TRACE_SOURCES):
        # A new source; a narrowing given before it (an axis point's layers) still applies.
        if not any(k in base for k in TRACE_SOURCES):
            return _trace_table({**base, **new}, src, where)
        return new
    return {**base, **new}


def _baseline_rule(cfg: dict, arm: dict, src: object, where: str) -> None:
    """Baselines are the strongest reasonable configuration: multi-node EP sends each token
    once per node (parallel.ep_dedup), unless the arm says why not."""
    if (cfg["parallel"]["strategy"] == "ep" and cfg["cluster"]["nodes"] > 1
            and not cfg["parallel"]["ep_dedup"] and not arm.get("no_dedup_reason")):
        raise _err(src, f"{where}.no_dedup_reason", "a multi-node EP arm without "
                   "parallel.ep_dedup needs a reason (production EP sends a token once per "
                   "node)")


def _check_report(report: dict, src: object, runs: list[Run]) -> None:
    """The report sections' shape (their expressions are checked again when evaluated)."""
    from analysis import study_report  # the report module owns the vocabulary
    study_report.check(report, src, runs)


# ---------------------------------------------------------------------------------------------
# Running.
# ---------------------------------------------------------------------------------------------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


def make_trace(run: Run, cfg: Config, cache: Path, root: Path):
    """The run's routing: a trace file, or a seeded synthetic trace shaped by its model (one
    shard per GPU, `run.steps` steps, seed `run.seed`)."""
    from traces.generators import TraceSpec, generate
    from traces.io import read_trace, write_trace

    if any(k in run.trace for k in ("file", "import", "fit")):
        return _narrow(_source_trace(run, cfg, cache, root), run.trace, cfg.source)
    m = cfg.model
    params = {k: v for k, v in run.trace.items() if k not in ("kind", "sampler")}
    spec = TraceSpec(kind=run.trace["kind"], steps=cfg.run.steps, layers=m.num_layers,
                     shards=cfg.num_ranks, experts=m.num_experts, heads=m.num_heads,
                     top_k=m.top_k, tokens_per_shard=cfg.run.tokens_per_rank,
                     seed=cfg.run.seed, model=m.name, params=params,
                     sampler=run.trace.get("sampler", "auto"))
    blob = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    path = cache / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.trace.parquet"
    if not path.exists():
        write_trace(generate(spec), path)
    return read_trace(path)


def _source_trace(run: Run, cfg: Config, cache: Path, root: Path):
    """A trace file, an imported recorded trace (cached by the source's path, size and
    modification time), or a trace generated from a fit JSON (shaped by the fit, seed
    `run.seed`)."""
    from traces.io import read_trace, write_trace

    t = run.trace
    if "file" in t:
        return read_trace(root / t["file"])
    if "import" in t:
        from traces.importers import FORMATS, import_smartmoe

        if t["import"] not in FORMATS or t["import"] != "smartmoe":
            raise _err(cfg.source, "trace.import", "studies import 'smartmoe' traces; make "
                       "other formats a file with `moesim trace import` first")
        path = _find_src(root, t["src"])
        if path is None:
            raise _err(cfg.source, "trace.src", f"{t['src']}: no such file or folder from "
                       f"{root} or the folders above it")
        st = path.stat()
        key = hashlib.sha256(json.dumps([str(path), st.st_size, st.st_mtime_ns,
                                         t.get("top_k", 2)]).encode()).hexdigest()[:16]
        cached = cache / f"{key}.import.parquet"
        if not cached.exists():
            write_trace(import_smartmoe(path, top_k=t.get("top_k", 2)), cached)
        return read_trace(cached)
    from traces.fit import Fit
    from traces.generators import generate

    fit = Fit.read(root / t["fit"])
    spec = fit.spec(seed=cfg.run.seed)
    blob = json.dumps(dataclasses.asdict(spec), sort_keys=True)
    path = cache / f"{hashlib.sha256(blob.encode()).hexdigest()[:16]}.fit.parquet"
    if not path.exists():
        write_trace(generate(spec), path)
    return read_trace(path)


def _find_src(root: Path, src: str) -> Path | None:
    """`src` from the root; one starting with ../ is also looked for from every folder above
    the root (a git worktree sits deeper than the checkout beside ../shared/)."""
    path = (root / src).resolve()
    if path.exists():
        return path
    rest = Path(src)
    while rest.parts and rest.parts[0] == "..":
        rest = Path(*rest.parts[1:])
    if rest == Path(src):
        return None
    for anc in Path(root).resolve().parents:
        if (anc / rest).exists():
            return anc / rest
    return None


def _narrow(trace, t: dict, source: object):
    """The `steps` (evenly spread) and `layers` (by index) a trace table picks."""
    if "layers" in t:
        bad = [x for x in t["layers"] if x >= trace.num_layers]
        if bad:
            raise _err(source, "trace.layers", f"layer {bad[0]}: the trace has "
                       f"{trace.num_layers}")
        trace = trace.select(layers=np.asarray(t["layers"]))
    if "steps" in t:
        trace = trace.resample(num_steps=t["steps"])
    return trace


def simulate_frames(run: Run, cfg: Config, trace, source: str
                    ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Every step of `run.steps`, simulated: the MoE layers of a step
    (moesim.sim.simulate.Simulator), or whole training iterations when the run's
    `train.scope` is "iteration" (moesim.sim.iteration.IterationSimulator). Returns the Result
    rows and, for iterations, what their summary needs (tokens of the global batch, Megatron's
    model FLOPs, the GPU's peak) for the result's metadata."""
    if cfg.train.scope == "iteration":
        from moesim.sim.iteration import IterationSimulator

        it = IterationSimulator(cfg, trace, source)
        outs = [it.simulate_iteration(run.strategy, s) for s in range(cfg.run.steps)]
        extra = {"tokens": int(outs[0].tokens),
                 "model_flops": float(np.mean([o.model_flops for o in outs])),
                 "peak_flops": float(outs[0].peak_flops)}
        return pd.concat([o.frame for o in outs], ignore_index=True), extra
    from moesim.sim.simulate import Simulator

    sim = Simulator(cfg, trace, source)
    frames = [sim.simulate_step(run.strategy, s).frame for s in range(cfg.run.steps)]
    return pd.concat(frames, ignore_index=True), {}


def layout_loads(run: Run, cfg: Config, trace) -> pd.DataFrame:
    """Per-GPU expert load (tokens its replicas take) of each step's placement, laid out by
    planner/ from the step before (`plan_from = "previous"`, the default) or from the step
    itself ("same", an oracle); EP with `planner.ep_hot_replicas` adds hot replicas."""
    from analysis.imbalance import panel_from_trace
    from planner.placement import ep_hot_replicas, ep_placement
    from planner.relayout import fsep_placement

    n = cfg.num_ranks
    t = trace.aggregate(n)
    steps, layers = t.num_steps, t.num_layers
    counts = t.counts.reshape(steps, layers, n, -1)
    load = counts.sum(axis=2, dtype=np.int64)
    if load.shape[-1] != cfg.model.total_experts:
        raise _err(cfg.source, "model.num_experts", f"the trace has {load.shape[-1]} experts, "
                   f"the model {cfg.model.total_experts}")
    lag = 1 if run.layout.get("plan_from", "previous") == "previous" else 0

    def seen(s: int, ly: int) -> np.ndarray:
        return counts[max(s - lag, 0), ly]

    if run.strategy == "fsep":
        def place(s: int, ly: int):
            return fsep_placement(cfg.model, cfg.planner, seen(s, ly), n, with_bound=False)[0]
    elif run.strategy == "ep" and cfg.planner.ep_hot_replicas > 0:
        def place(s: int, ly: int):
            return ep_hot_replicas(seen(s, ly).sum(axis=0), n, cfg.planner.ep_hot_replicas)
    elif run.strategy == "ep":
        ep = ep_placement(load.shape[-1], n)

        def place(s: int, ly: int):
            return ep
    else:
        raise _err(cfg.source, "parallel.strategy", "the layout runner lays out EP and FSEP")
    grid = panel_from_trace(run.key, run.strategy, load, place, n).loads
    s, ly, r = np.indices(grid.shape).reshape(3, -1)
    return pd.DataFrame({"step": s, "layer": ly, "rank": r, "tokens": grid.reshape(-1)})


def _stored_digest(path: Path) -> str | None:
    if not path.exists():
        return None
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq
            meta = pq.read_schema(path).metadata or {}
            for key in (b"moesim_study", b"moesim.result"):  # layout and Result files
                if key in meta:
                    return json.loads(meta[key]).get("digest")
    except (OSError, ValueError):
        return None
    return None


def _compute(run: Run, source: str, cache: Path, root: Path
             ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One run's frame (Result rows, or a layout's loads) and its extra metadata; a top-level
    function so that a process pool can run it."""
    cfg = config_from_dict(run.config, source)
    trace = make_trace(run, cfg, cache, root)
    if run.runner == "simulate":
        return simulate_frames(run, cfg, trace, json.dumps(run.trace))
    return layout_loads(run, cfg, trace), {}


def run_study(study: Study, *, cache: Path | None = None, resume: bool = False,
              only: str | None = None, log: Callable[[str], None] = print,
              figures: bool = True, jobs: int = 1) -> list[Path]:
    """Simulate (or lay out) every run and write OUT/configs/KEY.toml, OUT/results/KEY.parquet;
    then the summary, figures and report (analysis.study_report.write_outputs). With `resume`,
    a run whose result file already holds its digest is not run again. `only` (a regular
    expression) runs the matching keys and re-reports from the files of the others. `jobs` > 1
    runs distinct runs in that many processes (results are the same: each run is seeded)."""
    from concurrent.futures import ProcessPoolExecutor

    from analysis import study_report
    from moesim.results import write_results

    root = study.root
    cache = cache or Path("/tmp/moesim-study-cache")
    cache.mkdir(parents=True, exist_ok=True)
    pattern = re.compile(only) if only else None
    todo: list[Run] = []
    for run in study.runs:
        if pattern and not pattern.search(run.key):
            continue
        write_text_atomic(study.config_path(run), f"# {study.name}/{run.key}: written by "
                          f"moesim study run {study.file}\n# trace: {json.dumps(run.trace)}\n"
                          + to_toml(run.config))
        if resume and _stored_digest(study.results_path(run)) == run.digest():
            log(f"{study.name}/{run.key}: up to date")
            continue
        todo.append(run)
    first: dict[str, Run] = {}
    for run in todo:
        first.setdefault(run.digest(), run)

    def write(run: Run, done: tuple[pd.DataFrame, dict], seconds: float) -> None:
        frame, extra = done
        meta = {"config": run.config, "study": study.name, "arm": run.key,
                "trace": run.trace, "labels": run.labels, "digest": run.digest()}
        if extra:
            meta["iteration"] = extra
        if run.runner == "simulate":
            write_results(frame, study.results_path(run), meta)
        else:
            _write_layout(frame, study.results_path(run), meta)
        log(f"{study.name}/{run.key}: {run.runner} in {seconds:.1f} s")

    frames: dict[str, tuple[pd.DataFrame, dict]] = {}
    if jobs > 1 and len(first) > 1:
        t0 = time.perf_counter()
        with ProcessPoolExecutor(max_workers=jobs) as pool:
            futures = {d: pool.submit(_compute, r, f"{study.path}:{r.key}", cache, root)
                       for d, r in first.items()}
            for d, fut in futures.items():
                frames[d] = fut.result()
        log(f"{study.name}: {len(first)} runs in {jobs} processes, "
            f"{time.perf_counter() - t0:.1f} s")
    for run in todo:
        t0 = time.perf_counter()
        d = run.digest()
        if d not in frames:
            frames[d] = _compute(run, f"{study.path}:{run.key}", cache, root)
        write(run, frames[d], time.perf_counter() - t0)
    return study_report.write_outputs(study, log=log, figures=figures)


def _write_layout(frame: pd.DataFrame, path: Path, meta: dict) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(frame, preserve_index=False)
    table = table.replace_schema_metadata({b"moesim_study": json.dumps(meta,
                                                                      default=str).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_layout(path: Path) -> np.ndarray:
    """A layout run's loads as [steps, layers, ranks]."""
    if not path.exists():
        raise _err(path, "file", "no result for this run: run `moesim study run` first")
    df = pd.read_parquet(path)
    missing = [c for c in LAYOUT_COLUMNS if c not in df.columns]
    if missing:
        raise _err(path, missing[0], "missing column")
    shape = (df["step"].max() + 1, df["layer"].max() + 1, df["rank"].max() + 1)
    grid = np.zeros(shape)
    grid[df["step"], df["layer"], df["rank"]] = df["tokens"]
    return grid


def study_files(folder: Path) -> list[Path]:
    return sorted(p for p in Path(folder).glob("*.toml"))
