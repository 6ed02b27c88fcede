"""Replay a runtime run in the simulator: the same config, routing and placements.

A run directory (written by `runtime.train`, docs/interfaces.md) holds `config.toml`,
`results.parquet` (measured Result table, source "real"), `trace.parquet` (the routing the run
saw) and, for FSEP, `plan.json` (the placements it used). The simulator replays the same steps
with the same config, routing and placements; the comparison pairs per-phase times (summed over
layers and passes, mean over ranks and steps) and the step time (analysis.validation), and
adds one row per step. Relative error = (simulated - measured) / measured. A run that also timed
the non-MoE phases (attention, norms, embedding, LM head, loss, optimizer) is replayed as whole
iterations (moesim.sim.iteration) with the run's model and its training precision, so the
comparison covers the whole step phase by phase.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from moesim.config import load_config, with_overrides
from moesim.errors import InputError
from moesim.results import read_results
from moesim.sim.iteration import IterationSimulator
from moesim.sim.simulate import Simulator
from planner.plan import read_plan
from traces.io import read_trace


class PlannedSimulator(Simulator):
    """A Simulator that takes the run's own placements (a planner Plan) for its strategy
    instead of re-planning, so simulated and measured steps do the same work."""

    def __init__(self, *args, plan=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self._at: tuple[int, int] | None = None

    def _layer_traffic(self, strategy: str, tstep: int, layer: int):
        self._at = (tstep, layer)
        return super()._layer_traffic(strategy, tstep, layer)

    def _placement(self, strategy: str, counts: np.ndarray):
        if self.plan is not None and strategy == self.plan.strategy and self._at is not None:
            return self.plan.placement(*self._at)
        return super()._placement(strategy, counts)


def _run_files(run: Path) -> dict[str, Path]:
    if not run.is_dir():
        raise InputError(run, "--run", "no such run directory")
    files = {name: run / name for name in ("config.toml", "results.parquet", "trace.parquet")}
    for name, path in files.items():
        if not path.exists():
            raise InputError(run, name, "missing from the run directory")
    return files


def simulate_run(run: Path, overrides: dict | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(measured, simulated) Result tables of the run's steps. `overrides` ('section.field' ->
    value) change the run's config before simulating, e.g. {"cluster.gpu": "h200-measured"}
    to use a calibration measured on the run's machine."""
    files = _run_files(run)
    cfg = load_config(files["config.toml"])
    if overrides:
        cfg = with_overrides(cfg, overrides)
    measured, _ = read_results(files["results.parquet"])
    measured = measured[measured["source"] == "real"]
    if measured.empty:
        raise InputError(files["results.parquet"], "source", "no measured ('real') rows")
    strategies = measured["strategy"].unique().tolist()
    if len(strategies) != 1:
        raise InputError(files["results.parquet"], "strategy",
                         f"one strategy per run, found {', '.join(strategies)}")
    strategy = strategies[0]
    trace = read_trace(files["trace.parquet"])
    plan = None
    if (run / "plan.json").exists():
        plan = read_plan(run / "plan.json")
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, strategy=strategy))
    steps = sorted(int(s) for s in measured["step"].unique())
    if steps[-1] >= trace.num_steps:
        raise InputError(files["trace.parquet"], "steps", f"the results have step {steps[-1]}, "
                         f"the trace {trace.num_steps} steps")
    if not set(measured["phase"]) & WHOLE_STEP_PHASES:
        sim = PlannedSimulator(cfg, trace, str(files["trace.parquet"]), plan=plan)
        frames = [sim.simulate_step(strategy, s).frame for s in steps]
        return measured.reset_index(drop=True), pd.concat(frames, ignore_index=True)
    # The run timed the rest of its step too: replay whole iterations as runtime/train.py
    # trains (one micro-batch of run.tokens_per_rank tokens a rank, every tensor in the
    # model's dtype, torch's AdamW).
    cfg = _as_trained(cfg, files["config.toml"])
    sim = PlannedIterationSimulator(cfg, trace, str(files["trace.parquet"]), plan=plan)
    frames = []
    for s in steps:
        out = sim.simulate_iteration(strategy, s)
        if not len(out.frame):
            raise InputError(files["config.toml"], "model", f"the run does not fit in the "
                             f"simulator's memory estimate ({out.memory.verdict()})")
        frames.append(out.frame)
    return measured.reset_index(drop=True), pd.concat(frames, ignore_index=True)


# Phases only a whole step has: a run that times any of them is replayed as an iteration.
WHOLE_STEP_PHASES = {"embed", "attn_norm", "qkv", "attention", "attn_out", "residual",
                     "mlp_norm", "dense_mlp", "shared_expert", "final_norm", "lm_head", "loss",
                     "optimizer"}


def _as_trained(cfg, source) -> object:
    m, r = cfg.model, cfg.run
    if r.tokens_per_rank % m.seq_len:
        raise InputError(source, "run.tokens_per_rank", f"{r.tokens_per_rank} is not a "
                         f"multiple of model.seq_len = {m.seq_len}")
    return with_overrides(cfg, {"train.scope": "iteration",
                                "train.micro_batch_size": r.tokens_per_rank // m.seq_len,
                                "train.micro_batches": 1, "train.precision": "pure",
                                "train.optimizer_impl": "foreach"})


class PlannedIterationSimulator(PlannedSimulator, IterationSimulator):
    """Whole iterations with the run's own placements."""
