"""Features against values computed by hand from datasheet numbers and the formulas' text."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from rece_dist.config import Catalog, DeploymentConfig, ServingSettings
from rece_dist.features import (ALPHA_FEATURES, BETA_FEATURES, alpha_target, attach_load, feature_matrix,
                                holdout_mask)


@pytest.fixture(scope="module")
def cat() -> Catalog:
    return Catalog.default()


def test_model_quantities_match_published_figures(cat):
    m = cat.model("Llama-2-7b-hf")
    # HuggingFace reports 6,738,415,616 parameters; we ignore RMSNorm weights (266,240).
    assert m.total_params == pytest.approx(6_738_415_616, rel=1e-4)
    assert m.kv_bytes_per_token == 2 * 32 * 4096 * 2  # K and V, 32 layers, 4096 wide, fp16
    big = cat.model("Llama-2-70b-hf")
    assert big.kv_bytes_per_token == 2 * 80 * 8 * 128 * 2  # GQA: 8 KV heads of 128
    assert big.total_params == pytest.approx(68_976_648_192, rel=1e-4)
    moe = cat.model("Mixtral-8x7B-v0.1")
    assert moe.total_params == pytest.approx(46_702_792_704, rel=1e-4)
    assert moe.active_params == pytest.approx(12.9e9, rel=0.01)


def _steps() -> pl.DataFrame:
    return pl.DataFrame({
        "prefill_tokens": [1000, 0], "decode_tokens": [24, 64], "scheduled_tokens": [1024, 64],
        "running_depth": [40, 64], "kv_usage_gpu_ratio": [0.5, 0.25], "num_prefill_reqs": [2, 0],
        "num_decode_reqs": [24, 64], "kv_blocks_offloaded": [0, 10], "kv_blocks_restored": [3, 0],
    })


def test_beta_features_by_hand(cat):
    m = cat.model("Llama-2-70b-hf")
    cfg = DeploymentConfig(m, cat.gpu("H100-SXM"),
                           ServingSettings(tp=4, max_num_batched_tokens=2048, max_num_seqs=128, cpu_offload=True))
    X = feature_matrix(_steps(), cfg, "beta")
    f = {feat.name: X[:, i] for i, feat in enumerate(BETA_FEATURES)}
    assert X.shape == (2, len(BETA_FEATURES))
    np.testing.assert_allclose(f["bias"], [1, 1])
    # dense model: every weight is read every step, 70B * 2 bytes / 4 GPUs over 3.35 TB/s, in us
    read = m.total_params * 2 / 4 / 3.35e12 * 1e6
    np.testing.assert_allclose(f["dense_read_us"], read, rtol=1e-12)
    # 1024 and 64 tokens * 2 FLOP per active parameter / (4 GPUs * 989.5e12 FLOP/s)
    compute = np.array([1024, 64]) * 2 * m.active_params / (4 * 989.5e12) * 1e6
    np.testing.assert_allclose(f["dense_compute_us"], compute, rtol=1e-12)
    np.testing.assert_allclose(f["dense_roofline_us"], np.maximum(compute, read), rtol=1e-12)
    assert compute[0] > read > compute[1]  # one compute-bound and one memory-bound step
    # one request prefilling 1000 tokens: 1000^2 / 2 causal pairs of 4 * 80 layers * 8192 FLOPs
    # (the first step has 2 prefilling requests: 500 pairs-per-token each)
    np.testing.assert_allclose(f["prefill_attn_us"], [1000 ** 2 / 4 * 4 * 80 * 8192 / (4 * 989.5e12) * 1e6, 0],
                               rtol=1e-12)
    np.testing.assert_allclose(f["kv_write_us"], np.array([1024, 64]) * 327_680 / (4 * 3.35e12) * 1e6, rtol=1e-12)
    np.testing.assert_allclose(f["kv_read_us"], np.array([0.5, 0.25]) * cfg.kv_blocks_total * 16 * 327_680 / 4
                               / 3.35e12 * 1e6, rtol=1e-12)
    # all-reduce: 3/4 of 4 * 80 layers * 1024 tokens * 8192 * 2 bytes over 900 GB/s
    np.testing.assert_allclose(f["tp_allreduce_us"][0], 0.75 * 4 * 80 * 1024 * 8192 * 2 / 900e9 * 1e6, rtol=1e-12)
    # 2 all-reduces per layer, log2(4) = 2 hops each at the GPU's link latency
    np.testing.assert_allclose(f["tp_comm_fixed_us"], 2 * 80 * 2 * cfg.gpu.link_latency_us, rtol=1e-12)
    block_bytes = 16 * 327_680 / 4
    np.testing.assert_allclose(f["offload_out_us"], [0, 10 * block_bytes / 64e9 * 1e6], rtol=1e-12)
    np.testing.assert_allclose(f["offload_in_us"], [3 * block_bytes / 64e9 * 1e6, 0], rtol=1e-12)
    for name in ("moe_roofline_us", "moe_read_us", "moe_compute_us"):
        np.testing.assert_allclose(f[name], 0)
    np.testing.assert_allclose(f["scheduled_seqs"], [26, 64])
    np.testing.assert_allclose(f["prefill_tokens"], [1000, 0])
    np.testing.assert_allclose(f["decode_tokens"], [24, 64])


def test_moe_terms_appear_only_for_moe(cat):
    m = cat.model("Mixtral-8x7B-v0.1")
    moe = DeploymentConfig(m, cat.gpu("H100-SXM"), ServingSettings(tp=2, expert_parallel=2))
    X = feature_matrix(_steps(), moe, "beta")
    f = {feat.name: X[:, i] for i, feat in enumerate(BETA_FEATURES)}
    # 2 of 8 experts per token; one expert's MLP is 3 * 4096 * 14336 weights in each of 32 layers;
    # under EP 2 each GPU holds 4 whole experts and a token's expert FLOPs spread over the 2 ranks
    expert_params = 32 * 3 * 4096 * 14336
    compute = np.array([1024, 64]) * 2 * 2 * expert_params / (2 * 989.5e12) * 1e6
    np.testing.assert_allclose(f["moe_compute_us"], compute, rtol=1e-12)
    touched = 4 * (1 - 0.75 ** np.array([1024, 64]))  # local experts hit by at least one token
    read = touched * expert_params * 2 / 3.35e12 * 1e6
    np.testing.assert_allclose(f["moe_read_us"], read, rtol=1e-12)
    np.testing.assert_allclose(f["moe_roofline_us"], np.maximum(compute, read), rtol=1e-12)
    # the dense part excludes all 8 experts' weights (per GPU: / tp)
    dense = (m.total_params - 8 * expert_params) * 2 / 2 / 3.35e12 * 1e6
    np.testing.assert_allclose(f["dense_read_us"], dense, rtol=1e-12)
    # EP: one all-reduce per layer over log2(2) hops plus dispatch + combine over log2(2)
    np.testing.assert_allclose(f["tp_comm_fixed_us"], (32 + 2 * 32) * moe.gpu.link_latency_us, rtol=1e-12)
    np.testing.assert_allclose(f["offload_out_us"], 0)  # offload off


@pytest.mark.parametrize("release, on", [("0.10.2", "step_vllm_0_10_2"), ("0.14.0", "step_vllm_0_14_0"),
                                         ("0.11.0", None), ("0.12.0", None)])
def test_release_step_terms_are_one_only_for_their_release(cat, release, on):
    """One indicator per listed release; 0.11.0 and an unlisted release share the pooled bias."""
    cfg = DeploymentConfig(cat.model("Llama-2-7b-hf"), cat.gpu("A100-SXM-80GB"),
                           ServingSettings(tp=1, vllm_version=release))
    X = feature_matrix(_steps(), cfg, "beta")
    f = {feat.name: X[:, i] for i, feat in enumerate(BETA_FEATURES)}
    terms = [n for n in f if n.startswith("step_vllm_")]
    assert terms == ["step_vllm_0_10_2", "step_vllm_0_13_0", "step_vllm_0_14_0"]
    for n in terms:
        np.testing.assert_array_equal(f[n], [1.0, 1.0] if n == on else [0.0, 0.0])


def test_alpha_features_and_asof_load(cat):
    cfg = DeploymentConfig(cat.model("Llama-2-7b-hf"), cat.gpu("A100-SXM-80GB"),
                           ServingSettings(tp=2, max_num_seqs=64, max_model_len=4096, prefix_caching=True))
    steps = pl.DataFrame({"ts_start_ns": [100, 200, 300], "running_depth": [1, 2, 3],
                          "waiting_depth": [10, 20, 30], "kv_usage_gpu_ratio": [0.1, 0.2, 0.3]},
                         schema_overrides={"running_depth": pl.Int32, "waiting_depth": pl.Int32,
                                           "kv_usage_gpu_ratio": pl.Float32})
    req = pl.DataFrame({"request_id": ["a", "b", "c"], "arrival_ns": [250, 50, 300], "queued_ns": [1250, 550, 2300],
                        "prompt_tokens": [512, 1024, 2048]})
    joined = attach_load(req, steps)
    assert joined["request_id"].to_list() == ["b", "a", "c"]  # sorted by arrival
    assert joined["waiting_depth"].to_list() == [0, 20, 30]   # before the first step: idle engine
    np.testing.assert_allclose(alpha_target(joined), [0.5, 1.0, 2.0])
    X = feature_matrix(joined, cfg, "alpha")
    f = {feat.name: X[:, i] for i, feat in enumerate(ALPHA_FEATURES)}
    np.testing.assert_allclose(f["queue_fill"], [0, 20 / 64, 30 / 64])
    np.testing.assert_allclose(f["prompt_tokens"], [1024, 512, 2048])
    np.testing.assert_allclose(f["running_depth"], [0, 2, 3])
    np.testing.assert_allclose(f["queue_fill_sq"], [0, (20 / 64) ** 2, (30 / 64) ** 2])
    np.testing.assert_allclose(f["prompt_frac"], [1024 / 4096, 512 / 4096, 2048 / 4096])
    np.testing.assert_allclose(f["queue_x_kv"], [0, 20 * 0.2 / 64, 30 * 0.3 / 64], rtol=1e-6)
    np.testing.assert_allclose(f["prompt_x_kv"], [0, 512 * 0.2 / 4096, 2048 * 0.3 / 4096], rtol=1e-6)
    np.testing.assert_allclose(f["running_x_kv"], [0, 2 * 0.2 / 64, 3 * 0.3 / 64], rtol=1e-6)
    np.testing.assert_allclose(f["prefix_caching"], 1)
    np.testing.assert_allclose(f["tp_gt_1"], 1)
    np.testing.assert_allclose(f["tp_comm_us"], [1024 * 4096 * 2 / 600e9 * 1e6, 512 * 4096 * 2 / 600e9 * 1e6,
                                                 2048 * 4096 * 2 / 600e9 * 1e6], rtol=1e-12)


def test_holdout_mask_is_blocks():
    m = holdout_mask(25_000, every=10, block=500)
    assert m.sum() == 2500
    assert not m[:4500].any() and m[4500:5000].all()
    short = holdout_mask(3000, every=10)  # blocks shrink to 60 rows: still 10%, in 5 blocks
    assert short.sum() == 300 and short[540:600].all() and not short[:540].any()


def test_docs_table_matches_code():
    from pathlib import Path

    from rece_dist.features import features_markdown

    doc = Path(__file__).resolve().parents[1] / "docs" / "features.md"
    assert doc.read_text() == features_markdown(), "regenerate: python -m rece_dist.features > docs/features.md"
