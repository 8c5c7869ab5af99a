"""Training behaviour on the tiny models: learning, schedules, caches, resume, failure and cancellation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel

from tests.helpers import denoising_eval, prepared_dataset, tiny_config
from trainer.adapters.lora import lora_state_dict
from trainer.training import loop
from trainer.training import step as training_step
from trainer.training.checkpoint import list_checkpoints
from trainer.training.errors import TrainingCancelled, TrainingDiverged
from trainer.training.session import setup


def _session(images, dataset, tmp_path, **overrides):
    config = tiny_config(images, tmp_path / "runs", **overrides)
    session, state = setup(config, dataset=dataset)
    return session, state


def _trained_values(session) -> dict[str, torch.Tensor]:
    values = {f"unet.{k}": v for k, v in lora_state_dict(session.models.unet).items()} if session.config.is_lora else {}
    if session.tokens is not None:
        values.update({f"tok.{k}": v for k, v in session.tokens.rows().items()})
    return values


def _assert_close(a: dict, b: dict, rtol=1e-4, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=lambda m, k=key: f"{k}: {m}")


def _assert_relative_error(a: dict, b: dict, limit: float, per_tensor_limit: float | None = None):
    """Relative error over all trained values together, plus a looser bound per tensor.

    Adam divides each update by the gradient's own scale, so float reassociation (another batch composition or
    OpenMP thread count) in near-zero gradient entries turns into full-size steps of either sign: element-wise
    tolerances would test rounding, not agreement. One such tensor (a cross-attention ``to_q.lora_B``) reaches
    7e-3 with one thread while the whole set stays near 1e-4; the per-tensor bound still catches a tensor that
    trained differently. Without ``per_tensor_limit`` every tensor meets ``limit`` too."""
    assert a.keys() == b.keys()
    per_tensor_limit = limit if per_tensor_limit is None else per_tensor_limit
    for key in a:
        error = ((a[key] - b[key]).norm() / b[key].norm().clamp(min=1e-12)).item()
        assert error < per_tensor_limit, f"{key}: relative error {error:.2e}"
    difference = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    scale = torch.sqrt(sum((b[k] ** 2).sum() for k in a)).clamp(min=1e-12)
    error = (difference / scale).item()
    assert error < limit, f"relative error of all trained values {error:.2e}"


@pytest.mark.parametrize("model", ["tiny-sdxl", "tiny-sd15"])
def test_learning_happens(images, dataset, tmp_path, model_cache, model):
    # A constant rate (lr_scheduler: constant) learns in these few steps; Eden's warm-up spends most of them cold.
    session, _ = _session(images, dataset, tmp_path, model=model, max_train_steps=60, unet_lr=1e-2, ti_lr=3e-2,
                          lora_rank=8, caption_dropout=0.0, snr_gamma=None, noise_offset=0.0, logging_steps=20,
                          lr_scheduler="constant")
    session.latents.build_cache()
    captions = session.captions
    without = [c.replace(session.token_string, "") for c in captions]
    before = denoising_eval(session, captions)
    initial_rows = session.tokens.rows()
    base_without = denoising_eval(session, without)

    loop.run(session, make_zip=False)

    after = denoising_eval(session, captions)
    assert after < 0.95 * before, f"{model}: loss {before:.4f} -> {after:.4f}"

    # The new tokens steer exactly the prompts that use them: swapping the trained vectors for the initial ones
    # changes the prediction for a TOK prompt and leaves a prompt without TOK bit-for-bit alone.
    trained_rows = session.tokens.rows()
    with_tok_trained = denoising_eval(session, captions)
    without_trained = denoising_eval(session, without)
    session.tokens.load_rows(initial_rows)
    with_tok_initial = denoising_eval(session, captions)
    without_initial = denoising_eval(session, without)
    session.tokens.load_rows(trained_rows)
    assert abs(with_tok_trained - with_tok_initial) > 1e-5
    assert without_trained == without_initial
    assert base_without != without_trained  # the LoRA did change the model


def test_resume_equals_an_uninterrupted_run(images, dataset, tmp_path, model_cache):
    settings = {"max_train_steps": 10, "checkpointing_steps": 4, "unet_lr": 3e-3, "ti_lr": 1e-2,
                "freeze_ti_after_completion_f": 0.5, "unet_optimizer_type": "prodigy", "lr_scheduler": "cosine",
                "unet_lr_warmup_steps": 2, "caption_dropout": 0.3, "left_right_flip_augmentation": True,
                "checkpoint_rule": "every"}  # a checkpoint at 4 of 10 steps (Eden saves none within 25 of the end)
    straight, _ = _session(images, dataset, tmp_path / "a", **settings)
    loop.run(straight, make_zip=False)

    interrupted, _ = _session(images, dataset, tmp_path / "b", **settings)
    calls = []
    with pytest.raises(TrainingCancelled):
        loop.run(interrupted, should_stop=lambda: calls.append(1) or len(calls) > 7, make_zip=False)
    run_dir = interrupted.run_dir
    assert [step for step, _ in list_checkpoints(run_dir)] == [4]

    resumed, state = _session(images, dataset, tmp_path / "b", resume_from=str(run_dir), **settings)
    assert resumed.run_dir == run_dir and state["step"] == 4
    loop.run(resumed, state, make_zip=False)
    _assert_close(_trained_values(resumed), _trained_values(straight))
    prodigy_d = [g.optimizer.param_groups[0]["d"] for g in resumed.groups if g.name == "unet"]
    assert prodigy_d == [g.optimizer.param_groups[0]["d"] for g in straight.groups if g.name == "unet"]
    rows = (run_dir / "loss.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in rows[1:]] == list(range(10))


def test_cached_and_uncached_training_agree(images, dataset, tmp_path, model_cache):
    settings = {"max_train_steps": 8, "unet_lr": 3e-3, "freeze_ti_after_completion_f": 0.5}
    cached, _ = _session(images, dataset, tmp_path / "c", cache_vae_outputs=True, cache_text_encoder_outputs=True,
                         **settings)
    loop.run(cached, make_zip=False)
    assert cached.text.cached and cached.latents.latents
    plain, _ = _session(images, dataset, tmp_path / "p", cache_vae_outputs=False, cache_text_encoder_outputs=False,
                        dataloader_num_workers=2, **settings)
    loop.run(plain, make_zip=False)
    assert not plain.text.cached and not plain.latents.latents
    _assert_relative_error(_trained_values(cached), _trained_values(plain), 1e-3, per_tensor_limit=2e-2)


def test_text_cache_is_used_from_the_start_when_nothing_textual_trains(images, dataset, tmp_path, model_cache):
    session, _ = _session(images, dataset, tmp_path, disable_ti=True, max_train_steps=3)
    loop.run(session, make_zip=False)
    assert session.text.cached
    assert session.tokens is None and [g.name for g in session.groups] == ["unet"]
    # Without tokens the trigger stays a plain word in the captions.
    assert all("TOK" in c for c in session.captions)


def test_token_warmup_trains_only_tokens_first(images, dataset, tmp_path, model_cache):
    session, _ = _session(images, dataset, tmp_path, max_train_steps=6, token_warmup_steps=3)
    lora_before = lora_state_dict(session.models.unet)
    snapshots = []
    original = training_step.optimizer_step

    def spy(session_, phase):
        original(session_, phase)
        snapshots.append((phase, lora_state_dict(session_.models.unet)))

    training_step.optimizer_step = spy
    try:
        loop.run(session, make_zip=False)
    finally:
        training_step.optimizer_step = original
    assert [p.unet for p, _ in snapshots] == [False, False, False, True, True, True]
    _assert_close(snapshots[2][1], lora_before, rtol=0, atol=0)
    assert any(not torch.equal(snapshots[-1][1][k], lora_before[k]) for k in lora_before)


def test_unet_freezes_before_completion(images, dataset, tmp_path, model_cache):
    """Eden's meaning (main.py: the UNet's rate is 0 while completion_f < freeze_unet_before_completion_f): frozen
    for the first quarter, training from there to the end. Other schedules leave the frozen steps out entirely."""
    session, _ = _session(images, dataset, tmp_path, max_train_steps=8, freeze_unet_before_completion_f=0.25,
                          freeze_ti_after_completion_f=1.0)
    schedule = session.schedule
    unet = next(g for g in session.groups if g.name == "unet")
    assert all(schedule.at(s).unet for s in range(8))  # Eden keeps stepping the optimiser, at rate 0
    assert [unet.lr_lambda(s) == 0 for s in range(8)] == [True] * 2 + [False] * 6
    assert all(schedule.at(s).ti for s in range(8))
    constant, _ = _session(images, dataset, tmp_path / "constant", max_train_steps=8, lr_scheduler="constant",
                           freeze_unet_before_completion_f=0.25, freeze_ti_after_completion_f=1.0)
    assert [constant.schedule.at(s).unet for s in range(8)] == [False] * 2 + [True] * 6


def test_ti_only_training_leaves_the_unet_alone(images, dataset, tmp_path, model_cache):
    session, _ = _session(images, dataset, tmp_path, freeze_unet_before_completion_f=1.0, max_train_steps=4)
    assert [g.name for g in session.groups] == ["ti"]
    before = lora_state_dict(session.models.unet)
    rows = session.tokens.rows()
    loop.run(session, make_zip=False)
    _assert_close(lora_state_dict(session.models.unet), before, rtol=0, atol=0)
    assert not torch.equal(session.tokens.rows()["clip_l"], rows["clip_l"])


@pytest.mark.parametrize("optimizer", ["adamw", "prodigy"])  # prodigy: every UNet weight in one flat buffer
def test_full_unet_finetuning(images, dataset, tmp_path, model_cache, optimizer):
    session, _ = _session(images, dataset, tmp_path, is_lora=False, max_train_steps=2, unet_lr=1e-4,
                          unet_optimizer_type=optimizer)
    weight = session.models.unet.conv_in.weight
    assert weight.requires_grad and weight.dtype == torch.float32
    before = weight.detach().clone()
    result = loop.run(session)
    assert not torch.equal(before, session.models.unet.conv_in.weight)
    assert (result.final_checkpoint / "unet" / "config.json").is_file()
    assert not list(result.final_checkpoint.glob("*_lora.safetensors"))
    saved = UNet2DConditionModel.from_pretrained(result.final_checkpoint / "unet")
    trained = session.models.unet.state_dict()
    assert all(torch.equal(v, trained[k].to(v.dtype)) for k, v in saved.state_dict().items())


@pytest.mark.parametrize("overrides", [
    {"prediction_type": "v_prediction", "snr_gamma": 5.0},
    {"gradient_accumulation_steps": 2, "max_grad_norm": 1.0},
    {"ti_optimizer": "prodigy", "unet_optimizer_type": "prodigy"},
    {"use_dora": True},
    {"use_dora": True, "unet_optimizer_type": "prodigy"},  # DoRA magnitudes in the flat buffer, peft's LoRA forward
    {"gradient_checkpointing": True, "lr_scheduler": "linear"},
    {"initial_phrase": "red disc", "initializer_token": None},
    {"noise_offset": 0.1, "l1_penalty": 0.5, "token_attention_loss_w": 1e-2},
])
def test_variants_train_and_export(images, dataset, tmp_path, model_cache, overrides):
    session, _ = _session(images, dataset, tmp_path, max_train_steps=3, **overrides)
    result = loop.run(session, make_zip=False)
    assert list(result.final_checkpoint.glob("*_lora.safetensors"))
    if "initial_phrase" in overrides:
        assert session.tokens.rows()["clip_l"].shape[0] == 2  # "red disc" is two tokens


def test_masks_weight_the_loss(images, tmp_path, model_cache):
    def full(size):
        return np.full((size, size), 255, dtype=np.uint8)

    def left_half(size):
        mask = np.zeros((size, size), dtype=np.uint8)
        mask[:, : size // 2] = 255
        return mask

    settings = {"max_train_steps": 3, "unet_lr": 3e-3}
    results = {}
    for name, mask in (("none", None), ("full", full), ("half", left_half)):
        data = prepared_dataset(images, tmp_path / f"data-{name}", mask=mask)
        session, _ = _session(images, data, tmp_path / name, use_masks=True, **settings)
        assert session.latents.use_masks == (mask is not None)
        loop.run(session, make_zip=False)
        results[name] = _trained_values(session)
    _assert_relative_error(results["full"], results["none"], 1e-4)
    changed = [k for k in results["half"] if (results["half"][k] - results["none"][k]).norm() > 1e-4]
    assert changed, "a half mask must change what is learned"


def test_epochs_set_the_number_of_steps(images, dataset, tmp_path, model_cache):
    session, _ = _session(images, dataset, tmp_path, num_train_epochs=3, max_train_steps=None)
    # 4 images at batch 2: two steps per epoch.
    assert session.total_steps == 6 and session.run.training_args(session.config)["max_train_steps"] == 6


def test_adamw8bit_is_refused_on_cpu(images, dataset, tmp_path, model_cache):
    with pytest.raises(ValueError, match="'AdamW8bit' needs bitsandbytes on an NVIDIA CUDA device; this run is on cpu"):
        _session(images, dataset, tmp_path, unet_optimizer_type="AdamW8bit")


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(images, dataset, tmp_path,
                                                                            model_cache, monkeypatch):
    session, _ = _session(images, dataset, tmp_path, max_train_steps=12, checkpointing_steps=4, logging_steps=2,
                          checkpoint_rule="every")
    original = training_step.compute_loss

    def poisoned(session_, batch, micro_step, phase):
        loss = original(session_, batch, micro_step, phase)
        return loss * float("nan") if micro_step >= 5 else loss

    monkeypatch.setattr(training_step, "compute_loss", poisoned)
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 6; the last good checkpoint is "):
        loop.run(session)
    assert [s for s, _ in list_checkpoints(session.run_dir)] == [4]
    assert not list(session.run_dir.glob("*.zip"))


def test_cancellation_leaves_nothing_partial(images, dataset, tmp_path, model_cache):
    session, _ = _session(images, dataset, tmp_path, max_train_steps=20, checkpointing_steps=5, checkpoint_rule="every")
    calls = []
    with pytest.raises(TrainingCancelled, match="cancelled at step 7"):
        loop.run(session, should_stop=lambda: calls.append(1) or len(calls) > 7)
    assert [s for s, _ in list_checkpoints(session.run_dir)] == [5]
    assert not list(session.run_dir.rglob("*.zip"))
    assert not list(session.run_dir.rglob(".partial-*"))


def test_progress_reports_rate_and_time_left(images, dataset, tmp_path, model_cache):
    session, _ = _session(images, dataset, tmp_path, max_train_steps=8, logging_steps=4)
    events = []
    loop.run(session, on_progress=events.append, make_zip=False)
    assert [e.step for e in events] == [4, 8]
    assert all(e.loss is not None and e.loss > 0 and e.steps_per_second > 0 for e in events)
    assert events[-1].fraction == 1.0 and events[-1].eta_seconds == 0.0


def test_flat_prodigy_trains_like_prodigyopt(images, dataset, tmp_path, model_cache, monkeypatch):
    """The job with the project's FlatProdigy against the same job on prodigyopt.Prodigy (UNet LoRA and tokens)."""
    from prodigyopt import Prodigy

    from trainer.training import optimizers

    settings = {"max_train_steps": 8, "unet_optimizer_type": "prodigy", "ti_optimizer": "prodigy",
                "lr_scheduler": "constant", "freeze_ti_after_completion_f": 0.5, "prodigy_d_coef": 100.0,
                "unet_prodigy_growth_factor": 2.0}
    flat, _ = _session(images, dataset, tmp_path / "flat", **settings)
    assert all(type(g.optimizer).__name__ == "FlatProdigy" for g in flat.groups)
    loop.run(flat, make_zip=False)
    monkeypatch.setattr(optimizers, "FlatProdigy", Prodigy)
    reference, _ = _session(images, dataset, tmp_path / "reference", **settings)
    assert all(type(g.optimizer) is Prodigy for g in reference.groups)
    loop.run(reference, make_zip=False)
    for a, b in zip(flat.groups, reference.groups, strict=True):
        assert a.optimizer.param_groups[0]["d"] == pytest.approx(b.optimizer.param_groups[0]["d"], rel=1e-4)
    # d_coef and growth make d leave d0 (1e-6) within 8 steps: the estimate itself is compared, not just d0.
    assert all(g.optimizer.param_groups[0]["d"] > 1e-5 for g in flat.groups)
    _assert_relative_error(_trained_values(flat), _trained_values(reference), 1e-3)


