"""Training on the tiny models: what changes, what does not, and what the run leaves behind."""

from __future__ import annotations

import csv
import json
import zipfile

import torch
from safetensors.torch import load_file

from tests.helpers import frozen_snapshot
from trainer.adapters.tokens import ExtendedEmbedding
from trainer.training.checkpoint import STATE_FILE, list_checkpoints


def test_pretrained_weights_are_bit_identical_after_training(trained_sdxl):
    after = frozen_snapshot(trained_sdxl["session"])
    before = trained_sdxl["before"]
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert not changed, f"frozen weights changed: {changed[:5]}"


def test_old_token_rows_are_untouched_and_new_rows_trained(trained_sdxl):
    session = trained_sdxl["session"]
    for index, encoder in enumerate(session.models.text_encoders):
        table = encoder.get_input_embeddings()
        assert isinstance(table, ExtendedEmbedding)
        assert table.base.weight.shape[0] == 49408
        assert not table.base.weight.requires_grad
        key = ("clip_l", "clip_g")[index]
        assert not torch.allclose(trained_sdxl["initial_rows"][key], session.tokens.rows()[key]), key


def test_tokens_freeze_at_the_pivot(trained_sdxl):
    """After freeze_ti_after_completion_f (0.5 of 16 steps) the rows no longer move."""
    assert trained_sdxl["pivot_rows"], "the pivot was never reached"
    final = trained_sdxl["session"].tokens.rows()
    for key, value in trained_sdxl["pivot_rows"].items():
        assert torch.equal(value, final[key]), key


def test_optimiser_state_covers_only_trainable_values(trained_sdxl):
    session = trained_sdxl["session"]
    groups = {g.name: g for g in session.groups}
    assert set(groups) == {"unet", "ti", "te_lora"}
    ti_state = [v for s in groups["ti"].optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
    # exp_avg and exp_avg_sq of 2 new rows per encoder: never the 49,408-row tables.
    assert ti_state and all(t.shape[0] == 2 for t in ti_state)
    for group in session.groups:
        for parameter in group.params:
            assert parameter.dtype == torch.float32


def test_lora_and_new_rows_changed(trained_sdxl):
    session = trained_sdxl["session"]
    lora_b = [p for n, p in session.models.unet.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b), "UNet LoRA did not train (B still zero)"
    te_b = [p for e in session.models.text_encoders for n, p in e.named_parameters() if "lora_B" in n]
    assert te_b and any(p.abs().sum() > 0 for p in te_b), "text-encoder LoRA did not train"


def test_run_folder_contents(trained_sdxl):
    result = trained_sdxl["result"]
    run_dir = result.run_dir
    args = json.loads((run_dir / "training_args.json").read_text())
    assert args["seed"] == 1234 and args["sd_model_version"] == "sdxl" and args["max_train_steps"] == 16
    rows = list(csv.reader((run_dir / "loss.csv").open()))
    assert rows[0] == ["step", "loss"] and len(rows) == 17
    assert all(float(r[1]) > 0 for r in rows[1:])
    assert (run_dir / "loss.png").stat().st_size > 1000
    checkpoints = list_checkpoints(run_dir)
    # max_checkpoints=1 keeps the newest intermediate one; the final one is always kept.
    assert [step for step, _ in checkpoints] == [8, 16]
    final = result.final_checkpoint
    assert (final / STATE_FILE).is_file()
    samples = sorted((final / "samples").glob("*.jpg"))
    assert [p.name for p in samples] == ["step-000016_00.jpg", "step-000016_01.jpg", "step-000016_grid.jpg"]
    assert not list(run_dir.rglob(".partial-*")), "temporary files left behind"


def test_exported_files_and_zip(trained_sdxl):
    result = trained_sdxl["result"]
    name = result.run.name
    lora = load_file(str(result.final_checkpoint / f"{name}_lora.safetensors"))
    assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q") for k in lora)
    assert any(k.startswith("lora_unet_middle_block_1_") for k in lora)
    assert any(k.startswith("lora_unet_output_blocks_0_1_") for k in lora)
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_self_attn_q_proj") for k in lora)
    assert any(k.startswith("lora_te2_text_model_encoder_layers_0_self_attn_q_proj") for k in lora)
    unet_alphas = {float(v) for k, v in lora.items() if k.startswith("lora_unet") and k.endswith(".alpha")}
    assert unet_alphas == {8.0}, "alpha must be the true alpha: rank 4 x multiplier 2"
    embeddings = load_file(str(result.final_checkpoint / f"{name}_embeddings.safetensors"))
    assert set(embeddings) == {"clip_l", "clip_g"}
    assert embeddings["clip_l"].shape == (2, 32) and embeddings["clip_g"].shape == (2, 32)
    special = json.loads((result.final_checkpoint / "special_params.json").read_text())
    assert special == {"TOK": "<s0><s1>"}
    with zipfile.ZipFile(result.zip_path) as archive:
        names = set(archive.namelist())
    assert {f"{name}_lora.safetensors", f"{name}_embeddings.safetensors", "special_params.json",
            "training_args.json", "README.md", "loss.csv", "loss.png", "samples/step-000016_grid.jpg"} <= names
    assert STATE_FILE not in names


def test_lora_metadata_for_a1111_and_comfyui(trained_sdxl):
    from safetensors import safe_open

    result = trained_sdxl["result"]
    path = result.final_checkpoint / f"{result.run.name}_lora.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_network_dim"] == "4" and metadata["ss_network_alpha"] == "8.0"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert metadata["ss_num_train_images"] == "4"
    assert json.loads(metadata["ss_tag_frequency"])["img"]
    assert all(isinstance(v, str) for v in metadata.values())


def test_sdxl_crop_conditioning_mirrors_with_the_flip(tmp_path):
    from trainer.data.manifest import PreparedDataset, Sample
    from trainer.training.session import sdxl_time_ids

    sample = Sample(image="a.png", caption="TOK", target_size=(64, 64), original_size=(300, 200),
                    crop_top_left=(4, 10), resized_size=(96, 100))
    ids = sdxl_time_ids(PreparedDataset(root=tmp_path, samples=[sample]), torch.device("cpu"))
    assert ids.shape == (1, 2, 6)
    assert ids[0, 0].tolist() == [300, 200, 4, 10, 64, 64]
    assert ids[0, 1].tolist() == [300, 200, 4, 100 - 10 - 64, 64, 64]
