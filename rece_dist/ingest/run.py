"""``rece ingest``: convert trace files into a store, streaming, as Ray tasks, idempotently.

Per source file: hash it (its identity), skip it if its ledger exists, then stream it in chunks
of about ``chunk_bytes`` cut at record boundaries (a local uncompressed OTLP/JSON file is hashed
and cut in the same pass, and each task reads its own byte range, so its bytes never travel
through the driver or the object store); each chunk is one Ray task that parses it,
writes its ``steps`` (or client-side ``requests``) rows into part files named by the source hash
and the chunk, its bad rows into the quarantine table, and a chunk marker. At most two chunks
per CPU are in flight, so memory is bounded by the chunk size whatever the file size. For OTLP,
request events are staged per chunk and one more task per file joins them into ``requests``
rows (a request's API and engine spans may be far apart in the file). The ledger, written last,
holds the per-file summary.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from ..config import Catalog, DeploymentConfig, load_config_file
from ..errors import IngestError
from ..progress import log
from ..store import Store
from . import otlp, sources, writer

FORMATS = ("otlp", "tracev2", "inference-perf")
DEFAULT_CHUNK_BYTES = 64 << 20


@dataclass(frozen=True)
class IngestOptions:
    fmt: str
    encoding: str = "json"  # otlp only: json | proto
    strict: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    step_sample_rate: float | None = None  # as configured in vLLM (--step-tracing-sample-rate); else estimated
    time_origin_ns: int | None = None  # epoch ns of the first request, for client clocks without an epoch


@dataclass
class FileSummary:
    source: str
    sha256: str
    skipped: bool = False
    rows: dict[str, int] = field(default_factory=dict)
    dropped: dict[str, int] = field(default_factory=dict)
    idle_steps_dropped: int = 0
    unknown_events: dict[str, int] = field(default_factory=dict)
    partitions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "sha256": self.sha256, "rows": self.rows, "dropped": self.dropped,
                "idle_steps_dropped": self.idle_steps_dropped, "unknown_events": self.unknown_events,
                "partitions": self.partitions, "notes": self.notes}

    @classmethod
    def from_dict(cls, d: dict[str, Any], skipped: bool) -> "FileSummary":
        return cls(d["source"], d["sha256"], skipped, d["rows"], d["dropped"], d["idle_steps_dropped"],
                   d["unknown_events"], d["partitions"], d["notes"])

    def text(self) -> str:
        if self.skipped:
            return f"{self.source}: already ingested (sha256 {self.sha256[:16]}); nothing written"
        rows = ", ".join(f"{t} {n}" for t, n in sorted(self.rows.items())) or "no rows"
        parts = [f"{self.source}: wrote {rows} in {len(self.partitions)} partitions"]
        if self.idle_steps_dropped:
            parts.append(f"idle steps dropped {self.idle_steps_dropped}")
        if self.dropped:
            parts.append("quarantined " + "; ".join(f"{n} x {r}" for r, n in sorted(self.dropped.items(), key=lambda x: -x[1])))
        if self.unknown_events:
            parts.append("unknown events (counted, skipped) " + ", ".join(f"{k} x{v}" for k, v in sorted(self.unknown_events.items())))
        rates = sorted({p["step_sample_rate"] for p in self.partitions if p.get("step_sample_rate") is not None})
        if rates:
            parts.append("step sample rate " + ", ".join(f"{r:.4g}" for r in rates))
        return "; ".join(parts) + "".join(f"\n  note: {n}" for n in self.notes)


# --- configurations -----------------------------------------------------------------------------

def load_routes(specs: list[str], catalog: Catalog | None = None) -> dict[str | None, DeploymentConfig]:
    """``--config`` values -> {service.name or None (any): configuration}.

    A value is a configuration document, an experiment folder (``exp-config.yaml`` and the model's
    ``config.json``), or ``SERVICE=either`` to route one deployment of a multi-deployment file.
    """
    from ..realism import experiment_config

    catalog = catalog or Catalog.default()
    routes: dict[str | None, DeploymentConfig] = {}
    for spec in specs:
        service, path = (None, spec)
        if "=" in spec and not os.path.exists(spec):
            service, path = spec.split("=", 1)
        p = Path(path)
        if p.is_dir():
            if not (p / "exp-config.yaml").is_file():
                raise IngestError(f"{path}: a folder given as --config needs an exp-config.yaml")
            cfg = experiment_config(p, catalog)
        else:
            cfg = load_config_file(p, catalog)
        if service in routes:
            raise IngestError(f"--config {spec}: {'service ' + service if service else 'a default configuration'} is given twice")
        routes[service] = cfg
    if not routes:
        raise IngestError("ingest needs --config CFG (a configuration document or an experiment folder)")
    return routes


def _route(df: pl.DataFrame, routes: dict[str | None, str], where: str) -> pl.DataFrame:
    """Add ``config_id`` from the rows' ``service.name``; more deployments than configurations is an error."""
    named = {k: v for k, v in routes.items() if k is not None}
    if "service" not in df.columns:  # client-side formats: one deployment per file
        if None not in routes:
            raise IngestError(f"{where}: this format carries no service.name; give a plain --config CFG")
        return df.with_columns(pl.lit(routes[None]).alias("config_id"))
    services = sorted(s for s in df["service"].unique().to_list() if s is not None)
    if not named:
        if len(services) > 1:
            raise IngestError(f"{where}: events from {len(services)} deployments (service.name {', '.join(services)}); "
                              "give one --config SERVICE=CFG per deployment")
        return df.with_columns(pl.lit(routes[None]).alias("config_id"))
    unknown = [s for s in services if s not in named]
    if unknown and None not in routes:
        raise IngestError(f"{where}: service.name {', '.join(unknown)} has no --config SERVICE=CFG "
                          f"(configured: {', '.join(sorted(named))})")
    df = df.with_columns(pl.col("service").replace_strict(named, default=routes.get(None), return_dtype=pl.String)
                         .alias("config_id"))
    if df["config_id"].null_count():
        raise IngestError(f"{where}: {df['config_id'].null_count()} row(s) from spans without service.name; "
                          "add a plain --config CFG for them")
    return df


