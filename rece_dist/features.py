"""Alpha and beta feature tables as Polars expressions: beta a roofline basis (times at
datasheet peak), alpha the seed's request features with raw counts first.

Every feature is a row of ``ALPHA_FEATURES`` / ``BETA_FEATURES``: a name, the formula as
written in the docs (and in the artifact, for BLIS), its units, and the Polars expression that
computes it from one trace row plus the row's deployment configuration. Configuration
quantities enter as literals, so one expression list serves a whole (configuration, date)
partition and the features of different configurations can be stacked for one specialist.

Targets: **beta** is ``duration_us`` of an engine step; **alpha** is the request's
``queued_ns - arrival_ns`` in microseconds (BLIS's ``QueueingTime``). The load a request meets
at arrival (waiting depth, running depth, KV usage) comes from an as-of join against the last
step that started at or before its arrival.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import polars as pl

from .config import DeploymentConfig
from .errors import ArtifactError

Expr = pl.Expr
C = pl.col


@dataclass(frozen=True)
class Feature:
    name: str
    formula: str
    units: str
    expr: Callable[[DeploymentConfig], Expr]


def _lit(x: float) -> Expr:
    return pl.lit(float(x), dtype=pl.Float64)


def _f(name: str) -> Expr:
    return C(name).cast(pl.Float64)


# --- beta: one engine step ------------------------------------------------------------------
# P = prefill_tokens, D = decode_tokens, B = scheduled_tokens, R = running_depth,
# kv = kv_usage_gpu_ratio, MBT = max_num_batched_tokens. Times are microseconds at peak rate.

def _block_bytes(c: DeploymentConfig) -> float:
    return c.serving.block_size * c.model.kv_bytes_per_token / c.serving.tp


def kv_read_us_per_usage(c: DeploymentConfig) -> float:
    """Time to read a full KV cache once: kv_read_us per unit of KV usage."""
    return c.kv_blocks_total * _block_bytes(c) / c.hbm_bytes_per_us


def _us_per_token_flop(c: DeploymentConfig, shards: int) -> float:
    return 1.0 / (shards * c.flops_per_us)


def _dense_compute(c: DeploymentConfig) -> Expr:
    return _f("scheduled_tokens") * _lit(c.model.dense_flops_per_token * _us_per_token_flop(c, c.serving.tp))


def _dense_read(c: DeploymentConfig) -> Expr:
    return _lit(c.dense_bytes_per_gpu / c.hbm_bytes_per_us)


def _moe_compute(c: DeploymentConfig) -> Expr:
    m = c.model
    return _f("scheduled_tokens") * _lit(m.experts_per_token * m.expert_flops_per_token * _us_per_token_flop(c, c.expert_shards))


def _moe_read(c: DeploymentConfig) -> Expr:
    """Local experts the batch touches (each token picks k of E at random) times one expert's read."""
    m = c.model
    if not m.is_moe:
        return _lit(0.0)
    miss = 1.0 - m.experts_per_token / m.num_experts
    return (1.0 - _lit(miss) ** _f("scheduled_tokens")) * _lit(c.experts_local * c.expert_bytes_local / c.hbm_bytes_per_us)


def _comm_fixed(c: DeploymentConfig) -> float:
    """Latency of the step's collectives: log2(tp) hops per all-reduce (and log2(ep) per EP exchange)."""
    tp, ep, lat = c.serving.tp, c.expert_parallel, c.gpu.link_latency_us
    out = c.collectives_per_step * lat * math.log2(tp) if tp > 1 else 0.0
    return out + (2 * c.model.num_layers * lat * math.log2(ep) if ep > 1 else 0.0)


# vLLM releases whose per-step CPU cost (scheduler, input preparation, sampling) gets its own
# term, an offset from the pooled bias that holds every other release (0.11.0 included): that
# work changes between releases, and without these terms a pooled fit under-predicted 0.10.2
# deployments and over-predicted 0.14.0 ones by 2-8% at the median on configurations it never saw
# (docs/transfer.md). A release not listed here is predicted with the pooled bias. Offsets for
# the per-sequence and per-token CPU costs were measured too and transferred worse (fewer
# configurations per release than coefficients to learn), so they are not terms.
CPU_RELEASES = ("0.10.2", "0.13.0", "0.14.0")

