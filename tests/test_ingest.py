"""`rece ingest`: real trace formats into a store, checked against known data.

The end-to-end check: `rece synth --format otlp` writes what instrumented vLLM would export for
a generated run, and ingesting it must reproduce, table for table, the store `rece synth` writes
directly from the same seed. The hand-written fixtures (tests/fixtures/ingest, built from the
attribute names of inference-sim/vllm's tracing, BLIS TraceV2 and inference-perf) pin the
mapping row by row and every kind of bad input.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import struct
from pathlib import Path

import polars as pl
import pytest

from rece_dist.cli import main
from rece_dist.errors import IngestError
from rece_dist.ingest.run import IngestOptions, ingest
from rece_dist.ingest.writer import sample_rates
from rece_dist.store import Store
from rece_dist.synth import generate_store
from rece_dist.validate import validate_store

FIX = Path(__file__).parent / "fixtures" / "ingest"
CFG = str(FIX / "llama2-7b.json")
T = 1771343691_000_000_000  # 2026-02-17T15:54:51Z, the fixtures' wall-clock origin
MS = 10**6


def tables(uri: str) -> dict[str, pl.DataFrame]:
    store = Store(uri)
    out = {}
    for t in ("steps", "requests"):
        frames = [store.scan(p) for p in store.partitions(t)]
        out[t] = pl.concat(frames).sort(pl.all()) if frames else pl.DataFrame()
    return out


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def quarantine(uri: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted(Path(uri, "quarantine").glob("*.parquet"))])


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory, ray_local):
    """(direct store, OTLP folder, ingested store) for the same generated run; small chunks so
    every file is cut into several Ray tasks."""
    base = tmp_path_factory.mktemp("rt")
    direct, otlp, ingested = str(base / "direct"), str(base / "otlp"), str(base / "ingested")
    generate_store(direct, 3, 2500, seed=1, days=2)
    generate_store(otlp, 3, 2500, seed=1, days=2, fmt="otlp")
    for cfg in sorted(Path(otlp, "configs").glob("*.json")):
        ingest([str(Path(otlp, "otlp", cfg.stem + ".jsonl"))], ingested, [str(cfg)],
               IngestOptions("otlp", chunk_bytes=1 << 20))
    return direct, otlp, ingested


def test_synth_to_otlp_to_ingest_reproduces_the_store(round_trip):
    direct, _, ingested = round_trip
    a, b = tables(direct), tables(ingested)
    for t in ("steps", "requests"):
        assert len(a[t]) > 1000
        assert a[t].equals(b[t]), t
    assert {(p.config_id, p.date) for p in Store(direct).partitions("steps")} == \
           {(p.config_id, p.date) for p in Store(ingested).partitions("steps")}
    report = validate_store(ingested)
    assert report.rows == validate_store(direct).rows
    # every step was exported: the estimated sample rate is exactly 1 in every partition
    assert set(sample_rates(Store(ingested)).values()) == {1.0}
    # the request mix covers what the writer must encode: aborted, in flight, cached, preempted
    r = a["requests"]
    assert r.filter(pl.col("departed_ns").is_null() & pl.col("finished_ns").is_not_null()).height > 0
    assert r.filter(pl.col("finished_ns").is_null()).height > 0
    assert r.filter(pl.col("cached_prompt_tokens") > 0).height > 0
    assert r.filter(pl.col("num_preemptions") > 0).height > 0


def test_ingesting_again_changes_nothing_and_a_crash_is_finished_without_duplicates(round_trip, tmp_path):
    _, otlp, ingested = round_trip
    store_dir = tmp_path / "store"
    shutil.copytree(ingested, store_dir)
    before = files(store_dir)
    cfg = sorted(Path(otlp, "configs").glob("*.json"))[0]
    src = str(Path(otlp, "otlp", cfg.stem + ".jsonl"))
    (summary,) = ingest([src], str(store_dir), [str(cfg)], IngestOptions("otlp", chunk_bytes=1 << 20))
    assert summary.skipped and files(store_dir) == before

    # a crash after some chunks: no ledger, one chunk marker and its part files gone
    sha = summary.sha256[:16]
    (store_dir / "ingest" / f"{sha}.json").unlink()
    (store_dir / "ingest" / sha / "chunk-00001.json").unlink()
    for part in store_dir.glob(f"steps/*/*/part-{sha}-00001.parquet"):
        part.unlink()
    (summary,) = ingest([src], str(store_dir), [str(cfg)], IngestOptions("otlp", chunk_bytes=1 << 20))
    assert not summary.skipped
    assert files(store_dir) == before


def test_a_compressed_file_streamed_in_chunks_gives_the_rows_of_the_plain_file(round_trip, tmp_path):
    """A gzip file is cut by the driver's stream (a plain local file is cut in its hash pass and
    read by the tasks): several 1 MiB chunks of each must give the same rows."""
    _, otlp, ingested = round_trip
    cfg = sorted(Path(otlp, "configs").glob("*.json"))[0]
    gz = tmp_path / "traces.jsonl.gz"
    gz.write_bytes(gzip.compress(Path(otlp, "otlp", cfg.stem + ".jsonl").read_bytes()))
    store = str(tmp_path / "gz")
    ingest([str(gz)], store, [str(cfg)], IngestOptions("otlp", chunk_bytes=1 << 20))
    want = {t: df.filter(pl.col("config_id") == cfg.stem) for t, df in tables(ingested).items()}
    got = tables(store)
    assert len(list(Path(store, "ingest").glob("*/chunk-0000[1-9].json"))) > 0  # really several chunks
    for t in ("steps", "requests"):
        assert len(got[t]) > 100 and got[t].equals(want[t]), t


def test_an_ingested_store_trains(round_trip, tmp_path, capsys):
    _, _, ingested = round_trip
    assert main(["train", "--store", ingested, "--out", str(tmp_path / "art"), "--specialists", "1"]) == 0
    assert "pinball P50" in capsys.readouterr().out


def test_vllm_fixture_maps_row_by_row(ray_local, tmp_path):
    store = str(tmp_path / "s")
    (summary,) = ingest([str(FIX / "vllm_otlp.jsonl")], store, [CFG], IngestOptions("otlp"))
    t = tables(store)
    steps = t["steps"].sort("step_id")
    # the idle step (empty batch) is dropped and counted; the unknown event is counted, not fatal
    assert steps["step_id"].to_list() == [100, 104]
    assert summary.idle_steps_dropped == 1 and summary.unknown_events == {"step.KV_OFFLOAD_SUMMARY": 1}
    # monotonic step clocks placed on the wall clock at the event time (the step's end)
    assert steps["ts_start_ns"].to_list() == [T, T + 100 * MS]
    assert steps["ts_end_ns"].to_list() == [T + 25 * MS, T + 115 * MS]
    assert steps["duration_us"].to_list() == [25000.0, 15000.0]
    assert steps.row(0, named=True) | {} == {
        "step_id": 100, "ts_start_ns": T, "ts_end_ns": T + 25 * MS, "duration_us": 25000.0, "running_depth": 4,
        "waiting_depth": 0, "num_prefill_reqs": 1, "num_decode_reqs": 3, "scheduled_tokens": 512, "prefill_tokens": 509,
        "decode_tokens": 3, "num_finished": 0, "num_preempted": 0, "kv_usage_gpu_ratio": pytest.approx(0.1),
        "kv_blocks_total_gpu": 1000, "kv_blocks_free_gpu": 900, "kv_blocks_offloaded": 0, "kv_blocks_restored": 0,
        "config_id": steps["config_id"][0], "date": "2026-02-17"}
    # 3 sampled steps (idle included) over step ids 100..104
    (rate,) = sample_rates(Store(store)).values()
    assert rate == pytest.approx(3 / 5)

    req = {r["request_id"]: r for r in t["requests"].iter_rows(named=True)}
    assert set(req) == {"cmpl-a", "cmpl-b"}
    a, b = req["cmpl-a"], req["cmpl-b"]
    assert (a["arrival_ns"], a["queued_ns"], a["scheduled_ns"], a["first_token_ns"], a["finished_ns"], a["departed_ns"]) == \
           (T - 2 * MS, T - 1 * MS, T, T + 25 * MS, T + 115 * MS, T + 140 * MS)
    assert (a["prompt_tokens"], a["output_tokens"], a["cached_prompt_tokens"], a["num_preemptions"]) == (512, 64, 0, 0)
    # still in flight: no FINISHED, no DEPARTED -> nulls; its counts come from the REQUEST_SNAPSHOT
    assert b["finished_ns"] is None and b["departed_ns"] is None and b["first_token_ns"] is None
    assert (b["prompt_tokens"], b["output_tokens"], b["cached_prompt_tokens"], b["num_preemptions"]) == (300, 7, 128, 1)
    validate_store(store)


def test_bad_otlp_lines_are_quarantined_with_file_line_and_attribute(ray_local, tmp_path):
    store = str(tmp_path / "s")
    (summary,) = ingest([str(FIX / "bad_otlp.jsonl")], store, [CFG], IngestOptions("otlp", step_sample_rate=0.1))
    assert summary.rows == {"steps": 1, "requests": 0}
    q = {r["line"]: r for r in quarantine(store).iter_rows(named=True)}
    assert set(q) == {2, 3, 4, 5, 6}
    assert q[2]["reason"] == "not valid JSON: truncated or malformed line"
    assert (q[3]["attribute"], q[3]["reason"]) == ("step.id", "step.id: expected intValue, got stringValue")
    assert (q[4]["attribute"], q[4]["reason"]) == ("batch.decode_tokens", "missing required attribute batch.decode_tokens")
    assert "negative step duration" in q[5]["reason"] and q[5]["span_id"] == "eee19b7ec3c1b174"
    assert "journey.QUEUED before api.ARRIVED" in q[6]["reason"] and q[6]["event"] == "request"
    assert all(r["source"] == str(FIX / "bad_otlp.jsonl") for r in q.values())
    assert sum(summary.dropped.values()) == 5
    assert set(sample_rates(Store(store)).values()) == {0.1}  # as configured, not estimated

    with pytest.raises(IngestError, match=r"bad_otlp\.jsonl:2: .*truncated or malformed line.*\(and 3 more bad rows\)"):
        ingest([str(FIX / "bad_otlp.jsonl")], str(tmp_path / "strict"), [CFG], IngestOptions("otlp", strict=True))


def test_events_from_two_deployments_need_one_config_each(ray_local, tmp_path):
    src = str(FIX / "two_services.jsonl")
    with pytest.raises(IngestError, match="2 deployments .*vllm-llama2-7b, vllm-mixtral.*--config SERVICE=CFG"):
        ingest([src], str(tmp_path / "a"), [CFG], IngestOptions("otlp"))
    store = str(tmp_path / "b")
    ingest([src], store, [f"vllm-llama2-7b={CFG}", f"vllm-mixtral={FIX / 'mixtral.json'}"], IngestOptions("otlp"))
    by_cfg = {p.config_id: Store(store).scan(p)["step_id"].to_list() for p in Store(store).partitions("steps")}
    labels = {cid: c.label for cid, c in Store(store).configs().items()}
    assert {labels[c].split("/")[0]: v for c, v in by_cfg.items()} == {"Llama-2-7b-hf": [200], "Mixtral-8x7B-v0.1": [7]}


def test_spans_without_service_name_need_a_plain_config(ray_local, tmp_path):
    doc = json.loads((FIX / "two_services.jsonl").read_text().splitlines()[0])
    doc["resourceSpans"][0]["resource"]["attributes"] = []
    src = tmp_path / "anonymous.jsonl"
    src.write_text(json.dumps(doc) + "\n")
    with pytest.raises(IngestError, match="without service.name; add a plain --config CFG"):
        ingest([str(src)], str(tmp_path / "a"), [f"vllm-llama2-7b={CFG}"], IngestOptions("otlp"))
    (summary,) = ingest([str(src)], str(tmp_path / "b"), [f"vllm-llama2-7b={CFG}", CFG], IngestOptions("otlp"))
    assert summary.rows["steps"] == 1


def test_gzip_and_protobuf_encodings_give_the_same_rows(ray_local, tmp_path):
    from google.protobuf import json_format
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

    gz = tmp_path / "traces.jsonl.gz"
    gz.write_bytes(gzip.compress((FIX / "vllm_otlp.jsonl").read_bytes()))
    proto = tmp_path / "traces.binpb"
    with open(proto, "wb") as f:
        for line in (FIX / "vllm_otlp.jsonl").read_text().splitlines():
            msg = json_format.Parse(line, ExportTraceServiceRequest())  # the JSON mapping: ids hex, ints as strings
            blob = msg.SerializeToString()
            f.write(struct.pack(">I", len(blob)) + blob)
    ingest([str(FIX / "vllm_otlp.jsonl")], str(tmp_path / "json"), [CFG], IngestOptions("otlp"))
    ingest([str(gz)], str(tmp_path / "gz"), [CFG], IngestOptions("otlp"))
    ingest([str(proto)], str(tmp_path / "pb"), [CFG], IngestOptions("otlp", encoding="proto"))
    ref = tables(str(tmp_path / "json"))
    for other in ("gz", "pb"):
        got = tables(str(tmp_path / other))
        for t in ("steps", "requests"):
            assert got[t].equals(ref[t]), (other, t)
    with pytest.raises(IngestError, match="binary data where text was expected"):
        ingest([str(proto)], str(tmp_path / "wrong"), [CFG], IngestOptions("otlp"))


def test_tracev2_rows_and_bad_rows(ray_local, tmp_path):
    store = str(tmp_path / "s")
    (summary,) = ingest([str(FIX / "trace_data.csv")], store, [CFG], IngestOptions("tracev2"))
    req = {r["request_id"].rsplit("-", 1)[1]: r for r in tables(store)["requests"].iter_rows(named=True)}
    assert set(req) == {"0", "1", "2"}
    # times relative to the header's created_at; send_time_us is the arrival
    assert (req["0"]["arrival_ns"], req["0"]["first_token_ns"], req["0"]["departed_ns"]) == (T + 120_000, T + 25_120_000, T + 140_120_000)
    assert (req["0"]["prompt_tokens"], req["0"]["output_tokens"]) == (512, 64)
    assert req["1"]["departed_ns"] is None and req["1"]["first_token_ns"] == T + 90 * MS  # timeout: never completed
    assert req["2"]["first_token_ns"] is None and req["2"]["departed_ns"] is None        # error
    assert all(r["queued_ns"] is None and r["finished_ns"] is None for r in req.values())
    q = {r["line"]: (r["attribute"], r["reason"]) for r in quarantine(store).iter_rows(named=True)}
    assert q[5] == ("last_chunk_time_us", "truncated row: no value for last_chunk_time_us")
    assert q[6] == ("input_tokens", "input_tokens is not an integer")
    assert "negative duration" in q[7][1]
    assert any("no engine steps" in n for n in summary.notes)

    lone = tmp_path / "alone" / "data.csv"
    lone.parent.mkdir()
    shutil.copy(FIX / "trace_data.csv", lone)  # no header beside it: relative times need an origin
    with pytest.raises(IngestError, match="relative to the trace start.*--time-origin"):
        ingest([str(lone)], str(tmp_path / "t"), [CFG], IngestOptions("tracev2"))


def test_inference_perf_records(ray_local, tmp_path):
    src = str(FIX / "per_request_lifecycle_metrics.json")
    with pytest.raises(IngestError, match="monotonic seconds.*--time-origin"):
        ingest([src], str(tmp_path / "x"), [CFG], IngestOptions("inference-perf"))
    store = str(tmp_path / "s")
    ingest([src], store, [CFG], IngestOptions("inference-perf", time_origin_ns=T))
    rows = tables(store)["requests"].sort("arrival_ns").to_dicts()
    assert [r["arrival_ns"] for r in rows] == [T, T + 250 * MS]
    assert rows[0]["first_token_ns"] == T + 130 * MS and rows[0]["departed_ns"] == T + 1944 * MS
    assert (rows[0]["prompt_tokens"], rows[0]["output_tokens"]) == (591, 64)
    assert rows[1]["departed_ns"] is None  # TimeoutError
    q = {r["line"]: r["reason"] for r in quarantine(store).iter_rows(named=True)}
    assert q == {3: "missing or non-numeric info.input_tokens",
                 4: "negative duration: last chunk before the request was sent (clock skew?)"}


def test_experiment_folder_as_config_and_a_glob_of_s3_objects(ray_local, s3_bucket, tmp_path):
    exp = tmp_path / "20260217-155451-llama-2-7b-tp1-codegen"
    exp.mkdir()
    (exp / "exp-config.yaml").write_text("model: meta-llama/Llama-2-7b-hf\ntensor_parallelism: 1\nmax_model_len: 4096\n"
                                         "max_num_batched_tokens: 2048\nmax_num_seqs: 128\napp: inference-perf\n")
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="raw/day1/traces.jsonl", Body=(FIX / "vllm_otlp.jsonl").read_bytes())
    s3_bucket.client.put_object(Bucket=s3_bucket.name, Key="raw/day1/other.csv", Body=b"not matched")
    store = str(tmp_path / "store")  # (the readers run in the driver: Ray workers of this session hold no fake keys)
    (summary,) = ingest([s3_bucket.uri("raw/*/traces.jsonl")], store, [str(exp)], IngestOptions("otlp"))
    assert summary.rows == {"steps": 2, "requests": 2}
    (cfg,) = Store(store).configs().values()
    assert cfg.label == "Llama-2-7b-hf/H100-SXM/tp1/mbt2048/seqs128"
    assert validate_store(store).rows == {"steps": 2, "requests": 2}


def test_cli_ingest_prints_summary_and_one_line_errors(ray_local, tmp_path, capsys):
    store = str(tmp_path / "s")
    assert main(["ingest", "--format", "otlp", "--config", CFG, "--store", store, str(FIX / "vllm_otlp.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "wrote requests 2, steps 2 in 2 partitions; idle steps dropped 1" in out
    assert main(["ingest", "--format", "otlp", "--config", CFG, "--store", store, str(tmp_path / "none*.jsonl")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("rece: error: ") and "no file matches" in err[-1]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"model": "Llama-2-7b-hf", "gpu": "B300"}))
    assert main(["ingest", "--format", "otlp", "--config", str(bad), "--store", store, str(FIX / "vllm_otlp.jsonl")]) == 2
    assert "unknown GPU 'B300'" in capsys.readouterr().err
