"""Where `rece evaluate`'s time goes: one LOCO fold's fits by kind, then the whole evaluation.

    python bench/bench_evaluate.py [--configs 12] [--steps 20000] [--store DIR] [--fold-only] [--fit-rows N]

Generates the store once (kept in bench/out/, `rece synth --seed 1` layout), trains the
default artifact, then
1. fits one LOCO fold's three kinds (global, per-configuration, RECE) cold and prints, per kind,
   the wall time of the independent LPs and of the non-crossing re-solve, the slowest LP and
   the Ray task seconds by function (ray.timeline): what one fold costs before any reuse;
2. runs the whole evaluation (`review.review_artifact`, default options but ``--fit-rows``:
   0 refits on every row) and prints its wall time with the number of specialist fits solved
   and reused (``fitcache``), and its Ray task seconds and task counts by function.

The CLI's own wall time (Ray's start, the report, the exit) is `time rece evaluate ...`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import time

import ray

from rece_dist.artifact import canonical_bytes
from rece_dist.evaluate import EvalOptions, protocol_folds
from rece_dist.pipeline import TrainSettings, featurize_store, fit_ensemble
from rece_dist.recipe import train
from rece_dist.refit import fit_labels
from rece_dist.review import review_artifact

from common import local_ray, store_at


def task_seconds() -> dict[str, tuple[float, int]]:
    """Ray task seconds and task count by function, over everything this process ran so far."""
    secs: dict[str, float] = collections.defaultdict(float)
    count: dict[str, int] = collections.defaultdict(int)
    for e in ray.timeline():
        if e.get("ph") == "X" and e["name"].startswith("rece_dist."):
            name = e["name"].removeprefix("rece_dist.")
            secs[name] += e["dur"] / 1e6
            count[name] += 1
    return {k: (secs[k], count[k]) for k in secs}


def task_line(before: dict[str, tuple[float, int]]) -> str:
    """Task seconds (and tasks) by function since ``before``, largest first."""
    now = task_seconds()
    diff = {k: (s - before.get(k, (0.0, 0))[0], n - before.get(k, (0.0, 0))[1]) for k, (s, n) in now.items()}
    return ", ".join(f"{k} {s:.1f} s ({n:,})" for k, (s, n) in sorted(diff.items(), key=lambda kv: -kv[1][0]) if n)


def one_fold(store: str, settings: TrainSettings) -> None:
    fs = featurize_store(store, settings)
    fold = protocol_folds(fs, "loco")[0]
    ids = {fs.stats[i].config_id for i in fold.train}
    print(f"one LOCO fold ({len(ids)} training configurations), cold fits:")
    print("| kind | wall s | LPs wall s | non-crossing wall s | LPs | slowest LP s | its rows |\n|---|---|---|---|---|---|---|")
    for kind in ("global", "per_config", "rece"):
        tm: dict = {}
        s = settings if kind == "rece" else dataclasses.replace(settings, borrow=0.0)  # as the Fitter does
        t = time.monotonic()
        fit_ensemble(fs, s, list(fold.train), fit_labels(kind, ids), timings=tm)
        lp = tm["lp_seconds"]
        k = max(range(len(lp)), key=lp.__getitem__)
        print(f"| {kind} | {time.monotonic() - t:.1f} | {tm['fit_wall_s']:.1f} | {tm['noncrossing_wall_s']:.1f} "
              f"| {len(lp)} | {lp[k]:.1f} | {tm['lp_rows'][k]:,} |")
    print("Ray task seconds (tasks) by function: " + task_line({}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", type=int, default=12)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--store", default=None)
    ap.add_argument("--fold-only", action="store_true", help="only the one-fold breakdown")
    ap.add_argument("--fit-rows", type=int, default=EvalOptions().fit_rows,
                    help="rows per configuration and target in a refit (default %(default)s; 0: all)")
    args = ap.parse_args()
    cpus = local_ray()
    store = store_at(args.store or f"bench/out/store-{args.configs}x{args.steps}-seed1", args.configs, args.steps)
    settings = TrainSettings()
    print(f"machine: {cpus} CPUs; store: {store}")
    one_fold(store, settings)
    if args.fold_only:
        return
    art = f"{store}-artifact.json"
    with open(art, "wb") as f:
        f.write(canonical_bytes(train(store, settings).artifact))
    before = task_seconds()
    t = time.monotonic()
    rv = review_artifact(art, store, EvalOptions(fit_rows=args.fit_rows or None))
    print(f"whole evaluation (default options, fit rows {args.fit_rows or 'all'}): {time.monotonic() - t:.1f} s, "
          f"{len(rv.evaluation.runs)} protocols; see the [evaluate] lines above for the phases")
    print("its Ray task seconds (tasks) by function: " + task_line(before))


if __name__ == "__main__":
    main()
