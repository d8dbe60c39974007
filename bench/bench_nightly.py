"""Two nights of a rolling 7-day window with the feature cache, against a cold run.

    python bench/bench_nightly.py [--configs 8] [--steps 80000] [--specialists 4] [--store DIR]

Generates an 8-day store once (kept in bench/out/), then runs, each on local Ray:
night 1 over days 1-7 into a fresh artifact root (every shard read from the raw traces and
cached), night 2 over days 2-8 into the same root (warm: only day 8 is read), and a cold run
over days 2-8 without the cache. Prints rows read from raw traces and from the cache, the wall
time of the featurize phase and of featurize + fit, whether the warm and cold fitted
documents have the same sha256 (if not, whether a second cold run reproduces the first), and
the cache's size against the raw partitions'.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time
from datetime import date, timedelta

import ray

from rece_dist import artifact
from rece_dist.featurecache import PREFIX, read_counts
from rece_dist.objstore import ObjectRoot
from rece_dist.pipeline import TrainSettings, featurize_store
from rece_dist.recipe import fit_recipe
from rece_dist.store import Store

from common import local_ray, store_at

START = "2026-11-01"


def day(i: int) -> str:
    return (date.fromisoformat(START) + timedelta(days=i - 1)).isoformat()


def run(store: str, settings: TrainSettings, first: int, last: int, root: str | None) -> dict:
    s = dataclasses.replace(settings, date_from=day(first), date_to=day(last))
    t0 = time.monotonic()
    fs = featurize_store(store, s, cache_root=root)
    t1 = time.monotonic()
    doc = fit_recipe(fs, s)
    return {"reads": read_counts(fs.stats), "featurize_s": t1 - t0, "total_s": time.monotonic() - t0,
            "digest": artifact.digest(doc)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=8)
    ap.add_argument("--steps", type=int, default=80000, help="steps per configuration over the 8 days")
    ap.add_argument("--specialists", type=int, default=4)
    ap.add_argument("--store", default=None)
    args = ap.parse_args()
    cpus = local_ray()
    store = store_at(args.store or f"bench/out/nightly-{args.configs}x{args.steps}", args.configs, args.steps,
                     days=8, start_date=START)
    settings = TrainSettings(specialists=args.specialists)
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "models")
        night1 = run(store, settings, 1, 7, root)
        night2 = run(store, settings, 2, 8, root)
        cold = run(store, settings, 2, 8, None)
        cache_bytes = sum(o.size for o in ObjectRoot(root).list(PREFIX))
    s = Store(store)
    raw_bytes = sum(p.size_bytes for t in ("steps", "requests") for p in s.partitions(t, None, day(1), day(8)))
    print(f"machine: {cpus} CPUs; store: {args.configs} configs x {args.steps} steps over 8 days")
    print("| run | window | rows from raw traces | rows from cache | featurize s | featurize + fit s |")
    print("|---|---|---|---|---|---|")
    for name, r, w in (("night 1", night1, "1-7"), ("night 2 (warm)", night2, "2-8"), ("cold", cold, "2-8")):
        print(f"| {name} | days {w} | {r['reads']['raw_rows']:,} | {r['reads']['cached_rows']:,} "
              f"| {r['featurize_s']:.2f} | {r['total_s']:.2f} |")
    print(f"raw rows night 2 / night 1: {night2['reads']['raw_rows'] / night1['reads']['raw_rows']:.3f} (1/7 = 0.143)")
    print(f"featurize wall, warm / cold on days 2-8: {night2['featurize_s'] / cold['featurize_s']:.2f}")
    same = night2["digest"] == cold["digest"]
    print(f"warm and cold fitted documents identical: {same}")
    if not same:  # the cache, or the fit stage itself? A second cold run tells
        print(f"a second cold run identical to the first: {run(store, settings, 2, 8, None)['digest'] == cold['digest']}")
    print(f"cache after night 2 (8 days): {cache_bytes / 2**20:.1f} MiB; raw partitions of the 8 days: "
          f"{raw_bytes / 2**20:.1f} MiB")
    ray.shutdown()


if __name__ == "__main__":
    main()
