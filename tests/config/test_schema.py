"""The config keeps every Eden / XPU-fork parameter, loads their files unchanged, and explains every bad input."""

from __future__ import annotations

import json
import typing

import pytest

from trainer.config.docs import parameter_table
from trainer.config.load import ConfigError, load_config, parse_overrides
from trainer.config.schema import TrainingConfig

# The parameter table of the Eden trainer's XPU fork (name: default), as data. "required" marks fields without one.
EDEN_DEFAULTS = {
    # concept_mode: required in Eden's TrainingConfig, "style" in its cog model, which is what a call without it gets.
    "lora_training_urls": "required", "concept_mode": "style", "caption_prefix": "", "prompt_modifier": None,
    "caption_model": "florence", "caption_dropout": 0.1, "sd_model_version": None, "ckpt_path": None,
    "pretrained_model": None, "seed": None, "resolution": 512, "validation_img_size": None, "train_img_size": None,
    "train_aspect_ratio": None, "train_batch_size": 4, "max_train_steps": 300, "num_train_epochs": None,
    "checkpointing_steps": 10000, "gradient_accumulation_steps": 1, "is_lora": True, "unet_optimizer_type": "adamw",
    "unet_lr_warmup_steps": None, "unet_lr": 0.0003, "prodigy_d_coef": 1.0, "unet_prodigy_growth_factor": 1.05,
    "lora_weight_decay": 0.004, "ti_lr": 0.001, "token_warmup_steps": 0, "ti_weight_decay": 0.0,
    "ti_optimizer": "adamw", "freeze_ti_after_completion_f": 0.7, "freeze_unet_before_completion_f": 0.0,
    "token_attention_loss_w": 3e-7, "cond_reg_w": 0.0, "tok_cond_reg_w": 0.0, "tok_cov_reg_w": 0.0,
    "l1_penalty": 0.03, "noise_offset": 0.02, "snr_gamma": 5.0, "lora_alpha_multiplier": 1.0, "lora_rank": 16,
    "use_dora": False, "left_right_flip_augmentation": True, "augment_imgs_up_to_n": 40, "mask_target_prompts": None,
    "crop_based_on_salience": True, "use_face_detection_instead": False, "clipseg_temperature": 0.5,
    "n_sample_imgs": 4, "name": None, "output_dir": "eden_lora_training_runs", "debug": False, "allow_tf32": True,
    "disable_ti": False, "skip_gpt_cleanup": False, "weight_type": "bf16", "n_tokens": 3,
    "inserting_list_tokens": ["<s0>", "<s1>", "<s2>"], "token_dict": {"TOK": "<s0><s1><s2>"},
    "sample_imgs_lora_scale": None, "dataloader_num_workers": 0, "training_attributes": {},
    "aspect_ratio_bucketing": False, "text_encoder_lora_optimizer": None,
    "text_encoder_lora_lr": 1.0e-5, "txt_encoders_lr_warmup_steps": 200, "text_encoder_lora_weight_decay": 1.0e-5,
    "text_encoder_lora_rank": 16,
}
# Eden's run bookkeeping, which its TrainingConfig holds beside the settings: not user parameters here. Files that
# carry them still load (the values are read and ignored); the exported training_args.json carries them again.
EDEN_RUN_RECORD = {"start_time": 0.0, "job_time": 0.0}
# The one deliberate difference: the fork defaulted to "xpu:0", which fails on every other machine.
DEVICE_DEFAULT = "auto"

MINIMAL = {"lora_training_urls": "images.zip", "concept_mode": "face"}


def test_every_eden_parameter_exists_with_its_default_and_a_docstring():
    config = TrainingConfig.model_validate({"lora_training_urls": "images.zip"})
    for name, default in EDEN_DEFAULTS.items():
        assert name in TrainingConfig.model_fields, name
        assert TrainingConfig.model_fields[name].description, f"{name} has no docstring"
        if default != "required":
            assert getattr(config, name) == default, name
        else:
            assert TrainingConfig.model_fields[name].is_required(), name
    assert config.device == DEVICE_DEFAULT
    for name in EDEN_RUN_RECORD:
        assert name not in TrainingConfig.model_fields, name


def test_every_field_has_a_docstring_and_is_in_the_generated_table():
    table = parameter_table()
    for name, field in TrainingConfig.model_fields.items():
        assert field.description and len(field.description) > 10, name
        assert f"| `{name}` |" in table


