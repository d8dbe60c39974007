"""Configuration embedding and clustering into specialists.

The embedding is the seed's configuration vector (``config.CONFIG_VECTOR``) standardised by
the training configurations' mean and standard deviation. The seed computes cosine
similarity on the raw vector, but every raw coordinate is non-negative, so all configurations
land within a few degrees of each other and softmax weights come out nearly uniform;
centring first lets cosine similarity tell an H100 from an L40S. Coordinates that do not vary
across the training configurations get scale 1 (they carry no information, and must not
divide by zero).

    e(c) = (v(c) - mean) / std            cos(a, b) = a.b / (|a| |b|)   (0 if either is 0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.metrics import silhouette_score

from .config import DeploymentConfig, config_vector

METHODS = ("kmeans", "agglomerative")


@dataclass(frozen=True)
class Embedding:
    """The standardisation learned from the training configurations."""

    center: np.ndarray
    scale: np.ndarray

    @classmethod
    def fit(cls, vectors: np.ndarray) -> "Embedding":
        center = vectors.mean(axis=0)
        std = vectors.std(axis=0)
        return cls(center=center, scale=np.where(std > 1e-12, std, 1.0))

    def __call__(self, vectors: np.ndarray) -> np.ndarray:
        return (np.atleast_2d(vectors) - self.center) / self.scale

    def embed(self, cfg: DeploymentConfig) -> np.ndarray:
        return self(config_vector(cfg))[0]


def cosine_similarity(a: np.ndarray, B: np.ndarray) -> np.ndarray:
    """cos(a, b_k) for each row b_k of B; 0 where a norm is 0 (the centroid of everything)."""
    B = np.atleast_2d(B)
    na = np.linalg.norm(a)
    nb = np.linalg.norm(B, axis=1)
    den = na * nb
    out = np.zeros(len(B))
    ok = den > 1e-12
    out[ok] = (B[ok] @ a) / den[ok]
    return out


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray         # specialist index per configuration
    centroids: np.ndarray      # (k, d) in embedding space
    method: str
    k_requested: int
    silhouette: float | None   # cosine silhouette; None where it is undefined (k < 2 or k = n)

    @property
    def k(self) -> int:
        return len(self.centroids)


def cluster(E: np.ndarray, k: int, method: str = "kmeans", seed: int = 0, n_init: int = 20) -> Clustering:
    """Group embedded configurations into at most ``k`` specialists.

    Rows are L2-normalised first, so Euclidean k-means on them follows the cosine geometry
    that mixing uses. ``k`` above the number of distinct configurations is clipped (one
    specialist per distinct configuration) rather than failing.
    """
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")
    if k < 1:
        raise ValueError("the number of specialists must be at least 1")
    n = len(E)
    norms = np.linalg.norm(E, axis=1, keepdims=True)
    U = np.divide(E, norms, out=np.zeros_like(E), where=norms > 1e-12)
    k_eff = min(k, len(np.unique(np.round(U, 12), axis=0)))
    if k_eff == 1:
        labels = np.zeros(n, dtype=int)
    elif method == "kmeans":
        labels = KMeans(n_clusters=k_eff, n_init=n_init, random_state=seed).fit_predict(U)
    else:
        labels = AgglomerativeClustering(n_clusters=k_eff, metric="cosine", linkage="average").fit_predict(U)
    labels = _canonical_labels(labels)
    centroids = np.vstack([E[labels == j].mean(axis=0) for j in range(k_eff)])
    sil = None
    if 2 <= k_eff < n and np.linalg.norm(U, axis=1).min() > 0:
        sil = float(silhouette_score(U, labels, metric="cosine"))
    return Clustering(labels=labels, centroids=centroids, method=method, k_requested=k, silhouette=sil)


def _canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters in order of first appearance, so equal inputs give equal artifacts."""
    order: dict[int, int] = {}
    for lab in labels:
        order.setdefault(int(lab), len(order))
    return np.array([order[int(lab)] for lab in labels], dtype=int)
