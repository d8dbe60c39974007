"""OTLP traces from instrumented vLLM -> the ``steps`` and ``requests`` tables.

Input: what an OpenTelemetry Collector's file exporter writes for vLLM's ``--otlp-traces-endpoint``
(scopes, span and attribute names from ``inference-sim/vllm`` ``vllm/tracing.py`` and
``inference-sim/training`` ``schemas.py``; see docs/collecting.md):

- OTLP/JSON: one ``ExportTraceServiceRequest`` per line, parsed by PyArrow's JSON reader against
  an explicit schema (columnar; a line the reader rejects is found by bisection and quarantined);
- OTLP protobuf: length-prefixed ``ExportTraceServiceRequest`` messages, parsed with
  ``opentelemetry-proto``.

Both become the same two columnar frames, one row per span event and one per event attribute,
from which each table is cut with vectorised Polars expressions:

- ``step.BATCH_SUMMARY`` -> one ``steps`` row; its ``step.*``/``queue.*``/``batch.*``/``kv.*``
  attributes map one to one (:data:`STEP_ATTRIBUTES`). ``step.ts_*_ns`` are monotonic clocks in
  the fork; when they are not within a day of the event's ``timeUnixNano`` (wall clock), the
  event time is taken as the step's end and the start is placed ``ts_end - ts_start`` before it.
- ``api.*`` / ``journey.*`` events and ``step.REQUEST_SNAPSHOT`` -> staged request events, joined
  per trace (``llm_request`` and its ``llm_core`` child share a ``traceId``; snapshots join
  through the engine request id) into one ``requests`` row once the whole file is read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pj

# vLLM attribute -> (steps column, kind). Names: inference-sim/vllm vllm/tracing.py (SpanAttributes).
STEP_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "step.id": ("step_id", "int"),
    "step.ts_start_ns": ("ts_start_ns", "int"),
    "step.ts_end_ns": ("ts_end_ns", "int"),
    "step.duration_us": ("duration_us", "float"),
    "queue.running_depth": ("running_depth", "int"),
    "queue.waiting_depth": ("waiting_depth", "int"),
    "batch.num_prefill_reqs": ("num_prefill_reqs", "int"),
    "batch.num_decode_reqs": ("num_decode_reqs", "int"),
    "batch.scheduled_tokens": ("scheduled_tokens", "int"),
    "batch.prefill_tokens": ("prefill_tokens", "int"),
    "batch.decode_tokens": ("decode_tokens", "int"),
    "batch.num_finished": ("num_finished", "int"),
    "batch.num_preempted": ("num_preempted", "int"),
    "kv.usage_gpu_ratio": ("kv_usage_gpu_ratio", "float"),
    "kv.blocks_total_gpu": ("kv_blocks_total_gpu", "int"),
    "kv.blocks_free_gpu": ("kv_blocks_free_gpu", "int"),
}
# Not in the fork's BATCH_SUMMARY (its KV offload counters go to the KV-events stream): read when
# present (rece synth writes them), 0 otherwise, which is exact without CPU offload.
KV_OPTIONAL: dict[str, str] = {"kv.blocks_offloaded": "kv_blocks_offloaded", "kv.blocks_restored": "kv_blocks_restored"}

KNOWN_EVENTS = frozenset({
    "step.BATCH_SUMMARY", "step.REQUEST_SNAPSHOT", "journey.QUEUED", "journey.SCHEDULED", "journey.FIRST_TOKEN",
    "journey.PREEMPTED", "journey.FINISHED", "api.ARRIVED", "api.DEPARTED", "api.ABORTED",
})
# request-event attributes the importer reads: key -> (staged column, kind)
REQUEST_EVENT_ATTRIBUTES: dict[str, tuple[str, str]] = {
    "prefill.total_tokens": ("prefill_total", "int"),
    "decode.done_tokens": ("decode_done", "int"),
    "num_preemptions": ("preemptions", "int"),
    "request.id": ("snap_request_id", "str"),
    "request.num_prompt_tokens": ("snap_prompt", "int"),
    "request.num_output_tokens": ("snap_output", "int"),
    "request.num_preemptions": ("snap_preemptions", "int"),
    "request.effective_prompt_len": ("snap_effective", "int"),
}
QUARANTINE_SCHEMA = {"source": pl.String, "line": pl.Int64, "span_id": pl.String, "event": pl.String,
                     "attribute": pl.String, "reason": pl.String, "detail": pl.String}
_DAY_NS = 86_400 * 10**9
_WINDOW = 1 << 20

_AV = pa.struct([("stringValue", pa.string()), ("intValue", pa.string()), ("doubleValue", pa.float64()),
                 ("boolValue", pa.bool_())])
_ATTRS = pa.list_(pa.struct([("key", pa.string()), ("value", _AV)]))
_EVENT = pa.struct([("timeUnixNano", pa.string()), ("name", pa.string()), ("attributes", _ATTRS)])
_SPAN = pa.struct([("traceId", pa.string()), ("spanId", pa.string()), ("parentSpanId", pa.string()),
                   ("name", pa.string()), ("attributes", _ATTRS), ("events", pa.list_(_EVENT))])
_SCOPE_SPANS = pa.struct([("scope", pa.struct([("name", pa.string())])), ("spans", pa.list_(_SPAN))])
JSON_SCHEMA = pa.schema([("resourceSpans", pa.list_(pa.struct([
    ("resource", pa.struct([("attributes", _ATTRS)])), ("scopeSpans", pa.list_(_SCOPE_SPANS))])))])


@dataclass
class Events:
    """One chunk's span events (``ev`` rows) and their attributes (``attrs`` rows, keyed by ``ev``).

    ``attrs`` (about 18 rows per step event) stays an Arrow table: the typed extraction reads it
    with Arrow kernels and NumPy, and a conversion to Polars would copy every string."""

    ev: pl.DataFrame
    attrs: pa.Table
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # (line, parser message)


_EV_SCHEMA = {"ev": pl.Int64, "line": pl.Int64, "service": pl.String, "scope": pl.String, "trace_id": pl.String,
              "span_id": pl.String, "span_request_id": pl.String, "time_ns": pl.String, "name": pl.String}
_ATTR_SCHEMA = pa.schema([("ev", pa.int64()), ("key", pa.string()), ("s", pa.string()), ("i", pa.string()),
                          ("d", pa.float64()), ("b", pa.bool_())])


# --- OTLP/JSON ----------------------------------------------------------------------------------

def parse_json_lines(data: bytes | np.ndarray, first_line: int) -> Events:
    """Parse newline-delimited OTLP/JSON (``first_line``: 1-based number of the first line); ``data``
    may be a uint8 array, as a chunk arrives from the object store without a copy.

    The chunk goes to PyArrow's reader whole and without a copy; only when the reader rejects it
    (or reads a different number of objects than there are lines) are its lines split apart and
    the bad ones found by bisection."""
    numbers, longest = _object_lines(data, first_line)
    if not len(numbers):
        return _concat([], [])
    try:
        tbl = _read(pa.py_buffer(data), longest)
    except pa.ArrowInvalid:
        tbl = None
    if tbl is not None and tbl.num_rows == len(numbers):
        return _concat([_flatten(tbl, numbers)], [])
    lines = [x for x in bytes(data).split(b"\n") if x.strip()]
    parts: list[tuple[pa.Table, np.ndarray]] = []
    bad: list[tuple[int, str]] = []
    _read_bisect(lines, numbers, parts, bad)
    return _concat([_flatten(t, nums) for t, nums in parts], bad)


def _object_lines(data: bytes | np.ndarray, first_line: int) -> tuple[np.ndarray, int]:
    """Line numbers of the non-blank lines of ``data`` (those the JSON reader reads as objects) and
    the longest line's length, from one NumPy scan for newlines."""
    buf = np.frombuffer(data, dtype=np.uint8)
    if not len(buf):
        return np.zeros(0, dtype=np.int64), 0
    # in 1 MiB windows: a chunk-sized temporary would cost fresh pages on every chunk
    ends = np.concatenate([np.flatnonzero(buf[o:o + _WINDOW] == 10) + o for o in range(0, len(buf), _WINDOW)])
    if buf[-1] != 10:
        ends = np.append(ends, len(buf))
    starts = np.concatenate(([0], ends[:-1] + 1))
    lengths = ends - starts
    # a line is blank if empty or whitespace only; only lines starting with whitespace need a look
    maybe = np.flatnonzero((lengths == 0) | np.isin(buf[np.minimum(starts, len(buf) - 1)], (9, 11, 12, 13, 32)))
    blank = np.zeros(len(starts), dtype=bool)
    blank[maybe] = [not bytes(buf[starts[j]:ends[j]]).strip() for j in maybe]
    numbers = np.arange(first_line, first_line + len(starts), dtype=np.int64)[~blank]
    return numbers, int(lengths.max(initial=0))


