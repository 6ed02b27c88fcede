"""Plan files (round trip, validation) and `moesim plan`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from moesim.errors import InputError
from planner.placement import ep_hot_replicas
from planner.plan import Plan, plan_to_dict, read_plan, write_plan


def _plan():
    p = ep_hot_replicas(np.array([9.0, 1, 1, 1]), 2, 1)
    return Plan("ep", 2, 4, 4, {(0, 0): p, (1, 0): p}, {(0, 0): {"gap": float("nan")}})


def test_roundtrip(tmp_path):
    path = tmp_path / "p.json"
    write_plan(_plan(), path)
    back = read_plan(path)
    assert set(back.placements) == {(0, 0), (1, 0)}
    assert back.placement(0, 0).same_layout(_plan().placements[0, 0])
    assert back.stats[0, 0]["gap"] is None
    with pytest.raises(InputError, match="step 5"):
        back.placement(5, 0)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.update(schema_version=9), "schema_version"),
    (lambda d: d.update(kind="x"), "kind"),
    (lambda d: d.update(num_ranks=0), "num_ranks"),
    (lambda d: d["entries"][0].update(replicas=[[0, 0, 1.0]]), "entries[0].replica_expert"),
    (lambda d: d["entries"][1]["replicas"][0].__setitem__(2, 0.7), "entries[1].replica_share"),
    (lambda d: d["entries"][0]["replicas"][0].__setitem__(1, 7), "entries[0].replica_rank"),
    (lambda d: d["entries"][0].update(replicas="x"), "entries[0].replicas"),
    (lambda d: d["entries"].append(dict(d["entries"][0])), "entries[2]"),
    (lambda d: d.update(slots_per_rank=1, strategy="fsep"), "entries[0].replicas"),
])
def test_malformed_plan_names_field(tmp_path, mutate, field):
    d = plan_to_dict(_plan())
    mutate(d)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(d))
    with pytest.raises(InputError) as e:
        read_plan(path)
    assert e.value.field == field and e.value.source == str(path)


def test_not_json(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{")
    with pytest.raises(InputError, match="JSON"):
        read_plan(path)


def _setup(tmp_path, strategy="fsep", extra=""):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[model]\nnum_experts = 16\ntop_k = 2\n[cluster]\nnodes = 1\n'
                   f'gpus_per_node = 4\n[parallel]\nstrategy = "{strategy}"\n'
                   f'[planner]\nslots_per_rank = 6\ntime_limit_s = 0.5\n{extra}')
    trace = tmp_path / "t.parquet"
    assert main(["trace", "gen", "--steps", "2", "--layers", "2", "--shards", "8",
                 "--experts", "16", "--top-k", "2", "--tokens-per-shard", "256",
                 "--out", str(trace)]) == 0
    return cfg, trace


def test_cli_plan_fsep(tmp_path, capsys):
    cfg, trace = _setup(tmp_path)
    out = tmp_path / "p.json"
    assert main(["plan", "--trace", str(trace), "--config", str(cfg), "--out", str(out)]) == 0
    plan = read_plan(out)
    assert plan.strategy == "fsep" and len(plan.placements) == 4
    assert all(p.replicas_per_rank().max() <= 6 for p in plan.placements.values())
    lines = capsys.readouterr().out.strip().splitlines()
    head = next(i for i, ln in enumerate(lines) if "lp_bound" in ln)
    assert len(lines) - head == 5
    for st in plan.stats.values():
        assert st["max_time"] >= st["bound"] * (1 - 1e-6)


def test_cli_plan_hp_error_and_no_output(tmp_path, capsys):
    cfg, trace = _setup(tmp_path, extra="slots_per_rank = 3\n".replace("slots", "#"))
    out = tmp_path / "p.json"
    rc = main(["plan", "--trace", str(trace), "--config", str(cfg), "--out", str(out),
               "--set", "planner.slots_per_rank=3"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "slots_per_rank" in err[0]
    assert not out.exists()


def test_cli_plan_ep_hot(tmp_path):
    cfg, trace = _setup(tmp_path, strategy="ep", extra="ep_hot_replicas = 2\n")
    out = tmp_path / "p.json"
    assert main(["plan", "--trace", str(trace), "--config", str(cfg), "--out", str(out),
                 "--quiet"]) == 0
    assert all(p.num_replicas == 18 for p in read_plan(out).placements.values())
