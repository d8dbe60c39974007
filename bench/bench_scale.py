"""End-to-end training at scale on local Ray: per-phase wall time, rows/s, peak memory, and the
ratio to the limit measured in the same run.

    python bench/bench_scale.py --rows 1e8 --configs 100          # the issue's run (hours here)
    python bench/bench_scale.py --rows 1e7 --configs 100 --store bench/out/scale-1e7
    python bench/bench_scale.py --rows 1e8 --configs 100 --rows-per-config 100000   # fits on a sample

The store is generated once (``rece synth``, one day per configuration) and reused. The run is
``train_and_publish``, exactly what ``rece train`` does. The *limit* is what any trainer of the
same model must at least do, measured on the same machine in the same run:

- read: a Polars scan of the columns the features read, partition by partition, in Ray tasks;
- fit: the reference Frisch-Newton + Portnoy-Koenker solver (``bench/reference_fn.py``, a port
  of R quantreg's ``rq.fit.pfn``) on the same design matrices as our fits (row weights folded
  into the rows: rho_tau(w r) = w rho_tau(r)), one task per (target, specialist, quantile).

Memory: the driver's peak RSS (``getrusage``) and the workers' peaks are read before the limit
phase runs. A worker's peak is sampled from ``/proc`` over the processes this driver started
(other users' Ray workers are not counted), two ways: its private memory (``RssAnon``), what a
task costs a node beyond the object store, and the kernel's high-water mark (``VmHWM``), which
also counts every object-store page the process touched (shared, and counted once in the store).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_fn import rq_fit_pfn  # noqa: E402

from rece_dist.features import REQUEST_READ, STEP_READ  # noqa: E402
from rece_dist.pipeline import PartSpec, TrainSettings, part_rows  # noqa: E402
from rece_dist.progress import gather  # noqa: E402
from rece_dist.recipe import select_models  # noqa: E402
from rece_dist.settings import VALIDATION_ROWS_PER_CONFIG  # noqa: E402
from rece_dist.runner import train_and_publish  # noqa: E402
from rece_dist.store import Store  # noqa: E402
from rece_dist.synth import generate_store  # noqa: E402


class WorkerPeaks:
    """Peak memory of every process descended from this one, sampled in a thread: the kernel's
    high-water mark (VmHWM, which counts the object-store pages a process touched, shared with
    every other process), and the sampled peak of its private memory (RssAnon): what one task
    costs a node beyond the object store."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.peaks: dict[int, tuple[int, str]] = {}
        self.private: dict[int, int] = {}
        self.names: dict[int, set[str]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every_s,), daemon=True)
        self._thread.start()

    def _descendants(self) -> list[int]:
        parent: dict[int, int] = {}
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
        mine, frontier = set(), {os.getpid()}
        while frontier:
            frontier = {p for p, pp in parent.items() if pp in frontier and p not in mine}
            mine |= frontier
        return sorted(mine)

    def _run(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            for pid in self._descendants():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                    cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
                except OSError:
                    continue
                kib = {line.split(":")[0]: int(line.split()[1]) for line in status.splitlines()
                       if line.startswith(("VmHWM:", "RssAnon:"))}
                if kib.get("VmHWM", 0) > self.peaks.get(pid, (0, ""))[0]:
                    self.peaks[pid] = (kib["VmHWM"], cmd)
                self.private[pid] = max(self.private.get(pid, 0), kib.get("RssAnon", 0))
                if cmd.startswith("ray::") and cmd != "ray::IDLE":  # a worker's title names its running task
                    self.names.setdefault(pid, set()).add(cmd[5:])

    def largest_worker_mib(self) -> dict[str, tuple[float, str]]:
        """The largest worker so far by each measure (MiB), with the tasks its process ran (as sampled)."""
        workers = [pid for pid, (_, cmd) in self.peaks.items() if cmd.startswith("ray::") or "default_worker" in cmd]
        out = {}
        for name, of in (("VmHWM", lambda pid: self.peaks[pid][0]), ("private", lambda pid: self.private.get(pid, 0))):
            pid = max(workers, key=of, default=None)
            out[name] = ((of(pid) / 1024, ", ".join(sorted(self.names.get(pid, {"none"})))) if pid is not None
                         else (0.0, "none"))
        return out

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@ray.remote(num_cpus=1)
def scan_partition(files: tuple[str, ...], columns: list[str]) -> tuple[int, float]:
    """Read one partition's columns as the featurizer does; returns (rows, seconds)."""
    t = time.monotonic()
    df = pl.scan_parquet(list(files)).select(columns).collect()
    return len(df), time.monotonic() - t


@ray.remote(num_cpus=1)
def reference_fit(tau: float, rows: int, spec: PartSpec, samples: list[ray.ObjectRef]) -> tuple[int, float]:
    """The reference solver on one fit's stacked design matrix; returns (rows, seconds).

    The samples are fetched one at a time into one preallocated matrix (row weights folded in),
    so the task holds the stacked matrix once, not it and every sample beside it."""
    p = int(np.count_nonzero(spec.columns))
    X, y, at = np.empty((rows, p)), np.empty(rows), 0
    for ref, weight in zip(samples, spec.row_weights):
        Xp, yp, wp = part_rows(ray.get(ref), spec.scale, spec.columns, weight)
        X[at:at + len(yp)] = Xp * wp[:, None]
        y[at:at + len(yp)] = yp * wp
        at += len(yp)
        del Xp, yp, wp
    t = time.monotonic()
    rq_fit_pfn(X, y, tau)
    return rows, time.monotonic() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=float, default=1e8, help="step rows in the store (default 10^8)")
    ap.add_argument("--configs", type=int, default=100)
    ap.add_argument("--specialists", type=int, default=4)
    ap.add_argument("--store", default=None, help="store to reuse or create (default bench/out/scale-<rows>)")
    ap.add_argument("--skip-limit", action="store_true", help="time our run only")
    ap.add_argument("--object-store-gib", type=float, default=None,
                    help="Ray object store size (default Ray's: 30%% of memory); features and prepared "
                         "designs beyond it spill to disk")
    ap.add_argument("--max-fit-rows", type=int, default=TrainSettings.max_fit_rows,
                    help="specialists above it are fitted over their shards (default %(default)s)")
    ap.add_argument("--rows-per-config", type=int, default=TrainSettings.rows_per_config,
                    help="training rows per configuration and target in a fit, a fixed random sample (default: "
                         "all); every row is still read, featurized and scored")
    ap.add_argument("--select-folds", type=int, default=TrainSettings.select_folds,
                    help="folds of the recipe's per-target choice (specialists or pooled), run and timed as a phase "
                         "of its own after training, so that the trained designs (K specialists) are the ones the "
                         "limit's reference solver fits (default %(default)s; 0: skip)")
    args = ap.parse_args()
    rows = int(args.rows)
    cpus = os.cpu_count() or 1
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    store_uri = args.store or f"bench/out/scale-{args.configs}x{rows // args.configs}"
    sampler = WorkerPeaks()
    store_bytes = None if args.object_store_gib is None else int(args.object_store_gib * 2**30)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=store_bytes)
    table = []
    if not Store(store_uri).exists():
        t = time.monotonic()
        summary = generate_store(store_uri, args.configs, rows // args.configs, seed=3, days=1)
        dt = time.monotonic() - t
        table.append(("generate (rece synth)", dt, summary.steps / dt))
    store = Store(store_uri)
    parts = {t: store.partitions(t) for t in ("steps", "requests")}
    n_rows = {t: pl.scan_parquet([f for p in ps for f in p.files]).select(pl.len()).collect().item()
              for t, ps in parts.items()}  # from the files' footers
    total = n_rows["steps"] + n_rows["requests"]

    timings: dict = {}
    with tempfile.TemporaryDirectory(prefix="rece-scale-") as out:
        t = time.monotonic()
        settings = TrainSettings(specialists=args.specialists, max_fit_rows=args.max_fit_rows,
                                 rows_per_config=args.rows_per_config, select_folds=0)
        result, _ = train_and_publish(store_uri, out, settings, max_regression=None, timings=timings)
        e2e = time.monotonic() - t
    if args.select_folds:
        t = time.monotonic()
        fs = result.features
        chosen = select_models(fs, dataclasses.replace(settings, select_folds=args.select_folds),
                               list(range(len(fs.stats))))
        select_s = time.monotonic() - t
    driver_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    workers = sampler.largest_worker_mib()  # before the limit phase's stacked matrices
    for key, label in (("featurize_s", "featurize"), ("fit_s", "fit (LPs + non-crossing)"),
                       ("held_out_s", "held-out metrics"), ("publish_s", "golden vectors + publish")):
        table.append((label, timings[key], total / timings[key]))
    table.append(("end to end (train_and_publish)", e2e, total / e2e))
    if args.select_folds:
        table.append((f"model selection ({args.select_folds} folds x 2 refits, <= {VALIDATION_ROWS_PER_CONFIG:,} "
                      f"rows per configuration; pooled: {', '.join(chosen['pooled']) or 'none'})", select_s, total / select_s))

    sampler.stop()
    ray_store_gib = ray.cluster_resources()["object_store_memory"] / 2**30
    print(f"machine: {cpus} CPUs, {mem_gib:.0f} GiB, load average {os.getloadavg()[0]:.1f} after training; "
          f"Ray object store {ray_store_gib:.1f} GiB")
    print(f"store {store_uri}: {args.configs} configurations, {n_rows['steps']:,} step rows, "
          f"{n_rows['requests']:,} request rows; {args.specialists} specialists, quantiles {settings.quantiles}, "
          f"rows per configuration in a fit: {args.rows_per_config or 'all'}")
    print(f"fit stage: independent LPs {timings['fit_wall_s']:.1f} s wall, joint non-crossing re-solves "
          f"{timings['noncrossing_wall_s']:.1f} s wall; the rest of it (embedding, clustering, prepare) "
          f"{timings['fit_s'] - timings['fit_wall_s'] - timings['noncrossing_wall_s']:.1f} s")
    print(f"LP fits: {len(timings['lp_seconds'])}, median {np.median(timings['lp_seconds']):.1f} s, "
          f"largest {max(timings['lp_rows']):,} rows; slowest: " + ", ".join(
              f"{s:.0f} s on {n:,} rows" for s, n in sorted(zip(timings["lp_seconds"], timings["lp_rows"]))[-3:]))
    solved = [(f["rows_solved"], sp["rows"][t], t, f["tau"]) for sp in result.artifact["specialists"]
              for t in sp["fit"] for f in sp["fit"][t]]
    print("rows in the final LP (rows_solved / the members' rows; borrowed rows come on top), largest three: " + ", ".join(
        f"{t} P{100 * q:g} {a:,}/{b:,}" for a, b, t, q in sorted(solved)[-3:]))
    print(f"peak RSS: driver {driver_mib:,.0f} MiB (before the limit phase); largest worker: private memory "
          f"{workers['private'][0]:,.0f} MiB (a process that ran {workers['private'][1][:100]}), "
          f"VmHWM with the object-store pages it touched {workers['VmHWM'][0]:,.0f} MiB "
          f"({workers['VmHWM'][1][:100]})")
    print("| phase | wall s | rows/s |\n|---|---|---|")
    for label, s, rate in table:
        print(f"| {label} | {s:.1f} | {rate:,.0f} |", flush=True)
    limit = None
    if not args.skip_limit:
        t = time.monotonic()
        scans = [scan_partition.remote(p.files, STEP_READ if tab == "steps" else REQUEST_READ)
                 for tab, ps in parts.items() for p in ps]
        scanned = sum(r for r, _ in gather(scans, "limit: Polars scans"))
        read_s = time.monotonic() - t
        t = time.monotonic()
        refs, node_memory = [], ray.cluster_resources()["memory"]
        for key, (spec, samples) in timings["design_inputs"].items():
            n = timings["design_rows"][key]  # the stacked matrix and PK's ~8 n-vectors beside it
            need = int(8 * n * (timings["design_cols"][key] + 8))
            task = reference_fit.options(memory=min(need, node_memory))  # the largest alone on the node
            refs += [task.remote(q, n, spec, list(samples)) for q in settings.quantiles]
        ref_rows = sum(r for r, _ in gather(refs, f"limit: reference fits ({len(refs)})"))
        fit_ref_s = time.monotonic() - t
        limit = read_s + fit_ref_s
        print(f"| limit: Polars scan ({scanned:,} rows) | {read_s:.1f} | {scanned / read_s:,.0f} |")
        print(f"| limit: reference FN/PK fits ({len(refs)}, {ref_rows:,} rows) | {fit_ref_s:.1f} | "
              f"{ref_rows / fit_ref_s:,.0f} |", flush=True)

    ray.shutdown()
    if limit is not None:
        print(f"end to end / limit = {e2e:.1f} / {limit:.1f} s = {e2e / limit:.2f}x (target <= 2x)")


if __name__ == "__main__":
    main()
