"""Publishing artifacts as immutable, content-addressed versions behind a ``latest`` pointer.

Layout under an artifact root (a local folder or ``s3://bucket/prefix``)::

    ROOT/artifacts/<version>/artifact.json   canonical JSON; <version> = "v-" + first 16 hex of its sha256
    ROOT/artifacts/<version>/manifest.json   provenance: digest, commit, settings hash, data fingerprint, ...
    ROOT/latest                              {"version", "sha256"}, moved last and only by compare-and-swap

Why this order: ``latest`` moves only after both objects were written and read back intact,
so a reader that follows it never reaches a partial or corrupt version; a crash mid-publish
leaves an unreferenced folder, never a bad pointer. The swap is conditional (S3 ``IfMatch`` /
``IfNoneMatch``, a file lock locally), so of two concurrent publishers exactly one moves the
pointer per round and the other re-reads it and chains its ``previous`` to the winner.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from . import artifact
from .artifact import canonical_json, library_versions
from .errors import ArtifactError
from .objstore import Blob, ObjectRoot, S3Options
from .store import Partition, Store

log = logging.getLogger(__name__)

MANIFEST_FORMAT = 1
LATEST = "latest"
_VERSION_RE = re.compile(r"v-[0-9a-f]{16}")
_MAX_SWAPS = 32


@dataclass(frozen=True)
class ManifestMeta:
    """What the caller knows about the run that produced an artifact."""

    git_commit: str
    settings: Mapping[str, Any]  # training settings; only their sha256 is recorded
    data: Sequence[Mapping[str, Any]]  # from data_fingerprint()
    date_from: str | None = None
    date_to: str | None = None
    versions: Mapping[str, str] = field(default_factory=library_versions)
    feature_reads: Mapping[str, int] | None = None  # rows from raw traces vs the feature cache (featurecache.py)


@dataclass(frozen=True)
class PublishedVersion:
    version: str
    uri: str  # the version's folder
    sha256: str  # of artifact.json's bytes
    previous: str | None  # the version ``latest`` named before this one (from the manifest)


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def data_fingerprint(store: Store, partitions: Iterable[Partition]) -> list[dict[str, Any]]:
    """One entry per input partition: enough to tell whether a rerun would see the same data.

    Sizes and (on S3) ETags come from the listing; row counts from Parquet footers only.
    """
    parts = sorted(partitions, key=lambda p: p.key)
    with ThreadPoolExecutor(max_workers=16) as pool:
        rows = list(pool.map(store.row_count, parts))
    return [
        {"partition": p.key, "files": len(p.files), "size_bytes": p.size_bytes, "etags": list(p.etags), "rows": n}
        for p, n in zip(parts, rows)
    ]


def publish(root: str, artifact_doc: Mapping[str, Any], meta: ManifestMeta, *, s3: S3Options | None = None,
            companions: Mapping[str, bytes] | None = None) -> PublishedVersion:
    """Publish ``artifact_doc`` under ``root`` and make it ``latest``; identical content is a no-op.

    ``companions`` are files derived deterministically from the artifact (golden vectors):
    written into the version folder before the manifest, which records their sha256.
    """
    if "schema_version" not in artifact_doc:
        raise ArtifactError("the artifact document has no schema_version")
    objects = ObjectRoot(root, s3)
    body = canonical_json(artifact_doc, "artifact document")
    sha = sha256_hex(body)
    version = f"v-{sha[:16]}"
    folder = f"artifacts/{version}"
    extra = dict(companions or {})
    if {"artifact.json", "manifest.json"} & set(extra):
        raise ArtifactError("companion files cannot be named artifact.json or manifest.json")
    # fails on bad metadata before anything is written
    provenance = _provenance(version, sha, artifact_doc, meta, {n: sha256_hex(d) for n, d in sorted(extra.items())})
    _put_immutable(objects, f"{folder}/artifact.json", body)
    for name, data in sorted(extra.items()):
        _put_immutable(objects, f"{folder}/{name}", data)

    for _ in range(_MAX_SWAPS):
        pointer = objects.read(LATEST)
        current = (_pointer(objects, pointer) or {}).get("version")
        if current == version:
            _, manifest = _load(objects, version)
            return PublishedVersion(version, objects.uri_of(folder), sha, manifest["previous"])
        manifest = _read_manifest(objects, version)
        if manifest is None or manifest.get("artifact_sha256") != sha or not _in_history(objects, current, version):
            # Not yet reachable from latest: (re)write it so that its previous names what we replace.
            manifest = {**provenance, "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "previous": current}
            objects.write(f"{folder}/manifest.json", canonical_json(manifest, "manifest"))
        _load(objects, version)  # read both back; raises before the pointer can move
        new_pointer = canonical_json({"version": version, "sha256": sha})
        if objects.put_if(LATEST, new_pointer, pointer.etag if pointer else None):
            log.info("published %s (previous %s)", objects.uri_of(folder), manifest["previous"])
            return PublishedVersion(version, objects.uri_of(folder), sha, manifest["previous"])
        time.sleep(random.uniform(0.005, 0.05))  # another publisher won this round; re-read and chain
    raise ArtifactError(f"{objects.uri_of(LATEST)}: gave up after {_MAX_SWAPS} concurrent updates; publish again")


def resolve(root: str, ref: str = LATEST, *, s3: S3Options | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The artifact and manifest that ``ref`` (``"latest"`` or a version) names, digest-verified."""
    objects = ObjectRoot(root, s3)
    if ref == LATEST:
        pointer = _pointer(objects, objects.read(LATEST))
        if pointer is None:
            raise ArtifactError(f"{objects.uri_of(LATEST)}: nothing published yet")
        doc, manifest = _load(objects, pointer["version"])
        if pointer["sha256"] != manifest["artifact_sha256"]:
            raise ArtifactError(f"{objects.uri_of(LATEST)}: its sha256 does not match {pointer['version']}'s manifest")
        return doc, manifest
    if not _VERSION_RE.fullmatch(ref):
        raise ArtifactError(f"{ref!r} is not a version (expected 'latest' or v- and 16 hex digits)")
    return _load(objects, ref)


