"""The trust boundary through the real cog server, tried as an attacker would.

The training server here is allowed (``TRAINER_ALLOW_PRIVATE_HOSTS``) to fetch from exactly two loopback ports: the
file server with the sample images and a relay that redirects, trickles or hangs. A third loopback server stands
for an internal service: no request may ever reach it, and each test checks that it saw no connection at all.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
import zipfile

import pytest

from tests.conftest import REPO_ROOT
from tests.serving.conftest import TINY_TRAINING_ARGS, server_env, tiny_inputs
from tests.utils.conftest import ScriptedServer
from trainer.tooling.cog_client import CogServer, decode_data_url

pytestmark = pytest.mark.slow

SECRET_QUERY = "X-Amz-Signature=TOPSECRETSIG&X-Amz-Credential=AKIAEXAMPLEKEY"
DEADLINE_S = 15


@pytest.fixture(scope="module")
def internal():
    server = ScriptedServer()
    server.serve("/secret.zip", b"PK\x05\x06" + bytes(18))
    server.serve("/model.safetensors", b"not a model")
    yield server
    server.close()


@pytest.fixture(scope="module")
def relay():
    server = ScriptedServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, model_cache, s3_server, file_server, relay):
    root = tmp_path_factory.mktemp("guarded-server")
    env = server_env(model_cache, root / "work", s3_server, allow=f"{file_server.address} 127.0.0.1:{relay.port}")
    env["TRAINER_DOWNLOAD_DEADLINE"] = str(DEADLINE_S)
    server = CogServer.start(mode="train", ref="train.py:train", cwd=REPO_ROOT, env=env, log_path=root / "server.log")
    server.work_dir = root / "work"
    yield server
    server.stop()


def _fails(server, inputs, *fragments) -> dict:
    job = server.train(inputs)
    assert job["status"] == "failed", job.get("logs", "")[-2000:]
    for fragment in fragments:
        assert fragment in job["error"], job["error"]
    assert "Traceback" not in job["error"]
    return job


# ----------------------------------------------------------------------------------------------------- SSRF
@pytest.mark.parametrize("host", ["127.1", "0x7f.1", "2130706433", "localhost", "[::ffff:127.0.0.1]"])
def test_sources_at_internal_addresses_are_refused_in_every_spelling(guarded, internal, images_zip, host):
    url = internal.url("/secret.zip", host=host)
    _fails(guarded, tiny_inputs(url), "is a loopback address", "TRAINER_ALLOW_PRIVATE_HOSTS")
    assert internal.connections == 0


def test_a_redirect_into_loopback_is_refused_at_that_hop(guarded, internal, relay):
    relay.redirect("/photos.zip", internal.url("/secret.zip"))
    _fails(guarded, tiny_inputs(relay.url("/photos.zip")), "/photos.zip", "is a loopback address")
    assert internal.connections == 0 and relay.requests[-1][0] == "/photos.zip"


def test_an_uploaded_file_given_as_a_url_goes_through_the_same_checks(guarded, internal):
    """input_images is a cog Path: cog would fetch its URL with a client of its own; this server never lets it."""
    _fails(guarded, tiny_inputs(None, input_images=internal.url("/secret.zip", host="127.1")), "loopback address")
    assert internal.connections == 0


def test_ckpt_path_at_an_internal_url_is_never_fetched(guarded, internal, file_server, images_zip, model_cache):
    args = {**TINY_TRAINING_ARGS, "ckpt_path": internal.url("/model.safetensors")}
    _fails(guarded, tiny_inputs(file_server.url(images_zip.name), training_args=json.dumps(args)),
           "model.safetensors", "is a loopback address")
    assert internal.connections == 0
    assert not list((model_cache / "downloads").rglob("model.safetensors*")), "the refused URL left a cache entry"


def test_the_s3_endpoint_cannot_be_chosen_by_a_request(guarded, internal):
    """The server's AWS credentials would sign requests to it: refused before any S3 call."""
    args = {**TINY_TRAINING_ARGS, "s3_endpoint_url": internal.url("")}
    _fails(guarded, tiny_inputs("s3://bucket/photos/", training_args=json.dumps(args)),
           "s3_endpoint_url may not be set by a request", "AWS credentials")
    assert internal.connections == 0


