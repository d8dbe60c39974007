"""The BLIS contract: JSON Schema, golden vectors re-derived by an independent evaluator, exports.

``_reference_quantiles`` is written from docs/artifact.md alone (plain Python loops, no
rece_dist code), the way BLIS's Go implementation would be: if the document and the code
disagree, this test fails.
"""

from __future__ import annotations

import json
import math
from importlib import resources

import jsonschema
import numpy as np
import pytest
import yaml

from rece_dist import artifact
from rece_dist.blis import coefficient_sets, collapsed, golden_vectors, probe_configs
from rece_dist.config import Catalog
from rece_dist.ensemble import RECEModel
from rece_dist.features import feature_matrix, rows_frame


def _reference_quantiles(doc: dict, embedding: list[float], x: list[float], target: str,
                         config_id: str) -> tuple[list[float], list[float]]:
    """docs/artifact.md sections 2-6, from the artifact's JSON and a feature vector."""
    sims = []
    for s in doc["specialists"]:
        m = s["centroid"]
        sims.append(-math.sqrt(sum((a - b) ** 2 for a, b in zip(embedding, m)) / len(m)))
    T, k = doc["mixing"]["temperature"], doc["mixing"]["top_k"]
    chosen = sorted(range(len(sims)), key=lambda i: (-sims[i], i))[: k or len(sims)]
    top = max(sims[i] for i in chosen)
    e = {i: math.exp((sims[i] - top) / T) for i in chosen}
    total = sum(e.values())
    w = [e.get(i, 0.0) / total for i in range(len(sims))]
    qs = []
    for tau in doc["quantiles"]:
        beta = [sum(w[s] * doc["specialists"][s]["coefficients"][target][repr(float(tau))][f] for s in range(len(w)))
                for f in range(len(x))]
        qs.append(sum(a * b for a, b in zip(beta, x)))
    qs = sorted(qs)
    if "unseen_calibration" in doc and config_id not in doc["configurations"]:
        factors = doc["unseen_calibration"]["factors"][target]
        mid = qs[len(qs) // 2]
        qs = sorted(mid + factors[repr(float(tau))] * (q - mid) for tau, q in zip(doc["quantiles"], qs))
    return qs, w


def _embedding(doc: dict, probe_features: list[list[float]]) -> list[float]:
    """docs/artifact.md section 2: the log of the pooled P50 model on each probe batch, floored."""
    emb = doc["embedding"]
    return [math.log(max(sum(a * b for a, b in zip(x, emb["coefficients"])), emb["floor_us"])) for x in probe_features]


def test_artifact_matches_its_json_schema(trained):
    schema = json.loads(resources.files("rece_dist").joinpath("schemas/artifact.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    doc = json.loads(artifact.canonical_bytes(trained.artifact))
    jsonschema.validate(doc, schema)
    broken = json.loads(json.dumps(doc))
    broken["specialists"][0]["coefficients"]["beta"]["0.5x"] = [1.0]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    doc["unseen_calibration"] = {"method": "grouped cross-validation over configurations", "folds": 3,
                                 "factors": {t: {"0.1": 2.0, "0.5": 1.0, "0.9": 3.0} for t in ("alpha", "beta")}}
    jsonschema.validate(doc, schema)
    doc["unseen_calibration"]["factors"]["beta"]["0.9"] = -1.0
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)


@pytest.mark.parametrize("calibrated", [False, True])
def test_golden_vectors_reproduce_from_the_artifact_alone(trained, calibrated):
    doc = json.loads(artifact.canonical_bytes(trained.artifact))  # exactly what is published
    if calibrated:  # as `rece train --calibrate-folds` would add (values made up: unequal, to catch a swap)
        doc["unseen_calibration"] = {"method": "grouped cross-validation over configurations", "folds": 2,
                                     "factors": {t: {"0.1": 1.7, "0.5": 1.0, "0.9": 2.4} for t in ("alpha", "beta")}}
    golden = json.loads(json.dumps(golden_vectors(doc, probe_configs())))
    assert golden["artifact_sha256"] == artifact.digest(doc)
    seen = [c["seen_in_training"] for c in golden["cases"]]
    assert seen.count(True) == len(doc["configurations"]) and seen.count(False) == 3
    catalog = Catalog.default()
    for case in golden["cases"]:
        cfg = catalog.resolve(case["configuration"], case["config_id"])
        probes = rows_frame("beta", doc["embedding"]["probes"], "test")
        np.testing.assert_allclose(case["embedding_features"], feature_matrix(probes, cfg, "beta"), rtol=1e-12)
        emb = _embedding(doc, case["embedding_features"])
        np.testing.assert_allclose(emb, case["embedding"], rtol=1e-12, atol=1e-12)
        for target in ("alpha", "beta"):
            for row in case[target]:
                ref, w = _reference_quantiles(doc, case["embedding"], row["features"], target, case["config_id"])
                np.testing.assert_allclose(w, case["weights"], rtol=1e-12, atol=1e-15)
                got = [row["quantiles"][repr(float(q))] for q in doc["quantiles"]]
                np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-9)


def test_collapsed_coefficients_equal_the_ensemble(trained, truth_store):
    _, cfgs = truth_store
    model = RECEModel(trained.artifact)
    rng = np.random.default_rng(1)
    X = rng.uniform(0, 2, size=(50, model.coef["beta"].shape[2]))
    for cfg in cfgs:
        coll = collapsed(model, cfg)
        raw = np.column_stack([X @ np.array(coll["beta"][repr(q)]) for q in model.quantiles])
        pred = model.predict_matrix("beta", X, model.weights(cfg))
        np.testing.assert_allclose(np.sort(raw, axis=1), pred.values, rtol=1e-12)


def test_coefficient_set_export_follows_the_registry_rules(trained, truth_store):
    _, cfgs = truth_store
    sets = coefficient_sets(trained.artifact, "v-test")
    assert set(sets) == {c.config_id for c in cfgs}
    allowed = {"value", "units", "method", "fitted", "scope", "sources", "rationale", "ci95"}
    for cid, text in sets.items():
        doc = yaml.safe_load(text)
        assert doc["kind"] == "CoefficientSet" and set(doc) == {"kind", "name", "coefficients"}
        names = set()
        cfg = next(c for c in cfgs if c.config_id == cid)
        for item in doc["coefficients"]:
            (name, entry), = item.items()
            names.add(name)
            assert set(entry) <= allowed and {"value", "units", "method", "fitted", "scope"} <= set(entry)
            assert entry["scope"] == {"hardware": [cfg.gpu.name], "model": [cfg.model.name], "tp": [cfg.serving.tp]}
            assert entry["value"] != 0 or entry["method"] == "not_charged"
            assert entry["method"] == "measured" or entry.get("rationale")
        assert len(names) == len(doc["coefficients"])  # no duplicate (name, scope)
