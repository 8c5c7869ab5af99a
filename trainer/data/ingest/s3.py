"""``s3://bucket/key`` and ``s3://bucket/prefix/`` sources through boto3.

Credentials come from boto3's standard chain (environment, shared files, SSO, instance roles). With none at all,
public objects are read unsigned. ``s3_endpoint_url`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) points to
an S3-compatible store (MinIO, R2, ...), addressed path-style. Messages name buckets and keys, never credentials
and never botocore's raw text (which can echo request details).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.data.errors import DataError, SourceError
from trainer.data.ingest.budget import ByteBudget, copy_capped
from trainer.data.ingest.safety import (
    NameTable,
    UnsafePath,
    printable,
    resolve_inside,
    safe_filename,
    safe_relative_path,
    unique_path,
)
from trainer.data.ingest.sources import SourceRef
from trainer.data.limits import DataLimits
from trainer.data.report import PrepReport
from trainer.utils.download import human_size, redact_url
from trainer.utils.s3 import endpoint_url, s3_client

logger = logging.getLogger(__name__)

_ACCESS_CODES = {"AccessDenied", "AllAccessDisabled", "403", "Forbidden", "AccountProblem"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId": "the access key id is not known to this S3 endpoint",
    "SignatureDoesNotMatch": "the secret access key does not match the access key id",
    "InvalidToken": "the session token is not valid",
    "ExpiredToken": "the session token has expired",
    "TokenRefreshRequired": "the session token has expired",
    "InvalidSecurity": "the credentials are not valid",
}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> S3Location:
        rest = url.split("://", 1)[1]
        bucket, _, key = rest.partition("/")
        if "@" in bucket:
            raise SourceError(
                f"training source {redact_url(url)!r}: credentials inside s3:// URLs are not supported; set "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) instead"
            )
        if not bucket:
            raise SourceError(f"training source {url!r}: an S3 URL is s3://bucket/key or s3://bucket/prefix/")
        return cls(bucket, key)


class S3Fetcher:
    """One boto3 client for all S3 sources of a preparation (created on first use)."""

    def __init__(self, limits: DataLimits, budget: ByteBudget, report: PrepReport,
                 configured_endpoint: str | None = None) -> None:
        self.limits = limits
        self.budget = budget
        self.report = report
        self.endpoint = endpoint_url(configured_endpoint)
        self._client = None
        self._unsigned = False

    # ------------------------------------------------------------------------------------------------ client
    def _make_client(self, unsigned: bool = False):
        try:
            return s3_client(self.endpoint, connect_timeout=self.limits.http_timeout[0],
                             read_timeout=self.limits.http_timeout[1], retries=self.limits.http_retries,
                             unsigned=unsigned)
        except ValueError as error:
            raise SourceError(f"S3 endpoint {redact_url(self.endpoint or '')!r} is not valid ({error})") from None

    @property
    def client(self):
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _call(self, where: str, operation: str, *, raw_client_errors: bool = False, **kwargs):
        """Run one S3 call, translating botocore's failures into messages that say what to do.

        With ``raw_client_errors`` the service's own refusals (``ClientError``) reach the caller untranslated.
        """
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            EndpointConnectionError,
            NoCredentialsError,
            ParamValidationError,
        )

        try:
            return getattr(self.client, operation)(**kwargs)
        except NoCredentialsError:
            if self._unsigned:
                raise
            # No credentials anywhere in the chain: public buckets still answer unsigned requests.
            logger.info("no AWS credentials found; reading %s without signing (public objects only)", where)
            self._client = self._make_client(unsigned=True)
            self._unsigned = True
            return self._call(where, operation, raw_client_errors=raw_client_errors, **kwargs)
        except ClientError as error:
            if raw_client_errors:
                raise
            raise self._client_error(where, error) from None
        except EndpointConnectionError:
            raise SourceError(
                f"training source {where}: could not connect to the S3 endpoint "
                f"{redact_url(self.endpoint) if self.endpoint else '(AWS)'}; check s3_endpoint_url or the network"
            ) from None
        except ParamValidationError:
            raise SourceError(f"training source {where}: not a valid bucket name or key") from None
        except BotoCoreError as error:
            raise SourceError(f"training source {where}: S3 request failed ({type(error).__name__})") from None

    def _client_error(self, where: str, error) -> SourceError:
        response = getattr(error, "response", {}) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            return SourceError(f"training source {where}: the bucket does not exist (check its name and the endpoint)")
        if code in _CREDENTIAL_CODES:
            return SourceError(
                f"training source {where}: S3 refused the credentials: {_CREDENTIAL_CODES[code]}; check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and s3_endpoint_url"
            )
        if code in _ACCESS_CODES or status == 403:
            hint = (
                "no AWS credentials were found and the object is not public; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE)"
                if self._unsigned
                else "check that the credentials may read it (s3:GetObject, s3:ListBucket)"
            )
            return SourceError(f"training source {where}: access denied; {hint}")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            return SourceError(f"training source {where}: no such object")
        if code in ("SlowDown", "ServiceUnavailable", "InternalError", "503", "500") or (status or 0) >= 500:
            return SourceError(f"training source {where}: the S3 service is failing (HTTP {status}); try again later")
        return SourceError(f"training source {where}: S3 answered {code or 'an error'} (HTTP {status})")

    # ---------------------------------------------------------------------------------------------- fetching
    def fetch(self, ref: SourceRef, files_folder: Path, tree_folder: Path) -> Path:
        """Download a single object into ``files_folder``, or a prefix as a tree into ``tree_folder``.

        Returns the file or the folder.
        """
        location = S3Location.parse(ref.value)
        if location.key and not location.key.endswith("/"):
            if self._object_exists(location, ref.label):
                return self._download(location, location.key, files_folder / safe_filename(location.key), ref.label)
            # "s3://bucket/folder" without the slash: read it as a prefix when objects are under it.
            prefix = location.key + "/"
        else:
            prefix = location.key
        return self._download_prefix(S3Location(location.bucket, prefix), tree_folder, ref.label)

    def _object_exists(self, location: S3Location, label: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self._call(label, "head_object", raw_client_errors=True, Bucket=location.bucket, Key=location.key)
            return True
        except ClientError as error:
            status = (getattr(error, "response", {}) or {}).get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                return False  # maybe a prefix, or a missing bucket: the listing that follows tells which
            # HEAD answers carry no error body: a listing names the reason (credentials, bucket) when it fails too.
            self._call(label, "list_objects_v2", Bucket=location.bucket, Prefix=location.key, MaxKeys=1)
            raise self._client_error(label, error) from None

    def _download_prefix(self, location: S3Location, folder: Path, label: str) -> Path:
        keys: list[tuple[str, int]] = []
        token = None
        while True:
            kwargs = {"Bucket": location.bucket, "Prefix": location.key}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(label, "list_objects_v2", **kwargs)
            for entry in page.get("Contents", []) or []:
                if not entry["Key"].endswith("/"):
                    keys.append((entry["Key"], int(entry.get("Size", 0))))
            if len(keys) > self.limits.max_archive_entries:
                raise SourceError(
                    f"training source {label}: more than {self.limits.max_archive_entries} objects under the prefix"
                )
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        if not keys:
            raise SourceError(f"training source {label}: no object or folder with this name")
        total = sum(size for _, size in keys)
        if total > self.budget.left:
            raise SourceError(
                f"training source {label}: {human_size(total)} under the prefix, over the "
                f"{human_size(self.budget.left)} left for the training data"
            )
        folder.mkdir(parents=True, exist_ok=True)
        names = NameTable()
        for key, _size in keys:
            relative_name = key[len(location.key):]
            item = f"s3://{location.bucket}/{printable(key)}"
            try:
                relative = names.claim(safe_relative_path(relative_name))
                if relative is None:
                    self.report.skip(item, "its folder clashes with an object of the same name", group=label)
                    continue
                target = resolve_inside(folder, relative)
            except UnsafePath as error:
                self.report.skip(item, f"unsafe object name ({error})", group=label)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            self._download(S3Location(location.bucket, key), key, target, item)
        self.report.end_group(label)
        return folder

    def _download(self, location: S3Location, key: str, target: Path, label: str) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target = unique_path(target)
        from botocore.exceptions import BotoCoreError
        from urllib3.exceptions import HTTPError

        self.budget.add_file(label)
        response = self._call(label, "get_object", Bucket=location.bucket, Key=key)
        body = response["Body"]
        try:
            size = int(response.get("ContentLength") or 0)
            if size > self.limits.max_download_bytes:
                raise SourceError(f"training source {label}: {human_size(size)} is over the limit of "
                                  f"{human_size(self.limits.max_download_bytes)}")
            copy_capped(body, target, budget=self.budget, item=label, max_bytes=self.limits.max_download_bytes,
                        what="object")
        except SourceError:
            target.unlink(missing_ok=True)
            raise
        except DataError as error:
            target.unlink(missing_ok=True)
            raise SourceError(f"training source {error}") from None
        except (BotoCoreError, HTTPError) as error:
            target.unlink(missing_ok=True)
            raise SourceError(f"training source {label}: the download broke off ({type(error).__name__})") from None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
        finally:
            body.close()
        return target

