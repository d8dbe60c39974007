"""What the instrumented vLLM (``inference-sim/vllm``) would export for a generated run: OTLP/JSON.

``rece synth --format otlp`` writes one file per configuration in the layout an OpenTelemetry
Collector's file exporter produces: one ``ExportTraceServiceRequest`` per line
(``resourceSpans`` -> ``scopeSpans`` -> ``spans`` -> ``events``), attributes as typed
``AnyValue``, 64-bit integers as strings, times in ``timeUnixNano``. The scopes and names are
the fork's (``vllm/tracing.py``; ``inference-sim/training`` ``schemas.py``):

- ``vllm.scheduler.step``: spans ``scheduler_steps_N`` holding one ``step.BATCH_SUMMARY`` per
  step (every step: the generator samples at rate 1) and ``step.REQUEST_SNAPSHOT`` events;
- ``vllm.api``: one ``llm_request`` span per request with ``api.ARRIVED`` / ``api.DEPARTED`` /
  ``api.ABORTED``;
- ``vllm.scheduler``: one ``llm_core`` span per request (child of its ``llm_request``) with
  ``journey.QUEUED`` / ``SCHEDULED`` / ``FIRST_TOKEN`` / ``FINISHED``.

``step.ts_*_ns`` and ``ts.monotonic_ns`` are monotonic clocks (ns since the server started, an
hour before its first step); ``timeUnixNano`` is the wall clock. A request whose final counts the
journey events cannot carry (still in flight, or served partly from the prefix cache) gets one
``step.REQUEST_SNAPSHOT`` at its last event, as a rich-sampled step would record. The importer
(:mod:`rece_dist.ingest.otlp`) reads this back into exactly the tables the generator wrote.
"""

from __future__ import annotations

import hashlib
import json
from typing import IO, Any, Iterator

import numpy as np
import polars as pl

from .otlp import KV_OPTIONAL, STEP_ATTRIBUTES

_BOOT_LEAD_NS = 3600 * 10**9
STEPS_PER_LINE = 256
REQUESTS_PER_LINE = 64


def _int(key: str, v: int) -> dict[str, Any]:
    return {"key": key, "value": {"intValue": str(int(v))}}


def _dbl(key: str, v: float) -> dict[str, Any]:
    return {"key": key, "value": {"doubleValue": float(v)}}


def _str(key: str, v: str) -> dict[str, Any]:
    return {"key": key, "value": {"stringValue": v}}


def _line(service: str, scopes: list[tuple[str, list[dict[str, Any]]]]) -> str:
    doc = {"resourceSpans": [{
        "resource": {"attributes": [_str("service.name", service), _str("telemetry.sdk.name", "opentelemetry")]},
        "scopeSpans": [{"scope": {"name": name}, "spans": spans} for name, spans in scopes if spans],
    }]}
    return json.dumps(doc, separators=(",", ":"))


def _hex(seed: str, nbytes: int) -> str:
    return hashlib.blake2b(seed.encode(), digest_size=nbytes).hexdigest()


def write_otlp(out: IO[str], service: str, steps: pl.DataFrame, requests: pl.DataFrame) -> int:
    """Write one configuration's ``steps`` and ``requests`` tables as OTLP/JSON lines; returns lines written."""
    t0 = min(int(steps["ts_start_ns"].min() or 0) if len(steps) else 2**62,
             int(requests["arrival_ns"].min() or 0) if len(requests) else 2**62)
    boot = t0 - _BOOT_LEAD_NS
    lines = 0
    for line in _step_lines(service, steps, boot):
        out.write(line + "\n")
        lines += 1
    for line in _request_lines(service, requests, steps, boot):
        out.write(line + "\n")
        lines += 1
    return lines


def _step_lines(service: str, steps: pl.DataFrame, boot: int) -> Iterator[str]:
    steps = steps.sort("step_id")
    trace = _hex(f"{service}/steps", 16)
    for seq, start in enumerate(range(0, len(steps), STEPS_PER_LINE), start=1):
        chunk = steps.slice(start, STEPS_PER_LINE)
        events = []
        for r in chunk.iter_rows(named=True):
            attrs = []
            for key, (col, kind) in STEP_ATTRIBUTES.items():
                v = r[col]
                if key == "step.ts_start_ns" or key == "step.ts_end_ns":
                    v -= boot
                attrs.append(_dbl(key, v) if kind == "float" else _int(key, v))
            for key, col in KV_OPTIONAL.items():
                attrs.append(_int(key, r[col]))
            events.append({"timeUnixNano": str(r["ts_end_ns"]), "name": "step.BATCH_SUMMARY", "attributes": attrs})
        first, last = int(chunk["step_id"][0]), int(chunk["step_id"][-1])
        span = {
            "traceId": trace, "spanId": _hex(f"{service}/steps/{seq}", 8), "name": f"scheduler_steps_{seq}", "kind": 1,
            "startTimeUnixNano": str(chunk["ts_start_ns"][0]), "endTimeUnixNano": str(chunk["ts_end_ns"][-1]),
            "attributes": [_int("scheduler.span_sequence", seq), _int("scheduler.step_range_start", first),
                           _int("scheduler.step_range_end", last), _int("scheduler.closure_interval", STEPS_PER_LINE)],
            "events": events, "status": {},
        }
        yield _line(service, [("vllm.scheduler.step", [span])])