# --- chunk tasks --------------------------------------------------------------------------------

def _strict_error(q: pl.DataFrame) -> IngestError:
    r = q.row(0, named=True)
    where = f"{r['source']}:{r['line']}" if r["line"] is not None else r["source"]
    what = " ".join(x for x in (r["event"] and f"event {r['event']}", r["span_id"] and f"(span {r['span_id']})") if x)
    more = f" (and {len(q) - 1} more bad rows)" if len(q) > 1 else ""
    return IngestError(f"{where}: {what + ': ' if what else ''}{r['detail'] or r['reason']}{more}")


def _finish_chunk(store: Store, src: str, chunk: int | str, source: str, quarantine: pl.DataFrame, strict: bool,
                  tables: dict[str, pl.DataFrame], routes: dict[str | None, str], extra: dict[str, Any]) -> dict[str, Any]:
    if strict and not quarantine.is_empty():
        raise _strict_error(quarantine)
    result: dict[str, Any] = {"partitions": {}, "rows": {}, "dropped": dict(Counter(quarantine["reason"].to_list())), **extra}
    for table, df in tables.items():
        routed = _route(df, routes, source)
        parts = writer.write_rows(store, table, routed, src, chunk, source)
        result["partitions"].update(parts)
        result["rows"][table] = len(df)
    writer.write_quarantine(store, quarantine, src, chunk)
    writer.write_json(store, writer.chunk_marker(src, chunk), result)
    return result


