"""The "nccl" network model against published collective measurements: fit, hold-out error,
table and figure.

    python -m benchmarks.network [--measurements docs/validation/network_measurements.csv]
        [--out docs/validation] [--terms-out configs/network/hopper.toml] [--figures docs/figures]

Reads the measurements (one row per published point: source, hardware, settings, the
collective, ranks, nodes, size, time or bandwidth; docs/validation.md "Network" lists the
sources), builds each point's cluster (dgx-h100 / h200x2 presets with the row's NVLink and NIC
rates), fits the model's free terms (`moesim.sim.nccl_fit`) on the rows marked fit = true,
and simulates every row. Writes OUT/network_published.csv (the measurements with
simulated_us, the algorithm and protocol the model picked, and the error), the fitted terms
(TERMS_OUT, which `cluster.network_terms = "hopper"` reads) and FIGURES/network_published.png,
and prints the per-source error of the held-back and the fitted rows.

DeepEP rows report a bandwidth, not a time: their bytes are derived from the routing DeepEP's
tests generate (uniform random top-k of the experts, restricted to the top-g node groups),
the way its tests count them (tests/test_intranode.py, tests/test_internode.py): intranode,
the bytes a rank receives, its own copies included; internode (V1 and V2), one copy per
token and node it reaches, its own node included; FP8 tokens carry hidden x (1 + 4/128)
bytes (the scales). The simulated traffic is that routing's
expected byte matrix: RDMA from a GPU to the GPU of its rail in each remote node, that GPU's
NVLink fan-out to the node's other GPUs, and NVLink copies inside the source node, all at once
(DeepEP pipelines them).
"""

from __future__ import annotations

import argparse
import csv
import datetime
import math
import platform
import statistics
from pathlib import Path

import numpy as np

from moesim.atomic import atomic_path
from moesim.config import ClusterConfig
from moesim.sim.collectives import Traffic
from moesim.sim.nccl import LinkTerms, NcclTerms, load_terms
from moesim.sim.nccl_fit import Point, PointSimulator, fit, free_terms

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 0.10        # held-back median |sim/meas - 1| the issue asks for
NVLS_EFFICIENCY = 275 * 9 / 8 / 450
NVLS_STARTS = (65536.0, float(1 << 20), float(1 << 24))
# NCCL's latency table is a prior: its scale is fitted, pulled to 1 with this sigma (log10), so
# that points which do not constrain latency (large sizes only) leave NCCL's table as it is.
PRIORS = {"latency_scale": (0.0, 0.05)}
SOURCE_TOLERANCE = 0.20


def read_rows(path: Path) -> list[dict]:
    lines = [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]
    return list(csv.DictReader(lines))


def _hit(experts: int, per_rank: int, k: int) -> float:
    """P(a rank holding `per_rank` of `experts` gets at least one of a token's k)."""
    return 1.0 - math.comb(experts - per_rank, k) / math.comb(experts, k)