# ------------------------------------------------------------------------------------------- local files
@pytest.mark.parametrize("key", ["ckpt_path", "initial_embedding_file", "caption_model_path"])
def test_server_paths_get_one_answer_whatever_exists(guarded, file_server, images_zip, tmp_path, key):
    """No oracle: an existing file, an existing folder and a missing path are refused with the same message."""
    (tmp_path / "weights.safetensors").write_bytes(b"x")
    answers = set()
    for value in (str(tmp_path / "weights.safetensors"), str(tmp_path), str(tmp_path / "missing")):
        args = {**TINY_TRAINING_ARGS, key: value}
        job = _fails(guarded, tiny_inputs(file_server.url(images_zip.name), training_args=json.dumps(args)), key,
                     "TRAINER_ALLOW_LOCAL_SOURCES")
        answers.add(job["error"].replace(value, "<value>"))
    assert len(answers) == 1, answers


def test_training_images_on_the_server_are_refused(guarded):
    sample_images = str(REPO_ROOT / "assets" / "sample_images")
    _fails(guarded, tiny_inputs(sample_images), "is a local path, which this server does not read")
    _fails(guarded, tiny_inputs(None, input_images=sample_images + "/x.zip"), "input_images names a path on the server")


# ------------------------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize(("args", "message"), [
    ({"resolution": 99968}, "resolution must be in [64, 2048], got 99968"),
    ({"train_batch_size": 100000}, "train_batch_size must be in [1, 64]"),
    ({"lora_rank": 100000}, "lora_rank must be in [1, 256]"),
    ({"n_tokens": 1000}, "n_tokens must be in [1, 16]"),
    ({"max_train_steps": 1e9}, "max_train_steps must be in [1, 20000]"),
    ({"gradient_accumulation_steps": 1e9}, "gradient_accumulation_steps must be in [1, 64]"),
    ({"dataloader_num_workers": 1e5}, "dataloader_num_workers must be in [0, 32]"),
])
def test_numbers_past_the_bounds_fail_at_once_and_the_server_stays_usable(guarded, file_server, images_zip, args,
                                                                          message):
    """The values the issue sent through training_args (resolution=99968 poisoned the worker until restart)."""
    inputs = tiny_inputs(file_server.url(images_zip.name), training_args=json.dumps({**TINY_TRAINING_ARGS, **args}))
    for key in args:
        inputs.pop(key, None)  # set in training_args only
    started = time.monotonic()
    _fails(guarded, inputs, message)
    assert time.monotonic() - started < 60, "the refusal must come before any work"
    # coglet frees its slot just after it answers: under load the first health check can still say BUSY. A
    # poisoned slot (the case) never comes back, which wait_ready reports as an error.
    assert guarded.wait_ready(30)["status"] == "READY"


@pytest.mark.parametrize(("text", "message"), [
    ('{"validation_guidance_scale": Infinity}', "validation_guidance_scale must be a finite number"),
    ('{"training_attributes": ' + "[" * 100_000 + "]" * 100_000 + "}", "training_args is nested too deeply"),
])
def test_non_finite_and_deep_training_args_get_messages(guarded, file_server, images_zip, text, message):
    _fails(guarded, tiny_inputs(file_server.url(images_zip.name), training_args=text), message)


# ------------------------------------------------------------------------------- secrets, deadline, cancel
def test_credentials_and_signatures_never_reach_the_zip_the_logs_or_the_upload(guarded, file_server, images_zip, s3):
    bucket = f"secrets-{uuid.uuid4().hex[:8]}"
    s3.create_bucket(Bucket=bucket)
    url = file_server.url(images_zip.name).replace("http://", "http://alice:hunter2@") + "?" + SECRET_QUERY
    job = guarded.train(tiny_inputs(url, name="secrets", output_uri=f"s3://{bucket}/loras/"))
    assert job["status"] == "succeeded", job.get("error") or job["logs"][-3000:]
    data = decode_data_url(job["output"]["weights"])
    uploaded = s3.get_object(Bucket=bucket, Key="loras/secrets.zip")["Body"].read()
    assert uploaded == data
    # (cog echoes the caller's own input back in the job: that field is the caller's, not a leak.)
    texts = [job["logs"], json.dumps(job.get("output"))]
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        texts += [archive.read(name).decode("utf-8", "replace") for name in archive.namelist()]
        args = json.loads(archive.read("training_args.json"))
    for secret in ("TOPSECRETSIG", "AKIAEXAMPLEKEY", "hunter2", "alice"):
        assert not any(secret in text for text in texts), secret
    assert args["lora_training_urls"].endswith(f"/{images_zip.name}?…")


