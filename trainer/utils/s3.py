"""The one S3 module: the ``s3://`` URI, the client, and the messages for failed calls, for every S3 user (training
sources, the zip uploaded to ``output_uri``, LoRA zips read by ``s3://`` URL).

``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (or a config's ``s3_endpoint_url``) point to an S3-compatible store,
addressed path-style; credentials come from boto3's standard chain. Messages name buckets and keys, never credentials
and never botocore's raw text (which can echo request details).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    ParamValidationError,
)

from trainer.utils.atomic import atomic_path
from trainer.utils.download import redact_url

logger = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"An error occurred \((\w+)\)")
#: S3's bucket naming rules (the strict, virtual-host-safe form every provider accepts).
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the access key id is not known to this S3 endpoint",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidToken": "the session token is not valid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token has expired",
    "InvalidSecurity": "the credentials are not valid",
}
_SERVER_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "503", "500"}


class UploadCancelled(Exception):
    """The upload was stopped on request; S3 keeps nothing of it."""


# ============================================================================================== URIs
@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    @classmethod
    def parse(cls, uri: str, what: str = "S3 URI") -> S3Uri:
        """``s3://bucket/key`` (the key may be empty or a prefix); a ValueError says what is wrong."""
        text = uri.strip()
        if not text.lower().startswith("s3://"):
            raise ValueError(f"{what} must start with s3:// (for example s3://my-bucket/loras/), got {text!r}")
        bucket, _, key = text[5:].partition("/")
        if "@" in bucket or ":" in bucket:
            raise ValueError(
                f"{what}: credentials or ports do not belong in s3:// URIs (they are not supported there); set "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL_S3 instead"
            )
        if not BUCKET_NAME.match(bucket) or ".." in bucket:
            raise ValueError(
                f"{what}: {bucket!r} is not a valid bucket name (3-63 lower-case letters, digits, dots and hyphens)"
            )
        if "//" in key or key.startswith("/") or any(part in (".", "..") for part in key.split("/")):
            raise ValueError(f"{what}: the key {key!r} has empty, '.' or '..' segments")
        return cls(bucket, key)


# ============================================================================================== the client
def endpoint_url(configured: str | None) -> str | None:
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint: str | None = None, *, connect_timeout: float = 10.0, read_timeout: float = 60.0,
              retries: int = 3, unsigned: bool = False):
    """A boto3 S3 client; ``unsigned`` reads public objects without credentials. botocore retries throttling,
    5xx answers and broken connections itself (its ``standard`` mode), ``retries`` times."""
    resolved = endpoint_url(endpoint)
    options: dict = {
        "connect_timeout": connect_timeout,
        "read_timeout": read_timeout,
        "retries": {"max_attempts": retries + 1, "mode": "standard"},
    }
    if resolved:
        # S3-compatible stores on a host or IP of their own do not serve bucket subdomains.
        options["s3"] = {"addressing_style": "path"}
    if unsigned:
        options["signature_version"] = UNSIGNED
    try:
        return boto3.session.Session().client("s3", endpoint_url=resolved, config=Config(**options))
    except ValueError as error:
        raise ValueError(f"S3 endpoint {redact_url(resolved or '')!r} is not valid ({error})") from None