def load_artifact(ref: str, *, s3: S3Options | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """What a user names on the command line: an ``artifact.json`` file (local), a folder holding
    one, an artifact root (its ``latest``), or ``ROOT@v-...`` (that version). Returns the
    document and, for published versions, the verified manifest."""
    root, _, version = ref.partition("@")
    if not ref.startswith("s3://") and not version:
        if os.path.isfile(ref):
            return artifact.load(ref), None
        folder = os.path.normpath(ref)
        if os.path.isfile(os.path.join(folder, "manifest.json")):  # a version folder: ROOT/artifacts/v-...
            return resolve(os.path.dirname(os.path.dirname(folder)), os.path.basename(folder), s3=s3)
        if os.path.isfile(os.path.join(folder, "artifact.json")):
            return artifact.load(os.path.join(folder, "artifact.json")), None
    return resolve(root, version or LATEST, s3=s3)


def list_versions(root: str, *, s3: S3Options | None = None) -> list[str]:
    """Complete versions (artifact and manifest present) under ``root``, sorted by name."""
    objects = ObjectRoot(root, s3)
    names: dict[str, set[str]] = {}
    for obj in objects.list("artifacts"):
        parts = obj.key.split("/")
        if len(parts) == 3 and _VERSION_RE.fullmatch(parts[1]):
            names.setdefault(parts[1], set()).add(parts[2])
    return sorted(v for v, files in names.items() if {"artifact.json", "manifest.json"} <= files)


# --- internals -------------------------------------------------------------------------------
def _provenance(version: str, sha: str, doc: Mapping[str, Any], meta: ManifestMeta,
                companions: Mapping[str, str]) -> dict[str, Any]:
    """The manifest minus ``created_at`` and ``previous``, which each publish attempt sets."""
    data = [dict(d) for d in meta.data]
    return {
        "manifest_format": MANIFEST_FORMAT,
        "version": version,
        "schema_version": doc["schema_version"],
        "artifact_sha256": sha,
        "git_commit": meta.git_commit,
        "settings_sha256": sha256_hex(canonical_json(meta.settings, "training settings")),
        "data": {"sha256": sha256_hex(canonical_json(data, "data fingerprint")), "partitions": data},
        "date_window": {"from": meta.date_from, "to": meta.date_to},
        "feature_reads": None if meta.feature_reads is None else dict(meta.feature_reads),
        "versions": dict(meta.versions),
        "metrics": doc.get("metrics"),
        "companions": dict(companions),
    }


def _put_immutable(objects: ObjectRoot, rel: str, body: bytes) -> None:
    """Create ``rel`` once; an existing object must already hold exactly these bytes."""
    if objects.put_if(rel, body, None):
        return
    existing = objects.read(rel)
    if existing is None or existing.data != body:
        raise ArtifactError(
            f"{objects.uri_of(rel)}: already exists with different content (corrupt or partial upload); "
            "delete that version folder and publish again"
        )


def _parse(objects: ObjectRoot, rel: str, data: bytes) -> Any:
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, UnicodeDecodeError):
        raise ArtifactError(f"{objects.uri_of(rel)}: not valid JSON ({len(data)} bytes; truncated or half-uploaded?)") from None


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _pointer(objects: ObjectRoot, blob: Blob | None) -> dict[str, str] | None:
    """The parsed ``latest`` document (None if nothing is published yet)."""
    if blob is None:
        return None
    doc = _parse(objects, LATEST, blob.data)
    if not isinstance(doc, dict) or not _VERSION_RE.fullmatch(str(doc.get("version"))) or "sha256" not in doc:
        raise ArtifactError(f"{objects.uri_of(LATEST)}: not a version pointer; restore it from a manifest or delete it")
    return doc