def deepep_point(row: dict, cluster: ClusterConfig) -> tuple[float, Traffic | None]:
    """(bytes DeepEP's bandwidth counts, expected traffic matrix) of a DeepEP row."""
    n, nodes = int(row["ranks"]), int(row["nodes"])
    g = n // nodes
    tokens, b = int(row["tokens"]), float(row["bytes_per_token"])
    k, experts, groups = int(row["topk"]), int(row["experts"]), int(row["topk_groups"])
    per_rank = experts // n
    if row["traffic"] == "deepep-intranode":
        counted = tokens * n * _hit(experts, per_rank, k) * b   # received, own copies too
        return counted, None                                    # uniform a2a of that size
    # Node groups: a token's experts are drawn from `groups` of the `nodes` nodes.
    p_node = groups / nodes
    in_groups = experts // nodes * groups
    p_rank = p_node * _hit(in_groups, per_rank, k)                    # a given rank
    p_any = p_node * _hit(in_groups, experts // nodes, k)             # a given node
    # DeepEP's "RDMA" bytes: one copy per token and node it reaches, its own node included
    # (tests/test_internode.py: num_rdma_token_sent over all nodes); V2's "logical" bandwidth
    # counts the same (README: "contains local rank traffic").
    counted = tokens * nodes * p_any * b
    src, dst, nb = [], [], []
    rank = np.arange(n)
    node, rail = rank // g, rank % g
    for s in rank:
        for m in range(nodes):
            peers = m * g + np.arange(g)
            if m == node[s]:        # NVLink copies inside the source node
                src.append(np.full(g, s))
                dst.append(peers)
                nb.append(np.full(g, tokens * p_rank * b))
                continue
            head = m * g + rail[s]  # RDMA to the rail peer, then its NVLink fan-out
            src += [[s], np.full(g, head)]
            dst += [[head], peers]
            nb += [[tokens * p_any * b], np.full(g, tokens * p_rank * b)]
    t = Traffic(np.concatenate(src).astype(np.int64), np.concatenate(dst).astype(np.int64),
                np.concatenate(nb).astype(np.float64))
    keep = t.src != t.dst
    return counted, Traffic(t.src[keep], t.dst[keep], t.nbytes[keep])


def points_from_rows(rows: list[dict]) -> list[Point]:
    pts = []
    for r in rows:
        nodes, g = int(r["nodes"]), int(r["gpus_per_node"])
        kw = dict(nodes=nodes, gpus_per_node=g, nvlink_gbs=float(r["nvlink_gbs"]),
                  nic_gbps=float(r["nic_gbps"]), network_model="nccl",
                  nvlink_latency_us=0.0, nic_latency_us=0.0, fabric_latency_us=0.0)
        cluster = ClusterConfig(preset=r["preset"], **kw)
        traffic = None
        if r["measured_gbps"]:
            size, traffic = deepep_point(r, cluster)
            measured = size / (float(r["measured_gbps"]) * 1e9)
        else:
            size, measured = float(r["bytes_per_rank"]), float(r["measured_us"]) * 1e-6
        algos = tuple(a for a in r["algorithms"].split("|") if a) or None
        pts.append(Point(r["source"], cluster, r["collective"], size, measured, traffic,
                         algos, r["a2a_algorithm"], r["launch"], r["fit"] == "true",
                         meta=r))
    return pts


def summarize(pts: list[Point], sim_s: list[float]) -> list[dict]:
    out = []
    for held in (True, False):
        sel = [(p, s) for p, s in zip(pts, sim_s, strict=True) if p.fit != held]
        by: dict[str, list[float]] = {}
        for p, s in sel:
            by.setdefault(p.source, []).append(abs(s / p.measured_s - 1))
        for src, errs in sorted(by.items()):
            out.append({"set": "held back" if held else "fitted", "source": src,
                        "points": len(errs), "median": statistics.median(errs),
                        "max": max(errs)})
        allerr = [e for v in by.values() for e in v]
        out.append({"set": "held back" if held else "fitted", "source": "all",
                    "points": len(allerr), "median": statistics.median(allerr),
                    "max": max(allerr)})
    return out


def plot(pts: list[Point], sim_s: list[float], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from analysis.style import SINGLE_COLUMN_IN, paper_style

    with paper_style():
        fig, ax = plt.subplots(figsize=(SINGLE_COLUMN_IN, SINGLE_COLUMN_IN))
        sources = sorted({p.source for p in pts})
        markers = "osD^vP*"
        for i, src in enumerate(sources):
            for fitted in (True, False):
                sel = [(p.measured_s * 1e6, s * 1e6) for p, s in zip(pts, sim_s, strict=True)
                       if p.source == src and p.fit == fitted]
                if not sel:
                    continue
                x, y = zip(*sel, strict=True)
                ax.scatter(x, y, marker=markers[i % len(markers)], s=16,
                           facecolors=f"C{i}" if fitted else "none", edgecolors=f"C{i}",
                           label=f"{src} ({'fit' if fitted else 'held back'})")
        lo = min(min(p.measured_s for p in pts), min(sim_s)) * 1e6 / 1.5
        hi = max(max(p.measured_s for p in pts), max(sim_s)) * 1e6 * 1.5
        xs = np.array([lo, hi])
        ax.plot(xs, xs, color="0.3", lw=0.8)
        ax.fill_between(xs, xs * (1 - TOLERANCE), xs * (1 + TOLERANCE), color="0.85", lw=0)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_xlabel("measured (us)")
        ax.set_ylabel("simulated (us)")
        ax.set_title("Collectives: published vs simulated", fontsize=8)
        ax.legend(fontsize=4.5, loc="upper left", frameon=False)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=200, format="png")
        plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--measurements", type=Path,
                    default=ROOT / "docs/validation/network_measurements.csv")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/validation")
    ap.add_argument("--terms-out", type=Path, default=ROOT / "configs/network/hopper.toml")
    ap.add_argument("--figures", type=Path, default=ROOT / "docs/figures")
    ap.add_argument("--max-evals", type=int, default=400)
    ap.add_argument("--loso", action="store_true", help="also fit without each source in turn "
                    "and score that source (sources whose launch cost others share)")
    args = ap.parse_args()
    rows = read_rows(args.measurements)
    pts = points_from_rows(rows)
    sim = PointSimulator(tolerance=0.0)
    # Starts: NCCL's latency table as it is; line-rate-ish links saturating at 64 KiB; NVLS at
    # the efficiency NVIDIA states for 8 H100 (~480 GB/s busbw, ~275 GB/s algbw: NCCL-tests
    # issue #212, S. Jeaugey: the S + S/8 each GPU moves at 275 x 9/8 GB/s of NVLink's 450),
    # saturating at one of several sizes (the fit keeps the start of lowest cost).
    starts = [NcclTerms(name="hopper").with_links(
        nvlink=LinkTerms(0.8, 65536.0, 1.0), nic=LinkTerms(0.9, 65536.0, 1.0),
        nvls=LinkTerms(NVLS_EFFICIENCY, half, k)) for half in NVLS_STARTS for k in (1.0, 2.0)]
    launches = tuple(sorted({p.launch for p in pts}))
    free = free_terms(launches=launches)
    res = fit(pts, starts, free, sim=sim, max_nfev=args.max_evals, priors=PRIORS)
    terms = res.terms
    sim_s, algo = [], []
    for p in pts:
        r = sim.run(p, terms, res.launch_us[p.launch] * 1e-6)
        sim_s.append(r.duration)
        algo.append(f"{r.algorithm}/{r.protocol}")
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    launch_txt = ", ".join(f"{k} {v:.1f} us" for k, v in sorted(res.launch_us.items()))
    header = [f"moesim network terms fitted by `python -m benchmarks.network` ({stamp}, "
              f"{platform.node() or 'host'})",
              f"on the fit = true rows of {args.measurements.relative_to(ROOT)} "
              f"({sum(p.fit for p in pts)} of {len(pts)} points; cost {res.cost:.4g}, "
              f"{res.evaluations} evaluations)",
              f"launch costs fitted with them (not stored here; cluster.collective_latency_us): "
              f"{launch_txt}"]
    terms = NcclTerms(**{**terms.__dict__, "name": "hopper",
                         "source": "docs/validation/network_published.csv"})
    with atomic_path(args.terms_out) as tmp:
        tmp.write_text(terms.to_toml(header))
    check = load_terms(str(args.terms_out))
    assert abs(check.latency_scale - terms.latency_scale) < 1e-4 * terms.latency_scale
    cols = ["source", "hardware", "collective", "ranks", "nodes", "bytes_per_rank",
            "measured_us", "simulated_us", "used_for_fit", "rel_error", "algorithm", "settings",
            "url", "launch_us"]
    with atomic_path(args.out / "network_published.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for p, s, a in zip(pts, sim_s, algo, strict=True):
            r = p.meta
            w.writerow({"source": p.source, "hardware": r["hardware"],
                        "collective": p.collective, "ranks": p.ranks, "nodes": r["nodes"],
                        "bytes_per_rank": round(p.size),
                        "measured_us": f"{p.measured_s * 1e6:.2f}",
                        "simulated_us": f"{s * 1e6:.2f}",
                        "used_for_fit": "true" if p.fit else "false",
                        "rel_error": f"{s / p.measured_s - 1:+.4f}", "algorithm": a,
                        "settings": r["settings"], "url": r["url"],
                        "launch_us": f"{res.launch_us[p.launch]:.2f}"})
    plot(pts, sim_s, args.figures / "network_published.png")
    print("| set | source | points | median abs(sim/meas - 1) | max |")
    print("|---|---|---|---|---|")
    summ = summarize(pts, sim_s)
    for s in summ:
        print(f"| {s['set']} | {s['source']} | {s['points']} | {s['median']:.1%} | "
              f"{s['max']:.1%} |")
    held = [s for s in summ if s["set"] == "held back"]
    overall = next(s for s in held if s["source"] == "all")["median"]
    worst = max(s["median"] for s in held if s["source"] != "all")
    print(f"\nheld back: median {overall:.1%} (target <= {TOLERANCE:.0%}: "
          f"{'met' if overall <= TOLERANCE else 'missed'}); worst source median {worst:.1%} "
          f"(target <= {SOURCE_TOLERANCE:.0%}: "
          f"{'met' if worst <= SOURCE_TOLERANCE else 'missed'})")
    print(f"launch costs: {launch_txt}")
    loso_rows = []
    if args.loso:
        print("\nleave one source out (fit on the other sources' fit rows, score every row of "
              "the source left out):")
        print("| source left out | points | median abs(sim/meas - 1) | max |")
        print("|---|---|---|---|")
        for src in sorted({p.source for p in pts}):
            mine = [p for p in pts if p.source == src]
            others = [p for p in pts if p.source != src]
            if not any(p.launch == mine[0].launch for p in others):
                print(f"| {src} | {len(mine)} | (its launch cost is its own: not scored) | |")
                continue
            groups = tuple(sorted({p.launch for p in others}))
            r = fit(others, [s for s in starts if s.link("nvls").exponent == 1.0],
                    free_terms(launches=groups), sim=sim, max_nfev=args.max_evals,
                    priors=PRIORS)
            errs = [abs(sim.time(p, r.terms, r.launch_us[p.launch] * 1e-6) / p.measured_s - 1)
                    for p in mine]
            print(f"| {src} | {len(errs)} | {statistics.median(errs):.1%} | {max(errs):.1%} |")
            loso_rows.append({"set": "left out", "source": src, "points": len(errs),
                              "median": statistics.median(errs), "max": max(errs)})
    with atomic_path(args.out / "network_summary.csv") as tmp, tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, ["set", "source", "points", "median", "max"])
        w.writeheader()
        for r in summ + loso_rows:
            w.writerow({**r, "median": f"{r['median']:.6g}", "max": f"{r['max']:.6g}"})
    print(terms.to_toml([]))
    print("| source | collective | ranks | size | measured us | simulated us | error | "
          "algorithm | set |")
    print("|---|---|---|---|---|---|---|---|---|")
    for p, s, a in zip(pts, sim_s, algo, strict=True):
        print(f"| {p.source} | {p.collective} | {p.ranks} | {_size(p.size)} | "
              f"{p.measured_s * 1e6:.1f} | {s * 1e6:.1f} | {s / p.measured_s - 1:+.1%} | {a} | "
              f"{'fit' if p.fit else 'held back'} |")