def test_eden_types_are_kept():
    hints = typing.get_type_hints(TrainingConfig)
    assert typing.get_args(hints["concept_mode"]) == ("face", "style", "object")
    assert set(typing.get_args(hints["caption_model"])) == {"gpt4-v", "blip", "florence", "no_caption"}
    assert set(typing.get_args(hints["unet_optimizer_type"])) == {"adamw", "prodigy", "AdamW8bit"}
    assert set(typing.get_args(hints["weight_type"])) == {"fp16", "bf16", "fp32"}


def test_eden_training_args_json_loads_unchanged(tmp_path):
    """A file as the Eden trainer writes it: every field, derived epochs, runtime-filled dicts."""
    eden = {name: (value if value != "required" else None) for name, value in {**EDEN_DEFAULTS,
                                                                                  **EDEN_RUN_RECORD}.items()}
    eden.update({
        "lora_training_urls": "https://storage.example.com/xander.zip",
        "concept_mode": "face",
        "sd_model_version": "sdxl",
        "pretrained_model": {"path": "./models/juggernaut.safetensors", "url": "https://example.com/j.safetensors",
                             "version": "sdxl"},
        "seed": 42,
        "num_train_epochs": 38,
        "device": "xpu:0",
        "name": "xander",
        "output_dir": "eden_lora_training_runs/xander_1700000000",
        "training_attributes": {"gpt_description": "a man", "trigger_text": "TOK"},
        "start_time": 1700000000.5,
        "job_time": 812.25,
    })
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps(eden))
    config = load_config(path)
    assert config.max_train_steps == 300 and config.num_train_epochs == 38
    # Eden ignores the device it saved and picks the best GPU; one this machine lacks becomes auto.
    from trainer.device import xpu_device_count

    assert config.device == ("xpu:0" if xpu_device_count() else "auto")
    assert config.training_attributes["trigger_text"] == "TOK"
    # Our resolved file loads again unchanged too.
    assert load_config(config.to_json_dict()) == config


def test_tokens_derive_from_n_tokens_and_agree():
    config = load_config({**MINIMAL, "n_tokens": 2})
    assert config.inserting_list_tokens == ["<s0>", "<s1>"]
    assert config.token_dict == {"TOK": "<s0><s1>"}
    config = load_config({**MINIMAL, "inserting_list_tokens": ["<a>", "<b>", "<c>", "<d>"]})
    assert config.n_tokens == 4 and config.token_dict == {"TOK": "<a><b><c><d>"}


