"""Fixtures of the cog container tests: the real cog server, a local file server, a webhook receiver, real S3."""

from __future__ import annotations

import json
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import predict
from tests.conftest import REPO_ROOT
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS

SAMPLE_IMAGES = REPO_ROOT / "assets" / "sample_images"
AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIATESTKEY000000002",
    "AWS_SECRET_ACCESS_KEY": "serving-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
#: Training settings that keep a job on the tiny model to a few seconds on a CPU.
TINY_TRAINING_ARGS = {
    "ckpt_path": "tiny-sdxl", "device": "cpu", "weight_type": "fp32", "augment_imgs_up_to_n": 0,
    "validation_num_inference_steps": 2, "logging_steps": 1, "validation_img_size": 64,
}


def tiny_inputs(images_url: str, **overrides) -> dict:
    """/trainings inputs for a short tiny-model job, with values sent as a client would (some as strings)."""
    inputs = {
        "name": "served", "lora_training_urls": images_url, "concept_mode": "object", "max_train_steps": "4",
        "resolution": 64, "train_batch_size": 2, "n_sample_imgs": 0, "caption_model": "no_caption", "seed": 3,
        "training_args": json.dumps(TINY_TRAINING_ARGS),
    }
    inputs.update(overrides)
    return inputs


def start_predictor(patch: pytest.MonkeyPatch, predict_dir: Path, weights: str | None = None,
                    **env: str) -> predict.Predictor:
    """``predict.Predictor`` set up as cog does, on the CPU, with the operator's ``env`` (``TRAINER_*`` names) set
    first; pytest keeps its own logging."""
    for name, value in {"TRAINER_DEVICE": "cpu", "TRAINER_PREDICT_DIR": str(predict_dir), **env}.items():
        patch.setenv(name, value)
    patch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=weights)
    return predictor


@pytest.fixture(scope="session")
def images_zip(tmp_path_factory) -> Path:
    """The repo's sample images (with their caption file) as one zip, as users upload them."""
    folder = tmp_path_factory.mktemp("served-files")
    target = folder / "sample_images.zip"
    with zipfile.ZipFile(target, "w") as archive:
        for path in sorted(SAMPLE_IMAGES.iterdir()):
            if path.suffix in (".jpg", ".txt"):
                archive.write(path, path.name)
    return target


@pytest.fixture(scope="session")
def file_server(images_zip):
    """http://127.0.0.1:<port>/ serving the folder of ``images_zip`` (tests drop more files there)."""
    from trainer.tooling.cog_client import FileServer

    with FileServer(images_zip.parent) as server:
        yield server


@pytest.fixture(scope="session")
def s3_server(s3_endpoint):
    """The shared moto S3 server (tests/conftest.py): the cog server's worker reaches it through boto3."""
    return s3_endpoint


@pytest.fixture
def s3(s3_server, monkeypatch):
    """A boto3 client of the test S3 server, with the test credentials in this process's environment."""
    import boto3

    for key, value in AWS_TEST_ENV.items():
        monkeypatch.setenv(key, value)
    return boto3.client("s3", endpoint_url=s3_server, region_name="us-east-1")


class WebhookReceiver:
    """Collects the JSON bodies cog POSTs to a webhook."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                receiver.events.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}/webhook"

    def wait_for(self, predicate, timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in list(self.events):
                if predicate(event):
                    return event
            time.sleep(0.05)
        statuses = [e.get("status") for e in self.events]
        raise AssertionError(f"no matching webhook within {timeout}s (received statuses: {statuses})")

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def webhooks():
    receiver = WebhookReceiver()
    yield receiver
    receiver.close()


def server_env(model_cache: Path, work_dir: Path, s3_endpoint: str, allow: str = "") -> dict[str, str]:
    """A server's environment; ``allow`` is the one loopback address and port it may fetch from (the file server)."""
    return {
        ENV_ALLOW_PRIVATE_HOSTS: allow,
        "TRAINER_MODEL_CACHE": str(model_cache),
        "TRAINER_WORK_DIR": str(work_dir),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # The offline predictor's safety checker, named as the tiny base model is (it flags nothing).
        "TRAINER_SAFETY_CHECKER": "tiny-safety-checker",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        **AWS_TEST_ENV,
    }


@pytest.fixture(scope="module")
def train_server(tmp_path_factory, model_cache, s3_server, file_server):
    """The real cog server in train mode (``train.py:train``), started like a cog image starts it."""
    from trainer.tooling.cog_client import CogServer

    root = tmp_path_factory.mktemp("train-server")
    work = root / "work"
    server = CogServer.start(mode="train", ref="train.py:train", cwd=REPO_ROOT,
                             env=server_env(model_cache, work, s3_server, allow=file_server.address),
                             log_path=root / "server.log")
    server.work_dir = work
    yield server
    server.stop()
