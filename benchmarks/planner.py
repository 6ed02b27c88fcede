"""FSEP re-layout planner: quality against the LP bound and solve time, at the issue's sizes.

    python -m benchmarks.planner [--layers 4 --steps 2 --ilp-limit 1.8 --scale-limit 10]

Part 1: Zipf exponents 1.0 and 1.5, 64 experts (top-8), 16 ranks, 8 slots: for each (step,
layer) the MILP (HiGHS, warm-started), greedy LPT and the LAER-style fill; medians of solve
time, max/mean modelled rank time, max/mean tokens, and the gap to the LP bound (the ceiling:
no layout does better). Part 2: solve time against experts and ranks (E = 4N, slots 8), with a
table and docs/figures/planner_scaling.png.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from moesim.config import ModelConfig, PlannerConfig
from planner.cost import layout_cost
from planner.relayout import fsep_placement, lp_bound
from traces.generators import TraceSpec, generate

FIG = Path(__file__).resolve().parents[1] / "docs" / "figures" / "planner_scaling.png"
TABLE = Path(__file__).resolve().parents[1] / "docs" / "planner" / "scaling.csv"


def run_case(experts: int, ranks: int, slots: int, exponent: float, steps: int, layers: int,
             limit: float, seed: int = 0) -> dict[str, list[dict]]:
    tr = generate(TraceSpec(kind="zipf", steps=steps, layers=layers, shards=ranks,
                            experts=experts, top_k=8, tokens_per_shard=4096, seed=seed,
                            params={"exponent": exponent}))
    model = ModelConfig(num_experts=experts, top_k=8)
    out: dict[str, list[dict]] = {"highs": [], "greedy": [], "laer": [], "lp": []}
    for s in range(steps):
        for ly in range(layers):
            counts = tr.counts[s, ly]
            base = PlannerConfig(slots_per_rank=slots, time_limit_s=limit)
            cost = layout_cost(model, base, counts.sum(0).ravel(), ranks)
            t0 = time.perf_counter()
            bound = lp_bound(cost, slots)
            out["lp"].append({"solve_s": time.perf_counter() - t0, "bound": bound})
            for solver in ("highs", "greedy", "laer"):
                cfg = PlannerConfig(slots_per_rank=slots, time_limit_s=limit, solver=solver)
                _, st = fsep_placement(model, cfg, counts, ranks, with_bound=False)
                out[solver].append({"solve_s": st.solve_s, "max_mean": st.max_time /
                                    st.mean_time, "gap": st.max_time / bound - 1,
                                    "tok": st.tokens_max_mean, "before": st.before_tokens_max_mean,
                                    "status": st.status})
    return out


def med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ilp-limit", type=float, default=1.8)
    ap.add_argument("--scale-limit", type=float, default=10.0)
    ap.add_argument("--scale", default="16x4,32x8,64x16,128x32,256x64")
    ap.add_argument("--table", type=Path, default=TABLE,
                    help="per-solve rows (solver, num_experts, num_ranks, solve_time_s) for "
                    "`moesim plot planner`")
    ap.add_argument("--scaling-only", action="store_true", help="skip the 64x16 quality part")
    args = ap.parse_args()

    print("## Zipf, 64 experts, 16 ranks, 8 slots "
          f"({args.steps} steps x {args.layers} layers each)")
    print("| exponent | method | solve median | max solve | time max/mean | tokens max/mean "
          "(EP before) | gap to LP bound (median, max) | status |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for expo in () if args.scaling_only else (1.0, 1.5):
        res = run_case(64, 16, 8, expo, args.steps, args.layers, args.ilp_limit)
        for m in ("highs", "greedy", "laer"):
            rows = res[m]
            statuses = ",".join(sorted({r["status"] for r in rows}))
            print(f"| {expo} | {m} | {med(rows, 'solve_s') * 1e3:.1f} ms | "
                  f"{max(r['solve_s'] for r in rows) * 1e3:.1f} ms | {med(rows, 'max_mean'):.4f} "
                  f"| {med(rows, 'tok'):.3f} ({med(rows, 'before'):.2f}) | "
                  f"{med(rows, 'gap') * 100:.2f}%, {max(r['gap'] for r in rows) * 100:.2f}% "
                  f"| {statuses} |", flush=True)
        print(f"| {expo} | LP bound | {med(res['lp'], 'solve_s') * 1e3:.1f} ms | | | | 0 "
              "(ceiling) | |", flush=True)

    print("\n## Scaling (E = 4N experts, 8 slots, Zipf 1.2, time limit "
          f"{args.scale_limit} s, {args.layers} layers)")
    print("| experts x ranks | ILP median | ILP gap (median, max) | LP bound | greedy | "
          "greedy gap | laer | laer gap | ILP status |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.scale.split(",")]
    table = []
    for e, n in sizes:
        res = run_case(e, n, 8, 1.2, 1, args.layers, args.scale_limit, seed=1)
        row = {k: med(res[k], "solve_s") for k in res}
        table.append((e, n, row, res))
        statuses = ",".join(sorted({r["status"] for r in res["highs"]}))
        print(f"| {e} x {n} | {row['highs']:.2f} s | {med(res['highs'], 'gap') * 100:.2f}%, "
              f"{max(r['gap'] for r in res['highs']) * 100:.2f}% | {row['lp']:.2f} s | "
              f"{row['greedy'] * 1e3:.1f} ms | {med(res['greedy'], 'gap') * 100:.2f}% | "
              f"{row['laer'] * 1e3:.1f} ms | {med(res['laer'], 'gap') * 100:.2f}% | "
              f"{statuses} |", flush=True)

    rows = [{"solver": k, "num_experts": e, "num_ranks": n, "solve_time_s": r["solve_s"]}
            for e, n, _, res in table for k in res for r in res[k]]
    import pandas as pd

    from moesim.atomic import atomic_path
    with atomic_path(args.table) as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)
    print(f"wrote {args.table}; draw it with `moesim plot planner --table {args.table} "
          "--out docs/figures`")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 4))
    xs = [e for e, _, _, _ in table]
    for key, label in (("highs", "MILP (HiGHS)"), ("lp", "LP bound"), ("greedy", "greedy LPT"),
                       ("laer", "LAER-style fill")):
        a1.plot(xs, [row[key] for _, _, row, _ in table], "o-", label=label)
        if key != "lp":
            a2.plot(xs, [med(res[key], "gap") * 100 for _, _, _, res in table], "o-",
                    label=label)
    a1.set(xscale="log", yscale="log", xlabel="experts (ranks = experts / 4)",
           ylabel="solve time, s (median)", title="Re-layout solve time")
    a1.axhline(args.scale_limit, color="grey", ls=":", label="ILP time limit")
    a2.set(xscale="log", xlabel="experts (ranks = experts / 4)",
           ylabel="max rank time above LP bound, %", title="Gap to the LP bound")
    for a in (a1, a2):
        a.set_xticks(xs, [f"{e}x{n}" for e, n, _, _ in table])
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    fig.tight_layout()
    FIG.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(FIG) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    print(f"\nwrote {FIG}")


if __name__ == "__main__":
    main()