# ============================================================================================== messages
def describe_error(error: BaseException, where: str, *, unsigned: bool = False, endpoint: str | None = None) -> str:
    """A message for a failed S3 call that says what to check. ``where`` starts it (``upload to s3://b/k``,
    ``training source s3://b/k``); ``unsigned``: the call was made without credentials (none were found)."""
    if isinstance(error, NoCredentialsError):
        return (f"{where}: no AWS credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the server's environment")
    if isinstance(error, EndpointConnectionError):
        shown = redact_url(endpoint) if endpoint else "(AWS)"
        return (f"{where}: could not connect to the S3 endpoint {shown}; check s3_endpoint_url or "
                "AWS_ENDPOINT_URL_S3 and the network")
    if isinstance(error, ParamValidationError):
        return f"{where}: not a valid bucket name or key"
    status = None
    if isinstance(error, ClientError):
        response = error.response or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    else:
        # boto3's transfer manager reports a refused upload as S3UploadFailedError, often with no cause attached:
        # only its text ("An error occurred (AccessDenied) when calling the PutObject operation") holds the code.
        found = _ERROR_CODE.search(str(error))
        if found is None:
            return f"{where}: S3 request failed ({type(error).__name__})"
        code = found.group(1)
    if code == "NoSuchBucket":
        return f"{where}: the bucket does not exist (check its name and the endpoint)"
    if code in _CREDENTIAL_CODES:
        return (f"{where}: S3 refused the credentials ({code}): {_CREDENTIAL_CODES[code]}; check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and the S3 endpoint")
    if code in _ACCESS_CODES or status == 403:
        if unsigned:
            return (f"{where}: access denied; no AWS credentials were found and the object is not public; set "
                    "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)")
        return (f"{where}: access denied; check that the server's credentials may read or write bucket "
                f"{_bucket_of(where)} (s3:GetObject, s3:ListBucket, s3:PutObject)")
    if code in ("NoSuchKey", "404", "NotFound") or status == 404:
        return f"{where}: not found (check the bucket name, the key and the endpoint)"
    if code in _SERVER_CODES or (status or 0) >= 500:
        return f"{where}: the S3 service is failing (HTTP {status}); try again later"
    return f"{where}: S3 answered {code or 'an error'}" + (f" (HTTP {status})" if status else "")


def _bucket_of(where: str) -> str:
    found = re.search(r"s3://([^/\s]+)", where)
    return found.group(1) if found else "(see above)"


def status_of(error: ClientError) -> int | None:
    return (error.response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")


# ============================================================================================== operations
def check_bucket(client, uri: S3Uri, what: str) -> None:
    """Fail early when the bucket is missing, the endpoint unreachable or credentials absent.

    Write-only credentials may not list the bucket (403): that is logged, not refused, since the upload may still
    be allowed.
    """
    try:
        client.head_bucket(Bucket=uri.bucket)
    except ClientError as error:
        if status_of(error) == 403:
            logger.warning("%s: cannot check s3://%s (access denied to HeadBucket); trying the upload anyway",
                           what, uri.bucket)
            return
        raise ValueError(describe_error(error, f"{what} s3://{uri.bucket}")) from None
    except BotoCoreError as error:
        raise ValueError(describe_error(error, f"{what} s3://{uri.bucket}")) from None


def upload_file(client, path: Path, uri: S3Uri, *, should_stop: Callable[[], bool] | None = None,
                content_type: str = "application/zip") -> None:
    """Upload ``path`` to ``uri``. ``should_stop`` is polled as bytes go out; stopping leaves no object behind.

    A single PUT creates nothing until it completes, and an interrupted multipart upload is aborted by the
    transfer manager, so either the whole object exists or none.
    """

    def progress(_sent: int) -> None:
        if should_stop is not None and should_stop():
            raise UploadCancelled(f"upload to {uri} cancelled")

    try:
        client.upload_file(str(path), uri.bucket, uri.key, ExtraArgs={"ContentType": content_type},
                           Callback=progress, Config=TransferConfig(use_threads=True, max_concurrency=4))
    except (ClientError, BotoCoreError, S3UploadFailedError) as error:
        cause = error.__cause__ if isinstance(error, S3UploadFailedError) and error.__cause__ else error
        raise ValueError(describe_error(cause, f"upload to {uri}")) from None


def delete_object(client, uri: S3Uri) -> None:
    """Remove an uploaded object (a job cancelled after its upload finished); failures are only logged."""
    try:
        client.delete_object(Bucket=uri.bucket, Key=uri.key)
        logger.info("removed %s", uri)
    except Exception as error:  # best effort: the job is being cancelled anyway
        logger.warning("could not remove %s after the cancellation: %s", uri, type(error).__name__)


def download_file(client, uri: S3Uri, target: Path, max_bytes: int | None = None) -> Path:
    """Download one object atomically (the file appears only when complete)."""
    try:
        head = client.head_object(Bucket=uri.bucket, Key=uri.key)
        size = int(head.get("ContentLength") or 0)
        if max_bytes is not None and size > max_bytes:
            raise ValueError(f"{uri}: {size} bytes is over the limit of {max_bytes}")
        with atomic_path(target) as tmp:
            client.download_file(uri.bucket, uri.key, str(tmp))
    except (ClientError, BotoCoreError) as error:
        raise ValueError(describe_error(error, str(uri))) from None
    return target
