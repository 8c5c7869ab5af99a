"""``python -m trainer`` as a user runs it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import REPO_ROOT
from tests.helpers import make_concept_images


def _run(args, cwd, model_cache):
    env = {**os.environ, "TRAINER_MODEL_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(REPO_ROOT)}
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def test_train_from_a_json_file_with_overrides(tmp_path, model_cache):
    images = make_concept_images(tmp_path / "images", n=3)
    config = {
        "lora_training_urls": str(images), "concept_mode": "object", "ckpt_path": "tiny-sd15",
        "caption_model": "no_caption", "resolution": 64, "max_train_steps": 100, "device": "cpu",
        "weight_type": "fp32", "n_sample_imgs": 1, "validation_img_size": 64, "validation_num_inference_steps": 2,
        "train_batch_size": 2,
        "output_dir": str(tmp_path / "runs"),
    }
    path = tmp_path / "training_args.json"
    path.write_text(json.dumps(config))
    result = _run(["train", str(path), "--set", "max_train_steps=4", "--set", "name=cli run", "--set", "seed=7"],
                  tmp_path, model_cache)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("cli_run_")
    written = json.loads((runs[0] / "training_args.json").read_text())
    assert written["max_train_steps"] == 4 and written["seed"] == 7 and written["name"] == "cli run"
    zips = list(runs[0].glob("*.zip"))
    assert len(zips) == 1 and f"zip: {zips[0]}" in result.stdout
    with zipfile.ZipFile(zips[0]) as archive:
        assert "cli_run_lora.safetensors" in archive.namelist()


def test_bad_config_prints_the_reason_without_a_traceback(tmp_path, model_cache):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"lora_training_urls": "x", "concept_mode": "object", "unet_lrr": 1}))
    result = _run(["train", str(path)], tmp_path, model_cache)
    assert result.returncode == 2
    assert "error: Invalid training config: unknown key 'unet_lrr' (did you mean 'unet_lr'?)" in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_device_is_reported(tmp_path, model_cache):
    path = tmp_path / "cfg.json"
    # "xpu:0" as Eden's XPU fork saves it becomes auto with a warning (test_eden.py); plain "xpu" is a request.
    path.write_text(json.dumps({"lora_training_urls": "x", "concept_mode": "object", "device": "xpu"}))
    result = _run(["train", str(path)], tmp_path, model_cache)
    assert result.returncode == 2 and "no Intel XPU is available" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # a fresh python -m trainer
def test_docs_prints_the_parameter_table():
    result = subprocess.run([sys.executable, "-m", "trainer", "docs"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0
    assert "| `freeze_ti_after_completion_f` | `float` | in [0, 1] | `0.7` |" in result.stdout