def _read(buf: pa.Buffer | bytes, longest: int) -> pa.Table:
    return pj.read_json(pa.BufferReader(buf),
                        read_options=pj.ReadOptions(use_threads=False, block_size=max(8 << 20, 2 * longest + 2)),
                        parse_options=pj.ParseOptions(explicit_schema=JSON_SCHEMA, unexpected_field_behavior="ignore"))


def _read_bisect(lines: list[bytes], numbers: np.ndarray, parts: list, bad: list) -> None:
    """Read ``lines`` in one PyArrow call; on a parse error, halve until the bad lines stand alone."""
    if not lines:
        return
    try:
        tbl = _read(b"\n".join(lines), max(map(len, lines)))
        if tbl.num_rows != len(lines):
            raise pa.ArrowInvalid(f"expected {len(lines)} JSON objects, read {tbl.num_rows}")
        parts.append((tbl, numbers))
    except pa.ArrowInvalid as exc:
        if len(lines) == 1:
            bad.append((int(numbers[0]), _arrow_message(exc)))
            return
        mid = len(lines) // 2
        _read_bisect(lines[:mid], numbers[:mid], parts, bad)
        _read_bisect(lines[mid:], numbers[mid:], parts, bad)


def _arrow_message(exc: Exception) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "changed from" in msg or ("expected" in msg.lower() and "type" in msg.lower()):
        return f"a value of the wrong JSON type for OTLP/JSON ({msg})"
    return f"not valid JSON: truncated or malformed line ({msg})"


