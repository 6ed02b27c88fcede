"""From Result tables (one row per step, layer, rank, pass, phase) to the numbers the figures
plot: step time, throughput, per-phase time, communication volume, and load imbalance.

Definitions, kept in one place so that every figure and table means the same thing:
- step time: per step, latest `end_s` minus earliest `start_s` over all rows of the step (all
  layers, both passes, every rank); a run's step time is the mean over its steps.
- throughput: tokens per step / step time; tokens per step is `run.tokens_per_rank x ranks`
  from the run's config when the metadata has it, else the tokens the router saw (layer 0,
  forward, summed over ranks).
- phase time: per (step, rank) the summed duration of a phase's rows over layers and passes,
  then the mean over ranks and steps. Phases on the comm stream may overlap compute, so phase
  times can add up to more than the step time; the breakdown figure shows both.
- communication bytes per GPU: per step the bytes of all comm-stream rows, divided by ranks.
- load imbalance: per (step, layer) the forward expert-phase tokens of each rank, max / mean - 1
  (0 is perfect balance; 0.3 means the busiest rank does 30% more expert work than average),
  then the mean over steps and layers. `imbalance_cv` is the same per-rank loads' standard
  deviation / mean (the "std. dev. of workload" some papers quote), averaged the same way.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.inputs import ResultFile, meta_param

RUN_KEYS = ["label", "source", "strategy"]
SUMMARY_COLUMNS = [
    *RUN_KEYS, "num_gpus", "steps", "tokens_per_step", "step_time_s", "step_time_std_s",
    "throughput_tok_s", "comm_bytes_per_gpu", "comm_time_s", "compute_time_s", "imbalance",
    "imbalance_cv", "model", "top_k", "num_heads", "num_experts",
]


def step_times(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, strategy, step): step_time_s."""
    g = df.groupby(["source", "strategy", "step"], sort=True)
    out = (g["end_s"].max() - g["start_s"].min()).rename("step_time_s")
    return out.reset_index()


def phase_times(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, strategy, phase, stream): time_s, the mean over steps and ranks of a
    phase's summed duration (all layers and both passes)."""
    d = df.assign(dur=df["end_s"] - df["start_s"])
    per_rank = d.groupby(["source", "strategy", "phase", "stream", "step", "rank"],
                         sort=True)["dur"].sum()
    # Ranks or steps where a phase has no rows spent no time in it: fill zeros before averaging,
    # else a phase that runs on some ranks only would be overstated.
    ranks = d.groupby(["source", "strategy"])["rank"].nunique()
    steps = d.groupby(["source", "strategy"])["step"].nunique()
    total = per_rank.groupby(["source", "strategy", "phase", "stream"]).sum().reset_index()
    key = pd.MultiIndex.from_frame(total[["source", "strategy"]])
    total["time_s"] = total["dur"].to_numpy() / (ranks.reindex(key).to_numpy()
                                                  * steps.reindex(key).to_numpy())
    return total.drop(columns="dur")


def rank_loads(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (source, strategy, step, layer, rank): the forward expert-phase tokens."""
    e = df[(df["phase"] == "expert") & (df["pass"] == "fwd")]
    return (e.groupby(["source", "strategy", "step", "layer", "rank"], sort=True)["tokens"]
            .sum().reset_index())


def load_imbalance(loads: np.ndarray) -> np.ndarray:
    """max / mean - 1 over the last axis; 0 where nothing ran."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = loads.max(axis=-1) / mean - 1.0
    return np.where(mean > 0, out, 0.0)


def load_cv(loads: np.ndarray) -> np.ndarray:
    """std / mean over the last axis (population std); 0 where nothing ran."""
    loads = np.asarray(loads, dtype=np.float64)
    mean = loads.mean(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = loads.std(axis=-1) / mean
    return np.where(mean > 0, out, 0.0)


def _tokens_per_step(rf: ResultFile, part: pd.DataFrame, ranks: int) -> float:
    per_rank = meta_param(rf.meta, "run.tokens_per_rank")
    if isinstance(per_rank, (int, float)) and per_rank > 0:
        return float(per_rank) * ranks
    r = part[(part["phase"] == "router") & (part["pass"] == "fwd")]
    if r.empty:
        return float("nan")
    r = r[r["layer"] == r["layer"].min()]
    return float(r.groupby("step")["tokens"].sum().mean())


def summarize(rf: ResultFile) -> pd.DataFrame:
    """One summary row per (source, strategy) present in a Result file."""
    rows = []
    for (source, strategy), part in rf.frame.groupby(["source", "strategy"], sort=True):
        ranks = int(part["rank"].max()) + 1
        st = step_times(part)["step_time_s"]
        comm = part[part["stream"] != "compute"]
        steps = part["step"].nunique()
        dur = part["end_s"] - part["start_s"]
        loads = rank_loads(part)
        if loads.empty:
            imb = cv = float("nan")
        else:
            grid = loads.pivot_table(index=["step", "layer"], columns="rank", values="tokens",
                                     fill_value=0).reindex(columns=range(ranks), fill_value=0)
            imb = float(load_imbalance(grid.to_numpy()).mean())
            cv = float(load_cv(grid.to_numpy()).mean())
        tps = _tokens_per_step(rf, part, ranks)
        step_time = float(st.mean())
        rows.append({
            "label": rf.label,
            "source": source,
            "strategy": strategy,
            "num_gpus": ranks,
            "steps": steps,
            "tokens_per_step": tps,
            "step_time_s": step_time,
            "step_time_std_s": float(st.std(ddof=0)),
            "throughput_tok_s": tps / step_time if step_time > 0 else float("nan"),
            "comm_bytes_per_gpu": float(comm["bytes"].sum()) / (steps * ranks),
            "comm_time_s": float(dur[part["stream"] != "compute"].sum()) / (steps * ranks),
            "compute_time_s": float(dur[part["stream"] == "compute"].sum()) / (steps * ranks),
            "imbalance": imb,
            "imbalance_cv": cv,
            "model": meta_param(rf.meta, "model.name"),
            "top_k": meta_param(rf.meta, "model.top_k"),
            "num_heads": meta_param(rf.meta, "model.num_heads"),
            "num_experts": meta_param(rf.meta, "model.num_experts"),
        })
    return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


def summarize_files(files: list[ResultFile]) -> pd.DataFrame:
    return pd.concat([summarize(f) for f in files], ignore_index=True)
