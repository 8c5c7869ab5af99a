"""Reading configurations from JSON files, dicts and ``--set key=value`` overrides, with errors a user can act on."""

from __future__ import annotations

import difflib
import json
import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from trainer.config.schema import TrainingConfig, field_bounds
from trainer.device import is_missing_numbered_gpu
from trainer.utils.atomic import atomic_write_text
from trainer.utils.download import redact_text

logger = logging.getLogger(__name__)

#: Names used by neighbouring tools (invoke-training, diffusers' scripts, kohya) mapped to ours, so that an unknown
#: key from those tools gets a precise suggestion.
SYNONYMS: dict[str, str] = {
    "max_train_epochs": "num_train_epochs",
    "min_snr_gamma": "snr_gamma",
    "num_vectors": "n_tokens",
    "num_new_tokens_per_abstraction": "n_tokens",
    "placeholder_token": "token_dict",
    "token_abstraction": "token_dict",
    "base_output_dir": "output_dir",
    "model": "ckpt_path",
    "pretrained_model_name_or_path": "ckpt_path",
    "save_every_n_steps": "checkpointing_steps",
    "checkpoints_total_limit": "max_checkpoints",
    "learning_rate": "unet_lr",
    "text_encoder_lr": "text_encoder_lora_lr",
    "optimizer": "unet_optimizer_type",
    "rank": "lora_rank",
    "network_dim": "lora_rank",
    "weight_dtype": "weight_type",
    "mixed_precision": "weight_type",
    "cache_latents": "cache_vae_outputs",
    "resume_from_checkpoint": "resume_from",
    "train_text_encoder_ti_frac": "freeze_ti_after_completion_f",
    "num_validation_images_per_prompt": "n_sample_imgs",
    "validate_every_n_steps": "checkpointing_steps",
    "instance_data_dir": "lora_training_urls",
    "input_images": "lora_training_urls",
    "token_string": "token_dict",
    "lr_warmup_steps": "unet_lr_warmup_steps",
}


#: Keys that Eden's code passes or tolerates but that mean nothing here: its cog model's inputs (``verbose``,
#: ``debug``-like switches, ``run_name``, ``hard_pivot``, ``off_ratio_power``, ``lora_param_scaler``), fields of its
#: earlier ``TrainingConfig`` versions that its saved ``training_args.json`` files carry, and the run summary its
#: older cog model saved under that name. Eden's pydantic model ignores unknown keys; here these are accepted with
#: one warning and every other unknown key is refused.
EDEN_IGNORED_KEYS = frozenset({
    "verbose", "hard_pivot", "off_ratio_power", "run_name", "lora_param_scaler", "do_cache", "train_dataset_cache",
    "crops_coords_top_left_h", "crops_coords_top_left_w", "clip_grad_norm", "token_embedding_lr_warmup_steps",
    "unet_learning_rate", "lr_num_cycles", "lr_power", "scale_lr", "scale_lr_based_on_grad_acc", "args_dict",
    "checkpoint", "num_training_images", "num_augmented_images", "trigger_text", "segmentation_prompt",
    "trainig_captions",
})


#: A run's bookkeeping that ``training_args.json`` files carry (Eden's and ours): when it started and how long it
#: ran. Not settings: read and ignored.
RUN_RECORD_KEYS = frozenset({"start_time", "job_time"})


class ConfigError(ValueError):
    """A configuration that cannot run. The message names the fields, the rule and the values."""


def suggest(key: str, choices: Iterable[str]) -> str | None:
    if key in SYNONYMS:
        return SYNONYMS[key]
    matches = difflib.get_close_matches(key, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _check_unknown_keys(data: Mapping[str, Any]) -> None:
    known = TrainingConfig.model_fields
    problems = []
    for key in data:
        if key in known:
            continue
        hint = suggest(key, [*known, *EDEN_IGNORED_KEYS])
        problems.append(f"unknown key {key!r}" + (f" (did you mean {hint!r}?)" if hint else ""))
    if problems:
        raise ConfigError("Invalid training config: " + "; ".join(problems))


#: pydantic's error types for a value outside the bounds a field's type declares.
_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "too_long", "too_short",
                 "string_too_long", "string_too_short"}


