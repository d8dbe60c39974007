"""inference-perf per-request lifecycle report (``kubernetes-sigs/inference-perf``,
``inference_perf/reportgen/base.py``: ``per_request_lifecycle_metrics.json``) -> ``requests``.

The report is one JSON array of ``{start_time, end_time, request, response, info: {input_tokens,
output_tokens, output_token_times}, error}``; it is streamed with ijson (the array is never held
whole). Times are the client's ``time.monotonic()`` seconds (``inference-sim/training``
``schemas.py``): they have no epoch, so ``--time-origin`` gives the UTC time of the file's first
record and every time is placed relative to it. Mapping: ``arrival_ns`` = ``start_time``;
``first_token_ns`` = ``info.output_token_times[0]``; ``departed_ns`` = ``end_time`` when ``error``
is null; ``prompt_tokens``/``output_tokens`` from ``info``; ``request_id`` =
``ip-<source hash>-<record number>`` (the report has no request id).
"""

from __future__ import annotations

from typing import Any, Iterator

import ijson
import polars as pl

from ..errors import IngestError
from . import clientside, sources


def record_chunks(src: sources.Source, chunk_bytes: int) -> Iterator[tuple[int, int, bytes, Any]]:
    """``(index, first record number, b"", (first start_time, records))``; records keep only what is read."""
    per_chunk = max(1000, chunk_bytes // 4096)
    t0 = None
    batch: list[dict[str, Any]] = []
    index, first = 0, 1
    with sources.open_decoded(src) as f:
        try:
            for n, rec in enumerate(ijson.items(f, "item", use_float=True), start=1):
                if not isinstance(rec, dict):
                    raise IngestError(f"{src.uri}: record {n} is not an object (is this a per_request_lifecycle_metrics.json?)")
                info = rec.get("info") if isinstance(rec.get("info"), dict) else {}
                times = info.get("output_token_times") or []
                slim = {"start_time": rec.get("start_time"), "end_time": rec.get("end_time"),
                        "input_tokens": info.get("input_tokens"), "output_tokens": info.get("output_tokens"),
                        "first_token_time": times[0] if isinstance(times, list) and times else None,
                        "error": rec.get("error") is not None}
                if t0 is None and isinstance(slim["start_time"], (int, float)):
                    t0 = float(slim["start_time"])
                batch.append(slim)
                if len(batch) >= per_chunk:
                    yield index, first, b"", (t0, batch)
                    index, first, batch = index + 1, n + 1, []
        except ijson.JSONError as exc:
            raise IngestError(f"{src.uri}: not valid JSON after record {first + len(batch) - 1} ({exc}); "
                              "a truncated file? (the report is one JSON array)") from None
    if batch:
        yield index, first, b"", (t0, batch)


def parse_chunk(head: bytes, payload: Any, first: int, source: str, src: str,
                origin_ns: int | None) -> tuple[pl.DataFrame, pl.DataFrame]:
    t0, records = payload
    if origin_ns is None:
        raise IngestError(f"{source}: inference-perf times are client monotonic seconds with no epoch; "
                          "give --time-origin (UTC time of the first request in the file)")
    df = pl.DataFrame(records, schema={"start_time": pl.Float64, "end_time": pl.Float64, "input_tokens": pl.Int64,
                                       "output_tokens": pl.Int64, "first_token_time": pl.Float64, "error": pl.Boolean},
                      strict=False).with_row_index("_i")

    def ns(t: pl.Expr) -> pl.Expr:
        return ((t - (t0 or 0.0)) * 1e9).round().cast(pl.Int64) + origin_ns

    fields = ("start_time", "end_time", "input_tokens", "output_tokens")
    reason = pl.coalesce(*[pl.when(pl.col(c).is_null()).then(pl.lit(f"missing or non-numeric {'info.' if 'tokens' in c else ''}{c}"))
                           for c in fields])
    attr = pl.coalesce(*[pl.when(pl.col(c).is_null()).then(pl.lit(c)) for c in fields])
    df = df.select(
        (pl.col("_i").cast(pl.Int64) + first).alias("line"),
        pl.format("ip-{}-{}", pl.lit(src[:8]), pl.col("_i").cast(pl.Int64) + first).alias("request_id"),
        ns(pl.col("start_time")).alias("arrival_ns"),
        ns(pl.col("first_token_time")).alias("first_token_ns"),
        pl.when(~pl.col("error")).then(ns(pl.col("end_time"))).alias("departed_ns"),
        pl.col("input_tokens").alias("prompt_tokens"), pl.col("output_tokens").alias("output_tokens"),
        reason.alias("_r"), attr.alias("_attr"),
    )
    return clientside.finish(df, source, pl.col("_r"), "inference-perf record")
