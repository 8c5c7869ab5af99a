"""train.py's inputs: mapping onto the config, validation before any heavy work, defaults that cannot drift."""

from __future__ import annotations

import inspect
import json

import pytest

import train as train_module
from trainer.config import TrainingConfig
from trainer.serving import train_job
from trainer.serving.common import ENV_ALLOW_LOCAL, ENV_WORK_DIR, declared_defaults, unwrap_inputs
from trainer.serving.train_job import format_duration, object_key, parse_training_request, progress_line
from trainer.utils.s3 import S3Uri

URL = "https://example.com/photos.zip"


def _direct_call_inputs(**given) -> dict:
    """What train()'s locals() hold when a test calls it with only ``given``: FieldInfo objects for the rest."""
    values = {name: p.default for name, p in inspect.signature(train_module.train).parameters.items()}
    values.update(given)
    return values


def _request(**given):
    return parse_training_request(_direct_call_inputs(**given), train_module.DEFAULTS)


@pytest.fixture(autouse=True)
def _remote_server(monkeypatch, model_cache):
    monkeypatch.delenv(ENV_ALLOW_LOCAL, raising=False)


def test_input_defaults_are_the_config_defaults():
    """An input left alone trains exactly as the config's default would (cog and the CLI agree)."""
    fields = TrainingConfig.model_fields
    shared = [name for name in train_module.DEFAULTS if name in fields]
    assert len(shared) >= 20
    for name in shared:
        default = fields[name].default
        if name == "lora_training_urls":
            continue  # required in the config; the API reports it missing itself
        if name == "name":
            assert train_module.DEFAULTS[name] is None
            continue
        assert train_module.DEFAULTS[name] == default, name
    assert set(train_module.DEFAULTS) - set(fields) == set(train_job.SERVICE_INPUTS)


def test_eden_inputs_are_all_there():
    eden = {"name", "lora_training_urls", "concept_mode", "sd_model_version", "max_train_steps", "checkpointing_steps",
            "resolution", "unet_lr", "ti_lr", "lora_rank", "n_tokens", "train_batch_size", "n_sample_imgs",
            "validation_img_size", "sample_imgs_lora_scale", "seed", "caption_model", "caption_prefix",
            "mask_target_prompts", "use_face_detection_instead", "training_args", "output_uri"}
    assert eden <= set(inspect.signature(train_module.train).parameters)


def test_direct_call_uses_the_declared_defaults():
    request = _request(lora_training_urls=URL, concept_mode="face")
    config = request.config
    assert config.concept_mode == "face" and config.max_train_steps == 300 and config.caption_model == "florence"
    assert config.name == "photos.zip" and config.sd_model_version is None  # Eden: the name comes from the URL
    assert request.destination is None and request.allow_local_sources is False
    assert unwrap_inputs({"x": inspect.signature(train_module.train).parameters["lora_rank"].default}) == {"x": 16}


def test_values_sent_as_text_become_the_config_types():
    config = _request(lora_training_urls=URL, concept_mode="style", max_train_steps="12", unet_lr="5e-4",
                      use_face_detection_instead="true", seed="7").config
    assert (config.max_train_steps, config.unet_lr, config.use_face_detection_instead, config.seed) == (12, 5e-4,
                                                                                                       True, 7)


def test_training_args_set_any_other_key_and_pasted_files_work():
    pasted = {"lora_alpha_multiplier": 2.0, "output_dir": "/somewhere/else", "start_time": 12.0,
              "lora_training_urls": URL, "concept_mode": "object", "max_train_steps": 50}
    config = _request(training_args=json.dumps(pasted)).config
    assert config.lora_alpha_multiplier == 2.0 and config.max_train_steps == 50 and config.concept_mode == "object"
    assert config.output_dir == "eden_lora_training_runs" and config.start_time == 0.0  # owned by the service


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"training_args": "{'unet_lr': 1}"}, r"training_args is not valid JSON \(Expecting property name"),
        ({"training_args": "[1, 2]"}, "training_args must be a JSON object"),
        ({"training_args": '{"lora_rnk": 4}'}, r"unknown key 'lora_rnk' \(did you mean 'lora_rank'\?\)"),
        ({"max_train_steps": 20, "training_args": '{"max_train_steps": 30}'},
         r"max_train_steps is set both as an input \(20\) and in training_args \(30\)"),
        ({"training_args": '{"output_uri": "s3://b/x"}'}, "output_uri is an input of its own"),
        ({"training_args": '{"model_cache_dir": "/"}'}, "training_args may not set model_cache_dir"),
        ({"lora_training_urls": None}, "no training images: give lora_training_urls"),
        ({"lora_training_urls": "./photos"}, "'./photos' is a local path, which this server does not read"),
        ({"lora_training_urls": "[not json"}, "looks like a JSON list but does not parse"),
        ({"n_tokens": 0}, "n_tokens must be >= 1"),
        ({"resolution": "32"}, "resolution must be at least 64"),
        ({"training_args": '{"device": "xpu"}'}, "no Intel XPU is available"),
        ({"training_args": '{"ckpt_path": "./no/such/model"}'}, "is not an existing file or folder"),
        ({"output_uri": "s3://Bad_Bucket/x"}, "'Bad_Bucket' is not a valid bucket name"),
        ({"output_uri": "gs://bucket/x"}, "output_uri must start with s3://"),
    ],
)
def test_bad_inputs_are_refused_before_any_work(given, message):
    values = {"lora_training_urls": URL, "concept_mode": "object", **given}
    with pytest.raises(ValueError, match=message):
        _request(**values)