def _size(b: float) -> str:
    for unit, v in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= v:
            return f"{b / v:.3g} {unit}"
    return f"{b:.0f} B"


def _md(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def region(root: Path) -> str:
    """The "validation.network" region of docs/validation.md (analysis.doc_regions), from
    committed files only: network_published.csv, network_summary.csv and
    configs/network/hopper.toml. Comparison words are computed with the targets above."""
    import pandas as pd

    from moesim.sim.nccl import LINK_CLASSES
    val = root / "docs" / "validation"
    pub = pd.read_csv(val / "network_published.csv")
    summ = pd.read_csv(val / "network_summary.csv")
    terms = load_terms(str(root / "configs" / "network" / "hopper.toml"))
    out = []
    held = summ[summ["set"] == "held back"]
    overall = float(held.loc[held["source"] == "all", "median"].iloc[0])
    per = held[held["source"] != "all"]
    worst = per.loc[per["median"].idxmax()]
    ok = overall <= TOLERANCE and float(worst["median"]) <= SOURCE_TOLERANCE
    n_fit = int((pub["used_for_fit"]).sum())
    out.append(
        f"**{len(pub)} published points from {pub['source'].nunique()} sources; fitted on "
        f"{n_fit}, scored on the {len(pub) - n_fit} held back: median |simulated/measured - 1| "
        f"{overall:.1%} (target <= {TOLERANCE:.0%}), worst source median "
        f"{float(worst['median']):.1%} "
        f"({worst['source']}; target <= {SOURCE_TOLERANCE:.0%}): "
        f"{'both targets met' if ok else 'target missed'}.**\n\n")
    out.append("Sources (the rows of `docs/validation/network_measurements.csv`, with each "
               "point's settings):\n\n")
    rows = []
    for src, g in pub.groupby("source", sort=True):
        colls = ", ".join(sorted(g["collective"].unique()))
        sizes = f"{_size(g['bytes_per_rank'].min())} - {_size(g['bytes_per_rank'].max())}"
        rows.append([src, "; ".join(dict.fromkeys(g["hardware"])), colls, str(len(g)), sizes,
                     "; ".join(dict.fromkeys(g["url"]))])
    out.append(_md(["source", "hardware", "collectives", "points", "sizes", "where"], rows))
    out.append("\nError per source, |simulated/measured - 1|:\n\n")
    rows = [[r["set"], r["source"], str(int(r["points"])), f"{r['median']:.1%}",
             f"{r['max']:.1%}"] for _, r in summ.iterrows() if r["set"] != "left out"]
    out.append(_md(["set", "source", "points", "median", "max"], rows))
    loso = summ[summ["set"] == "left out"]
    if len(loso):
        out.append("\nLeave one source out (the fit without that source, scored on all its "
                   "points; a source whose launch cost no other source shares is not scored):\n\n")
        rows = [[r["source"], str(int(r["points"])), f"{r['median']:.1%}", f"{r['max']:.1%}"]
                for _, r in loso.iterrows()]
        out.append(_md(["source left out", "points", "median", "max"], rows))
    out.append("\nFitted terms (`configs/network/hopper.toml`; NCCL's own tables are in "
               "`moesim/sim/nccl.py`):\n\n")
    rows = [[c, f"{terms.link(c).efficiency:.3f}", _size(terms.link(c).half_bytes),
             f"{terms.link(c).exponent:.2f}"] for c in LINK_CLASSES]
    out.append(_md(["link class", "efficiency (eta)", "half-saturation size", "exponent"],
                   rows))
    launch = pub.groupby("source")["launch_us"].first()
    out.append(f"\nNCCL latency scale {terms.latency_scale:.3f}; launch cost per source "
               "(fitted with the terms): "
               + ", ".join(f"{s} {v:.1f} us" for s, v in launch.items()) + ".\n")
    studies = val / "network_studies.csv"
    if studies.exists():
        st = pd.read_csv(studies)
        out.append("\nThe reproduction studies again under the \"nccl\" model "
                   "(`python -m benchmarks.network_studies`; the committed studies use the "
                   "default \"ideal\" model): every claim's simulated value under both.\n\n")
        rows = [[r["study"], r["claim"], f"{r['ideal']:.3g}", f"{r['nccl']:.3g}",
                 f"{r['change']:+.1%}", r["verdict_nccl"]] for _, r in st.iterrows()]
        out.append(_md(["study", "claim", "ideal", "nccl", "change", "verdict (nccl)"], rows))
    out.append("\nEvery point (`algorithm`: what the model picked, as NCCL's tuner would):\n\n")
    rows = []
    for _, r in pub.iterrows():
        rows.append([r["source"], r["collective"], str(r["ranks"]), _size(r["bytes_per_rank"]),
                     f"{r['measured_us']:.1f}", f"{r['simulated_us']:.1f}",
                     f"{r['rel_error']:+.1%}", r["algorithm"],
                     "fit" if r["used_for_fit"] else "held back"])
    out.append(_md(["source", "collective", "ranks", "size", "measured us", "simulated us",
                    "error", "algorithm", "set"], rows))
    return "".join(out)


if __name__ == "__main__":
    main()
