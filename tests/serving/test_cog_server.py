"""End to end through the real cog HTTP server (``python -m cog.server.http``), as a cog image serves the API.

Train mode: sync training from images served over http, bad inputs, async training with webhooks and a cancel, S3
input and upload against a real S3-compatible server. Predict mode: ``COG_WEIGHTS`` set to a trained zip's URL, and
cog-sdxl's inputs (img2img, inpainting, refiner, safety checker) with their bad-input messages.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import shutil
import struct
import subprocess
import uuid
import zipfile
import zlib

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.serving.conftest import server_env, tiny_inputs
from trainer.tooling.cog_client import CogServer, decode_data_url

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
        ({"resolution": 32}, "resolution must be in [64, 2048], got 32"),
        ({"max_train_steps": "many"}, "max_train_steps: Input should be a valid integer"),
        ({"lora_training_urls": "/etc/passwd"}, "'/etc/passwd' is a local path, which this server does not read"),
        ({"lora_training_urls": "ftp://example.com/x.zip"}, "unsupported scheme 'ftp://'"),
        ({"output_uri": "https://example.com/x"}, "output_uri must start with s3://"),
        ({"output_uri": "s3://no-such-bucket-xyz/loras/"}, "output_uri s3://no-such-bucket-xyz: not found"),
        ({"training_args": json.dumps({"resume_from": "/tmp/run"})}, "resume_from may not be set by a request"),
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
    env = {**server_env(model_cache, tmp_path / "work", s3_server, allow=file_server.address),
           "COG_WEIGHTS": file_server.url("served.zip")}
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


def _png_data_uri(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _bomb_png_data_uri(width: int, height: int) -> str:
    """A PNG whose header declares ``width`` × ``height`` grey pixels over a few bytes of data: a decompression bomb
    (the image is refused from its header, before any decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")
    return "data:image/png;base64," + base64.b64encode(png).decode()


def test_prediction_server_with_cog_sdxl_inputs(trained, file_server, trained_sd15, model_cache, s3_server,
                                                tmp_path):
    """cog-sdxl's inputs through the real server: img2img and inpainting from data URIs (how cog clients send an
    uploaded file), the refiner, bad inputs with their messages, and a safety checker (tiny, built from config)
    forced to flag: black images, reported in the response's metrics."""
    import numpy as np

    from tests.utils.conftest import ScriptedServer  # here: a module-level import would bring its autouse fixture
    from trainer.models.tiny import build_tiny_safety_checker

    build_tiny_safety_checker(tmp_path / "flagging-checker", flag_everything=True)
    (file_server.folder / "sd15.zip").write_bytes(trained_sd15["result"].zip_path.read_bytes())
    env = {**server_env(model_cache, tmp_path / "work", s3_server, allow=file_server.address),
           "COG_WEIGHTS": file_server.url("served.zip"), "TRAINER_SAFETY_CHECKER": str(tmp_path / "flagging-checker"),
           "TRAINER_SDXL_REFINER": "tiny-sdxl-refiner"}
    start = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8))
    mask = Image.new("L", (96, 64), 0)
    mask.paste(255, (24, 16, 72, 48))
    colour_mask = Image.new("RGB", (96, 64), (255, 0, 0))
    base = {"prompt": "a photo of TOK", "num_inference_steps": 2, "seed": 5, "output_format": "png",
            "disable_safety_checker": True}

    def outputs(result) -> list[Image.Image]:
        assert result["status"] == "succeeded", result.get("error")
        return [Image.open(io.BytesIO(decode_data_url(url))).convert("RGB") for url in result["output"]]

    # An internal service on another loopback port: the server's allowance names the file server only.
    with contextlib.closing(ScriptedServer()) as internal, CogServer.start(
            mode="predict", ref="predict.py:Predictor", cwd=REPO_ROOT, env=env,
            log_path=tmp_path / "server.log") as server:
        img2img = server.predict({**base, "image": _png_data_uri(start), "prompt_strength": 0.9})
        assert [im.size for im in outputs(img2img)] == [(96, 64)]
        assert img2img["metrics"]["nsfw_outputs"] == [] and img2img["metrics"]["total_inference_steps"] == 1

        inpainted = server.predict({**base, "image": _png_data_uri(start), "mask": _png_data_uri(mask),
                                    "prompt_strength": 1.0})
        result = np.asarray(outputs(inpainted)[0], dtype=np.float32)
        keep = np.asarray(mask) == 0
        difference = np.abs(result - np.asarray(start, dtype=np.float32))
        assert difference[keep].max() <= 1.0 and difference[~keep].mean() > 10.0

        refined = server.predict({**base, "width": 64, "height": 64, "refine": "expert_ensemble_refiner",
                                  "num_inference_steps": 4, "high_noise_frac": 0.5})
        assert [im.size for im in outputs(refined)] == [(64, 64)]
        assert refined["metrics"]["total_inference_steps"] == 4

        flagged = server.predict({"prompt": "a photo of TOK", "width": 64, "height": 64, "num_outputs": 2,
                                  "num_inference_steps": 2, "output_format": "png"})
        assert [np.asarray(im).any() for im in outputs(flagged)] == [False, False], "black images, in place"
        assert flagged["metrics"]["nsfw_outputs"] == [0, 1]
        assert "output 1 of 2 was flagged by the safety checker" in flagged["logs"]

        bad_inputs = [
            ({"mask": _png_data_uri(mask)}, "mask: inpainting needs the image to repaint too; give image with the"),
            ({"image": _png_data_uri(start), "mask": _png_data_uri(colour_mask)},
             "mask: must be greyscale (white = repaint, black = keep), but it has colours"),
            ({"image": _png_data_uri(start), "mask": _png_data_uri(mask.resize((48, 32)))},
             "mask: 48×32 does not match the image's 96×64; give a mask of the same size"),
            ({"image": "data:image/png;base64,bm90IGFuIGltYWdl"}, "image: not an image in a supported format"),
            ({"image": "/etc/hostname"}, "image: local paths are not accepted here"),
            ({"refine": "expert_ensemble_refiner", "lora_url": file_server.url("sd15.zip")},
             "refine: expert_ensemble_refiner needs an SDXL base model, and this LoRA's is SD1.5"),
            ({"refine": "sharpen"}, "refine: Input should be 'no_refiner', 'expert_ensemble_refiner' or"),
            ({"image": internal.serve("/start.png", b"\x89PNG")},
             f"image: {internal.url('/start.png')}: 127.0.0.1 is a loopback address"),
            ({"image": _png_data_uri(start), "mask": internal.url("/start.png", host="2130706433")},
             "is a loopback address"),
            ({"image": _png_data_uri(start), "prompt_strength": 0.0}, "prompt_strength: 0 of"),
            ({"image": _bomb_png_data_uri(40_000, 40_000)}, "image: the image is over the limit of 120 MP"),
        ]
        for extra, message in bad_inputs:
            bad = server.predict({**base, **extra})
            assert bad["status"] == "failed", extra
            assert message in bad["error"] and "Traceback" not in bad["error"], bad["error"]
        assert internal.connections == 0 and internal.requests == [], "a refused image URL is never contacted"


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
    env = {**server_env(model_cache, tmp_path / "work", s3_server, allow=file_server.address),
           "COG_WEIGHTS": file_server.url(edens["tar"].name)}
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


