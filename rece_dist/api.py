"""The public Python API: what a notebook, the ``rece`` command and ``jobs/`` call.

    from rece_dist import train, load_artifact, RECEModel
    model = train("STORE", specialists=4, publish_to="ROOT")   # local Ray unless RAY_ADDRESS is set
    model = load_artifact("ROOT")                              # latest; or ROOT@v-..., artifact.json, s3://...
    model.predict("cfg.json", rows)                            # rows x quantiles (P10, P50, P90), microseconds

Small on purpose, like scikit-learn's: a function per flow, a model object that predicts.
Settings are ``TrainSettings`` fields, passed as keywords or as one object; every error a
user can cause is a ``ReceError`` with a one-line message.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from . import pipeline, publish
from .ensemble import RECEModel
from .evaluate import EvalOptions, Sweep
from .evaluate import tune as _tune
from .pipeline import TrainSettings
from .review import Review, review_artifact
from .runner import connect_ray, train_and_publish
from .settings import SWEEP_FOLDS

__all__ = ["RECEModel", "TrainSettings", "EvalOptions", "train", "load_artifact", "evaluate_artifact", "tune"]


def _settings(settings: TrainSettings | None, overrides: dict[str, Any]) -> TrainSettings:
    try:
        return dataclasses.replace(settings or TrainSettings(), **overrides)
    except TypeError as exc:  # an unknown keyword
        fields = ", ".join(f.name for f in dataclasses.fields(TrainSettings))
        raise TypeError(f"{exc}; TrainSettings fields are: {fields}") from None


def train(store: str, settings: TrainSettings | None = None, *, publish_to: str | None = None,
          max_regression: float | None = 0.05, ray_address: str | None = None, feature_cache: bool = True,
          **overrides: Any) -> RECEModel:
    """Train a RECE model on a trace store (a folder or ``s3://bucket/prefix``).

    ``overrides`` are ``TrainSettings`` fields (``specialists=4``, ``borrow=0.1``, ...).
    With ``publish_to`` (an artifact root) the model is published as a new immutable version,
    unless its held-out pinball loss is worse than the root's latest by more than
    ``max_regression`` (None: publish without comparing); the returned model then carries its
    ``manifest`` and ``version``; ``feature_cache`` keeps per-shard features under that root so a
    later run re-featurizes only partitions it has not seen.
    """
    s = _settings(settings, overrides)
    connect_ray(ray_address)
    if publish_to is None:
        return RECEModel(pipeline.train(store, s).artifact)
    result, version = train_and_publish(store, publish_to, s, max_regression=max_regression, feature_cache=feature_cache)
    return RECEModel(result.artifact, publish.resolve(publish_to, version.version)[1])


def load_artifact(ref: str) -> RECEModel:
    """A model from an ``artifact.json``, a version folder, an artifact root (its ``latest``) or
    ``ROOT@v-...``; published versions are digest-verified."""
    doc, manifest = publish.load_artifact(ref)
    return RECEModel(doc, manifest)


def evaluate_artifact(artifact: str, store: str, options: EvalOptions = EvalOptions(), *, donors: bool = True,
                      max_regression: float = 0.05, report: str | None = None,
                      ray_address: str | None = None) -> Review:
    """Validate an artifact's recipe on a store: protocols, baselines, embedding check, sensitivity
    sweep, the donor experiment (``donors``) and drift against the version it replaced; with
    ``report`` a folder, also write the HTML report there (``Review.report``)."""
    connect_ray(ray_address)
    rv = review_artifact(artifact, store, options, max_regression, run_donors=donors)
    if report is not None:
        from .report import write_report  # matplotlib: only when a report is asked for

        rv.report = write_report(rv, report)
    return rv


def tune(store: str, settings: TrainSettings | None = None, *, folds: int | None = SWEEP_FOLDS,
         k_grid: Sequence[int] = (1, 2, 4, 6), temperatures: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
         top_ks: Sequence[int | None] = (1, 2, None), borrows: Sequence[float] | None = None,
         ray_address: str | None = None, **overrides: Any) -> Sweep:
    """Pick K, borrow, temperature and top-k by grouped cross-validation over the store's configurations
    (``folds`` groups, each held out once; None: one configuration per fold)."""
    connect_ray(ray_address)
    return _tune(store, _settings(settings, overrides), folds, k_grid, temperatures, top_ks, borrows)
