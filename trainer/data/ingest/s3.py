"""``s3://bucket/key`` and ``s3://bucket/prefix/`` sources, through the one S3 module (:mod:`trainer.utils.s3`).

Credentials come from boto3's standard chain (environment, shared files, SSO, instance roles). With none at all,
public objects are read unsigned. ``s3_endpoint_url`` (or ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``) points to
an S3-compatible store (MinIO, R2, ...), addressed path-style.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError
from urllib3.exceptions import HTTPError

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
from trainer.data.ingest.sources import SourceRef, parse_s3_source
from trainer.data.limits import DataLimits
from trainer.data.report import PrepReport
from trainer.utils.download import human_size
from trainer.utils.s3 import S3Uri, describe_error, endpoint_url, s3_client, status_of

logger = logging.getLogger(__name__)


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
            raise SourceError(str(error)) from None

    @property
    def client(self):
        if self._client is None:
            self._client = self._make_client()
        return self._client

    def _call(self, where: str, operation: str, *, raw_client_errors: bool = False, **kwargs):
        """Run one S3 call; failures become :class:`SourceError` with :func:`~trainer.utils.s3.describe_error`'s
        message. With ``raw_client_errors`` the service's own refusals (``ClientError``) reach the caller as they are.
        """
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
            raise self._error(where, error) from None
        except BotoCoreError as error:
            raise self._error(where, error) from None

    def _error(self, where: str, error: BaseException) -> SourceError:
        return SourceError(describe_error(error, f"training source {where}", unsigned=self._unsigned,
                                          endpoint=self.endpoint))

    # ---------------------------------------------------------------------------------------------- fetching
    def fetch(self, ref: SourceRef, files_folder: Path, tree_folder: Path) -> Path:
        """Download a single object into ``files_folder``, or a prefix as a tree into ``tree_folder``.

        Returns the file or the folder.
        """
        location = parse_s3_source(ref.value)
        if location.key and not location.key.endswith("/"):
            if self._object_exists(location, ref.label):
                return self._download(location, location.key, files_folder / safe_filename(location.key), ref.label)
            # "s3://bucket/folder" without the slash: read it as a prefix when objects are under it.
            prefix = location.key + "/"
        else:
            prefix = location.key
        return self._download_prefix(S3Uri(location.bucket, prefix), tree_folder, ref.label)

    def _object_exists(self, location: S3Uri, label: str) -> bool:
        try:
            self._call(label, "head_object", raw_client_errors=True, Bucket=location.bucket, Key=location.key)
            return True
        except ClientError as error:
            if status_of(error) == 404:
                return False  # maybe a prefix, or a missing bucket: the listing that follows tells which
            # HEAD answers carry no error body: a listing names the reason (credentials, bucket) when it fails too.
            self._call(label, "list_objects_v2", Bucket=location.bucket, Prefix=location.key, MaxKeys=1)
            raise self._error(label, error) from None

    def _download_prefix(self, location: S3Uri, folder: Path, label: str) -> Path:
        keys: list[tuple[str, int]] = []
        token = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": location.bucket, "Prefix": location.key}
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
            self._download(S3Uri(location.bucket, key), key, target, item)
        self.report.end_group(label)
        return folder

    def _download(self, location: S3Uri, key: str, target: Path, label: str) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        target = unique_path(target)
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

