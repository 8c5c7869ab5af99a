"""``python -m trainer evaluate`` end to end on a tiny trained run, its errors, and the training-loop hook."""

from __future__ import annotations

import json
import math
import shutil
import zipfile

import pytest
import torch
from PIL import Image

from tests.helpers import make_concept_images, prepared_dataset, tiny_config
from trainer.cli import main
from trainer.evaluate.recommend import Candidate, recommend
from trainer.training.checkpoint import list_checkpoints

SCALES = (0.5, 1.0)
# Kept small for the CPU: 2 images per checkpoint and scale (the least diversity needs), no classifier-free guidance.
N_PROMPTS, PER_PROMPT, SIZE = 2, 1, 64


@pytest.fixture(scope="module")
def run_copy(trained_sdxl, tmp_path_factory):
    """The shared tiny SDXL run (checkpoints 8 and 16), copied so that evaluating it changes nothing shared."""
    target = tmp_path_factory.mktemp("eval-run") / "run"
    shutil.copytree(trained_sdxl["result"].run_dir, target)
    return {"run": target, "dataset": trained_sdxl["session"].dataset.root}


def _args(run, clip, dataset, *extra):
    return ["evaluate", str(run), "--clip-model", str(clip), "--device", "cpu", "--weight-type", "fp32",
            "--size", str(SIZE), "--steps", "2", "--guidance", "0", "--training-images", str(dataset), *extra]


def test_evaluate_command_end_to_end(run_copy, tiny_clip, tiny_aesthetic, capsys, one_thread):
    run = run_copy["run"]
    code = main(_args(run, tiny_clip, run_copy["dataset"], "--aesthetic-weights", str(tiny_aesthetic),
                      "--prompts", str(N_PROMPTS), "--images-per-prompt", str(PER_PROMPT),
                      "--lora-scales", *map(str, SCALES)))
    out = capsys.readouterr().out
    assert code == 0, out
    folder = run / "evaluation"
    report = json.loads((folder / "report.json").read_text())
    assert f"report: {folder / 'report.json'}" in out and "recommended: checkpoint-" in out

    # Every checkpoint at every scale, each with every score, from the prompts and seeds the report lists.
    steps = [step for step, _ in list_checkpoints(run)]
    assert steps == [8, 16]
    assert sorted((r["step"], r["lora_scale"]) for r in report["results"]) == [(s, c) for s in steps for c in SCALES]
    assert [p["seed"] for p in report["prompts"]] == [0, 1]
    assert all("<s0>" not in p["adherence_text"] and "TOK" not in p["adherence_text"] for p in report["prompts"])
    for row in report["results"] + [report["baseline"]]:
        scores = row["scores"]
        for name in ("adherence", "likeness", "nearest", "diversity", "aesthetic"):
            assert isinstance(scores[name], float) and math.isfinite(scores[name]), (name, row)
        assert -1 <= scores["adherence"] <= 1 and -1 <= scores["likeness"] <= scores["nearest"] <= 1
        assert len(row["images"]) == N_PROMPTS * PER_PROMPT
        assert scores["likeness"] == pytest.approx(sum(i["likeness"] for i in row["images"]) / len(row["images"]),
                                                   abs=1e-5)

    # The LoRA and its scale reach the renders: scores differ between checkpoints and between scales.
    by_key = {(r["step"], r["lora_scale"]): r for r in report["results"]}
    for step in steps:
        assert by_key[(step, 0.5)]["images"] != by_key[(step, 1.0)]["images"]
    assert by_key[(8, 1.0)]["images"] != by_key[(16, 1.0)]["images"]

    # The recommendation is what the documented rule gives on the reported scores.
    candidates = [Candidate(r["step"], r["lora_scale"], r["scores"]) for r in report["results"]]
    expected = recommend(candidates, report["baseline"]["scores"]["diversity"]).best.candidate
    chosen = report["recommendation"]
    assert (chosen["step"], chosen["lora_scale"]) == (expected.step, expected.lora_scale)
    assert chosen["checkpoint"] in chosen["reason"] and report["rule"]["text"].startswith("1. Every (checkpoint")
    assert report["rule"]["scores_used"] == ["likeness", "adherence", "aesthetic"]
    assert report["rule"]["reference"] == "base model"

    # Chart, summary and one grid per checkpoint (a row per scale, a column per image) plus the base model's.
    with Image.open(folder / "scores.png") as chart:
        assert chart.format == "PNG" and chart.width > 400
    assert "| checkpoint-16 | 1 |" in (folder / "summary.md").read_text()
    for step in steps:
        with Image.open(folder / "grids" / f"checkpoint-{step}.jpg") as grid:
            assert grid.size == (N_PROMPTS * PER_PROMPT * SIZE, len(SCALES) * SIZE)
    assert (folder / "grids" / "base.jpg").is_file()
    assert not [p for p in run.iterdir() if p.name.startswith(".partial-")]


