"""The trace generator: physical step-time model, engine semantics, sampling, store output,
determinism and the realism check against the reference runs."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest

from rece_dist.cli import main
from rece_dist.config import Catalog, DeploymentConfig, ServingSettings
from rece_dist.engine import Engine, SimResult
from rece_dist.errors import ConfigError
from rece_dist.physics import ApiOverhead, StepModel
from rece_dist.realism import load_reference_runs, simulate_run
from rece_dist.store import Store
from rece_dist.synth import generate_store, sample_configs
from rece_dist.validate import validate_store
from rece_dist.workload import HeavyTailLengths, RequestSource, SharedPrefixLengths, Stage, Workload

REFERENCE_RUNS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "runs"
CAT = Catalog.default()


def cfg(model: str = "Llama-3.1-8B", gpu: str = "H100-SXM", **serving: object) -> DeploymentConfig:
    """A checked deployment from catalog names and serving settings."""
    c = DeploymentConfig(CAT.models[model], CAT.gpus[gpu], ServingSettings(**serving))
    c.check("<test>")
    return c


def simulate(c: DeploymentConfig, workload: Workload, max_steps: int | None = None, seed: int = 0) -> SimResult:
    src, eng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    return Engine(c, RequestSource(workload, src, c.serving.max_model_len), eng).run(max_steps)


# --- physical step-time model (deterministic part, no noise) -------------------------------

def test_longer_prompts_make_longer_prefill_steps() -> None:
    m = StepModel(cfg())
    times = [m.time_us(8, 8 * 500, p, p * (p + 1) // 2, 0, 9) for p in (128, 512, 2048)]
    assert times[0] < times[1] < times[2]


def test_higher_tp_cuts_compute_per_gpu_but_costs_communication() -> None:
    terms = {tp: StepModel(cfg("Llama-2-70b-hf", tp=tp)).terms(64, 64 * 1000, 1024, 1024 * 1025 // 2) for tp in (2, 4, 8)}
    assert terms[2].linear_us > terms[4].linear_us > terms[8].linear_us
    assert terms[2].attention_us > terms[4].attention_us > terms[8].attention_us
    assert terms[2].comm_us < terms[4].comm_us < terms[8].comm_us
    assert StepModel(cfg(tp=1)).terms(64, 64_000).comm_us == 0


def test_expert_term_only_for_moe() -> None:
    assert StepModel(cfg("Mixtral-8x7B-v0.1", tp=2)).terms(32, 32_000).moe_us > 0
    assert StepModel(cfg("Llama-3.1-8B", tp=2)).terms(32, 32_000).moe_us == 0
    # more tokens touch more experts until all are read
    moe = StepModel(cfg("Mixtral-8x7B-v0.1", tp=2))
    assert moe.terms(1, 1000).moe_us < moe.terms(4, 4000).moe_us <= moe.terms(64, 64_000).moe_us


def test_offload_term_only_with_cpu_offload_and_moving_blocks() -> None:
    on, off = StepModel(cfg(cpu_offload=True)), StepModel(cfg())
    assert on.terms(16, 16_000, xfer_blocks=40).offload_us > 0
    assert on.terms(16, 16_000, xfer_blocks=0).offload_us == 0
    assert off.terms(16, 16_000, xfer_blocks=40).offload_us == 0


def test_decode_steps_grow_with_context() -> None:
    m = StepModel(cfg())
    assert m.time_us(32, 32 * 200) < m.time_us(32, 32 * 2000) < m.time_us(32, 32 * 8000)
    assert m.terms(32, 32 * 2000).attention_us > m.terms(32, 32 * 200).attention_us


def test_alpha_grows_with_prompt_and_load() -> None:
    api = ApiOverhead()
    assert api.deterministic_us(100, 0) < api.deterministic_us(2000, 0) < api.deterministic_us(2000, 200)
    assert 300 < api.deterministic_us(500, 8) < 10_000  # a few hundred us to a few ms


# --- engine semantics ----------------------------------------------------------------------

def chat(rate: float, seconds: float = 120, timeout_s: float = 300, **lengths: float) -> Workload:
    spec = {"prompt_median": 600, "prompt_sigma": 0.8, "output_median": 200, "output_sigma": 0.7, **lengths}
    return Workload((Stage(seconds, rate),), HeavyTailLengths(**spec), timeout_s=timeout_s)


def test_batches_respect_budget_seqs_and_kv() -> None:
    c = cfg(max_num_batched_tokens=2048, max_num_seqs=64)
    st = simulate(c, chat(40.0)).steps
    assert (st["prefill_tokens"] + st["num_decode_reqs"]).max() <= 2048
    assert st["running_depth"].max() <= 64
    assert st["kv_blocks_used"].max() <= c.kv_blocks_total
    assert st["waiting_depth"].max() > 0  # 40 req/s overloads 64 sequences: requests queue


def test_chunked_prefill_splits_long_prompts() -> None:
    long_prompts = chat(0.5, prompt_median=3000, prompt_sigma=0.05, tail_frac=0.0)
    chunked = simulate(cfg(max_num_batched_tokens=2048), long_prompts).steps
    assert chunked["prefill_tokens"].max() <= 2048
    whole = simulate(cfg(max_num_batched_tokens=4096, chunked_prefill=False), long_prompts).steps
    assert whole["prefill_tokens"].max() > 2048


def test_preemption_recomputes_and_cpu_offload_moves_blocks() -> None:
    # Llama-2-70B on two A100s holds ~37k KV tokens: 256 long requests cannot all fit
    tight = {"model": "Llama-2-70b-hf", "gpu": "A100-SXM-80GB", "tp": 2, "max_num_seqs": 256, "max_num_batched_tokens": 8192}
    work = chat(8.0, seconds=300, output_median=1500, output_sigma=0.3, prompt_median=1500, prompt_sigma=0.3)
    res = simulate(cfg(**tight), work, 6000)
    assert res.steps["num_preempted"].sum() > 0
    r = res.requests
    done = np.isfinite(r["departed_us"])
    assert (r["output_tokens"][done] == r["target_output_tokens"][done]).all()
    assert (r["num_preemptions"][done] > 0).any()  # preempted requests still complete
    assert res.steps["kv_blocks_offloaded"].sum() == 0
    offload = simulate(cfg(**tight, cpu_offload=True), work, 6000).steps
    assert offload["kv_blocks_offloaded"].sum() > 0 and offload["kv_blocks_restored"].sum() > 0


def test_prefix_cache_hits_only_with_prefix_caching() -> None:
    shared = Workload((Stage(60, 4.0),), SharedPrefixLengths(500, 300, 50, num_groups=4, users_per_group=2))
    hits = simulate(cfg(prefix_caching=True), shared).requests["cached_prompt_tokens"]
    assert (hits > 0).mean() > 0.9  # every user's second round on
    assert (simulate(cfg(prefix_caching=False), shared).requests["cached_prompt_tokens"] == 0).all()


def test_client_timeout_aborts_requests() -> None:
    r = simulate(cfg(max_num_seqs=64), chat(60.0, seconds=60, timeout_s=10)).requests
    aborted = np.isfinite(r["finished_us"]) & ~np.isfinite(r["departed_us"])
    assert aborted.any()
    done = np.isfinite(r["departed_us"])
    assert (r["finished_us"][done] - r["arrival_us"][done]).max() <= 10e6
    assert (r["queued_us"] >= r["arrival_us"]).all()


def test_async_scheduling_makes_new_requests_wait_one_more_step() -> None:
    busy = Workload((Stage(60, 4.0),), SharedPrefixLengths(100, 400, 500, 4, 4), arrivals="poisson")
    waits = {}
    for version in ("0.11.0", "0.14.0"):  # 0.14.0 plans step N+1 while step N runs
        res = simulate(cfg(prefix_caching=True, vllm_version=version), busy)
        r = res.requests
        waits[version] = np.median(r["scheduled_us"] - r["queued_us"]) / np.median(res.steps["duration_us"])
    assert waits["0.11.0"] < 1.0 < waits["0.14.0"]  # about half a step vs one and a half


# --- configuration sampling ----------------------------------------------------------------

def test_first_configurations_are_diverse_and_valid() -> None:
    configs = sample_configs(12, seed=3)
    assert len({c.config_id for c in configs}) == 12
    assert len({c.model.name for c in configs}) >= 6
    assert len({c.gpu.name for c in configs}) == 3
    assert len({c.serving.tp for c in configs}) >= 3
    assert any(c.model.is_moe for c in configs) and any(c.serving.cpu_offload for c in configs)
    for c in configs:
        c.check("<sampled>")
    assert [c.config_id for c in sample_configs(12, seed=3)] == [c.config_id for c in configs]


# --- the store: one Ray run writes three small stores --------------------------------------

def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _parquet_hashes(hashes: dict[str, str]) -> set[str]:
    return {v for k, v in hashes.items() if k.endswith(".parquet")}


@pytest.fixture(scope="module")
def stores(ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out[name] = tmp_path_factory.mktemp(f"store-{name}")
        generate_store(str(out[name]), n_configs=3, steps_per_config=1500, seed=seed, days=2, start_date="2026-03-01")
    return out


def test_synth_writes_a_valid_store(stores: dict[str, Path]) -> None:
    report = validate_store(str(stores["a"]))
    assert report.configs == 3 and report.rows["steps"] == 3 * 1500 and report.rows["requests"] > 0
    store = Store(str(stores["a"]))
    for table in ("steps", "requests"):
        parts = {(p.config_id, p.date) for p in store.partitions(table)}
        assert parts >= {(cid, d) for cid in store.configs() for d in ("2026-03-01", "2026-03-02")}
    steps = store.scan(store.partitions("steps")[0])
    assert (steps["ts_end_ns"] - steps["ts_start_ns"] - (steps["duration_us"] * 1000).round().cast(int)).abs().max() <= 1


def test_same_seed_same_bytes_different_seed_different_data(stores: dict[str, Path]) -> None:
    a, b, c = (_hashes(stores[k]) for k in "abc")
    assert a == b
    assert not _parquet_hashes(a) & _parquet_hashes(c)  # not one data file in common


# --- realism against the reference runs (skipped when the folder is absent) -----------------

@pytest.mark.skipif(not REFERENCE_RUNS.is_dir(), reason="reference runs not available")
def test_generated_medians_match_a_reference_run() -> None:
    run = next(r for r in load_reference_runs(REFERENCE_RUNS) if r.name.endswith("llama-2-70b-hf-tp4-codegen"))
    comps, _ = simulate_run(run)
    assert all(c.passed for c in comps), [(c.ttft_ratio, c.tpot_ratio) for c in comps]


@pytest.mark.skipif(not REFERENCE_RUNS.is_dir(), reason="reference runs not available")
def test_a_broken_reference_run_names_the_file_and_field(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "broken"
    shutil.copytree(next(p for p in sorted(REFERENCE_RUNS.iterdir()) if p.is_dir()), run)
    exp = run / "exp-config.yaml"
    exp.write_text("\n".join(line for line in exp.read_text().splitlines() if not line.startswith("max_num_seqs")))
    with pytest.raises(ConfigError, match=r"broken/exp-config\.yaml: missing field max_num_seqs"):
        load_reference_runs(tmp_path / "runs")


def test_check_reference_on_a_missing_folder_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--check-reference", str(tmp_path / "nope")]) == 2
    assert "reference runs folder not found" in capsys.readouterr().err
