"""The benchmark runs on a CPU with the tiny models (a regression check of the same code); no timing asserts."""

from __future__ import annotations

import json

import pytest

from trainer.tooling.architectures import REFERENCE_PARAMS_M, build_components
from trainer.tooling.benchmark import main, markdown


@pytest.mark.parametrize("version", ["sdxl", "sd15"])
def test_real_architectures_have_the_published_sizes(version):
    parts = build_components(version)  # on the meta device: shapes only, no memory
    names = {"unet": "unet", "vae": "vae", "text_encoder": "clip_l", "text_encoder_2": "clip_g"}
    sizes = {names[k]: round(sum(p.numel() for p in m.parameters()) / 1e6, 1) for k, m in parts.items()}
    assert sizes == REFERENCE_PARAMS_M[version]


def test_benchmark_command_runs_on_cpu_with_a_tiny_model(tmp_path, model_cache, capsys):
    output = tmp_path / "results.json"
    code = main(["--model", "tiny-sd15", "--resolutions", "64", "--batches", "2", "--optimizers", "adamw",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--weight-type", "fp32", "--end-to-end",
                 "--e2e-steps", "2", "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["environment"]["device"] == "cpu" and report["environment"]["torch"]
    (case,) = report["cases"]
    assert case["resolution"] == 64 and case["batch"] == 2 and not case["compiled"]
    assert case["ti_images_per_s"] > 0 and case["pivot_images_per_s"] > 0 and case["load_s"] > 0
    assert report["end_to_end"]["steps"] == 2 and report["end_to_end"]["total_s"] > 0
    table = capsys.readouterr().out
    assert "| tiny-sd15 | 64 | 2 | adamw | no |" in table and table == markdown(report) + "\n"
