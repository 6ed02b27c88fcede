"""The run directory (docs/interfaces.md): what a real run leaves for `moesim validate` and
`analysis`. Written by rank 0 only, every file atomically."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import platform
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from moesim.atomic import atomic_path, write_text_atomic
from moesim.config import Config, ParallelConfig, config_to_dict
from moesim.results import empty_frame, write_results


def versions() -> dict:
    v = {"torch": torch.__version__, "python": platform.python_version()}
    if torch.cuda.is_available():
        v["cuda"] = torch.version.cuda
        v["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        v["gpu"] = torch.cuda.get_device_name()
        v["gpus"] = torch.cuda.device_count()
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    return v


def machine_meta(world: int, backend: str, device: str) -> dict:
    return {"host": socket.gethostname(), "machine": os.environ.get("MOESIM_MACHINE", ""),
            "world": world, "backend": backend, "device": device,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            **versions()}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)  # a JSON string is a valid TOML basic string
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return repr(v)


def to_toml(cfg: dict) -> str:
    lines = []
    for section, values in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
        lines.append("")
    return "\n".join(lines)


# How runtime/layers_fsep.py schedules FSEP's weights whatever the config asks: one gather
# per layer (LAER-MoE's order, on a side stream), freed after forward and gathered again for
# the backward.
FSEP_RUNTIME_SCHEDULE = {"fsep_chunks": 1, "fsep_backward_gather": True}


def what_ran(parallel: ParallelConfig, world: int) -> ParallelConfig:
    """The parallel config as the runtime executed it: the job's rank count, and for FSEP its
    weight schedule, so that `moesim validate` simulates the work that ran."""
    extra = FSEP_RUNTIME_SCHEDULE if parallel.strategy == "fsep" else {}
    return dataclasses.replace(parallel, degree=world, **extra)


def activation_ran(device: str) -> str:
    """The experts' SwiGLU as the runtime ran it (moesim's model.activation): the fused kernel
    of kernels/swiglu.py on CUDA, separate torch ops elsewhere."""
    return "kernel" if device == "cuda" else "unfused"


def write_run_dir(out: Path, cfg: Config, world: int, rows: list[dict], counts: list[np.ndarray],
                  placements: dict, meta: dict, losses: list[float] | None = None) -> None:
    """rows: Result rows of every rank; counts: per step [layers, N, H, E]; placements:
    (step, layer) -> Placement (FSEP)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    activation = activation_ran(meta.get("device", cfg.run.device))
    ran = dataclasses.replace(cfg, parallel=what_ran(cfg.parallel, world),
                              model=dataclasses.replace(cfg.model, activation=activation))
    if cfg.parallel.strategy == "fsep" and not cfg.run.plan:
        from runtime.plans import online_planner
        ran = dataclasses.replace(ran, planner=online_planner(cfg.planner))
    as_dict = config_to_dict(ran)
    write_text_atomic(out / "config.toml", to_toml(as_dict))
    df = pd.DataFrame(rows) if rows else empty_frame()
    write_results(df, out / "results.parquet",
                  {"source": "real", "strategy": cfg.parallel.strategy, "config": as_dict,
                   "machine": meta.get("machine", ""), "date": meta.get("date", "")})
    if losses is not None:
        with atomic_path(out / "losses.csv") as tmp:
            pd.DataFrame({"step": range(len(losses)), "loss": losses}).to_csv(tmp, index=False)
    if counts:
        from traces.io import write_trace
        from traces.schema import Trace, TraceMeta
        m = cfg.model
        tmeta = TraceMeta(model=m.name, source=f"runtime:{cfg.parallel.strategy}",
                          tokens_per_shard=cfg.run.tokens_per_rank, top_k=m.top_k,
                          generator={"routing": cfg.run.routing, "kind": cfg.run.routing_kind})
        write_trace(Trace(np.stack(counts).astype(np.int32), tmeta), out / "trace.parquet")
    if placements:
        from planner.plan import Plan, write_plan
        first = next(iter(placements.values()))
        # Record what the placements actually used, so the plan validates.
        used = max(int(p.slots_per_rank().max()) for p in placements.values())
        write_plan(Plan("fsep", world, first.num_experts, max(cfg.planner.slots_per_rank, used),
                        dict(placements), meta={"source": "runtime"}), out / "plan.json")
    write_text_atomic(out / "meta.json", json.dumps(meta, indent=1, sort_keys=True) + "\n")
