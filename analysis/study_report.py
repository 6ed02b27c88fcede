"""From a study's result files to what it reports: the summary CSV with named columns, tables,
named values, claims against the paper with computed verdicts, figures, and its section of
docs/reproduction.md. Everything is computed from the committed result files and the study file
(configs/studies/README.md has the vocabulary); nothing is typed into the doc by hand.

Each run has fields: its labels (axis labels, arm labels, `arm`, `strategy`, `key`), its
metrics (below) and its config flattened as `section_field` (e.g. `model_top_k`,
`cluster_nodes`). A report section picks rows:
  rows = "run"            one row per run; expressions name the run's fields;
  rows = ["size", ...]    one row per group of runs with the same labels; expressions name the
                          group's labels and `ARM.field`, the field of the run of arm ARM.
Metrics of a simulated run (analysis.run_summary's definitions): step_ms, step_time_s,
step_std_ms, throughput_tok_s, tokens_per_step, num_gpus, comm_bytes_per_gpu,
comm_mib_per_gpu, comm_ms (comm stream busy, per rank), compute_ms, comm_share (comm_ms /
step_ms), imbalance (max/mean - 1 of per-GPU expert load), imbalance_cv (std/mean), and
PHASE_ms for each phase (fwd + bwd, mean over ranks and steps); a whole-iteration run
(train.scope = "iteration") counts the global batch as tokens_per_step and adds
tflops_per_gpu and mfu (Megatron's model FLOPs). Of a layout run: imbalance,
imbalance_cv, worst_step_imbalance (the worst step's max/mean - 1, mean over layers).
"""

from __future__ import annotations

import math
import os
import string
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis.study_expr import Expr
from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import SECTIONS
from moesim.errors import InputError

if TYPE_CHECKING:
    from analysis.study import Run, Study

REDUCE = ("one", "max", "min", "mean", "median", "argmax", "argmin", "list")
FIGURES = ("breakdown", "imbalance", "comm", "scaling")
_Row = tuple[dict[str, Any], Callable[[str, "str | None"], Any]]


# ---------------------------------------------------------------------------------------------
# Checking the report sections of a study file.
# ---------------------------------------------------------------------------------------------

def _keys(t: Any, allowed: Iterable[str], src: object, where: str,
          required: Iterable[str] = ()) -> dict:
    if not isinstance(t, dict):
        raise InputError(src, where, "must be a table")
    allowed = tuple(allowed)
    for k in t:
        if k not in allowed:
            raise InputError(src, f"{where}.{k}", f"unknown key; allowed: {', '.join(allowed)}")
    for k in required:
        if k not in t:
            raise InputError(src, f"{where}.{k}", "required")
    return t


def _check_rows(spec: dict, src: object, where: str, runs: list[Run]) -> None:
    rows = spec.get("rows", "run")
    labels = set().union(*(r.labels for r in runs))
    if rows != "run":
        if not (isinstance(rows, list) and all(isinstance(x, str) for x in rows)):
            raise InputError(src, f"{where}.rows", '"run" or a list of label names')
        for x in rows:
            if x not in labels:
                raise InputError(src, f"{where}.rows", f"{x!r} is not a label of any run")
    w = spec.get("where", {})
    if not isinstance(w, dict):
        raise InputError(src, f"{where}.where", "a table of label = value (or [values])")
    for x in w:
        if x not in labels:
            raise InputError(src, f"{where}.where.{x}", "not a label of any run")


def _check_expr(text: Any, spec: dict, src: object, where: str, runs: list[Run]) -> Expr:
    if not isinstance(text, str):
        raise InputError(src, where, "an expression (a string)")
    e = Expr(text, src, where)
    if spec.get("rows", "run") != "run":
        arms = {r.arm for r in runs}
        for base, attr in e.names():
            if attr is not None and base not in arms:
                raise InputError(src, where, f"{text!r}: {base!r} is not an arm")
    return e


