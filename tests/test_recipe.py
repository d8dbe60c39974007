"""The recipe's validation refits: the per-target choice between specialists and one pooled model."""

from __future__ import annotations

import math

import pytest

from ground_truth import write_store
from rece_dist.pipeline import TrainSettings, featurize_store
from rece_dist.recipe import SELECT_MARGIN, fit_recipe, pooled_targets


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