def test_run_folder_errors(tmp_path, run_copy, tiny_clip, capsys):
    def error(*args) -> str:
        assert main(["evaluate", *map(str, args)]) == 2
        return capsys.readouterr().err

    assert "does not exist: pass the folder of a training run" in error(tmp_path / "nope")
    (tmp_path / "plain").mkdir()
    assert "is not a training run folder: training_args.json is missing" in error(tmp_path / "plain")
    (tmp_path / "plain" / "training_args.json").write_text("{}")
    assert "has no complete checkpoints" in error(tmp_path / "plain")
    checkpoint = run_copy["run"] / "checkpoints" / "checkpoint-8"
    assert f"is a checkpoint folder, not a run folder: pass {run_copy['run']} with --checkpoint 8" in error(checkpoint)
    assert "checkpoint 12 is not in" in error(run_copy["run"], "--checkpoint", 12, 16)
    assert "its checkpoints are at steps 8, 16" in error(run_copy["run"], "--checkpoint", 12)
    assert "dataset does not exist: likeness compares the outputs with the training images" in error(run_copy["run"])
    assert "lora_scales.0 must be in (0, 2], got 0.0" in error(run_copy["run"], "--lora-scales", 0)
    assert "--size takes SIDE or WIDTH HEIGHT" in error(run_copy["run"], "--size", 64, 64, 64)


def test_missing_models_fail_before_rendering(run_copy, tiny_clip, tmp_path, capsys):
    def error(*extra) -> str:
        assert main(_args(run_copy["run"], tiny_clip, run_copy["dataset"], *map(str, extra))) == 2
        return capsys.readouterr().err

    weights = tmp_path / "sac+logos+ava1-l14-linearMSE.pth"
    message = error("--aesthetic-weights", weights)
    assert f"aesthetic weights '{weights}' do not exist" in message and "or leave the aesthetic weights out" in message
    assert "neither an existing folder nor a hub id" in error("--clip-model", tmp_path / "no-clip")
    torch.save({f"layers.{i}.{k}": torch.ones(*((1, 768) if k == "weight" else (1,))) for i in (0,)
                for k in ("weight", "bias")}, weights)
    assert "expect 768-d CLIP image embeddings but" in error("--aesthetic-weights", weights)
    assert not (run_copy["run"] / "evaluation").exists() or (run_copy["run"] / "evaluation" / "report.json").is_file()


def test_training_hook_puts_the_evaluation_in_the_zip(tmp_path, model_cache, tiny_clip, caplog, one_thread):
    from trainer.training import loop
    from trainer.training.loop import evaluate_after_training
    from trainer.training.session import setup

    images = make_concept_images(tmp_path / "images", n=2)
    config = tiny_config(images, tmp_path / "runs", model="tiny-sd15", max_train_steps=2, train_batch_size=1,
                         evaluate_checkpoints=True, evaluation_clip_model=str(tiny_clip),
                         evaluation_lora_scales=[1.0], evaluation_images_per_prompt=1, validation_guidance_scale=1.0)
    session, _ = setup(config, dataset=prepared_dataset(images, tmp_path / "prepared"))
    result = loop.run(session)
    with zipfile.ZipFile(result.zip_path) as archive:
        names = set(archive.namelist())
        report = json.loads(archive.read("evaluation/report.json"))
    assert {"evaluation/report.json", "evaluation/scores.png", "evaluation/summary.md",
            "evaluation/grids/checkpoint-2.jpg", "evaluation/grids/base.jpg"} <= names
    assert [(r["step"], r["lora_scale"]) for r in report["results"]] == [(2, 1.0)]
    assert report["recommendation"]["checkpoint"] == "checkpoint-2"
    assert report["training_images"]["count"] == 2 and len(report["prompts"]) == 6
    assert "evaluation_s" in result.timings

    # A failing evaluation is logged and leaves the zip without it rather than failing the trained run.
    session.config = session.config.model_copy(update={"evaluation_clip_model": str(tmp_path / "no-clip")})
    with caplog.at_level("ERROR"):
        assert evaluate_after_training(session) == {}
    assert "checkpoint evaluation failed" in caplog.text and "neither an existing folder" in caplog.text