def check(report: dict, src: object, runs: list[Run]) -> None:
    if "reference" in report:
        ref = _keys(report["reference"], ("file", "match", "prefix"), src, "reference",
                    ("file", "match"))
        _keys(ref["match"], ref["match"].keys(), src, "reference.match")
    if "summary" in report:
        s = _keys(report["summary"], ("rows", "where", "columns"), src, "summary")
        _check_rows(s, src, "summary", runs)
        for name, text in _keys(s.get("columns", {}), s.get("columns", {}).keys(), src,
                                "summary.columns").items():
            _check_expr(text, s, src, f"summary.columns.{name}", runs)
    for i, t in enumerate(report.get("table", [])):
        w = f"table[{i}]"
        _keys(t, ("title", "rows", "where", "columns", "note"), src, w, ("title", "columns"))
        _check_rows(t, src, w, runs)
        if not isinstance(t["columns"], list) or not t["columns"]:
            raise InputError(src, f"{w}.columns", "a list of {header, value, format}")
        for j, c in enumerate(t["columns"]):
            _keys(c, ("header", "value", "format"), src, f"{w}.columns[{j}]",
                  ("header", "value"))
            _check_expr(c["value"], t, src, f"{w}.columns[{j}].value", runs)
    for name, v in report.get("values", {}).items():
        w = f"values.{name}"
        _keys(v, ("value", "rows", "where", "reduce", "label", "item", "sep"), src, w,
              ("value",))
        _check_rows(v, src, w, runs)
        _check_expr(v["value"], v, src, f"{w}.value", runs)
        red = v.get("reduce", "one")
        if red not in REDUCE:
            raise InputError(src, f"{w}.reduce", f"one of {', '.join(REDUCE)}")
        if red in ("argmax", "argmin") and "label" not in v:
            raise InputError(src, f"{w}.label", f"{red} returns a label: name it")
        if red == "list" and "item" not in v:
            raise InputError(src, f"{w}.item", "list needs an item template")
    for i, c in enumerate(report.get("claim", [])):
        w = f"claim[{i}]"
        _keys(c, ("claim", "paper", "paper_text", "paper_source", "setup", "value", "text",
                  "tolerance", "why"), src, w,
              ("claim", "paper", "paper_text", "paper_source", "value", "tolerance"))
        p = c["paper"]
        ok = (isinstance(p, (int, float)) or (isinstance(p, list) and len(p) == 2
                                              and all(isinstance(x, (int, float)) for x in p)))
        if not ok or isinstance(p, bool):
            raise InputError(src, f"{w}.paper", "a number or [low, high]")
        if c["value"] not in report.get("values", {}):
            raise InputError(src, f"{w}.value", f"{c['value']!r} is not in [values]")
        if not isinstance(c["tolerance"], (int, float)) or not 0 <= c["tolerance"] < 1:
            raise InputError(src, f"{w}.tolerance", "a fraction in [0, 1)")
        from analysis.study import SOURCES
        if c.get("setup", "") and c["setup"] not in SOURCES:
            raise InputError(src, f"{w}.setup", f"one of {', '.join(SOURCES)}")
    for i, f in enumerate(report.get("figure", [])):
        w = f"figure[{i}]"
        _keys(f, ("kind", "name", "where", "arms", "names", "caption", "title", "layer"), src,
              w, ("kind", "name", "caption"))
        if f["kind"] not in FIGURES:
            raise InputError(src, f"{w}.kind", f"one of {', '.join(FIGURES)}")
        _check_rows({"where": f.get("where", {})}, src, w, runs)


# ---------------------------------------------------------------------------------------------
# Run fields, from the result files.
# ---------------------------------------------------------------------------------------------

def _flat_config(cfg: dict) -> dict[str, Any]:
    return {f"{s}_{k}": v for s in SECTIONS for k, v in cfg[s].items()
            if isinstance(v, (int, float, str, bool))}


