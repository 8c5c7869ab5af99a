"""The LoRA scale a zip's evaluation recommends becomes the predictor's default ``lora_scale``."""

from __future__ import annotations

import json
import math
import zipfile

import numpy as np
import pytest
from PIL import Image

from tests.helpers import make_concept_images, prepared_dataset, tiny_config
from trainer.evaluate.recommended import recommended_scale


def _report(folder, recommendation, results):
    (folder / "evaluation").mkdir(parents=True, exist_ok=True)
    (folder / "evaluation" / "report.json").write_text(json.dumps({
        "recommendation": recommendation, "results": results}), encoding="utf-8")
    return folder


def _row(step, scale, combined, collapsed=False):
    return {"step": step, "lora_scale": scale, "combined": combined, "collapsed": collapsed}


def test_the_recommended_checkpoint_is_the_delivered_one(tmp_path):
    _report(tmp_path, {"step": 400, "lora_scale": 0.8}, [_row(400, 0.8, 0.9), _row(400, 1.0, 0.7)])
    assert recommended_scale(tmp_path, 400) == 0.8
    assert recommended_scale(tmp_path / "elsewhere", 400) is None, "no report, no recommendation"


def test_another_checkpoint_recommended_uses_the_delivered_rows(tmp_path):
    """The zip holds the final checkpoint: its best scale by the report's own ranking, collapsed rows last."""
    _report(tmp_path, {"step": 200, "lora_scale": 0.6}, [
        _row(200, 0.6, 0.95), _row(400, 0.6, 0.9, collapsed=True), _row(400, 1.3, 0.5), _row(400, 0.9, 0.5),
        _row(400, 1.1, 0.5)])
    assert recommended_scale(tmp_path, 400) == 0.9, "a tie goes to the scale nearer 1, then to the lower"
    assert recommended_scale(tmp_path, 300) is None, "the delivered checkpoint was not evaluated"
    _report(tmp_path, {"step": 200, "lora_scale": 0.6}, [_row(400, 0.6, 0.9, collapsed=True), _row(400, 1.0, 0.1,
                                                                                                   collapsed=True)])
    assert recommended_scale(tmp_path, 400) == 0.6, "all collapsed: the best combined score anyway"


@pytest.mark.parametrize("scale", ["0.8", 5.0, -1.0, math.nan, True, None])
def test_a_hostile_or_broken_report_is_ignored(tmp_path, scale, caplog):
    _report(tmp_path, {"step": 10, "lora_scale": scale}, [])
    assert recommended_scale(tmp_path, 10) is None


def test_unreadable_and_oversized_reports_are_ignored(tmp_path, monkeypatch, caplog):
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "report.json").write_text("{not json")
    with caplog.at_level("WARNING"):
        assert recommended_scale(tmp_path, 10) is None
    assert "ignoring the evaluation report" in caplog.text
    _report(tmp_path, {"step": 10, "lora_scale": 0.7}, [])
    monkeypatch.setattr("trainer.evaluate.recommended.MAX_REPORT_BYTES", 10)
    assert recommended_scale(tmp_path, 10) is None


def test_a_deeply_nested_report_is_ignored(tmp_path, caplog):
    """The report comes from the zip, so from the request: JSON nested 100,000 deep is a warning, not a crash."""
    (tmp_path / "evaluation").mkdir()
    (tmp_path / "evaluation" / "report.json").write_text("[" * 100_000 + "]" * 100_000)
    with caplog.at_level("WARNING"):
        assert recommended_scale(tmp_path, 10) is None
    assert "nested too deeply" in caplog.text


@pytest.fixture(scope="module")
def evaluated_zip(tmp_path_factory, model_cache, tiny_clip):
    """A tiny SD1.5 run trained with evaluate_checkpoints at the single scale 0.5: the zip recommends 0.5."""
    from trainer.training import loop
    from trainer.training.session import setup

    root = tmp_path_factory.mktemp("evaluated")
    images = make_concept_images(root / "images", n=2)
    # A constant rate: Eden's UNet warm-up (the default) would spend most of 6 steps near its cold rate, and the
    # test needs a LoRA whose scale visibly matters.
    config = tiny_config(images, root / "runs", model="tiny-sd15", max_train_steps=6, train_batch_size=1,
                         unet_lr=3e-2, lr_scheduler="constant", evaluate_checkpoints=True,
                         evaluation_clip_model=str(tiny_clip), evaluation_lora_scales=[0.5],
                         evaluation_images_per_prompt=1, validation_guidance_scale=1.0)
    session, _ = setup(config, dataset=prepared_dataset(images, root / "prepared"))
    result = loop.run(session)
    with zipfile.ZipFile(result.zip_path) as archive:
        report = json.loads(archive.read("evaluation/report.json"))
    assert report["recommendation"]["lora_scale"] == 0.5 and report["recommendation"]["step"] == 6
    return result.zip_path


def test_the_predictor_defaults_to_the_recommended_scale(evaluated_zip, tmp_path, monkeypatch):
    from trainer.inference.service import PredictionService

    monkeypatch.setenv("TRAINER_SAFETY_CHECKER", "tiny-safety-checker")
    service = PredictionService.start(str(evaluated_zip), device="cpu", root=tmp_path)
    assert service.weights.recommended_lora_scale == 0.5
    request = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 4,
               "output_format": "png"}

    def render(**extra):
        result = service.run({**request, **extra})
        return result.lora_scale, np.asarray(Image.open(result.paths[0]), dtype=np.float32)

    default_scale, default = render()
    half_scale, half = render(lora_scale=0.5)
    full_scale, full = render(lora_scale=1.0)
    assert (default_scale, half_scale, full_scale) == (0.5, 0.5, 1.0)
    np.testing.assert_array_equal(default, half)
    assert np.abs(default - full).mean() > 0.5, "the scale matters for this LoRA"
