"""Every config the repository ships loads, and the low-memory preset is defined once (the benchmark reads it)."""

from __future__ import annotations

import pytest

from tests.conftest import REPO_ROOT
from trainer.config.load import load_config, read_json
from trainer.tooling.benchmark import CASE_KEYS, PRESETS, preset_settings

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.json"))


def test_the_repository_ships_configs():
    assert {path.name for path in CONFIGS} >= {"low_memory_sdxl_1024.json", "smoke_tiny_sdxl.json"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.name)
def test_every_shipped_config_loads(path):
    config = load_config(path)
    # Every key in the file is a setting the config took as it is written.
    for key, value in read_json(path).items():
        assert getattr(config, key) == value, key


def test_the_benchmark_preset_is_the_shipped_config():
    path = REPO_ROOT / PRESETS["low-memory"]
    settings = preset_settings("low-memory")
    assert settings == {k: v for k, v in read_json(path).items() if k not in CASE_KEYS}
    assert settings["gradient_checkpointing"] and settings["offload_idle_modules"]
    assert settings["gradient_accumulation_steps"] == 2
    assert preset_settings(None) == {}
