"""BLIS TraceV2 (``inference-sim/inference-sim``, ``sim/workload/tracev2.go`` ``ExportTraceV2``/``LoadTraceV2``)
-> ``requests``.

A TraceV2 trace is a YAML header (``trace_version: 2``, ``time_unit: microseconds``, optional
``created_at``) and a CSV with one row per request; the columns read here are ``request_id``,
``input_tokens``, ``output_tokens``, ``arrival_time_us``, ``send_time_us``, ``first_chunk_time_us``,
``last_chunk_time_us`` and ``status`` (later versions add columns; they are ignored). Mapping:

- ``arrival_ns`` = ``send_time_us`` when positive, else ``arrival_time_us`` (the time BLIS replays a
  request at: the HTTP dispatch, after any client-side concurrency wait);
- ``first_token_ns`` = ``first_chunk_time_us`` when positive; ``departed_ns`` = ``last_chunk_time_us``
  only for ``status == ok`` (an error or timeout never received the whole response);
- times are relative to the trace start unless they are already epoch microseconds (>= 1e15): the
  origin is the header's ``created_at``, else ``--time-origin``;
- ``request_id`` = ``tv2-<source hash>-<request_id>`` (TraceV2 ids restart at 0 in every file).
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import yaml

from ..errors import IngestError
from . import clientside

REQUIRED = ("request_id", "input_tokens", "output_tokens", "arrival_time_us", "send_time_us",
            "first_chunk_time_us", "last_chunk_time_us", "status")
INTEGER = REQUIRED[1:7]
_EPOCH_US = 10**15  # 2001-09-09 in epoch microseconds: smaller values are relative to the trace start


def header_origin(csv_path: str) -> int | None:
    """Epoch ns of the header's ``created_at`` when a header YAML sits beside the CSV (local files)."""
    p = Path(csv_path)
    for cand in (p.with_name("trace_header.yaml"), p.with_suffix(".yaml"), p.with_name(p.stem.replace("data", "header") + ".yaml")):
        if cand.is_file():
            try:
                doc = yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError as exc:
                raise IngestError(f"{cand}: not valid YAML ({exc})") from None
            unit = doc.get("time_unit", "microseconds")
            if unit != "microseconds":
                raise IngestError(f"{cand}: time_unit {unit!r} is not supported (TraceV2 writes microseconds)")
            created = doc.get("created_at")
            if not created:
                return None
            t = created if isinstance(created, datetime) else datetime.fromisoformat(str(created).replace("Z", "+00:00"))
            return int((t if t.tzinfo else t.replace(tzinfo=timezone.utc)).timestamp() * 1e6) * 1000
    return None


def parse_chunk(head: bytes, data: bytes, first_line: int, source: str, src: str,
                origin_ns: int | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    """One chunk of TraceV2 CSV rows (``head``: the header row) -> requests rows and quarantine rows."""
    try:
        raw = pl.read_csv(io.BytesIO(head + b"\n" + data), infer_schema=False, truncate_ragged_lines=True)
    except pl.exceptions.PolarsError as exc:
        raise IngestError(f"{source}: not a TraceV2 CSV ({str(exc).splitlines()[0]})") from None
    missing = [c for c in REQUIRED if c not in raw.columns]
    if missing:
        raise IngestError(f"{source}: TraceV2 CSV is missing column(s) {', '.join(missing)}")
    ints = {c: pl.col(c).str.strip_chars().cast(pl.Int64, strict=False) for c in INTEGER}
    df = raw.with_row_index("_i").with_columns((pl.col("_i").cast(pl.Int64) + first_line).alias("line"), **{f"_{c}": e for c, e in ints.items()})
    reason = pl.coalesce(
        *[pl.when(pl.col(c).is_null()).then(pl.lit(f"truncated row: no value for {c}")) for c in REQUIRED],
        *[pl.when(pl.col(f"_{c}").is_null()).then(pl.lit(f"{c} is not an integer")) for c in INTEGER],
    )
    attr = pl.coalesce(*[pl.when(pl.col(c).is_null()).then(pl.lit(c)) for c in REQUIRED],
                       *[pl.when(pl.col(f"_{c}").is_null()).then(pl.lit(c)) for c in INTEGER])
    sent = pl.when(pl.col("_send_time_us") > 0).then(pl.col("_send_time_us")).otherwise(pl.col("_arrival_time_us"))
    relative = df.select((pl.col("_arrival_time_us").max() < _EPOCH_US).fill_null(False)).item()
    if relative and origin_ns is None:
        raise IngestError(f"{source}: TraceV2 times are relative to the trace start and no header with created_at "
                          "sits beside the CSV; give --time-origin (UTC time of the trace start)")
    base = origin_ns if relative else 0

    def ns(us: pl.Expr) -> pl.Expr:
        return us * 1000 + base

    ok = pl.col("status").str.strip_chars() == "ok"
    df = df.select(
        "line",
        pl.format("tv2-{}-{}", pl.lit(src[:8]), pl.col("request_id").str.strip_chars()).alias("request_id"),
        ns(sent).alias("arrival_ns"),
        pl.when(pl.col("_first_chunk_time_us") > 0).then(ns(pl.col("_first_chunk_time_us"))).alias("first_token_ns"),
        pl.when(ok & (pl.col("_last_chunk_time_us") > 0)).then(ns(pl.col("_last_chunk_time_us"))).alias("departed_ns"),
        pl.col("_input_tokens").alias("prompt_tokens"), pl.col("_output_tokens").alias("output_tokens"),
        reason.alias("_r"), attr.alias("_attr"),
    )
    return clientside.finish(df, source, pl.col("_r"), "tracev2 row")
