"""Trace stores on S3, against moto's real S3 API on loopback (see ``s3_bucket`` in conftest)."""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from rece_dist.config import Catalog
from rece_dist.errors import SchemaError, StoreError
from rece_dist.objstore import ObjectRoot, S3Options
from rece_dist.publish import ManifestMeta, data_fingerprint, list_versions, publish, resolve
from rece_dist.schema import STEP_COLUMNS
from rece_dist.store import Partition, Store

CONFIGS = ("cfg-a", "cfg-b")
DAYS = ("2024-03-01", "2024-03-02", "2024-03-03")


def _steps(n: int, seed: int) -> pl.DataFrame:
    """A tiny, valid steps frame whose values identify it (``step_id`` starts at ``seed``)."""
    cols = {c.name: [seed + i for i in range(n)] for c in STEP_COLUMNS}
    cols["ts_end_ns"] = [v + 10 for v in cols["ts_start_ns"]]
    cols["kv_usage_gpu_ratio"] = [0.5] * n
    return pl.DataFrame(cols)


@pytest.fixture
def s3_store(s3_bucket) -> Store:
    store = Store(s3_bucket.uri("traces/v1"))
    store.init({"note": "test"})
    for i, cid in enumerate(CONFIGS):
        for j, day in enumerate(DAYS):
            store.write_partition("steps", cid, day, _steps(3 + j, seed=100 * i + 10 * j))
    return store


def test_store_round_trip_on_s3(s3_bucket, s3_store):
    assert s3_store.exists()
    s3_store.require()
    assert s3_store.read_json("store.json")["note"] == "test"
    parts = s3_store.partitions("steps")
    assert [(p.config_id, p.date) for p in parts] == [(c, d) for c in CONFIGS for d in DAYS]
    part = parts[4]  # cfg-b, 2024-03-02
    df = s3_store.scan(part, columns=["step_id", "duration_us"])
    assert df["step_id"].to_list() == [110, 111, 112, 113]
    assert df["config_id"].unique().to_list() == ["cfg-b"] and df["date"].unique().to_list() == ["2024-03-02"]
    assert s3_store.row_count(part) == 4
    head = s3_bucket.client.head_object(Bucket=s3_bucket.name, Key="traces/v1/" + part.key + "/part-0.parquet")
    assert part.etags == (head["ETag"],) and part.size_bytes == head["ContentLength"]


def test_partition_pruning_by_config_and_date(s3_store):
    got = s3_store.partitions("steps", config_ids=["cfg-b"], date_from="2024-03-02", date_to="2024-03-03")
    assert [(p.config_id, p.date) for p in got] == [("cfg-b", "2024-03-02"), ("cfg-b", "2024-03-03")]
    assert s3_store.partitions("steps", config_ids=["nope"]) == []
    assert s3_store.partitions("requests") == []
    with pytest.raises(StoreError, match="date_from must be YYYY-MM-DD"):
        s3_store.partitions("steps", date_from="March")


def test_configs_on_s3(s3_bucket):
    store = Store(s3_bucket.uri("cfgstore"))
    store.init()
    cfg = Catalog.default().resolve({"model": "Llama-3.1-8B", "gpu": "H100-SXM"})
    store.write_config(cfg)
    assert list(store.configs()) == [cfg.config_id]


def test_store_survives_pickling_for_ray_tasks(s3_store):
    clone = pickle.loads(pickle.dumps(s3_store))
    part = clone.partitions("steps", config_ids=["cfg-a"])[0]
    assert clone.scan(part)["step_id"].to_list() == [0, 1, 2]


def test_listing_pages_past_1000_keys_without_opening_files(s3_bucket):
    """1100 keys force a second ListObjectsV2 page; the bytes are not Parquet, so any read would fail."""
    keys = [f"big/steps/config_id=c{i % 11:02d}/date=2024-01-{1 + i // 11 % 28:02d}/part-{i}.parquet" for i in range(1100)]
    s3_bucket.seed(keys)
    store = Store(s3_bucket.uri("big"))
    parts = store.partitions("steps")
    assert sum(len(p.files) for p in parts) == 1100 and len(parts) == 11 * 28
    pruned = store.partitions("steps", config_ids=["c03"], date_to="2024-01-02")
    assert [(p.date, len(p.files)) for p in pruned] == [("2024-01-01", 4), ("2024-01-02", 4)]


