"""The featurized store: (configuration, date) shards read once, kept in Ray's object store.

One task per shard reads only the columns the features need from its steps and requests
partitions (or takes them from the feature cache) and returns alpha/beta feature matrices in
natural units, targets and a held-out mask; the driver keeps only each shard's p x p sums
(``ShardStats``). Every fit, validation fold and baseline then selects shards from the
``FeatureSet`` without reading the store again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import polars as pl
import ray

from .config import DeploymentConfig
from .embedding import PROBE_INPUTS
from .errors import ClusterError, StoreError
from .features import (FEATURES, REQUEST_READ, STEP_READ, alpha_target, attach_load, beta_target, feature_matrix,
                       holdout_mask)
from .featurecache import CacheEntry, FeatureCache, through_cache
from .progress import RETRIES, gather, log
from .settings import TrainSettings
from .store import Partition, S3Options, Store

TARGETS = ("alpha", "beta")

# Peak memory of one featurize task per byte of stored Parquet: the Polars frame of the read
# columns, the feature matrices and their temporaries (measured on generated partitions of 2.8-3.2 M
# rows: 12-16x; the shard it returns is 5-6x). Each task reserves this much of Ray's ``memory``
# resource, so a node never runs more shard reads at once than its memory holds.
FEATURIZE_BYTES_PER_STORED_BYTE = 16


@dataclass
class Shard:
    """Features of one (configuration, date) shard, for both targets (stays in the object store)."""

    config_id: str
    date: str
    X: dict[str, np.ndarray] = field(default_factory=dict)
    y: dict[str, np.ndarray] = field(default_factory=dict)
    holdout: dict[str, np.ndarray] = field(default_factory=dict)

    def stats(self) -> "ShardStats":
        st = ShardStats(self.config_id, self.date, rows=sum(len(self.y[t]) for t in TARGETS))
        for t in TARGETS:
            X = self.X[t][~self.holdout[t]]
            st.train_rows[t] = len(X)
            st.col_max[t] = np.abs(X).max(axis=0) if len(X) else np.zeros(X.shape[1])
            st.gram[t] = X.T @ X
        return st


@dataclass
class ShardStats:
    """What the driver needs of a shard: p x p sums, never the rows themselves."""

    config_id: str
    date: str
    rows: int = 0  # alpha + beta rows, held out or not
    cached: bool = False  # from the feature cache, not from the store
    train_rows: dict[str, int] = field(default_factory=dict)
    col_max: dict[str, np.ndarray] = field(default_factory=dict)
    gram: dict[str, np.ndarray] = field(default_factory=dict)


@ray.remote(max_retries=RETRIES, num_returns=2)
def featurize(store_uri: str, s3: S3Options | None, cfg: DeploymentConfig, steps: Partition | None,
              requests: Partition | None, holdout_every: int, cache: CacheEntry | None = None) -> tuple[ShardStats, Shard]:
    """One shard's features: from its ``cache`` entry if valid, else read from the store (and cached)."""
    shard, hit = through_cache(cache, Shard, lambda: read_shard(Store(store_uri, s3), cfg, steps, requests, holdout_every))
    return dataclasses.replace(shard.stats(), cached=hit), shard


def read_shard(store: Store, cfg: DeploymentConfig, steps: Partition | None, requests: Partition | None,
               holdout_every: int) -> Shard:
    """Read one shard's columns and compute both targets' features (idempotent: retry-safe)."""
    part = steps or requests
    assert part is not None
    shard = Shard(part.config_id, part.date)
    step_df = store.scan(steps, STEP_READ).sort("step_id") if steps else None
    if step_df is not None:
        shard.X["beta"] = feature_matrix(step_df, cfg, "beta")
        shard.y["beta"] = beta_target(step_df)
        shard.holdout["beta"] = holdout_mask(len(step_df), holdout_every)
    if requests is not None:
        req = store.scan(requests, REQUEST_READ)
        load = step_df if step_df is not None else pl.DataFrame(
            schema={"ts_start_ns": pl.Int64, "running_depth": pl.Int32, "waiting_depth": pl.Int32,
                    "kv_usage_gpu_ratio": pl.Float32})
        req = attach_load(req, load)
        shard.X["alpha"] = feature_matrix(req, cfg, "alpha")
        shard.y["alpha"] = alpha_target(req)
        shard.holdout["alpha"] = holdout_mask(len(req), holdout_every)
    for t in TARGETS:
        if t not in shard.X:
            p = len(FEATURES[t])
            shard.X[t], shard.y[t], shard.holdout[t] = np.zeros((0, p)), np.zeros(0), np.zeros(0, dtype=bool)
    return shard


