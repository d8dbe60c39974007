"""What every importer writes into a store: part files named by their source, quarantine, ledger.

- ``STORE/<table>/config_id=<id>/date=<day>/part-<src>-<chunk>.parquet``: ``<src>`` is the first 16
  hex digits of the source file's SHA-256, ``<chunk>`` the chunk of that file (``r`` for the
  per-file request assembly). Each part is written whole (temp file + rename; one PUT on S3)
  through :meth:`Store.write_partition`, so a reader sees all of a part or none of it, and the
  same source always produces the same names and bytes.
- ``STORE/quarantine/<src>-<chunk>.parquet``: the rows that could not be imported, with the file,
  line, span, event, attribute and reason (a side table; readers of ``steps``/``requests`` never
  open it).
- ``STORE/ingest/<src>/chunk-<chunk>.json``: a chunk is done (its summary); a re-run after a crash
  redoes only chunks without one.
- ``STORE/ingest/<src>.json``: the ledger, written last: the per-file summary, per-partition rows
  and step sample rate. A source with a ledger is skipped: ingesting a file twice changes nothing.
"""

from __future__ import annotations

import io
import json
from typing import Any

import polars as pl

from ..schema import check_values, conform
from ..store import Store
from .otlp import STAGED_SCHEMA

TIME_KEY = {"steps": "ts_start_ns", "requests": "arrival_ns"}
SORT_KEY = {"steps": ["step_id", "ts_start_ns"], "requests": ["arrival_ns", "request_id"]}


def part_name(src: str, chunk: int | str) -> str:
    return f"part-{src}-{chunk:05d}" if isinstance(chunk, int) else f"part-{src}-{chunk}"


def write_rows(store: Store, table: str, df: pl.DataFrame, src: str, chunk: int | str, where: str) -> dict[str, dict[str, Any]]:
    """Write rows (schema columns + ``config_id``) into their (configuration, UTC date) partitions.

    Returns ``{partition key: {"rows": n, ...}}``; for steps also the step-id range, from which
    the sample rate is estimated.
    """
    out: dict[str, dict[str, Any]] = {}
    if df.is_empty():
        return out
    df = df.with_columns(pl.col(TIME_KEY[table]).cast(pl.Datetime("ns", "UTC")).dt.date().cast(pl.String).alias("_date"))
    for (cid, day), g in df.group_by(["config_id", "_date"], maintain_order=True):
        g = conform(g.sort(SORT_KEY[table]), table)
        check_values(g, table, where)
        store.write_partition(table, cid, day, g, part=part_name(src, chunk))
        info: dict[str, Any] = {"table": table, "config_id": cid, "date": day, "rows": len(g)}
        out[f"{table}/config_id={cid}/date={day}"] = info
    return out


def step_ranges(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Per steps partition: sampled steps and their step-id range (idle ones included)."""
    if df.is_empty():
        return {}
    g = (df.with_columns(pl.col("ts_start_ns").cast(pl.Datetime("ns", "UTC")).dt.date().cast(pl.String).alias("_date"))
         .group_by("config_id", "_date").agg(pl.len().alias("sampled"), pl.col("step_id").min().alias("first"),
                                             pl.col("step_id").max().alias("last")))
    return {f"steps/config_id={r['config_id']}/date={r['_date']}": {"sampled": r["sampled"], "first": r["first"], "last": r["last"]}
            for r in g.iter_rows(named=True)}


def write_quarantine(store: Store, df: pl.DataFrame, src: str, chunk: int | str) -> None:
    if df.is_empty():
        return
    buf = io.BytesIO()
    df.sort("line", "span_id", nulls_last=True).write_parquet(buf, compression="zstd", statistics=False)
    store.write_bytes(f"quarantine/{src}-{chunk if isinstance(chunk, str) else f'{chunk:05d}'}.parquet", buf.getvalue())


def write_json(store: Store, rel: str, doc: Any) -> None:
    store.write_bytes(rel, json.dumps(doc, indent=1, sort_keys=True).encode())


def ledger_path(src: str) -> str:
    return f"ingest/{src}.json"


def chunk_marker(src: str, chunk: int | str) -> str:
    return f"ingest/{src}/chunk-{chunk if isinstance(chunk, str) else f'{chunk:05d}'}.json"


def read_json_or_none(store: Store, rel: str) -> Any:
    return store.read_json(rel) if store.objects.exists(rel) else None


def sample_rates(store: Store) -> dict[str, float]:
    """Recorded step sample rate of every ingested steps partition, by partition key
    (``steps/config_id=<id>/date=<day>``); the lowest rate when several sources share one."""
    out: dict[str, float] = {}
    for obj in store.objects.list("ingest"):
        if obj.key.count("/") != 1 or not obj.key.endswith(".json"):
            continue
        for p in store.read_json(obj.key).get("partitions", []):
            rate = p.get("step_sample_rate")
            if rate is not None:
                out[p["key"]] = min(rate, out.get(p["key"], rate))
    return out



def write_parquet_staged(store: Store, staged: pl.DataFrame, src: str, chunk: int) -> None:
    """A chunk's request events, kept until the file's requests are assembled (and after, as a journal)."""
    buf = io.BytesIO()
    staged.write_parquet(buf, compression="zstd", statistics=False)
    store.write_bytes(f"ingest/{src}/events-{chunk:05d}.parquet", buf.getvalue())


def read_staged(store: Store, src: str) -> pl.DataFrame:
    files = [o.key for o in store.objects.list(f"ingest/{src}") if o.key.rsplit("/", 1)[-1].startswith("events-")]
    frames = [pl.read_parquet(store.file_uri(store.path(k)), storage_options=store.storage_options) for k in sorted(files)]
    return pl.concat(frames) if frames else pl.DataFrame(schema=STAGED_SCHEMA)