def convert_chunk(store: Store, src: str, source: str, opts: IngestOptions, routes: dict[str | None, str],
                  index: int, first: int, head: bytes, payload: Any) -> dict[str, Any]:
    """One Ray task: parse one chunk and write what it yields (``store`` carries its S3 settings)."""
    if isinstance(payload, sources.ByteRange):
        payload = payload.read()
    if opts.fmt == "otlp":
        events = otlp.parse_proto_messages(payload) if opts.encoding == "proto" else otlp.parse_json_lines(payload, first)
        cut = otlp.cut_steps(events, source)
        staged, q2 = otlp.stage_request_events(events, source)
        quarantine = pl.concat([otlp.bad_line_rows(events.bad_lines, source), cut.quarantine, q2])
        if opts.strict and not quarantine.is_empty():
            raise _strict_error(quarantine)
        ranges = writer.step_ranges(_route(pl.concat([cut.steps, cut.idle]), routes, source))
        writer.write_parquet_staged(store, staged, src, index)
        extra = {"idle": len(cut.idle), "unknown": otlp.unknown_event_counts(events), "ranges": ranges,
                 "services": sorted(s for s in events.ev["service"].unique().to_list() if s is not None)}
        return _finish_chunk(store, src, index, source, quarantine, opts.strict, {"steps": cut.steps}, routes, extra)
    if opts.fmt == "tracev2":
        from .tracev2 import parse_chunk
    else:
        from .inference_perf import parse_chunk
    requests, quarantine = parse_chunk(head, payload, first, source, src, opts.time_origin_ns)
    return _finish_chunk(store, src, index, source, quarantine, opts.strict, {"requests": requests}, routes, {})


def assemble_file(store: Store, src: str, source: str, opts: IngestOptions, routes: dict[str | None, str]) -> dict[str, Any]:
    """One Ray task per OTLP file: join its staged request events into requests rows."""
    staged = writer.read_staged(store, src)
    requests, quarantine = otlp.assemble_requests(staged, source)
    return _finish_chunk(store, src, "r", source, quarantine, opts.strict, {"requests": requests}, routes, {})


# --- the driver ---------------------------------------------------------------------------------

def _chunks(source: sources.Source, opts: IngestOptions):
    if opts.fmt == "otlp" and opts.encoding == "proto":
        for index, first, batch in sources.proto_chunks(source, opts.chunk_bytes):
            yield index, first, b"", batch
    elif opts.fmt == "inference-perf":
        from .inference_perf import record_chunks

        yield from record_chunks(source, opts.chunk_bytes)
    else:  # the chunk is a view of a reused buffer, copied once into the object store by task.remote;
        # as a uint8 array Ray hands it to the task without copying it again
        for index, first, head, data in sources.line_chunks(source, opts.chunk_bytes, header=opts.fmt == "tracev2"):
            yield index, first, head, np.frombuffer(data, dtype=np.uint8) if opts.fmt == "otlp" else bytes(data)


def ingest(inputs: list[str], store_uri: str, config_specs: list[str], opts: IngestOptions) -> list[FileSummary]:
    """Ingest every file the inputs name into the store at ``store_uri``; one summary per file."""
    import ray

    from ..progress import gather

    if opts.fmt not in FORMATS:
        raise IngestError(f"unknown format {opts.fmt!r}; one of {', '.join(FORMATS)}")
    if opts.step_sample_rate is not None and not 0 < opts.step_sample_rate <= 1:
        raise IngestError(f"--step-sample-rate must be in (0, 1], got {opts.step_sample_rate}")
    routes_cfg = load_routes(config_specs)
    found = sources.expand(inputs)
    store = Store(store_uri)
    if not store.exists():
        store.init({"generator": "rece ingest"})
    for cfg in routes_cfg.values():
        store.write_config(cfg)
    routes = {k: v.config_id for k, v in routes_cfg.items()}
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    in_flight = max(2, 2 * int(ray.available_resources().get("CPU", 1)))
    task = ray.remote(num_cpus=1, max_retries=0)(convert_chunk)
    out = []
    for source in found:
        indexed = sources.index_lines(source, opts.chunk_bytes) if opts.fmt == "otlp" and opts.encoding == "json" else None
        sha = indexed[0] if indexed else sources.digest(source)
        src = sha[:16]
        done = writer.read_json_or_none(store, writer.ledger_path(src))
        if done is not None:
            out.append(FileSummary.from_dict(done, skipped=True))
            log(f"ingest: {source.uri}: already ingested")
            continue
        file_opts = opts
        if opts.fmt == "tracev2" and opts.time_origin_ns is None and not source.is_s3:
            from .tracev2 import header_origin

            file_opts = dataclasses.replace(opts, time_origin_ns=header_origin(source.path))
        results: list[Any] = []
        pending: list[Any] = []
        chunks = (((i, first, b"", r) for i, (r, first) in enumerate(zip(indexed[1], indexed[2]))) if indexed
                  else _chunks(source, opts))
        for index, first, head, payload in chunks:
            marker = writer.read_json_or_none(store, writer.chunk_marker(src, index))
            if marker is not None:
                results.append(marker)
                continue
            pending.append(task.remote(store, src, source.uri, file_opts, routes, index, first, head, payload))
            if len(pending) >= in_flight:  # backpressure: the reader never runs more than in_flight chunks ahead
                ready, pending = ray.wait(pending, num_returns=1)
                results.extend(_get(ready))
                log(f"  ingest {source.uri}: {len(results)} chunks done")
        results.extend(gather(pending, f"ingest {source.uri}") if pending else [])
        if opts.fmt == "otlp":
            _check_services(results, routes, source.uri)
            marker = writer.read_json_or_none(store, writer.chunk_marker(src, "r"))
            results.append(marker if marker is not None else
                           gather([ray.remote(num_cpus=1, max_retries=0)(assemble_file).remote(store, src, source.uri, opts, routes)],
                                  f"ingest {source.uri}: requests")[0])
        summary = _summarise(source.uri, sha, results, opts)
        writer.write_json(store, writer.ledger_path(src), summary.to_dict())
        out.append(summary)
    return out