def _request_lines(service: str, requests: pl.DataFrame, steps: pl.DataFrame, boot: int) -> Iterator[str]:
    step_starts = steps.sort("ts_start_ns")["ts_start_ns"].to_numpy()
    step_ids = steps.sort("ts_start_ns")["step_id"].to_numpy()
    for start in range(0, len(requests), REQUESTS_PER_LINE):
        api, core, snaps = [], [], []
        for r in requests.slice(start, REQUESTS_PER_LINE).iter_rows(named=True):
            a, c, s = _request_spans(service, r, boot, step_starts, step_ids)
            api.append(a)
            core.append(c)
            if s is not None:
                snaps.append(s)
        scopes = [("vllm.api", api), ("vllm.scheduler", core)]
        if snaps:
            scopes.append(("vllm.scheduler.step", [{
                "traceId": _hex(f"{service}/steps", 16), "spanId": _hex(f"{service}/snap/{start}", 8),
                "name": "scheduler_steps_snapshots", "kind": 1, "startTimeUnixNano": snaps[0]["timeUnixNano"],
                "endTimeUnixNano": snaps[-1]["timeUnixNano"], "attributes": [], "events": snaps, "status": {}}]))
        yield _line(service, scopes)


def _request_spans(service: str, r: dict[str, Any], boot: int, step_starts: np.ndarray, step_ids: np.ndarray):
    rid, prompt, out, npre = r["request_id"], r["prompt_tokens"], r["output_tokens"], r["num_preemptions"]
    trace = _hex(f"{service}/{rid}", 16)
    api_id, core_id = _hex(f"{service}/{rid}/api", 8), _hex(f"{service}/{rid}/core", 8)

    def journey(name: str, t: int, phase: str, done: int, pre: int) -> dict[str, Any]:
        return {"timeUnixNano": str(t), "name": f"journey.{name}", "attributes": [
            _str("event.type", name), _int("ts.monotonic_ns", t - boot), _str("phase", phase),
            _int("prefill.done_tokens", prompt if phase == "DECODE" else 0), _int("prefill.total_tokens", prompt),
            _int("decode.done_tokens", done), _int("num_preemptions", pre)]}

    events = [journey("QUEUED", r["queued_ns"], "WAITING", 0, 0)]
    if r["scheduled_ns"] is not None:
        events.append(journey("SCHEDULED", r["scheduled_ns"], "PREFILL", 0, 0))
    if r["first_token_ns"] is not None:
        events.append(journey("FIRST_TOKEN", r["first_token_ns"], "DECODE", min(out, 1), 0))
    finished = r["finished_ns"] is not None
    if finished:
        fin = journey("FINISHED", r["finished_ns"], "DECODE", out, npre)
        fin["attributes"].append(_str("finish.status", "length" if r["departed_ns"] is not None else "aborted"))
        events.append(fin)
    api_events = [{"timeUnixNano": str(r["arrival_ns"]), "name": "api.ARRIVED", "attributes": []}]
    if r["departed_ns"] is not None:
        api_events.append({"timeUnixNano": str(r["departed_ns"]), "name": "api.DEPARTED", "attributes": []})
    elif finished:
        api_events.append({"timeUnixNano": str(r["finished_ns"]), "name": "api.ABORTED",
                           "attributes": [_str("reason", "client_disconnect")]})
    last = max(int(e["timeUnixNano"]) for e in events + api_events)
    api = {"traceId": trace, "spanId": api_id, "name": "llm_request", "kind": 2,
           "startTimeUnixNano": str(r["arrival_ns"]), "endTimeUnixNano": str(last),
           "attributes": [_str("gen_ai.request.id", rid), _int("gen_ai.usage.prompt_tokens", prompt)],
           "events": api_events, "status": {}}
    core = {"traceId": trace, "spanId": core_id, "parentSpanId": api_id, "name": "llm_core", "kind": 1,
            "startTimeUnixNano": events[0]["timeUnixNano"], "endTimeUnixNano": str(last),
            "attributes": [_str("gen_ai.request.id", rid)], "events": events, "status": {}}
    snap = None
    cached = r["cached_prompt_tokens"]
    if not finished or cached > 0:
        t = max(int(e["timeUnixNano"]) for e in events)
        k = int(np.searchsorted(step_starts, t, side="right")) - 1
        attrs = [_int("step.id", int(step_ids[k]) if k >= 0 else 0), _str("request.id", rid),
                 _str("request.phase", events[-1]["attributes"][2]["value"]["stringValue"]),
                 _int("request.num_prompt_tokens", prompt), _int("request.num_output_tokens", out),
                 _int("request.num_preemptions", npre)]
        if cached > 0:
            attrs.append(_int("request.effective_prompt_len", prompt - cached))
        snap = {"timeUnixNano": str(t), "name": "step.REQUEST_SNAPSHOT", "attributes": attrs}
    return api, core, snap
