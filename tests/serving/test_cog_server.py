"""End to end through the real cog HTTP server (``python -m cog.server.http``), as a cog image serves the API.

Train mode: sync training from images served over http, bad inputs, async training with webhooks and a cancel, S3
input and upload against a real S3-compatible server. Predict mode: ``COG_WEIGHTS`` set to a trained zip's URL.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import uuid
import zipfile

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.serving.conftest import server_env, tiny_inputs
from trainer.serving.cog_client import CogServer, decode_data_url

pytestmark = pytest.mark.slow

#: The zip layout the README documents (``<name>`` is the run name).
DOCUMENTED = {"{name}_lora.safetensors", "{name}_embeddings.safetensors", "special_params.json", "training_args.json",
              "README.md", "loss.csv", "loss.png"}


def _zip_members(data: bytes) -> list[str]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return archive.namelist()


def _leftover_files(work_dir):
    """Every file under the server's work folder (runs, zips)."""
    return sorted(str(p.relative_to(work_dir)) for p in work_dir.rglob("*") if p.is_file()) if work_dir.exists() else []


@pytest.fixture(scope="module")
def trained(train_server, file_server, images_zip):
    """One synchronous training through the server; its zip is saved beside the served images."""
    inputs = tiny_inputs(file_server.url(images_zip.name), n_sample_imgs="1")
    job = train_server.train(inputs, job_id=f"sync-{uuid.uuid4().hex[:6]}")
    assert job["status"] == "succeeded", job.get("error") or job.get("logs", "")[-3000:]
    data = decode_data_url(job["output"]["weights"])
    (images_zip.parent / "served.zip").write_bytes(data)
    return {"job": job, "zip": data}


def test_training_returns_the_documented_zip_and_reports_progress(trained, train_server):
    job, data = trained["job"], trained["zip"]
    assert job["output"]["weights"].startswith("data:application/zip;base64,")
    members = _zip_members(data)
    assert {entry.format(name="served") for entry in DOCUMENTED} <= set(members)
    assert any(m.startswith("samples/") and m.endswith(".jpg") for m in members)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        args = json.loads(archive.read("training_args.json"))
        special = json.loads(archive.read("special_params.json"))
    # Values sent as strings arrive as the config's types; training_args reached the config.
    assert args["max_train_steps"] == 4 and args["ckpt_path"] == "tiny-sdxl" and args["seed"] == 3
    assert special == {"TOK": "<s0><s1><s2>"}
    # Progress in the job's log: percent, step rate and time left.
    assert "step 4/4 (100%)" in job["logs"] and "steps/s" in job["logs"] and "left" in job["logs"]
    # Only the delivered zip stays on the server: the run folder (checkpoints, dataset) is gone.
    leftovers = _leftover_files(train_server.work_dir)
    assert [f for f in leftovers if f.startswith("jobs/")] == []
    assert [f.rsplit("/", 1)[-1] for f in leftovers] == ["served.zip"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"concept_mode": "faces"}, "concept_mode: Input should be 'face', 'style' or 'object'"),
        ({"training_args": "{unet_lr: 1}"}, "training_args is not valid JSON"),
        ({"training_args": json.dumps({"unet_lrr": 1})}, "unknown key 'unet_lrr' (did you mean 'unet_lr'?)"),
        ({"resolution": 32}, "resolution must be at least 64"),
        ({"max_train_steps": "many"}, "max_train_steps: Input should be a valid integer"),
        ({"lora_training_urls": "/etc/passwd"}, "'/etc/passwd' is a local path, which this server does not read"),
        ({"lora_training_urls": "ftp://example.com/x.zip"}, "unsupported scheme 'ftp://'"),
        ({"output_uri": "https://example.com/x"}, "output_uri must start with s3://"),
        ({"output_uri": "s3://no-such-bucket-xyz/loras/"}, "output_uri s3://no-such-bucket-xyz: not found"),
        ({"training_args": json.dumps({"resume_from": "/tmp/run"})}, "training_args may not set resume_from"),
    ],
)
def test_bad_inputs_fail_with_a_clear_message(train_server, file_server, images_zip, overrides, message):
    job = train_server.train(tiny_inputs(file_server.url(images_zip.name), **overrides))
    assert job["status"] == "failed"
    assert message in job["error"], job["error"]
    assert "Traceback" not in job["error"]


