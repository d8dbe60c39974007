"""rece-dist: distributed training of RECE latency models for BLIS.

The public API (``rece_dist.api``), small like scikit-learn's::

    from rece_dist import train, load_artifact, RECEModel
    model = train("STORE", specialists=4)          # a RECEModel; publish_to="ROOT" publishes it
    model.predict("cfg.json", rows)                # rows x quantiles, microseconds

Names load on first use, so ``rece`` commands that need none of them start fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["RECEModel", "TrainSettings", "EvalOptions", "train", "load_artifact", "evaluate_artifact", "tune"]

if TYPE_CHECKING:
    from .api import EvalOptions, RECEModel, TrainSettings, evaluate_artifact, load_artifact, train, tune


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(".api", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
