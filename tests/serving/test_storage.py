"""What jobs leave on disk and in S3: stopped uploads, discarded jobs, the LoRA download cache, pruning."""

from __future__ import annotations

import io
import json
import uuid
import zipfile

import pytest

from trainer.inference import remote
from trainer.inference.remote import BundleStore
from trainer.serving.cog_client import FileServer
from trainer.serving.train_job import TrainingJob, TrainingRequest
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS
from trainer.utils.s3 import S3Uri, UploadCancelled, check_bucket, s3_client, upload_file


@pytest.fixture
def bucket(s3):
    name = f"store-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture
def client(s3, s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    return s3_client()


def test_a_stopped_upload_leaves_no_object(client, bucket, tmp_path):
    big = tmp_path / "big.zip"
    big.write_bytes(b"\0" * (20 << 20))  # above the multipart threshold: parts, then an aborted upload
    calls = []

    def stop_after_some_bytes() -> bool:
        calls.append(1)
        return len(calls) > 3

    with pytest.raises(UploadCancelled):
        upload_file(client, big, S3Uri(bucket, "loras/big.zip"), should_stop=stop_after_some_bytes)
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert not client.list_multipart_uploads(Bucket=bucket).get("Uploads")

    small = tmp_path / "small.zip"
    small.write_bytes(b"PK")
    upload_file(client, small, S3Uri(bucket, "loras/small.zip"), should_stop=lambda: False)
    assert client.get_object(Bucket=bucket, Key="loras/small.zip")["Body"].read() == b"PK"


def test_bucket_checks_name_the_problem(client):
    with pytest.raises(ValueError, match="output_uri s3://missing-bucket-123: not found"):
        check_bucket(client, S3Uri("missing-bucket-123", ""), "output_uri")


def test_a_discarded_job_removes_its_zip_and_its_upload(client, bucket, tmp_path):
    job = TrainingJob(TrainingRequest(config=None, allow_local_sources=False), root=tmp_path)
    job.job_dir.mkdir(parents=True)
    job.output_dir.mkdir(parents=True)
    job.zip_path = job.output_dir / "x.zip"
    job.zip_path.write_bytes(b"PK")
    client.put_object(Bucket=bucket, Key="loras/x.zip", Body=b"PK")
    job.uploaded, job._client = S3Uri(bucket, "loras/x.zip"), client

    job.discard()
    job.discard()  # idempotent
    assert not job.job_dir.exists() and not job.output_dir.exists()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_new_job_prunes_stale_runs_and_old_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TRAINER_KEEP_OUTPUTS", "2")
    for name in ("a", "b", "c"):
        (tmp_path / "outputs" / f"2026-{name}").mkdir(parents=True)
    (tmp_path / "jobs" / "2026-crashed" / "run").mkdir(parents=True)
    TrainingJob(TrainingRequest(config=None, allow_local_sources=False), root=tmp_path)._prune()
    # This job's zip will be the second kept one.
    assert sorted(p.name for p in (tmp_path / "outputs").iterdir()) == ["2026-c"]
    assert list((tmp_path / "jobs").iterdir()) == []


def _bundle_zip(name: str) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(f"{name}_lora.safetensors", b"weights")
        archive.writestr("special_params.json", json.dumps({"TOK": "<s0>"}))
        archive.writestr("training_args.json", json.dumps({"sd_model_version": "sdxl", "ckpt_path": "tiny-sdxl"}))
    return buffer.getvalue()


def test_the_lora_cache_keeps_the_most_recent_urls(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    for name in ("a", "b", "c"):
        (served / f"{name}.zip").write_bytes(_bundle_zip(name))
    downloads = []
    real = remote.download
    monkeypatch.setattr(remote, "download", lambda url, target, **kw: downloads.append(url[-5:]) or
                        real(url, target, **kw))
    store = BundleStore(tmp_path / "cache", max_entries=2)
    with FileServer(served) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        first = store.get(server.url("a.zip"), allow_local=False)
        assert first.lora.name == "a_lora.safetensors" and first.token_string == "<s0>"
        assert store.get(server.url("a.zip"), allow_local=False) is first
        store.get(server.url("b.zip"), allow_local=False)
        store.get(server.url("c.zip"), allow_local=False)  # evicts a.zip, the least recently used
        store.get(server.url("c.zip"), allow_local=False)
        store.get(server.url("a.zip"), allow_local=False)
    assert downloads == ["a.zip", "b.zip", "c.zip", "a.zip"]
    assert len(list((tmp_path / "cache" / "urls").iterdir())) == 2