def _level(arr: pa.Array, name: str) -> tuple[pa.Array, np.ndarray]:
    """Children of list field ``name`` of struct array ``arr`` and the parent index of each."""
    lst = pc.struct_field(arr, name)
    return lst.flatten(), pc.list_parent_indices(lst).to_numpy(zero_copy_only=False).astype(np.int64)


def _attr_table(attrs_list: pa.Array, parent_ids: np.ndarray) -> pa.Table:
    """(owner, key, AnyValue fields) rows of a list<KeyValue> array whose i-th list belongs to ``parent_ids[i]``."""
    kv = attrs_list.flatten()
    owner = parent_ids[pc.list_parent_indices(attrs_list).to_numpy(zero_copy_only=False).astype(np.int64)]
    val = pc.struct_field(kv, "value")
    return pa.table([pa.array(owner, pa.int64()), pc.struct_field(kv, "key"),
                     *(pc.struct_field(val, f) for f in ("stringValue", "intValue", "doubleValue", "boolValue"))],
                    schema=_ATTR_SCHEMA)


def _flatten(tbl: pa.Table, line_numbers: np.ndarray) -> Events:
    rs_list = tbl.column("resourceSpans").combine_chunks()
    rs = rs_list.flatten()
    rs_line = line_numbers[pc.list_parent_indices(rs_list).to_numpy(zero_copy_only=False).astype(np.int64)]
    res_attrs = _attr_table(pc.struct_field(pc.struct_field(rs, "resource"), "attributes"), np.arange(len(rs)))
    service = _first_string(res_attrs, "service.name", len(rs))
    ss, ss_rs = _level(rs, "scopeSpans")
    scope = pc.struct_field(pc.struct_field(ss, "scope"), "name")
    sp, sp_ss = _level(ss, "spans")
    span_attrs = _attr_table(pc.struct_field(sp, "attributes"), np.arange(len(sp)))
    span_rid = _first_string(span_attrs, "gen_ai.request.id", len(sp))
    ev, ev_sp = _level(sp, "events")
    ev_ss = sp_ss[ev_sp]
    ev_rs = ss_rs[ev_ss]
    n = len(ev)
    frame = pl.DataFrame({
        "ev": np.arange(n, dtype=np.int64),
        "line": rs_line[ev_rs],
        "service": service.gather(ev_rs),
        "scope": pl.Series(scope, dtype=pl.String).gather(ev_ss),
        "trace_id": pl.Series(pc.struct_field(sp, "traceId")).gather(ev_sp),
        "span_id": pl.Series(pc.struct_field(sp, "spanId")).gather(ev_sp),
        "span_request_id": span_rid.gather(ev_sp),
        "time_ns": pl.Series(pc.struct_field(ev, "timeUnixNano")),
        "name": pl.Series(pc.struct_field(ev, "name")),
    }, schema=_EV_SCHEMA)
    return Events(frame, _attr_table(pc.struct_field(ev, "attributes"), np.arange(n, dtype=np.int64)))


