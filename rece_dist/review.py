"""``rece evaluate`` as one flow: an artifact's recipe evaluated on a store, the donor
experiment, and drift against the version the artifact replaced.

``evaluate``, ``donors`` and ``drift`` each build only on ``refit``; this module sits above the
three and composes them (one ``Fitter``, so the donor experiment reuses the evaluation's fits).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .donors import DonorExperiment, donor_experiment, donor_requests
from .drift import DriftReport, compare
from .errors import ArtifactError
from .evaluate import EvalOptions, Evaluation, evaluate
from .pipeline import TrainSettings, featurize_store
from .refit import EvaluationError, Fitter


@dataclass
class Review:
    """What ``rece evaluate`` reports: the evaluation, the donor experiment, drift, and notes."""

    evaluation: Evaluation
    donors: DonorExperiment | None = None
    drift: DriftReport | None = None
    notes: list[str] = field(default_factory=list)  # the evaluation's, then this flow's own
    seconds: float = 0.0
    report: Path | None = None  # index.html, once written


def load_artifact_ref(ref: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The artifact a user named (see ``publish.load_artifact``) and, for a published version,
    the version it replaced (for drift); None for a bare artifact.json."""
    from .publish import load_artifact, resolve

    doc, manifest = load_artifact(ref)
    previous = (manifest or {}).get("previous")
    if not previous:
        return doc, None
    root = ref.partition("@")[0]
    if not root.startswith("s3://") and os.path.isfile(os.path.join(root, "manifest.json")):  # ROOT/artifacts/v-...
        root = os.path.dirname(os.path.dirname(os.path.normpath(root)))
    return doc, resolve(root, previous)[0]


def settings_of(doc: Mapping[str, Any]) -> TrainSettings:
    """The training settings recorded in an artifact (folds re-fit with exactly these)."""
    try:
        return TrainSettings(**doc["training"]["settings"])
    except (KeyError, TypeError) as exc:
        raise ArtifactError(f"artifact has no usable training settings ({type(exc).__name__}: {exc})") from None


def review_artifact(artifact_ref: str, store_uri: str, options: EvalOptions = EvalOptions(),
                    max_regression: float = 0.05, run_donors: bool = True) -> Review:
    """``rece evaluate``: featurize the store once, run everything, compare with the previous version."""
    t0 = time.monotonic()
    doc, previous = load_artifact_ref(artifact_ref)
    settings = settings_of(doc)
    fs = featurize_store(store_uri, settings)
    with Fitter(fs, settings, options.parallel_fits, options.fit_rows) as fitter:
        skipped: EvaluationError | None = None
        if run_donors:
            try:  # queued behind the evaluation's fits: they run while it scores and aggregates
                fitter.defer(donor_requests(fs, seed=settings.seed))
            except EvaluationError as exc:
                skipped = exc
        ev = evaluate(fs, settings, doc, options, fitter)
        rv = Review(ev, notes=list(ev.notes))
        if run_donors and skipped is None:
            try:
                rv.donors = donor_experiment(fitter, seed=settings.seed)
            except EvaluationError as exc:
                skipped = exc
        if skipped is not None:
            rv.notes.append(f"skipped the donor experiment: {skipped}")
    if previous is not None:
        rv.drift = compare(doc, previous, fs, max_regression)
    rv.seconds = time.monotonic() - t0
    return rv
