"""Benchmark ``rece synth``: generate N step rows over many configurations on local Ray.

    python bench/bench_synth.py                      # 10^7 step rows over 100 configurations
    python bench/bench_synth.py --rows 1000000 --configs 20 --keep /tmp/bench-store

Prints rows/s, total time, store size on disk and bytes per row (per table).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rece_dist.schema import TABLES  # noqa: E402
from rece_dist.store import Store  # noqa: E402
from rece_dist.synth import generate_store  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="step rows to generate (default 10^7)")
    p.add_argument("--configs", type=int, default=100, help="configurations to spread them over (default 100)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--days", type=int, default=3)
    p.add_argument("--keep", metavar="DIR", help="write the store here and keep it (default: a temp dir, removed)")
    args = p.parse_args()

    out = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="rece-bench-"))
    if out.exists():
        shutil.rmtree(out)
    cpus = os.cpu_count() or 1
    t_ray = time.monotonic()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    ray_start = time.monotonic() - t_ray
    t0 = time.monotonic()
    summary = generate_store(str(out), args.configs, args.rows // args.configs, args.seed, args.days)
    elapsed = time.monotonic() - t0
    ray.shutdown()

    store = Store(str(out))
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    per_table = {t: sum(p.size_bytes for p in store.partitions(t)) for t in TABLES}
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    print(f"machine: {cpus} cores, {mem_gib:.0f} GiB; Ray start {ray_start:.1f} s (not counted)")
    print(f"generated {summary.steps:,} step rows + {summary.requests:,} request rows over {summary.configs} configurations")
    print(f"total time {elapsed:.1f} s; {summary.steps / elapsed:,.0f} step rows/s")
    print(f"store on disk {disk / 2**20:.1f} MiB ({summary.partitions} partitions)")
    print(f"bytes/row: steps {per_table['steps'] / summary.steps:.1f}, requests {per_table['requests'] / max(summary.requests, 1):.1f}, "
          f"all files per step row {disk / summary.steps:.1f}")
    if not args.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
