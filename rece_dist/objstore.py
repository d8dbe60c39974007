"""Objects under a root URI (a local folder or ``s3://bucket/prefix``) behind one small set of verbs.

Trace stores and artifact roots need the same things from storage: list by prefix (with sizes
and ETags, paginated), read a whole small object, write an object so that readers never see it
half-written, and compare-and-swap one pointer object. On S3, boto3 does all of these (a single
``PutObject`` is atomic; ``IfMatch``/``IfNoneMatch`` make it conditional). Locally a temp file
plus ``os.replace`` and an ``fcntl`` lock give the same guarantees. PyArrow's S3 filesystem and
Polars' ``storage_options`` are built from the same :class:`S3Options`, so all three clients
agree on endpoint, region, timeouts and retries.

Every storage failure leaves as one :class:`StoreError` line naming the URI, the problem and
what to do. Messages are built from error *codes*, never from raw server responses, which can
echo the access key id; credentials come from the AWS chain and are never stored here.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from functools import cache, cached_property
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from .errors import StoreError

DEFAULT_REGION = "us-east-1"
_CREDENTIALS_HINT = "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or AWS_PROFILE"
_PERMISSIONS_HINT = "check the credentials and that they grant the actions in infra/iam-policy.json"
# S3 error code (boto3 spelling; PyArrow's NO_SUCH_BUCKET style is normalised to it) -> (problem, what to do)
_S3_CODES: dict[str, tuple[str, str]] = {
    "nosuchkey": ("the object does not exist", "it may have been deleted meanwhile; list the store again"),
    "accessdenied": ("access denied", _PERMISSIONS_HINT),
    "403": ("access denied", _PERMISSIONS_HINT),
    "allaccessdisabled": ("access to the bucket is disabled", _PERMISSIONS_HINT),
    "invalidaccesskeyid": ("the access key id is not recognised", _CREDENTIALS_HINT),
    "signaturedoesnotmatch": ("the request signature was rejected (wrong secret key?)", _CREDENTIALS_HINT),
    "expiredtoken": ("the session token has expired", "refresh the credentials"),
    "invalidtoken": ("the session token is invalid", _CREDENTIALS_HINT),
}
_NO_CREDENTIALS = ("no AWS credentials were found", "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an IAM role")
_UNREACHABLE_HINT = "check AWS_ENDPOINT_URL and that the service is up"
_CODE_PATTERNS = (re.compile(r"AWS Error ([A-Z_]+)"), re.compile(r"<Code>(\w+)</Code>"))


@dataclass(frozen=True)
class S3Options:
    """Where and how to reach an S3-compatible endpoint. Credentials always come from the AWS chain.

    Timeouts and attempts are bounded so that a wrong endpoint fails in seconds, not minutes.
    """

    endpoint_url: str | None = None
    region: str | None = None
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_attempts: int = 3

    @classmethod
    def from_env(cls) -> "S3Options":
        return cls(
            endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
            region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        )

    @property
    def endpoint(self) -> str | None:
        """The endpoint with a scheme (``host:port`` alone means https), no path, no user info."""
        if not self.endpoint_url:
            return None
        parts = urlsplit(self.endpoint_url if "://" in self.endpoint_url else f"https://{self.endpoint_url}")
        return f"{parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}"

    def describe(self) -> str:
        """Where requests go, for error messages."""
        return self.endpoint or f"AWS S3 ({self.region or DEFAULT_REGION})"

    def polars(self) -> dict[str, Any]:
        """Polars (object_store) options; Polars finds credentials through the AWS chain itself."""
        opts: dict[str, Any] = {
            "aws_region": self.region or DEFAULT_REGION,
            "connect_timeout": f"{int(self.connect_timeout * 1000)}ms",
            "timeout": f"{int(self.read_timeout * 1000)}ms",  # object_store: per whole request (its default is 30 s too)
            "max_retries": self.max_attempts - 1,
        }
        if self.endpoint:
            opts["aws_endpoint_url"] = self.endpoint
            if self.endpoint.startswith("http://"):
                opts["allow_http"] = "true"
        return opts

    def pyarrow(self) -> pafs.S3FileSystem:
        kw: dict[str, Any] = {
            "region": self.region or DEFAULT_REGION,
            "connect_timeout": self.connect_timeout,
            "request_timeout": self.read_timeout,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
        }
        if self.endpoint:
            scheme, _, host = self.endpoint.partition("://")
            kw.update(endpoint_override=host, scheme=scheme)
        return pafs.S3FileSystem(**kw)

    def boto3(self) -> Any:
        """A boto3 S3 client from a fresh session, so it sees the credentials in the environment now.

        Sessions share one model loader: parsing botocore's service JSON anew costs ~0.25 s per client.
        """
        import boto3
        import botocore.session
        from botocore.config import Config

        config = Config(
            connect_timeout=self.connect_timeout,
            read_timeout=self.read_timeout,
            retries={"max_attempts": self.max_attempts, "mode": "standard"},
            # Send checksums only where S3 requires them: several S3-compatible stores reject the rest.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        core = botocore.session.get_session()
        core.register_component("data_loader", _botocore_loader())
        return boto3.session.Session(botocore_session=core).client("s3", endpoint_url=self.endpoint, region_name=self.region or DEFAULT_REGION, config=config)


@cache
def _botocore_loader() -> Any:
    import botocore.loaders

    return botocore.loaders.create_loader()


class ObjectInfo(NamedTuple):
    """One object: ``key`` relative to the root; ``etag`` is S3's (None locally)."""

    key: str
    size: int
    etag: str | None