def test_unknown_keys_get_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown key 'unet_lrr' \(did you mean 'unet_lr'\?\)"):
        load_config({**MINIMAL, "unet_lrr": 1e-4})
    with pytest.raises(ConfigError, match=r"'min_snr_gamma' \(did you mean 'snr_gamma'\?\)"):
        load_config({**MINIMAL, "min_snr_gamma": 5})
    with pytest.raises(ConfigError, match=r"unknown key 'zzzz'$"):
        load_config({**MINIMAL, "zzzz": 1})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"n_tokens": 2, "inserting_list_tokens": ["<a>"]},
         r"n_tokens \(2\) must equal the length of inserting_list_tokens \(1"),
        ({"token_dict": {"TOK": "<x>"}},
         r"token_dict\['TOK'\] must be the new tokens joined \('<s0><s1><s2>'\).*got '<x>'"),
        ({"inserting_list_tokens": ["<a>", "<a>"]}, r"inserting_list_tokens must be distinct"),
        ({"n_tokens": 0}, r"n_tokens must be in \[1, 16\], got 0"),
        ({"caption_dropout": 1.5}, r"caption_dropout must be in \[0, 1\], got 1.5"),
        ({"freeze_ti_after_completion_f": -0.1}, r"freeze_ti_after_completion_f must be in \[0, 1\], got -0.1"),
        ({"freeze_unet_before_completion_f": 2}, r"freeze_unet_before_completion_f must be in \[0, 1\], got 2"),
        ({"max_train_steps": None}, r"set max_train_steps or num_train_epochs: both are null"),
        ({"max_train_steps": 0}, r"max_train_steps must be in \[1, 20000\], got 0"),
        ({"num_train_epochs": 0}, r"num_train_epochs must be in \[1, 20000\], got 0"),
        ({"resolution": 32}, r"resolution must be in \[64, 2048\], got 32"),
        ({"resolution": 2049}, r"resolution must be in \[64, 2048\], got 2049"),
        ({"validation_img_size": 4}, r"validation_img_size must be in \[8, 2048\]"),
        ({"validation_img_size": [512, 2100]},
         r"validation_img_size must be .* each in \[8, 2048\], got \[512, 2100\]"),
        ({"train_img_size": [512, 500]}, r"train_img_size must be \[width, height\].*got \[512, 500\]"),
        ({"validation_img_size": [512]}, r"validation_img_size must be .*or a list of exactly 2 items.*got \[512\]"),
        ({"train_aspect_ratio": 9.0}, r"train_aspect_ratio must be in \[0.25, 4\], got 9.0"),
        ({"train_batch_size": 0}, r"train_batch_size must be in \[1, 64\], got 0"),
        ({"unet_lr": -1}, r"unet_lr must be in \[0, 1\], got -1"),
        ({"lora_alpha_multiplier": 0}, r"lora_alpha_multiplier must be in \(0, 256\], got 0"),
        ({"unet_prodigy_growth_factor": 0.5}, r"unet_prodigy_growth_factor must be in \[1, 100\]"),
        ({"max_grad_norm": 0}, r"max_grad_norm must be in \(0, 10000\]"),
        ({"max_checkpoints": 0}, r"max_checkpoints must be in \[1, 20000\]"),
        ({"initializer_token": "dog", "initial_phrase": "a dog"},
         r"set at most one of initializer_token, initial_phrase"),
        ({"initializer_token": "big dog"}, r"initializer_token must be a single word, got 'big dog'"),
        ({"validation_prompts": ["a", "b"], "negative_validation_prompts": ["x"]},
         r"one entry per validation prompt: 1 negative vs 2"),
        ({"disable_ti": True, "freeze_unet_before_completion_f": 1.0}, r"nothing would train"),
        ({"use_dora": True, "is_lora": False}, r"use_dora needs is_lora: true"),
        ({"device": "cuda:x"}, r"device must be one of 'auto', 'cpu'"),
        ({"device": "tpu"}, r"device must be one of"),
        ({"concept_mode": "faces"}, r"concept_mode: Input should be 'face', 'style' or 'object' \(got 'faces'\)"),
        ({"lora_training_urls": "  "}, r"lora_training_urls is empty"),
        ({"snr_gamma": -1}, r"snr_gamma must be in \[0, 1000\]"),
    ],
)
def test_cross_field_rules_name_fields_and_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config({**MINIMAL, **overrides})


def test_errors_are_value_errors_and_collected():
    with pytest.raises(ValueError) as caught:
        load_config({**MINIMAL, "caption_dropout": 3, "train_batch_size": 0})
    assert "caption_dropout" in str(caught.value) and "train_batch_size" in str(caught.value)


