"""The two trace tables, their columns and their validation.

Column names follow vLLM's journey tracing (``step.BATCH_SUMMARY`` and the per-request
journey/API events) with dots replaced by underscores. Hive partition columns
(``config_id``, ``date``) are not stored inside the files.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from .errors import SchemaError


@dataclass(frozen=True)
class Column:
    name: str
    dtype: pl.DataType
    doc: str
    source: str  # the vLLM attribute it maps from
    nullable: bool = False
    min_value: float | None = 0


STEP_COLUMNS: tuple[Column, ...] = (
    Column("step_id", pl.Int64(), "engine step counter", "step.id"),
    Column("ts_start_ns", pl.Int64(), "step start, epoch ns", "step.ts_start_ns"),
    Column("ts_end_ns", pl.Int64(), "step end, epoch ns", "step.ts_end_ns"),
    Column("duration_us", pl.Float64(), "step wall time in us (beta target)", "step.duration_us", min_value=0),
    Column("running_depth", pl.Int32(), "requests in the running queue", "queue.running_depth"),
    Column("waiting_depth", pl.Int32(), "requests in the waiting queue", "queue.waiting_depth"),
    Column("num_prefill_reqs", pl.Int32(), "requests prefilling this step", "batch.num_prefill_reqs"),
    Column("num_decode_reqs", pl.Int32(), "requests decoding this step", "batch.num_decode_reqs"),
    Column("scheduled_tokens", pl.Int32(), "tokens scheduled this step", "batch.scheduled_tokens"),
    Column("prefill_tokens", pl.Int32(), "prefill tokens this step", "batch.prefill_tokens"),
    Column("decode_tokens", pl.Int32(), "decode tokens this step", "batch.decode_tokens"),
    Column("num_finished", pl.Int32(), "requests finished this step", "batch.num_finished"),
    Column("num_preempted", pl.Int32(), "requests preempted this step", "batch.num_preempted"),
    Column("kv_usage_gpu_ratio", pl.Float32(), "fraction of GPU KV blocks in use", "kv.usage_gpu_ratio"),
    Column("kv_blocks_total_gpu", pl.Int32(), "GPU KV blocks", "kv.blocks_total_gpu"),
    Column("kv_blocks_free_gpu", pl.Int32(), "free GPU KV blocks", "kv.blocks_free_gpu"),
    Column("kv_blocks_offloaded", pl.Int32(), "KV blocks copied GPU->CPU this step", "kv_offload (connector)"),
    Column("kv_blocks_restored", pl.Int32(), "KV blocks copied CPU->GPU this step", "kv_offload (connector)"),
)

REQUEST_COLUMNS: tuple[Column, ...] = (
    Column("request_id", pl.String(), "request id", "gen_ai.request.id", min_value=None),
    Column("arrival_ns", pl.Int64(), "API server received the request, epoch ns", "api.ARRIVED"),
    Column("queued_ns", pl.Int64(), "entered the scheduler's waiting queue (null: client-side import)", "journey.QUEUED",
           nullable=True),
    Column("scheduled_ns", pl.Int64(), "first scheduled", "journey.SCHEDULED", nullable=True),
    Column("first_token_ns", pl.Int64(), "first output token", "journey.FIRST_TOKEN", nullable=True),
    Column("finished_ns", pl.Int64(), "finished in the engine", "journey.FINISHED", nullable=True),
    Column("departed_ns", pl.Int64(), "API server sent the last byte", "api.DEPARTED", nullable=True),
    Column("prompt_tokens", pl.Int32(), "prompt length in tokens", "prefill.total_tokens"),
    Column("cached_prompt_tokens", pl.Int32(), "prompt tokens served from the prefix cache", "prefix cache hit"),
    Column("output_tokens", pl.Int32(), "tokens generated", "decode.done_tokens"),
    Column("num_preemptions", pl.Int32(), "times preempted", "num_preemptions"),
)

TABLES: dict[str, tuple[Column, ...]] = {"steps": STEP_COLUMNS, "requests": REQUEST_COLUMNS}
PARTITION_COLUMNS = ("config_id", "date")


def polars_schema(table: str) -> dict[str, pl.DataType]:
    return {c.name: c.dtype for c in TABLES[table]}


def conform(df: pl.DataFrame, table: str) -> pl.DataFrame:
    """Cast a frame produced by our own code to the exact column order and types."""
    return df.select([pl.col(c.name).cast(c.dtype) for c in TABLES[table]])


def check_columns(schema: dict[str, pl.DataType], table: str, where: str, needed: list[str] | None = None) -> None:
    """Fail on a missing column or a wrong type, naming the file and the column."""
    wanted = [c for c in TABLES[table] if needed is None or c.name in needed]
    for col in wanted:
        if col.name not in schema:
            raise SchemaError(f"{where}: {table} table is missing column {col.name!r}")
        got = schema[col.name]
        if not _compatible(got, col.dtype):
            raise SchemaError(f"{where}: column {col.name!r} has type {got}, expected {col.dtype}")


def _compatible(got: pl.DataType, want: pl.DataType) -> bool:
    if got == want:
        return True
    if want.is_integer() and got.is_integer():
        return True
    if want.is_float() and (got.is_float() or got.is_integer()):
        return True
    return want == pl.String() and got in (pl.String(), pl.Categorical())


def check_values(df: pl.DataFrame, table: str, where: str) -> None:
    """Fail on nulls, NaNs or negative values where the schema forbids them."""
    for col in TABLES[table]:
        if col.name not in df.columns:
            continue
        s = df.get_column(col.name)
        if not col.nullable and s.null_count():
            raise SchemaError(f"{where}: column {col.name!r} has {s.null_count()} null value(s)")
        if s.dtype.is_float():
            nan = int(s.is_nan().sum())
            if nan:
                raise SchemaError(f"{where}: column {col.name!r} has {nan} NaN value(s)")
        if col.min_value is not None and s.dtype.is_numeric() and len(s.drop_nulls()):
            lo = s.min()
            if lo is not None and lo < col.min_value:
                raise SchemaError(f"{where}: column {col.name!r} has negative value(s) (min {lo})")
    if table == "steps" and {"ts_start_ns", "ts_end_ns"} <= set(df.columns):
        bad = int((df["ts_end_ns"] < df["ts_start_ns"]).sum())
        if bad:
            raise SchemaError(f"{where}: {bad} step(s) end before they start (ts_end_ns < ts_start_ns)")
    if table == "requests" and {"arrival_ns", "queued_ns"} <= set(df.columns):
        bad = int((df["queued_ns"] < df["arrival_ns"]).sum())
        if bad:
            raise SchemaError(f"{where}: {bad} request(s) queued before they arrived (queued_ns < arrival_ns)")
