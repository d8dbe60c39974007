"""The training job end to end on local Ray, against a store with a known ground truth.

The store is written by hand (not by the generator): step durations and request overheads are
linear in raw columns plus exponential noise, so the true conditional quantiles are known in
closed form, q_tau(x) = m(x) - s * ln(1 - tau), and the fitted ensemble can be checked
against them.
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest

from rece_dist import artifact
from rece_dist.config import Catalog, DeploymentConfig, ServingSettings
from rece_dist.ensemble import RECEModel
from rece_dist.errors import ReceError, SchemaError, StoreError
from rece_dist.pipeline import TrainSettings, train
from rece_dist.store import Store

N_STEPS, N_REQ = 6000, 3000
STEP_NOISE, REQ_NOISE = 200.0, 40.0


def _truth_beta(cfg_index: int, P: np.ndarray, D: np.ndarray) -> np.ndarray:
    return 4000.0 + 1500.0 * cfg_index + 3.0 * P + 20.0 * D


def _truth_alpha(L: np.ndarray) -> np.ndarray:
    return 300.0 + 0.2 * L


def _configs() -> list[DeploymentConfig]:
    cat = Catalog.default()
    return [DeploymentConfig(cat.model("Llama-2-7b-hf"), cat.gpu(g), ServingSettings()) for g in ("H100-SXM", "L40S")]


def _write_store(root: str, seed: int = 0) -> list[DeploymentConfig]:
    rng = np.random.default_rng(seed)
    store = Store(root)
    store.init({"generator": "test ground truth"})
    cfgs = _configs()
    for k, cfg in enumerate(cfgs):
        store.write_config(cfg)
        for day in ("2026-11-01", "2026-11-02"):
            P = rng.integers(0, 2048, N_STEPS)
            D = rng.integers(0, 128, N_STEPS)
            dur = _truth_beta(k, P, D) + rng.exponential(STEP_NOISE, N_STEPS)
            start = np.cumsum(np.full(N_STEPS, 20_000_000)) + (0 if day.endswith("01") else 10**14)
            steps = pl.DataFrame({
                "step_id": np.arange(N_STEPS), "ts_start_ns": start, "ts_end_ns": start + (dur * 1000).astype(np.int64),
                "duration_us": dur, "running_depth": rng.integers(0, 128, N_STEPS),
                "waiting_depth": rng.integers(0, 20, N_STEPS), "num_prefill_reqs": (P > 0).astype(int),
                "num_decode_reqs": D, "scheduled_tokens": P + D, "prefill_tokens": P, "decode_tokens": D,
                "num_finished": np.zeros(N_STEPS, int), "num_preempted": np.zeros(N_STEPS, int),
                "kv_usage_gpu_ratio": rng.uniform(0, 1, N_STEPS), "kv_blocks_total_gpu": np.full(N_STEPS, 7000),
                "kv_blocks_free_gpu": np.full(N_STEPS, 3000), "kv_blocks_offloaded": np.zeros(N_STEPS, int),
                "kv_blocks_restored": np.zeros(N_STEPS, int),
            })
            store.write_partition("steps", cfg.config_id, day, steps)
            L = rng.integers(16, 4000, N_REQ)
            arrival = np.sort(rng.integers(start[0], start[-1], N_REQ))
            alpha_us = _truth_alpha(L) + rng.exponential(REQ_NOISE, N_REQ)
            queued = arrival + (alpha_us * 1000).astype(np.int64)
            reqs = pl.DataFrame({
                "request_id": [f"{day}-{i}" for i in range(N_REQ)], "arrival_ns": arrival, "queued_ns": queued,
                "scheduled_ns": queued + 1000, "first_token_ns": queued + 2000, "finished_ns": queued + 3000,
                "departed_ns": queued + 4000, "prompt_tokens": L, "cached_prompt_tokens": np.zeros(N_REQ, int),
                "output_tokens": np.full(N_REQ, 100), "num_preemptions": np.zeros(N_REQ, int),
            })
            store.write_partition("requests", cfg.config_id, day, reqs)
    return cfgs


@pytest.fixture(scope="module")
def truth_store(tmp_path_factory) -> tuple[str, list[DeploymentConfig]]:
    root = str(tmp_path_factory.mktemp("truth") / "store")
    return root, _write_store(root)


@pytest.fixture(scope="module")
def trained(truth_store, ray_local):
    root, _ = truth_store
    return train(root, TrainSettings(specialists=2, seed=0))


def test_recovers_known_quantiles(truth_store, trained):
    _, cfgs = truth_store
    model = RECEModel(trained.artifact)
    P = np.array([0, 512, 2000, 1024])
    D = np.array([100, 0, 10, 64])
    rows = pl.DataFrame({"prefill_tokens": P, "decode_tokens": D, "scheduled_tokens": P + D,
                         "running_depth": [10, 20, 30, 40], "kv_usage_gpu_ratio": [0.1, 0.5, 0.9, 0.3],
                         "kv_blocks_offloaded": [0] * 4, "kv_blocks_restored": [0] * 4})
    for k, cfg in enumerate(cfgs):
        pred = model.predict("beta", rows, cfg)
        for j, tau in enumerate(pred.quantiles):
            truth = _truth_beta(k, P, D) - STEP_NOISE * np.log(1 - tau)
            np.testing.assert_allclose(pred.values[:, j], truth, rtol=0.02)
    req = pl.DataFrame({"prompt_tokens": [100, 2000, 3900], "waiting_depth": [0, 5, 10],
                        "running_depth": [10, 50, 100], "kv_usage_gpu_ratio": [0.2, 0.5, 0.8]})
    pred = model.predict("alpha", req, cfgs[0])
    truth = _truth_alpha(np.array([100, 2000, 3900]))[:, None] - REQ_NOISE * np.log(1 - np.array([0.1, 0.5, 0.9]))
    np.testing.assert_allclose(pred.values, truth, rtol=0.05)


def test_held_out_coverage_near_nominal(trained):
    held = trained.artifact["metrics"]["held_out"]
    for target in ("alpha", "beta"):
        m = held[target]["all"]
        assert m["rows"] > 1000
        assert 0.75 <= m["interval_coverage"] <= 0.85, (target, m)
        assert abs(m["coverage_0.5"] - 0.5) < 0.05


def test_each_configuration_gets_its_own_specialist(truth_store, trained):
    _, cfgs = truth_store
    doc = trained.artifact
    assert len(doc["specialists"]) == 2
    assert sorted(m for s in doc["specialists"] for m in s["members"]) == sorted(c.config_id for c in cfgs)
    model = RECEModel(doc)
    for cfg in cfgs:
        w = model.weights(cfg)
        assert w.sum() == pytest.approx(1.0)
        assert np.argmax(w) == model.members[cfg.config_id]


def test_artifact_round_trip_predicts_identically(truth_store, trained, tmp_path):
    _, cfgs = truth_store
    path = tmp_path / "artifact.json"
    path.write_bytes(artifact.canonical_bytes(trained.artifact))
    loaded = RECEModel(artifact.load(str(path)))
    live = RECEModel(trained.artifact)
    rng = np.random.default_rng(5)
    rows = pl.DataFrame({"prefill_tokens": rng.integers(0, 2048, 200), "decode_tokens": rng.integers(0, 128, 200),
                         "running_depth": rng.integers(0, 128, 200), "kv_usage_gpu_ratio": rng.uniform(0, 1, 200),
                         "kv_blocks_offloaded": np.zeros(200, int), "kv_blocks_restored": np.zeros(200, int)}
                        ).with_columns(scheduled_tokens=pl.col("prefill_tokens") + pl.col("decode_tokens"))
    for cfg in cfgs:
        a, b = live.predict("beta", rows, cfg), loaded.predict("beta", rows, cfg)
        np.testing.assert_array_equal(a.values, b.values)
        np.testing.assert_array_equal(a.weights, b.weights)
    assert json.loads(path.read_bytes())["schema_version"] == artifact.SCHEMA_VERSION


def test_training_is_deterministic(truth_store, trained, ray_local):
    root, _ = truth_store
    again = train(root, TrainSettings(specialists=2, seed=0))
    assert artifact.digest(again.artifact) == artifact.digest(trained.artifact)


def test_empty_store_and_empty_window_are_clear_errors(tmp_path, truth_store, ray_local):
    with pytest.raises(StoreError, match="not a trace store"):
        train(str(tmp_path / "nothing"), TrainSettings())
    empty = Store(str(tmp_path / "empty"))
    empty.init()
    with pytest.raises(StoreError, match="no configuration documents"):
        train(empty.uri, TrainSettings())
    root, _ = truth_store
    with pytest.raises(StoreError, match="no trace partitions in 2025-01-01..2025-01-31"):
        train(root, TrainSettings(date_from="2025-01-01", date_to="2025-01-31"))


def test_nan_durations_name_the_file(tmp_path, ray_local):
    root = str(tmp_path / "bad")
    cfgs = _write_store(root, seed=1)
    store = Store(root)
    part = store.partitions("steps", [cfgs[1].config_id], "2026-11-02", "2026-11-02")[0]
    df = pl.read_parquet(part.files[0]).with_columns(duration_us=pl.lit(float("nan")))
    store.write_partition("steps", cfgs[1].config_id, "2026-11-02", df)
    with pytest.raises(SchemaError, match=r"date=2026-11-02/part-0.parquet: column 'duration_us' has \d+ NaN"):
        train(root, TrainSettings(specialists=2))


def test_bad_settings_rejected():
    with pytest.raises(ReceError, match="quantiles"):
        TrainSettings(quantiles=(0.9, 0.1))
    with pytest.raises(ReceError, match="temperature"):
        TrainSettings(temperature=0)
