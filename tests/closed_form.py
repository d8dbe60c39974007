"""A store whose latencies are linear in raw trace columns plus exponential noise.

Written by hand, not by the generator, and independent of the feature code: the true
conditional quantiles are known in closed form, q_tau(x) = m(x) - s * ln(1 - tau).
"""

from __future__ import annotations

import numpy as np
import polars as pl

from rece_dist.config import Catalog, DeploymentConfig, ServingSettings
from rece_dist.store import Store

N_STEPS, N_REQ = 6000, 3000
STEP_NOISE, REQ_NOISE = 200.0, 40.0


def truth_beta(cfg_index: int, P: np.ndarray, D: np.ndarray) -> np.ndarray:
    return 4000.0 + 1500.0 * cfg_index + 3.0 * P + 20.0 * D


def truth_alpha(L: np.ndarray) -> np.ndarray:
    return 300.0 + 0.2 * L


def configs() -> list[DeploymentConfig]:
    cat = Catalog.default()
    return [DeploymentConfig(cat.model("Llama-2-7b-hf"), cat.gpu(g), ServingSettings()) for g in ("H100-SXM", "L40S")]


def write_closed_form_store(root: str, seed: int = 0) -> list[DeploymentConfig]:
    rng = np.random.default_rng(seed)
    store = Store(root)
    store.init({"generator": "test ground truth"})
    cfgs = configs()
    for k, cfg in enumerate(cfgs):
        store.write_config(cfg)
        for day in ("2026-11-01", "2026-11-02"):
            # half the steps decode-only, as in a serving engine: whether a step prefills is a feature too
            P = np.where(rng.random(N_STEPS) < 0.5, 0, rng.integers(1, 2048, N_STEPS))
            D = rng.integers(0, 128, N_STEPS)
            dur = truth_beta(k, P, D) + rng.exponential(STEP_NOISE, N_STEPS)
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
            alpha_us = truth_alpha(L) + rng.exponential(REQ_NOISE, N_REQ)
            queued = arrival + (alpha_us * 1000).astype(np.int64)
            reqs = pl.DataFrame({
                "request_id": [f"{day}-{i}" for i in range(N_REQ)], "arrival_ns": arrival, "queued_ns": queued,
                "scheduled_ns": queued + 1000, "first_token_ns": queued + 2000, "finished_ns": queued + 3000,
                "departed_ns": queued + 4000, "prompt_tokens": L, "cached_prompt_tokens": np.zeros(N_REQ, int),
                "output_tokens": np.full(N_REQ, 100), "num_preemptions": np.zeros(N_REQ, int),
            })
            store.write_partition("requests", cfg.config_id, day, reqs)
    return cfgs
