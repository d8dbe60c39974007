"""Publishing versions: local folders and the loopback S3 server, the same tests for both."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

import polars as pl
import pytest

from rece_dist.errors import ArtifactError, StoreError
from rece_dist.objstore import ObjectRoot
from rece_dist.publish import (
    ManifestMeta,
    canonical_json,
    data_fingerprint,
    library_versions,
    list_versions,
    publish,
    resolve,
)
from rece_dist.schema import STEP_COLUMNS
from rece_dist.store import Store

META = ManifestMeta(
    git_commit="0123abcd",
    settings={"quantiles": [0.1, 0.5, 0.9], "specialists": 4},
    data=[{"partition": "steps/config_id=a/date=2024-03-01", "files": 1, "size_bytes": 10, "etags": [], "rows": 3}],
    date_from="2024-03-01",
    date_to="2024-03-07",
    versions={"python": "3.11", "polars": "2.1.0"},
)


def _doc(tag: Any) -> dict[str, Any]:
    return {"schema_version": "rece/1", "specialists": [{"id": tag, "beta": [1.5, 2.0]}], "metrics": {"mape_p50": 0.07}}


@dataclass
class Root:
    """An artifact root and raw access to its objects that bypasses the code under test."""

    uri: str
    get: Callable[[str], bytes | None]
    put: Callable[[str, bytes], None]
    delete: Callable[[str], None]
    keys: Callable[[], set[str]]

    def json(self, rel: str) -> Any:
        return json.loads(self.get(rel) or b"null")


def _local_root(path: Path) -> Root:
    def get(rel: str) -> bytes | None:
        return (path / rel).read_bytes() if (path / rel).is_file() else None

    def put(rel: str, data: bytes) -> None:
        (path / rel).parent.mkdir(parents=True, exist_ok=True)
        (path / rel).write_bytes(data)

    def keys() -> set[str]:
        return {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")}

    return Root(str(path), get, put, lambda rel: (path / rel).unlink(), keys)


def _s3_root(bucket: Any, prefix: str) -> Root:
    def get(rel: str) -> bytes | None:
        try:
            return bucket.client.get_object(Bucket=bucket.name, Key=f"{prefix}/{rel}")["Body"].read()
        except bucket.client.exceptions.NoSuchKey:
            return None

    def put(rel: str, data: bytes) -> None:
        bucket.client.put_object(Bucket=bucket.name, Key=f"{prefix}/{rel}", Body=data)

    def keys() -> set[str]:
        return {k[len(prefix) + 1:] for k in bucket.objects() if k.startswith(f"{prefix}/")}

    return Root(bucket.uri(prefix), get, put, lambda rel: bucket.client.delete_object(Bucket=bucket.name, Key=f"{prefix}/{rel}"), keys)


@pytest.fixture(params=["local", "s3"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Root:
    if request.param == "local":
        return _local_root(tmp_path / "models")
    return _s3_root(request.getfixturevalue("s3_bucket"), "models")


def _chain(root: Root) -> list[str]:
    """Versions from latest back through previous links (raw reads)."""
    out, version = [], root.json("latest")["version"]
    while version is not None:
        out.append(version)
        version = root.json(f"artifacts/{version}/manifest.json")["previous"]
    return out


def test_publish_writes_a_verified_content_addressed_version(root):
    doc = _doc("a")
    pv = publish(root.uri, doc, META)
    body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    sha = hashlib.sha256(body).hexdigest()
    assert (pv.version, pv.sha256, pv.previous) == (f"v-{sha[:16]}", sha, None)
    assert pv.uri == f"{root.uri}/artifacts/{pv.version}"
    assert root.keys() == {"latest", f"artifacts/{pv.version}/artifact.json", f"artifacts/{pv.version}/manifest.json"}
    assert root.get(f"artifacts/{pv.version}/artifact.json") == body
    assert root.json("latest") == {"version": pv.version, "sha256": sha}

    got, manifest = resolve(root.uri)
    assert got == doc
    assert manifest == root.json(f"artifacts/{pv.version}/manifest.json")
    assert manifest["artifact_sha256"] == sha and manifest["schema_version"] == "rece/1"
    assert manifest["git_commit"] == "0123abcd"
    assert manifest["settings_sha256"] == hashlib.sha256(canonical_json(META.settings)).hexdigest()
    assert manifest["data"]["partitions"] == META.data and len(manifest["data"]["sha256"]) == 64
    assert manifest["date_window"] == {"from": "2024-03-01", "to": "2024-03-07"}
    assert manifest["versions"] == {"python": "3.11", "polars": "2.1.0"}
    assert manifest["metrics"] == {"mape_p50": 0.07} and manifest["previous"] is None
    datetime.fromisoformat(manifest["created_at"])
    assert resolve(root.uri, pv.version) == (got, manifest)
    assert list_versions(root.uri) == [pv.version]


def test_same_content_is_the_same_version_and_a_no_op(root):
    first = publish(root.uri, _doc("a"), META)
    before = {k: root.get(k) for k in root.keys()}
    reordered = dict(reversed(list(_doc("a").items())))
    again = publish(root.uri, reordered, ManifestMeta(git_commit="other", settings={}, data=[]))
    assert again == first
    assert {k: root.get(k) for k in root.keys()} == before  # nothing rewritten, not even created_at


def test_versions_chain_and_old_versions_stay_resolvable(root):
    a = publish(root.uri, _doc("a"), META)
    b = publish(root.uri, _doc("b"), META)
    assert b.previous == a.version and _chain(root) == [b.version, a.version]
    assert resolve(root.uri, a.version)[0] == _doc("a")
    assert list_versions(root.uri) == sorted([a.version, b.version])
    # Publishing A's content again moves latest back to A; A's manifest (part of history) is not rewritten.
    manifest_a = root.get(f"artifacts/{a.version}/manifest.json")
    assert publish(root.uri, _doc("a"), META) == a
    assert root.json("latest")["version"] == a.version
    assert root.get(f"artifacts/{a.version}/manifest.json") == manifest_a


def test_compare_and_swap_has_exactly_one_winner_per_round(root):
    objects = ObjectRoot(root.uri)
    expected = None  # first round creates the object (IfNoneMatch="*" on S3)
    for rnd in range(12):
        barrier = threading.Barrier(4)
        wins: list[int] = []

        def contend(i: int) -> None:
            barrier.wait()
            if objects.put_if("cas", f"{rnd}:{i}".encode(), expected):
                wins.append(i)

        threads = [threading.Thread(target=contend, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(wins) == 1, f"round {rnd}: winners {wins}"
        current = objects.read("cas")
        assert current is not None and current.data == f"{rnd}:{wins[0]}".encode()
        expected = current.etag


def test_concurrent_publishers_never_lose_an_update(root):
    rounds, barrier = 5, threading.Barrier(2)
    results: dict[int, list] = {0: [], 1: []}

    def publisher(i: int) -> None:
        for r in range(rounds):
            barrier.wait()
            results[i].append(publish(root.uri, _doc(f"{i}-{r}"), META))

    threads = [threading.Thread(target=publisher, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    published = [pv for i in (0, 1) for pv in results[i]]
    chain = _chain(root)
    assert sorted(chain) == sorted(pv.version for pv in published)  # every version reachable, once
    for pv in published:  # what each publisher was told matches the persisted history
        assert root.json(f"artifacts/{pv.version}/manifest.json")["previous"] == pv.previous
    assert resolve(root.uri)[1]["version"] == chain[0]


@pytest.mark.parametrize(
    "tamper, message",
    [
        (lambda r, v: r.put(f"artifacts/{v}/artifact.json", r.get(f"artifacts/{v}/artifact.json")[:-7]), "not valid JSON.*truncated"),
        (lambda r, v: r.put(f"artifacts/{v}/artifact.json", canonical_json(_doc("forged"))), "sha256"),
        (lambda r, v: r.put(f"artifacts/{v}/manifest.json", json.dumps({**r.json(f"artifacts/{v}/manifest.json"), "artifact_sha256": "0" * 64}).encode()), "manifest.json records 0000"),
        (lambda r, v: r.delete(f"artifacts/{v}/manifest.json"), "manifest.json: missing"),
        (lambda r, v: r.put("latest", b'{"version": "' + v.encode() + b'", "sha'), "latest: not valid JSON"),
    ],
    ids=["truncated-artifact", "swapped-artifact", "manifest-digest", "missing-manifest", "truncated-latest"],
)
def test_resolve_refuses_damaged_versions(root, tamper, message):
    version = publish(root.uri, _doc("a"), META).version
    tamper(root, version)
    with pytest.raises(ArtifactError, match=message) as err:
        resolve(root.uri)
    assert "\n" not in str(err.value)


def test_resolve_bad_references(root):
    with pytest.raises(ArtifactError, match="nothing published yet"):
        resolve(root.uri)
    with pytest.raises(ArtifactError, match="is not a version"):
        resolve(root.uri, "../../etc/passwd")
    with pytest.raises(ArtifactError, match="missing"):
        resolve(root.uri, "v-0123456789abcdef")


def test_latest_never_moves_to_a_bad_version(root):
    good = publish(root.uri, _doc("good"), META)
    bad_version = "v-" + hashlib.sha256(canonical_json(_doc("bad"))).hexdigest()[:16]
    half = canonical_json(_doc("bad"))[:20]  # a half-uploaded object already sits at the version's path
    root.put(f"artifacts/{bad_version}/artifact.json", half)
    with pytest.raises(ArtifactError, match="already exists with different content"):
        publish(root.uri, _doc("bad"), META)
    with pytest.raises(ArtifactError, match="not plain JSON"):
        publish(root.uri, {"schema_version": "rece/1", "beta": float("nan")}, META)
    with pytest.raises(ArtifactError, match="no schema_version"):
        publish(root.uri, {"beta": 1.0}, META)
    written = root.keys()
    with pytest.raises(ArtifactError, match="training settings is not plain JSON"):
        publish(root.uri, _doc("other"), ManifestMeta(git_commit="x", settings={"seeds": {1, 2}}, data=[]))
    assert root.keys() == written  # refused before anything was written
    assert root.json("latest")["version"] == good.version
    assert resolve(root.uri)[0] == _doc("good")
    assert list_versions(root.uri) == [good.version]


def test_interrupted_publish_is_completed_and_rechained(root, tmp_path):
    a = publish(root.uri, _doc("a"), META)
    # A publish of B elsewhere, copied in without moving latest: B's manifest says previous=None (stale).
    elsewhere = _local_root(tmp_path / "elsewhere")
    b = publish(elsewhere.uri, _doc("b"), META)
    for name in ("artifact.json", "manifest.json"):
        root.put(f"artifacts/{b.version}/{name}", elsewhere.get(f"artifacts/{b.version}/{name}"))
    assert root.json("latest")["version"] == a.version
    again = publish(root.uri, _doc("b"), META)
    assert again.previous == a.version and _chain(root) == [b.version, a.version]
    # Only the artifact made it (crash before the manifest): the version is not listed, and not resolvable.
    c_version = "v-" + hashlib.sha256(canonical_json(_doc("c"))).hexdigest()[:16]
    root.put(f"artifacts/{c_version}/artifact.json", canonical_json(_doc("c")))
    assert c_version not in list_versions(root.uri)
    with pytest.raises(ArtifactError, match="incomplete"):
        resolve(root.uri, c_version)
    assert publish(root.uri, _doc("c"), META).previous == b.version


def _steps(n: int) -> pl.DataFrame:
    cols = {c.name: list(range(n)) for c in STEP_COLUMNS}
    cols["kv_usage_gpu_ratio"] = [0.5] * n
    return pl.DataFrame(cols)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_data_fingerprint(where, request, tmp_path):
    bucket = request.getfixturevalue("s3_bucket") if where == "s3" else None
    store = Store(bucket.uri("traces") if bucket else str(tmp_path / "traces"))
    for day, n in (("2024-03-02", 5), ("2024-03-01", 3)):
        store.write_partition("steps", "cfg", day, _steps(n))
    fp = data_fingerprint(store, store.partitions("steps"))
    assert [(e["partition"], e["rows"], e["files"]) for e in fp] == [
        ("steps/config_id=cfg/date=2024-03-01", 3, 1),
        ("steps/config_id=cfg/date=2024-03-02", 5, 1),
    ]
    for entry in fp:
        key = f"traces/{entry['partition']}/part-0.parquet"
        if bucket:
            head = bucket.client.head_object(Bucket=bucket.name, Key=key)
            assert entry["etags"] == [head["ETag"]] and entry["size_bytes"] == head["ContentLength"]
        else:
            assert entry["etags"] == [] and entry["size_bytes"] == os.path.getsize(tmp_path / key)


def test_library_versions_are_recorded_by_default():
    versions = ManifestMeta(git_commit="x", settings={}, data=[]).versions
    assert versions == library_versions() and {"python", "polars", "pyarrow"} <= set(versions)


KEY_ID, SECRET = "AKIACANARY7Q3X9Z2W1V", "canary/Secret+Value/9f8e7d6c5b4a39281706"


@pytest.fixture
def canary_keys(s3_bucket, monkeypatch, capfd, caplog) -> Callable[[list[str]], None]:
    """Distinctive keys in the environment; the returned check fails if they show up in any text given
    to it, in captured output or logs (INFO and up, as a job runs), or in any object in the bucket."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    caplog.set_level(logging.INFO)

    def check(texts: list[str], objects: list[bytes]) -> None:
        out, err = capfd.readouterr()
        haystacks = [*texts, out, err, caplog.text, *(o.decode(errors="replace") for o in objects)]
        for secret in (KEY_ID, SECRET):
            assert not [h for h in haystacks if secret in h]

    return check


