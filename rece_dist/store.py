"""Trace stores: a local folder or an ``s3://bucket/prefix``, laid out as Hive partitions.

Layout (the same on disk and in object storage)::

    STORE/store.json                                   format marker
    STORE/configs/<config_id>.json                     resolved configuration documents
    STORE/steps/config_id=<id>/date=YYYY-MM-DD/*.parquet
    STORE/requests/config_id=<id>/date=YYYY-MM-DD/*.parquet

A job lists partitions (pruning by configuration and date from the path alone, before it
opens any file), then hands each partition to a Ray task that scans only the columns it
needs. PyArrow's filesystem layer serves both local paths and S3 with one code path;
Polars reads the Parquet files lazily with the matching ``storage_options``.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from datetime import date as Date
from typing import Any, Iterable

import polars as pl
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .config import Catalog, DeploymentConfig
from .errors import ConfigError, SchemaError, StoreError
from .schema import TABLES, check_columns, check_values, conform

STORE_FORMAT = 1
_PART_RE = re.compile(r"config_id=([^/]+)/date=(\d{4}-\d{2}-\d{2})$")


@dataclass(frozen=True)
class S3Options:
    """Where and how to reach an S3-compatible endpoint. Unset fields fall back to the AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None

    @classmethod
    def from_env(cls) -> "S3Options":
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )

    def polars(self) -> dict[str, str]:
        """Polars/object_store options. Credentials come from the environment, never from us."""
        opts: dict[str, str] = {}
        if self.endpoint_url:
            opts["aws_endpoint_url"] = self.endpoint_url
            if self.endpoint_url.startswith("http://"):
                opts["aws_allow_http"] = "true"
        if self.region:
            opts["aws_region"] = self.region
        return opts

    def pyarrow(self) -> pafs.S3FileSystem:
        kw: dict[str, Any] = {"region": self.region or "us-east-1"}
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kw.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kw)


@dataclass(frozen=True)
class Partition:
    """One (table, configuration, date) folder and its Parquet files."""

    table: str
    config_id: str
    date: str
    files: tuple[str, ...]
    size_bytes: int

    @property
    def key(self) -> str:
        return f"{self.table}/config_id={self.config_id}/date={self.date}"


