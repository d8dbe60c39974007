"""``rece synth``: a store of realistic synthetic vLLM traces.

Configurations are drawn across the catalog (models, GPUs, TP 1-8 where the model fits,
batching limits, feature flags, vLLM releases), diverse from the first draw on. Each
configuration is one Ray task: it plans a few serving sessions per day with different load
(idle to saturated), arrival processes and length mixes, runs each through the engine
(:mod:`rece_dist.engine`) until its share of ``steps_per_config`` is reached, and writes its
``steps`` and ``requests`` partitions itself.

Deterministic for a seed: configuration ``i`` draws everything from
``SeedSequence([seed, i])``; timestamps are epoch ns counted from midnight UTC of
``start_date``; no wall-clock time reaches the data. Same arguments, byte-identical files.

Request rows encode how a request ended without a status column: ``departed_ns`` is set only
when the client received the whole response; an aborted request (client timeout) has
``finished_ns`` (the abort) but no ``departed_ns``; a request still in flight when its session
ends has neither. ``output_tokens`` counts the tokens generated so far.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import date as Date, datetime, timezone

import numpy as np
import polars as pl
import pyarrow as pa

from .config import Catalog, DeploymentConfig, ServingSettings
from .engine import Engine, SimResult
from .errors import ConfigError, ReceError
from .physics import VLLM_RELEASES, StepModel
from .progress import log
from .schema import TABLES
from .store import Store
from .workload import HeavyTailLengths, Lengths, RequestSource, SharedPrefixLengths, Stage, Workload

DEFAULT_START_DATE = "2026-11-01"
TP_CHOICES = (1, 2, 4, 8)
BATCHED_TOKENS_CHOICES = (2048, 4096, 8192)
MAX_SEQS_CHOICES = (64, 128, 256)
MAX_MODEL_LEN = 4096
_DAY_US = 86_400e6
_CONFIG_STREAM = 1 << 32  # entropy word that keeps configuration sampling apart from the per-config streams


@dataclass(frozen=True)
class Segment:
    """One serving session: an engine started fresh, a workload, a step quota."""

    start_us: float  # earliest start, us after start-date midnight
    steps: int
    workload: Workload


@dataclass(frozen=True)
class ConfigOutput:
    config_id: str
    steps: int
    requests: int
    partitions: int


@dataclass(frozen=True)
class SynthSummary:
    uri: str
    configs: int
    steps: int
    requests: int
    partitions: int
    bytes: int
    seconds: float

    def summary(self) -> str:
        return (
            f"synth: wrote {self.configs} configurations, {self.steps} steps, {self.requests} requests "
            f"in {self.partitions} partitions ({self.bytes / 2**20:.1f} MiB) to {self.uri} "
            f"in {self.seconds:.1f} s ({self.steps / max(self.seconds, 1e-9) / 1e3:.0f}k steps/s)"
        )


# --- configurations -------------------------------------------------------------------------

def sample_configs(n: int, seed: int, catalog: Catalog | None = None) -> list[DeploymentConfig]:
    """``n`` distinct valid configurations; each pick prefers settings not yet seen.

    Every pick scores a batch of random candidates by how many new values they bring (a new
    model or GPU weighs most, then MoE, CPU offload and TP), so the first dozen already span
    several models, GPUs and TPs, at least one MoE model and one offload configuration;
    once everything has been seen the picks are plain random draws.
    """
    catalog = catalog or Catalog.default()
    rng = np.random.default_rng([seed, _CONFIG_STREAM])
    placements = _placements(catalog)
    seen: dict[str, set] = {}
    out: list[DeploymentConfig] = []
    ids: set[str] = set()
    while len(out) < n:
        best, best_score = None, -1.0
        for _ in range(48):
            cfg = _random_config(rng, catalog, placements)
            if cfg is None or cfg.config_id in ids:
                continue
            score = sum(w for key, value, w in _traits(cfg) if value not in seen.get(key, ()))
            if score > best_score:
                best, best_score = cfg, score
        if best is None:
            raise ConfigError(f"could not draw {n} distinct configurations from the catalog")
        out.append(best)
        ids.add(best.config_id)
        for key, value, _ in _traits(best):
            seen.setdefault(key, set()).add(value)
    return out


def _traits(cfg: DeploymentConfig) -> list[tuple[str, object, float]]:
    s = cfg.serving
    return [
        ("model", cfg.model.name, 4.0), ("gpu", cfg.gpu.name, 4.0), ("moe", cfg.model.is_moe, 3.0),
        ("offload", s.cpu_offload, 3.0), ("tp", s.tp, 2.0), ("mbt", s.max_num_batched_tokens, 1.0),
        ("seqs", s.max_num_seqs, 1.0), ("chunked", s.chunked_prefill, 1.0), ("prefix", s.prefix_caching, 1.0),
        ("version", s.vllm_version, 1.0), ("ep", s.expert_parallel > 1, 1.0),
    ]


def _placements(catalog: Catalog) -> list[tuple[str, str, int]]:
    """(model, GPU, TP) triples where the model's weights and one max-length sequence fit."""
    out = []
    for m in sorted(catalog.models):
        for g in sorted(catalog.gpus):
            for tp in TP_CHOICES:
                cfg = DeploymentConfig(catalog.models[m], catalog.gpus[g], ServingSettings(tp=tp, max_model_len=MAX_MODEL_LEN))
                try:
                    cfg.check("<sample>")
                except ConfigError:
                    continue
                out.append((m, g, tp))
    if not out:
        raise ConfigError("no model in the catalog fits on any GPU")
    return out