@pytest.mark.slow  # the compile-equivalence test
def test_optimised_path_trains_like_the_plain_path(images, dataset, tmp_path, model_cache, monkeypatch):
    """Regional compilation plus caches against no compilation and no caches. The graph capture runs with the
    aot_eager backend here (inductor's C++ build takes minutes on a CPU; measured equal to 1e-4 by the benchmark)."""
    monkeypatch.setenv("TRAINER_COMPILE_BACKEND", "aot_eager")
    settings = {"max_train_steps": 6, "unet_lr": 3e-3, "freeze_ti_after_completion_f": 0.5,
                "gradient_checkpointing": False}
    fast, _ = _session(images, dataset, tmp_path / "fast", torch_compile=True, cache_vae_outputs=True,
                       cache_text_encoder_outputs=True, **settings)
    loop.run(fast, make_zip=False)
    compiled = [m for m in fast.models.unet.modules() if type(m).__name__ == "BasicTransformerBlock"]
    assert compiled and all(getattr(m, "_compiled_call_impl", None) is not None for m in compiled)
    plain, _ = _session(images, dataset, tmp_path / "plain", torch_compile=False, cache_vae_outputs=False,
                        cache_text_encoder_outputs=False, **settings)
    loop.run(plain, make_zip=False)
    _assert_relative_error(_trained_values(fast), _trained_values(plain), 1e-3)