class Store:
    """A trace store at a local path or ``s3://`` URI."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri.rstrip("/") or "/"
        self.is_s3 = uri.startswith("s3://")
        if self.is_s3:
            self.s3 = s3 or S3Options.from_env()
            self.fs: pafs.FileSystem = self.s3.pyarrow()
            self.root = self.uri[len("s3://"):]
        else:
            self.s3 = None
            self.fs = pafs.LocalFileSystem()
            self.root = os.path.abspath(self.uri)

    # --- paths -----------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def file_uri(self, path: str) -> str:
        """What Polars is given to scan ``path`` (an fs path) with."""
        return f"s3://{path}" if self.is_s3 else path

    @property
    def storage_options(self) -> dict[str, str] | None:
        return self.s3.polars() if self.s3 else None

    def _io(self, what: str, fn, *args):
        """Run a filesystem call and turn low-level failures into one actionable line."""
        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except OSError as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise StoreError(f"{self.uri}: cannot {what} ({msg})") from None

    # --- reading ---------------------------------------------------------------------------
    def exists(self) -> bool:
        info = self._io("reach the store", self.fs.get_file_info, self.path("store.json"))
        return info.type == pafs.FileType.File

    def require(self) -> None:
        if not self.exists():
            raise StoreError(f"{self.uri}: not a trace store (no store.json); create one with `rece synth --out {self.uri}`")

    def read_json(self, rel: str) -> Any:
        path = self.path(rel)
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.read()
        except FileNotFoundError:
            raise StoreError(f"{self.file_uri(path)}: not found") from None
        except OSError as exc:
            raise StoreError(f"{self.file_uri(path)}: cannot read ({str(exc).splitlines()[0]})") from None
        try:
            return json.loads(data)
        except json.JSONDecodeError as exc:
            raise StoreError(f"{self.file_uri(path)}: not valid JSON ({exc})") from None

    def configs(self, catalog: Catalog | None = None) -> dict[str, DeploymentConfig]:
        """Every configuration document in the store, checked against its own id."""
        self.require()
        catalog = catalog or Catalog.default()
        sel = pafs.FileSelector(self.path("configs"), allow_not_found=True)
        out: dict[str, DeploymentConfig] = {}
        for info in sorted(self._io("list configurations", self.fs.get_file_info, sel), key=lambda i: i.path):
            if not info.path.endswith(".json"):
                continue
            doc = self.read_json(info.path[len(self.root) + 1:])
            where = self.file_uri(info.path)
            cfg = catalog.resolve(doc, where)
            stem = info.path.rsplit("/", 1)[-1][: -len(".json")]
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
        """Partitions of ``table`` pruned by configuration and inclusive date window."""
        if table not in TABLES:
            raise ValueError(f"unknown table {table!r}")
        wanted = set(config_ids) if config_ids is not None else None
        lo, hi = _parse_date(date_from, "date_from"), _parse_date(date_to, "date_to")
        sel = pafs.FileSelector(self.path(table), recursive=True, allow_not_found=True)
        groups: dict[tuple[str, str], list[tuple[str, int]]] = {}
        for info in self._io(f"list {table}", self.fs.get_file_info, sel):
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            m = _PART_RE.search(info.path.rsplit("/", 1)[0])
            if not m:
                continue
            cid, day = m.group(1), m.group(2)
            if wanted is not None and cid not in wanted:
                continue
            if (lo and day < lo) or (hi and day > hi):
                continue
            groups.setdefault((cid, day), []).append((info.path, info.size or 0))
        return [
            Partition(table, cid, day, tuple(sorted(p for p, _ in files)), sum(s for _, s in files))
            for (cid, day), files in sorted(groups.items())
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
            except SchemaError:
                raise
            except (pl.exceptions.PolarsError, OSError) as exc:
                msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise SchemaError(f"{where}: cannot read Parquet ({msg})") from None
            check_values(df, part.table, where)
            frames.append(df)
        df = pl.concat(frames) if len(frames) > 1 else frames[0]
        return df.with_columns(pl.lit(part.config_id).alias("config_id"), pl.lit(part.date).alias("date"))

    # --- writing ---------------------------------------------------------------------------
    def init(self, meta: dict[str, Any] | None = None) -> None:
        self.write_bytes("store.json", json.dumps({"format": STORE_FORMAT, **(meta or {})}, indent=1).encode())

    def write_config(self, cfg: DeploymentConfig) -> None:
        doc = {"config_id": cfg.config_id, "label": cfg.label, **cfg.to_dict()}
        self.write_bytes(f"configs/{cfg.config_id}.json", json.dumps(doc, indent=1, sort_keys=True).encode())

    def write_partition(self, table: str, config_id: str, day: str, df: pl.DataFrame) -> str:
        """Write one partition file deterministically (same frame -> same bytes)."""
        df = conform(df, table)
        buf = io.BytesIO()
        df.write_parquet(buf, compression="zstd", compression_level=3, statistics=True, row_group_size=256_000)
        rel = f"{table}/config_id={config_id}/date={day}/part-0.parquet"
        self.write_bytes(rel, buf.getvalue())
        return rel

    def write_bytes(self, rel: str, data: bytes) -> None:
        path = self.path(rel)
        if not self.is_s3:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{os.getpid()}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)  # readers never see a half-written file
            return
        with self._io(f"write {rel}", self.fs.open_output_stream, path) as f:
            f.write(data)

    def row_count(self, part: Partition) -> int:
        """Rows from Parquet footers only (no data pages read)."""
        total = 0
        for path in part.files:
            with self.fs.open_input_file(path) as f:
                total += pq.ParquetFile(f).metadata.num_rows
        return total


def _parse_date(s: str | None, name: str) -> str | None:
    if s is None:
        return None
    try:
        return Date.fromisoformat(s).isoformat()
    except ValueError:
        raise StoreError(f"{name} must be YYYY-MM-DD, got {s!r}") from None
