"""Trace stores: a local folder or an ``s3://bucket/prefix``, laid out as Hive partitions.

Layout (the same on disk and in object storage)::

    STORE/store.json                                   format marker
    STORE/configs/<config_id>.json                     resolved configuration documents
    STORE/steps/config_id=<id>/date=YYYY-MM-DD/*.parquet
    STORE/requests/config_id=<id>/date=YYYY-MM-DD/*.parquet

A job lists partitions (pruning by configuration and date from the keys alone, before it
opens any file), then hands each partition to a Ray task that scans only the columns it
needs. Listing, small reads and writes go through :class:`ObjectRoot` (boto3 on S3, with
pagination and ETags); Parquet footers are read with PyArrow's filesystem and data with
Polars lazy scans, both configured from the same :class:`S3Options`.
"""

from __future__ import annotations

import io
import json
import re
from dataclasses import dataclass
from datetime import date as Date
from typing import Any, Iterable

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import Catalog, DeploymentConfig
from .errors import ConfigError, SchemaError, StoreError
from .objstore import ObjectInfo, ObjectRoot, S3Options
from .schema import TABLES, check_columns, check_values, conform

__all__ = ["Partition", "S3Options", "Store", "STORE_FORMAT"]

STORE_FORMAT = 1
_PART_RE = re.compile(r"config_id=([^/]+)/date=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class Partition:
    """One (table, configuration, date) folder and its Parquet files.

    ``etags`` (S3 only, aligned with ``files``) come free with the listing and let a manifest
    fingerprint the exact input without reading it.
    """

    table: str
    config_id: str
    date: str
    files: tuple[str, ...]
    size_bytes: int
    etags: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.table}/config_id={self.config_id}/date={self.date}"