def _get(refs: list[Any]) -> list[Any]:
    """``ray.get`` that surfaces bad input found inside a task as its own one-line error."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, IngestError):
            raise exc.cause from None
        raise


def _check_services(results: list[dict[str, Any]], routes: dict[str | None, str], where: str) -> None:
    services = sorted({s for r in results for s in r.get("services", [])})
    if len(services) > 1 and not any(k is not None for k in routes):
        raise IngestError(f"{where}: events from {len(services)} deployments (service.name {', '.join(services)}); "
                          "give one --config SERVICE=CFG per deployment")


def _summarise(source: str, sha: str, results: list[dict[str, Any]], opts: IngestOptions) -> FileSummary:
    rows: Counter = Counter()
    dropped: Counter = Counter()
    unknown: Counter = Counter()
    parts: dict[str, dict[str, Any]] = {}
    ranges: dict[str, dict[str, int]] = {}
    idle = 0
    for r in results:
        rows.update(r["rows"])
        dropped.update(r["dropped"])
        unknown.update(r.get("unknown", {}))
        idle += r.get("idle", 0)
        for key, p in r["partitions"].items():
            cur = parts.setdefault(key, {**p, "rows": 0, "key": key})
            cur["rows"] += p["rows"]
        for key, g in r.get("ranges", {}).items():
            cur = ranges.setdefault(key, {"sampled": 0, "first": g["first"], "last": g["last"]})
            cur["sampled"] += g["sampled"]
            cur["first"], cur["last"] = min(cur["first"], g["first"]), max(cur["last"], g["last"])
    notes = []
    for key, p in parts.items():
        if p["table"] != "steps":
            continue
        g = ranges.get(key)
        estimated = g["sampled"] / (g["last"] - g["first"] + 1) if g else None
        p["step_sample_rate_estimated"] = estimated
        p["step_sample_rate"] = opts.step_sample_rate if opts.step_sample_rate is not None else estimated
        p["step_sample_rate_source"] = "configured" if opts.step_sample_rate is not None else "estimated from step.id gaps"
    if opts.fmt != "otlp":
        notes.append("client-side trace: no engine steps; queued_ns, scheduled_ns and finished_ns are null, "
                     "cached_prompt_tokens and num_preemptions are 0 (not observed); see docs/collecting.md")
    return FileSummary(source, sha, False, dict(rows), dict(dropped), idle, dict(unknown),
                       sorted(parts.values(), key=lambda p: p["key"]), notes)


def parse_time_origin(s: str) -> int:
    """ISO-8601 (``2026-02-17T15:54:51Z``) -> epoch ns."""
    from datetime import datetime, timezone

    try:
        t = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError:
        raise IngestError(f"--time-origin must be an ISO-8601 time such as 2026-02-17T15:54:51Z, got {s!r}") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return int(t.timestamp() * 1e6) * 1000

