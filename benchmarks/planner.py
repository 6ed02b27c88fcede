"""FSEP re-layout planner: quality against the LP bound and solve time, at the issue's sizes.

    python -m benchmarks.planner [--layers 4 --steps 2 --ilp-limit 10 --scale-limit 10]
    python -m benchmarks.planner --laer-scale [--laer-ilp-limit 120]

Part 3 (`--laer-scale`, issue 21 item 2): LAER-MoE's own planner benchmark
(LAER-MoE-AE's scripts_ae planner timing: 32 experts, counts uniform in [0, 1000) per rank and
expert, 64-1,024 GPUs x 1-16 slots, 10 solves each, the mean) run with planner.laer_greedy
at the same inputs and LAER's default rates, beside the artifact's times
(docs/planner/laer_moe_ae_planner_results.csv); then at 1,024 GPUs x 16 slots the MILP
(HiGHS, time limit --laer-ilp-limit) with its LP and dual bounds under planner.cost twice:
without the weight term (weight_passes = 0: LAER-MoE gathers every slot whatever the layout,
so that term is the same for all layouts), where LAER's layout is costed too, and with it
(weight_passes = 1, moesim's own model, where fewer replicas save gathers). Rows to
docs/planner/laer_scale.csv.

Part 1: Zipf exponents 1.0 and 1.5, 64 experts (top-8), 16 ranks, 8 slots: for each (step,
layer) the MILP (HiGHS, warm-started), greedy LPT and the LAER-style fill; medians of solve
time, max/mean modelled rank time, max/mean tokens, and the gap to the LP bound (the ceiling:
no layout does better), with the MILP's statuses. Part 2: solve time against experts and ranks
(E = 4N, slots 8), printed as a table and written to --table (one row per solve) and
--figure (`analysis.planner_perf`, the figure `moesim plot planner --table` draws).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

from moesim.config import ModelConfig, PlannerConfig
from planner.bounds import replica_bound
from planner.cost import layout_cost
from planner.relayout import fsep_placement, lp_bound
from traces.generators import TraceSpec, generate

ROOT = Path(__file__).resolve().parents[1]
FIG = ROOT / "docs" / "figures" / "planner_solve_time.png"
TABLE = ROOT / "docs" / "planner" / "scaling.csv"
METHODS = ("highs", "greedy", "fill", "laer")
# LAER-MoE's planner times, copied from Fizzmy/LAER-MoE-AE (Apache-2.0), its
# planner_results_backup.csv: the mean of 10 solves of greedy_load_balancing_heuristic_complete.
LAER_TIMES = ROOT / "docs" / "planner" / "laer_moe_ae_planner_results.csv"
LAER_TABLE = ROOT / "docs" / "planner" / "laer_scale.csv"
# LAER-MoE's default rates (greedy_balancer.cpp) and token bytes (the AE script's M_token).
LAER_RATES = {"token_bytes": 8192.0, "comp_s": 0.001484375e-3, "intra_bps": 216.269e9,
              "inter_bps": 88.9539e9}


def run_case(experts: int, ranks: int, slots: int, exponent: float, steps: int, layers: int,
             limit: float, seed: int = 0) -> dict[str, list[dict]]:
    tr = generate(TraceSpec(kind="zipf", steps=steps, layers=layers, shards=ranks,
                            experts=experts, top_k=8, tokens_per_shard=4096, seed=seed,
                            params={"exponent": exponent}))
    model = ModelConfig(num_experts=experts, top_k=8)
    out: dict[str, list[dict]] = {k: [] for k in (*METHODS, "lp", "replica")}
    for s in range(steps):
        for ly in range(layers):
            counts = tr.counts[s, ly]
            base = PlannerConfig(slots_per_rank=slots, time_limit_s=limit)
            cost = layout_cost(model, base, counts.sum(0).ravel(), ranks)
            t0 = time.perf_counter()
            bound = lp_bound(cost, slots)
            out["lp"].append({"solve_s": time.perf_counter() - t0, "gap": 0.0,
                              "status": "bound"})
            t0 = time.perf_counter()
            rb = replica_bound(cost, slots)
            out["replica"].append({"solve_s": time.perf_counter() - t0, "gap": rb / bound - 1,
                                   "status": "bound"})
            for solver in METHODS:
                cfg = PlannerConfig(slots_per_rank=slots, time_limit_s=limit, solver=solver)
                _, st = fsep_placement(model, cfg, counts, ranks, with_bound=False)
                out[solver].append({"solve_s": st.solve_s, "max_mean": st.max_time /
                                    st.mean_time, "gap": st.max_time / bound - 1,
                                    "tok": st.tokens_max_mean, "before": st.before_tokens_max_mean,
                                    "status": st.status, "proved": st.proved_at_start})
    return out


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def statuses(rows: list[dict]) -> str:
    """e.g. "optimal 8 (8 at start)": how many solves ended how, and how many were proved
    within the MIP gap by the warm start and the replica bound alone."""
    names = sorted({r["status"] for r in rows})
    text = ", ".join(f"{k} {sum(r['status'] == k for r in rows)}" for k in names)
    proved = sum(r["proved"] for r in rows)
    return f"{text} ({proved} at start)" if rows[0]["status"] != "heuristic" else text


def load_avg() -> str:
    return "load average " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ilp-limit", type=float, default=PlannerConfig().time_limit_s,
                    help="MILP time limit for the 64 x 16 part (default: PlannerConfig's)")
    ap.add_argument("--scale-limit", type=float, default=10.0)
    ap.add_argument("--scale", default="16x4,32x8,64x16,128x32,256x64,512x128")
    ap.add_argument("--table", type=Path, default=TABLE,
                    help="per-solve rows (solver, num_experts, num_ranks, solve_time_s, gap, "
                    "status) for `moesim plot planner`")
    ap.add_argument("--figure", type=Path, default=FIG, help="solve time against size (PNG)")
    ap.add_argument("--scaling-only", action="store_true", help="skip the 64x16 quality part")
    ap.add_argument("--laer-scale", action="store_true",
                    help="only part 3: LAER-MoE's planner benchmark and the MILP at 1024 x 16")
    ap.add_argument("--laer-ilp-limit", type=float, default=120.0)
    ap.add_argument("--laer-table", type=Path, default=LAER_TABLE)
    args = ap.parse_args()
    if args.laer_scale:
        laer_scale(args)
        return

    print(f"# {load_avg()}", flush=True)
    if not args.scaling_only:
        print(f"## Zipf, 64 experts, 16 ranks, 8 slots ({args.steps} steps x {args.layers} "
              f"layers each, MILP time limit {args.ilp_limit} s)")
        print("| exponent | method | solve median | max solve | time max/mean | tokens max/mean "
              "(EP before) | gap to LP bound (median, max) | status |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for expo in () if args.scaling_only else (1.0, 1.5):
        res = run_case(64, 16, 8, expo, args.steps, args.layers, args.ilp_limit)
        for m in METHODS:
            rows = res[m]
            print(f"| {expo} | {m} | {med(rows, 'solve_s') * 1e3:.1f} ms | "
                  f"{max(r['solve_s'] for r in rows) * 1e3:.1f} ms | {med(rows, 'max_mean'):.4f} "
                  f"| {med(rows, 'tok'):.3f} ({med(rows, 'before'):.2f}) | "
                  f"{med(rows, 'gap') * 100:.2f}%, {max(r['gap'] for r in rows) * 100:.2f}% "
                  f"| {statuses(rows)} |", flush=True)
        print(f"| {expo} | LP bound | {med(res['lp'], 'solve_s') * 1e3:.3f} ms | | | | 0 "
              "(ceiling) | |")
        rb = res["replica"]
        print(f"| {expo} | replica bound | {med(rb, 'solve_s') * 1e3:.1f} ms | | | | "
              f"{med(rb, 'gap') * 100:.2f}%, {max(r['gap'] for r in rb) * 100:.2f}% | |",
              flush=True)
    if not args.scaling_only:
        print(f"# {load_avg()}", flush=True)

    print("\n## Scaling (E = 4N experts, 8 slots, Zipf 1.2, MILP time limit "
          f"{args.scale_limit} s, {args.layers} layers)")
    print("| experts x ranks | ILP median | ILP max | ILP gap (median, max) | ILP status | "
          "replica bound gap | LP bound | greedy | greedy gap | laer | laer gap |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.scale.split(",")]
    table = []
    for e, n in sizes:
        res = run_case(e, n, 8, 1.2, 1, args.layers, args.scale_limit, seed=1)
        table.append((e, n, res))
        hi = res["highs"]
        print(f"| {e} x {n} | {med(hi, 'solve_s'):.3f} s | "
              f"{max(r['solve_s'] for r in hi):.3f} s | {med(hi, 'gap') * 100:.2f}%, "
              f"{max(r['gap'] for r in hi) * 100:.2f}% | {statuses(hi)} | "
              f"{med(res['replica'], 'gap') * 100:.2f}% | "
              f"{med(res['lp'], 'solve_s') * 1e6:.0f} us | "
              f"{med(res['greedy'], 'solve_s') * 1e3:.1f} ms | "
              f"{med(res['greedy'], 'gap') * 100:.2f}% | "
              f"{med(res['laer'], 'solve_s') * 1e3:.1f} ms | "
              f"{med(res['laer'], 'gap') * 100:.2f}% |", flush=True)
    print(f"# {load_avg()}", flush=True)

    import pandas as pd

    from moesim.atomic import atomic_path
    rows = [{"solver": k, "num_experts": e, "num_ranks": n, "solve_time_s": r["solve_s"],
             "gap_to_lp_bound": r["gap"], "status": r["status"]}
            for e, n, res in table for k in res if k != "replica" for r in res[k]]
    with atomic_path(args.table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    print(f"wrote {args.table}")

    import matplotlib
    matplotlib.use("Agg")

    from analysis.figure_files import save_figure
    from analysis.planner_perf import plot_planner_perf
    fig = plot_planner_perf(pd.DataFrame(rows), source=str(args.table))
    save_figure(fig, args.figure.parent, args.figure.stem, ["png"])
    print(f"wrote {args.figure} (the same figure as `moesim plot planner --table "
          f"{args.table} --out {args.figure.parent} --name {args.figure.stem} --format png`)")


def laer_scale(args: argparse.Namespace) -> None:
    """Part 3 (module docstring)."""
    import numpy as np
    import pandas as pd

    from moesim.atomic import atomic_path
    from planner import laer
    from planner.placement import slot_placement

    ref = pd.read_csv(LAER_TIMES) if LAER_TIMES.exists() else None
    rng = np.random.default_rng(0)
    rows = []
    print(f"# {load_avg()}", flush=True)
    print("## LAER-MoE's planner benchmark: 32 experts, counts uniform in [0, 1000), "
          "10 solves each (mean)")
    print("| GPUs | slots | LAER-MoE (C++, their machine) | planner.laer_greedy (numpy, here) "
          "| ratio |")
    print("| --- | --- | --- | --- | --- |")
    for c in (1, 2, 4, 8, 16):
        for n in (64, 128, 256, 512, 1024):
            times = []
            for _ in range(10):
                counts = rng.integers(0, 1000, (n, 32))
                t0 = time.perf_counter()
                a = laer.laer_greedy(counts, c, node_size=8, **LAER_RATES)
                slot_placement(a, 8)
                times.append(time.perf_counter() - t0)
                assert (a.sum(axis=0) == c).all()
            mean = float(np.mean(times))
            theirs = float("nan")
            if ref is not None:
                sel = ref[(ref.n_device == n) & (ref.C_e == c)]
                theirs = float(sel.time.iloc[0]) if len(sel) else float("nan")
            rows.append({"kind": "laer_greedy", "num_ranks": n, "slots": c,
                         "solve_time_s": mean, "laer_moe_time_s": theirs})
            print(f"| {n} | {c} | {theirs * 1e3:.1f} ms | {mean * 1e3:.1f} ms | "
                  f"{mean / theirs:.2f} |", flush=True)
    print(f"# {load_avg()}", flush=True)

    # The MILP at 1024 x 16 on the same kind of counts, against LAER's layout.
    n, c = 1024, 16
    counts = rng.integers(0, 1000, (n, 32))
    model = ModelConfig(num_experts=32, top_k=2, d_model=4096, d_ffn=14336)
    a = laer.laer_greedy(counts, c, node_size=8, **LAER_RATES)
    lay = slot_placement(a, 8, routing="shares")  # slot fractions: node-local, even sources
    print(f"\n## 1,024 GPUs x 16 slots, 32 experts: the MILP (HiGHS, time limit "
          f"{args.laer_ilp_limit:.0f} s, mip_gap 1%) and its bounds, planner.cost time model")
    print("| weight term | method | solve | max rank time | gap to LP bound | gap to dual bound "
          "| status |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for passes in (0, 1):
        cfg = PlannerConfig(slots_per_rank=c, time_limit_s=args.laer_ilp_limit,
                            weight_passes=passes)
        cost = layout_cost(model, cfg, counts.sum(0), n)
        t0 = time.perf_counter()
        bound = lp_bound(cost, c)
        lp_s = time.perf_counter() - t0
        _, st = fsep_placement(model, cfg, counts, n, with_bound=False)
        term = f"weight_passes = {passes}"
        print(f"| {term} | MILP | {st.solve_s:.1f} s | {st.max_time * 1e3:.3f} ms | "
              f"{(st.max_time / bound - 1) * 100:.3f}% | "
              f"{(st.max_time / st.dual_bound - 1) * 100:.3f}% | {st.status}"
              f"{' (at start)' if st.proved_at_start else ''} |")
        row = {"kind": "milp", "num_ranks": n, "slots": c, "weight_passes": passes,
               "solve_time_s": st.solve_s, "max_time_s": st.max_time, "lp_bound_s": bound,
               "lp_bound_time_s": lp_s, "dual_bound_s": st.dual_bound, "status": st.status,
               "time_limit_s": args.laer_ilp_limit}
        rows.append(row)
        if passes == 0:
            laer_t = float(cost.rank_time(lay.share_matrix()).max())
            print(f"| {term} | LAER greedy | | {laer_t * 1e3:.3f} ms | "
                  f"{(laer_t / bound - 1) * 100:.3f}% | | |")
            rows.append({"kind": "laer_greedy_cost", "num_ranks": n, "slots": c,
                         "weight_passes": 0, "max_time_s": laer_t, "lp_bound_s": bound})
        print(f"| {term} | LP bound | {lp_s * 1e3:.1f} ms | {bound * 1e3:.3f} ms | 0 | | |")
    print(f"# {load_avg()}", flush=True)
    with atomic_path(args.laer_table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False, float_format="%.6g")
    print(f"wrote {args.laer_table}")


if __name__ == "__main__":
    main()
