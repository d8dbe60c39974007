"""The flows the CLI and the ``jobs/`` entrypoints share: connect Ray, train, publish, demo."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import ray

from .artifact import canonical_json, summary_table
from .blis import golden_vectors, probe_configs
from .drift import gate
from .featurecache import read_counts
from .recipe import TrainResult, train
from .settings import TrainSettings
from .progress import log
from .publish import ManifestMeta, PublishedVersion, data_fingerprint, publish
from .store import Store


def connect_ray(address: str | None = None) -> None:
    """Join ``address`` (or ``RAY_ADDRESS``, as under ``ray job submit``), else start a local Ray."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False)  # never a stray `ray start` cluster
    # ray.init makes SIGTERM a bare sys.exit; ``ray job stop`` and a pod's eviction send it, and
    # they should end the run like Ctrl-C does: unwound, with the CLI's one line.
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)


_signals: list[str] = []  # what raised each KeyboardInterrupt: Ray's ray.get re-raises it bare


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    _signals.append(signal.Signals(signum).name)
    raise KeyboardInterrupt


def interrupting_signal() -> str:
    """The signal behind the last KeyboardInterrupt (SIGINT unless our handler saw another)."""
    return _signals[-1] if _signals else "SIGINT"


def train_and_publish(store_uri: str, out_root: str, settings: TrainSettings, ray_address: str | None = None,
                      max_regression: float | None = 0.05, timings: dict[str, Any] | None = None,
                      feature_cache: bool = True) -> tuple[TrainResult, PublishedVersion]:
    """Train from ``store_uri`` and publish one immutable version under ``out_root``.

    With ``feature_cache``, shards whose partitions, feature code and settings are unchanged are
    loaded from ``out_root/features/`` instead of the raw traces (``featurecache.py``); the
    artifact is the same either way.

    Unless ``max_regression`` is None, the new model is first scored against the published
    ``latest`` on the same held-out rows and refused (``RegressionError``, nothing written)
    if its mean pinball loss is worse by more than that fraction. ``timings`` receives the
    phases' wall seconds (``train``'s, then ``publish_s`` for the gate, golden vectors and publish).
    """
    connect_ray(ray_address)
    try:
        result = train(store_uri, settings, timings=timings, feature_cache=out_root if feature_cache else None)
        t0 = time.monotonic()
        doc = result.artifact
        reads = read_counts(result.features.stats)
        log(f"[train] features: {reads['raw_rows']:,} rows from raw traces ({reads['raw_shards']} shards), "
            f"{reads['cached_rows']:,} from the feature cache ({reads['cached_shards']} shards)")
        if max_regression is not None:
            report = gate(doc, result.features, out_root, max_regression)
            if report is not None:
                log(f"[train] against latest: {report.reason}")
                report.raise_if_worse()
    except KeyboardInterrupt as exc:  # publishing is the last step: no version of this run was written yet
        exc.add_note(f"nothing published, {out_root}/latest unchanged")
        raise
    training = doc["training"]
    meta = ManifestMeta(
        git_commit=training["git_commit"],
        settings=settings.to_dict(),
        data=data_fingerprint(Store(store_uri), result.partitions),
        date_from=training["date_window"][0],
        date_to=training["date_window"][1],
        versions=training["versions"],
        feature_reads=reads,
    )
    golden = canonical_json(golden_vectors(doc, probe_configs()), "golden vectors")
    version = publish(out_root, doc, meta, companions={"golden.json": golden})
    if timings is not None:
        timings["publish_s"] = time.monotonic() - t0
    print(summary_table(doc))
    log(f"[train] published {version.version} -> {version.uri} ({result.seconds:.1f} s)")
    return result, version


def demo(store_uri: str, out_root: str, settings: TrainSettings, ray_address: str | None = None) -> None:
    """``make demo``: generate a small store when absent, then train and publish locally."""
    connect_ray(ray_address)
    if not Store(store_uri).exists():
        from .synth import generate_store

        log(f"[demo] no store at {store_uri}: generating one")
        generate_store(store_uri, n_configs=8, steps_per_config=6000, seed=1, days=2)
    train_and_publish(store_uri, out_root, settings)