BETA_FEATURES: tuple[Feature, ...] = (
    Feature("bias", "1", "1", lambda c: _lit(1.0)),
    # A roofline basis: times at datasheet peak, so each coefficient is one efficiency
    # (1 / fraction of peak reached) or CPU cost that is the same law on every deployment and
    # transfers to a configuration the fit never saw. A kernel family costs max(compute,
    # memory); the max and both sides let a linear model follow either regime and the knee.
    # The seed's configuration-relative terms (B / MBT, (P / MBT)^2, kv^2, 1 / tp, ...) are
    # gone: under grouped cross-validation over 24 configurations they fitted each training
    # configuration's quirks and doubled the error on held-out ones (docs/transfer.md).
    Feature("dense_roofline_us", "max(dense_compute_us, dense_read_us)", "us",
            lambda c: pl.max_horizontal(_dense_compute(c), _dense_read(c))),
    Feature("dense_read_us", "dense_bytes_per_gpu / hbm_bandwidth", "us", _dense_read),
    Feature("dense_compute_us", "B * dense_flops_per_token / (tp * peak_flops)", "us", _dense_compute),
    Feature("kv_read_us", "kv * kv_blocks_total * block_bytes / hbm_bandwidth", "us",
            lambda c: _f("kv_usage_gpu_ratio") * _lit(kv_read_us_per_usage(c))),
    # CPU work around the forward pass: per step (bias), per scheduled sequence, per token.
    Feature("scheduled_seqs", "num_prefill_reqs + num_decode_reqs", "seq",
            lambda c: _f("num_prefill_reqs") + _f("num_decode_reqs")),
    Feature("prefill_tokens", "P", "token", lambda c: _f("prefill_tokens")),
    Feature("decode_tokens", "D", "token", lambda c: _f("decode_tokens")),
    *[Feature(f"step_vllm_{r.replace('.', '_')}", f'vllm_version == "{r}"', "1",
              lambda c, r=r: _lit(float(c.serving.vllm_version == r))) for r in CPU_RELEASES],
    Feature("prefill_attn_us",
            "P^2 / (2 * max(num_prefill_reqs, 1)) * attn_flops_per_token_ctx / (tp * peak_flops)", "us",
            lambda c: _f("prefill_tokens") ** 2 / (2.0 * pl.max_horizontal(_f("num_prefill_reqs"), _lit(1.0)))
            * _lit(c.model.attn_flops_per_token_ctx * _us_per_token_flop(c, c.serving.tp))),
    Feature("moe_roofline_us", "max(moe_compute_us, moe_read_us)", "us",
            lambda c: pl.max_horizontal(_moe_compute(c), _moe_read(c))),
    Feature("moe_read_us", "experts_local * (1 - (1 - k / E)^B) * expert_bytes_local / hbm_bandwidth", "us", _moe_read),
    Feature("moe_compute_us", "B * k * expert_flops_per_token / (expert_shards * peak_flops)", "us", _moe_compute),
    Feature("tp_comm_fixed_us", "collectives_per_step * link_latency_us * log2(tp) + 2 * num_layers * link_latency_us * log2(ep)",
            "us", lambda c: _lit(_comm_fixed(c))),
    Feature("tp_allreduce_us",
            "(tp - 1) / tp * 4 * num_layers * B * hidden_size * weight_bytes / link_bandwidth", "us",
            lambda c: _f("scheduled_tokens") * _lit(
                (c.serving.tp - 1) / c.serving.tp * 4 * c.model.num_layers * c.model.hidden_size
                * c.model.weight_bytes / c.link_bytes_per_us)),
    Feature("offload_out_us", "cpu_offload * blocks_offloaded * block_bytes / pcie_bandwidth", "us",
            lambda c: _f("kv_blocks_offloaded") * _lit(float(c.serving.cpu_offload) * _block_bytes(c) / c.pcie_bytes_per_us)),
    Feature("offload_in_us", "cpu_offload * blocks_restored * block_bytes / pcie_bandwidth", "us",
            lambda c: _f("kv_blocks_restored") * _lit(float(c.serving.cpu_offload) * _block_bytes(c) / c.pcie_bytes_per_us)),
    Feature("kv_write_us", "B * kv_bytes_per_token / (tp * hbm_bandwidth)", "us",
            lambda c: _f("scheduled_tokens") * _lit(c.model.kv_bytes_per_token / (c.serving.tp * c.hbm_bytes_per_us))),
)

