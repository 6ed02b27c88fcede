"""Simulator wall time: one training step (MoE part, forward + backward) of a 32-layer model on
DGX-H200 clusters of 64, 256 and 1024 GPUs, for EP, HP and FSEP.

    python -m benchmarks.simulator [--nodes 8,32,128 --layers 32 --repeat 3]

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


def _config(model: dict, nodes: int, layers: int, slots: int):
    return config_from_dict({
        "model": {**model, "num_layers": layers},
        "cluster": {"preset": "dgx-h200", "nodes": nodes, "fabric": "rail"},
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", default="8,32,128")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--trace-steps", type=int, default=32,
                    help="trace steps: group g replays step g mod this, so 32 gives every "
                    "group of a 1024-GPU cluster its own routing")
    args = ap.parse_args()
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
                sim = Simulator(_config(model, nodes, args.layers, slots), trace, "bench")
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