class Blob(NamedTuple):
    """An object's bytes and the token a compare-and-swap must present (S3 ETag, local sha256)."""

    data: bytes
    etag: str


class ObjectRoot:
    """The objects below ``uri``. Cheap to construct; clients are created on first use and not pickled."""

    def __init__(self, uri: str, s3: S3Options | None = None):
        self.uri = uri.rstrip("/") or "/"
        self.is_s3 = self.uri.startswith("s3://")
        if self.is_s3:
            self.s3: S3Options | None = s3 or S3Options.from_env()
            self.bucket, _, self.prefix = self.uri[len("s3://"):].partition("/")
            if not self.bucket:
                raise StoreError(f"{uri}: an S3 URI needs a bucket (s3://bucket/prefix)")
            self.fs_root = self.uri[len("s3://"):]
        else:
            self.s3 = None
            self.fs_root = os.path.abspath(self.uri)

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "s3": self.s3}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["uri"], state["s3"])  # type: ignore[misc]

    # --- names ---------------------------------------------------------------------------
    def fs_path(self, rel: str) -> str:
        """The path PyArrow's filesystem uses for ``rel`` (``bucket/prefix/rel`` or an absolute path)."""
        return f"{self.fs_root}/{rel}" if rel else self.fs_root

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}" if rel else self.uri

    def _key(self, rel: str) -> str:
        return f"{self.prefix}/{rel}" if self.prefix else rel

    def _rel(self, key: str) -> str:
        return key[len(self.prefix) + 1:] if self.prefix else key

    @cached_property
    def fs(self) -> pafs.FileSystem:
        return self.s3.pyarrow() if self.s3 else pafs.LocalFileSystem()

    @cached_property
    def _client(self) -> Any:
        return self.s3.boto3()  # type: ignore[union-attr]

    # --- errors --------------------------------------------------------------------------
    def error(self, rel: str, action: str, exc: BaseException) -> StoreError:
        """One actionable line for a failure of ``action`` on ``rel`` (never the raw server text)."""
        problem, hint = self._explain(exc)
        return StoreError(f"{self.uri_of(rel)}: cannot {action}: {problem}; {hint}")

    def _explain(self, exc: BaseException) -> tuple[str, str]:
        if not self.is_s3:
            return _first_line(exc), "check the path and its permissions"
        import botocore.exceptions as bx

        where = self.s3.describe()  # type: ignore[union-attr]
        if isinstance(exc, (bx.NoCredentialsError, bx.PartialCredentialsError, bx.CredentialRetrievalError)):
            return _NO_CREDENTIALS
        if "169.254.169.254" in str(exc):  # Polars found no keys and fell through to the instance metadata service
            return _NO_CREDENTIALS
        code = _error_code(exc)
        if code == "networkconnection" or isinstance(exc, (bx.ConnectionError, bx.HTTPClientError, ConnectionError, TimeoutError)):
            timed_out = isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__ or "Timeout was reached" in str(exc)
            return f"{where} {'did not answer in time' if timed_out else 'cannot be reached'}", _UNREACHABLE_HINT
        if code == "nosuchbucket":
            return f"bucket {self.bucket!r} does not exist", "create it or fix the bucket name in the URI"
        if code in _S3_CODES:
            return _S3_CODES[code]
        return (f"S3 error {code}" if code else _first_line(exc)), "retry, or check the endpoint and the object"

    # --- reading -------------------------------------------------------------------------
    def exists(self, rel: str) -> bool:
        if not self.is_s3:
            return os.path.isfile(self.fs_path(rel))
        try:
            self._client.head_object(Bucket=self.bucket, Key=self._key(rel))
            return True
        except Exception as exc:  # noqa: BLE001 - classified below
            if self._absent(rel, "check for the object", exc):
                return False
            raise self.error(rel, "check for the object", exc) from None

    def read(self, rel: str) -> Blob | None:
        """The whole object, or None if it does not exist."""
        if not self.is_s3:
            try:
                with open(self.fs_path(rel), "rb") as f:
                    data = f.read()
            except FileNotFoundError:
                return None
            except OSError as exc:
                raise self.error(rel, "read", exc) from None
            return Blob(data, hashlib.sha256(data).hexdigest())
        try:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(rel))
            return Blob(resp["Body"].read(), resp["ETag"])
        except Exception as exc:  # noqa: BLE001 - classified below
            if self._absent(rel, "read", exc):
                return None
            raise self.error(rel, "read", exc) from None

    def _absent(self, rel: str, action: str, exc: BaseException) -> bool:
        """Whether a failed HEAD/GET of one key means that the key does not exist.

        A 404 from HEAD has no body to tell a missing key from a missing bucket, and S3 answers
        403 instead of 404 to callers that may not list the whole bucket (a prefix-scoped policy
        such as infra/iam-policy.json). In both cases the listing of that key decides.
        """
        code = _error_code(exc)
        if code == "nosuchkey":
            return True
        if code not in ("404", "403", "accessdenied"):
            return False
        key = self._key(rel)
        try:
            listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=key, MaxKeys=1).get("Contents", ())
        except Exception as list_exc:  # noqa: BLE001 - its reason (no bucket, bad key) is the more specific one
            raise self.error(rel, action, list_exc) from None
        return not any(o["Key"] == key for o in listed)

    def list(self, rel_prefix: str) -> list[ObjectInfo]:
        """Every object below ``rel_prefix`` (a folder), all pages; nothing is opened."""
        if not self.is_s3:
            base = self.fs_path(rel_prefix)
            if not os.path.isdir(base):
                return []
            out = []
            try:
                for dirpath, _, files in os.walk(base, onerror=_reraise):
                    for name in files:
                        path = os.path.join(dirpath, name)
                        out.append(ObjectInfo(os.path.relpath(path, self.fs_root).replace(os.sep, "/"), os.path.getsize(path), None))
            except OSError as exc:
                raise self.error(rel_prefix, "list", exc) from None
            return sorted(out)
        try:
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self._key(rel_prefix.rstrip("/") + "/")
            )
            return [ObjectInfo(self._rel(o["Key"]), o["Size"], o["ETag"]) for page in pages for o in page.get("Contents", ())]
        except Exception as exc:  # noqa: BLE001 - classified
            raise self.error(rel_prefix, "list", exc) from None

    # --- writing -------------------------------------------------------------------------
    def write(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either the old object or all of the new one."""
        if not self.is_s3:
            self._local_write(rel, data)
            return
        try:
            self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data)
        except Exception as exc:  # noqa: BLE001 - classified
            raise self.error(rel, "write", exc) from None

    def put_if(self, rel: str, data: bytes, expected: str | None) -> bool:
        """Compare-and-swap: write only if the object's token is still ``expected`` (None: absent).

        Returns False when another writer got there first. On S3 this is a conditional
        ``PutObject`` (``IfMatch``/``IfNoneMatch``). Locally, creating is a hard link of a
        complete temp file (fails if the name exists); replacing takes a per-object ``fcntl``
        lock so that read-compare-replace is one step for every process on the host.
        """
        if self.is_s3:
            cond = {"IfMatch": expected} if expected is not None else {"IfNoneMatch": "*"}
            try:
                self._client.put_object(Bucket=self.bucket, Key=self._key(rel), Body=data, **cond)
                return True
            except Exception as exc:  # noqa: BLE001 - classified below
                # 412: the condition failed; 409: a concurrent conditional write won; 404: IfMatch on a deleted key
                if _error_code(exc) in ("preconditionfailed", "412", "conditionalrequestconflict", "409", "nosuchkey"):
                    return False
                raise self.error(rel, "write", exc) from None
        path = self.fs_path(rel)
        try:
            if expected is None:
                return self._local_write(rel, data, create_only=True)
            with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                current = self.read(rel)
                return current is not None and current.etag == expected and self._local_write(rel, data)
        except OSError as exc:
            raise self.error(rel, "write", exc) from None

    def _local_write(self, rel: str, data: bytes, create_only: bool = False) -> bool:
        """Write a complete, synced temp file, then rename it over ``rel`` (or hard-link it, only if ``rel`` is new)."""
        path = self.fs_path(rel)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                if create_only:
                    os.link(tmp, path)  # atomic, and fails if the name exists
                else:
                    os.replace(tmp, path)
                return True
            except FileExistsError:
                return False
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        except OSError as exc:
            raise self.error(rel, "write", exc) from None


def _reraise(exc: OSError) -> None:
    raise exc


def _first_line(exc: BaseException) -> str:
    """A short, single-line description with any credential from the environment masked."""
    text = (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)).split("<?xml")[0].strip()
    line = text.splitlines()[0][:200] if text else type(exc).__name__
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        secret = os.environ.get(var)
        if secret:
            line = line.replace(secret, "***")
    return line


def _error_code(exc: BaseException) -> str:
    """The S3 error code of a boto3, PyArrow or Polars failure, lower-cased without underscores."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        return str(response.get("Error", {}).get("Code", "")).lower()
    for pattern in _CODE_PATTERNS:
        m = pattern.search(str(exc))
        if m:
            return m.group(1).replace("_", "").lower()
    return ""