def test_corrupt_parquet_is_a_schema_error_not_a_store_error(s3_bucket, s3_store):
    part = s3_store.partitions("steps")[0]
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key=part.files[0].split("/", 1)[1], Body=b"PAR1 truncated")
    with pytest.raises(SchemaError, match="part-0.parquet: not a Parquet file"):
        s3_store.row_count(part)
    with pytest.raises(SchemaError, match="part-0.parquet: cannot read Parquet"):
        s3_store.scan(part)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_endpoint_is_one_clear_line(s3_bucket, monkeypatch):
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    store = Store(s3_bucket.uri("traces"))
    started = time.monotonic()
    for call in (store.require, lambda: store.partitions("steps"), lambda: store.read_json("store.json")):
        with pytest.raises(StoreError) as err:
            call()
        msg = str(err.value)
        assert "\n" not in msg and endpoint in msg and "cannot be reached" in msg and "AWS_ENDPOINT_URL" in msg
    assert time.monotonic() - started < 10


def test_silent_endpoint_times_out_instead_of_hanging(s3_bucket):
    """A server that accepts connections but never answers: every client gives up within its timeouts."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)  # the kernel completes handshakes; nobody ever reads or replies
        opts = S3Options(endpoint_url=f"http://127.0.0.1:{server.getsockname()[1]}", connect_timeout=0.3, read_timeout=0.3, max_attempts=1)
        store = Store(s3_bucket.uri("traces"), s3=opts)
        part = _partition(store, "steps/config_id=c/date=2024-01-01/part-0.parquet")
        for call in (store.exists, lambda: store.scan(part), lambda: store.row_count(part)):
            started = time.monotonic()
            with pytest.raises(StoreError, match="did not answer in time"):
                call()
            assert time.monotonic() - started < 5


def _partition(store: Store, rel: str) -> Partition:
    """A partition built by hand, for calls that must not depend on listing working."""
    _, cid, day = (seg.split("=", 1)[-1] for seg in rel.split("/")[:3])
    return Partition("steps", cid, day, (store.path(rel),), 0)


def test_missing_bucket_names_the_bucket(s3_bucket):
    store = Store("s3://no-such-bucket-here/traces")
    for call in (store.require, lambda: store.partitions("steps"), lambda: store.read_json("store.json")):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist; create it"):
            call()


def test_missing_store_in_existing_bucket(s3_bucket):
    with pytest.raises(StoreError, match="not a trace store"):
        Store(s3_bucket.uri("nothing-here")).require()


@pytest.mark.parametrize(
    "keys, problem",
    [
        (lambda key, secret: ("AKIAUNKNOWNKEY000000", secret), "access key id is not recognised"),
        (lambda key, secret: (key, "not-the-secret"), "signature was rejected"),
        (lambda key, secret: (key, secret), "access denied"),
    ],
    ids=["unknown-key", "wrong-secret", "no-permission"],
)
def test_credential_and_permission_errors(s3_bucket, s3_store, s3_iam, monkeypatch, keys, problem):
    key_id, secret = keys(*s3_iam())
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store = Store(s3_store.uri)
    with pytest.raises(StoreError, match=problem) as err:
        store.partitions("steps")
    with pytest.raises(StoreError, match=problem):
        store.scan(_partition(store, "steps/config_id=cfg-a/date=2024-03-01/part-0.parquet"))
    with pytest.raises(StoreError, match=problem):  # HEAD has no body, only a 403: the listing says why
        store.require()
    assert secret not in str(err.value) and "\n" not in str(err.value)


def test_local_store_still_works(tmp_path):
    store = Store(str(tmp_path / "local"))
    store.init()
    store.write_partition("steps", "cfg-a", "2024-03-01", _steps(2, seed=7))
    (part,) = store.partitions("steps")
    assert part.etags == () and store.scan(part)["step_id"].to_list() == [7, 8] and store.row_count(part) == 2


def test_concurrent_writers_of_one_local_object_never_tear_it(tmp_path):
    """Atomic replace: a reader sees one writer's bytes in full, never a mix or a prefix."""
    root = ObjectRoot(str(tmp_path))
    payloads = [bytes([65 + i]) * 200_000 for i in range(4)]
    stop = threading.Event()
    seen: set[bytes] = set()

    def reader() -> None:
        while not stop.is_set():
            blob = root.read("obj")
            if blob:
                seen.add(blob.data)

    t = threading.Thread(target=reader)
    t.start()
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda p: [root.write("obj", p) for _ in range(10)], payloads))
    stop.set()
    t.join()
    assert seen and seen <= set(payloads)


