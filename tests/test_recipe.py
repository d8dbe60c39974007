"""The recipe's validation refits: the per-target choice between specialists and one pooled model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import ray

from ground_truth import write_store
from rece_dist.pipeline import TrainSettings, featurize_store, fit_ensemble, score_shard
from rece_dist.recipe import SELECT_MARGIN, _sampled_predictions, fit_recipe, pooled_targets


def test_specialists_are_kept_only_when_they_beat_the_pooled_model_by_the_margin_on_most_configurations():
    crit = {"pooled": {"alpha": 0.100, "beta": 0.0100},
            "specialists": {"alpha": 0.100 * (1 - SELECT_MARGIN / 2), "beta": 0.0100 * (1 - 2 * SELECT_MARGIN)}}
    most = {"alpha": 0.9, "beta": 0.9}
    assert pooled_targets(crit, most) == ["alpha"]  # alpha's gain is inside the margin, beta's is not
    assert pooled_targets(crit, most, margin=0.0) == []
    assert pooled_targets(crit, {"alpha": 0.9, "beta": 0.5}) == ["alpha", "beta"]  # beta's gain rests on half of them
    crit["specialists"]["beta"] = math.nan  # nothing measured: the simpler model
    assert pooled_targets(crit, most) == ["alpha", "beta"]


def test_a_store_with_one_law_everywhere_pools_both_targets(tmp_path, ray_local):
    """tests/ground_truth.py draws every configuration from the same coefficients, so specialists
    can only add variance: the selection must pool both targets, which leaves one specialist, and
    no fold may have trained on a configuration it scores."""
    root = str(tmp_path / "store")
    write_store(root, n_configs=6, rows=600)
    settings = TrainSettings(specialists=2, holdout_every=2, noncrossing=False, select_folds=3)
    fs = featurize_store(root, settings)
    doc = fit_recipe(fs, settings)
    sel = doc["training"]["selection"]
    assert sel["folds"] == 3 and sel["pooled"] == ["alpha", "beta"], sel["criterion"]
    assert len(doc["specialists"]) == 1
    assert {t: doc["targets"][t]["model"] for t in ("alpha", "beta")} == {"alpha": "pooled", "beta": "pooled"}
    held = [set(g["held_out"]) for g in sel["groups"]]
    assert set().union(*held) == set(fs.config_ids) and sum(map(len, held)) == len(fs.config_ids)
    for g in sel["groups"]:
        assert not set(g["trained_on"]) & set(g["held_out"])
    for kind in ("specialists", "pooled"):
        for t in ("alpha", "beta"):
            assert 0 < sel["criterion"][kind][t] < 0.5
    assert sel["criterion"]["pooled"]["beta"] == pytest.approx(sel["criterion"]["specialists"]["beta"], rel=0.2)


def test_validation_scores_a_fixed_sample_of_rows_the_same_for_every_model(tmp_path, ray_local):
    """Selection and calibration score a share of a held-out configuration's rows: the same rows
    whichever model scores them, each predicted as a full-shard prediction predicts it."""
    root = str(tmp_path / "store")
    write_store(root, n_configs=4, rows=2000)
    settings = TrainSettings(specialists=2, noncrossing=False, select_folds=0, calibrate_folds=0)
    fs = featurize_store(root, settings)
    docs = [fit_ensemble(fs, settings), fit_ensemble(fs, settings, labels={c: 0 for c in fs.config_ids})]
    shard = ray.get(fs.shard_refs[0])
    cfg = fs.configs[fs.stats[0].config_id]
    share = {"alpha": 0.3, "beta": 1.0}
    got = [_sampled_predictions(doc, shard, cfg, 0, share) for doc in docs]
    for t in ("alpha", "beta"):
        n = len(shard.y[t])
        kept = len(got[0][t][0])
        if share[t] == 1.0:
            assert kept == n
        else:  # binomial(n, 0.3) within 5 standard deviations
            assert abs(kept - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7), (kept, n)
        np.testing.assert_array_equal(got[0][t][0], got[1][t][0])  # the same rows for both models
        for doc, sample in zip(docs, got):
            y_all, v_all, _ = score_shard(doc, shard, cfg, True, None, None)[t]
            # the sampled rows, in order, are rows of the full prediction (a subsequence of it)
            at = 0
            for y, v in zip(*sample[t]):
                while at < n and not (y_all[at] == y and np.array_equal(v_all[at], v)):
                    at += 1
                assert at < n, f"{t}: a sampled row is not a row of the full prediction"
                at += 1
    other_seed = _sampled_predictions(docs[0], shard, cfg, 1, share)["alpha"][0]
    assert not np.array_equal(other_seed, got[0]["alpha"][0])  # the sample is fixed by the seed, not always the same
