"""s3:// sources against moto's standalone S3-compatible server on 127.0.0.1, through boto3 (no patching)."""

from __future__ import annotations

import uuid

import boto3
import pytest
import requests

from tests.data.factories import config, fast_limits, png, zip_bytes
from trainer.data.errors import SourceError
from trainer.data.prepare import prepare_dataset


@pytest.fixture
def bucket(s3_endpoint, aws_env):
    """A fresh bucket holding a single zip, a folder of images with a sidecar caption, and a nested folder."""
    name = f"photos-{uuid.uuid4().hex[:10]}"
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=name)
    client.put_object(Bucket=name, Key="sets/one.zip", Body=zip_bytes({"z.png": png(1)}))
    client.put_object(Bucket=name, Key="folder/a.png", Body=png(2))
    client.put_object(Bucket=name, Key="folder/a.txt", Body=b"a photo from a bucket")
    client.put_object(Bucket=name, Key="folder/deeper/b.png", Body=png(3))
    client.put_object(Bucket=name, Key="folder/", Body=b"")  # a console-made "directory" marker
    client.put_object(Bucket=name, Key="folder/../../escape.png", Body=png(4))
    return name


def _prepare(sandbox, sources, endpoint=None, limits=None):
    return prepare_dataset(config(sources, s3_endpoint_url=endpoint), sandbox.work_dir, limits=limits or fast_limits(),
                           allow_local=False)


def test_single_object_and_prefixes(sandbox, s3_endpoint, bucket):
    before = sandbox.snapshot()
    dataset = _prepare(sandbox, f"s3://{bucket}/sets/one.zip | s3://{bucket}/folder/", endpoint=s3_endpoint)
    sandbox.assert_nothing_written_outside(before)
    sources = [s.source for s in dataset.samples]
    assert sources == [f"z.png (in s3://{bucket}/sets/one.zip)", f"a.png (in s3://{bucket}/folder/)",
                       f"deeper/b.png (in s3://{bucket}/folder/)"]
    assert dataset.samples[1].caption == "TOK, a photo from a bucket"
    assert any("escape.png" in w and "unsafe" in w for w in dataset.info["warnings"])


def test_prefix_without_trailing_slash_and_endpoint_from_environment(sandbox, s3_endpoint, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    dataset = _prepare(sandbox, f"s3://{bucket}/folder/deeper")
    assert [s.source for s in dataset.samples] == [f"b.png (in s3://{bucket}/folder/deeper)"]


def test_missing_bucket_and_missing_key(sandbox, s3_endpoint, aws_env):
    before = sandbox.snapshot()
    with pytest.raises(SourceError, match=r"s3://no-such-bucket-here/x.zip: the bucket does not exist"):
        _prepare(sandbox, "s3://no-such-bucket-here/x.zip", endpoint=s3_endpoint)
    name = f"empty-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=name)
    with pytest.raises(SourceError, match=rf"s3://{name}/missing.zip: no object or folder with this name"):
        _prepare(sandbox, f"s3://{name}/missing.zip", endpoint=s3_endpoint)
    sandbox.assert_nothing_written_outside(before)


def test_bad_credentials_are_named_but_never_printed(sandbox, s3_endpoint, bucket, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGKEY00000042")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret-never-print-me")
    # From now on the server checks signatures against its IAM users (there are none): every key is unknown.
    previous = requests.post(f"{s3_endpoint}/moto-api/reset-auth", data=b"0", timeout=5).json()
    try:
        with pytest.raises(SourceError) as error:
            _prepare(sandbox, f"s3://{bucket}/sets/one.zip", endpoint=s3_endpoint)
    finally:
        requests.post(f"{s3_endpoint}/moto-api/reset-auth",
                      data=previous["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"].encode(), timeout=5)
    message = str(error.value)
    assert f"s3://{bucket}/sets/one.zip" in message and "refused the credentials" in message
    assert "AWS_ACCESS_KEY_ID" in message  # says what to check...
    assert "AKIAWRONGKEY00000042" not in message and "wrong-secret-never-print-me" not in message  # ...not its value


def test_without_credentials_public_objects_are_read_unsigned(sandbox, s3_endpoint, bucket, monkeypatch):
    client = boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1")
    client.put_object(Bucket=bucket, Key="public/p.png", Body=png(5), ACL="public-read")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    dataset = _prepare(sandbox, f"s3://{bucket}/public/p.png", endpoint=s3_endpoint)
    assert len(dataset) == 1
    with pytest.raises(SourceError, match="access denied; no AWS credentials were found and the object is not public"):
        _prepare(sandbox, f"s3://{bucket}/sets/one.zip", endpoint=s3_endpoint)


def test_unreachable_endpoint(sandbox, aws_env):
    with pytest.raises(SourceError, match=r"could not connect to the S3 endpoint http://127.0.0.1:9/"):
        _prepare(sandbox, "s3://bucket/key.zip", endpoint="http://127.0.0.1:9/",
                 limits=fast_limits(http_retries=0, http_timeout=(1.0, 1.0)))


def test_object_larger_than_the_limit(sandbox, s3_endpoint, bucket):
    source = f"s3://{bucket}/sets/one.zip"
    with pytest.raises(SourceError, match=rf"training source {source}: .* over the limit of 100 bytes"):
        _prepare(sandbox, source, endpoint=s3_endpoint, limits=fast_limits(max_download_bytes=100))