def _job_policy(bucket: str) -> str:
    """infra/iam-policy.json for this bucket, without its s3:prefix conditions (moto cannot evaluate them)."""
    text = (Path(__file__).resolve().parents[1] / "infra" / "iam-policy.json").read_text()
    for placeholder, value in {"TRACES_BUCKET": bucket, "TRACES_PREFIX": "traces/v1", "ARTIFACTS_BUCKET": bucket, "ARTIFACTS_PREFIX": "models"}.items():
        text = text.replace(placeholder, value)
    doc = json.loads(text)
    for statement in doc["Statement"]:
        statement.pop("Condition", None)
    return json.dumps(doc)


def test_shipped_iam_policy_is_enough_for_the_job_and_no_more(s3_bucket, s3_store, s3_iam, monkeypatch):
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="models/notes.txt", Body=b"not the job's")
    key_id, secret = s3_iam(_job_policy(s3_bucket.name))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    store, models = Store(s3_store.uri), s3_bucket.uri("models")
    store.require()
    parts = store.partitions("steps", config_ids=["cfg-a"])
    assert len(parts) == 3 and store.scan(parts[0])["step_id"].to_list() == [0, 1, 2]
    meta = ManifestMeta(git_commit="x", settings={}, data=data_fingerprint(store, parts))
    first = publish(models, {"schema_version": "rece/1", "n": 1}, meta)  # reads a missing latest, creates it
    second = publish(models, {"schema_version": "rece/1", "n": 2}, meta)
    assert second.previous == first.version and resolve(models)[0]["n"] == 2
    assert list_versions(models) == sorted([first.version, second.version])
    # ... and no more: nothing outside the two prefixes, no writes to the traces.
    with pytest.raises(StoreError, match="access denied"):
        store.write_partition("steps", "cfg-a", "2024-03-09", _steps(1, seed=0))
    with pytest.raises(StoreError, match="access denied"):
        publish(s3_bucket.uri("elsewhere"), {"schema_version": "rece/1"}, meta)
    # A 403 on one key: absent if the listing does not show it, denied if it does.
    objects = ObjectRoot(models)
    assert objects.read("not-there") is None and not objects.exists("not-there")
    with pytest.raises(StoreError, match="notes.txt: cannot read: access denied"):
        objects.read("notes.txt")


def test_s3_options_agree_on_endpoint_region_and_limits(monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "minio.local:9000")  # no scheme: https, as AWS tools assume
    monkeypatch.setenv("AWS_REGION", "eu-west-1")
    opts = S3Options.from_env()
    assert opts.endpoint == "https://minio.local:9000" and opts.describe() == "https://minio.local:9000"
    assert "allow_http" not in opts.polars() and opts.polars()["aws_region"] == "eu-west-1"
    local = S3Options(endpoint_url="http://user:pw@127.0.0.1:9000/some/path", max_attempts=2)
    assert local.endpoint == "http://127.0.0.1:9000"  # user info never reaches a client or a message
    assert local.polars() == {"aws_region": "us-east-1", "connect_timeout": "5000ms", "timeout": "30000ms",
                              "max_retries": 1, "aws_endpoint_url": "http://127.0.0.1:9000", "allow_http": "true"}
    assert S3Options().describe() == "AWS S3 (us-east-1)"


def test_missing_credentials_are_named(s3_bucket, s3_store, monkeypatch):
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to fall back to, quickly
    store = Store(s3_store.uri)
    part = _partition(store, "steps/config_id=cfg-a/date=2024-03-01/part-0.parquet")
    for call in (lambda: store.partitions("steps"), lambda: store.scan(part)):
        with pytest.raises(StoreError, match="no AWS credentials were found; set AWS_ACCESS_KEY_ID"):
            call()