BETA_COLUMNS = ["prefill_tokens", "decode_tokens", "scheduled_tokens", "kv_usage_gpu_ratio",
                "kv_blocks_offloaded", "kv_blocks_restored", "num_prefill_reqs", "num_decode_reqs"]

# --- alpha: one request's API-to-queue overhead ---------------------------------------------
# Q = waiting_depth and R = running_depth at arrival, kv = KV usage at arrival,
# L = prompt_tokens, MNS = max_num_seqs, MML = max_model_len.

ALPHA_FEATURES: tuple[Feature, ...] = (
    Feature("bias", "1", "1", lambda c: _lit(1.0)),
    # Raw counts before the seed's normalised ones: tokenising a prompt and serving the running
    # requests cost the API process per token and per sequence on any deployment, so these
    # coefficients transfer; L / MML and R / MNS rescale them per configuration.
    Feature("prompt_tokens", "L", "token", lambda c: _f("prompt_tokens")),
    Feature("running_depth", "R", "seq", lambda c: _f("running_depth")),
    Feature("queue_fill", "Q / MNS", "1", lambda c: _f("waiting_depth") / _lit(c.serving.max_num_seqs)),
    Feature("queue_fill_sq", "(Q / MNS)^2", "1", lambda c: (_f("waiting_depth") / _lit(c.serving.max_num_seqs)) ** 2),
    Feature("kv_usage", "kv", "1", lambda c: _f("kv_usage_gpu_ratio")),
    Feature("kv_usage_sq", "kv^2", "1", lambda c: _f("kv_usage_gpu_ratio") ** 2),
    Feature("prompt_frac", "L / MML", "1", lambda c: _f("prompt_tokens") / _lit(c.serving.max_model_len)),
    Feature("prompt_frac_sq", "(L / MML)^2", "1", lambda c: (_f("prompt_tokens") / _lit(c.serving.max_model_len)) ** 2),
    Feature("queue_x_kv", "Q * kv / MNS", "1",
            lambda c: _f("waiting_depth") * _f("kv_usage_gpu_ratio") / _lit(c.serving.max_num_seqs)),
    Feature("prompt_x_kv", "L * kv / MML", "1",
            lambda c: _f("prompt_tokens") * _f("kv_usage_gpu_ratio") / _lit(c.serving.max_model_len)),
    Feature("inv_tp", "1 / tp", "1", lambda c: _lit(1.0 / c.serving.tp)),
    Feature("prefix_caching", "prefix_caching", "1", lambda c: _lit(float(c.serving.prefix_caching))),
    Feature("chunked_prefill", "chunked_prefill", "1", lambda c: _lit(float(c.serving.chunked_prefill))),
    Feature("tp_gt_1", "tp > 1", "1", lambda c: _lit(float(c.serving.tp > 1))),
    Feature("tp_comm_us", "(tp - 1) * L * hidden_size * weight_bytes / link_bandwidth", "us",
            lambda c: _f("prompt_tokens") * _lit(
                (c.serving.tp - 1) * c.model.hidden_size * c.model.weight_bytes / c.link_bytes_per_us)),
    Feature("running_fill", "R / MNS", "1", lambda c: _f("running_depth") / _lit(c.serving.max_num_seqs)),
    Feature("running_x_kv", "R * kv / MNS", "1",
            lambda c: _f("running_depth") * _f("kv_usage_gpu_ratio") / _lit(c.serving.max_num_seqs)),
)

