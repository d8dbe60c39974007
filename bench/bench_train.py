"""The whole training run on local Ray: phase times, time per LP fit, and CPU utilisation.

    python bench/bench_train.py [--configs 12] [--steps 20000] [--specialists 4] [--store DIR]

Generates the store once (kept in bench/out/), then times featurization, the fit stage and
held-out evaluation. Fit-stage occupancy = sum of LP task wall seconds / (stage wall x CPUs):
how well independent (target, specialist, quantile) tasks keep the cores busy. Near 100% the
cores never idle; above 100% tasks were time-sliced (another process shared the cores).
"""

from __future__ import annotations

import argparse
import statistics
import time


from rece_dist.pipeline import TrainSettings, featurize_store, fit_ensemble
from common import local_ray, store_at



def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--specialists", type=int, default=4)
    ap.add_argument("--solver", default="HIGHS")
    ap.add_argument("--borrow", type=float, default=TrainSettings.borrow,
                    help="share of non-member configurations in each specialist's fit (0: members only)")
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    cpus = local_ray()
    store = store_at(args.store or f"bench/out/store-{args.configs}x{args.steps}", args.configs, args.steps, days=2)
    settings = TrainSettings(specialists=args.specialists, solver=args.solver, borrow=args.borrow)
    t = time.monotonic()
    fs = featurize_store(store, settings)
    feat_s = time.monotonic() - t
    timings: dict = {}
    t = time.monotonic()
    fit_ensemble(fs, settings, timings=timings)
    fit_s = time.monotonic() - t
    lp = timings["lp_seconds"]
    util = sum(lp) / (timings["fit_wall_s"] * cpus)
    rows = sum(st.train_rows["beta"] + st.train_rows["alpha"] for st in fs.stats)
    print(f"machine: {cpus} CPUs; store: {args.configs} configs x {args.steps} steps; {rows:,} training rows")
    print("| phase | wall s |\n|---|---|")
    print(f"| featurize ({len(fs.stats)} shards) | {feat_s:.2f} |")
    print(f"| independent LP fits ({len(lp)}) | {timings['fit_wall_s']:.2f} |")
    print(f"| non-crossing re-solves | {timings['noncrossing_wall_s']:.2f} |")
    print(f"| fit_ensemble total | {fit_s:.2f} |")
    print(f"time per LP fit: median {statistics.median(lp):.2f} s, max {max(lp):.2f} s "
          f"(rows median {int(statistics.median(timings['lp_rows'])):,})")
    print(f"fit-stage occupancy: {100 * util:.0f}% of {cpus} CPUs")


if __name__ == "__main__":
    main()
