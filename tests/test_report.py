"""``rece evaluate`` end to end: the HTML page shows the Evaluation's numbers and every plot exists."""

from __future__ import annotations

import copy
import html
import re
from pathlib import Path

import pytest

from ground_truth import write_store
from rece_dist import report
from rece_dist.cli import main
from rece_dist.evaluate import baseline_rows
from rece_dist.recipe import train
from rece_dist.settings import TrainSettings
from rece_dist.publish import ManifestMeta, publish

SETTINGS = TrainSettings(specialists=2, holdout_every=2, noncrossing=False)
PNG = b"\x89PNG\r\n\x1a\n"


def test_tables_escape_html():
    out = report._table([["a<b", "c"], ["<script>", "1 & 2"]], "x > y")
    assert "<script>" not in out and "&lt;script&gt;" in out and "1 &amp; 2" in out and "x &gt; y" in out


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    """Two published versions (a good one, then a worse one as latest) and one ``rece evaluate``."""
    tmp = tmp_path_factory.mktemp("report")
    store = str(tmp / "store")
    write_store(store, n_configs=3, rows=1000, dates=("2026-11-01", "2026-11-02", "2026-11-03"))
    good = train(store, SETTINGS).artifact
    worse = copy.deepcopy(good)
    for s in worse["specialists"]:
        s["coefficients"]["beta"] = {q: [1.3 * v for v in c] for q, c in s["coefficients"]["beta"].items()}
    root = str(tmp / "artifacts")
    meta = ManifestMeta(git_commit="test", settings=SETTINGS.to_dict(), data=[])
    publish(root, good, meta)
    publish(root, worse, meta)
    captured = {}
    write = report.write_report

    def keep(rv, out_dir):
        captured["rv"] = rv
        return write(rv, out_dir)

    mp = pytest.MonkeyPatch()
    mp.setattr(report, "write_report", keep)
    out_dir = tmp / "report"
    try:
        rc = main(["evaluate", "--artifact", root, "--store", store, "--report", str(out_dir), "--protocol", "temporal",
                   "--k-grid", "1", "--temperatures", "0.1", "--top-k-grid", "dense", "--no-donor-experiment"])
    finally:
        mp.undo()
    return rc, captured["rv"], out_dir


def test_evaluate_writes_a_page_with_every_plot(run):
    rc, _, out = run
    assert rc == 0
    page = (out / "index.html").read_text()
    images = re.findall(r'<img src="([^"]+)"', page)
    expected = {"calibration_temporal.png", "errors_by_config.png", "errors_by_gpu.png", "errors_by_model.png",
                "intervals_beta.png", "intervals_alpha.png", "embedding_pca.png", "embedding_validation.png",
                "sensitivity.png"}
    assert set(images) == expected
    for name in images:
        data = (out / name).read_bytes()
        assert data[:8] == PNG and len(data) > 5000, name


def test_the_page_shows_the_evaluations_numbers(run):
    _, rv, out = run
    ev = rv.evaluation
    page = (out / "index.html").read_text()
    for target in ("alpha", "beta"):
        for row in baseline_rows(ev.scores, ev.methods, "temporal", target)[1:]:
            assert "".join(f"<td>{html.escape(c)}</td>" for c in row) in page, row
    # temporal: every configuration has older data, so the donor is not defined anywhere
    assert "n/a: nearest configuration as donor, seen and unseen" in page
    assert "sensitivity to temperature, k and top-k" in page.lower()
    # the numbers depend on the refits' row cap: the page says which (the CLI's default here)
    assert "each on at most 2,000 training rows per configuration and target" in page


def test_the_worse_latest_version_shows_up_as_drift(run):
    _, rv, out = run
    assert rv.drift is not None and not rv.drift.ok and "beta pinball" in rv.drift.reason
    page = (out / "index.html").read_text()
    assert html.escape(rv.drift.reason) in page
    assert Path(out / "index.html").stat().st_size > 5000
