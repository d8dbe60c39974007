"""Training settings: everything that changes the artifact, validated once, hashed into the manifest.

Its own module because every stage reads it (featurizing the window, the fits, evaluation
folds, the CLI) and none of them should import another stage to get it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from .errors import ReceError

# Training rows per configuration and target in a validation refit (``rece evaluate``'s folds):
# what bounds an evaluation's cost by the number of configurations, not the store's rows. A
# linear quantile model of ~20 features is pinned down by a few thousand rows per configuration
# (docs/transfer.md, "Evaluation cost", measures what the cap changes).
VALIDATION_ROWS_PER_CONFIG = 4000
# Training rows per configuration and target in a refit of ``rece evaluate`` (its ~600 specialist
# designs on e12 cost ~100 ms of CPU each, a third of it fixed, so halving the rows saves 27%: 103 s
# -> 75 s on 2 CPUs; what it changes on e12's report is in docs/transfer.md, "Evaluation cost").
EVALUATION_ROWS_PER_CONFIG = 2000
# Held-out rows per configuration and target that a model-selection fold scores (a fixed random
# sample above it): the choice compares two models on the same rows, and predicting every row of
# a 10^6-row configuration twice per fold says no more than 20,000 of them do.
SCORED_ROWS_PER_CONFIG = 20_000
# Training rows per configuration in the embedding's pooled P50 fit: a profile of a few dozen
# log latencies between configurations that differ by tens of percent needs less.
PROFILE_ROWS_PER_CONFIG = 1000
# Folds of the sensitivity sweep (``rece evaluate``, ``rece tune``): grouped K-fold over
# configurations, each held out once (fewer configurations than folds: leave one out). Leaving
# one configuration out refits every K of the grid once per configuration, so the sweep would
# grow with the store (e12: 48 RECE fits beyond the LOCO protocol's own, a third of the
# evaluation's CPU); five folds cost 4 x 5 fits at any size and choose the same grid point on
# e12 (docs/transfer.md, "Evaluation cost"). Five: scikit-learn's ``GroupKFold`` default.
SWEEP_FOLDS = 5


@dataclass(frozen=True)
class TrainSettings:
    """Everything that changes the artifact; hashed into the manifest."""

    specialists: int = 4
    quantiles: tuple[float, ...] = (0.1, 0.5, 0.9)
    clustering: str = "kmeans"
    temperature: float = 0.03
    top_k: int | None = None
    borrow: float = 0.1
    calibrate_folds: int = 0
    select_folds: int = 6               # folds of the per-target choice, specialists or pooled (0: off)
    l1: float = 0.0
    noncrossing: bool = True
    max_fit_rows: int = 10_000_000
    rows_per_config: int | None = None  # training rows per configuration and target in a fit (None: all)
    solver: str = "HIGHS"
    date_from: str | None = None
    date_to: str | None = None
    holdout_every: int = 10
    seed: int = 0

    def __post_init__(self) -> None:
        qs = tuple(float(q) for q in self.quantiles)
        if not qs or any(not 0 < q < 1 for q in qs) or list(qs) != sorted(set(qs)):
            raise ReceError(f"quantiles must be increasing values in (0, 1), got {self.quantiles}")
        object.__setattr__(self, "quantiles", qs)
        if self.specialists < 1:
            raise ReceError("--specialists must be at least 1")
        if self.temperature <= 0:
            raise ReceError("--temperature must be positive")
        if self.top_k is not None and self.top_k < 1:
            raise ReceError("--top-k must be at least 1")
        if not 0 <= self.borrow <= 1:
            raise ReceError(f"--borrow must be in [0, 1], got {self.borrow}")
        if self.max_fit_rows < 1:
            raise ReceError(f"--max-fit-rows must be positive, got {self.max_fit_rows}")
        if self.rows_per_config is not None and self.rows_per_config < 1:
            raise ReceError(f"--rows-per-config must be positive, got {self.rows_per_config}")
        if self.select_folds < 0 or self.select_folds == 1:
            raise ReceError(f"--select-folds must be 0 (off) or at least 2, got {self.select_folds}")
        if self.calibrate_folds < 0 or self.calibrate_folds == 1:
            raise ReceError(f"--calibrate-folds must be 0 (off) or at least 2, got {self.calibrate_folds}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["quantiles"] = list(self.quantiles)
        return d