def _first_string(attrs: pa.Table, key: str, n: int) -> pl.Series:
    """The string value of attribute ``key`` for owners 0..n-1 (null where absent)."""
    hit = pl.from_arrow(attrs.filter(pc.equal(attrs.column("key"), key)).select(["ev", "s"])).unique("ev", keep="first")
    return pl.DataFrame({"ev": np.arange(n, dtype=np.int64)}).join(hit, on="ev", how="left")["s"]


def _concat(frames: list[Events], bad: list[tuple[int, str]]) -> Events:
    evs, attrs, offset = [], [], 0
    for f in frames:
        evs.append(f.ev.with_columns(pl.col("ev") + offset))
        attrs.append(f.attrs.set_column(0, "ev", pc.add(f.attrs.column("ev"), offset)))
        offset += len(f.ev)
    ev = pl.concat(evs) if evs else pl.DataFrame(schema=_EV_SCHEMA)
    at = pa.concat_tables(attrs) if attrs else _ATTR_SCHEMA.empty_table()
    return Events(ev, at, sorted(bad))


# --- OTLP protobuf ------------------------------------------------------------------------------

def parse_proto_messages(messages: list[tuple[int, bytes]]) -> Events:
    """Parse ``(message number, serialized ExportTraceServiceRequest)`` pairs with opentelemetry-proto."""
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    ev_rows: dict[str, list] = {k: [] for k in _EV_SCHEMA}
    at_rows: dict[str, list] = {k: [] for k in _ATTR_SCHEMA.names}
    bad: list[tuple[int, str]] = []
    for number, blob in messages:
        req = ExportTraceServiceRequest()
        try:
            req.ParseFromString(blob)
        except DecodeError as exc:
            bad.append((number, f"not a valid OTLP protobuf ExportTraceServiceRequest ({exc})"))
            continue
        for rs in req.resource_spans:
            service = next((a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), None)
            for ss in rs.scope_spans:
                for sp in ss.spans:
                    rid = next((a.value.string_value for a in sp.attributes if a.key == "gen_ai.request.id"), None)
                    for e in sp.events:
                        k = len(ev_rows["ev"])
                        for col, v in (("ev", k), ("line", number), ("service", service), ("scope", ss.scope.name),
                                       ("trace_id", sp.trace_id.hex()), ("span_id", sp.span_id.hex()),
                                       ("span_request_id", rid), ("time_ns", str(e.time_unix_nano)), ("name", e.name)):
                            ev_rows[col].append(v)
                        for a in e.attributes:
                            kind = a.value.WhichOneof("value")
                            at_rows["ev"].append(k)
                            at_rows["key"].append(a.key)
                            at_rows["s"].append(a.value.string_value if kind == "string_value" else None)
                            at_rows["i"].append(str(a.value.int_value) if kind == "int_value" else None)
                            at_rows["d"].append(a.value.double_value if kind == "double_value" else None)
                            at_rows["b"].append(a.value.bool_value if kind == "bool_value" else None)
    return Events(pl.DataFrame(ev_rows, schema=_EV_SCHEMA), pa.table(at_rows, schema=_ATTR_SCHEMA), bad)


