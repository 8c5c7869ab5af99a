"""One S3 module: the same ``s3://`` URIs fed to its three users (training sources, ``output_uri``, LoRA downloads)
are accepted or refused by the one URI rule, and their failures are told by the one error translator."""

from __future__ import annotations

import inspect
import re
import uuid

import pytest

import train as train_module
from trainer.data.errors import SourceError
from trainer.data.ingest.sources import parse_source
from trainer.inference.remote import BundleStore
from trainer.serving.train_job import parse_training_request
from trainer.utils.s3 import S3Uri

SOURCE = "https://example.com/photos.zip"

#: URIs every user refuses, and the rule's words in each refusal.
REFUSED = {
    "s3://Bad_Bucket/x.zip": "'Bad_Bucket' is not a valid bucket name",
    "s3://ab/x.zip": "'ab' is not a valid bucket name",
    "s3://my..bucket/x.zip": "'my..bucket' is not a valid bucket name",
    "s3://key:hunter2@bucket/x.zip": "credentials or ports do not belong in s3:// URIs",
    "s3://bucket:9000/x.zip": "credentials or ports do not belong in s3:// URIs",
    "s3://bucket/a/../x.zip": "the key 'a/../x.zip' has empty, '.' or '..' segments",
    "s3://bucket//x.zip": "the key '/x.zip' has empty, '.' or '..' segments",
}


def _training_source(uri: str) -> None:
    parse_source(uri)


def _output_uri(uri: str):
    values = {name: p.default for name, p in inspect.signature(train_module.train).parameters.items()}
    values.update(lora_training_urls=SOURCE, concept_mode="object", output_uri=uri)
    return parse_training_request(values, train_module.DEFAULTS)


def _lora_download(uri: str, root) -> None:
    BundleStore(root).get(uri, allow_local=False)


@pytest.mark.parametrize(("uri", "rule"), REFUSED.items())
def test_every_s3_user_refuses_a_bad_uri_by_the_one_rule(uri, rule, tmp_path, model_cache):
    with pytest.raises(ValueError) as parsed:
        S3Uri.parse(uri)
    assert rule in str(parsed.value)
    with pytest.raises(SourceError, match=re.escape(rule)) as source:
        _training_source(uri)
    with pytest.raises(ValueError, match=re.escape(rule)) as output:
        _output_uri(uri)
    with pytest.raises(ValueError, match=re.escape(rule)) as lora:
        _lora_download(uri, tmp_path / "loras")
    for error in (source, output, lora):
        assert "hunter2" not in str(error.value)
    assert not list((tmp_path / "loras").rglob("*.zip"))


def test_a_good_uri_passes_every_user_and_failures_read_alike(s3, s3_server, monkeypatch, tmp_path, model_cache):
    bucket = f"shared-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    uri = f"s3://{bucket}/loras/x.zip"

    assert parse_source(uri).kind == "s3"
    assert _output_uri(uri).destination == S3Uri(bucket, "loras/x.zip")
    # The object is not there: the LoRA download fails with the translator's words, not botocore's.
    with pytest.raises(ValueError, match=rf"{re.escape(uri)}: not found \(check the bucket name, the key"):
        _lora_download(uri, tmp_path / "loras")
    # A missing bucket reads the same for output_uri (checked at request time).
    with pytest.raises(ValueError, match=r"output_uri s3://missing-[0-9a-f]+: not found \(check the bucket name"):
        _output_uri(f"s3://missing-{uuid.uuid4().hex[:8]}/loras/")
