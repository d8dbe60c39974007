"""Shared specialist fits: a cached fit is the fit itself, solved once, and a failure reaches every waiter."""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from ground_truth import write_store
from rece_dist import artifact
from rece_dist.fitcache import FitBatch, FitCache
from rece_dist.pipeline import TrainSettings, featurize_store, fit_ensemble
from rece_dist.refit import Fitter, FitRequest, fit_labels

SETTINGS = TrainSettings(specialists=2, holdout_every=2, borrow=0.1)


def test_folds_share_unchanged_specialists_and_get_the_same_documents(tmp_path, ray_local):
    store = str(tmp_path / "store")
    write_store(store, n_configs=4, rows=600)
    fs = featurize_store(store, SETTINGS)
    ids = fs.config_ids
    folds = [tuple(fs.shards_of(set(ids) - {out})) for out in ids[:2]]
    fitter = Fitter(fs, SETTINGS, parallel=2)
    docs = fitter.fit_many([FitRequest(train, "per_config") for train in folds])
    # 3 configurations per fold, 2 in common: per target 4 distinct per-configuration specialists,
    # and each fold's embedding profile (a pooled P50 fit of its training shards)
    assert (fitter.cache.solved, fitter.cache.hits) == (2 * 4 + 2, 2 * 2)
    baseline = dataclasses.replace(SETTINGS, borrow=0.0, select_folds=0)  # what the Fitter fits baselines with
    for train, doc in zip(folds, docs):
        cold = fit_ensemble(fs, baseline, list(train), fit_labels("per_config", {fs.stats[i].config_id for i in train}))
        assert artifact.digest(doc) == artifact.digest(cold)
    # the global baseline and a one-specialist RECE fit of the same shards are one fit (and the
    # fold's profile is reused by both)
    g, r1 = fitter.fit_many([FitRequest(folds[0], "global"), FitRequest(folds[0], "rece", 1)])
    assert fitter.cache.hits == 2 * 2 + 2 + 2
    assert g["specialists"][0]["coefficients"] == r1["specialists"][0]["coefficients"]
    # a RECE fit that borrows from every other configuration shares no specialist with another
    # fold: only the two folds' profiles are reused
    hits = fitter.cache.hits
    fitter.fit_many([FitRequest(train, "rece", 2) for train in folds])
    assert fitter.cache.hits == hits + 2


def test_deferred_fits_run_behind_the_next_batch_and_are_not_fitted_again(tmp_path, ray_local, capsys):
    store = str(tmp_path / "store")
    write_store(store, n_configs=4, rows=600)
    fs = featurize_store(store, SETTINGS)
    ids = fs.config_ids
    later, now = FitRequest(tuple(fs.shards_of(ids[:3])), "global"), FitRequest(tuple(fs.shards_of(ids[1:])), "global")
    with Fitter(fs, SETTINGS, parallel=1) as fitter:
        fitter.defer([later])
        assert fitter.docs == {}  # nothing starts before a batch is asked for
        (doc_now,) = fitter.fit_many([now], "now")
        deadline = time.monotonic() + 120
        while fitter._key(later) not in fitter.docs:  # runs without being waited for
            assert time.monotonic() < deadline, "the deferred fit never ran"
            time.sleep(0.05)
        capsys.readouterr()
        (doc_later,) = fitter.fit_many([later], "later")
        assert "later" not in capsys.readouterr().err  # nothing left to fit or wait for
    assert set(doc_later["configurations"]) == set(ids[:3]) and set(doc_now["configurations"]) == set(ids[1:])
    with Fitter(fs, SETTINGS, parallel=1) as fitter:  # closed: deferred fits nobody asked for never run
        fitter.defer([later])
    assert fitter.docs == {} and fitter.fit_many([now]) and list(fitter.docs) == [fitter._key(now)]


def test_an_owners_failure_reaches_the_waiter_and_the_key_is_solved_again():
    cache = FitCache()
    owner, waiter = FitBatch(cache), FitBatch(cache)
    assert owner.claim("s", "k") and not waiter.claim("s", "k")
    got: dict = {}

    def wait() -> None:
        try:
            waiter.complete({}, {})
        except RuntimeError as exc:
            got["error"] = exc

    th = threading.Thread(target=wait)
    th.start()
    with pytest.raises(RuntimeError, match="solver died"):
        with owner:
            raise RuntimeError("solver died")
    th.join(5)
    assert str(got["error"]) == "solver died"
    again = FitBatch(cache)
    assert again.claim("s", "k")  # forgotten: the next call solves it
