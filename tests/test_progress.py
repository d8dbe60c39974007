"""Progress lines: one whole line per message, whatever thread writes it."""

from __future__ import annotations

import re
import subprocess
import sys

SCRIPT = """
import threading
from rece_dist.progress import log

def talk(k):
    for i in range(3000):
        log(f"[t{k}] line {i} of a progress message long enough to be split by a competing write")

threads = [threading.Thread(target=talk, args=(k,)) for k in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
"""


def test_lines_from_parallel_threads_never_merge() -> None:
    """Evaluation fits log from a thread pool; a stderr pipe (a job log) must get whole lines."""
    err = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True).stderr
    lines = err.splitlines()
    pattern = re.compile(r"\[t[0-7]\] line \d+ of a progress message long enough to be split by a competing write")
    bad = [line for line in lines if not pattern.fullmatch(line)]
    assert len(lines) == 8 * 3000 and not bad, bad[:3]
