"""Version comparison: matching, coefficient deltas and the promotion gate."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from ground_truth import write_store
from rece_dist.drift import (RegressionError, coefficient_changes, compare, gate, match_specialists,
                             moved_configurations, verdict)
from rece_dist.metrics import pinball
from rece_dist.pipeline import TrainSettings, featurize_store, fit_ensemble, predict_shards
from rece_dist.publish import ManifestMeta, publish


def _doc(groups: list[list[str]], coef_scale: float = 1.0) -> dict:
    """A minimal artifact: specialists with members and two-feature coefficients per target."""
    specs = [{"id": j, "members": m, "coefficients": {t: {"0.5": [coef_scale * (j + 1), 2.0]} for t in ("alpha", "beta")}}
             for j, m in enumerate(groups)]
    return {"quantiles": [0.5], "specialists": specs,
            "targets": {t: {"features": [{"name": "bias"}, {"name": "x"}]} for t in ("alpha", "beta")},
            "configurations": {c: {"label": c.upper(), "specialist": j} for j, m in enumerate(groups) for c in m}}


def test_specialists_match_by_member_overlap():
    new, old = _doc([["a", "b"], ["c"]]), _doc([["c"], ["a"], ["d"]])
    assert match_specialists(new, old) == {0: 1, 1: 0}  # {a,b}~{a}: 1/2 ; {c}~{c}: 1
    assert match_specialists(_doc([["x"]]), old) == {0: None}  # nothing in common: a new specialist


def test_moved_configurations_follow_the_matching():
    new, old = _doc([["a", "b"], ["c"]]), _doc([["c"], ["a"], ["b", "d"]])
    # new 0 -> old 1 ({a}); b was in old 2, so b moved; a and c stayed with their match
    assert moved_configurations(new, old, match_specialists(new, old)) == [
        {"config_id": "b", "label": "B", "old_specialist": 2, "new_specialist": 0}]


def test_coefficient_changes_by_hand():
    new, old = _doc([["a"], ["b"]], coef_scale=1.5), _doc([["b"], ["a"]])
    rows = coefficient_changes(new, old, match_specialists(new, old))
    # new 0 {a} (bias 1.5) vs old 1 {a} (bias 2): diff (-0.5, 0), |old| = sqrt(8)
    r = rows.filter((rows["new_specialist"] == 0) & (rows["target"] == "beta")).row(0, named=True)
    assert r["old_specialist"] == 1 and r["relative_change"] == pytest.approx(0.5 / np.sqrt(8))
    assert r["largest_change"] == "bias" and (r["old_value"], r["new_value"]) == (2.0, 1.5)
    assert rows.height == 4  # 2 specialists x 2 targets x 1 quantile


def test_verdict_by_hand():
    old = {t: {"pinball_0.1": 1.0, "pinball_0.9": 3.0} for t in ("alpha", "beta")}
    new = {"alpha": {"pinball_0.1": 1.0, "pinball_0.9": 3.08}, "beta": {"pinball_0.1": 0.5, "pinball_0.9": 2.5}}
    ok, reason, reg = verdict(old, new, [0.1, 0.9], max_regression=0.05)
    assert ok and reg["alpha"] == pytest.approx(0.02) and reg["beta"] == pytest.approx(-0.25)
    ok, reason, _ = verdict(old, new, [0.1, 0.9], max_regression=0.01)
    assert not ok and reason.startswith("refused: alpha pinball +2.0% exceeds max regression 1.0%")


# --- on a store -------------------------------------------------------------------------------

SETTINGS = TrainSettings(specialists=2, holdout_every=2, noncrossing=False)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory, ray_local):
    root = str(tmp_path_factory.mktemp("drift") / "store")
    write_store(root, n_configs=3, rows=1000, dates=("2026-11-01", "2026-11-02"))
    fs = featurize_store(root, SETTINGS)
    return fs, fit_ensemble(fs, SETTINGS)


def _worse(doc: dict, factor: float) -> dict:
    bad = copy.deepcopy(doc)
    for s in bad["specialists"]:
        s["coefficients"]["beta"] = {q: [factor * v for v in c] for q, c in s["coefficients"]["beta"].items()}
    return bad


def test_a_version_compared_with_itself_has_no_drift(fitted):
    fs, doc = fitted
    rep = compare(doc, doc, fs)
    assert rep.ok and rep.regression == {"alpha": 0.0, "beta": 0.0}
    assert (rep.metrics["delta"].abs() == 0).all() and not rep.moved
    assert (rep.coefficients["relative_change"] == 0).all()
    assert rep.matching == {s["id"]: s["id"] for s in doc["specialists"]}


def test_a_worse_version_is_refused_on_the_same_held_out_rows(fitted):
    fs, doc = fitted
    bad = _worse(doc, 1.3)
    rep = compare(bad, doc, fs, max_regression=0.05)
    assert not rep.ok and "beta pinball" in rep.reason and "alpha" not in rep.reason
    assert rep.regression["alpha"] == pytest.approx(0.0)
    # the regression is measured on the held-out slice of every shard, with each version's own mixing
    shards = list(range(len(fs.stats)))
    losses = []
    for d in (bad, doc):
        res = predict_shards(d, fs, shards, "holdout", d["mixing"]["top_k"], d["mixing"]["temperature"])
        y = np.concatenate([r["beta"][0] for r in res])
        v = np.vstack([r["beta"][1] for r in res])
        losses.append(np.mean([pinball(y, v[:, j], q) for j, q in enumerate(doc["quantiles"])]))
    assert rep.regression["beta"] == pytest.approx(losses[0] / losses[1] - 1)
    assert (rep.coefficients.filter(rep.coefficients["target"] == "beta")["relative_change"].to_numpy()
            == pytest.approx(0.3))
    with pytest.raises(RegressionError, match="refused"):
        rep.raise_if_worse()


def test_gate_refuses_a_latest_with_another_feature_set_and_says_how_to_publish(fitted, tmp_path):
    """After an upgrade that changes the features the old version cannot be scored on the same
    rows: one line naming the difference and --force, not a failure inside a scoring task."""
    fs, doc = fitted
    root = str(tmp_path / "artifacts")
    old = copy.deepcopy(doc)
    dropped = old["targets"]["beta"]["features"].pop()["name"]
    for sp in old["specialists"]:
        for coefs in sp["coefficients"]["beta"].values():
            coefs.pop()
    publish(root, old, ManifestMeta(git_commit="test", settings=SETTINGS.to_dict(), data=[]))
    with pytest.raises(RegressionError) as err:
        gate(doc, fs, root, 0.05)
    msg = str(err.value)
    assert f"+{dropped}" in msg and "--force" in msg and "\n" not in msg
    n = len(doc["targets"]["beta"]["features"])
    assert f"({n - 1} features, this rece-dist computes {n}" in msg


def test_gate_compares_with_the_published_latest(fitted, tmp_path):
    fs, doc = fitted
    root = str(tmp_path / "artifacts")
    assert gate(doc, fs, root, 0.05) is None  # nothing published: nothing to compare with
    publish(root, doc, ManifestMeta(git_commit="test", settings=SETTINGS.to_dict(), data=[]))
    assert gate(doc, fs, root, 0.05).ok
    rep = gate(_worse(doc, 1.3), fs, root, 0.05)
    assert not rep.ok
