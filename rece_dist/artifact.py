"""The RECE artifact: one JSON document, data only, that BLIS and ``rece predict`` evaluate.

Top-level keys (``docs/artifact.md`` gives the evaluation rule as formulas):

- ``schema_version``: ``"rece-artifact/2"``; readers refuse other versions (1 mixed by a
  configuration vector's cosine, 2 by the latency profile below).
- ``quantiles``: e.g. ``[0.1, 0.5, 0.9]``.
- ``targets.{alpha,beta}``: definition, units, and the ordered feature list
  (name, formula, units, solver scale). Coefficients are in natural units: the solver saw
  ``x / scale`` and its coefficients were divided by ``scale`` afterwards.
- ``embedding``: the latency profile: probe batches (beta input rows) and the pooled P50 beta
  coefficients whose log predictions on them embed a configuration.
- ``mixing``: rule, temperature, top-k, non-crossing policy.
- ``specialists``: centroid, member configurations, per-target row counts, and
  ``coefficients[target][repr(tau)]`` as a list aligned with the target's features.
- ``configurations``: every training configuration's resolved document and specialist, so a
  consumer can compute features and embeddings without the store.
- ``training``: rows, date window, settings, library and solver versions, git commit.
- ``metrics``: held-out metrics computed at training time.

Nothing time-dependent is inside, so the same data and settings give the same bytes.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from typing import Any, Mapping

from .errors import ArtifactError

SCHEMA_VERSION = "rece-artifact/2"


def canonical_json(doc: Any, what: str = "document") -> bytes:
    """The one serialisation that is hashed and published: sorted keys, no whitespace, and no
    NaN/Infinity (they are not JSON, and Go's decoder rejects them)."""
    try:
        return json.dumps(doc, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the {what} is not plain JSON data ({exc}); refusing to write it") from None


def canonical_bytes(doc: Mapping[str, Any]) -> bytes:
    return canonical_json(doc, "artifact document")


def digest(doc: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_bytes(doc)).hexdigest()


_VERSIONED_PACKAGES = ("rece-dist", "ray", "polars", "pyarrow", "numpy", "scipy", "scikit-learn", "cvxpy", "highspy",
                       "clarabel")


def library_versions() -> dict[str, str]:
    """Python and the installed versions of the libraries and solvers a fit depends on."""
    return dict(_library_versions())


@functools.cache  # every fit document records them; reading package metadata took ~10 ms a call
def _library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def git_commit() -> str:
    """The code's commit: ``RECE_GIT_COMMIT`` (set by CI or the job image) or ``git rev-parse``."""
    return os.environ.get("RECE_GIT_COMMIT") or _git_head()


@functools.cache  # a subprocess per fit document cost ~3 ms each; the checkout does not move under a run
def _git_head() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def parse(data: bytes, where: str) -> dict[str, Any]:
    """Parse and sanity-check artifact bytes; a truncated or foreign document is refused."""
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{where}: not a complete JSON document ({exc})") from None
    if not isinstance(doc, dict):
        raise ArtifactError(f"{where}: an artifact must be a JSON object")
    version = doc.get("schema_version")
    if not isinstance(version, str) or version.split(".")[0] != SCHEMA_VERSION:
        raise ArtifactError(f"{where}: schema_version {version!r} is not {SCHEMA_VERSION}")
    for key in ("quantiles", "targets", "embedding", "mixing", "specialists", "configurations"):
        if key not in doc:
            raise ArtifactError(f"{where}: artifact is missing {key!r}")
    return doc


def load(path: str) -> dict[str, Any]:
    """Read an artifact from a local file (published versions: see ``publish.resolve``)."""
    try:
        with open(path, "rb") as f:
            return parse(f.read(), path)
    except FileNotFoundError:
        raise ArtifactError(f"{path}: artifact not found") from None


def summary_table(doc: Mapping[str, Any]) -> str:
    """Per specialist: configurations, training rows, held-out pinball loss and P10-P90 coverage."""
    qs = doc["quantiles"]
    held = doc.get("metrics", {}).get("held_out", {})
    head = ["specialist", "configs", "target", "train rows", "held-out"] + [f"pinball P{q * 100:g}" for q in qs] + [
        f"cov P{qs[0] * 100:g}-P{qs[-1] * 100:g}", "mape P50"]
    lines = [head]
    groups = [(f"specialist_{s['id']}", str(s["id"]), len(s["members"]), s["rows"]) for s in doc["specialists"]]
    groups.append(("all", "all", len(doc["configurations"]), doc["training"]["rows"]))
    for key, label, n_cfg, rows in groups:
        for target in ("alpha", "beta"):
            m = held.get(target, {}).get(key, {})
            lines.append([label, str(n_cfg), target, f"{rows[target]:,}", f"{int(m.get('rows', 0)):,}"]
                         + [_num(m.get(f"pinball_{q:g}")) for q in qs]
                         + [_pct(m.get("interval_coverage")), _pct(m.get("mape_p50"))])
    widths = [max(len(r[i]) for r in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in lines)


def _num(v: Any) -> str:
    return "-" if v is None else f"{v:.4g}"


def _pct(v: Any) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"