@pytest.mark.slow  # compiles the tiny UNet's blocks twice
def test_compiled_graphs_stay_bounded_with_the_token_probe(images, dataset, tmp_path, model_cache, monkeypatch):
    """Regional compilation with the token-attention probe on: the probe adds one graph per text-gradient mode (not
    one per probed layer), sampling compiles nothing, and the count stays under the recompile limit."""
    from torch._dynamo.utils import counters

    from trainer.training.session import GRAPHS_PER_SIZE

    monkeypatch.setenv("TRAINER_COMPILE_BACKEND", "aot_eager")
    monkeypatch.setattr(torch._dynamo.config, "fail_on_recompile_limit_hit", True)  # not a silent fall to eager
    settings = {"max_train_steps": 4, "freeze_ti_after_completion_f": 0.5, "gradient_checkpointing": False,
                "torch_compile": True, "checkpoint_rule": "every", "checkpointing_steps": 2, "n_sample_imgs": 1,
                "validation_num_inference_steps": 2}
    graphs = {}
    for weight in (0.0, 1e-3):
        torch._dynamo.reset()
        counters.clear()
        session, _ = _session(images, dataset, tmp_path / str(weight), token_attention_loss_w=weight, **settings)
        assert (session.probe is not None) == (weight > 0)
        loop.run(session, make_zip=False)
        graphs[weight] = counters["stats"]["unique_graphs"]
    probed_layers = len(session.probe.processors)
    assert probed_layers >= 2  # otherwise one graph per layer and one per mode could not be told apart
    assert 0 < graphs[0.0] < graphs[1e-3] <= graphs[0.0] + 2, graphs  # +1 before the pivot, +1 after
    assert graphs[1e-3] <= GRAPHS_PER_SIZE * len(set(session.dataset.target_sizes))
    assert torch._dynamo.config.recompile_limit >= GRAPHS_PER_SIZE


def test_a_run_leaves_its_config_as_validated(images, dataset, tmp_path, model_cache):
    """What a run derives (seed, name, tokens from a phrase, steps, epochs) goes into its resolved run; the config
    object the caller validated is the same afterwards, and training_args.json carries the resolved values."""
    import json

    from trainer.config.load import load_config

    settings = tiny_config(images, tmp_path / "runs", max_train_steps=2, seed=None).model_dump(mode="json")
    # n_tokens left unset: the phrase's four tokens set it at run time.
    config = load_config({**{k: v for k, v in settings.items()
                             if k not in ("n_tokens", "inserting_list_tokens", "token_dict")},
                          "initial_phrase": "a small red disc"})
    before = config.model_dump()
    session, _ = setup(config, dataset=dataset)
    result = loop.run(session, make_zip=False)
    assert config.model_dump() == before and session.config is config
    assert session.run.tokens == ("<s0>", "<s1>", "<s2>", "<s3>") and session.tokens.rows()["clip_l"].shape[0] == 4
    written = json.loads((result.run_dir / "training_args.json").read_text())
    assert written["seed"] == session.seed and written["n_tokens"] == 4 and written["max_train_steps"] == 2
    assert written["name"] == session.run.name and config.seed is None and config.n_tokens == 3