ALPHA_COLUMNS = ["waiting_depth", "running_depth", "kv_usage_gpu_ratio", "prompt_tokens"]
REQUEST_READ = ["request_id", "arrival_ns", "queued_ns", "prompt_tokens"]
STEP_LOAD_READ = ["ts_start_ns", "running_depth", "waiting_depth", "kv_usage_gpu_ratio"]

FEATURES: dict[str, tuple[Feature, ...]] = {"alpha": ALPHA_FEATURES, "beta": BETA_FEATURES}
TARGET_UNITS = {"alpha": "us", "beta": "us"}
TARGET_DEFINITION = {
    "alpha": "(queued_ns - arrival_ns) / 1000: API arrival until the request enters the waiting queue",
    "beta": "duration_us of one engine step",
}
STEP_READ = sorted(set(BETA_COLUMNS) | set(STEP_LOAD_READ) | {"step_id", "duration_us"})


def feature_names(target: str) -> list[str]:
    return [f.name for f in FEATURES[target]]


def feature_matrix(df: pl.DataFrame, cfg: DeploymentConfig, target: str) -> np.ndarray:
    """The (rows x features) float64 matrix of ``target`` for rows of one configuration."""
    exprs = [f.expr(cfg).alias(f.name) for f in FEATURES[target]]
    return df.select(exprs).to_numpy().astype(np.float64, copy=False)


# Columns a prediction row may carry: None is required; an omitted optional one takes its
# number, or its function of the row (one token per decoding request, one prefilling request).
INPUT_COLUMNS: dict[str, dict[str, Any]] = {
    "beta": {"prefill_tokens": None, "decode_tokens": None, "running_depth": None, "kv_usage_gpu_ratio": None,
             "scheduled_tokens": lambda r: r["prefill_tokens"] + r["decode_tokens"],
             "num_prefill_reqs": lambda r: int(r["prefill_tokens"] > 0), "num_decode_reqs": lambda r: r["decode_tokens"],
             "kv_blocks_offloaded": 0, "kv_blocks_restored": 0},
    "alpha": {"prompt_tokens": None, "waiting_depth": None, "running_depth": None, "kv_usage_gpu_ratio": None},
}


def rows_frame(target: str, rows: list[Mapping[str, Any]], where: str) -> pl.DataFrame:
    """Validate raw input rows for ``target`` and fill documented defaults."""
    if not isinstance(rows, list) or not all(isinstance(r, Mapping) for r in rows):
        raise ArtifactError(f"{where}: '{target}' must be a list of objects")
    spec = INPUT_COLUMNS[target]
    cols: dict[str, list[float]] = {name: [] for name in spec}
    for i, r in enumerate(rows):
        row: dict[str, float] = {}  # this row's fields validated so far (derived defaults read them)
        for name, default in spec.items():
            v = r.get(name, default)
            if v is None:
                raise ArtifactError(f"{where}: {target} row {i} is missing {name!r}")
            if callable(v):
                v = v(row)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not np.isfinite(v) or v < 0:
                raise ArtifactError(f"{where}: {target} row {i} field {name!r} must be a non-negative number, got {v!r}")
            row[name] = float(v)
        for name, v in row.items():
            cols[name].append(v)
    return pl.DataFrame({k: pl.Series(k, v, dtype=pl.Float64) for k, v in cols.items()},
                        schema={k: pl.Float64 for k in spec})


