"""train.py's inputs: mapping onto the config, validation before any heavy work, defaults that cannot drift."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest

import train as train_module
from trainer.config.schema import TrainingConfig, field_bounds
from trainer.models.hub import ENV_ALLOWED_HUB_MODELS
from trainer.serving import train_job
from trainer.serving.common import declared_defaults, unwrap_inputs
from trainer.serving.train_job import format_duration, object_key, parse_training_request, progress_line
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS
from trainer.utils.env import ENV_ALLOW_LOCAL, ENV_WORK_DIR
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


def test_input_bounds_and_choices_are_the_config_fields():
    """train.py's Input(ge, le, choices, max_length) equal what the config field admits: one rule, read twice."""
    parameters = inspect.signature(train_module.train).parameters
    shared = [name for name in parameters if name in TrainingConfig.model_fields]
    assert len(shared) >= 20
    for name in shared:
        declared, bounds = parameters[name].default, field_bounds(name)
        assert declared.ge == bounds.ge, name
        assert declared.le == bounds.le, name
        assert bounds.gt is None and bounds.lt is None, f"{name}: cog's Input has no strict bounds"
        assert declared.max_length == bounds.max_length, name
        assert (tuple(declared.choices) if declared.choices is not None else None) == bounds.choices, name
    # Every number the form offers has both ends bounded.
    for name in shared:
        annotation = str(parameters[name].annotation)
        if "int" in annotation or "float" in annotation:
            assert parameters[name].default.ge is not None and parameters[name].default.le is not None, name


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
    assert config.run_name == "photos.zip" and config.sd_model_version is None  # Eden: the name comes from the URL
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
    assert config.output_dir == "eden_lora_training_runs"  # owned by the service
    assert "start_time" not in config.model_dump()  # the run's bookkeeping, not a setting


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"training_args": "{'unet_lr': 1}"}, r"training_args is not valid JSON \(Expecting property name"),
        ({"training_args": "[1, 2]"}, "training_args must be a JSON object"),
        ({"training_args": '{"lora_rnk": 4}'}, r"unknown key 'lora_rnk' \(did you mean 'lora_rank'\?\)"),
        ({"max_train_steps": 20, "training_args": '{"max_train_steps": 30}'},
         r"max_train_steps is set both as an input \(20\) and in training_args \(30\)"),
        ({"training_args": '{"output_uri": "s3://b/x"}'}, "output_uri is an input of its own"),
        ({"training_args": '{"model_cache_dir": "/"}'},
         r"model_cache_dir may not be set by a request \(the model cache"),
        ({"lora_training_urls": None}, "no training images: give lora_training_urls"),
        ({"lora_training_urls": "./photos"}, "'./photos' is a local path, which this server does not read"),
        ({"lora_training_urls": "[not json"}, "looks like a JSON list but does not parse"),
        ({"n_tokens": 0}, r"n_tokens must be in \[1, 16\], got 0"),
        ({"resolution": "32"}, r"resolution must be in \[64, 2048\], got '32'"),
        ({"resolution": 2049}, r"resolution must be in \[64, 2048\], got 2049"),
        ({"training_args": '{"device": "xpu"}'}, "no Intel XPU is available"),
        ({"training_args": '{"ckpt_path": "./no/such/model"}'},
         r"ckpt_path './no/such/model' is not a hub id .* or an http"),
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
    assert (config.run_name, config.concept_mode, config.validation_img_size) == ("unnamed", "style", 1024)
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


def test_uploaded_input_images_join_the_sources(monkeypatch, tmp_path):
    """A data: upload is decoded into the work folder and admitted as a local source; the job removes it."""
    monkeypatch.setenv(ENV_WORK_DIR, str(tmp_path))
    upload = "data:application/zip;base64,UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA=="
    request = _request(input_images=upload, lora_training_urls=f"{URL} | https://example.com/b.jpg",
                       concept_mode="object")
    written = Path(request.config.lora_training_urls[2])
    assert request.config.lora_training_urls[:2] == [URL, "https://example.com/b.jpg"]
    assert written.parent == tmp_path / "uploads" and written.read_bytes().startswith(b"PK")
    assert request.uploads == [written]
    # The upload is a local file the server made itself: admitted, while typed local paths still are not.
    assert request.allow_local_sources is True and request.local_paths is False
    only_upload = _request(input_images=upload, concept_mode="object")
    assert len(only_upload.config.lora_training_urls) == 1
    with pytest.raises(ValueError, match="input_images: the data: URL is not valid base64"):
        _request(input_images="data:application/zip;base64,@@@", concept_mode="object")


