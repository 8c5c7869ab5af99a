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


def test_sdxl_narrow_has_sdxl_topology():
    from collections import Counter

    real, narrow = build_components("sdxl"), build_components("sdxl-narrow")  # meta device
    for name in real:
        kinds = Counter(type(m).__name__ for m in real[name].modules())
        assert Counter(type(m).__name__ for m in narrow[name].modules()) == kinds, name
    assert sum(type(m).__name__ == "Attention" for m in narrow["unet"].modules()) == 140
    assert narrow["text_encoder_2"].config.num_hidden_layers == 32
    assert sum(p.numel() for p in narrow["unet"].parameters()) < sum(p.numel() for p in real["unet"].parameters()) / 50


def test_op_count_mode_runs_on_a_tiny_model(tmp_path, model_cache, capsys):
    output = tmp_path / "ops.json"
    code = main(["--model", "tiny-sdxl", "--resolutions", "64", "--batches", "2", "--optimizers", "prodigy",
                 "--steps", "2", "--warmup", "1", "--device", "cpu", "--weight-type", "fp32", "--count-ops",
                 "--output", str(output)])
    assert code == 0
    report = json.loads(output.read_text())
    assert report["cases"] == []
    (case,) = report["op_counts"]
    ti, pivot = case["ti"], case["pivot"]
    for phase in (ti, pivot):
        assert phase["steps"] == 2
        assert phase["all"] == sum(v[0] for v in phase["by_category"].values())
        assert phase["non_view"] == sum(v[1] for v in phase["by_category"].values()) < phase["all"]
        assert all(phase["by_category"][c][0] > 0 for c in ("optimizer (step, zero_grad, schedules)",
                                                            "AccumulateGrad (one per trainable tensor)"))
        assert phase["by_category"][next(c for c in phase["by_category"] if c.startswith("LoRA"))][1] > 0
    # One read-back per Prodigy optimiser and step: UNet and tokens before the pivot, the UNet after it.
    assert ti["syncs"] == 2 and pivot["syncs"] == 1
    assert ti["by_category"]["text encoders"][0] > 0 and pivot["by_category"]["text encoders"][0] == 0
    table = capsys.readouterr().out
    assert "Ops per step, tiny-sdxl 64 px, batch 2, prodigy" in table and table == markdown(report) + "\n"
