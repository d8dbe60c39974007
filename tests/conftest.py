"""Shared fixtures: one local Ray runtime for the whole session (2 CPUs, no dashboard)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield ray
    ray.shutdown()


# --- A real S3 API on loopback (moto's server mode) -----------------------------------------
import urllib.request  # noqa: E402
import uuid  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Any, Callable, Iterator  # noqa: E402

_AWS_VARS = ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE")


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket on the loopback server, and a raw boto3 client to arrange and inspect objects."""

    endpoint: str
    name: str
    client: Any

    def uri(self, prefix: str = "") -> str:
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def seed(self, keys: list[str], body: bytes = b"x") -> None:
        """Create many objects fast, straight in the in-process server's state (a PUT costs ~12 ms)."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
        for key in keys:
            backend.put_object(self.name, key, body)

    def objects(self) -> dict[str, bytes]:
        """Every object in the bucket, by key."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        keys = [o["Key"] for page in pages for o in page.get("Contents", ())]
        return {k: self.client.get_object(Bucket=self.name, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="session")
def s3_server() -> Iterator[tuple[str, Any]]:
    """moto's S3 server on 127.0.0.1 (a free port), shared by the session: its endpoint and a raw client."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    session = boto3.session.Session(aws_access_key_id="AKIATESTFIXTURE00000", aws_secret_access_key="fixture-secret-key")
    yield endpoint, session.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    server.stop()


@pytest.fixture
def s3_bucket(s3_server: tuple[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path) -> S3Bucket:
    """The AWS chain pointed at the loopback server with fake keys (nothing from ~/.aws), and a new bucket."""
    endpoint, client = s3_server
    for var in _AWS_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIATESTFIXTURE00000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "fixture-secret-key")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
    # Tests change keys mid-process; Polars would otherwise keep the first credentials it built.
    monkeypatch.setenv("POLARS_CREDENTIAL_PROVIDER_BUILDER_CACHE_SIZE", "0")
    name = f"rece-{uuid.uuid4().hex[:12]}"
    client.create_bucket(Bucket=name)
    return S3Bucket(endpoint, name, client)


@pytest.fixture
def s3_iam(s3_bucket: S3Bucket) -> Iterator[Callable[[str | None], tuple[str, str]]]:
    """moto's IAM checks for the rest of the test once called. Each call makes a user with the
    given inline policy (None: granted nothing) and returns its (key id, secret)."""
    import boto3

    iam = boto3.session.Session(aws_access_key_id="AKIATESTFIXTURE00000", aws_secret_access_key="fixture-secret-key").client(
        "iam", endpoint_url=s3_bucket.endpoint, region_name="us-east-1"
    )

    def make_user(policy: str | None = None) -> tuple[str, str]:
        _moto_auth(s3_bucket.endpoint, "inf")  # the fixture's own keys are no IAM user
        user = f"job-{uuid.uuid4().hex[:8]}"
        iam.create_user(UserName=user)
        if policy:
            iam.put_user_policy(UserName=user, PolicyName="job", PolicyDocument=policy)
        key = iam.create_access_key(UserName=user)["AccessKey"]
        _moto_auth(s3_bucket.endpoint, "0")  # check every request from now on
        return key["AccessKeyId"], key["SecretAccessKey"]

    try:
        yield make_user
    finally:
        _moto_auth(s3_bucket.endpoint, "inf")


def _moto_auth(endpoint: str, initial_no_auth_action_count: str) -> None:
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=initial_no_auth_action_count.encode(), method="POST",
        headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
    )
    with urllib.request.urlopen(req, timeout=5) as resp:
        resp.read()


@pytest.fixture(scope="session")
def truth_store(tmp_path_factory):
    """(root, configurations) of the closed-form ground-truth store (see closed_form.py)."""
    from closed_form import write_closed_form_store

    root = str(tmp_path_factory.mktemp("truth") / "store")
    return root, write_closed_form_store(root)


@pytest.fixture(scope="session")
def trained(truth_store, ray_local):
    """The pipeline's TrainResult on the ground-truth store, two specialists.

    Each configuration there has its own law, so nothing is borrowed: every specialist must
    recover its own configuration's quantiles exactly."""
    from rece_dist.recipe import train
    from rece_dist.settings import TrainSettings

    return train(truth_store[0], TrainSettings(specialists=2, seed=0, borrow=0.0))