def test_parse_overrides_reads_json_values():
    assert parse_overrides(["max_train_steps=50", "name=my run", "validation_img_size=[640,480]", "seed=null",
                            "is_lora=false", "ckpt_path=tiny-sdxl"]) == {
        "max_train_steps": 50, "name": "my run", "validation_img_size": [640, 480], "seed": None, "is_lora": False,
        "ckpt_path": "tiny-sdxl",
    }
    with pytest.raises(ConfigError, match="--set expects key=value"):
        parse_overrides(["max_train_steps"])


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="is not valid JSON"):
        load_config(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_config(bad)


# ------------------------------------------------------------------------------------------------------- bounds
#: The values the issue found accepted behind train.py, each far past what a sensible job needs.
HOSTILE_NUMBERS = {
    "resolution": 99968, "train_batch_size": 100000, "gradient_accumulation_steps": 1e9, "n_tokens": 1000,
    "max_train_steps": 1e9, "lora_rank": 100000, "n_sample_imgs": 1e6, "unet_lr": 50, "augment_imgs_up_to_n": 1e7,
    "dataloader_num_workers": 1e5, "text_encoder_lora_rank": 4096, "num_train_epochs": 1e9,
    "validation_num_inference_steps": 1e6, "checkpointing_steps": -1, "max_train_images": 10**7, "seed": -5,
}
#: The largest sensible job: every bound admits it.
LARGEST_JOB = {
    "resolution": 2048, "train_batch_size": 64, "max_train_steps": 20000, "lora_rank": 256, "n_tokens": 16,
    "n_sample_imgs": 32, "text_encoder_lora_rank": 256, "gradient_accumulation_steps": 64, "augment_imgs_up_to_n": 1000,
    "validation_img_size": [2048, 2048], "train_img_size": [2048, 1024], "dataloader_num_workers": 32,
}


def test_every_number_has_both_ends_bounded_in_its_type():
    """The bound lives in the field type (so the README, the JSON schema and every entry point share it)."""
    from trainer.config.schema import field_bounds

    hints = typing.get_type_hints(TrainingConfig)
    numeric = [name for name, hint in hints.items() if {"int", "float"} & set(str(hint).replace("[", " ").replace(
        "]", " ").replace(",", " ").split()) or hint in (int, float, typing.Optional[int], typing.Optional[float])]
    assert len(numeric) >= 40
    for name in numeric:
        bounds = field_bounds(name)
        if bounds.items is not None:  # a list of numbers: its length and each item
            assert bounds.max_length is not None, name
            bounds = bounds.items
        assert bounds.ge is not None or bounds.gt is not None, name
        assert bounds.le is not None or bounds.lt is not None, name


def test_the_largest_sensible_job_fits_the_bounds():
    config = load_config({**MINIMAL, **LARGEST_JOB})
    assert config.resolution == 2048 and config.n_tokens == 16 and len(config.inserting_list_tokens) == 16


@pytest.mark.parametrize(("field", "value"), sorted(HOSTILE_NUMBERS.items()))
def test_numbers_past_the_bounds_are_refused_from_a_file_and_from_the_command_line(field, value, tmp_path):
    """The CLI (a JSON file, `--set key=value`) meets the same bounds as the cog inputs and training_args."""
    with pytest.raises(ConfigError, match=rf"{field} must be (in|≥|≤)"):
        load_config({**MINIMAL, field: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MINIMAL))
    with pytest.raises(ConfigError, match=rf"{field} must be (in|≥|≤)"):
        load_config(path, parse_overrides([f"{field}={json.dumps(value)}"]))


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("field", ["validation_guidance_scale", "unet_lr", "snr_gamma", "noise_offset",
                                   "train_aspect_ratio", "sample_imgs_lora_scale", "max_grad_norm"])
def test_nan_and_infinity_are_refused_in_every_float(field, text):
    """JSON parsers (Python's, the CLI's --set) accept NaN and Infinity; no float field does."""
    overrides = parse_overrides([f"{field}={text}"])
    with pytest.raises(ConfigError, match=rf"{field} must be a finite number"):
        load_config({**MINIMAL, **overrides})
    with pytest.raises(ConfigError, match=r"evaluation_lora_scales.1 must be a finite number"):
        load_config({**MINIMAL, "evaluation_lora_scales": [1.0, float(text.lower().replace("infinity", "inf"))]})
    with pytest.raises(ConfigError, match=r"training_attributes.x must hold finite numbers"):
        load_config({**MINIMAL, "training_attributes": {"x": float(text.lower().replace("infinity", "inf"))}})


def test_lengths_are_bounded_and_messages_stay_short():
    with pytest.raises(ConfigError, match=r"name must be at most 128 characters, got 'xxx.*\(1000 characters\)$"):
        load_config({**MINIMAL, "name": "x" * 1000})
    with pytest.raises(ConfigError, match=r"inserting_list_tokens must be at most 16 items"):
        load_config({**MINIMAL, "inserting_list_tokens": [f"<t{i}>" for i in range(40)]})
    with pytest.raises(ConfigError, match=r"training_attributes\.a.* is nested more than 8 levels deep"):
        load_config({**MINIMAL, "training_attributes": {"a": [[[[[[[[[[1]]]]]]]]]]}})


def test_the_readme_table_shows_each_bound_and_choice():
    table = parameter_table()
    assert "| `resolution` | `int` | in [64, 2048] | `512` |" in table
    assert "| `concept_mode` | `Literal['face', 'style', 'object']` | one of face, style, object |" in table
    assert "| `lora_alpha_multiplier` | `float` | in (0, 256] |" in table
    assert "| `train_img_size` | `Optional[list[int]]` | 1 to 2 items, each in [64, 2048] |" in table