def simulated_fields(path: Path) -> tuple[dict[str, Any], pd.DataFrame]:
    """The metrics of a simulated run and its analysis.run_summary row."""
    from analysis.inputs import read_result_files
    from analysis.run_summary import phase_times, summarize

    (rf,) = read_result_files([path])
    s = summarize(rf)
    r = s.iloc[0]
    step = float(r["step_time_s"])
    out = {
        "step_time_s": step, "step_ms": step * 1e3,
        "step_std_ms": float(r["step_time_std_s"]) * 1e3,
        "throughput_tok_s": float(r["throughput_tok_s"]),
        "tokens_per_step": float(r["tokens_per_step"]), "num_gpus": int(r["num_gpus"]),
        "comm_bytes_per_gpu": float(r["comm_bytes_per_gpu"]),
        "comm_mib_per_gpu": float(r["comm_bytes_per_gpu"]) / 2**20,
        "comm_ms": float(r["comm_time_s"]) * 1e3,
        "compute_ms": float(r["compute_time_s"]) * 1e3,
        "comm_share": float(r["comm_time_s"]) / step if step > 0 else math.nan,
        "imbalance": float(r["imbalance"]), "imbalance_cv": float(r["imbalance_cv"]),
    }
    it = rf.meta.get("iteration")
    if it:  # whole iterations: the global batch, and Megatron's model FLOPs per GPU
        out["tokens_per_step"] = float(it["tokens"])
        out["throughput_tok_s"] = it["tokens"] / step if step > 0 else math.nan
        tflops = it["model_flops"] / step / out["num_gpus"] if step > 0 else math.nan
        out["tflops_per_gpu"] = tflops / 1e12
        out["mfu"] = tflops / it["peak_flops"] if it["peak_flops"] else math.nan
    ph = phase_times(rf.frame).groupby("phase")["time_s"].sum()
    out |= {f"{p}_ms": float(t) * 1e3 for p, t in ph.items()}
    # Bytes per GPU of each phase's collectives (dispatch, combine, grad_sync, ...), per step.
    f = rf.frame
    comm = f[f["stream"] != "compute"]
    per = max(f["step"].nunique(), 1) * (int(f["rank"].max()) + 1)
    out |= {f"{p}_bytes_per_gpu": float(b) / per
            for p, b in comm.groupby("phase")["bytes"].sum().items()}
    return out, s


def layout_fields(path: Path) -> dict[str, Any]:
    from analysis.run_summary import load_cv, load_imbalance
    from analysis.study import read_layout

    grid = read_layout(path)
    return {"imbalance": float(load_imbalance(grid).mean()),
            "imbalance_cv": float(load_cv(grid).mean()),
            "worst_step_imbalance": float(load_imbalance(grid).mean(axis=1).max()),
            "num_gpus": int(grid.shape[-1])}


class Fields:
    """Every run's fields, and the analysis.run_summary rows of the simulated ones."""

    def __init__(self, study: Study) -> None:
        self.study = study
        self.by_key: dict[str, dict[str, Any]] = {}
        rows = []
        for run in study.runs:
            path = study.results_path(run)
            if not path.exists():
                raise InputError(path, "file", "no result for this run: run `moesim study "
                                 f"run {study.file}` first")
            f: dict[str, Any] = {**_flat_config(run.config), **run.labels, "key": run.key,
                                 "runner": run.runner}
            if run.runner == "simulate":
                metrics, s = simulated_fields(path)
                rows.append(s.assign(study=study.name, arm=run.arm, key=run.key,
                                     **{k: v for k, v in run.labels.items()
                                        if k not in s.columns
                                        and k not in ("study", "arm", "key")}))
            else:
                metrics = layout_fields(path)
            self.by_key[run.key] = {**f, **metrics}
        self.summaries = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame()
        if "reference" in study.report:
            self._join_reference(study.report["reference"])

    def _join_reference(self, ref: dict) -> None:
        path = self.study.root / ref["file"]
        if not path.exists():
            raise InputError(self.study.path, "reference.file", f"{ref['file']}: no such file")
        df = pd.read_csv(path)
        match = ref["match"]  # reference column -> run field
        for col in match:
            if col not in df.columns:
                raise InputError(path, col, "missing column (reference.match)")
        prefix = ref.get("prefix", "paper_")
        for f in self.by_key.values():
            sel = np.ones(len(df), dtype=bool)
            for col, fld in match.items():
                sel &= df[col].astype(str).to_numpy() == str(f.get(fld))
            hit = df[sel]
            if len(hit) > 1:
                raise InputError(path, ",".join(match), f"{len(hit)} rows match run "
                                 f"{f['key']}")
            if len(hit) == 1:
                for col in df.columns:
                    if col not in match:
                        f[prefix + col] = hit.iloc[0][col]

    def runs(self, where: dict[str, Any]) -> list[dict[str, Any]]:
        out = []
        for f in self.by_key.values():
            if all(f.get(k) in (v if isinstance(v, list) else [v]) for k, v in where.items()):
                out.append(f)
        return out

    def rows(self, spec: dict, source: object, where_: str) -> list[_Row]:
        """(labels, lookup) per row of a table, value or summary spec."""
        selected = self.runs(spec.get("where", {}))
        if not selected:
            raise InputError(source, f"{where_}.where", "selects no run")
        rows_by = spec.get("rows", "run")
        if rows_by == "run":
            return [(f, _run_lookup(f, source, where_)) for f in selected]
        groups: dict[tuple, list[dict[str, Any]]] = {}
        for f in selected:
            groups.setdefault(tuple(f.get(x) for x in rows_by), []).append(f)
        out = []
        for values, members in groups.items():
            labels = dict(zip(rows_by, values, strict=True))
            common = {k: v for k, v in members[0].items()
                      if all(m.get(k) == v for m in members)}
            by_arm: dict[str, dict[str, Any]] = {}
            for m in members:
                if m["arm"] in by_arm:
                    raise InputError(source, f"{where_}.rows", f"arm {m['arm']!r} appears "
                                     f"twice in the group {labels}: group by more labels")
                by_arm[m["arm"]] = m
            out.append(({**common, **labels}, _group_lookup({**common, **labels}, by_arm,
                                                            source, where_)))
        return out


