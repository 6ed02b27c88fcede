"""`moesim plot` end to end: from Result files on disk to PNG and PDF images."""

import matplotlib.image as mpimg
import numpy as np
import pandas as pd
import pytest
from result_factory import DEFAULT_PROGRAM, meta_for, result_frame

from moesim.cli import main
from moesim.results import write_results


def _check_images(out, name):
    png, pdf = out / f"{name}.png", out / f"{name}.pdf"
    img = mpimg.imread(png)
    h, w = img.shape[:2]
    assert 300 < w < 3000 and 200 < h < 3000
    # something was drawn: not a blank canvas
    assert img[..., :3].std() > 0.05
    assert pdf.read_bytes().startswith(b"%PDF") and pdf.stat().st_size > 5000


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    rng = np.random.default_rng(0)
    paths = {}
    for s in ("ep", "hp", "fsep"):
        for n in (4, 8):
            loads = rng.integers(500, 1500, (4, 2, n))
            p = d / f"{s}_{n}.parquet"
            write_results(result_frame(s, ranks=n, steps=4, loads=loads,
                                       time_scale=1 + n / 16), p, meta_for(s, ranks=n))
            paths[s, n] = p
        for k in (2, 8):
            prog = [(ph, st, dur * (k if s == "ep" and st == "comm" else 1), b)
                    for ph, st, dur, b in DEFAULT_PROGRAM[s]]
            p = d / f"k{k}_{s}.csv"
            write_results(result_frame(s, program=prog), p, meta_for(s, top_k=k))
            paths[s, "k", k] = p
    real = d / "ep_real.parquet"
    write_results(result_frame("ep", ranks=8, source="real", time_scale=1.3), real,
                  meta_for("ep", ranks=8))
    paths["real"] = real
    return paths


def test_scaling_comm_breakdown_imbalance_validation(runs, tmp_path, capsys):
    out = tmp_path / "figs"
    every = [p for k, p in runs.items() if len(k) == 2 and k != "real"]
    topk = [p for k, p in runs.items() if len(k) == 3]
    cases = [
        ("scaling", ["--results", *map(str, every)]),
        ("comm", ["--results", *map(str, topk)]),
        ("breakdown", ["--results", str(runs["ep", 8]), str(runs["hp", 8]),
                       str(runs["fsep", 8])]),
        ("imbalance", ["--results", str(runs["ep", 8]), str(runs["fsep", 8]), "--layer", "1"]),
        ("validation", ["--results", str(runs["ep", 8]), str(runs["real"])]),
    ]
    for kind, args in cases:
        assert main(["plot", kind, *args, "--out", str(out)]) == 0, kind
        _check_images(out, kind)
    assert "wrote" in capsys.readouterr().out


def test_summary_then_scaling_from_summary(runs, tmp_path):
    csv = tmp_path / "summary.csv"
    files = [str(runs["ep", 4]), str(runs["ep", 8]), str(runs["hp", 8])]
    assert main(["plot", "summary", "--results", *files, "--csv", str(csv)]) == 0
    s = pd.read_csv(csv)
    assert sorted(s["num_gpus"]) == [4, 8, 8]
    assert main(["plot", "scaling", "--summary", str(csv), "--out", str(tmp_path),
                 "--name", "sc", "--format", "png"]) == 0
    assert (tmp_path / "sc.png").exists() and not (tmp_path / "sc.pdf").exists()


def test_planner_from_table(tmp_path):
    t = tmp_path / "stats.csv"
    pd.DataFrame({"solver": ["highs", "highs", "greedy", "greedy"],
                  "num_experts": [32, 64, 32, 64],
                  "solve_time_s": [0.1, 0.5, 0.001, 0.002]}).to_csv(t, index=False)
    assert main(["plot", "planner", "--table", str(t), "--out", str(tmp_path)]) == 0
    _check_images(tmp_path, "planner")


def test_bad_inputs_exit_2_naming_file_and_field(runs, tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    pd.DataFrame({"strategy": ["ep"], "num_gpus": [8]}).to_csv(bad, index=False)
    assert main(["plot", "scaling", "--summary", str(bad), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bad.csv" in err and "throughput_tok_s" in err

    junk = tmp_path / "junk.parquet"
    junk.write_bytes(b"not parquet")
    assert main(["plot", "breakdown", "--results", str(junk), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "junk.parquet" in err and "file" in err

    assert main(["plot", "breakdown", "--results", str(tmp_path / "nope.parquet"),
                 "--out", str(tmp_path)]) == 2
    assert "no such file" in capsys.readouterr().err

    # a Result CSV lacking a column
    res = tmp_path / "res.csv"
    pd.read_parquet(runs["ep", 4]).drop(columns="bytes").to_csv(res, index=False)
    assert main(["plot", "breakdown", "--results", str(res), "--out", str(tmp_path)]) == 2
    assert "bytes" in capsys.readouterr().err

    # validation needs both sources
    assert main(["plot", "validation", "--results", str(runs["ep", 4]),
                 "--out", str(tmp_path)]) == 2
    assert "source" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
