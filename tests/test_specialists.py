"""Embedding, clustering and mixing: properties that hold by construction, checked on data."""

from __future__ import annotations

import numpy as np
import pytest

from rece_dist.config import Catalog, DeploymentConfig, ServingSettings, config_vector
from rece_dist.embedding import Embedding, LatencyProfile, probe_rows, rms_distance
from rece_dist.ensemble import mixing_weights, rearrange
from rece_dist.features import FEATURES, feature_matrix
from rece_dist.specialists import cluster


def _configs() -> list[DeploymentConfig]:
    cat = Catalog.default()
    out = []
    for gpu in ("H100-SXM", "L40S"):
        for model, tp in (("Llama-2-7b-hf", 1), ("Llama-2-7b-hf", 2), ("Mistral-7B-v0.1", 1)):
            out.append(DeploymentConfig(cat.model(model), cat.gpu(gpu), ServingSettings(tp=tp)))
    return out


def test_embedding_standardises_and_keeps_constant_coordinates_finite():
    V = np.vstack([config_vector(c) for c in _configs()])
    emb = Embedding.fit(V)
    E = emb(V)
    assert np.isfinite(E).all()
    varying = V.std(axis=0) > 0
    np.testing.assert_allclose(E[:, varying].mean(axis=0), 0, atol=1e-12)
    np.testing.assert_allclose(E[:, varying].std(axis=0), 1, atol=1e-12)
    np.testing.assert_allclose(E[:, ~varying], 0)


def test_rms_distance_closed_form():
    e = np.array([0.0, 1.0])
    M = np.array([[0.0, 1.0], [1.0, 2.0], [3.0, -3.0]])
    np.testing.assert_allclose(rms_distance(e, M), [0.0, 1.0, np.sqrt((9 + 16) / 2)])


def _roofline_profile() -> LatencyProfile:
    """A step-time law of the kind the beta features carry: 2 ms per step plus the dense roofline."""
    b = np.zeros(len(FEATURES["beta"]))
    names = [f.name for f in FEATURES["beta"]]
    b[names.index("bias")], b[names.index("dense_roofline_us")] = 2000.0, 1.0
    probes = probe_rows({"beta": {"prefill_tokens": [0.0, 1024.0], "decode_tokens": [8.0, 64.0],
                                  "kv_usage_gpu_ratio": [0.3]}})["beta"]
    return LatencyProfile(probes, b)


def test_latency_profile_is_the_log_of_the_model_on_its_probes_and_round_trips():
    prof = _roofline_profile()
    cfg = _configs()[0]
    X = feature_matrix(prof.probes, cfg, "beta")
    np.testing.assert_allclose(prof(cfg), np.log(2000.0 + X[:, [f.name for f in FEATURES["beta"]].index("dense_roofline_us")]))
    back = LatencyProfile.from_doc(prof.to_doc())
    np.testing.assert_array_equal(back(cfg), prof(cfg))
    floored = LatencyProfile(prof.probes, -prof.coef, floor_us=3.0)  # negative predictions sit at the floor
    np.testing.assert_allclose(floored(cfg), np.log(3.0))


def test_kmeans_on_profiles_groups_by_step_time_and_is_deterministic():
    cfgs = _configs()
    prof = _roofline_profile()
    E = np.vstack([prof(c) for c in cfgs])
    a = cluster(E, 2, "kmeans", seed=3)
    b = cluster(E, 2, "kmeans", seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    # specialists group configurations by how fast they are, not by which settings they share: an
    # L40S at TP 2 (~10 ms steps) joins the H100s at TP 1 (~6 ms), away from the L40S at TP 1 (~18 ms)
    by_speed = a.labels[np.argsort(E.mean(axis=1))]
    assert (np.diff(by_speed) != 0).sum() == 1  # one threshold in step time splits the two specialists
    label = dict(zip((c.label for c in cfgs), a.labels))
    assert label["Llama-2-7b-hf/L40S/tp2/mbt2048/seqs128"] == label["Llama-2-7b-hf/H100-SXM/tp1/mbt2048/seqs128"]
    assert label["Llama-2-7b-hf/L40S/tp2/mbt2048/seqs128"] != label["Llama-2-7b-hf/L40S/tp1/mbt2048/seqs128"]
    assert a.silhouette is not None and a.silhouette > 0.2
    np.testing.assert_allclose(a.centroids[0], E[a.labels == 0].mean(axis=0))
    ag = cluster(E, 2, "agglomerative")
    assert len(set(ag.labels)) == 2


def test_k_larger_than_configurations_is_clipped():
    cfgs = _configs()[:3]
    V = np.vstack([config_vector(c) for c in cfgs])
    c = cluster(Embedding.fit(V)(V), 10)
    assert c.k == 3 and c.k_requested == 10 and sorted(c.labels) == [0, 1, 2]
    assert c.silhouette is None  # undefined with one configuration per cluster
    one = cluster(Embedding.fit(V[:1])(V[:1]), 4)
    assert one.k == 1


def test_mixing_weights_sum_to_one_and_rank_by_similarity():
    rng = np.random.default_rng(0)
    for _ in range(50):
        sim = rng.uniform(-1, 1, size=6)
        for top_k in (None, 1, 3):
            w = mixing_weights(sim, temperature=rng.uniform(0.05, 2), top_k=top_k)
            assert w.sum() == pytest.approx(1.0, abs=1e-12)
            assert (w >= 0).all()
            order = np.argsort(-sim)
            assert (np.diff(w[order]) <= 1e-15).all()  # more similar -> at least as much weight
            if top_k:
                assert (w > 0).sum() == top_k and set(np.flatnonzero(w)) == set(order[:top_k])
    # closed form for two specialists: w0 = 1 / (1 + exp((s1 - s0) / T))
    w = mixing_weights(np.array([0.9, 0.4]), 0.5, None)
    assert w[0] == pytest.approx(1 / (1 + np.exp((0.4 - 0.9) / 0.5)))


def test_rearrange_counts_and_sorts_crossings():
    v = np.array([[1.0, 2.0, 3.0], [2.0, 1.0, 3.0], [3.0, 2.0, 1.0]])
    out, n = rearrange(v)
    assert n == 2
    np.testing.assert_array_equal(out, [[1, 2, 3], [1, 2, 3], [1, 2, 3]])