@dataclass
class FeatureSet:
    """A featurized store: shard data in the Ray object store, shard statistics on the driver.

    Built once, then any number of fits (training, validation folds, baselines) select shards
    from it without reading the store again.
    """

    store_uri: str
    configs: dict[str, DeploymentConfig]
    partitions: list[Partition]
    shard_refs: list[ray.ObjectRef]
    stats: list[ShardStats]
    # per shard, once measured: its probe inputs' central ranges (``probe_ranges``; every fold reuses them)
    ranges: dict[int, tuple["Ranges", dict[str, int]]] = field(default_factory=dict, repr=False)

    def shards_of(self, config_ids: list[str] | set[str], dates: set[str] | None = None) -> list[int]:
        return [i for i, st in enumerate(self.stats)
                if st.config_id in config_ids and (dates is None or st.date in dates)]

    @property
    def config_ids(self) -> list[str]:
        return sorted({st.config_id for st in self.stats})

    @property
    def dates(self) -> list[str]:
        return sorted({st.date for st in self.stats})


def _pair_partitions(store: Store, settings: TrainSettings) -> list[tuple[Partition | None, Partition | None]]:
    steps = {(p.config_id, p.date): p for p in store.partitions("steps", None, settings.date_from, settings.date_to)}
    reqs = {(p.config_id, p.date): p for p in store.partitions("requests", None, settings.date_from, settings.date_to)}
    return [(steps.get(k), reqs.get(k)) for k in sorted(set(steps) | set(reqs))]


def _stored_bytes(steps: Partition | None, requests: Partition | None) -> int:
    return sum(p.size_bytes for p in (steps, requests) if p is not None)


def featurize_memory(steps: Partition | None, requests: Partition | None) -> int:
    """Bytes a featurize task may need for this shard, from its stored size (free with the listing)."""
    return FEATURIZE_BYTES_PER_STORED_BYTE * _stored_bytes(steps, requests)


def _check_memory(pairs: list[tuple[Partition | None, Partition | None]], need: list[int],
                  configs: dict[str, DeploymentConfig]) -> None:
    """Fail before any read when the largest shard needs more memory than any live node has.

    Why: a task that asks for more of Ray's ``memory`` resource than every node offers is never
    scheduled (the job waits forever), and one that does not ask is killed by Ray's memory
    monitor and retried, with no word of which shard. Only live nodes count: on an autoscaling
    cluster, a node group that would start on demand must be large enough and up already."""
    nodes = [n["Resources"].get("memory", 0.0) for n in ray.nodes() if n.get("Alive")]
    have = max(nodes, default=0.0)
    k = max(range(len(pairs)), key=need.__getitem__)
    if need[k] > have:
        s, r = pairs[k]
        part = s or r
        assert part is not None
        stored = _stored_bytes(s, r)
        raise ClusterError(
            f"shard {part.config_id}/{part.date} ({configs[part.config_id].label}) is {_bytes(stored)} of Parquet "
            f"and needs about {_bytes(need[k])} of memory to featurize; the largest node of this Ray cluster "
            f"offers {_bytes(have)} (its 'memory' resource, {len(nodes)} node(s)). Give the workers more memory, "
            "or write that configuration's traces in smaller date partitions")


