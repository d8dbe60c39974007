"""Specialist fits shared between ``pipeline.fit_ensemble`` calls on one FeatureSet.

Why: validation re-fits the recipe on many subsets of one store, and most folds leave most
specialists' rows unchanged. A specialist's fits are a function of its training rows (which
shards, at which row weight and sampled share), their scale and kept columns, and the fit
settings; every per-configuration model outside temporal folds, the global baseline and a
one-specialist RECE fit of the same shards are such repeats. Each distinct one is solved once.

A fit call claims the keys of its specialists in a ``FitBatch``: it solves the keys it owns and
waits for the ones another thread is solving (owners publish before they wait, so no two calls
wait on each other). The cached values are the exact fits, so results do not depend on
whether a fit was cached.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable, Sequence

import numpy as np

# TrainSettings fields a specialist's fits depend on besides its rows (borrow and rows_per_config
# act through the parts' weights and sampled shares)
FIT_SETTINGS = ("quantiles", "l1", "noncrossing", "max_fit_rows", "solver", "seed")


def fit_key(target: str, parts: Sequence[tuple[int, float, float]], scale: np.ndarray, columns: np.ndarray,
            settings: dict[str, Any]) -> str:
    """Digest of what determines one specialist's fits: (shard, row weight, share) per part, the
    column scale and kept columns, and the settings in ``FIT_SETTINGS``."""
    text = json.dumps([target, [[int(i), repr(float(w)), repr(float(s))] for i, w, s in parts],
                       np.asarray(scale).tolist(), np.asarray(columns).tolist(),
                       {k: settings[k] for k in FIT_SETTINGS}])
    return hashlib.sha256(text.encode()).hexdigest()


class FitCache:
    """Futures of specialist fits by ``fit_key``, and the training-row samples they read
    (``RowSamples``); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: dict[str, Future] = {}
        self.samples = RowSamples()
        self.hits = 0
        self.solved = 0

    def claim(self, key: str) -> tuple[bool, Future]:
        """(True, future to fulfil) for the first caller of a key, else (False, future to wait on)."""
        with self._lock:
            fut = self._futures.get(key)
            if fut is None:
                fut = self._futures[key] = Future()
                self.solved += 1
                return True, fut
            self.hits += 1
            return False, fut

    def forget(self, fut: Future) -> None:
        """Drop a failed key, so that a later call solves it again."""
        with self._lock:
            for k, f in list(self._futures.items()):
                if f is fut:
                    del self._futures[k]


class FitBatch:
    """One ``fit_ensemble`` call's claims; with no cache every key is the call's own."""

    def __init__(self, cache: FitCache | None):
        self.cache = cache
        self.owned: dict[Hashable, Future] = {}
        self.waiting: dict[Hashable, Future] = {}

    def claim(self, name: Hashable, key: str) -> bool:
        """True when this call must solve ``name`` (its specialist), False when it will be handed over."""
        if self.cache is None:
            return True
        owner, fut = self.cache.claim(key)
        (self.owned if owner else self.waiting)[name] = fut
        return owner

    def __enter__(self) -> "FitBatch":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None and self.cache is not None:  # wake the waiters with this call's error
            for fut in self.owned.values():
                self.cache.forget(fut)
                if not fut.done():
                    fut.set_exception(exc)

    def complete(self, fits: dict[Hashable, Any], crossing: dict[Hashable, Any]) -> None:
        """Publish the owned specialists' fits, then fill in the handed-over ones (may wait)."""
        for name, fut in self.owned.items():
            fut.set_result((fits[name], crossing.get(name)))
        for name, fut in self.waiting.items():
            fits[name], report = fut.result()
            if report is not None:
                crossing[name] = report


class RowSamples:
    """Object refs of training-row samples by (shard, target, share, seed); thread-safe.

    Why: the designs of one evaluation take the same few shares of each shard (a member's
    capped rows, a borrowed configuration's tenth) again and again, across specialists,
    quantiles and folds; a task per (design, shard) was ~13,500 one-millisecond tasks on e12,
    whose scheduling cost more than their work. A ``FitCache`` (one evaluation, one ``train``)
    holds capped fits' samples for its lifetime; ``fit_ensemble`` keeps uncapped ones per call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._refs: dict[Hashable, Any] = {}

    def __len__(self) -> int:
        return len(self._refs)

    def get(self, key: Hashable, make: Callable[[], Any]) -> Any:
        """The ref under ``key``, submitting ``make()`` the first time it is asked for."""
        with self._lock:
            ref = self._refs.get(key)
            if ref is None:
                ref = self._refs[key] = make()
            return ref