class Store:
    """A trace store at a local path or ``s3://`` URI."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.objects = ObjectRoot(uri, s3)
        self.uri = self.objects.uri
        self.is_s3 = self.objects.is_s3
        self.s3 = self.objects.s3
        self.root = self.objects.fs_root

    # --- paths -----------------------------------------------------------------------------
    @property
    def fs(self) -> pafs.FileSystem:
        return self.objects.fs

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def file_uri(self, path: str) -> str:
        """What Polars is given to scan ``path`` (an fs path) with."""
        return f"s3://{path}" if self.is_s3 else path

    def _rel(self, path: str) -> str:
        return path[len(self.root) + 1:]

    @property
    def storage_options(self) -> dict[str, Any] | None:
        return self.s3.polars() if self.s3 else None

    # --- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.objects.exists("store.json")

    def require(self) -> None:
        if not self.exists():
            raise StoreError(f"{self.uri}: not a trace store (no store.json); create one with `rece synth --out {self.uri}`")

    def read_json(self, rel: str) -> Any:
        where = self.file_uri(self.path(rel))
        blob = self.objects.read(rel)
        if blob is None:
            raise StoreError(f"{where}: not found")
        try:
            return json.loads(blob.data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise StoreError(f"{where}: not valid JSON ({exc})") from None

    def configs(self, catalog: Catalog | None = None) -> dict[str, DeploymentConfig]:
        """Every configuration document in the store, checked against its own id."""
        self.require()
        catalog = catalog or Catalog.default()
        out: dict[str, DeploymentConfig] = {}
        for obj in self.objects.list("configs"):
            if not obj.key.endswith(".json"):
                continue
            doc = self.read_json(obj.key)
            where = self.file_uri(self.path(obj.key))
            cfg = catalog.resolve(doc, where)
            stem = obj.key.rsplit("/", 1)[-1][: -len(".json")]
            if stem != cfg.config_id:
                raise ConfigError(f"{where}: file name says {stem} but the content hashes to {cfg.config_id}")
            out[cfg.config_id] = cfg
        return out

    def partitions(
        self,
        table: str,
        config_ids: Iterable[str] | None = None,
        date_from: str | None = None,
        date_to: str | None = None,
    ) -> list[Partition]:
        """Partitions of ``table`` pruned by configuration and inclusive date window.

        Only keys are listed (per configuration prefix when ``config_ids`` is given); no file is opened.
        """
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        lo, hi = _parse_date(date_from, "date_from"), _parse_date(date_to, "date_to")
        prefixes = [table] if config_ids is None else [f"{table}/config_id={cid}" for cid in sorted(set(config_ids))]
        groups: dict[tuple[str, str], list[ObjectInfo]] = {}
        for prefix in prefixes:
            for obj in self.objects.list(prefix):
                if not obj.key.endswith(".parquet"):
                    continue
                m = _PART_RE.search(obj.key.rsplit("/", 1)[0])
                if not m:
                    continue
                cid, day = m.group(1), m.group(2)
                if (lo and day < lo) or (hi and day > hi):
                    continue
                groups.setdefault((cid, day), []).append(obj)
        return [
            Partition(
                table, cid, day,
                files=tuple(self.path(o.key) for o in sorted(objs)),
                size_bytes=sum(o.size for o in objs),
                etags=tuple(o.etag for o in sorted(objs) if o.etag is not None),
            )
            for (cid, day), objs in sorted(groups.items())
        ]

    def scan(self, part: Partition, columns: list[str] | None = None) -> pl.DataFrame:
        """Read one partition (only ``columns``), checking schema and values; name the file at fault."""
        frames = []
        for path in part.files:
            where = self.file_uri(path)
            try:
                lf = pl.scan_parquet(where, storage_options=self.storage_options)
                schema = dict(lf.collect_schema())
                check_columns(schema, part.table, where, columns)
                df = lf.select(columns or [c.name for c in TABLES[part.table]]).collect()
            except OSError as exc:  # storage: missing object, denied, unreachable
                raise self.objects.error(self._rel(path), "read Parquet", exc) from None
            except pl.exceptions.PolarsError as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SchemaError(f"{where}: cannot read Parquet ({msg})") from None
            check_values(df, part.table, where)
            frames.append(df)
        df = pl.concat(frames) if len(frames) > 1 else frames[0]
        return df.with_columns(pl.lit(part.config_id).alias("config_id"), pl.lit(part.date).alias("date"))

    def row_count(self, part: Partition) -> int:
        """Rows from Parquet footers only (no data pages read)."""
        total = 0
        for path in part.files:
            try:
                with self.fs.open_input_file(path) as f:
                    total += pq.ParquetFile(f).metadata.num_rows
            except pa.ArrowInvalid as exc:
                raise SchemaError(f"{self.file_uri(path)}: not a Parquet file ({str(exc).splitlines()[0]})") from None
            except OSError as exc:
                raise self.objects.error(self._rel(path), "read the Parquet footer", exc) from None
        return total

    # --- writing ---------------------------------------------------------------------------
    def init(self, meta: dict[str, Any] | None = None) -> None:
        self.write_bytes("store.json", json.dumps({"format": STORE_FORMAT, **(meta or {})}, indent=1).encode())

    def write_config(self, cfg: DeploymentConfig) -> None:
        doc = {"config_id": cfg.config_id, "label": cfg.label, **cfg.to_dict()}
        self.write_bytes(f"configs/{cfg.config_id}.json", json.dumps(doc, indent=1, sort_keys=True).encode())

    def write_partition(self, table: str, config_id: str, day: str, df: pl.DataFrame, part: str = "part-0") -> str:
        """Write one partition file deterministically (same frame -> same bytes); ``part`` names the
        file inside the partition (importers name theirs by a hash of the source)."""
        df = conform(df, table)
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", compression_level=3, statistics=True, row_group_size=256_000)
        rel = f"{table}/config_id={config_id}/date={day}/{part}.parquet"
        self.write_bytes(rel, buf.getvalue())
        return rel

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers never see a half-written object (temp file + rename locally; one PUT on S3)."""
        self.objects.write(rel, data)


def _parse_date(s: str | None, name: str) -> str | None:
    if s is None:
        return None
    try:
        return Date.fromisoformat(s).isoformat()
    except ValueError:
        raise StoreError(f"{name} must be YYYY-MM-DD, got {s!r}") from None
