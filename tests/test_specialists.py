"""Embedding, clustering and mixing: properties that hold by construction, checked on data."""

from __future__ import annotations

import numpy as np
import pytest

from rece_dist.config import Catalog, DeploymentConfig, ServingSettings, config_vector
from rece_dist.ensemble import mixing_weights, rearrange
from rece_dist.specialists import Embedding, cluster, cosine_similarity


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


def test_cosine_similarity_closed_form():
    a = np.array([1.0, 0.0])
    B = np.array([[2.0, 0.0], [0.0, 3.0], [-1.0, -1.0], [0.0, 0.0]])
    np.testing.assert_allclose(cosine_similarity(a, B), [1.0, 0.0, -np.sqrt(0.5), 0.0])


def test_kmeans_separates_gpus_and_is_deterministic():
    cfgs = _configs()
    E = Embedding.fit(np.vstack([config_vector(c) for c in cfgs]))(np.vstack([config_vector(c) for c in cfgs]))
    a = cluster(E, 2, "kmeans", seed=3)
    b = cluster(E, 2, "kmeans", seed=3)
    np.testing.assert_array_equal(a.labels, b.labels)
    gpus = np.array([c.gpu.name for c in cfgs])
    # the two GPUs differ in 4 coordinates at once; they are the dominant split
    assert len(set(a.labels[gpus == "H100-SXM"])) == 1 and len(set(a.labels[gpus == "L40S"])) == 1
    assert a.silhouette is not None and a.silhouette > 0.2
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