def attach_load(requests: pl.DataFrame, steps: pl.DataFrame) -> pl.DataFrame:
    """Add the engine load each request met at arrival (as-of join on step start times).

    A request that arrives before the first recorded step met an idle engine: zeros. A request
    without an engine queue time (imported from a client-side trace) has no alpha target: left out.
    """
    if "queued_ns" in requests.columns:
        requests = requests.filter(pl.col("queued_ns").is_not_null())
    load = steps.select(STEP_LOAD_READ).sort("ts_start_ns")
    joined = requests.sort("arrival_ns").join_asof(load, left_on="arrival_ns", right_on="ts_start_ns",
                                                   strategy="backward")
    return joined.with_columns(
        pl.col("running_depth").fill_null(0),
        pl.col("waiting_depth").fill_null(0),
        pl.col("kv_usage_gpu_ratio").fill_null(0.0),
    ).drop("ts_start_ns")


def alpha_target(requests: pl.DataFrame) -> np.ndarray:
    return ((requests["queued_ns"] - requests["arrival_ns"]).cast(pl.Float64) / 1000.0).to_numpy()


def beta_target(steps: pl.DataFrame) -> np.ndarray:
    return steps["duration_us"].cast(pl.Float64).to_numpy()


def holdout_mask(n: int, every: int = 10, block: int = 500) -> np.ndarray:
    """Deterministic held-out slice: every ``every``-th block of consecutive rows.

    Contiguous blocks, not single rows, so a held-out step is not flanked by training steps
    with nearly the same batch (which would flatter the metrics). Blocks shrink for short
    partitions so that each still holds out about 1/``every`` of its rows in >= 5 blocks.
    """
    if every <= 0:
        return np.zeros(n, dtype=bool)
    block = max(1, min(block, n // (5 * every)))
    return (np.arange(n) // block) % every == every - 1


def column_scale(X: np.ndarray) -> np.ndarray:
    """Per-column scale for the solver: max |x|, 1 for all-zero columns (bias stays 1)."""
    s = np.abs(X).max(axis=0) if len(X) else np.ones(X.shape[1])
    return np.where(s > 0, s, 1.0)


def features_markdown() -> str:
    """The feature tables as Markdown (``docs/features.md`` is this text; a test keeps them equal)."""
    out = ["# RECE features", "",
           "Generated from `rece_dist/features.py` (`python -m rece_dist.features > docs/features.md`).", ""]
    for target, feats in FEATURES.items():
        out += [f"## {target}: {TARGET_DEFINITION[target]} ({TARGET_UNITS[target]})", "",
                "| # | name | formula | units |", "|---|---|---|---|"]
        out += [f"| {i} | `{f.name}` | `{f.formula}` | {f.units} |" for i, f in enumerate(feats)]
        out.append("")
    out += ["Symbols: P prefill tokens, D decode tokens, B scheduled tokens, R running depth, Q waiting depth,",
            "kv GPU KV usage ratio, L prompt tokens, MBT max_num_batched_tokens, MNS max_num_seqs,",
            "MML max_model_len. Bandwidths in bytes/us, peak_flops in FLOP/us (datasheet values), so `_us`",
            "features are times at peak rate. `block_bytes = block_size * kv_bytes_per_token / tp`.",
            "`dense_bytes_per_gpu`: the weights outside the routed experts, / tp; `dense_flops_per_token`:",
            "2 x active parameters outside the experts; `k` of `E` experts per token, `expert_flops_per_token`",
            "one expert's MLP over all layers; `ep` expert-parallel degree (1 for dense models),",
            "`expert_shards = ep if ep > 1 else tp`, `experts_local = E / ep`, `expert_bytes_local` one",
            "expert's bytes over all layers (/ tp unless ep > 1); `collectives_per_step` = 0 at tp 1, else",
            "num_layers x (1 if ep > 1 else 2). `max(a, b)` is the larger of the two for that row.",
            "A comparison (`tp > 1`, `vllm_version == \"0.14.0\"`) is 1 when it holds for the configuration,",
            "else 0; `vllm_version` is `serving.vllm_version`, compared as a string.",
            "Alpha's Q, R and kv are the values of the last engine step that started at or before the",
            "request's arrival (zero before the first step).", ""]
    return "\n".join(out)


if __name__ == "__main__":
    print(features_markdown(), end="")