def _run_lookup(f: dict[str, Any], source: object, where: str):
    def lookup(name: str, attr: str | None) -> Any:
        if attr is not None:
            raise InputError(source, where, f"{name}.{attr}: rows are runs here; name their "
                             "fields directly")
        if name not in f:
            raise InputError(source, where, f"{name!r} is not a field of run {f['key']} "
                             f"(fields: {', '.join(sorted(f))})")
        return f[name]
    return lookup


def _group_lookup(labels: dict[str, Any], by_arm: dict[str, dict[str, Any]], source: object,
                  where: str):
    def lookup(name: str, attr: str | None) -> Any:
        if attr is None:
            if name not in labels:
                raise InputError(source, where, f"{name!r} is not a label shared by the group "
                                 f"{ {k: labels[k] for k in list(labels)[:4]} }")
            return labels[name]
        if name not in by_arm:
            raise InputError(source, where, f"arm {name!r} has no run in the group")
        if attr not in by_arm[name]:
            raise InputError(source, where, f"{attr!r} is not a field of run "
                             f"{by_arm[name]['key']}")
        return by_arm[name][attr]
    return lookup


# ---------------------------------------------------------------------------------------------
# Values, tables, claims.
# ---------------------------------------------------------------------------------------------

def fmt(value: Any, spec: str | None = None) -> str:
    """A cell: `spec` is a format string ("{:.2f}x", "{:.0%}"); NaN is "n/a"."""
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    if spec:
        return spec.format(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def values(fields: Fields) -> dict[str, Any]:
    out: dict[str, Any] = {}
    src = fields.study.path
    for name, v in fields.study.report.get("values", {}).items():
        w = f"values.{name}"
        expr = Expr(v["value"], src, f"{w}.value")
        rows = fields.rows(v, src, w)
        vals = [expr(lk) for _, lk in rows]
        red = v.get("reduce", "one")
        if red == "one":
            if len(vals) != 1:
                raise InputError(src, f"{w}.where", f"selects {len(vals)} rows, reduce 'one' "
                                 "needs exactly one")
            out[name] = vals[0]
        elif red in ("max", "min", "mean", "median"):
            out[name] = float(getattr(np, red)(np.asarray(vals, dtype=float)))
        elif red in ("argmax", "argmin"):
            i = int(getattr(np, red)(np.asarray(vals, dtype=float)))
            out[name] = rows[i][0].get(v["label"])
        else:
            items = [render_template(v["item"], {**labels, "value": x}, src, f"{w}.item")
                     for (labels, _), x in zip(rows, vals, strict=True)]
            out[name] = v.get("sep", ", ").join(items)
    return out


class _Strict(string.Formatter):
    def __init__(self, src: object, where: str) -> None:
        self.src, self.where = src, where

    def get_value(self, key, args, kwargs):  # type: ignore[override]
        if key not in kwargs:
            raise InputError(self.src, self.where, f"{{{key}}} is not a value of the study "
                             f"(values: {', '.join(sorted(map(str, kwargs)))})")
        return kwargs[key]

    def format_field(self, value, format_spec):  # type: ignore[override]
        if isinstance(value, float) and math.isnan(value):
            return "n/a"
        return super().format_field(value, format_spec)


def render_template(text: str, names: dict[str, Any], src: object, where: str) -> str:
    return _Strict(src, where).vformat(text, (), names)


def verdict(value: float, lo: float, hi: float, tolerance: float) -> str:
    """The comparison word, computed: inside the paper's range, or within/outside the stated
    tolerance of its nearest end, with the signed relative difference."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "no simulated value"
    if lo <= value <= hi:
        return "inside the paper's range" if lo < hi else "equal to the paper's figure"
    end = hi if value > hi else lo
    rel = (value - end) / end
    side = "range" if lo < hi else "figure"
    if abs(rel) <= tolerance:
        return f"within ±{tolerance:.0%} of the paper's {side} ({rel:+.0%})"
    return f"outside ±{tolerance:.0%} of the paper's {side} ({rel:+.0%})"


def claims(fields: Fields, vals: dict[str, Any]) -> pd.DataFrame:
    from analysis.study import SOURCES

    study = fields.study
    rows = []
    for i, c in enumerate(study.report.get("claim", [])):
        p = c["paper"]
        lo, hi = (float(p[0]), float(p[1])) if isinstance(p, list) else (float(p), float(p))
        v = vals[c["value"]]
        text = render_template(c.get("text", "{" + c["value"] + ":.3g}"), vals, study.path,
                               f"claim[{i}].text")
        setup = c.get("setup") or study.source
        rows.append({
            "study": study.name, "claim": c["claim"], "paper": c["paper_text"],
            "paper_source": c["paper_source"], "paper_low": lo, "paper_high": hi,
            "setup": setup, "setup_from": SOURCES[setup], "sim_value": float(v),
            "sim": text, "tolerance": float(c["tolerance"]),
            "verdict": verdict(float(v), lo, hi, float(c["tolerance"])),
            "why": render_template(c.get("why", ""), vals, study.path, f"claim[{i}].why"),
        })
    return pd.DataFrame(rows, columns=["study", "claim", "paper", "paper_source", "paper_low",
                                       "paper_high", "setup", "setup_from", "sim_value", "sim",
                                       "tolerance", "verdict", "why"])


def summary_frame(fields: Fields) -> pd.DataFrame:
    study = fields.study
    spec = study.report.get("summary")
    if spec is None or "columns" not in spec:
        labels = list(dict.fromkeys(k for r in study.runs for k in r.labels))
        metrics = [m for m in _METRICS if any(m in f for f in fields.by_key.values())]
        return pd.DataFrame([{k: f.get(k) for k in ["key", *labels, *metrics]}
                             for f in fields.by_key.values()])
    rows = fields.rows(spec, study.path, "summary")
    exprs = {n: Expr(t, study.path, f"summary.columns.{n}") for n, t in spec["columns"].items()}
    return pd.DataFrame([{n: e(lk) for n, e in exprs.items()} for _, lk in rows],
                        columns=list(exprs))


_METRICS = ["num_gpus", "step_ms", "step_std_ms", "throughput_tok_s", "tokens_per_step",
            "comm_bytes_per_gpu", "comm_ms", "compute_ms", "comm_share", "tflops_per_gpu",
            "mfu", "imbalance", "imbalance_cv", "worst_step_imbalance"]


def md_table(header: list[str], body: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in r) + " |"
              for r in body]
    return "\n".join(lines)


def tables(fields: Fields) -> list[str]:
    study = fields.study
    out = []
    for i, t in enumerate(study.report.get("table", [])):
        w = f"table[{i}]"
        cols = [(c["header"], Expr(c["value"], study.path, f"{w}.columns[{j}].value"),
                 c.get("format")) for j, c in enumerate(t["columns"])]
        body = [[fmt(e(lk), f) for _, e, f in cols] for _, lk in fields.rows(t, study.path, w)]
        text = f"**{t['title']}**\n\n" + md_table([h for h, _, _ in cols], body) + "\n"
        if t.get("note"):
            text += "\n" + render_template(t["note"], values(fields), study.path,
                                           f"{w}.note") + "\n"
        out.append(text)
    return out


# ---------------------------------------------------------------------------------------------
# Figures and the report.
# ---------------------------------------------------------------------------------------------

def _figure_runs(fields: Fields, f: dict) -> list[Run]:
    study = fields.study
    keys = {x["key"] for x in fields.runs(f.get("where", {}))}
    runs = [r for r in study.runs if r.key in keys]
    if "arms" in f:
        order = {a: i for i, a in enumerate(f["arms"])}
        runs = sorted((r for r in runs if r.arm in order), key=lambda r: order[r.arm])
    if not runs:
        raise InputError(study.path, f"figure {f['name']}.where", "selects no run")
    return runs


def make_figures(fields: Fields) -> list[Path]:
    from analysis import breakdown, comm, imbalance, scaling
    from analysis.figure_files import save_figure
    from analysis.inputs import read_result_files

    study = fields.study
    written: list[Path] = []
    for f in study.report.get("figure", []):
        runs = _figure_runs(fields, f)
        names = f.get("names", {})
        title = f.get("title")
        if f["kind"] == "breakdown":
            files = read_result_files([study.results_path(r) for r in runs])
            fig = breakdown.plot_breakdown(files, title=title, names={
                r.key: names.get(r.arm, r.key) for r in runs})
        elif f["kind"] == "imbalance":
            from analysis.study import read_layout
            panels = []
            for r in runs:
                label = names.get(r.arm, r.key)
                if r.runner == "layout":
                    grid = read_layout(study.results_path(r))
                    panels.append(imbalance.LoadPanel(label, r.strategy, grid))
                else:
                    (p,) = imbalance.panels_from_results(
                        read_result_files([study.results_path(r)]))
                    panels.append(imbalance.LoadPanel(label, p.strategy, p.loads))
            fig = imbalance.plot_imbalance(panels, layer=f.get("layer", 0))
        else:
            keys = [r.key for r in runs]
            s = fields.summaries[fields.summaries["key"].isin(keys)]
            plot = comm.plot_comm if f["kind"] == "comm" else scaling.plot_scaling
            fig = plot(s, title=title, source=str(study.path))
        written += save_figure(fig, study.figures, f["name"])
    return written


def _rel(target: Path, doc: Path) -> str:
    return Path(os.path.relpath(target, doc.parent)).as_posix()


def render_section(study: Study, doc: Path, fields: Fields | None = None,
                   level: int = 2) -> str:
    """The study's section of a markdown document at `doc` (image links relative to it)."""
    from analysis.study import SOURCES

    fields = fields or Fields(study)
    vals = values(fields)
    h = "#" * level
    out = [f"{h} {study.title}\n"]
    head = f"*Study file `{study.file}`; setup from {SOURCES[study.source]}.*"
    if study.paper:
        head = f"*Paper: {study.paper}.* " + head
    if study.source_note:
        head += " " + render_template(study.source_note, vals, study.path, "study.source_note")
    out.append(head + "\n")
    if study.assumptions:
        out.append("Assumptions:\n")
        out.append("\n".join("- " + render_template(a, vals, study.path, "study.assumptions")
                             for a in study.assumptions) + "\n")
    out += tables(fields)
    for f in study.report.get("figure", []):
        caption = render_template(f["caption"], vals, study.path, f"figure {f['name']}.caption")
        alt = f.get("title") or f["name"].replace("_", " ")
        out.append(f"![{alt}]({_rel(study.figures / (f['name'] + '.png'), doc)})\n")
        out.append(f"*{caption}*\n")
    return "\n".join(out)


def write_outputs(study: Study, log: Callable[[str], None] = print,
                  figures: bool = True) -> list[Path]:
    """OUT/summary.csv, OUT/claims.csv, the figures and OUT/report.md, from the result files."""
    fields = Fields(study)
    written = []
    for name, df in ((study.summary_file, summary_frame(fields)),
                     ("claims.csv", claims(fields, values(fields)))):
        path = study.out / name
        with atomic_path(path) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
        written.append(path)
    if figures:
        written += make_figures(fields)
    report = study.out / "report.md"
    write_text_atomic(report, "<!-- Generated by `moesim study run "
                      f"{study.file}`; do not edit by hand. -->\n\n"
                      + render_section(study, report, fields, level=1))
    written.append(report)
    for p in written:
        log(f"wrote {p}")
    return written
