"""Training entry: `torchrun --nproc-per-node N -m runtime.train --config C [--resume]`
(also `moesim run`). Multi-node: torchrun's own flags (--nnodes, --rdzv-endpoint ...).

Each step: batches (runtime.data), forward and backward through the MoE transformer, gradient
sum of the replicated parameters, the learning rate of the step, clipping by the global norm,
AdamW on fp32 master weights when the model is bf16 (runtime.optim). Logged per step: the
loss (mean over every rank's tokens). Written by rank 0 into run.out_dir, the run directory
of docs/interfaces.md:
  config.toml      the config as run (world size in parallel.degree)
  results.parquet  Result rows, source "real": every MoE phase of every layer, rank and step
                   (CUDA events on GPU, perf_counter on CPU), plus grad_sync (layer -1)
  trace.parquet    the routing the MoE layers saw, [step, layer, rank, head, expert]
  plan.json        FSEP: the layout used at every (step, layer)
  meta.json        machine, devices, torch/NCCL versions, date, losses
  losses.csv       step, loss
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from moesim.config import Config, load_config, parse_override, with_overrides
from moesim.errors import InputError
from runtime import checkpoint
from runtime.balancing import after_step
from runtime.comm import DistEnv, all_reduce_grads, init_distributed
from runtime.data import Batches
from runtime.kernels_bridge import expert_backend
from runtime.model import MoETransformer
from runtime.optim import MasterWeights, clip_grads, global_grad_norm, lr_at, set_lr
from runtime.rundir import FSEP_RUNTIME_SCHEDULE, machine_meta, write_run_dir
from runtime.timing import PhaseTimer

# Test hook: "RANK:STEP" makes that rank die (os._exit) at the start of that step, to check
# that its peers end with a clear error instead of hanging.
FAULT_ENV = "MOESIM_FAULT_EXIT"


def forced_routing(cfg: Config, world: int) -> np.ndarray | None:
    """Counts [steps, layers, N, H, E] for forced routing, from traces.generators."""
    r, m = cfg.run, cfg.model
    if r.routing != "forced":
        return None
    from traces.generators import TraceSpec, generate
    params = {"exponent": r.routing_exponent} if r.routing_kind in ("zipf", "drifting") else {}
    spec = TraceSpec(kind=r.routing_kind, steps=r.steps, layers=m.num_layers, shards=world,
                     experts=m.num_experts, heads=m.num_heads, top_k=m.top_k,
                     tokens_per_shard=r.tokens_per_rank, seed=r.seed, model=m.name,
                     params=params)
    return generate(spec).counts


def make_layout(cfg: Config, world: int):
    if cfg.parallel.strategy != "fsep":
        return None
    from runtime.plans import online_layout, plan_layout
    if cfg.run.plan:
        return plan_layout(cfg.run.plan, world)
    return online_layout(cfg.model, world, cfg.planner, cluster=cfg.cluster)


class Trainer:
    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        m = cfg.model
        if cfg.parallel.degree and cfg.parallel.degree != env.world:
            raise InputError(cfg.source, "parallel.degree", f"{cfg.parallel.degree}, but the "
                             f"job has {env.world} ranks (torchrun --nproc-per-node)")
        if env.rank == 0 and cfg.parallel.strategy == "fsep" and any(
                getattr(cfg.parallel, k) != v for k, v in FSEP_RUNTIME_SCHEDULE.items()):
            print("runtime: FSEP gathers each layer's weights in one all-to-all and again for "
                  "the backward (parallel.fsep_chunks and fsep_backward_gather are simulator "
                  "options); the run directory records that schedule", flush=True)
        self.forced = forced_routing(cfg, env.world)
        self.model = MoETransformer(cfg, env, make_layout(cfg, env.world)).to(env.device)
        self.dtype = torch.bfloat16 if env.device.type == "cuda" and m.dtype == "bf16" \
            else torch.float32
        self.model.to(self.dtype)
        params = list(self.model.parameters())
        self.master = MasterWeights(params, cfg.train.precision == "mixed")
        by_id = {id(p): m for p, m in zip(params, self.master.masters, strict=True)}
        rep_ids = {id(p) for p in self.model.replicated_parameters()}
        # Gradients are reduced, clipped and stepped on the masters (fp32 under "mixed").
        self.replicated = [by_id[id(p)] for p in self.model.replicated_parameters()]
        self.sharded = [by_id[id(p)] for p in params if id(p) not in rep_ids]
        self.opt = self.master.optimizer(cfg.run.lr)
        self.grad_norms: list[float] = []
        self.data = Batches(cfg, env.rank)
        self.timer = PhaseTimer(env.device)
        for layer in self.model.moe_layers:
            layer.timer = self.timer
        self.start_step = 0
        self.losses: list[float] = []
        self.balance_log: list[dict] = []
        self.rows: list[dict] = []
        self.counts: list[np.ndarray] = []  # per step [layers, N, H, E]
        self.placements: dict[tuple[int, int], object] = {}

    # -- checkpoints ---------------------------------------------------------------------
    def _ckpt_dir(self) -> Path:
        return Path(self.cfg.run.out_dir) / "checkpoints"

    def state(self, step: int) -> dict:
        return {"step": step, "model": self.model.state_dict(), "opt": self.opt.state_dict(),
                "prev_counts": [getattr(ly, "prev_counts", None) for ly in
                                self.model.moe_layers],
                "master": self.master.state_dict(), "grad_norms": self.grad_norms,
                "losses": self.losses, "rows": self.rows, "counts": self.counts,
                "balance": self.balance_log,
                "placements": self.placements, "rng": torch.get_rng_state()}

    def resume(self) -> None:
        st = checkpoint.load_latest(self._ckpt_dir(), self.env.rank)
        if st is None:
            return
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["opt"])
        self.master.load_state_dict(st.get("master"))
        self.grad_norms = st.get("grad_norms", [])
        for ly, pc in zip(self.model.moe_layers, st["prev_counts"], strict=True):
            if hasattr(ly, "prev_counts"):
                ly.prev_counts = pc
        self.losses, self.rows, self.counts = st["losses"], st["rows"], st["counts"]
        self.balance_log = st.get("balance", [])
        self.placements = st["placements"]
        torch.set_rng_state(st["rng"])
        self.start_step = st["step"] + 1
        if self.env.rank == 0:
            print(f"resumed from step {st['step']}", flush=True)

    # -- the loop --------------------------------------------------------------------------
    def step(self, step: int) -> float:
        env, cfg = self.env, self.cfg
        x, y = (t.to(env.device) for t in self.data.get(step))
        forced = None if self.forced is None else list(self.forced[step])
        self.timer.start_step(step)
        logits = self.model(x, forced)
        # Sum over this rank's tokens / all ranks' tokens: summed over the ranks it is the
        # global mean, and so are the summed gradients.
        total = x.numel() * env.world
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                 y.reshape(-1), reduction="sum") / total
        self.opt.zero_grad(set_to_none=True)
        self.model.zero_grad(set_to_none=True)  # the bf16 grads, when the masters are copies
        balance = self.model.balancing_loss()  # runtime.balancing: aux and z losses
        (loss if balance is None else loss + balance).backward()
        self.master.grads_to_masters()
        t0 = self.timer.now()
        all_reduce_grads(self.replicated)
        self.timer.record(-1, "bwd", "grad_sync", t0, self.timer.now(),
                          sum(p.numel() * p.element_size() for p in self.replicated))
        norm = global_grad_norm(self.replicated, self.sharded)
        self.grad_norms.append(norm)
        if cfg.run.grad_clip > 0:
            clip_grads(self.master.masters, norm, cfg.run.grad_clip)
        set_lr(self.opt, lr_at(step, cfg.run))
        self.opt.step()
        self.master.masters_to_params()
        self.balance_log.append(after_step(self.model.moe_layers))  # and the expert bias
        self.rows += self.timer.rows(env.rank, cfg.parallel.strategy)
        if cfg.run.trace_out:
            self.counts.append(np.stack([ly.seen_counts() for ly in self.model.moe_layers]))
        for ly in self.model.moe_layers:
            if getattr(ly, "last_placement", None) is not None:
                self.placements[(step, ly.layer)] = ly.last_placement
        total_loss = loss.detach().float().clone()
        dist.all_reduce(total_loss)
        return float(total_loss)

    def run(self) -> None:
        cfg, env = self.cfg, self.env
        fault = os.environ.get(FAULT_ENV, "")
        for step in range(self.start_step, cfg.run.steps):
            if fault and fault == f"{env.rank}:{step}":
                os._exit(17)
            loss = self.step(step)
            self.losses.append(loss)
            if env.rank == 0 and (step % cfg.run.log_every == 0 or step == cfg.run.steps - 1):
                print(f"step {step} loss {loss:.6f}", flush=True)
            if cfg.run.checkpoint_every and (step + 1) % cfg.run.checkpoint_every == 0:
                checkpoint.save(self._ckpt_dir(), step, env.rank, self.state(step))
        self.write_outputs()

    # -- outputs ---------------------------------------------------------------------------
    def write_outputs(self) -> None:
        cfg, env = self.cfg, self.env
        rows = [None] * env.world
        dist.all_gather_object(rows, self.rows)
        if env.rank != 0:
            return
        meta = {**machine_meta(env.world, env.backend, env.device.type),
                "strategy": cfg.parallel.strategy, "routing": cfg.run.routing,
                "data": self.data.info, "losses": self.losses,
                "grad_norms": self.grad_norms,
                "lrs": [lr_at(s, cfg.run) for s in range(cfg.run.steps)],
                "master_weights": self.master.enabled,
                "balancing": {"losses": self.balance_log, "expert_bias": [
                    None if ly.balancer is None else ly.balancer.bias.cpu().tolist()
                    for ly in self.model.moe_layers]},
                "expert_backend": expert_backend(env.device, self.dtype)}
        write_run_dir(Path(cfg.run.out_dir), cfg, env.world, [r for p in rows for r in p],
                      self.counts, self.placements, meta, self.losses)


def build_parser(p: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = p or argparse.ArgumentParser(prog="runtime.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field (repeatable)")
    p.add_argument("--out", help="run directory (overrides run.out_dir)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the latest checkpoint in the run directory")
    return p


def main_args(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, dict(parse_override(s) for s in args.set))
    if args.out:
        cfg = with_overrides(cfg, {"run.out_dir": args.out})
    env = init_distributed(cfg.run.device, cfg.run.timeout_s)
    try:
        trainer = Trainer(cfg, env)
        if args.resume:
            trainer.resume()
        t0 = time.perf_counter()
        trainer.run()
        if env.rank == 0:
            print(f"done: {cfg.run.steps} steps in {time.perf_counter() - t0:.1f} s; "
                  f"outputs in {cfg.run.out_dir}", flush=True)
    except (RuntimeError, dist.DistBackendError) as e:
        # A dead or stuck peer surfaces here as a failed collective (after run.timeout_s at
        # most): one clear line instead of a hang or a wall of traceback.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moesim run: error: rank {env.rank}: a collective failed (a peer rank died or "
              f"did not answer within run.timeout_s = {cfg.run.timeout_s:g} s): {first}",
              file=sys.stderr, flush=True)
        os._exit(1)  # the process group may be wedged: do not wait on its destructor
    dist.destroy_process_group()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return main_args(args)
    except InputError as e:
        print(f"moesim: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
