"""Per-partition feature cache under an artifact root, so a nightly run over a rolling window
featurizes only the days it has not seen.

Layout (next to the published versions, local folder or ``s3://``)::

    ROOT/features/<code>/config_id=<id>/date=YYYY-MM-DD/<key>.features

``<code>`` is :func:`code_version`; ``<key>`` hashes everything the featurized result of one
(configuration, date) shard depends on:

- the partitions' identity: on S3 each file's ETag (the service's content token, free with the
  listing) and the partition's size; locally each file's path, size and ``mtime_ns`` (the quick
  check make and rsync use: a ``stat``, whereas a content hash would read every byte of the
  window each night, the very reading the cache exists to avoid; store files are only ever
  replaced by temp + rename, which sets a new mtime);
- the feature code: a hash of the source of ``features.py``, ``schema.py``, ``config.py`` and
  the shard reader, plus the Polars and NumPy versions. Derived from the code rather than a
  hand-bumped constant, so no edit can forget to invalidate; the price of a false
  invalidation (a comment edit) is one cold night;
- the configuration document and the featurize settings (``holdout_every``; the seed is not
  used before the fits, so it is not part of the key).

An entry is written in one piece (temp + rename locally, one PUT on S3) and carries the sha256
of its payload: a truncated or corrupt entry fails the check, is reported in one line and is
recomputed (and rewritten), never used.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import polars as pl
import pyarrow as pa

from . import config, features, schema
from .config import DeploymentConfig
from .objstore import ObjectRoot, S3Options
from .progress import log
from .store import Partition

PREFIX = "features"
_MAGIC = b"RECE-FEATURES 1\n"
T = TypeVar("T")
_ARRAYS = ("X", "y", "holdout")  # the Shard's per-target arrays
_NAMES = ("config_id", "date")


def code_version(*readers: Callable[..., Any]) -> str:
    """sha256 of the feature code's source (the modules and the given reader functions) and of
    the libraries that compute it: cached features are valid exactly while this is unchanged."""
    h = hashlib.sha256()
    for src in [inspect.getsource(m) for m in (features, schema, config)] + [inspect.getsource(f) for f in readers]:
        h.update(hashlib.sha256(src.encode()).digest())
    h.update(f"polars {pl.__version__} numpy {np.__version__}".encode())
    return h.hexdigest()


def partition_identity(part: Partition | None) -> Any:
    """What tells one version of a partition's files from another without reading them."""
    if part is None:
        return None
    if part.etags:  # S3: the listing's ETags name the content
        return {"key": part.key, "size": part.size_bytes,
                "files": [[f.rsplit("/", 1)[-1], e] for f, e in zip(part.files, part.etags)]}
    stats = [(f, os.stat(f)) for f in part.files]
    return {"key": part.key, "files": [[f, st.st_size, st.st_mtime_ns] for f, st in stats]}


@dataclass(frozen=True)
class CacheEntry:
    """One shard's entry: where it lives and what it must contain (shipped to the featurize task)."""

    objects: ObjectRoot
    rel: str
    key: str

    @property
    def uri(self) -> str:
        return self.objects.uri_of(self.rel)

    def load(self) -> dict[str, Any] | None:
        """The cached Shard's fields (``config_id``, ``date``, and ``X``, ``y``, ``holdout`` by
        target), or None on a miss or a damaged entry (reported; the caller recomputes it)."""
        blob = self.objects.read(self.rel)
        if blob is None:
            return None
        arrays = _decode(blob.data, self.key)
        if isinstance(arrays, str):
            log(f"[rece] feature cache: {self.uri}: {arrays}; recomputing")
            return None
        return arrays

    def save(self, shard: Any) -> None:
        self.objects.write(self.rel, encode(self.key, shard))


def through_cache(entry: CacheEntry | None, build: Callable[..., T], compute: Callable[[], T]) -> tuple[T, bool]:
    """``build(**fields)`` from a valid entry, else ``compute()`` (stored in the entry): the value
    and whether it came from the cache."""
    fields = entry.load() if entry else None
    if fields is not None:
        return build(**fields), True
    value = compute()
    if entry:
        entry.save(value)
    return value, False


class FeatureCache:
    """The cache below one artifact root, for one code version and featurize setting."""

    def __init__(self, root: str, holdout_every: int, readers: tuple[Callable[..., Any], ...] = (),
                 s3: S3Options | None = None):
        self.objects = ObjectRoot(root, s3)
        self.code = code_version(*readers)
        self.holdout_every = holdout_every

    def entry(self, cfg: DeploymentConfig, steps: Partition | None, requests: Partition | None) -> CacheEntry:
        part = steps or requests
        assert part is not None
        ident = {"code": self.code, "holdout_every": self.holdout_every, "config": cfg.to_dict(),
                 "steps": partition_identity(steps), "requests": partition_identity(requests)}
        key = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
        rel = f"{PREFIX}/{self.code[:16]}/config_id={part.config_id}/date={part.date}/{key[:32]}.features"
        return CacheEntry(self.objects, rel, key)


def read_counts(stats: Sequence[Any]) -> dict[str, int]:
    """Rows and shards featurized from raw traces vs loaded from the cache (``stats``: the
    shards.ShardStats, whose ``rows`` count alpha + beta rows)."""
    cached = [st for st in stats if st.cached]
    return {"raw_rows": sum(st.rows for st in stats) - sum(st.rows for st in cached),
            "cached_rows": sum(st.rows for st in cached),
            "raw_shards": len(stats) - len(cached), "cached_shards": len(cached)}


def encode(key: str, shard: Any) -> bytes:
    """Magic line; sha256 of the body and the payload's size; body (the zstd-compressed ``.npz``
    of the key, the shard's names and every array: NumPy's format round-trips dtypes and bits
    exactly, with no pickle; zstd makes an entry ~1/5 of its float64 size)."""
    buf = io.BytesIO()
    named = {f"{field}/{t}": a for field in _ARRAYS for t, a in getattr(shard, field).items()}
    np.savez(buf, key=np.array(key), **{n: np.array(getattr(shard, n)) for n in _NAMES}, **named)
    payload = buf.getvalue()
    body = pa.compress(payload, codec="zstd", asbytes=True)
    return _MAGIC + f"{hashlib.sha256(body).hexdigest()} {len(payload)}\n".encode() + body


def _decode(data: bytes, key: str) -> dict[str, Any] | str:
    """The shard's fields, or what is wrong with the entry."""
    head, _, body = data[len(_MAGIC):].partition(b"\n")
    digest, _, size = head.decode("ascii", "replace").partition(" ")
    if not data.startswith(_MAGIC) or not size.isdigit():
        return f"not a feature cache entry ({len(data)} bytes)"
    if hashlib.sha256(body).hexdigest() != digest:
        return f"digest mismatch ({len(data)} bytes; truncated or corrupt)"
    with np.load(io.BytesIO(pa.decompress(body, int(size), codec="zstd", asbytes=True)), allow_pickle=False) as z:
        if str(z["key"]) != key:
            return "holds another shard's features"
        out: dict[str, Any] = {f: {} for f in _ARRAYS} | {n: str(z[n]) for n in _NAMES}
        for name in z.files:
            field, _, target = name.partition("/")
            if target:
                out[field][target] = z[name]
    return out