# --- typed attribute extraction -----------------------------------------------------------------

_KINDS = ("an empty AnyValue", "stringValue", "intValue", "doubleValue", "boolValue")


def _typed(attrs: pa.Table, keys: dict[str, tuple[str, str]], ev_ids: np.ndarray) -> pl.DataFrame:
    """Per event of ``ev_ids`` (in that order): each key's value as its column, plus ``<col>__err``
    (why a present value is unusable, else null). One pass: attribute rows are scattered into
    (key x event) arrays by NumPy fancy indexing; the attribute rows stay in Arrow throughout."""
    names = list(keys)
    n, k = len(ev_ids), len(names)
    code = pc.fill_null(pc.index_in(attrs.column("key"), value_set=pa.array(names, pa.string())), -1).to_numpy()
    owner = attrs.column("ev").to_numpy()
    pos = np.full(int(max(ev_ids.max(initial=-1), owner.max(initial=-1))) + 1, -1, dtype=np.int64)
    pos[ev_ids] = np.arange(n)
    row = pos[owner]
    hit = (code >= 0) & (row >= 0)
    sub = attrs.select(["s", "i", "d", "b"])
    if not hit.all():
        sub, row, code = sub.filter(pa.array(hit)), row[hit], code[hit]
    flat = code.astype(np.int64) * n + row  # position in the (key x event) arrays, flattened
    valid = [pc.is_valid(sub.column(c)).to_numpy(zero_copy_only=False) for c in ("s", "i", "d", "b")]
    ival = _ints(sub.column("i"))
    present = np.zeros(k * n, dtype=bool)
    kinds = np.zeros(k * n, dtype=np.int8)
    ints = np.zeros(k * n, dtype=np.int64)
    int_ok = np.zeros(k * n, dtype=bool)
    present[flat] = True
    kinds[flat] = np.select(valid, [1, 2, 3, 4], 0)
    ints[flat] = pc.fill_null(ival, 0).to_numpy()
    int_ok[flat] = pc.is_valid(ival).to_numpy(zero_copy_only=False)
    present, kinds, ints, int_ok = (x.reshape(k, n) for x in (present, kinds, ints, int_ok))
    if any(want == "float" for _, want in keys.values()):
        dbls = np.full(k * n, np.nan)
        dbls[flat] = pc.fill_null(sub.column("d"), np.nan).to_numpy()
        dbls = dbls.reshape(k, n)
    out: dict[str, pl.Series] = {}
    for j, key in enumerate(names):
        col, want = keys[key]
        kj, pj, okj = kinds[j], present[j], int_ok[j]
        if want == "int":
            value = pa.array(ints[j], mask=~(pj & (kj == 2) & okj))
            err = np.where(pj & (kj != 2), kj, np.where(pj & (kj == 2) & ~okj, 9, -1))
            exp = "intValue"
        elif want == "float":
            ok = pj & ((kj == 3) | ((kj == 2) & okj))
            value = pa.array(np.where(kj == 3, dbls[j], ints[j].astype(np.float64)), mask=~ok)
            err = np.where(pj & ~np.isin(kj, (2, 3)), kj, np.where(pj & (kj == 2) & ~okj, 9, -1))
            exp = "doubleValue or intValue"
        else:
            mine = code == j
            strs = np.full(n, None, dtype=object)
            strs[row[mine]] = sub.column("s").filter(pa.array(mine)).to_pylist()
            value = pa.array(strs.tolist(), type=pa.string())
            err = np.where(pj & (kj != 1), kj, -1)
            exp = "stringValue"
        out[col] = pl.Series(col, value)
        out[f"{col}__err"] = _messages(f"{col}__err", err, key, exp)
    return pl.DataFrame(out)


