"""Pinned step programs: the simulated step time and every Result row of EP, HP and FSEP on
small configs, as the hand-written builders produced them before the step programs became
declarative tables (issue 14). A change to the program tables that moves a number fails here.

The pins live in tests/simulator/data/program_pins.json. A deliberate model change regenerates
them (and says so in its commit):

    python -m tests.simulator.test_program_pins --write
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from moesim.config import config_from_dict
from moesim.sim.simulate import Simulator
from traces.generators import TraceSpec, generate

PINS = Path(__file__).with_name("data") / "program_pins.json"
NO_LAT = {"nvlink_latency_us": 0.0, "nic_latency_us": 0.0, "fabric_latency_us": 0.5}


def _case(strategy: str, *, heads: int = 1, top_k: int = 4, nodes: int = 1, gpn: int = 8,
          degree: int | None = None, layers: int = 2, **parallel):
    model = {"num_layers": layers, "d_model": 1024, "d_ffn": 256, "num_experts": 16,
             "top_k": top_k}
    if heads > 1:
        model.update(num_heads=heads, head_dim=64)
    ranks = degree or nodes * gpn
    planner = {"solver": "laer", "slots_per_rank": max(8, 16 * heads // ranks)}
    if "ep_hot_replicas" in parallel:
        planner["ep_hot_replicas"] = parallel.pop("ep_hot_replicas")
    cfg = config_from_dict({
        "model": model,
        "cluster": {"nodes": nodes, "gpus_per_node": gpn, "collective_latency_us": 10.0,
                    **NO_LAT},
        "parallel": {"degree": ranks, **parallel},
        "planner": planner,
    })
    trace = generate(TraceSpec(kind="zipf", steps=2, layers=layers, shards=ranks,
                               experts=16, heads=heads, top_k=top_k, tokens_per_shard=512,
                               seed=3, params={"exponent": 1.2}))
    return strategy, cfg, trace


CASES = {
    "ep-8": lambda: _case("ep"),
    "ep-1rank": lambda: _case("ep", gpn=1),
    "ep-dedup-2node": lambda: _case("ep", nodes=2, ep_dedup=True),
    "ep-hier-2node": lambda: _case("ep", nodes=2, a2a_algorithm="hierarchical"),
    "ep-dp2": lambda: _case("ep", nodes=2, degree=8),
    "ep-hot": lambda: _case("ep", ep_hot_replicas=4),
    "ep-latent": lambda: _case("ep", heads=8, top_k=2),
    "ep-nosync": lambda: _case("ep", nodes=2, degree=8, dp_grad_sync=False),
    "hp-8": lambda: _case("hp", heads=8, top_k=2),
    "hp-1rank": lambda: _case("hp", heads=8, top_k=2, gpn=1),
    "hp-dp2": lambda: _case("hp", heads=8, top_k=2, nodes=2, degree=8),
    "fsep-8": lambda: _case("fsep", fsep_chunks=3),
    "fsep-1rank": lambda: _case("fsep", gpn=1),
    "fsep-nobwd": lambda: _case("fsep", fsep_chunks=2, fsep_backward_gather=False),
    "fsep-dp2": lambda: _case("fsep", nodes=2, degree=8),
    "fsep-latent": lambda: _case("fsep", heads=8, top_k=2, layers=3),
}


def _pin(name: str) -> dict:
    strategy, cfg, trace = CASES[name]()
    sim = Simulator(cfg, trace, "gen")
    out = sim.simulate_step(strategy, 1)
    f = out.frame.sort_values(["layer", "pass", "phase", "stream", "rank", "start_s",
                               "end_s"], kind="stable")
    text = f.to_csv(index=False, float_format="%.11e")
    ops = [f"{o.layer} {o.pass_} {o.phase} {o.stream} {o.chunk} {float(o.start.min()):.11e} "
           f"{float(o.end.max()):.11e} {int(o.nbytes.sum())} {int(o.tokens.sum())}"
           for o in sorted(out.ops, key=lambda o: (o.layer, o.pass_, o.phase, o.stream,
                                                    float(o.start.min()), o.chunk))]
    return {"step_time": out.step_time, "rows": len(f),
            "digest": hashlib.sha256(text.encode()).hexdigest(), "ops": ops}


@pytest.mark.parametrize("name", sorted(CASES))
def test_step_program_is_pinned(name):
    want = json.loads(PINS.read_text())[name]
    got = _pin(name)
    assert got["step_time"] == pytest.approx(want["step_time"], rel=1e-12, abs=0)
    assert got["rows"] == want["rows"]
    # Op by op first (a readable failure), then every row through the digest.
    assert got["ops"] == want["ops"]
    assert got["digest"] == want["digest"]


def test_pins_cover_every_strategy_and_are_not_trivial():
    pins = json.loads(PINS.read_text())
    assert set(pins) == set(CASES)
    for s in ("ep", "hp", "fsep"):
        times = [p["step_time"] for n, p in pins.items() if n.startswith(s)]
        assert len(times) >= 3 and min(times) > 0
        assert len(set(np.round(times, 15))) == len(times)  # each case a different step


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit("usage: python -m tests.simulator.test_program_pins --write")
    PINS.parent.mkdir(exist_ok=True)
    PINS.write_text(json.dumps({n: _pin(n) for n in sorted(CASES)}, indent=1) + "\n")
    print(f"wrote {PINS}")