def _read_manifest(objects: ObjectRoot, version: str) -> dict[str, Any] | None:
    """A version's manifest, or None when it is missing or unreadable (callers decide what that means)."""
    rel = f"artifacts/{version}/manifest.json"
    blob = objects.read(rel)
    try:
        manifest = _parse(objects, rel, blob.data) if blob else None
    except ArtifactError:
        return None
    return manifest if isinstance(manifest, dict) else None


def _in_history(objects: ObjectRoot, start: str | None, version: str) -> bool:
    """Whether ``version`` is reachable from ``start`` through ``previous`` links.

    Such a manifest is part of the published history and is never rewritten (rewriting its
    ``previous`` would make a cycle); re-publishing it only moves the pointer back to it.
    """
    seen: set[str] = set()
    while start is not None and start not in seen:
        if start == version:
            return True
        seen.add(start)
        start = (_read_manifest(objects, start) or {}).get("previous")
    return False


def _load(objects: ObjectRoot, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a version's two objects and check them against each other and the version name."""
    folder = f"artifacts/{version}"
    blobs = {name: objects.read(f"{folder}/{name}") for name in ("artifact.json", "manifest.json")}
    for name, blob in blobs.items():
        if blob is None:
            raise ArtifactError(f"{objects.uri_of(f'{folder}/{name}')}: missing; {version} is incomplete (publish interrupted?)")
    artifact_bytes = blobs["artifact.json"].data  # type: ignore[union-attr]
    doc = _parse(objects, f"{folder}/artifact.json", artifact_bytes)
    manifest = _parse(objects, f"{folder}/manifest.json", blobs["manifest.json"].data)  # type: ignore[union-attr]
    sha = sha256_hex(artifact_bytes)
    if not isinstance(manifest, dict) or manifest.get("artifact_sha256") != sha:
        raise ArtifactError(f"{objects.uri_of(folder)}: artifact.json has sha256 {sha[:16]}... but manifest.json "
                            f"records {str(manifest.get('artifact_sha256') if isinstance(manifest, dict) else None)[:16]}...")
    if f"v-{sha[:16]}" != version:
        raise ArtifactError(f"{objects.uri_of(folder)}: content hashes to v-{sha[:16]}, not {version}")
    if not isinstance(doc, dict) or doc.get("schema_version") != manifest.get("schema_version"):
        raise ArtifactError(f"{objects.uri_of(folder)}: artifact and manifest disagree on schema_version")
    return doc, manifest
