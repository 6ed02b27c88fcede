"""Simulator wall time: one training step (MoE part, forward + backward) of a 32-layer model on
DGX-H200 clusters of 64, 256 and 1024 GPUs, for EP, HP and FSEP; with --iteration, one whole
training iteration of Mixtral-8x7B instead (configs/mixtral-8x7b-*.toml: Megatron's EP 8 x TP 8
with ZeRO-1, and FSEP over groups of 32 GPUs with ZeRO-3, 2 micro-batches, full recompute).

    python -m benchmarks.simulator [--nodes 8,32,128 --layers 32 --repeat 3]
    python -m benchmarks.simulator --iteration [--nodes 4,32,128 --repeat 1]

The models are those of configs/dgx-h200-4node*.toml (standard: 64 experts, top-8; HP:
Multi-Head LatentMoE, 32 heads x 16 experts, top-2) with 32 layers, MoE groups of 32 GPUs
(data parallel across groups), on fresh seeded Zipf-1.2 traces with 32 distinct layers (so no
layer repeats another). Each repeat builds a new Simulator (topology, routes, planner) and
simulates step 0; the median is reported with flows and network events per second. "flows"
and "events" count every collective of the step; "solved" the ones the network actually
solved (the rest are answered from the scale-invariant stage cache); rates use the solved. The
reference is closed form: the busiest link's bytes over its capacity for layer 0's forward
dispatch (the lower bound any schedule of that all-to-all meets), next to the simulated time.
"""

from __future__ import annotations

import argparse
import statistics
import time

from moesim.config import config_from_dict
from moesim.sim.simulate import Simulator
from traces.generators import TraceSpec, generate

STD = {"name": "moe-e64-k8", "d_model": 2048, "d_ffn": 1408, "num_experts": 64, "top_k": 8}
MHL = {"name": "mhl-h32-e16-k2", "d_model": 2048, "d_ffn": 5632, "num_experts": 16, "top_k": 2,
       "num_heads": 32, "head_dim": 64}


def _config(model: dict, nodes: int, layers: int, slots: int, network: str = "ideal"):
    return config_from_dict({
        "model": {**model, "num_layers": layers},
        "cluster": {"preset": "dgx-h200", "nodes": nodes, "fabric": "rail",
                    "network_model": network},
        "parallel": {"degree": 32},
        "planner": {"solver": "laer", "slots_per_rank": slots},
    }, "benchmarks.simulator")


def _bound(sim: Simulator, strategy: str) -> tuple[float, float]:
    """(simulated, lower bound) seconds of layer 0's forward dispatch."""
    lin = sim.layer_inputs(strategy, 0, 0)
    t = lin.phases[("fwd", "dispatch")]
    fs = sim.net.flowset(t.src, t.dst, t.nbytes)
    lb = float((fs.by_flow.T @ fs.nbytes / sim.net.capacity).max())
    return sim.coll.all_to_all(t).duration - sim.coll.alpha, lb


