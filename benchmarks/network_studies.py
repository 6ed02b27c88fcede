"""The reproduction studies again with the "nccl" network model: how each headline moves.

    python -m benchmarks.network_studies [--studies configs/studies/*.toml] [--jobs 1]
        [--out docs/validation/network_studies.csv] [--scratch /tmp/moesim-network-studies]

Every run of each study is simulated again with `cluster.network_model = "nccl"` (terms
`configs/network/hopper.toml`, the fit of docs/validation.md "Network"), everything else as the
study file has it, into a scratch folder (the committed results, which use the default "ideal"
model, stay as they are). Then each claim's simulated value under both models is written to
OUT: study, claim, ideal, nccl, the relative change, and the verdict under each.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
from pathlib import Path

from analysis.study import load_study, run_study
from analysis.study_report import Fields, claims, values
from moesim.atomic import atomic_path

ROOT = Path(__file__).resolve().parents[1]


def with_nccl(study, scratch: Path):
    runs = [dataclasses.replace(r, config={**r.config, "cluster": {
        **r.config["cluster"], "network_model": "nccl"}}) for r in study.runs]
    return dataclasses.replace(study, runs=runs, out=scratch / study.name,
                               figures=scratch / "figures")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--studies", nargs="+",
                    default=sorted(glob.glob(str(ROOT / "configs/studies/*.toml"))))
    ap.add_argument("--out", type=Path, default=ROOT / "docs/validation/network_studies.csv")
    ap.add_argument("--scratch", type=Path, default=Path("/tmp/moesim-network-studies"))
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    rows = []
    for f in args.studies:
        ideal = load_study(f, ROOT)
        nccl = with_nccl(ideal, args.scratch)
        run_study(nccl, figures=False, jobs=args.jobs, resume=True)
        a = claims(Fields(ideal), values(Fields(ideal)))
        b = claims(Fields(nccl), values(Fields(nccl)))
        for (_, x), (_, y) in zip(a.iterrows(), b.iterrows(), strict=True):
            change = y["sim_value"] / x["sim_value"] - 1 if x["sim_value"] else float("nan")
            rows.append({"study": ideal.name, "claim": x["claim"],
                         "paper": x["paper"], "ideal": f"{x['sim_value']:.6g}",
                         "nccl": f"{y['sim_value']:.6g}", "change": f"{change:+.4f}",
                         "verdict_ideal": x["verdict"], "verdict_nccl": y["verdict"]})
            print(f"{ideal.name}: {x['claim']}: {x['sim_value']:.3g} -> {y['sim_value']:.3g} "
                  f"({change:+.1%}); {y['verdict']}")
    with atomic_path(args.out) as tmp, tmp.open("w", newline="") as fh:
        w = csv.DictWriter(fh, list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