def test_an_upload_given_by_url_is_fetched_by_the_guarded_client_not_by_cog():
    """input_images is a string, so cog never downloads it; its URL becomes a source for the guarded client."""
    assert inspect.signature(train_module.train).parameters["input_images"].annotation in (str, "Optional[str]") or \
        "str" in str(inspect.signature(train_module.train).parameters["input_images"].annotation)
    request = _request(input_images="http://127.0.0.1:9/internal.zip", concept_mode="object")
    assert request.config.lora_training_urls == ["http://127.0.0.1:9/internal.zip"]
    assert request.allow_local_sources is False


@pytest.mark.parametrize("kind", ["file", "folder", "missing"])
def test_input_images_as_a_server_path_is_refused(kind, tmp_path):
    target = {"file": tmp_path / "photos.zip", "folder": tmp_path, "missing": tmp_path / "nothing.zip"}[kind]
    if kind == "file":
        target.write_bytes(b"PK")
    with pytest.raises(ValueError, match="input_images names a path on the server, which requests may not read"):
        _request(input_images=target, concept_mode="object")


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
    from trainer.training.loop import ProgressEvent

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
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, file_server.address)
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)  # keep pytest's logging
    output = train_module.train(lora_training_urls=file_server.url(images_zip.name), concept_mode="object",
                                name="direct", max_train_steps=2, resolution=64, train_batch_size=1, n_sample_imgs=0,
                                caption_model="no_caption", training_args=json.dumps(TINY_TRAINING_ARGS))
    assert isinstance(output, train_module.TrainingOutput)
    assert output.weights.name == "direct.zip" and output.weights.is_file()
    assert output.weights.parent.parent == tmp_path / "outputs"
    assert not any((tmp_path / "jobs").iterdir())


# ------------------------------------------------------------------------------------------------ bounds
@pytest.mark.parametrize(("field", "value"), [
    ("resolution", 99968), ("train_batch_size", 100000), ("gradient_accumulation_steps", 1e9), ("n_tokens", 1000),
    ("max_train_steps", 1e9), ("lora_rank", 100000), ("n_sample_imgs", 1e6), ("unet_lr", 50),
    ("augment_imgs_up_to_n", 1e7), ("dataloader_num_workers", 1e5), ("max_train_steps", 50000), ("n_tokens", 40),
])
def test_numbers_past_the_bounds_are_refused_in_training_args(field, value):
    """The values the issue found accepted behind train.py: refused by the config's own bounds, naming the key."""
    with pytest.raises(ValueError, match=rf"{field} must be in \["):
        _request(lora_training_urls=URL, concept_mode="object", training_args=json.dumps({field: value}))


@pytest.mark.parametrize(("field", "value"), [("resolution", "4096"), ("n_tokens", 17), ("lora_rank", "1000"),
                                              ("train_batch_size", 65), ("n_sample_imgs", 33), ("seed", -1)])
def test_numbers_past_the_bounds_are_refused_as_inputs(field, value):
    """Without cog's generated schema the server passes inputs as sent: the config bounds them all the same."""
    with pytest.raises(ValueError, match=rf"{field} must be in \["):
        _request(lora_training_urls=URL, concept_mode="object", **{field: value})


@pytest.mark.parametrize("text", ['{"validation_guidance_scale": Infinity}', '{"unet_lr": NaN}',
                                  '{"training_attributes": {"a": -Infinity}}'])
def test_nan_and_infinity_in_training_args_are_refused(text):
    with pytest.raises(ValueError, match=r"must (be a finite number|hold finite numbers)"):
        _request(lora_training_urls=URL, concept_mode="object", training_args=text)


def test_deep_or_huge_training_args_get_a_message_naming_it():
    deep = '{"training_attributes": ' + "[" * 100_000 + "]" * 100_000 + "}"
    with pytest.raises(ValueError, match=r"training_args is (nested too deeply|.* more than the limit)"):
        _request(lora_training_urls=URL, concept_mode="object", training_args=deep)
    nested = '{"training_attributes": ' + "[" * 5000 + "]" * 5000 + "}"
    with pytest.raises(ValueError, match="training_args is nested too deeply"):
        _request(lora_training_urls=URL, concept_mode="object", training_args=nested)
    with pytest.raises(ValueError, match=r"training_attributes\.a.* is nested more than 8 levels"):
        _request(lora_training_urls=URL, concept_mode="object",
                 training_args=json.dumps({"training_attributes": {"a": [[[[[[[[[1]]]]]]]]]}}))


# ------------------------------------------------------------------------------------------ trust boundary
SERVER_PATH_KEYS = ["ckpt_path", "initial_embedding_file", "caption_model_path", "clipseg_model_path",
                    "evaluation_clip_model", "evaluation_aesthetic_weights", "single_file_config", "resume_from",
                    "model_cache_dir"]


