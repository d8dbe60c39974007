"""A small hand-built store whose latencies are known functions of the RECE features.

Every configuration shares one law: y = (x . coef) * (1 + s * E), E ~ Exp(1), with x the
row's features computed by ``features.feature_matrix`` for its own configuration. The true
conditional quantiles are therefore linear in the features, q_tau = (x . coef)(1 - s ln(1 - tau)),
for every configuration alike: a model pooled over configurations can transfer exactly, while a
per-configuration model cannot learn configuration-level terms (weight reads, KV size), which
are constant within a configuration. ``slowdown`` multiplies the last date's latencies (drift);
``config_spread`` s multiplies each configuration's latencies by its own exp(s * z), z ~ N(0, 1):
an effect no feature explains, so no model can know it for a configuration it has not seen.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from rece_dist.config import Catalog, DeploymentConfig, ServingSettings
from rece_dist.features import FEATURES, attach_load, feature_matrix
from rece_dist.schema import conform
from rece_dist.store import Store

BETA_COEF = {"bias": 300.0, "dense_compute_us": 1.6, "decode_tokens": 3.0, "dense_read_us": 1.15,
             "kv_read_us": 1.0}
ALPHA_COEF = {"bias": 150.0, "prompt_frac": 400.0, "queue_fill": 300.0}
NOISE = {"beta": 0.10, "alpha": 0.20}
DATES = ("2026-11-01", "2026-11-02", "2026-11-03")
SETUPS = (("Llama-2-7b-hf", "H100-SXM", 1), ("Llama-2-7b-hf", "L40S", 1), ("Mistral-7B-v0.1", "H100-SXM", 1),
          ("Mistral-7B-v0.1", "A100-SXM-80GB", 1), ("Llama-2-13b-hf", "A100-SXM-80GB", 2),
          ("Llama-2-13b-hf", "H100-SXM", 2))


def configs(n: int) -> list[DeploymentConfig]:
    cat = Catalog.default()
    return [DeploymentConfig(cat.model(m), cat.gpu(g), ServingSettings(tp=tp)) for m, g, tp in SETUPS[:n]]


def _coef(target: str) -> np.ndarray:
    table = BETA_COEF if target == "beta" else ALPHA_COEF
    names = [f.name for f in FEATURES[target]]
    assert set(table) <= set(names), f"ground truth names unknown {target} features {set(table) - set(names)}"
    return np.array([table.get(f.name, 0.0) for f in FEATURES[target]])


def true_quantile(X: np.ndarray, target: str, tau: float) -> np.ndarray:
    return (X @ _coef(target)) * (1 - NOISE[target] * np.log(1 - tau))


def write_store(root: str, n_configs: int = 4, rows: int = 1000, dates: tuple[str, ...] = DATES[:2],
                slowdown: float = 1.0, seed: int = 0, config_spread: float = 0.0) -> list[DeploymentConfig]:
    rng = np.random.default_rng(seed)
    own = np.exp(config_spread * np.random.default_rng(seed + 1).standard_normal(n_configs))
    store = Store(root)
    store.init({"generator": "tests/ground_truth.py"})
    cfgs = configs(n_configs)
    for k, cfg in enumerate(cfgs):
        store.write_config(cfg)
        mbt, seqs = cfg.serving.max_num_batched_tokens, cfg.serving.max_num_seqs
        for d, day in enumerate(dates):
            factor = own[k] * (slowdown if d == len(dates) - 1 else 1.0)
            P = rng.integers(0, mbt // 2, rows)
            D = rng.integers(1, seqs, rows)
            start = 10**15 + d * 10**14 + np.arange(rows, dtype=np.int64) * 50_000_000
            steps = conform(pl.DataFrame({
                "step_id": np.arange(rows), "ts_start_ns": start, "ts_end_ns": start, "duration_us": np.zeros(rows),
                "running_depth": D, "waiting_depth": rng.integers(0, 20, rows), "num_prefill_reqs": (P > 0).astype(int),
                "num_decode_reqs": D, "scheduled_tokens": P + D, "prefill_tokens": P, "decode_tokens": D,
                "num_finished": np.zeros(rows, int), "num_preempted": np.zeros(rows, int),
                "kv_usage_gpu_ratio": rng.uniform(0, 1, rows), "kv_blocks_total_gpu": np.full(rows, cfg.kv_blocks_total),
                "kv_blocks_free_gpu": np.zeros(rows, int), "kv_blocks_offloaded": np.zeros(rows, int),
                "kv_blocks_restored": np.zeros(rows, int),
            }), "steps")
            dur = factor * (feature_matrix(steps, cfg, "beta") @ _coef("beta")) * (1 + NOISE["beta"] * rng.exponential(1, rows))
            steps = steps.with_columns(duration_us=pl.Series(dur), ts_end_ns=pl.Series(start + (dur * 1000).astype(np.int64)))
            store.write_partition("steps", cfg.config_id, day, steps)
            arrival = np.sort(rng.integers(start[0], start[-1], rows))
            req = pl.DataFrame({"request_id": [f"{day}-{i}" for i in range(rows)], "arrival_ns": arrival,
                                "prompt_tokens": rng.integers(16, cfg.serving.max_model_len // 2, rows)})
            req = attach_load(req.with_columns(pl.col("prompt_tokens").cast(pl.Int32)), steps)
            alpha = factor * (feature_matrix(req, cfg, "alpha") @ _coef("alpha")) * (1 + NOISE["alpha"] * rng.exponential(1, rows))
            queued = req["arrival_ns"].to_numpy() + (alpha * 1000).astype(np.int64)
            store.write_partition("requests", cfg.config_id, day, req.with_columns(
                queued_ns=pl.Series(queued), scheduled_ns=pl.Series(queued + 1000), first_token_ns=pl.Series(queued + 2000),
                finished_ns=pl.Series(queued + 3000), departed_ns=pl.Series(queued + 4000),
                cached_prompt_tokens=pl.lit(0), output_tokens=pl.lit(100), num_preemptions=pl.lit(0)))
    return cfgs
