"""The public API: the README's notebook example runs as written, and its numbers are right."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest

import rece_dist
from ground_truth import true_quantile, write_store
from rece_dist.features import rows_frame
from rece_dist.features import feature_matrix

README = Path(__file__).resolve().parents[1] / "README.md"


def notebook_example() -> str:
    """The first python block under the README's '## In a notebook' heading."""
    text = README.read_text()
    section = text[text.index("## In a notebook"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_notebook_example_runs_and_predicts_the_known_quantiles(tmp_path, monkeypatch, ray_local):
    monkeypatch.chdir(tmp_path)
    cfg = write_store("demo-store", n_configs=4, rows=1000)[0]
    Path("cfg.json").write_text(json.dumps(cfg.to_dict()))
    code = notebook_example()
    assert code.startswith("from rece_dist import RECEModel, load_artifact, train\n") and len(code.splitlines()) == 6
    ns: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), ns)
    model, rows = ns["model"], ns["rows"]
    assert (tmp_path / "demo-artifacts" / "artifacts" / model.version / "artifact.json").is_file()
    # against the store's own law: q_tau = (x . coef)(1 - s ln(1 - tau)), the same for every configuration
    X = feature_matrix(rows_frame("beta", rows, "test"), cfg, "beta")
    truth = np.column_stack([true_quantile(X, "beta", q) for q in model.quantiles])
    pred = model.predict("cfg.json", rows)
    assert pred.shape == (1, 3) and model.quantiles == (0.1, 0.5, 0.9)
    np.testing.assert_allclose(pred, truth, rtol=0.05)
    printed = out.getvalue().splitlines()[-1]  # what the example printed: the quantiles, then the values
    assert printed.startswith("(0.1, 0.5, 0.9) [[") and str(int(pred[0, 1])) in printed


def test_the_package_exports_exactly_the_api():
    assert sorted(rece_dist.__all__) == sorted(rece_dist.api.__all__)
    for name in rece_dist.__all__:
        assert getattr(rece_dist, name) is getattr(rece_dist.api, name)
    with pytest.raises(AttributeError, match="no attribute 'fit'"):
        rece_dist.fit  # noqa: B018


def test_unknown_training_setting_names_the_fields(tmp_path):
    with pytest.raises(TypeError, match="TrainSettings fields are: specialists, quantiles"):
        rece_dist.train(str(tmp_path), specialist=4)
