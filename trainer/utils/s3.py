"""S3 objects outside the training data: the zip uploaded to ``output_uri`` and LoRA zips read by ``s3://`` URL.

The client here serves the training data's ``s3://`` sources too (:mod:`trainer.data.ingest.s3`):
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` point to an S3-compatible store, addressed path-style; credentials
come from boto3's standard chain. Messages name buckets and keys, never credentials.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from trainer.utils.atomic import atomic_path

logger = logging.getLogger(__name__)

_ERROR_CODE = re.compile(r"An error occurred \((\w+)\)")
#: S3's bucket naming rules (the strict, virtual-host-safe form every provider accepts).
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


class UploadCancelled(Exception):
    """The upload was stopped on request; S3 keeps nothing of it."""


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
                f"{what}: credentials or ports do not belong in s3:// URIs; set AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and AWS_ENDPOINT_URL_S3 instead"
            )
        if not BUCKET_NAME.match(bucket) or ".." in bucket:
            raise ValueError(
                f"{what}: {bucket!r} is not a valid bucket name (3-63 lower-case letters, digits, dots and hyphens)"
            )
        if "//" in key or key.startswith("/") or any(part in (".", "..") for part in key.split("/")):
            raise ValueError(f"{what}: the key {key!r} has empty, '.' or '..' segments")
        return cls(bucket, key)


def endpoint_url(configured: str | None) -> str | None:
    return configured or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client(endpoint: str | None = None, *, connect_timeout: float = 10.0, read_timeout: float = 60.0,
              retries: int = 3, unsigned: bool = False):
    """A boto3 S3 client; ``unsigned`` reads public objects without credentials."""
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

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
    return boto3.session.Session().client("s3", endpoint_url=resolved, config=Config(**options))


def describe_error(error: BaseException, where: str) -> str:
    """A message for a failed S3 call that says what to check."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(error, NoCredentialsError):
        return (f"{where}: no AWS credentials were found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
                "(or AWS_PROFILE) in the server's environment")
    if isinstance(error, EndpointConnectionError):
        return f"{where}: could not connect to the S3 endpoint; check AWS_ENDPOINT_URL_S3 and the network"
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
    if code in ("NoSuchBucket", "404", "NotFound") or status == 404:
        return f"{where}: not found (check the bucket name, the key and the endpoint)"
    if code in ("AccessDenied", "403", "Forbidden", "AllAccessDisabled") or status == 403:
        bucket = _bucket_of(where)
        return f"{where}: access denied; check that the server's credentials may read or write bucket {bucket}"
    if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"):
        return f"{where}: S3 refused the credentials ({code})"
    return f"{where}: S3 answered {code or 'an error'}" + (f" (HTTP {status})" if status else "")


def _bucket_of(where: str) -> str:
    found = re.search(r"s3://([^/\s]+)", where)
    return found.group(1) if found else "(see above)"


def check_bucket(client, uri: S3Uri, what: str) -> None:
    """Fail early when the bucket is missing, the endpoint unreachable or credentials absent.

    Write-only credentials may not list the bucket (403): that is logged, not refused, since the upload may still
    be allowed.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client.head_bucket(Bucket=uri.bucket)
    except ClientError as error:
        status = (error.response or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status == 403:
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
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

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
    from botocore.exceptions import BotoCoreError, ClientError

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