def _messages(name: str, err: np.ndarray, key: str, exp: str) -> pl.Series:
    """Error codes (-1 none, else a ``_KINDS`` index, 9 not a number) as messages; most columns of
    most chunks have none, and skip the mapping."""
    if not (err >= 0).any():
        return pl.repeat(None, len(err), dtype=pl.String, eager=True).alias(name)
    messages = {c: f"{key}: expected {exp}, got {_KINDS[c]}" for c in range(5)} | {9: f"{key}: intValue is not a number"}
    return pl.Series(name, err, dtype=pl.Int8).replace_strict(messages, default=None, return_dtype=pl.String)


def _ints(strings: pa.ChunkedArray) -> pa.Array:
    """OTLP/JSON ``intValue`` strings as int64, null where not a number. Arrow's cast is the fast
    path; only a chunk holding a bad value goes through Polars' lenient cast (blanks stripped)."""
    try:
        return pc.cast(strings, pa.int64()).combine_chunks()
    except pa.ArrowInvalid:
        lenient = pl.Series(strings.combine_chunks()).str.strip_chars().cast(pl.Int64, strict=False)
        return lenient.to_arrow()


def _first_error(cols: list[str]) -> pl.Expr:
    return pl.coalesce([pl.col(f"{c}__err") for c in cols])


def _quarantine(df: pl.DataFrame, source: str, reason: pl.Expr, attribute: pl.Expr) -> pl.DataFrame:
    return df.select(pl.lit(source).alias("source"), pl.col("line"), pl.col("span_id"), pl.col("name").alias("event"),
                     attribute.alias("attribute"), reason.alias("reason"), pl.lit(None, pl.String).alias("detail")
                     ).cast(QUARANTINE_SCHEMA)


def bad_line_rows(bad: list[tuple[int, str]], source: str) -> pl.DataFrame:
    return pl.DataFrame({"source": [source] * len(bad), "line": [b[0] for b in bad], "span_id": [None] * len(bad),
                         "event": [None] * len(bad), "attribute": [None] * len(bad),
                         "reason": [b[1].split(" (", 1)[0] for b in bad], "detail": [b[1] for b in bad]},
                        schema=QUARANTINE_SCHEMA)


@dataclass
class StepCut:
    steps: pl.DataFrame  # schema columns + service, line
    quarantine: pl.DataFrame
    idle: pl.DataFrame  # empty batches: dropped, but they count as sampled steps


def cut_steps(events: Events, source: str) -> StepCut:
    """``step.BATCH_SUMMARY`` events -> steps rows; unusable ones to quarantine; idle steps dropped."""
    ev = events.ev.filter(pl.col("name") == "step.BATCH_SUMMARY")
    keys = {**STEP_ATTRIBUTES, **{k: (c, "int") for k, c in KV_OPTIONAL.items()}}
    df = ev.hstack(_typed(events.attrs, keys, ev["ev"].to_numpy())).with_columns(pl.col("time_ns").cast(pl.Int64, strict=False).alias("event_ns"))
    required = [c for c, _ in STEP_ATTRIBUTES.values()]
    missing = pl.coalesce([pl.when(pl.col(c).is_null() & pl.col(f"{c}__err").is_null()).then(pl.lit(k))
                           for k, (c, _) in STEP_ATTRIBUTES.items()])
    df = df.with_columns(
        pl.coalesce(_first_error([c for c, _ in keys.values()]),
                    pl.when(missing.is_not_null()).then(pl.format("missing required attribute {}", missing)),
                    pl.when(pl.col("event_ns").is_null()).then(pl.lit("timeUnixNano is not an integer")))
        .alias("_reason"),
    )
    # monotonic step clocks -> wall clock, anchored at the event time (the step's end)
    mono = (pl.col("ts_end_ns") - pl.col("event_ns")).abs() > _DAY_NS
    df = df.with_columns(
        pl.when(mono).then(pl.col("event_ns") - (pl.col("ts_end_ns") - pl.col("ts_start_ns"))).otherwise(pl.col("ts_start_ns")).alias("ts_start_ns"),
        pl.when(mono).then(pl.col("event_ns")).otherwise(pl.col("ts_end_ns")).alias("ts_end_ns"),
        *[pl.col(c).fill_null(0) for c in KV_OPTIONAL.values()],
    )
    df = df.with_columns(pl.coalesce(
        pl.col("_reason"),
        pl.when(pl.col("ts_end_ns") < pl.col("ts_start_ns")).then(pl.lit("negative step duration: step.ts_end_ns before step.ts_start_ns (clock skew?)")),
        pl.when(pl.col("duration_us") < 0).then(pl.lit("negative step.duration_us")),
        pl.when(pl.col("kv_usage_gpu_ratio").is_nan()).then(pl.lit("kv.usage_gpu_ratio is NaN")),
        _negative(required),
    ).alias("_reason"))
    bad = df.filter(pl.col("_reason").is_not_null())
    quarantine = _quarantine(bad, source, pl.col("_reason"), pl.col("_reason").str.extract(r"([a-z_]+\.[a-z_]+(?:\.[a-z_]+)*)", 1))
    good = df.filter(pl.col("_reason").is_null())
    idle = good.filter((pl.col("num_prefill_reqs") + pl.col("num_decode_reqs")) == 0)
    good = good.filter((pl.col("num_prefill_reqs") + pl.col("num_decode_reqs")) > 0)
    cols = [c for c, _ in STEP_ATTRIBUTES.values()] + list(KV_OPTIONAL.values())
    return StepCut(good.select("service", "line", *cols), quarantine, idle.select("service", "line", *cols))


