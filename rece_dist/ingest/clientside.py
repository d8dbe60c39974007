"""What client-side per-request records share once parsed: checks, quarantine rows, request ids.

Client traces (BLIS TraceV2, inference-perf) see a request from outside: when it was sent, when
the first and last chunks came back, and the token counts. They fill ``arrival_ns``,
``first_token_ns``, ``departed_ns``, ``prompt_tokens`` and ``output_tokens``; the engine-side
times (``queued_ns``, ``scheduled_ns``, ``finished_ns``) stay null, and ``cached_prompt_tokens``
and ``num_preemptions`` are 0 because the client cannot observe them (the schema has no null
there). Such rows carry no alpha target (see :func:`rece_dist.features.attach_load`).
"""

from __future__ import annotations

import polars as pl

from .otlp import QUARANTINE_SCHEMA

CLIENT_COLUMNS = ("request_id", "arrival_ns", "first_token_ns", "departed_ns", "prompt_tokens", "output_tokens")


def finish(df: pl.DataFrame, source: str, reason: pl.Expr, event: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``df`` (``line`` + :data:`CLIENT_COLUMNS` + ``_attr``) by ``reason`` (null: good) into
    requests rows and quarantine rows."""
    negative = pl.coalesce(
        pl.when(pl.col("first_token_ns") < pl.col("arrival_ns")).then(pl.lit("negative duration: first token before the request was sent (clock skew?)")),
        pl.when(pl.col("departed_ns") < pl.col("arrival_ns")).then(pl.lit("negative duration: last chunk before the request was sent (clock skew?)")),
        pl.when(pl.col("prompt_tokens") < 0).then(pl.lit("negative token count")),
        pl.when(pl.col("output_tokens") < 0).then(pl.lit("negative token count")),
    )
    df = df.with_columns(pl.coalesce(reason, negative).alias("_reason"))
    bad = df.filter(pl.col("_reason").is_not_null())
    quarantine = bad.select(pl.lit(source).alias("source"), pl.col("line"), pl.lit(None, pl.String).alias("span_id"),
                            pl.lit(event).alias("event"), pl.col("_attr").alias("attribute"),
                            pl.col("_reason").alias("reason"), pl.lit(None, pl.String).alias("detail")).cast(QUARANTINE_SCHEMA)
    good = df.filter(pl.col("_reason").is_null()).select(
        *CLIENT_COLUMNS,
        pl.lit(None, pl.Int64).alias("queued_ns"), pl.lit(None, pl.Int64).alias("scheduled_ns"),
        pl.lit(None, pl.Int64).alias("finished_ns"), pl.lit(0).alias("cached_prompt_tokens"),
        pl.lit(0).alias("num_preemptions"))
    return good, quarantine
