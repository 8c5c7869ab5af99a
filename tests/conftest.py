"""Shared test set-up: offline, loopback-only networking, a shared model cache for the tiny fixtures."""

from __future__ import annotations

import inspect
import os
import socket
from pathlib import Path

import pytest

from tests.helpers import frozen_snapshot, make_concept_images, prepared_dataset, tiny_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}
_real_connect = socket.socket.connect


def _loopback_only_connect(self, address):
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and host not in _LOOPBACK and self.family in (socket.AF_INET, socket.AF_INET6):
        raise ConnectionRefusedError(f"tests may only connect to 127.0.0.1, not {host!r}")
    return _real_connect(self, address)


socket.socket.connect = _loopback_only_connect

#: Fixtures of the slow tier: a test that builds or loads the tiny models (they all come through the model cache)
#: is an end-to-end test, left out by `scripts/test.sh --fast`. So is one that asks for a fixture by name at run time
#: (the trained runs, parametrised by name).
SLOW_FIXTURES = frozenset({"model_cache"})


def pytest_collection_modifyitems(items):
    for item in items:
        function = getattr(item, "function", None)
        dynamic = function is not None and "getfixturevalue" in inspect.getsource(function)
        if dynamic or SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def s3_endpoint():
    """moto's standalone S3-compatible server on 127.0.0.1, reached through boto3 like any S3 store."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory) -> Path:
    """Model cache shared by the whole session: tiny fixtures are built once.

    ``TRAINER_TEST_MODEL_CACHE`` keeps them across sessions (CI sets nothing and builds them, in seconds).
    """
    configured = os.environ.get("TRAINER_TEST_MODEL_CACHE")
    path = Path(configured) if configured else tmp_path_factory.mktemp("model-cache")
    os.environ["TRAINER_MODEL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def trained_sdxl(tmp_path_factory, model_cache):
    root = tmp_path_factory.mktemp("sdxl-run")
    images = make_concept_images(root / "images", n=4)
    config = tiny_config(
        images, root / "runs", max_train_steps=16, checkpointing_steps=8, checkpoint_rule="every", max_checkpoints=1,
        n_sample_imgs=2,
        text_encoder_lora_optimizer="adamw", text_encoder_lora_lr=1e-3, txt_encoders_lr_warmup_steps=0,
        lora_alpha_multiplier=2.0, unet_lr=2e-3, ti_lr=1e-2, save_dtype="fp32", freeze_ti_after_completion_f=0.5,
        token_attention_loss_w=1e-3, tok_cov_reg_w=1e-4, cond_reg_w=1e-4, tok_cond_reg_w=1e-4,
    )
    from trainer.training import loop
    from trainer.training import step as training_step
    from trainer.training.session import setup

    session, _ = setup(config, dataset=prepared_dataset(images, root / "prepared"))
    before = frozen_snapshot(session)
    initial_rows = session.tokens.rows()
    pivot_rows = {}

    original = training_step.optimizer_step

    def spy(session_, phase):
        original(session_, phase)
        if not phase.ti and not pivot_rows:
            pivot_rows.update(session_.tokens.rows())

    training_step.optimizer_step = spy
    try:
        result = loop.run(session)
    finally:
        training_step.optimizer_step = original
    return {"session": session, "result": result, "before": before, "initial_rows": initial_rows,
            "pivot_rows": pivot_rows}




@pytest.fixture(scope="session")
def trained_sd15(tmp_path_factory, model_cache):
    """SD1.5 with tokens and a UNet LoRA, the LoRA exported in the default fp16."""
    from trainer.training import loop
    from trainer.training.session import setup

    root = tmp_path_factory.mktemp("sd15-run")
    images = make_concept_images(root / "images", n=4)
    config = tiny_config(images, root / "runs", model="tiny-sd15", max_train_steps=10, unet_lr=2e-3, ti_lr=1e-2,
                         concept_mode="style")
    session, _ = setup(config, dataset=prepared_dataset(images, root / "prepared"))
    result = loop.run(session)
    return {"session": session, "result": result}