def _negative(cols: list[str]) -> pl.Expr:
    return pl.coalesce([pl.when(pl.col(c) < 0).then(pl.lit(f"{_attr_of(c)} is negative")) for c in cols])


def _attr_of(col: str) -> str:
    return next(k for k, (c, _) in STEP_ATTRIBUTES.items() if c == col)


STAGED_SCHEMA = {"service": pl.String, "line": pl.Int64, "span_id": pl.String, "trace_id": pl.String,
                 "scope": pl.String, "span_request_id": pl.String, "name": pl.String, "time_ns": pl.Int64,
                 **{c: (pl.String if k == "str" else pl.Int64) for c, k in REQUEST_EVENT_ATTRIBUTES.values()}}


def stage_request_events(events: Events, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``api.*``/``journey.*``/``step.REQUEST_SNAPSHOT`` events with the attributes the assembly reads."""
    ev = events.ev.filter(pl.col("name").str.starts_with("api.") | pl.col("name").str.starts_with("journey.")
                          | (pl.col("name") == "step.REQUEST_SNAPSHOT"))
    df = ev.hstack(_typed(events.attrs, REQUEST_EVENT_ATTRIBUTES, ev["ev"].to_numpy())).with_columns(pl.col("time_ns").alias("_t"),
                                                         pl.col("time_ns").cast(pl.Int64, strict=False))
    cols = [c for c, _ in REQUEST_EVENT_ATTRIBUTES.values()]
    df = df.with_columns(pl.coalesce(
        _first_error(cols),
        pl.when(pl.col("time_ns").is_null()).then(pl.lit("timeUnixNano is not an integer")),
    ).alias("_reason"))
    # an attribute present with the wrong type is a bad event; one merely absent is handled at assembly
    present_bad = df.filter(pl.col("_reason").is_not_null())
    quarantine = _quarantine(present_bad, source, pl.col("_reason"), pl.col("_reason").str.extract(r"^([a-z_]+[a-z_.]*):", 1))
    good = df.join(present_bad.select("ev"), on="ev", how="anti")
    return good.select(list(STAGED_SCHEMA)).cast(STAGED_SCHEMA), quarantine


def unknown_event_counts(events: Events) -> dict[str, int]:
    unknown = events.ev.filter(~pl.col("name").is_in(list(KNOWN_EVENTS)))
    return {str(k): int(v) for k, v in unknown.group_by("name").len().iter_rows()}


def assemble_requests(staged: pl.DataFrame, source: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Join one file's staged request events into ``requests`` rows (plus ``service``); incomplete or
    inconsistent requests go to quarantine. ``departed_ns`` stays null without ``api.DEPARTED``."""
    trace_events = staged.filter(pl.col("name") != "step.REQUEST_SNAPSHOT")
    ids = trace_events.filter(pl.col("span_request_id").is_not_null()).group_by("trace_id").agg(
        pl.col("span_request_id").filter(pl.col("scope") == "vllm.api").first().alias("api_id"),
        pl.col("span_request_id").filter(pl.col("scope") != "vllm.api").first().alias("core_id"),
    )
    snaps = staged.filter(pl.col("name") == "step.REQUEST_SNAPSHOT").join(
        ids.select("trace_id", pl.col("core_id").alias("snap_request_id")).drop_nulls(), on="snap_request_id", how="inner",
        suffix="_t").with_columns(pl.col("trace_id_t").alias("trace_id"))

    def t(name: str, agg: str) -> pl.Expr:
        e = pl.col("time_ns").filter(pl.col("name") == name)
        return (e.min() if agg == "min" else e.max()).alias(name)

    per = trace_events.group_by("trace_id").agg(
        pl.col("service").drop_nulls().first(), pl.col("line").min(), pl.col("span_id").first(),
        t("api.ARRIVED", "min"), t("journey.QUEUED", "min"), t("journey.SCHEDULED", "min"),
        t("journey.FIRST_TOKEN", "min"), t("journey.FINISHED", "max"), t("api.DEPARTED", "max"),
        pl.col("prefill_total").max(), pl.col("decode_done").max(), pl.col("preemptions").max(),
    )
    snap = snaps.group_by("trace_id").agg(
        pl.col("snap_prompt").max(), pl.col("snap_output").max(), pl.col("snap_preemptions").max(),
        (pl.col("snap_prompt") - pl.col("snap_effective")).max().alias("snap_cached"),
    )
    df = per.join(ids, on="trace_id", how="left").join(snap, on="trace_id", how="left")
    df = df.select(
        "service", "line", "span_id", "trace_id",
        pl.coalesce("api_id", "core_id", "trace_id").alias("request_id"),
        pl.col("api.ARRIVED").alias("arrival_ns"),
        pl.col("journey.QUEUED").alias("queued_ns"),
        pl.col("journey.SCHEDULED").alias("scheduled_ns"),
        pl.col("journey.FIRST_TOKEN").alias("first_token_ns"),
        pl.col("journey.FINISHED").alias("finished_ns"),
        pl.col("api.DEPARTED").alias("departed_ns"),
        pl.coalesce("prefill_total", "snap_prompt").alias("prompt_tokens"),
        pl.max_horizontal(pl.col("snap_cached").fill_null(0), pl.lit(0)).alias("cached_prompt_tokens"),
        pl.max_horizontal(pl.col("decode_done"), pl.col("snap_output")).fill_null(0).alias("output_tokens"),
        pl.max_horizontal(pl.col("preemptions"), pl.col("snap_preemptions")).fill_null(0).alias("num_preemptions"),
    )
    reason = pl.coalesce(
        pl.when(pl.col("arrival_ns").is_null()).then(pl.lit("request without api.ARRIVED (its llm_request span is not in this file)")),
        pl.when(pl.col("queued_ns").is_null()).then(pl.lit("request without journey.QUEUED (its llm_core span is not in this file)")),
        pl.when(pl.col("prompt_tokens").is_null()).then(pl.lit("missing required attribute prefill.total_tokens")),
        pl.when(pl.col("queued_ns") < pl.col("arrival_ns")).then(pl.lit("negative duration: journey.QUEUED before api.ARRIVED (clock skew?)")),
        pl.when(pl.col("first_token_ns") < pl.col("queued_ns")).then(pl.lit("negative duration: journey.FIRST_TOKEN before journey.QUEUED (clock skew?)")),
        pl.when(pl.col("departed_ns") < pl.col("arrival_ns")).then(pl.lit("negative duration: api.DEPARTED before api.ARRIVED (clock skew?)")),
    )
    df = df.with_columns(reason.alias("_reason"))
    bad = df.filter(pl.col("_reason").is_not_null()).with_columns(pl.lit("request").alias("name"))
    quarantine = _quarantine(bad, source, pl.col("_reason"),
                             pl.col("_reason").str.extract(r"((?:api|journey)\.[A-Z_]+|prefill\.total_tokens)", 1))
    return df.filter(pl.col("_reason").is_null()).drop("_reason", "trace_id", "span_id"), quarantine
