"""The nightly schedule in infra/: the manifests parse, and the CronJob's own script, run with a
stand-in ``kubectl`` on PATH, creates a RayJob whose entrypoint ``rece train`` accepts, over the
last 7 full days, with the feature cache under the artifact root."""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import yaml

from rece_dist.cli import build_parser

INFRA = Path(__file__).resolve().parents[1] / "infra"

KUBECTL = """#!/bin/sh
# Stand-in for kubectl: records its arguments; `create -f -` keeps what it was given.
echo "$*" >> "$LOG"
case "$1" in
  get) exit 1 ;;             # no RayJob of tonight yet
  create) cat > "$CREATED" ;;
esac
"""


def load(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((INFRA / name).read_text()) if d]


def test_manifests_parse_and_wire_together():
    (cron,) = load("nightly-cronjob.yaml")
    sa, role, binding = load("nightly-rbac.yaml")
    kust = yaml.safe_load((INFRA / "kustomization.yaml").read_text())
    assert cron["kind"] == "CronJob" and cron["apiVersion"] == "batch/v1"
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == binding["subjects"][0]["name"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    assert set(kust["resources"]) == {"nightly-cronjob.yaml", "nightly-rbac.yaml"}
    (gen,) = kust["configMapGenerator"]
    assert gen["files"] == ["rayjob.yaml"] and pod["volumes"][0]["configMap"]["name"] == gen["name"]
    assert "[cluster]" in (INFRA / "Dockerfile").read_text()


def test_cronjob_script_creates_a_rayjob_over_the_last_seven_days(tmp_path):
    (cron,) = load("nightly-cronjob.yaml")
    (container,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    mount = container["volumeMounts"][0]["mountPath"]
    script = container["command"][-1].replace(mount, str(INFRA))  # the ConfigMap holds infra/rayjob.yaml
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "kubectl").write_text(KUBECTL)
    (bindir / "kubectl").chmod(stat.S_IRWXU)
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}", "LOG": str(tmp_path / "log"),
           "CREATED": str(tmp_path / "rayjob.yaml"), **{e["name"]: e["value"] for e in container["env"]}}
    before = datetime.now(timezone.utc).date()
    subprocess.run([*container["command"][:-1], script], env=env, check=True, capture_output=True)
    days = {f"rece-dist-nightly-{d}": d for d in (before, datetime.now(timezone.utc).date())}  # midnight
    job = yaml.safe_load((tmp_path / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["metadata"]["name"] in days
    today = days[job["metadata"]["name"]]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", "jobs/train.py"]
    args = build_parser().parse_args(["train", *argv[2:]])  # what jobs/train.py hands to `rece train`
    assert args.feature_cache is True and args.out.startswith("s3://")
    first, last = date.fromisoformat(args.date_from), date.fromisoformat(args.date_to)
    assert last == today - timedelta(days=1) and (last - first).days + 1 == 7
    log = (tmp_path / "log").read_text().splitlines()
    assert f"delete rayjob rece-dist-nightly-{today - timedelta(days=14)} --ignore-not-found" in log
    assert log[-1] == "create -f -"