def _shown(value: Any) -> str:
    """A value as messages quote it: long text and lists are cut, with their length."""
    text = repr(value)
    if len(text) <= 80:
        return text
    size = f"{len(value)} {'characters' if isinstance(value, str) else 'items'}" if hasattr(value, "__len__") else ""
    return f"{text[:60]}... ({size or f'{len(text)} characters'})"


def format_validation_error(error: ValidationError, model: type[BaseModel] = TrainingConfig,
                            title: str = "Invalid training config") -> str:
    """One message for all of ``error``'s problems: each names the field, the rule and the value."""
    lines: list[str] = []
    union_fields: set[str] = set()
    for item in error.errors():
        parts = item["loc"]
        field = str(parts[0]) if parts else ""
        # A value that fits no member of a union (a number or a list) gets one message with the whole rule, not one
        # per member named by pydantic's internal tags.
        if len(parts) > 1 and isinstance(parts[1], str) and field in model.model_fields:
            if field not in union_fields:
                union_fields.add(field)
                lines.append(f"{field} must be {field_bounds(field, model).describe()}, got "
                             f"{_shown(item.get('input'))}")
            continue
        loc = ".".join(str(part) for part in parts)
        message = item["msg"].removeprefix("Value error, ")
        if field in model.model_fields and item["type"] in _BOUND_ERRORS:
            allowed = field_bounds(field, model).at(tuple(parts[1:])).describe()
            lines.append(f"{loc} must be {allowed}, got {_shown(item.get('input'))}")
        elif item["type"] == "finite_number":
            lines.append(f"{loc} must be a finite number, got {item.get('input')!r}")
        elif loc and message.startswith(("must ", "is ")):
            # A rule of a shared type, which does not know the field's name: the sentence starts with it.
            lines.append(f"{loc} {message}")
        elif loc and not message.startswith(loc):
            lines.append(f"{loc}: {message} (got {_shown(item.get('input'))})")
        else:
            lines.append(message)
    return redact_text(f"{title}: " + "; ".join(lines))


def _drop_eden_ignored(data: dict[str, Any]) -> None:
    """Remove the keys Eden tolerates that mean nothing here, and Eden's saved device when this machine lacks it;
    one warning names them all."""
    for key in RUN_RECORD_KEYS & data.keys():
        del data[key]
    ignored = sorted(key for key in data if key in EDEN_IGNORED_KEYS)
    for key in ignored:
        del data[key]
    notes = [", ".join(ignored)] if ignored else []
    # Eden's saved configs name the GPU it picked (the XPU fork its default); Eden ignores that value on loading.
    device = data.get("device")
    if is_missing_numbered_gpu(device):
        data["device"] = "auto"
        notes.append(f"device {device!r} (not on this machine; using auto)")
    if notes:
        logger.warning("ignoring settings of Eden's trainer that mean nothing here: %s", "; ".join(notes))


def load_config(source: Mapping[str, Any] | str | Path, overrides: Mapping[str, Any] | None = None) -> TrainingConfig:
    """Build a validated config from a dict or a JSON file, with optional overrides applied on top."""
    data = read_json(Path(source)) if isinstance(source, (str, Path)) else dict(source)
    if overrides:
        data.update(overrides)
    _drop_eden_ignored(data)
    _check_unknown_keys(data)
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error)) from None


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConfigError(f"config file {str(path)!r} is not valid JSON: {error}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(path)!r} is nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


def parse_overrides(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` pairs. Values are JSON where they parse as JSON (numbers, true, null, lists), else text."""
    result: dict[str, Any] = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set expects key=value, got {pair!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result[key] = value
    return result


def save_training_args(args: Mapping[str, Any], path: Path) -> None:
    """Write a run's ``training_args.json`` (see :meth:`~trainer.training.resolved.ResolvedRun.training_args`)."""
    atomic_write_text(path, json.dumps(dict(args), indent=2, sort_keys=False) + "\n")