def _prediction_section() -> str:
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    return text[text.index("### The prediction inputs (`predict.py`)"):text.index("## The command line")]


def test_the_readme_lists_every_prediction_input():
    import inspect

    import predict

    section = _prediction_section()
    for name in inspect.signature(predict.Predictor.run).parameters:
        if name != "self":
            assert f"`{name}`" in section, name


def test_the_readme_curl_examples_run(model_cache, s3_server, tmp_path):
    """The README's img2img and inpainting commands, as a user types them, against the real server."""
    import shutil

    if not (shutil.which("curl") and shutil.which("jq") and shutil.which("base64")):
        pytest.skip("the README's examples need curl, jq and base64")
    from trainer.tooling.cog_client import FileServer

    picture = Image.open(REPO_ROOT / "assets" / "sample_images" / "astronaut.jpg").convert("RGB").resize((96, 64))
    picture.save(tmp_path / "photo.png")
    picture.save(tmp_path / "start.jpg")
    mask = Image.new("L", (96, 64))
    mask.paste(255, (20, 10, 70, 50))
    mask.save(tmp_path / "mask.png")
    blocks = [block.split("```", 1)[0] for block in _prediction_section().split("```bash\n")[1:]]
    assert len(blocks) == 2 and '"image"' in blocks[0] and "--rawfile mask" in blocks[1]
    with FileServer(tmp_path) as files, CogServer.start(
            mode="predict", ref="predict.py:Predictor", cwd=REPO_ROOT, log_path=tmp_path / "server.log",
            env={**server_env(model_cache, tmp_path / "work", s3_server, allow=files.address),
                 "TRAINER_SDXL_MODEL": "tiny-sdxl"}) as server:
        for block in blocks:
            command = (block.replace("localhost:5001", server.base_url.removeprefix("http://"))
                       .replace("https://example.com/start.jpg", files.url("start.jpg")))
            result = subprocess.run(["bash", "-c", "set -euo pipefail\n" + command], cwd=tmp_path,
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(tmp_path / "out.png").size == (96, 64)
    assert Image.open(tmp_path / "inpainted.webp").size == (96, 64)
    assert json.loads((tmp_path / "response.json").read_text())["metrics"]["nsfw_outputs"] == []