def test_a_slowloris_source_meets_the_deadline(guarded, relay):
    stop = threading.Event()

    def trickle(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "10000000")
        handler.end_headers()
        while not stop.wait(0.5):
            handler.wfile.write(b"x")
            handler.wfile.flush()

    relay.routes["/slow.zip"] = trickle
    try:
        _fails(guarded, tiny_inputs(relay.url("/slow.zip")), "/slow.zip",
               f"took longer than the limit of {DEADLINE_S}s")
    finally:
        stop.set()


def test_a_cancel_during_a_hung_download_ends_the_job_within_seconds(guarded, relay, webhooks):
    release = threading.Event()

    def hung(handler):
        handler.send_response(200)
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        release.wait(120)

    relay.routes["/hung.zip"] = hung
    job_id = f"hung-{uuid.uuid4().hex[:6]}"
    try:
        guarded.train(tiny_inputs(relay.url("/hung.zip")), job_id=job_id, webhook=webhooks.url, asynchronous=True,
                      webhook_events=["start", "logs", "completed"])
        # The relay seeing the request is the moment the download hangs (log webhooks can arrive seconds later).
        deadline = time.monotonic() + 120
        while not any(path == "/hung.zip" for path, _ in relay.requests) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        started = time.monotonic()
        assert guarded.cancel("trainings", job_id) == 200, [(e.get("status"), e.get("error")) for e in webhooks.events]
        final = webhooks.wait_for(lambda e: e.get("status") in ("canceled", "failed", "succeeded"), timeout=60)
        waited = time.monotonic() - started
    finally:
        release.set()
    assert final["status"] == "canceled", final.get("error")
    assert waited < DEADLINE_S - 5, f"the cancellation took {waited:.0f}s"
    guarded.wait_ready(30)


# --------------------------------------------------------------------------------------------- predictor
def test_the_predictor_fetches_no_internal_url_and_no_lora_chooses_its_base_model(file_server, trained_sdxl, internal,
                                                                                  model_cache, s3_server, tmp_path):
    """Through the real prediction server: lora_url at an internal address, and a LoRA zip whose training_args.json
    names an internal URL or a server path as its base model. None is fetched or read."""
    with zipfile.ZipFile(trained_sdxl["result"].zip_path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    args = json.loads(members["training_args.json"])
    for name, base in (("internal-base.zip", internal.url("/model.safetensors", host="0x7f.1")),
                       ("local-base.zip", str(REPO_ROOT))):
        with zipfile.ZipFile(file_server.folder / name, "w") as archive:
            for member, data in members.items():
                archive.writestr(member, json.dumps({**args, "ckpt_path": base}) if member == "training_args.json"
                                 else data)
    (file_server.folder / "good.zip").write_bytes(trained_sdxl["result"].zip_path.read_bytes())
    env = {**server_env(model_cache, tmp_path / "work", s3_server, allow=file_server.address),
           "COG_WEIGHTS": file_server.url("good.zip")}
    request = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 5}
    with CogServer.start(mode="predict", ref="predict.py:Predictor", cwd=REPO_ROOT, env=env,
                         log_path=tmp_path / "server.log") as server:
        for lora_url, message in ((internal.url("/secret.zip", host="127.1"), "is a loopback address"),
                                  (file_server.url("internal-base.zip"), "is a loopback address"),
                                  (file_server.url("local-base.zip"), "local paths are not accepted here")):
            result = server.predict({**request, "lora_url": lora_url})
            assert result["status"] == "failed" and message in result["error"], result.get("error")
        assert server.predict(request)["status"] == "succeeded", "the server stays usable"
    assert internal.connections == 0
