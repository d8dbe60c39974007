"""Benchmark ``rece ingest --format otlp``: step events per second and peak memory as the file grows.

    python bench/bench_ingest.py                         # 10^5 and 10^6 step events
    nice -n 10 python bench/bench_ingest.py --events 1e5,1e6,1e7 > bench-ingest.txt &

Each size writes one OTLP/JSON file of ``step.BATCH_SUMMARY`` events (a block of 10^5 generated
steps of one configuration, 256 events per line as the writer emits them, repeated to size;
written by a child process), then ingests it into a fresh local store on local Ray.
Prints the file size, ingest wall time, step events/s, the driver's peak RSS and the peak RSS
of its busiest Ray worker (sampled from /proc every 0.2 s; shared object-store pages count in
both): flat memory as the file grows is the claim. It also prints the CPU seconds the driver and
its Ray workers spent, as step events per CPU-second: on a machine shared with other work the
wall-clock rate says more about the neighbours than about the importer, the CPU cost does not
(``ncpu x events per CPU-s`` is what an idle machine would reach if the work spread perfectly).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import polars as pl
import ray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rece_dist.ingest.otlp_writer import _step_lines  # noqa: E402
from rece_dist.ingest.run import IngestOptions, ingest  # noqa: E402
from rece_dist.synth import sample_configs, simulate_config  # noqa: E402


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return 0


def _ray_workers() -> list[int]:
    """This driver's Ray workers (descendants of this process through its raylet), not other users'."""
    me, out = os.getpid(), []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as f:
                if f.read(5) != b"ray::":
                    continue
        except OSError:
            continue
        pid = int(d)
        while pid > 1 and pid != me:
            pid = _ppid(pid)
        if pid == me:
            out.append(int(d))
    return out


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


class PeakRSS(threading.Thread):
    """Peak RSS of the driver and of its busiest Ray worker; CPU seconds of the workers since start."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.driver = self.worker = 0.0
        self.stop = threading.Event()
        self.cpu_start = {p: _cpu_s(p) for p in _ray_workers()}
        self.cpu_last: dict[int, float] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            self.driver = max(self.driver, _rss_mib(os.getpid()))
            workers = _ray_workers()
            self.worker = max([self.worker, *(_rss_mib(p) for p in workers)])
            self.cpu_last.update({p: _cpu_s(p) for p in workers})
            time.sleep(0.2)

    def worker_cpu_s(self) -> float:
        return sum(c - self.cpu_start.get(p, 0.0) for p, c in self.cpu_last.items())


def write_file(path: Path, events: int, block: int = 100_000) -> tuple[object, int]:
    """``events`` step events: one block of up to ``block`` events encoded once, then its bytes
    repeated (a 10^7-event file in seconds; the parser's work per byte is the same)."""
    cfg = sample_configs(1, 11)[0]
    base = pl.concat(simulate_config(cfg, 0, 11, 20_000, 1, "2026-11-01")["steps"].values())
    span_ns = int(base["ts_end_ns"].max() - base["ts_start_ns"].min()) + 10**6
    lines, made = [], 0
    for k in range(-(-min(events, block) // len(base))):
        n = min(len(base), min(events, block) - made)
        part = base.head(n).with_columns(pl.col("step_id") + k * len(base),
                                         pl.col("ts_start_ns") + k * span_ns, pl.col("ts_end_ns") + k * span_ns)
        lines.extend(_step_lines(cfg.config_id, part, int(base["ts_start_ns"].min()) - 3600 * 10**9))
        made += n
    data = ("\n".join(lines) + "\n").encode()
    written = 0
    with open(path, "wb") as f:
        while written + made <= events:
            f.write(data)
            written += made
    return cfg, written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--events", default="1e5,1e6", help="comma-separated step-event counts (default 1e5,1e6)")
    p.add_argument("--chunk-mib", type=int, default=64)
    args = p.parse_args()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)  # its own, never a shared cluster
    print(f"machine: {os.cpu_count()} CPUs; chunk {args.chunk_mib} MiB")
    print(f"{'events':>10} {'file MiB':>9} {'write s':>8} {'ingest s':>9} {'events/s':>10} {'driver MiB':>11} {'worker MiB':>11} "
          f"{'driver CPU s':>13} {'worker CPU s':>13} {'events/CPU-s':>13} {'load':>5}")
    for n in (int(float(x)) for x in args.events.split(",")):
        tmp = Path(tempfile.mkdtemp(prefix="rece-bench-ingest-"))
        src = tmp / "traces.jsonl"
        t0 = time.monotonic()
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:  # keeps the driver's heap clean
            cfg, written = pool.submit(write_file, src, n).result()
        t_write = time.monotonic() - t0
        cfg_path = tmp / "cfg.json"
        cfg_path.write_text(__import__("json").dumps({"model": cfg.to_dict()["model"], "gpu": cfg.to_dict()["gpu"],
                                                      "serving": cfg.to_dict()["serving"]}))
        peak = PeakRSS()
        peak.start()
        cpu0 = os.times()
        t0 = time.monotonic()
        (summary,) = ingest([str(src)], str(tmp / "store"), [str(cfg_path)], IngestOptions("otlp", chunk_bytes=args.chunk_mib << 20))
        secs = time.monotonic() - t0
        cpu1 = os.times()
        peak.stop.set()
        peak.join()
        driver_cpu = cpu1.user - cpu0.user + cpu1.system - cpu0.system
        cpu = driver_cpu + peak.worker_cpu_s()
        assert summary.rows["steps"] + summary.idle_steps_dropped == written, summary
        print(f"{written:>10} {src.stat().st_size / 2**20:>9.0f} {t_write:>8.1f} {secs:>9.1f} {written / secs:>10.0f} "
              f"{peak.driver:>11.0f} {peak.worker:>11.0f} {driver_cpu:>13.1f} {peak.worker_cpu_s():>13.1f} {written / cpu:>13.0f} "
              f"{os.getloadavg()[0]:>5.1f}", flush=True)
        shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