def test_credentials_stay_out_of_objects_and_logs(s3_bucket, canary_keys):
    store = Store(s3_bucket.uri("traces"))
    store.write_partition("steps", "cfg", "2024-03-01", _steps(3))
    meta = ManifestMeta(git_commit="x", settings={"store": store.uri}, data=data_fingerprint(store, store.partitions("steps")))
    pv = publish(s3_bucket.uri("models"), _doc("a"), meta)
    canary_keys([repr(pv)], list(s3_bucket.objects().values()))


def test_credentials_stay_out_of_errors(request, s3_bucket, canary_keys, monkeypatch):
    store = Store(s3_bucket.uri("traces"))
    store.write_partition("steps", "cfg", "2024-03-01", _steps(3))
    (part,) = store.partitions("steps")
    models = s3_bucket.uri("models")
    errors = []
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
        with pytest.raises(StoreError) as err:
            publish(models, _doc("b"), META)
        errors.append(str(err.value))
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_bucket.endpoint)
    request.getfixturevalue("s3_iam")()  # from now on the server checks keys, and ours are unknown to it
    for call in (lambda: publish(models, _doc("c"), META), lambda: resolve(models), lambda: Store(store.uri).scan(part)):
        with pytest.raises(StoreError, match="access key id is not recognised") as err:
            call()
        errors.append(str(err.value))
    canary_keys(errors, [])