def _iterations(nodes_list: list[int], repeat: int) -> None:
    """Whole Mixtral-8x7B iterations: setup and simulate wall time, median of `repeat`."""
    from pathlib import Path

    from moesim.config import load_config, with_overrides
    from moesim.sim.iteration import IterationSimulator
    from traces.io import read_trace

    root = Path(__file__).resolve().parents[1]
    trace = read_trace(root / "traces" / "data" / "mixtral-8x7b-c4.parquet")
    arms = {"ep": root / "configs" / "mixtral-8x7b-megatron-ep8tp8-4node.toml",
            "fsep": root / "configs" / "mixtral-8x7b-fsep-4node.toml"}
    print("| GPUs | strategy | layout | setup s | iteration s (median) | CPU s | ops | flows "
          "(solved) | simulated iteration ms | MFU |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for nodes in nodes_list:
        for strategy, path in arms.items():
            cfg = with_overrides(load_config(path), {"cluster.nodes": nodes})
            setups, steps, cpus = [], [], []
            for _ in range(repeat):
                t0, c0 = time.perf_counter(), time.process_time()
                sim = IterationSimulator(cfg, trace, "bench")
                t1 = time.perf_counter()
                out = sim.simulate_iteration(strategy, 0)
                steps.append(time.perf_counter() - t1)
                setups.append(t1 - t0)
                cpus.append(time.process_time() - c0)
            lay = out.layout
            mfu = out.model_flops / (out.step_time * lay.gpus * out.peak_flops)
            print(f"| {nodes * 8} | {strategy} | tp{lay.tp} dp{lay.dp} ep{lay.ep} | "
                  f"{statistics.median(setups):.2f} | {statistics.median(steps):.2f} | "
                  f"{statistics.median(cpus):.2f} | {len(out.ops)} | {out.flows} "
                  f"({sim.net.flows}) | {out.step_time * 1e3:.1f} | {100 * mfu:.1f}% |",
                  flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default=None, help="node counts (default 8,32,128; "
                    "--iteration: 4,32,128)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--network-model", choices=("ideal", "nccl"), default="ideal",
                    help="cluster.network_model (docs/simulator.md, Collectives)")
    ap.add_argument("--iteration", action="store_true",
                    help="whole Mixtral-8x7B training iterations instead of MoE steps")
    ap.add_argument("--trace-steps", type=int, default=32,
                    help="trace steps: group g replays step g mod this, so 32 gives every "
                    "group of a 1024-GPU cluster its own routing")
    args = ap.parse_args()
    if args.iteration:
        _iterations([int(x) for x in (args.nodes or "4,32,128").split(",")], args.repeat)
        return
    args.nodes = args.nodes or "8,32,128"
    common = {"kind": "zipf", "steps": args.trace_steps, "layers": args.layers, "shards": 32,
              "tokens_per_shard": 4096, "seed": 7, "params": {"exponent": 1.2}}
    std_tr = generate(TraceSpec(experts=64, top_k=8, **common))
    mhl_tr = generate(TraceSpec(heads=32, experts=16, top_k=2, **common))
    print("| GPUs | strategy | setup s | step s (median) | CPU s | flows (solved) | "
          "events (solved) | solved flows/s | solved events/s | simulated step ms | "
          "L0 fwd dispatch sim / bound ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for nodes in (int(x) for x in args.nodes.split(",")):
        total = total_cpu = 0.0
        for strategy in ("ep", "hp", "fsep"):
            model, trace, slots = (MHL, mhl_tr, 24) if strategy == "hp" else (STD, std_tr, 8)
            setups, steps, cpus = [], [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                c0 = time.process_time()
                sim = Simulator(_config(model, nodes, args.layers, slots, args.network_model),
                                trace, "bench")
                t1 = time.perf_counter()
                out = sim.simulate_step(strategy, 0)
                t2 = time.perf_counter()
                cpus.append(time.process_time() - c0)
                setups.append(t1 - t0)
                steps.append(t2 - t1)
            step = statistics.median(steps)
            cpu = statistics.median(cpus)
            total_cpu += cpu
            setup = statistics.median(setups)
            total += step + setup
            sim_t, lb = _bound(sim, strategy)
            print(f"| {nodes * 8} | {strategy} | {setup:.2f} | {step:.2f} | {cpu:.2f} | "
                  f"{out.flows} ({sim.net.flows}) | {out.events} ({sim.net.events}) | "
                  f"{sim.net.flows / step:,.0f} | {sim.net.events / step:,.0f} | "
                  f"{out.step_time * 1e3:.1f} | {sim_t * 1e3:.3f} / {lb * 1e3:.3f} |",
                  flush=True)
        print(f"| {nodes * 8} | **all three** | | **{total:.2f}** (setup + step) | "
              f"**{total_cpu:.2f}** | | | | | | |", flush=True)


if __name__ == "__main__":
    main()
