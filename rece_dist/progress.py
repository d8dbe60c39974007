"""One progress line per phase while Ray tasks run, so a long job never looks hung."""

from __future__ import annotations

import sys
import time
from typing import Any, Sequence

import ray

from .errors import ReceError

# Every training and evaluation task is a pure function of its arguments, so Ray may run it again:
# a worker killed or a node lost mid-task costs a retry, and an output lost with its node is
# rebuilt from lineage (which needs retries left), instead of failing the job.
RETRIES = 3


def log(msg: str) -> None:
    """One line to stderr in one write: ``print`` writes the text and its newline apart, so two
    threads (evaluation fits run from a pool) could join their lines into one."""
    sys.stderr.write(msg + "\n")
    sys.stderr.flush()


def gather(refs: Sequence[ray.ObjectRef], label: str, every_s: float = 2.0,
           heartbeat_s: float = 30.0) -> list[Any]:
    """``ray.get`` in submission order, printing ``label: done/total`` as tasks finish: at most
    every ``every_s`` while the count moves, every ``heartbeat_s`` while it does not (a job log
    of long fits should not repeat the same line every two seconds)."""
    pending = list(refs)
    total, t0, last, shown = len(pending), time.monotonic(), 0.0, -1
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=every_s)
        now = time.monotonic()
        done = total - len(pending)
        if pending and now - last >= (every_s if done != shown else heartbeat_s):
            log(f"  {label}: {done}/{total} done ({now - t0:.0f} s)")
            last, shown = now, done
    try:
        out = ray.get(list(refs))
    except ray.exceptions.RayTaskError as exc:
        # Bad input found inside a task surfaces as the task's own one-line error.
        if isinstance(exc.cause, ReceError):
            raise exc.cause from None
        raise
    log(f"  {label}: {total}/{total} done ({time.monotonic() - t0:.1f} s)")
    return out
