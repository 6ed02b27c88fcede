"""Small Result tables of the real schema (moesim.results.COLUMNS) with known numbers, so tests
can check what the figures aggregate against hand computation."""

from __future__ import annotations

import numpy as np
import pandas as pd

from moesim.results import COLUMNS, check_frame

# (phase, stream, duration per (layer, pass) in seconds, bytes per (layer, pass) per rank)
DEFAULT_PROGRAM = {
    "ep": [("router", "compute", 1e-4, 0), ("permute", "compute", 1e-4, 0),
           ("dispatch", "comm", 4e-4, 8 << 20), ("expert", "compute", 1e-3, 0),
           ("combine", "comm", 4e-4, 8 << 20)],
    "hp": [("latent_down", "compute", 1e-4, 0), ("router", "compute", 1e-4, 0),
           ("dispatch", "comm", 2e-4, 2 << 20), ("expert", "compute", 1e-3, 0),
           ("combine", "comm", 2e-4, 2 << 20), ("latent_up", "compute", 1e-4, 0)],
    "fsep": [("router", "compute", 1e-4, 0), ("weight_gather", "comm", 3e-4, 4 << 20),
             ("dispatch", "comm", 4e-4, 8 << 20), ("expert", "compute", 8e-4, 0),
             ("combine", "comm", 4e-4, 8 << 20)],
}


def result_frame(strategy: str = "ep", *, ranks: int = 4, steps: int = 3, layers: int = 2,
                 source: str = "sim", loads: np.ndarray | None = None,
                 program: list | None = None, time_scale: float = 1.0,
                 tokens_per_rank: int = 1024) -> pd.DataFrame:
    """Phases run back to back on each rank, in program order, layer after layer, forward then
    backward; every (layer, pass) of every rank takes the same time, so the step time is
    2 * layers * sum(durations). `loads[step, layer, rank]` gives the forward expert tokens."""
    program = program or DEFAULT_PROGRAM[strategy]
    rows = []
    for step in range(steps):
        for rank in range(ranks):
            t = 0.0
            for pas in ("fwd", "bwd"):
                for layer in range(layers):
                    for phase, stream, dur, nbytes in program:
                        dur *= time_scale
                        tokens = tokens_per_rank
                        if phase == "expert" and loads is not None:
                            tokens = int(loads[step, layer, rank])
                        rows.append((source, strategy, step, layer, rank, pas, phase, stream,
                                     t, t + dur, nbytes, tokens, 0.0))
                        t += dur
    return check_frame(pd.DataFrame(rows, columns=list(COLUMNS)), "test")


def meta_for(strategy: str, *, top_k: int = 8, ranks: int = 4, tokens_per_rank: int = 1024,
             num_heads: int = 1) -> dict:
    return {"config": {"model": {"name": "test-moe", "top_k": top_k, "num_heads": num_heads,
                                 "num_experts": 64},
                       "run": {"tokens_per_rank": tokens_per_rank},
                       "parallel": {"strategy": strategy, "degree": ranks}}}