def test_async_training_with_webhooks_and_cancel_leaves_nothing(train_server, file_server, images_zip, webhooks, s3):
    bucket = f"cancel-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    job_id = f"cancel-{uuid.uuid4().hex[:6]}"
    before = _leftover_files(train_server.work_dir)
    inputs = tiny_inputs(file_server.url(images_zip.name), max_train_steps=2000, output_uri=f"s3://{bucket}/loras/")
    accepted = train_server.train(inputs, job_id=job_id, webhook=webhooks.url, asynchronous=True,
                                  webhook_events=["start", "output", "logs", "completed"])
    assert accepted["status"] == "starting"
    assert train_server.health()["status"] == "BUSY"
    webhooks.wait_for(lambda e: "step 1/2000" in (e.get("logs") or ""))

    assert train_server.cancel("trainings", job_id) == 200
    final = webhooks.wait_for(lambda e: e.get("status") in ("canceled", "failed", "succeeded"), timeout=60)
    assert final["status"] == "canceled" and final["id"] == job_id
    assert final.get("output") is None
    train_server.wait_ready(30)
    assert _leftover_files(train_server.work_dir) == before, "the cancelled job left files behind"
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


def test_s3_sources_and_upload_to_output_uri(train_server, images_zip, s3):
    bucket = f"lora-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    with zipfile.ZipFile(images_zip) as archive:
        for name in archive.namelist():
            s3.put_object(Bucket=bucket, Key=f"training/{name}", Body=archive.read(name))
    job = train_server.train(tiny_inputs(f"s3://{bucket}/training/", name="from_s3",
                                         output_uri=f"s3://{bucket}/loras/"))
    assert job["status"] == "succeeded", job.get("error") or job["logs"][-3000:]
    returned = decode_data_url(job["output"]["weights"])
    uploaded = s3.get_object(Bucket=bucket, Key="loras/from_s3.zip")
    assert uploaded["Body"].read() == returned
    assert uploaded["ContentType"] == "application/zip"
    assert "from_s3_lora.safetensors" in _zip_members(returned)
    assert f"uploaded s3://{bucket}/loras/from_s3.zip" in job["logs"]


def test_uploaded_input_images(train_server, images_zip):
    """input_images as cog-sdxl takes them: a file upload (here a data URL), downloaded by the server."""
    upload = "data:application/zip;base64," + base64.b64encode(images_zip.read_bytes()).decode()
    job = train_server.train(tiny_inputs(None, input_images=upload, name="uploaded", max_train_steps=1))
    assert job["status"] == "succeeded", job.get("error") or job["logs"][-3000:]
    assert "prepared 5 training images" in job["logs"]
    assert "uploaded_lora.safetensors" in _zip_members(decode_data_url(job["output"]["weights"]))


def test_prediction_server_with_cog_weights_url(trained, file_server, trained_sdxl, model_cache, s3_server,
                                                tmp_path):
    """COG_WEIGHTS is the zip's URL; a request may name another LoRA (a `python -m trainer` zip) by URL."""
    other = trained_sdxl["result"].zip_path
    (file_server.folder / "other.zip").write_bytes(other.read_bytes())
    env = {**server_env(model_cache, tmp_path / "work", s3_server), "COG_WEIGHTS": file_server.url("served.zip")}
    with CogServer.start(mode="predict", ref="predict.py:Predictor", cwd=REPO_ROOT, env=env,
                         log_path=tmp_path / "server.log") as server:
        request = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 2,
                   "num_outputs": "2", "seed": 5, "output_format": "png"}
        result = server.predict(request)
        assert result["status"] == "succeeded", result.get("error")
        images = [Image.open(io.BytesIO(decode_data_url(url))) for url in result["output"]]
        assert [(im.format, im.size) for im in images] == [("PNG", (64, 64))] * 2

        switched = server.predict({**request, "lora_url": file_server.url("other.zip"), "num_outputs": 1})
        assert switched["status"] == "succeeded", switched.get("error")
        assert "activated" in switched["logs"]

        bad = server.predict({**request, "width": 65, "scheduler": "nope"})
        assert bad["status"] == "failed"
        assert "width: must be a multiple of 8" in bad["error"] and "scheduler: Input should be" in bad["error"]
    assert "ready with the LoRA from" in (tmp_path / "server.log").read_text()


