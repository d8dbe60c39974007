"""Clustering embedded configurations into specialists.

Configurations are points of the latency-profile embedding (``embedding.LatencyProfile``), whose
RMS distance is the typical log ratio of their step times; Euclidean k-means on the profiles
groups configurations by that distance (it is the RMS distance times sqrt(G)). A specialist's
centroid is the mean profile of its members, and mixing weighs specialists by the distance of
a configuration's profile to each centroid (``ensemble``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("kmeans", "agglomerative")


@dataclass(frozen=True)
class Clustering:
    labels: np.ndarray         # specialist index per configuration
    centroids: np.ndarray      # (k, d) in embedding space
    method: str
    k_requested: int
    silhouette: float | None   # Euclidean silhouette; None where it is undefined (k < 2 or k = n)

    @property
    def k(self) -> int:
        return len(self.centroids)

    @classmethod
    def given(cls, E: np.ndarray, labels: np.ndarray) -> "Clustering":
        """Fixed groups (baselines: one global group, one group per configuration)."""
        _, lab = np.unique(labels, return_inverse=True)
        return cls(lab, np.vstack([E[lab == j].mean(axis=0) for j in range(lab.max() + 1)]), "given",
                   int(lab.max() + 1), None)


def cluster(E: np.ndarray, k: int, method: str = "kmeans", seed: int = 0, n_init: int = 20) -> Clustering:
    """Group embedded configurations into at most ``k`` specialists by Euclidean distance.

    ``k`` above the number of distinct configurations is clipped (one specialist per distinct
    configuration) rather than failing.
    """
    # scikit-learn (1.5 s to import, with scipy.stats and pandas) where a clustering is computed:
    # Ray workers import this module with the pipeline but never cluster
    from sklearn.cluster import AgglomerativeClustering, KMeans
    from sklearn.metrics import silhouette_score

    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}; use one of {', '.join(METHODS)}")
    if k < 1:
        raise ValueError("the number of specialists must be at least 1")
    n = len(E)
    k_eff = min(k, len(np.unique(np.round(E, 12), axis=0)))
    if k_eff == 1:
        labels = np.zeros(n, dtype=int)
    elif method == "kmeans":
        labels = KMeans(n_clusters=k_eff, n_init=n_init, random_state=seed).fit_predict(E)
    else:
        labels = AgglomerativeClustering(n_clusters=k_eff, linkage="average").fit_predict(E)
    labels = _canonical_labels(labels)
    centroids = np.vstack([E[labels == j].mean(axis=0) for j in range(k_eff)])
    sil = float(silhouette_score(E, labels)) if 2 <= k_eff < n else None
    return Clustering(labels=labels, centroids=centroids, method=method, k_requested=k, silhouette=sil)


def _canonical_labels(labels: np.ndarray) -> np.ndarray:
    """Renumber clusters in order of first appearance, so equal inputs give equal artifacts."""
    order: dict[int, int] = {}
    for lab in labels:
        order.setdefault(int(lab), len(order))
    return np.array([order[int(lab)] for lab in labels], dtype=int)