@pytest.mark.parametrize("key", SERVER_PATH_KEYS)
def test_server_paths_are_refused_by_name_with_the_same_answer_for_file_folder_and_missing(key, tmp_path):
    """No oracle: the refusal depends on the form of the value only, never on what exists on the server."""
    (tmp_path / "model.safetensors").write_bytes(b"x")
    (tmp_path / "folder").mkdir()
    answers = set()
    for name in ("model.safetensors", "folder", "missing"):
        value = str(tmp_path / name)
        with pytest.raises(ValueError, match=rf"^{key} ") as caught:
            _request(lora_training_urls=URL, concept_mode="object", training_args=json.dumps({key: value}))
        message = str(caught.value)
        assert "TRAINER_ALLOW_LOCAL_SOURCES" in message
        answers.add(message.replace(value, "<value>"))
    assert len(answers) == 1, answers


@pytest.mark.parametrize(("key", "value"), [
    ("ckpt_path", "stabilityai/stable-diffusion-xl-base-1.0"), ("ckpt_path", "https://example.com/model.safetensors"),
    ("ckpt_path", "tiny-sdxl"), ("caption_model_path", "Salesforce/blip-image-captioning-base"),
    ("clipseg_model_path", "CIDAS/clipseg-rd64-refined"), ("evaluation_aesthetic_weights", "https://example.com/a.pth"),
    ("single_file_config", "stabilityai/stable-diffusion-xl-base-1.0"),
])
def test_hub_ids_and_urls_stay_open_to_requests(key, value, monkeypatch):
    # Hub ids besides the server's defaults need the operator's list (tests/serving/test_hub_requests.py).
    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "Salesforce/blip-image-captioning-base")
    _request(lora_training_urls=URL, concept_mode="object", training_args=json.dumps({key: value}))


@pytest.mark.parametrize("value", ["../x/y", "x/..", "./models", "~/models", "file:///etc/passwd", "C:/models",
                                   "/srv/models", "models", "s3://bucket/model.safetensors"])
def test_path_like_names_are_not_hub_ids(value):
    with pytest.raises(ValueError, match=r"ckpt_path .* is not a hub id \(org/name\) or an http\(s\) URL"):
        _request(lora_training_urls=URL, concept_mode="object", training_args=json.dumps({"ckpt_path": value}))


def test_a_gpt_model_name_is_accepted_for_the_gpt_captioner_only():
    _request(lora_training_urls=URL, concept_mode="object", caption_model="gpt4-v",
             training_args=json.dumps({"caption_model_path": "gpt-4o-mini"}))
    with pytest.raises(ValueError, match="caption_model_path 'gpt-4o-mini' is not a hub id"):
        _request(lora_training_urls=URL, concept_mode="object", caption_model="blip",
                 training_args=json.dumps({"caption_model_path": "gpt-4o-mini"}))


def test_pretrained_model_paths_and_urls(tmp_path):
    with pytest.raises(ValueError, match=r"pretrained_model.path: .* paths on the server are not accepted"):
        _request(lora_training_urls=URL, concept_mode="object",
                 training_args=json.dumps({"pretrained_model": {"path": str(tmp_path), "version": "sdxl"}}))
    with pytest.raises(ValueError, match=r"pretrained_model.url 'file:///x' is not an http\(s\) URL"):
        _request(lora_training_urls=URL, concept_mode="object",
                 training_args=json.dumps({"pretrained_model": {"url": "file:///x"}}))
    # Eden's form: a cache path that does not exist here, with the URL to fetch: the path is never looked at.
    request = _request(lora_training_urls=URL, concept_mode="object", training_args=json.dumps(
        {"pretrained_model": {"path": "/src/models/sdxl.safetensors", "url": "https://example.com/sdxl.safetensors",
                              "version": "sdxl"}}))
    assert request.local_paths is False


def test_the_s3_endpoint_is_the_operators(monkeypatch):
    args = json.dumps({"s3_endpoint_url": "http://attacker.example:9000"})
    with pytest.raises(ValueError, match=r"s3_endpoint_url may not be set by a request: the server would sign"):
        _request(lora_training_urls="s3://bucket/photos/", concept_mode="object", training_args=args)
    monkeypatch.setenv("TRAINER_ALLOW_REQUEST_S3_ENDPOINT", "1")
    config = _request(lora_training_urls="s3://bucket/photos/", concept_mode="object", training_args=args).config
    assert config.s3_endpoint_url == "http://attacker.example:9000"


def test_the_operator_may_allow_local_paths(monkeypatch, tmp_path):
    monkeypatch.setenv(ENV_ALLOW_LOCAL, "1")
    (tmp_path / "emb.safetensors").write_bytes(b"x")
    request = _request(lora_training_urls=URL, concept_mode="object",
                       training_args=json.dumps({"initial_embedding_file": str(tmp_path / "emb.safetensors"),
                                                 "model_cache_dir": str(tmp_path)}))
    assert request.local_paths is True