def _bytes(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**30 else f"{n / 2**20:,.1f} MiB"


def featurize_store(store_uri: str, settings: TrainSettings, s3: S3Options | None = None,
                    cache_root: str | None = None) -> FeatureSet:
    """Featurize each shard of the settings' date window in a Ray task (cached under ``cache_root`` if given)."""
    store = Store(store_uri, s3)
    store.require()
    configs = store.configs()
    if not configs:
        raise StoreError(f"{store_uri}: the store has no configuration documents (configs/*.json)")
    pairs = _pair_partitions(store, settings)
    if not pairs:
        window = f" in {settings.date_from or '...'}..{settings.date_to or '...'}" if (settings.date_from or settings.date_to) else ""
        raise StoreError(f"{store_uri}: no trace partitions{window} for the {len(configs)} configuration(s)")
    ids = sorted({(s or r).config_id for s, r in pairs})
    unknown = [c for c in ids if c not in configs]
    if unknown:
        raise StoreError(f"{store_uri}: partitions of unknown configuration(s) {', '.join(unknown)}: "
                         "no configs/<id>.json documents them")
    log(f"[rece] {store_uri}: {len(ids)} configurations, {len(pairs)} shards")
    need = [featurize_memory(s, r) for s, r in pairs]
    _check_memory(pairs, need, configs)
    cache = FeatureCache(cache_root, settings.holdout_every, (read_shard,)) if cache_root else None
    refs = [featurize.options(memory=m).remote(store.uri, store.s3, configs[(s or r).config_id], s, r,
                                               settings.holdout_every, cache and cache.entry(configs[(s or r).config_id], s, r))
            for (s, r), m in zip(pairs, need)]
    stats: list[ShardStats] = gather([st for st, _ in refs], "features")
    for cid in ids:
        for t in TARGETS:
            if sum(st.train_rows[t] for st in stats if st.config_id == cid) == 0:
                raise StoreError(f"configuration {cid} ({configs[cid].label}) has no {t} training rows "
                                 f"in the selected window")
    return FeatureSet(store_uri, {c: configs[c] for c in ids}, [p for pair in pairs for p in pair if p],
                      [shard for _, shard in refs], stats)


# --- probe ranges (the embedding's probe batches) ------------------------------------------------

Ranges = dict[str, dict[str, tuple[float, float, float]]]  # target -> input -> (p10, p50, p90)


@ray.remote(max_retries=RETRIES)
def _shard_ranges(shard: Shard, cfg: DeploymentConfig) -> tuple[Ranges, dict[str, int]]:
    """10th, 50th and 90th percentile of each probe input over one shard's rows, and its row counts."""
    out: Ranges = {}
    for t, inputs in PROBE_INPUTS.items():
        names = [f.name for f in FEATURES[t]]
        X = shard.X[t]
        out[t] = {var: tuple(float(v) for v in np.percentile(X[:, names.index(feat)] * divisor(cfg), [10, 50, 90]))
                  if len(X) else (0.0, 0.0, 0.0) for var, (feat, divisor) in inputs.items()}
    return out, {t: len(shard.X[t]) for t in TARGETS}


def probe_ranges(fs: FeatureSet, config_ids: Sequence[str], shards: Sequence[int] | None = None) -> dict[str, Ranges]:
    """Per configuration: the central range of each probe input, one task per shard (a task holds
    one shard); a configuration's percentiles are its shards' percentiles averaged by rows."""
    wanted = set(config_ids)
    pick = [i for i in (range(len(fs.stats)) if shards is None else shards) if fs.stats[i].config_id in wanted]
    todo = [i for i in pick if i not in fs.ranges]
    if todo:
        fs.ranges.update(zip(todo, gather([_shard_ranges.remote(fs.shard_refs[i], fs.configs[fs.stats[i].config_id])
                                           for i in todo], "probe ranges")))
    got = [fs.ranges[i] for i in pick]
    out: dict[str, Ranges] = {}
    for c in config_ids:
        mine = [r for i, r in zip(pick, got) if fs.stats[i].config_id == c]
        out[c] = {}
        for t, inputs in PROBE_INPUTS.items():
            n = np.array([rows[t] for _, rows in mine], dtype=float)
            w = n / n.sum() if n.sum() > 0 else np.full(len(mine), 1.0 / max(len(mine), 1))
            out[c][t] = {var: tuple(float(v) for v in w @ np.array([r[t][var] for r, _ in mine])) for var in inputs}
    return out
