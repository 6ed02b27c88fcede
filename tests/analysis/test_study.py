"""Study files (configs/studies/README.md): expansion, the checks at the edge, the expression
language, computed verdicts, and end-to-end runs of small studies shaped like the LAER (issue
16) and HP (issue 17) studies, checked against the Result files' own numbers."""

from __future__ import annotations

import math
import subprocess
import sys
import textwrap

import numpy as np
import pandas as pd
import pytest

from analysis.run_summary import step_times
from analysis.study import load_study, read_layout, run_study
from analysis.study_expr import Expr
from analysis.study_report import verdict
from moesim.errors import InputError
from moesim.results import read_results
from traces.generators import TraceSpec, generate

TINY = """
[base]
trace = { kind = "zipf", exponent = 1.0 }
cluster = { preset = "h200x2", nodes = 1, gpus_per_node = 2 }
run = { steps = 2, seed = 3, tokens_per_rank = 256 }
[base.model]
name = "tiny"
num_layers = 2
d_model = 256
d_ffn = 128
num_experts = 8
top_k = 2
attn_heads = 4
"""


def write(tmp_path, body: str, name: str = "s.toml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(body))
    return p


def study_head(name: str = "t", source: str = "moesim") -> str:
    return f'[study]\nname = "{name}"\ntitle = "T"\nsource = "{source}"\n'


# --- expressions --------------------------------------------------------------------------

def test_expressions_compute_and_refuse_what_is_not_arithmetic():
    env = {("a", None): 6, ("ep", "step_ms"): 3.0, ("hp", "step_ms"): 2.0}
    look = lambda n, a: env[(n, a)]  # noqa: E731
    assert Expr("ep.step_ms / hp.step_ms", "f", "x")(look) == 1.5
    assert Expr("-a // 4 + 2 ** 3 % 5", "f", "x")(look) == -6 // 4 + 8 % 5
    assert Expr("max(a, 10) - min(a, 1) + abs(-2)", "f", "x")(look) == 11
    assert math.isnan(Expr("a / 0", "f", "x")(look))
    assert Expr("ep.step_ms / hp.step_ms + a", "f", "x").names() == {
        ("ep", "step_ms"), ("hp", "step_ms"), ("a", None)}
    for bad in ("__import__('os')", "a if a else 1", "a.b.c", "[1, 2]", "a ==", "lambda: 1",
                "open('x')", "a[0]"):
        with pytest.raises(InputError, match="f: x"):
            Expr(bad, "f", "x")


def test_verdict_words_are_computed_with_the_tolerance():
    assert verdict(1.5, 1.45, 1.69, 0.1) == "inside the paper's range"
    assert verdict(1.41, 1.45, 1.69, 0.1) == "within ±10% of the paper's range (-3%)"
    assert verdict(1.06, 1.61, 1.61, 0.15) == "outside ±15% of the paper's figure (-34%)"
    assert verdict(1.80, 1.61, 1.61, 0.15) == "within ±15% of the paper's figure (+12%)"
    assert verdict(float("nan"), 1, 2, 0.1) == "no simulated value"


# --- loading and expansion -----------------------------------------------------------------

def test_axes_multiply_arms_and_expressions_see_the_run_config(tmp_path):
    p = write(tmp_path, study_head() + TINY + """
[[axis]]
name = "width"
point = [ { label = 256, set = { "model.d_model" = 256 } },
          { label = 512, set = { "model.d_model" = 512 }, labels = { big = "yes" } } ]
[[axis]]
name = "k"
point = [ { label = 1, set = { "model.top_k" = 1 } }, { label = 2 } ]
[[arm]]
name = "ep"
strategy = "ep"
[[arm]]
name = "hp"
strategy = "hp"
only = { k = 2 }
[arm.set]
"model.num_heads" = 4
"model.head_dim" = "= model.d_model // model.num_heads"
"model.d_ffn" = "= model.head_dim * 2"
""")
    s = load_study(p, tmp_path)
    assert [r.key for r in s.runs] == ["256-1-ep", "256-2-ep", "256-2-hp", "512-1-ep",
                                       "512-2-ep", "512-2-hp"]
    hp = {r.key: r for r in s.runs}["512-2-hp"]
    assert hp.config["model"]["head_dim"] == 128 and hp.config["model"]["d_ffn"] == 256
    assert hp.config["model"]["top_k"] == 2 and hp.labels["big"] == "yes"
    assert hp.labels == {"width": 512, "big": "yes", "k": 2, "arm": "hp", "strategy": "hp"}
    assert s.out == tmp_path / "docs" / "reproduction" / "t"


@pytest.mark.parametrize("body, field", [
    ('[[arm]]\nname = "ep"\nset = { "model.nope" = 1 }\n', "arm[0].set.model.nope"),
    ('[[arm]]\nname = "ep"\nbogus = 1\n', "arm[0].bogus"),
    ('[[arm]]\nname = "ep-hot"\n', "arm[0].name"),
    ('[[arm]]\nname = "ep"\nset = { "model.top_k" = "= model.d_model +" }\n',
     "arm[0].set.model.top_k"),
    ('[[arm]]\nname = "ep"\nset = { "model.top_k" = 99 }\n', "model.top_k"),
    ('[[arm]]\nname = "ep"\nset = { "cluster.nodes" = 2, "cluster.gpus_per_node" = 1 }\n',
     "arm[0].no_dedup_reason"),
    ('[[arm]]\nname = "ep"\n[[table]]\ntitle = "x"\nrows = ["nope"]\n'
     'columns = [{ header = "a", value = "step_ms" }]\n', "table[0].rows"),
    ('[[arm]]\nname = "ep"\n[[table]]\ntitle = "x"\nrows = []\n'
     'columns = [{ header = "a", value = "hp.step_ms" }]\n', "table[0].columns[0].value"),
    ('[[arm]]\nname = "ep"\n[values]\nv = { value = "step_ms" }\n[[claim]]\nclaim = "c"\n'
     'paper = 1\npaper_text = "1"\npaper_source = "x"\nvalue = "w"\ntolerance = 0.1\n',
     "claim[0].value"),
])
def test_bad_study_is_one_error_naming_the_field(tmp_path, body, field):
    p = write(tmp_path, study_head() + TINY + body)
    with pytest.raises(InputError) as e:
        load_study(p, tmp_path)
    assert str(e.value).startswith(str(p)) and field in str(e.value)


def test_multinode_ep_without_dedup_needs_a_reason(tmp_path):
    arm = ('[[arm]]\nname = "ep"\nset = { "cluster.preset" = "dgx-h200", "cluster.nodes" = 2, '
           '"cluster.gpus_per_node" = 2 }\n')
    assert load_study(write(tmp_path, study_head() + TINY + arm + 'no_dedup_reason = "x"\n'),
                      tmp_path).runs
    dedup = arm.replace('"cluster.nodes" = 2', '"cluster.nodes" = 2, "parallel.ep_dedup" = true')
    assert load_study(write(tmp_path, study_head() + TINY + dedup), tmp_path).runs


def test_cli_bad_study_exits_2_with_one_line_and_writes_nothing(tmp_path):
    p = write(tmp_path, study_head() + TINY + '[[arm]]\nname = "ep"\nstrategy = "xx"\n')
    r = subprocess.run([sys.executable, "-m", "moesim", "study", "run", str(p)],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "parallel.strategy" in r.stderr
    assert not (tmp_path / "docs").exists()


# --- end to end: LAER- and HP-shaped studies ----------------------------------------------

def test_laer_shaped_study_writes_the_issue_16_columns(tmp_path):
    ref = tmp_path / "paper.csv"
    pd.DataFrame({"dataset": ["wiki"] * 4, "method": ["megatron", "laer"] * 2,
                  "model_name": ["a", "a", "b", "b"], "aux_loss": [0] * 4,
                  "ms": [300.0, 200.0, 500.0, 250.0]}).to_csv(ref, index=False)
    p = write(tmp_path, study_head("laer", "artifact") + TINY + """
[[axis]]
name = "model_name"
point = [ { label = "a" }, { label = "b", set = { "model.d_ffn" = 256 } } ]
[[axis]]
name = "dataset"
point = [ { label = "wiki", trace = { exponent = 1.2 } } ]
[[axis]]
name = "aux_loss"
point = [ { label = 0 } ]
[[arm]]
name = "megatron"
strategy = "ep"
labels = { method = "megatron" }
[[arm]]
name = "laer"
strategy = "fsep"
set = { "planner.solver" = "laer" }
labels = { method = "laer" }
[reference]
file = "paper.csv"
match = { dataset = "dataset", method = "method", model_name = "model_name", aux_loss = "aux_loss" }
[summary.columns]
dataset = "dataset"
method = "method"
model_name = "model_name"
aux_loss = "aux_loss"
simulated_ms = "step_ms"
[[table]]
title = "LAER over megatron"
rows = ["model_name", "dataset", "aux_loss"]
columns = [
  { header = "model", value = "model_name" },
  { header = "paper", value = "megatron.paper_ms / laer.paper_ms", format = "{:.2f}x" },
  { header = "simulated", value = "megatron.step_ms / laer.step_ms", format = "{:.2f}x" },
]
[values.paper_b]
value = "megatron.paper_ms / laer.paper_ms"
rows = ["model_name"]
where = { model_name = "b" }
[[claim]]
claim = "LAER over megatron, model b"
paper = 2.0
paper_text = "2.00x"
paper_source = "paper.csv"
value = "paper_b"
tolerance = 0.1
""")
    study = load_study(p, tmp_path)
    run_study(study, cache=tmp_path / "cache", log=lambda _: None, figures=False)
    out = tmp_path / "docs" / "reproduction" / "laer"
    s = pd.read_csv(out / "summary.csv")
    assert list(s.columns) == ["dataset", "method", "model_name", "aux_loss", "simulated_ms"]
    assert len(s) == 4 and set(s["method"]) == {"megatron", "laer"}
    for _, r in s.iterrows():  # the step time is the Result file's own, independently
        key = f"{r['model_name']}-wiki-0-{r['method']}"
        df, meta = read_results(out / "results" / f"{key}.parquet")
        assert r["simulated_ms"] == pytest.approx(step_times(df)["step_time_s"].mean() * 1e3,
                                                  rel=1e-5)
        assert meta["labels"]["method"] == r["method"]
    report = (out / "report.md").read_text()
    assert "| a | 1.50x |" in report and "| b | 2.00x |" in report
    claims = pd.read_csv(out / "claims.csv")
    assert claims.loc[0, "verdict"] == "equal to the paper's figure"
    # the routing of the dataset axis reached the trace
    assert (out / "configs" / "a-wiki-0-laer.toml").read_text().count('"exponent": 1.2') == 1


def test_hp_shaped_grouped_summary_and_resume(tmp_path):
    p = write(tmp_path, study_head("hp", "paper-code") + TINY + """
[[axis]]
name = "top_k"
point = [ { label = 2 }, { label = 4, set = { "model.top_k" = 4 } } ]
[[axis]]
name = "ep_variant"
point = [ { label = "moesim" }, { label = "paper", set = { "model.activation" = "unfused" } } ]
[[arm]]
name = "ep"
strategy = "ep"
labels = { setup = "tiny" }
[[arm]]
name = "hp"
strategy = "hp"
set = { "model.num_heads" = 4, "model.head_dim" = 64, "model.activation" = "fused" }
labels = { setup = "tiny" }
[summary]
rows = ["top_k", "ep_variant"]
[summary.columns]
arm = "setup"
top_k = "top_k"
ep_variant = "ep_variant"
ep_ms = "ep.step_ms"
hp_ms = "hp.step_ms"
speedup = "ep.step_ms / hp.step_ms"
bytes_ratio = "hp.comm_bytes_per_gpu / ep.comm_bytes_per_gpu"
""")
    study = load_study(p, tmp_path)
    logs: list[str] = []
    run_study(study, cache=tmp_path / "cache", log=logs.append, figures=False)
    out = tmp_path / "docs" / "reproduction" / "hp"
    s = pd.read_csv(out / "summary.csv")
    assert list(s.columns) == ["arm", "top_k", "ep_variant", "ep_ms", "hp_ms", "speedup",
                               "bytes_ratio"]
    assert len(s) == 4
    assert np.allclose(s["speedup"], s["ep_ms"] / s["hp_ms"], rtol=1e-5)
    # HP's arm is the same run under both EP variants: simulated once, the same result
    hp = s.set_index(["top_k", "ep_variant"])["hp_ms"]
    assert hp[(2, "moesim")] == hp[(2, "paper")]
    assert s.set_index(["top_k", "ep_variant"])["ep_ms"][(2, "paper")] > \
        s.set_index(["top_k", "ep_variant"])["ep_ms"][(2, "moesim")]  # unfused is slower
    # resume: nothing is re-run
    logs.clear()
    run_study(study, cache=tmp_path / "cache", resume=True, log=logs.append, figures=False)
    assert sum("up to date" in x for x in logs) == len(study.runs)


def test_layout_runner_equals_hand_computed_ep_loads(tmp_path):
    p = write(tmp_path, study_head() + TINY + """
[[arm]]
name = "ep"
strategy = "ep"
runner = "layout"
""")
    study = load_study(p, tmp_path)
    run_study(study, cache=tmp_path / "cache", log=lambda _: None, figures=False)
    grid = read_layout(study.results_path(study.runs[0]))
    t = generate(TraceSpec(kind="zipf", steps=2, layers=2, shards=2, experts=8, top_k=2,
                           tokens_per_shard=256, seed=3, model="tiny",
                           params={"exponent": 1.0}))
    load = t.counts.reshape(2, 2, 2, -1).sum(axis=2)  # [steps, layers, experts]
    want = load.reshape(2, 2, 2, 4).sum(axis=-1)  # experts 0-3 on rank 0, 4-7 on rank 1
    assert np.array_equal(grid, want)
    s = pd.read_csv(study.out / "summary.csv")
    assert s.loc[0, "imbalance"] == pytest.approx(
        float((want.max(-1) / want.mean(-1) - 1).mean()), rel=1e-5)


def test_every_committed_study_file_loads():
    from analysis.reproduce import load_all

    studies = load_all()
    assert {s.name for s in studies} >= {"seed-hp", "seed-fsep", "seed-fsep-layout", "topk",
                                         "scaling"}
    for s in studies:
        assert s.runs


def test_parallel_jobs_give_the_same_results(tmp_path):
    body = study_head() + TINY + """
[[axis]]
name = "k"
point = [ { label = 1, set = { "model.top_k" = 1 } }, { label = 2 } ]
[[arm]]
name = "ep"
strategy = "ep"
[[arm]]
name = "fsep"
strategy = "fsep"
"""
    out = {}
    for jobs in (1, 2):
        d = tmp_path / f"j{jobs}"
        d.mkdir()
        study = load_study(write(d, body), d)
        run_study(study, cache=d / "cache", log=lambda _: None, figures=False, jobs=jobs)
        out[jobs] = (study.out / "summary.csv").read_text()
    assert out[1] == out[2]


def test_whole_iteration_runs_report_the_global_batch(tmp_path):
    p = write(tmp_path, study_head() + TINY.replace(
        'run = { steps = 2, seed = 3, tokens_per_rank = 256 }',
        'run = { steps = 1, seed = 3, tokens_per_rank = 256 }\n'
        'train = { scope = "iteration", micro_batches = 2 }') + """
[[arm]]
name = "ep"
strategy = "ep"
set = { "model.seq_len" = 128 }
""")
    study = load_study(p, tmp_path)
    run_study(study, cache=tmp_path / "cache", log=lambda _: None, figures=False)
    df, meta = read_results(study.results_path(study.runs[0]))
    s = pd.read_csv(study.out / "summary.csv").iloc[0]
    it = meta["iteration"]
    assert s["tokens_per_step"] == it["tokens"]
    assert s["step_ms"] == pytest.approx(step_times(df)["step_time_s"].mean() * 1e3, rel=1e-5)
    assert s["mfu"] == pytest.approx(it["model_flops"] / (s["step_ms"] / 1e3) / 2
                                     / it["peak_flops"], rel=1e-4)
