"""The per-partition feature cache: a nightly rolling window re-featurizes only its new day,
and a warm run's artifact is the cold run's, byte for byte.

The store is ``ground_truth.write_store`` over 8 days with the same number of steps and
requests every day, so "one new day" is exactly 1/7 of a 7-day window's rows; the expected
counts come from the Parquet footers (``Store.row_count``), not from the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from ground_truth import write_store

from rece_dist import artifact
from rece_dist.cli import main
from rece_dist.featurecache import PREFIX, FeatureCache, read_counts, through_cache
from rece_dist.recipe import train
from rece_dist.settings import TrainSettings
from rece_dist.publish import resolve
from rece_dist.shards import Shard, read_shard
from rece_dist.store import Store

DAYS = tuple(f"2026-11-0{d}" for d in range(1, 9))
SETTINGS = TrainSettings(specialists=2, seed=0)


def window(first: int, last: int) -> TrainSettings:
    return dataclasses.replace(SETTINGS, date_from=DAYS[first - 1], date_to=DAYS[last - 1])


def footer_rows(store: str, first: int, last: int) -> int:
    """Steps + requests rows of days first..last, from the Parquet footers alone."""
    s = Store(store)
    return sum(s.row_count(p) for t in ("steps", "requests") for p in s.partitions(t, None, DAYS[first - 1], DAYS[last - 1]))


def entries(root: Path) -> list[Path]:
    return sorted((root / PREFIX).rglob("*.features"))


@pytest.fixture(scope="module")
def week_store(tmp_path_factory) -> str:
    store = str(tmp_path_factory.mktemp("nightly") / "store")
    write_store(store, n_configs=3, rows=600, dates=DAYS)
    return store


def test_second_night_reads_only_the_new_day_and_builds_the_cold_artifact(week_store, tmp_path, ray_local):
    root = str(tmp_path / "models")
    night1 = train(week_store, window(1, 7), feature_cache=root)
    r1 = read_counts(night1.features.stats)
    assert r1 == {"raw_rows": footer_rows(week_store, 1, 7), "cached_rows": 0, "raw_shards": 21, "cached_shards": 0}
    assert len(entries(tmp_path / "models")) == 21

    night2 = train(week_store, window(2, 8), feature_cache=root)
    r2 = read_counts(night2.features.stats)
    assert r2["raw_rows"] == footer_rows(week_store, 8, 8) and r2["raw_shards"] == 3
    assert r2["cached_rows"] == footer_rows(week_store, 2, 7) and r2["cached_shards"] == 18
    assert r2["raw_rows"] <= r1["raw_rows"] / 7

    cold = train(week_store, window(2, 8))
    assert read_counts(cold.features.stats)["cached_rows"] == 0
    assert artifact.digest(night2.artifact) == artifact.digest(cold.artifact)
    assert artifact.digest(night1.artifact) != artifact.digest(cold.artifact)  # the windows differ


def test_a_corrupt_or_truncated_entry_is_recomputed_not_used(week_store, tmp_path, ray_local):
    root = tmp_path / "models"
    first = train(week_store, window(1, 2), feature_cache=str(root))
    bad = entries(root)
    bad[0].write_bytes(bad[0].read_bytes()[:-100])  # truncated upload
    data = bytearray(bad[1].read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the payload
    bad[1].write_bytes(bytes(data))
    bad[2].write_bytes(b"")
    again = train(week_store, window(1, 2), feature_cache=str(root))
    r = read_counts(again.features.stats)
    assert r["raw_shards"] == 3 and r["cached_shards"] == 3
    assert artifact.digest(again.artifact) == artifact.digest(first.artifact)
    # rewritten whole: the next run finds every entry valid
    assert read_counts(train(week_store, window(1, 2), feature_cache=str(root)).features.stats)["raw_shards"] == 0


def test_changed_features_settings_or_partition_miss_the_cache(week_store, tmp_path, ray_local):
    root = str(tmp_path / "models")
    week_store = str(shutil.copytree(week_store, tmp_path / "store"))  # rewritten below
    train(week_store, window(1, 1), feature_cache=root)
    other = train(week_store, dataclasses.replace(window(1, 1), holdout_every=5), feature_cache=root)
    assert read_counts(other.features.stats)["cached_shards"] == 0
    # a partition rewritten in place (same name, new content) is a new partition
    s = Store(week_store)
    part = s.partitions("steps", None, DAYS[0], DAYS[0])[0]
    df = s.scan(part).drop("config_id", "date")
    s.write_partition("steps", part.config_id, part.date, df.with_columns(duration_us=df["duration_us"] * 2))
    r = read_counts(train(week_store, window(1, 1), feature_cache=root).features.stats)
    assert (r["raw_shards"], r["cached_shards"]) == (1, 2)


def test_editing_the_feature_code_changes_every_key(week_store, tmp_path):
    """A copy of the package with one formula changed in features.py computes other entry keys
    for the same partitions (run in a subprocess: the edited module must really be imported)."""
    import rece_dist

    pkg = tmp_path / "pkg" / "rece_dist"
    src = Path(rece_dist.__file__).parent
    shutil.copytree(src, pkg, ignore=shutil.ignore_patterns("__pycache__"))
    features = pkg / "features.py"
    text = features.read_text()
    edited = text.replace("def holdout_mask(n: int, every: int = 10, block: int = 500)",
                          "def holdout_mask(n: int, every: int = 10, block: int = 400)")
    assert edited != text
    probe = ("import json, sys; from rece_dist.featurecache import FeatureCache; from rece_dist.shards import read_shard;"
             "from rece_dist.store import Store; s = Store(sys.argv[1]); cfgs = s.configs();"
             "c = FeatureCache(sys.argv[2], 10, (read_shard,));"
             "print(json.dumps([c.entry(cfgs[p.config_id], p, None).key for p in s.partitions('steps')]))")

    def keys(pythonpath: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", probe, week_store, str(tmp_path / "m")], check=True, text=True,
                             capture_output=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": pythonpath}).stdout
        return json.loads(out)

    same = keys(str(pkg.parent))
    features.write_text(edited)
    changed = keys(str(pkg.parent))
    assert len(same) == 24 and len(set(same)) == 24
    assert not set(same) & set(changed)


def test_cli_caches_by_default_and_records_the_reads_in_the_manifest(week_store, tmp_path, ray_local):
    out = str(tmp_path / "models")
    assert main(["train", "--store", week_store, "--out", out, "-k", "2", "--date-from", DAYS[6], "--no-feature-cache"]) == 0
    assert not (tmp_path / "models" / PREFIX).exists()
    _, manifest = resolve(out)
    assert manifest["feature_reads"]["cached_rows"] == 0
    assert main(["train", "--store", week_store, "--out", out, "-k", "2", "--date-from", DAYS[5], "--force"]) == 0
    _, manifest = resolve(out)
    assert manifest["feature_reads"] == {"raw_rows": footer_rows(week_store, 6, 8), "cached_rows": 0,
                                         "raw_shards": 9, "cached_shards": 0}
    assert len(entries(tmp_path / "models")) == 9


def test_cache_on_s3_keys_by_etag_and_recomputes_a_bad_object(s3_bucket, tmp_path):
    """The featurize task's own steps (read_shard through the cache) in this process, against the
    loopback S3 server (Ray workers of this session hold no fake keys)."""
    store_uri = s3_bucket.uri("traces")
    write_store(store_uri, n_configs=2, rows=300, dates=DAYS[:3])
    store = Store(store_uri)
    cfgs = store.configs()
    cache = FeatureCache(s3_bucket.uri("models"), 10, (read_shard,))

    def night() -> list[tuple[Shard, bool]]:
        steps = {(p.config_id, p.date): p for p in store.partitions("steps")}
        reqs = {(p.config_id, p.date): p for p in store.partitions("requests")}
        return [through_cache(cache.entry(cfgs[k[0]], steps[k], reqs[k]), Shard,
                              lambda k=k: read_shard(store, cfgs[k[0]], steps[k], reqs[k], 10)) for k in sorted(steps)]

    cold = night()
    assert [hit for _, hit in cold] == [False] * 6
    keys = sorted(k for k in s3_bucket.objects() if k.startswith(f"models/{PREFIX}/"))
    assert len(keys) == 6
    warm = night()
    assert [hit for _, hit in warm] == [True] * 6
    for (a, _), (b, _) in zip(cold, warm):
        assert (a.config_id, a.date) == (b.config_id, b.date)
        for field in ("X", "y", "holdout"):
            for t in ("alpha", "beta"):
                np.testing.assert_array_equal(getattr(a, field)[t], getattr(b, field)[t], strict=True)
    body = s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=keys[0])["Body"].read()
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=keys[0], Body=body[: len(body) // 2])
    assert sum(not hit for _, hit in night()) == 1  # the half object was recomputed ...
    assert s3_bucket.client.get_object(Bucket=s3_bucket.name, Key=keys[0])["Body"].read() == body  # ... and rewritten
    # a partition object rewritten with other bytes has another ETag: its shard misses
    part = store.partitions("requests", None, DAYS[2], DAYS[2])[0]
    df = store.scan(part).drop("config_id", "date")
    store.write_partition("requests", part.config_id, part.date, df.head(200))
    assert sum(not hit for _, hit in night()) == 1


def test_shipped_iam_policy_lets_the_job_use_the_cache(s3_bucket, s3_iam, monkeypatch):
    from test_store_s3 import _job_policy

    write_store(s3_bucket.uri("traces/v1"), n_configs=1, rows=100, dates=DAYS[:1])
    key_id, secret = s3_iam(_job_policy(s3_bucket.name))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = Store(s3_bucket.uri("traces/v1"))
    (cfg,) = store.configs().values()
    steps, reqs = store.partitions("steps")[0], store.partitions("requests")[0]
    entry = FeatureCache(s3_bucket.uri("models"), 10, (read_shard,)).entry(cfg, steps, reqs)
    compute = lambda: read_shard(store, cfg, steps, reqs, 10)  # noqa: E731
    assert [through_cache(entry, Shard, compute)[1] for _ in range(2)] == [False, True]  # a miss (403 -> listed), then a hit
