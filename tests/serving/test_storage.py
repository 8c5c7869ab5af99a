"""What jobs leave on disk and in S3: stopped uploads, discarded jobs, the LoRA download cache, pruning."""

from __future__ import annotations

import io
import json
import uuid
import zipfile

import pytest

from trainer.inference import remote
from trainer.inference.remote import BundleStore
from trainer.serving.train_job import TrainingJob, TrainingRequest
from trainer.tooling.cog_client import FileServer
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



def test_a_cancel_that_lands_after_the_put_completed_still_removes_the_object(client, bucket, tmp_path, monkeypatch,
                                                                             s3_server):
    """The issue's race: the upload's bytes reached S3, then the cancellation arrived. The key is recorded before the
    upload starts, so the clean-up deletes what landed."""
    from trainer.serving import train_job
    from trainer.training.errors import TrainingCancelled
    from trainer.utils import s3 as s3_module

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_server)
    job = TrainingJob(TrainingRequest(config=type("C", (), {"s3_endpoint_url": None})(), allow_local_sources=False,
                                      destination=S3Uri(bucket, "loras/")), root=tmp_path)
    job.output_dir.mkdir(parents=True)
    job.zip_path = job.output_dir / "late.zip"
    job.zip_path.write_bytes(b"PK" * 1000)
    real_upload = s3_module.upload_file

    def upload_then_cancel(client_, path, uri, should_stop=None, **kwargs):
        real_upload(client_, path, uri, should_stop=None, **kwargs)  # the PUT completes on the server...
        job.stop.set()
        raise UploadCancelled("cancelled while the PUT completed")  # ...and the cancellation is seen just after

    monkeypatch.setattr(train_job, "upload_file", upload_then_cancel)
    with pytest.raises(TrainingCancelled):
        job._upload()
    assert client.get_object(Bucket=bucket, Key="loras/late.zip")["Body"].read().startswith(b"PK")
    job.discard()
    assert client.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_a_write_protected_bucket_says_access_denied_and_names_it(client, tmp_path):
    """boto3's transfer manager wraps the refusal in S3UploadFailedError; the message still says what happened."""
    from botocore.stub import Stubber

    path = tmp_path / "x.zip"
    path.write_bytes(b"PK")
    with Stubber(client) as stubber:
        stubber.add_client_error("put_object", service_error_code="AccessDenied", service_message="Access Denied",
                                 http_status_code=403)
        with pytest.raises(ValueError) as caught:
            upload_file(client, path, S3Uri("locked-bucket", "loras/x.zip"))
    message = str(caught.value)
    assert "upload to s3://locked-bucket/loras/x.zip: access denied" in message
    assert "may read or write bucket locked-bucket" in message


def test_refused_and_broken_lora_downloads_leave_nothing_in_the_cache(tmp_path, monkeypatch):
    served = tmp_path / "served"
    served.mkdir()
    (served / "ok.zip").write_bytes(_bundle_zip("ok"))
    (served / "list.zip").write_bytes(_zip_with({"training_args.json": "[1, 2]", "special_params.json": "{}",
                                                 "x_lora.safetensors": "w"}))
    (served / "truncated.zip").write_bytes(_bundle_zip("t")[:-40])
    store = BundleStore(tmp_path / "cache", max_entries=4)
    with FileServer(served) as server:
        monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, server.address)
        with pytest.raises(ValueError, match=r"training_args.json must hold a JSON object, got a JSON list"):
            store.get(server.url("list.zip"), allow_local=False)
        with pytest.raises(ValueError, match=r"truncated.zip"):
            store.get(server.url("truncated.zip"), allow_local=False)
        monkeypatch.delenv(ENV_ALLOW_PRIVATE_HOSTS)
        with pytest.raises(ValueError, match=r"is a loopback address"):
            store.get(server.url("ok.zip"), allow_local=False)
    cache = tmp_path / "cache"
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) in ([], ["urls"])


def test_stale_partial_downloads_are_swept_at_start_up(tmp_path):
    import os

    from trainer.models.loading import sweep_downloads

    cache = tmp_path / "cache"
    (cache / "urls" / "abc").mkdir(parents=True)
    (cache / "urls" / "abc" / ".partial-weights.zip.x1").write_bytes(b"half")  # killed mid-download
    (cache / "urls" / "def" / ".partial-weights-1234.abc").mkdir(parents=True)  # killed mid-unpack
    (cache / "urls" / "def" / "weights.zip").write_bytes(_bundle_zip("d"))
    BundleStore(cache)
    assert sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) == ["urls", "urls/def", "urls/def/weights.zip"]

    models = tmp_path / "models"
    old = models / "downloads" / "1234" / ".partial-model.safetensors.x"
    fresh = models / "downloads" / "5678" / ".partial-other.safetensors.y"
    for path in (old, fresh):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    os.utime(old, (1, 1))  # untouched for decades: its writer is gone; the fresh one may still be written
    sweep_downloads(models)
    assert not old.exists() and fresh.exists()


def _zip_with(files: dict[str, str]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return buffer.getvalue()


def test_the_predictor_sweeps_stale_partial_downloads_when_it_starts(model_cache, tmp_path, monkeypatch):
    """Wiring: a predictor set-up (as after a crash) clears what a killed download left in the model cache."""
    import os

    from trainer.inference.service import PredictionService

    stale = model_cache / "downloads" / "feedface" / ".partial-model.safetensors.x"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half a checkpoint")
    os.utime(stale, (1, 1))
    monkeypatch.setenv("TRAINER_SDXL_MODEL", "tiny-sdxl")
    monkeypatch.setenv("TRAINER_SAFETY_CHECKER", "tiny-safety-checker")
    PredictionService.start(None, device="cpu", root=tmp_path)
    assert not stale.exists()