def _shells() -> list[list[str]]:
    """How users start the script: Eden's README types `sh cog_test_train.sh` (dash on Debian), others bash or ./."""
    shells = [["sh"], ["bash"], []]
    if shutil.which("dash"):
        shells.append(["dash"])
    return shells


@pytest.mark.parametrize("shell", _shells(), ids=lambda s: " ".join(s) or "./")
def test_the_smoke_script_starts_under_every_shell(shell, tmp_path):
    """`sh cog_test_train.sh --help` must not stop at a bash-only line (dash refuses `set -o pipefail`)."""
    script = REPO_ROOT / "cog_test_train.sh"
    # Started from another folder: the script must find the repository by itself.
    result = subprocess.run([*shell, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "usage: cog_test_train.sh" in result.stdout and "--tiny" in result.stdout
    assert result.stderr == ""


def test_prediction_server_with_edens_tar_as_cog_weights(file_server, trained_sdxl, model_cache, s3_server, tmp_path):
    """COG_WEIGHTS is the URL of Eden's .tar; the images equal those of our zip of the same weights."""
    import numpy as np

    from tests.eden_reference import eden_outputs

    edens = eden_outputs(trained_sdxl["session"], tmp_path / "eden")
    (file_server.folder / edens["tar"].name).write_bytes(edens["tar"].read_bytes())
    (file_server.folder / "same-weights.zip").write_bytes(trained_sdxl["result"].zip_path.read_bytes())
    env = {**server_env(model_cache, tmp_path / "work", s3_server), "COG_WEIGHTS": file_server.url(edens["tar"].name)}
    with CogServer.start(mode="predict", ref="predict.py:Predictor", cwd=REPO_ROOT, env=env,
                         log_path=tmp_path / "server.log") as server:
        request = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5,
                   "output_format": "png"}
        pixels = []
        for extra in ({}, {"lora_url": file_server.url("same-weights.zip")}):
            result = server.predict({**request, **extra})
            assert result["status"] == "succeeded", result.get("error")
            image = Image.open(io.BytesIO(decode_data_url(result["output"][0])))
            pixels.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    np.testing.assert_allclose(pixels[0], pixels[1], atol=1.0)
    assert "ready with the LoRA from" in (tmp_path / "server.log").read_text()


def test_the_smoke_script_runs_the_main_job_offline(model_cache, tmp_path):
    """`sh cog_test_train.sh --tiny` (the README's main command, typed as Eden's README types it): train, then
    predict, through the real server."""
    out = tmp_path / "smoke"
    env = {**os.environ, "TRAINER_MODEL_CACHE": str(model_cache)}
    result = subprocess.run(["sh", str(REPO_ROOT / "cog_test_train.sh"), "--tiny", "--steps", "2", "--out", str(out)],
                            cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "POST /trainings" in result.stdout and "POST /predictions" in result.stdout
    assert f"everything is in {out}" in result.stdout
    assert (out / "lora" / "cog_test_lora.safetensors").is_file()
    assert (out / "lora" / "loss.png").is_file() and list((out / "lora" / "samples").glob("*_grid.jpg"))
    assert [Image.open(p).size for p in sorted((out / "predictions").iterdir())] == [(64, 64), (64, 64)]
