"""Data-parallel training: two CPU processes (gloo) learn what one process learns from the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO_ROOT
from tests.helpers import make_concept_images
from trainer.distributed import Distributed


def test_rank_slices_cover_the_global_batch_once():
    slices = [Distributed(rank=r, world_size=3).rank_slice(6) for r in range(3)]
    assert [list(range(6))[s] for s in slices] == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ValueError, match="does not split over 4 processes"):
        Distributed(rank=0, world_size=4).rank_slice(6)
    single = Distributed()
    assert single.rank_slice(4) == slice(0, 4) and single.broadcast("x") == "x" and not single.enabled


def _train(args, tmp_path, model_cache, launcher):
    env = {**os.environ, "TRAINER_MODEL_CACHE": str(model_cache), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*launcher, "-m", "trainer", "train", *args], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]


def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path, model_cache):
    images = make_concept_images(tmp_path / "images", n=4)
    config = {
        "lora_training_urls": str(images), "concept_mode": "object", "ckpt_path": "tiny-sd15",
        "caption_model": "no_caption", "resolution": 64, "max_train_steps": 4, "device": "cpu", "weight_type": "fp32",
        "n_sample_imgs": 0, "seed": 3, "save_dtype": "fp32", "lora_rank": 4, "n_tokens": 2, "unet_lr": 3e-3,
        "ti_lr": 1e-2, "output_dir": str(tmp_path / "runs"), "augment_imgs_up_to_n": 0, "caption_dropout": 0.3,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                  "29517"]
    _train([str(path), "--set", "train_batch_size=1", "--set", "name=two"], tmp_path, model_cache, accelerate)
    _train([str(path), "--set", "train_batch_size=2", "--set", "name=one"], tmp_path, model_cache, [sys.executable])

    runs = {p.name.split("_")[0]: p for p in (tmp_path / "runs").iterdir()}
    assert set(runs) == {"one", "two"}, "the worker process must not create a run folder of its own"

    def load(name, kind):
        return load_file(str(runs[name] / "checkpoints" / "checkpoint-4" / f"{name}_{kind}.safetensors"))

    lora_one, lora_two = load("one", "lora"), load("two", "lora")
    assert lora_one.keys() == lora_two.keys()
    for key in lora_one:
        if key.endswith("weight"):
            error = ((lora_two[key] - lora_one[key]).norm() / lora_one[key].norm().clamp(min=1e-12)).item()
            assert error < 2e-3, f"{key}: {error}"
    torch.testing.assert_close(load("two", "embeddings")["clip_l"], load("one", "embeddings")["clip_l"],
                               rtol=1e-4, atol=1e-6)