def test_every_call_edens_cog_model_accepts_is_accepted():
    """Eden's cog model (predict.py, the version that builds a TrainingConfig): ``lora_training_urls`` is its only
    required input; ``concept_mode`` defaults to style; its other inputs with their defaults."""
    assert inspect.signature(train_module.train).parameters["concept_mode"].default.default == "style"
    assert _request(lora_training_urls=URL, concept_mode=None).config.concept_mode == "style"
    eden_call = {"name": "unnamed", "lora_training_urls": URL, "concept_mode": "style", "sd_model_version": "sdxl",
                 "max_train_steps": 300, "checkpointing_steps": 10000, "resolution": 512, "unet_lr": 0.0003,
                 "ti_lr": 0.001, "lora_rank": 16, "n_tokens": 3, "train_batch_size": 4, "validation_img_size": 1024,
                 "sample_imgs_lora_scale": None, "seed": None}
    assert set(eden_call) <= set(inspect.signature(train_module.train).parameters)
    config = _request(**eden_call).config
    assert (config.name, config.concept_mode, config.validation_img_size) == ("unnamed", "style", 1024)
    # Values Eden takes without complaint: a resolution that is not a multiple of 64, face mode, sd15.
    odd = _request(**{**eden_call, "resolution": 600, "concept_mode": "face", "sd_model_version": "sd15"}).config
    assert (odd.resolution, odd.concept_mode, odd.sd_model_version) == (600, "face", "sd15")


def test_same_value_in_both_places_is_not_a_conflict():
    config = _request(lora_training_urls=URL, concept_mode="object", max_train_steps="40",
                      training_args='{"max_train_steps": 40}').config
    assert config.max_train_steps == 40


def test_local_sources_need_the_operator_flag(monkeypatch, tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    monkeypatch.setenv(ENV_ALLOW_LOCAL, "1")
    request = _request(lora_training_urls=str(tmp_path), concept_mode="object")
    assert request.allow_local_sources is True


def test_uploaded_input_images_join_the_sources(tmp_path):
    upload = tmp_path / "upload.zip"
    upload.write_bytes(b"PK")
    request = _request(input_images=upload, lora_training_urls=f"{URL} | https://example.com/b.jpg",
                       concept_mode="object")
    assert request.config.lora_training_urls == [URL, "https://example.com/b.jpg", str(upload)]
    # The upload is a local file the server made itself: admitted, while typed local paths still are not.
    assert request.allow_local_sources is True
    only_upload = _request(input_images=upload, concept_mode="object")
    assert only_upload.config.lora_training_urls == [str(upload)]


def test_output_uri_keys():
    assert object_key(S3Uri.parse("s3://bucket/loras/"), "a.zip") == S3Uri("bucket", "loras/a.zip")
    assert object_key(S3Uri.parse("s3://bucket/loras"), "a.zip") == S3Uri("bucket", "loras/a.zip")
    assert object_key(S3Uri.parse("s3://bucket"), "a.zip") == S3Uri("bucket", "a.zip")
    assert object_key(S3Uri.parse("s3://bucket/x/final.zip"), "a.zip") == S3Uri("bucket", "x/final.zip")
    with pytest.raises(ValueError, match="credentials or ports do not belong"):
        S3Uri.parse("s3://key:secret@bucket/x")
    with pytest.raises(ValueError, match=r"'\.\.' segments"):
        S3Uri.parse("s3://bucket/a/../b")


def test_progress_line_has_percent_rate_and_time_left():
    from trainer.loop import ProgressEvent

    line = progress_line(ProgressEvent(step=40, total=300, loss=0.12345, elapsed=20.0, steps_per_second=2.1))
    assert line == "step 40/300 (13%), 2.10 steps/s, loss 0.1235, about 2m 04s left"
    assert format_duration(3 * 3600 + 65) == "3h 01m" and format_duration(None) == "unknown"
    assert "loss -" in progress_line(ProgressEvent(step=1, total=2, loss=None, elapsed=0.0, steps_per_second=0.0))


def test_declared_defaults_read_plain_and_input_defaults():
    from cog import Input

    def entry(a: int = Input(default=3), b: str = "x", c: float = Input(description="required")) -> str:
        return ""

    assert declared_defaults(entry) == {"a": 3, "b": "x", "c": None}


def test_calling_train_directly_returns_the_training_output(file_server, images_zip, tmp_path, monkeypatch):
    """As in a notebook: only some arguments given, the rest stay cog FieldInfo objects."""
    from tests.serving.conftest import TINY_TRAINING_ARGS

    monkeypatch.setenv(ENV_WORK_DIR, str(tmp_path))
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)  # keep pytest's logging
    output = train_module.train(lora_training_urls=file_server.url(images_zip.name), concept_mode="object",
                                name="direct", max_train_steps=2, resolution=64, train_batch_size=1, n_sample_imgs=0,
                                caption_model="no_caption", training_args=json.dumps(TINY_TRAINING_ARGS))
    assert isinstance(output, train_module.TrainingOutput)
    assert output.weights.name == "direct.zip" and output.weights.is_file()
    assert output.weights.parent.parent == tmp_path / "outputs"
    assert not any((tmp_path / "jobs").iterdir())
