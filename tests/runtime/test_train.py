"""The training entry on gloo: resume from a checkpoint gives the same losses as an
uninterrupted run, the run directory is complete and readable, and a dead rank ends the job with
a clear error within the collective timeout instead of a hang."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from tests.runtime.harness import run_ranks

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "runtime-tiny.toml"


def _args(out: str, *sets: str, resume: bool = False) -> argparse.Namespace:
    return argparse.Namespace(config=TINY, set=list(sets), out=out, resume=resume)


def _train(out: str, *sets: str, resume: bool = False) -> list[float]:
    from moesim.config import load_config, parse_override, with_overrides
    from runtime.comm import init_distributed
    from runtime.train import Trainer
    a = _args(out, *sets, resume=resume)
    cfg = load_config(a.config, dict(parse_override(s) for s in a.set))
    cfg = with_overrides(cfg, {"run.out_dir": out})
    env = init_distributed(cfg.run.device, cfg.run.timeout_s)
    t = Trainer(cfg, env)
    if resume:
        t.resume()
    t.run()
    return t.losses


def _resume_case(rank, world, root):
    common = ('parallel.strategy="fsep"', "run.checkpoint_every=2")
    full = _train(f"{root}/full", *common, "run.steps=6")
    # Interrupted after step 3 (checkpoints at steps 1 and 3), then resumed to the end.
    _train(f"{root}/cut", *common, "run.steps=4")
    resumed = _train(f"{root}/cut", *common, "run.steps=6", resume=True)
    assert len(full) == 6 and len(resumed) == 6
    assert resumed == full, (resumed, full)  # bit-identical: same batches, state, layouts
    assert full[-1] < full[0]  # and it learns


def test_resume_gives_identical_losses_and_a_complete_run_dir():
    with tempfile.TemporaryDirectory() as root:
        run_ranks(2, _resume_case, root, timeout_s=120)
        out = Path(root) / "cut"
        for name in ("config.toml", "results.parquet", "trace.parquet", "plan.json",
                     "meta.json", "losses.csv"):
            assert (out / name).exists(), name
        from moesim.config import load_config
        from moesim.results import read_results
        from planner.plan import read_plan
        from traces.io import read_trace
        cfg = load_config(out / "config.toml")
        assert cfg.parallel.degree == 2 and cfg.parallel.strategy == "fsep"
        df, _ = read_results(out / "results.parquet")
        assert set(df["source"]) == {"real"} and set(df["rank"]) == {0, 1}
        assert set(df["step"]) == set(range(6))  # resumed runs keep the earlier steps' rows
        assert {"dispatch", "combine", "expert", "weight_gather", "grad_scatter"} \
            <= set(df["phase"])
        trace = read_trace(out / "trace.parquet")
        assert trace.counts.shape == (6, 2, 2, 1, 8)
        # Every rank's 64 tokens visit top-2 experts in every layer: the recorder is complete.
        assert (trace.counts.sum(axis=(3, 4)) == 64 * 2).all()
        plan = read_plan(out / "plan.json")
        assert len(plan.placements) == 6 * 2
        losses = pd.read_csv(out / "losses.csv")
        assert len(losses) == 6


def _dead_rank_worker(rank, init_file, out, q):
    os.environ["MOESIM_FAULT_EXIT"] = "1:2"
    from datetime import timedelta

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=timedelta(seconds=5))
    from runtime import train
    t0 = time.monotonic()
    try:
        train.main_args(_args(out, "run.timeout_s=5.0", "run.steps=50"))
    finally:
        q.put((rank, time.monotonic() - t0))


def test_dead_rank_ends_the_job_with_a_clear_error(capfd):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as root:
        procs = [ctx.Process(target=_dead_rank_worker,
                             args=(r, f"{root}/rdzv", f"{root}/out", q)) for r in range(2)]
        t0 = time.monotonic()
        for p in procs:
            p.start()
        for p in procs:
            p.join(90)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        assert not hung, "a rank hung after its peer died"
        assert time.monotonic() - t0 < 90
    assert procs[1].exitcode == 17  # the injected death
    assert procs[0].exitcode == 1
    err = capfd.readouterr().err
    assert "rank 0: a collective failed" in err and "run.timeout_s = 5 s" in err