def _random_config(rng: np.random.Generator, catalog: Catalog, placements: list[tuple[str, str, int]]) -> DeploymentConfig | None:
    m, g, tp = placements[rng.integers(len(placements))]
    model = catalog.models[m]
    mbt = int(rng.choice(BATCHED_TOKENS_CHOICES))
    chunked = bool(rng.random() < 0.8)
    serving = ServingSettings(
        tp=tp,
        max_num_batched_tokens=mbt,
        max_num_seqs=int(rng.choice(MAX_SEQS_CHOICES)),
        max_model_len=MAX_MODEL_LEN if chunked else min(MAX_MODEL_LEN, mbt),
        chunked_prefill=chunked,
        prefix_caching=bool(rng.random() < 0.6),
        cpu_offload=bool(rng.random() < 0.25),
        expert_parallel=tp if model.is_moe and tp > 1 and rng.random() < 0.5 else 1,
        vllm_version=str(rng.choice(list(VLLM_RELEASES))),
    )
    cfg = DeploymentConfig(model, catalog.gpus[g], serving)
    try:
        cfg.check("<sample>")
    except ConfigError:
        return None
    return cfg


# --- sessions and workloads -----------------------------------------------------------------

def plan_segments(cfg: DeploymentConfig, model: StepModel, rng: np.random.Generator, steps: int, days: int) -> list[Segment]:
    """Split ``steps`` over ``days`` and 1-3 sessions a day, each with its own workload.

    A day's sessions start in the early morning and follow each other with gaps; rows are
    partitioned by their own timestamps, so a very long day would spill past midnight into
    the next date rather than be cut.
    """
    per_day = [steps // days + (1 if d < steps % days else 0) for d in range(days)]
    out = []
    for day, quota in enumerate(per_day):
        if quota == 0:
            continue
        n = int(min(rng.integers(1, 4), quota))
        counts = 1 + np.floor(rng.dirichlet(np.full(n, 2.0)) * (quota - n)).astype(int)
        counts[-1] += quota - counts.sum()
        start = day * _DAY_US + rng.uniform(0, 6 * 3600e6)
        for k in range(n):
            out.append(Segment(start, int(counts[k]), random_workload(cfg, model, rng)))
            start += rng.uniform(5 * 60e6, 2 * 3600e6)  # earliest start of the next one
    return out


def random_workload(cfg: DeploymentConfig, model: StepModel, rng: np.random.Generator) -> Workload:
    """A session's traffic: a length mix, an arrival process and 1-3 load stages placed
    relative to what this deployment can serve, from nearly idle to overloaded."""
    lengths = _random_lengths(rng)
    prompt, output = _mean_lengths(lengths)
    capacity = model.decode_capacity_rps(min(prompt, MAX_MODEL_LEN / 2), min(output, MAX_MODEL_LEN / 2))
    level = rng.choice(3, p=[0.6, 0.25, 0.15])
    load = float(rng.uniform(*((0.1, 0.85), (0.85, 1.1), (1.1, 1.6))[level]))
    stages = tuple(
        Stage(float(rng.uniform(60, 900)), capacity * load * float(rng.uniform(0.6, 1.4)))
        for _ in range(int(rng.integers(1, 4)))
    )
    return Workload(
        stages=stages,
        lengths=lengths,
        arrivals=str(rng.choice(["poisson", "mmpp", "batched", "constant"], p=[0.45, 0.25, 0.15, 0.15])),
        burstiness=float(rng.uniform(2.0, 3.5)),
        timeout_s=float(rng.choice([60.0, 120.0, 300.0, 600.0])),
        repeat=True,
    )


def _random_lengths(rng: np.random.Generator) -> Lengths:
    kind = rng.choice(3, p=[0.5, 0.2, 0.3])
    if kind == 0:  # chat, optionally behind shared system prompts
        groups = int(rng.integers(1, 17)) if rng.random() < 0.5 else 0
        return HeavyTailLengths(
            prompt_median=float(np.exp(rng.uniform(np.log(150), np.log(1500)))), prompt_sigma=float(rng.uniform(0.6, 1.0)),
            output_median=float(np.exp(rng.uniform(np.log(60), np.log(500)))), output_sigma=float(rng.uniform(0.6, 0.9)),
            prefix_groups=groups, prefix_len=int(rng.integers(64, 1025)) if groups else 0,
        )
    if kind == 1:  # retrieval-augmented: long prompts, short answers
        return HeavyTailLengths(
            prompt_median=float(rng.uniform(1500, 3000)), prompt_sigma=float(rng.uniform(0.3, 0.5)),
            output_median=float(rng.uniform(50, 200)), output_sigma=float(rng.uniform(0.4, 0.7)),
            tail_frac=0.02,
        )
    return SharedPrefixLengths(  # inference-perf style benchmark traffic
        system_prompt_len=int(rng.integers(100, 1001)), question_len=int(rng.integers(200, 1001)),
        output_len=int(rng.integers(100, 1501)), num_groups=int(rng.integers(4, 33)), users_per_group=int(rng.integers(1, 9)),
    )


def _mean_lengths(lengths: Lengths) -> tuple[float, float]:
    if isinstance(lengths, SharedPrefixLengths):
        return lengths.system_prompt_len + lengths.question_len, lengths.output_len
    return (
        _lognormal_mean(lengths.prompt_median, lengths.prompt_sigma) + lengths.prefix_len,
        _lognormal_mean(lengths.output_median, lengths.output_sigma),
    )


def _lognormal_mean(median: float, sigma: float) -> float:
    return median * math.exp(sigma**2 / 2)


# --- one configuration ----------------------------------------------------------------------

def simulate_config(
    cfg: DeploymentConfig, index: int, seed: int, steps: int, days: int, start_date: str
) -> dict[str, dict[str, pl.DataFrame]]:
    """Every session of configuration ``index``: ``{table: {date: frame}}`` in schema order."""
    plan_seq, sim_seq = np.random.SeedSequence([seed, index]).spawn(2)
    model = StepModel(cfg)
    epoch_ns = _midnight_ns(start_date)
    frames: dict[str, list[pl.DataFrame]] = {"steps": [], "requests": []}
    not_before = 0.0
    step_base = 0
    for k, seg in enumerate(plan_segments(cfg, model, np.random.default_rng(plan_seq), steps, days)):
        src_rng, eng_rng = (np.random.default_rng(s) for s in sim_seq.spawn(2))
        t0 = max(seg.start_us, not_before)
        source = RequestSource(seg.workload, src_rng, cfg.serving.max_model_len)
        res = Engine(cfg, source, eng_rng, model).run(max_steps=seg.steps)
        frames["steps"].append(_steps_frame(res, epoch_ns, t0, step_base))
        frames["requests"].append(_requests_frame(res, epoch_ns, t0, k))
        n = len(res.steps["duration_us"])
        step_base += n
        if n:
            not_before = t0 + res.steps["t_start_us"][-1] + res.steps["duration_us"][-1] + 60e6
    out: dict[str, dict[str, pl.DataFrame]] = {}
    for table, parts in frames.items():
        df = pl.concat(parts)
        key = "ts_start_ns" if table == "steps" else "arrival_ns"
        df = df.with_columns(_date_of(pl.col(key)).alias("_date"))
        out[table] = {d: g.drop("_date") for (d,), g in df.group_by("_date", maintain_order=True)}
    return out


def _midnight_ns(start_date: str) -> int:
    try:
        d = Date.fromisoformat(start_date)
    except ValueError:
        raise ConfigError(f"start date must be YYYY-MM-DD, got {start_date!r}") from None
    return int(datetime(d.year, d.month, d.day, tzinfo=timezone.utc).timestamp()) * 10**9


def _date_of(ns: pl.Expr) -> pl.Expr:
    return ns.cast(pl.Datetime("ns", "UTC")).dt.date().cast(pl.String)


def _ns(epoch_ns: int, t0_us: float, t_us: np.ndarray) -> pl.Series:
    """Absolute epoch ns of run-relative us (NaN -> null)."""
    rel = np.rint((t0_us + t_us) * 1e3)
    missing = np.isnan(rel)
    return pl.Series(pa.array(np.where(missing, 0, rel).astype(np.int64) + epoch_ns, mask=missing))


def _steps_frame(res: SimResult, epoch_ns: int, t0_us: float, step_base: int) -> pl.DataFrame:
    st = res.steps
    n = len(st["duration_us"])
    prefill = st["prefill_tokens"].astype(np.int32)
    decode = st["num_decode_reqs"].astype(np.int32)
    used = st["kv_blocks_used"].astype(np.int32)
    total = res.kv_blocks_total
    return pl.DataFrame({
        "step_id": np.arange(step_base, step_base + n, dtype=np.int64),
        "ts_start_ns": _ns(epoch_ns, t0_us, st["t_start_us"]),
        "ts_end_ns": _ns(epoch_ns, t0_us, st["t_start_us"] + st["duration_us"]),
        "duration_us": st["duration_us"],
        "running_depth": st["running_depth"].astype(np.int32),
        "waiting_depth": st["waiting_depth"].astype(np.int32),
        "num_prefill_reqs": st["num_prefill_reqs"].astype(np.int32),
        "num_decode_reqs": decode,
        "scheduled_tokens": prefill + decode,
        "prefill_tokens": prefill,
        "decode_tokens": decode,
        "num_finished": st["num_finished"].astype(np.int32),
        "num_preempted": st["num_preempted"].astype(np.int32),
        "kv_usage_gpu_ratio": (used / total).astype(np.float32),
        "kv_blocks_total_gpu": np.full(n, total, dtype=np.int32),
        "kv_blocks_free_gpu": (total - used).astype(np.int32),
        "kv_blocks_offloaded": st["kv_blocks_offloaded"].astype(np.int32),
        "kv_blocks_restored": st["kv_blocks_restored"].astype(np.int32),
    })


def _requests_frame(res: SimResult, epoch_ns: int, t0_us: float, segment: int) -> pl.DataFrame:
    r = res.requests
    n = len(r["arrival_us"])
    return pl.DataFrame({
        "request_id": [f"s{segment:02d}-{k:07d}" for k in range(n)],
        "arrival_ns": _ns(epoch_ns, t0_us, r["arrival_us"]),
        "queued_ns": _ns(epoch_ns, t0_us, r["queued_us"]),
        "scheduled_ns": _ns(epoch_ns, t0_us, r["scheduled_us"]),
        "first_token_ns": _ns(epoch_ns, t0_us, r["first_token_us"]),
        "finished_ns": _ns(epoch_ns, t0_us, r["finished_us"]),
        "departed_ns": _ns(epoch_ns, t0_us, r["departed_us"]),
        "prompt_tokens": r["prompt_tokens"].astype(np.int32),
        "cached_prompt_tokens": r["cached_prompt_tokens"].astype(np.int32),
        "output_tokens": r["output_tokens"].astype(np.int32),
        "num_preemptions": r["num_preemptions"].astype(np.int32),
    })


def _synth_config(uri: str, cfg: DeploymentConfig, index: int, seed: int, steps: int, days: int, start_date: str,
                  fmt: str = "store") -> ConfigOutput:
    """One Ray task: simulate a configuration and write its partitions (or, for ``otlp``, the
    OTLP/JSON file the instrumented vLLM would have exported for it)."""
    store = Store(uri)
    tables = simulate_config(cfg, index, seed, steps, days, start_date)
    if fmt == "otlp":
        import io

        from .ingest.otlp_writer import write_otlp

        buf = io.StringIO()
        write_otlp(buf, cfg.config_id, *(pl.concat(list(tables[t].values())) for t in ("steps", "requests")))
        store.write_bytes(f"otlp/{cfg.config_id}.jsonl", buf.getvalue().encode())
    for table, by_date in tables.items() if fmt == "store" else ():
        for day, df in sorted(by_date.items()):
            store.write_partition(table, cfg.config_id, day, df)
    return ConfigOutput(
        cfg.config_id,
        steps=sum(len(df) for df in tables["steps"].values()),
        requests=sum(len(df) for df in tables["requests"].values()),
        partitions=sum(len(by_date) for by_date in tables.values()) if fmt == "store" else 0,
    )


# --- the whole store ------------------------------------------------------------------------

def generate_store(
    uri: str,
    n_configs: int,
    steps_per_config: int,
    seed: int,
    days: int = 3,
    start_date: str = DEFAULT_START_DATE,
    fmt: str = "store",
) -> SynthSummary:
    """Write a complete store: store.json, one document per configuration, and each
    configuration's partitions from its own Ray task (Ray is started locally if needed).

    ``fmt="otlp"`` writes, instead of partitions and store.json, ``otlp/<config_id>.jsonl`` per
    configuration (for ``rece ingest --format otlp --config configs/<config_id>.json``)."""
    import ray

    if n_configs < 1 or steps_per_config < 1 or days < 1:
        raise ConfigError("configs, steps per config and days must all be at least 1")
    _midnight_ns(start_date)
    configs = sample_configs(n_configs, seed)
    store = Store(uri)
    if fmt == "store":
        store.init({
            "generator": "rece synth", "seed": seed, "configs": n_configs, "steps_per_config": steps_per_config,
            "days": days, "start_date": start_date,
        })
    for cfg in configs:
        store.write_config(cfg)

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local", include_dashboard=False)
    task = ray.remote(num_cpus=1)(_synth_config)
    t0 = time.monotonic()
    pending = [task.remote(uri, cfg, i, seed, steps_per_config, days, start_date, fmt) for i, cfg in enumerate(configs)]
    done: list[ConfigOutput] = []
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        try:
            done.append(ray.get(ready[0]))
        except ray.exceptions.RayTaskError as exc:
            if isinstance(exc.cause, ReceError):
                raise exc.cause from None
            raise
        steps = sum(o.steps for o in done)
        rate = steps / max(time.monotonic() - t0, 1e-9)
        log(f"synth: {len(done)}/{len(configs)} configurations, {steps} steps, {rate / 1e3:.0f}k steps/s")
    seconds = time.monotonic() - t0
    return SynthSummary(
        uri=store.uri,
        configs=len(configs),
        steps=sum(o.steps for o in done),
        requests=sum(o.requests for o in done),
        partitions=sum(o.partitions for o in done),
        bytes=sum(p.size_bytes for table in TABLES for p in store.partitions(table)),
        seconds=seconds,
    )
