"""An Eden config trains the way Eden trains it: one test per rule, each stating Eden's rule and where it is.

Read from edenartlab/sd-lora-trainer: ``main.py`` (``train``), ``trainer/config.py`` (``TrainingConfig``),
``trainer/preprocess.py`` and ``trainer/dataset.py`` at commit e83a7971e5547c3e802896791066f404ed1957db (the state the
Intel XPU fork copies), ``trainer/optimizer.py`` at b166f7c2745ede1d9d6294a08951eb6661ffa287 (its latest stored
``get_unet_lora_parameters``), ``trainer/utils/utils.py`` (``fix_prompt``), ``trainer/checkpoint.py``
(``remove_delimiter_characters``) and the cog ``predict.py`` that builds a ``TrainingConfig``.
"""

from __future__ import annotations

import logging
import math

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import make_concept_images, tiny_config
from trainer.config.load import ConfigError, load_config
from trainer.config.schema import TrainingConfig
from trainer.data.captions import place_trigger
from trainer.data.sizes import fixed_training_size, sample_lora_scale, sample_size
from trainer.training import loop
from trainer.training.checkpoint import checkpoint_due
from trainer.training.resolved import resolve_total_steps
from trainer.training.schedule import Progress
from trainer.training.session import setup

URL = "https://storage.example.com/sets/xander_5.zip"


def _session(images, dataset, tmp_path, **overrides):
    session, _ = setup(tiny_config(images, tmp_path / "runs", **overrides), dataset=dataset)
    return session


def _group(session, name):
    return next(g for g in session.groups if g.name == name)


def _rates(group, steps) -> list[float]:
    """The learning rate the optimiser runs at, at each step (scheduled exactly as training steps it)."""
    return [group.initial_lr * group.lr_lambda(s) for s in steps]


# ------------------------------------------------------------------------------------------------ schedules
def test_unet_rate_warms_up_over_the_whole_run(images, dataset, tmp_path, model_cache):
    """Eden: ``unet_lr_warmup_steps: None`` becomes ``max_train_steps`` (config.py); the UNet rate is
    ``base * (unet_lr / base) ** (step / unet_lr_warmup_steps)`` with base 5e-5, 2e-4 with ``disable_ti``, 1e-5 for a
    full fine-tune (main.py): 5e-5 at step 0, 3e-4 at the end."""
    session = _session(images, dataset, tmp_path, max_train_steps=300)
    unet = _group(session, "unet")
    start, middle, end = _rates(unet, [0, 150, 300])
    assert start == pytest.approx(5e-5) and end == pytest.approx(3e-4)
    assert middle == pytest.approx(math.sqrt(5e-5 * 3e-4))  # exponential: the geometric mean half-way
    # The optimiser itself runs at it.
    assert unet.optimizer.param_groups[0]["lr"] == pytest.approx(5e-5)
    no_ti = _session(images, dataset, tmp_path / "no-ti", max_train_steps=300, disable_ti=True)
    assert _rates(_group(no_ti, "unet"), [0])[0] == pytest.approx(2e-4)
    warm = _session(images, dataset, tmp_path / "warm", max_train_steps=300, unet_lr_warmup_steps=100)
    assert _rates(_group(warm, "unet"), [100])[0] == pytest.approx(3e-4)
    # The project's constant schedule stays available as an explicit choice.
    constant = _session(images, dataset, tmp_path / "constant", max_train_steps=300, lr_scheduler="constant")
    assert constant.groups[0].optimizer.param_groups[0]["lr"] == pytest.approx(3e-4)


def test_token_rate_decays_over_the_run_and_stops_at_the_pivot(images, dataset, tmp_path, model_cache):
    """Eden (main.py): ``ti_lr * (1 - completion_f) ** 1.7``, and 0 once ``completion_f >
    freeze_ti_after_completion_f``: 1e-3, 5e-4, 1.5e-4 at steps 0/100/200 of 300, frozen from step 211."""
    session = _session(images, dataset, tmp_path, max_train_steps=300)
    ti = _group(session, "ti")
    assert _rates(ti, [0, 100, 200]) == pytest.approx([1e-3, 1e-3 * (2 / 3) ** 1.7, 1e-3 * (1 / 3) ** 1.7])
    assert _rates(ti, [100, 200]) == pytest.approx([5.0e-4, 1.55e-4], rel=0.01)
    assert session.schedule.ti_end == 211  # completion_f 210/300 = 0.7 still trains, as Eden's ">" test has it


def test_unet_trains_from_the_freeze_fraction_to_the_end(images, dataset, tmp_path, model_cache):
    """Eden (main.py): the UNet's rate is 0 while ``completion_f < freeze_unet_before_completion_f``: 0.3 trains it
    from 30% of the run to the end (its optimiser still steps, at rate 0)."""
    session = _session(images, dataset, tmp_path, max_train_steps=100, freeze_unet_before_completion_f=0.3)
    unet = _group(session, "unet")
    rates = _rates(unet, range(100))
    assert all(r == 0 for r in rates[:30]) and all(r > 0 for r in rates[30:])
    assert all(session.schedule.at(s).unet for s in range(100))


def test_text_encoder_lora_trains_to_the_end_with_a_decaying_rate(images, dataset, tmp_path, model_cache):
    """Eden (main.py): the text-encoder LoRA is never frozen; its rate is ``text_encoder_lora_lr * (1 -
    completion_f) ** 2`` times the linear warm-up ``min(step / txt_encoders_lr_warmup_steps, 1)``."""
    session = _session(images, dataset, tmp_path, max_train_steps=40, text_encoder_lora_optimizer="adamw",
                       text_encoder_lora_lr=1e-4, txt_encoders_lr_warmup_steps=10)
    te = _group(session, "te_lora")
    assert all(session.schedule.at(s).te_lora for s in range(40))
    assert not session.schedule.text_frozen_from(39)
    assert _rates(te, [0, 5, 10, 20]) == pytest.approx([0.0, 1e-4 * 0.5 * (35 / 40) ** 2, 1e-4 * (30 / 40) ** 2,
                                                        1e-4 * 0.25])


def test_completion_is_edens_epoch_fraction():
    """Eden (main.py): ``completion_f = (epoch + step / len(dataloader)) / num_train_epochs`` with ``num_train_epochs =
    ceil(max_train_steps / len(dataloader))``: 10 steps of 4 batches per epoch make 3 epochs, 12 in the count."""
    progress = Progress.of(10, 4)
    assert progress.epochs == 3 and progress.completion(6) == pytest.approx(6 / 12)


# ------------------------------------------------------------------------------------------------ adapters
def test_text_encoder_lora_alpha_follows_the_multiplier(images, dataset, tmp_path, model_cache):
    """Eden (trainer/optimizer.py, get_text_encoder_lora_parameters): ``lora_alpha = text_encoder_lora_rank *
    lora_alpha_multiplier``; the exported file carries it."""
    session = _session(images, dataset, tmp_path, max_train_steps=2, text_encoder_lora_optimizer="adamw",
                       text_encoder_lora_rank=4, lora_alpha_multiplier=2.0, save_dtype="fp32")
    for encoder in session.models.text_encoders:
        config = encoder.peft_config["default"]
        assert (config.r, config.lora_alpha) == (4, 8.0)
    result = loop.run(session, make_zip=False)
    lora = load_file(str(result.final_checkpoint / f"{result.run.name}_lora.safetensors"))
    te_alphas = {float(v) for k, v in lora.items() if k.startswith("lora_te") and k.endswith(".alpha")}
    assert te_alphas == {8.0}


def test_unet_lora_targets_include_conv2():
    """Eden (trainer/optimizer.py, get_unet_lora_parameters): ``target_modules = ["to_k", "to_q", "to_v",
    "to_out.0", "conv2"]`` (the export of those layers is checked in tests/export/test_lora_keys.py)."""
    from trainer.adapters.lora import UNET_TARGETS

    assert set(UNET_TARGETS) == {"to_k", "to_q", "to_v", "to_out.0", "conv2"}


def test_dora_turns_off_l1_and_weight_decay():
    """Eden (config.py): ``use_dora`` sets ``l1_penalty``, ``lora_weight_decay`` and ``text_encoder_lora_weight_decay``
    to 0."""
    config = load_config({"lora_training_urls": URL, "use_dora": True, "l1_penalty": 0.5, "lora_weight_decay": 0.1,
                          "text_encoder_lora_weight_decay": 0.1})
    assert (config.l1_penalty, config.lora_weight_decay, config.text_encoder_lora_weight_decay) == (0, 0, 0)
    plain = load_config({"lora_training_urls": URL})
    assert (plain.l1_penalty, plain.lora_weight_decay) == (0.03, 0.004)


# ------------------------------------------------------------------------------------------------ captions
def test_a_dropped_caption_becomes_the_trigger_tokens(images, dataset, tmp_path, model_cache):
    """Eden (main.py): ``if np.random.rand() < config.caption_dropout: captions[i] = config.token_dict["TOK"]``."""
    seen: list[str] = []
    session = _session(images, dataset, tmp_path, max_train_steps=2, caption_dropout=1.0)
    original = session.text.encode

    def spy(texts):
        seen.extend(texts)
        return original(texts)

    session.text.encode = spy
    loop.run(session, make_zip=False)
    assert seen and set(seen) == {"<s0><s1>"}
    # Without trained tokens there is nothing to stand for the concept: the dropped caption is empty.
    no_ti = _session(images, dataset, tmp_path / "no-ti", max_train_steps=2, caption_dropout=1.0, disable_ti=True)
    assert no_ti.dropout_caption == ""


def test_prompt_modifier_is_a_format_template():
    """Eden (preprocess.py): ``captions = [config.prompt_modifier.format(caption) for caption in captions]`` after
    the trigger is placed."""
    assert place_trigger("a cat", "TOK", "object", prompt_modifier="{} in pixel art") == "TOK, a cat in pixel art"
    # A template without {} replaces the caption (str.format), and TOK is put back in front (the final TOK check).
    assert place_trigger("a cat", "TOK", "object", prompt_modifier="pixel art") == "TOK, pixel art"
    for bad in ("{name}", "{0.__class__}", "{} and {}", "{"):
        with pytest.raises(ConfigError, match="prompt_modifier"):
            load_config({"lora_training_urls": URL, "prompt_modifier": bad})


@pytest.mark.parametrize(("mode", "prefix", "caption", "expected"), [
    ("object", "", "a red disc", "TOK, a red disc"),
    ("face", "", "a man smiling", "TOK, a man smiling"),
    ("style", "", "a red disc", "in the style of TOK, a red disc"),
    ("object", "", "a TOK on a table", "TOK, a TOK on a table"),
    ("object", "a photo of", "a red disc", "TOK, a photo of, a red disc"),
    ("style", "a painting of TOK", "a red disc", "a painting of TOK, a red disc"),
    ("face", "a photo of TOK ,", "a man  smiling", "a photo of TOK, a man smiling"),
])
def test_caption_prefix_and_trigger_placement_per_mode(mode, prefix, caption, expected):
    """Eden (preprocess.py, post_process_captions): without ``caption_prefix`` the caption gets ``"TOK, "`` in front,
    ``"in the style of TOK, "`` in style mode, whatever it says; with one it becomes ``prefix + ", " + caption``;
    ``fix_prompt`` tidies; then ``"TOK, "`` goes in front of every caption without TOK
    (load_and_save_masks_and_captions)."""
    assert place_trigger(caption, "TOK", mode, prefix) == expected


def test_the_trigger_counts_as_given_wherever_its_letters_appear():
    """Eden (preprocess.py, load_and_save_masks_and_captions): ``"TOK, " + caption if "TOK" not in caption``, a
    case-sensitive test for the letters anywhere, inside words too, so a prefix such as "TOKYO street" leaves no
    trigger while "tokyo street" gets one; ``caption_trigger: where_given`` asks for the whole word (listed in the
    README's differences)."""
    assert place_trigger("a red disc", "TOK", "object", "TOKYO street") == "TOKYO street, a red disc"
    assert place_trigger("a red disc", "TOK", "object", "tokyo street") == "TOK, tokyo street, a red disc"
    assert place_trigger("a red disc", "TOK", "object", "TOKYO street", rule="where_given") == \
        "TOK, TOKYO street a red disc"


def test_disable_ti_adds_no_trigger(tmp_path):
    """Eden (preprocess.py): with ``disable_ti`` no trigger is placed (post_process_captions is skipped) and
    ``TOK`` is taken out of the captions, in every mode, style included."""
    assert place_trigger("a red disc", "TOK", "style", disable_ti=True) == "a red disc"
    assert place_trigger("TOK, a red disc", "TOK", "object", disable_ti=True) == ", a red disc"
    from trainer.data.prepare import prepare_dataset

    folder = make_concept_images(tmp_path / "images", n=2, captions=False)
    (folder / "img_00.txt").write_text("a TOK on a plain background")
    config = tiny_config(folder, tmp_path / "runs", concept_mode="style", disable_ti=True, augment_imgs_up_to_n=0)
    dataset = prepare_dataset(config, tmp_path / "work")
    assert sorted(s.caption for s in dataset.samples) == ["", "a on a plain background"]


# ------------------------------------------------------------------------------------------------ masks, samples
def test_face_mode_masks_with_clipseg_face():
    """Eden (config.py): in face mode ``mask_target_prompts = "face"``, which preprocess.py hands to CLIPSeg unless
    ``use_face_detection_instead``."""
    from trainer.data.masks import mask_method, mask_prompts

    face = load_config({"lora_training_urls": URL, "concept_mode": "face"})
    assert mask_method(face) == "clipseg" and mask_prompts(face) == ["face"]
    assert mask_method(load_config({"lora_training_urls": URL, "concept_mode": "face",
                                    "use_face_detection_instead": True})) == "face"
    assert mask_method(load_config({"lora_training_urls": URL, "concept_mode": "style"})) is None


def test_sample_lora_scale_defaults_per_model(images, dataset, tmp_path, model_cache, monkeypatch):
    """Eden (main.py): ``if not config.sample_imgs_lora_scale``: 0.75 for SDXL, 0.85 for SD1.5."""
    assert sample_lora_scale(None, "sdxl") == 0.75 and sample_lora_scale(None, "sd15") == 0.85
    assert sample_lora_scale(0.0, "sd15") == 0.85 and sample_lora_scale(0.6, "sdxl") == 0.6
    from trainer.inference import sampling
    from trainer.training import outputs

    used = []

    def fake_render(pipeline, prompts, **kwargs):
        used.append(kwargs["lora_scale"])
        return [Image.new("RGB", (64, 64))] * len(prompts)

    monkeypatch.setattr(sampling, "render", fake_render)
    for model, scale in (("tiny-sdxl", 0.75), ("tiny-sd15", 0.85)):
        session = _session(images, dataset, tmp_path / model, model=model, n_sample_imgs=1)
        outputs.render_samples(session, tmp_path / model / "out", 0)
        assert used[-1] == scale


def test_sample_size_defaults_per_model():
    """Eden (main.py): ``validation_img_size`` unset is 1024 for SDXL and 768 for SD1.5; preprocess.py turns an int
    into ``n = size²`` pixels at the training aspect ratio, ``[sqrt(n * ar), n / width]``, each rounded to 64."""
    assert sample_size(None, "sd15", (512, 512)) == (768, 768)
    assert sample_size(None, "sdxl", (512, 512)) == (1024, 1024)
    assert sample_size(None, "sdxl", (448, 576)) == (896, 1152)
    assert sample_size([600, 400], "sd15", (512, 512)) == (384, 576)


def test_training_size_keeps_the_mean_aspect_ratio():
    """Eden (preprocess.py, calculate_new_dimensions): the mean of width / height over the images, ``width =
    sqrt(resolution² * aspect)``, ``height = resolution² / width``, each rounded to the nearest multiple of 64:
    576x448 at 512 for a mean aspect of 1.33."""
    config = load_config({"lora_training_urls": URL, "resolution": 512})
    assert fixed_training_size(config, [(300, 400), (600, 800), (3, 4)]) == (448, 576)  # (height, width)
    assert fixed_training_size(config, [(400, 400)]) == (512, 512)
    # An explicit train_img_size or train_aspect_ratio still decides (Eden ignores both).
    assert fixed_training_size(load_config({"lora_training_urls": URL, "train_aspect_ratio": 1.0}),
                               [(300, 400)]) == (512, 512)


def test_training_size_from_prepared_images(tmp_path):
    from trainer.data.prepare import prepare_dataset

    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(2):
        Image.new("RGB", (400, 300), (40 * index, 90, 160)).save(folder / f"{index}.png")
    config = tiny_config(folder, tmp_path / "runs", resolution=512, augment_imgs_up_to_n=0)
    dataset = prepare_dataset(config, tmp_path / "work")
    assert {s.target_size for s in dataset.samples} == {(448, 576)}


# ------------------------------------------------------------------------------------------------ run
def test_run_name_comes_from_the_training_url(images, dataset, tmp_path, model_cache):
    """Eden (config.py): ``if not self.name: self.name = os.path.basename(self.lora_training_urls)[:40]``, then
    ``remove_delimiter_characters`` (checkpoint.py) turns `` /\\:*?"<>|`` into ``_``."""
    assert load_config({"lora_training_urls": URL}).run_name == "xander_5.zip"
    long = "https://host/" + "a" * 50 + ".zip?X-Amz-Signature=secret"
    assert load_config({"lora_training_urls": long}).run_name == "a" * 40
    assert load_config({"lora_training_urls": "https://host/my set:1.zip"}).run_name == "my_set_1.zip"
    assert load_config({"lora_training_urls": "https://host/sets/", "concept_mode": "face"}).run_name == "face"
    session = _session(images, dataset, tmp_path, max_train_steps=1)
    assert session.run.name == "set" and session.run_dir.name.startswith("set_")


@pytest.mark.parametrize("urls", [
    "https://user:secret@host", "https://user:secret@host/set.zip?X-Amz-Signature=secret",
    "https://host/a.zip|https://user:secret@internal", ["https://host/set.zip", "https://user:secret@internal"],
    "data:application/zip;base64,c2VjcmV0/c2VjcmV0",
])
def test_run_name_never_carries_what_a_url_hides(urls):
    """The name goes into file names and ``training_args.json``, which the zip publishes: of a URL only its path
    counts (Eden's basename of ``https://user:password@host`` would be ``user:password@host``)."""
    name = load_config({"lora_training_urls": urls}).run_name
    assert not any(part in name for part in ("secret", "user", "internal", "c2VjcmV0")), name
    assert name in ("set.zip", "style")


def test_max_train_steps_wins_over_num_train_epochs(images, dataset, tmp_path, model_cache):
    """Eden (main.py): ``config.num_train_epochs = ceil(config.max_train_steps / len(train_dataloader))``: the epochs
    are derived, so ``num_train_epochs`` alone still trains ``max_train_steps`` (300 by default)."""
    config = load_config({"lora_training_urls": URL, "num_train_epochs": 3})
    assert resolve_total_steps(config, batches_per_epoch=2) == 300
    session = _session(images, dataset, tmp_path, num_train_epochs=3, max_train_steps=6)
    assert session.total_steps == 6 and session.run.num_train_epochs == 3
    # An explicit max_train_steps: null trains by epochs (this project's extension).
    epochs = _session(images, dataset, tmp_path / "epochs", num_train_epochs=3, max_train_steps=None)
    assert epochs.total_steps == 6


def test_checkpoints_also_at_step_zero(images, dataset, tmp_path, model_cache):
    """Eden (main.py): a checkpoint whenever ``global_step % checkpointing_steps == 0 and global_step <
    max_train_steps - 25``, step 0 included, and ``checkpointing_steps < 1`` means ``max_train_steps`` (config.py)."""
    config = load_config({"lora_training_urls": URL, "checkpointing_steps": 100})
    assert [s for s in range(301) if checkpoint_due(config, s, 300)] == [0, 100, 200]
    zero = load_config({"lora_training_urls": URL, "checkpointing_steps": 0})
    assert [s for s in range(301) if checkpoint_due(zero, s, 300)] == [0]
    session = _session(images, dataset, tmp_path, max_train_steps=27, checkpointing_steps=10000)
    result = loop.run(session, make_zip=False)
    from trainer.training.checkpoint import list_checkpoints

    assert [s for s, _ in list_checkpoints(result.run_dir)] == [0, 27]
    # checkpoint-0 holds the untrained adapters: the LoRA up matrices start at zero.
    first = load_file(str(next((result.run_dir / "checkpoints" / "checkpoint-0").glob("*_lora.safetensors"))))
    assert all(torch.count_nonzero(v) == 0 for k, v in first.items() if k.endswith("lora_up.weight"))
    # The baseline is not a candidate for the checkpoint evaluation's recommendation.
    from trainer.evaluate.runner import inspect_run

    assert [s for s, _ in inspect_run(result.run_dir)[1]] == [27]
    every = load_config({"lora_training_urls": URL, "checkpointing_steps": 100, "checkpoint_rule": "every"})
    assert [s for s in range(301) if checkpoint_due(every, s, 300)] == [100, 200]


# ------------------------------------------------------------------------------------------------ config files
def test_keys_eden_tolerates_are_accepted_with_one_warning(caplog):
    """Eden's pydantic TrainingConfig ignores keys it does not define; its cog model passes ``verbose``, ``debug``,
    ``hard_pivot``, ``off_ratio_power``, ``run_name``; its saved configs carry ``device: cuda:N``."""
    from trainer.device import cuda_device_count

    with caplog.at_level(logging.WARNING):
        config = load_config({"lora_training_urls": URL, "verbose": True, "hard_pivot": False, "debug": True,
                              "off_ratio_power": 0.1, "run_name": "x", "device": "cuda:7"})
    warnings = [r.getMessage() for r in caplog.records if "mean nothing here" in r.getMessage()]
    assert len(warnings) == 1
    for key in ("verbose", "hard_pivot", "off_ratio_power", "run_name", "'cuda:7'"):
        assert key in warnings[0]
    assert config.debug is True
    assert config.device == ("cuda:7" if cuda_device_count() > 7 else "auto")
    with pytest.raises(ConfigError, match=r"unknown key 'verbos' \(did you mean 'verbose'\?\)"):
        load_config({"lora_training_urls": URL, "verbos": True})
    with pytest.raises(ConfigError, match=r"unknown key 'zzzz'$"):
        load_config({"lora_training_urls": URL, "zzzz": 1})


def test_values_eden_rounds_are_rounded_with_a_warning(caplog):
    """Eden rounds sizes to multiples of 64 (preprocess.py, round_to_nearest_multiple) instead of refusing them."""
    with caplog.at_level(logging.WARNING):
        config = load_config({"lora_training_urls": URL, "resolution": 600, "validation_img_size": [600, 400]})
    messages = " ".join(r.getMessage() for r in caplog.records)
    assert "resolution 600" in messages and "576x576" in messages
    assert "[600, 400] rounded to [576, 384]" in messages
    assert config.validation_img_size == [576, 384]
    assert fixed_training_size(config, [(100, 100)]) == (576, 576)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        config = load_config({"lora_training_urls": URL, "validation_img_size": 40})
    assert "validation_img_size 40 is not a multiple of 64" in caplog.text
    assert sample_size(config.validation_img_size, "sdxl", (512, 512)) == (64, 64)
    # Rounding is for values inside the bounds; past them a value is refused, not rounded into them.
    for past in ({"resolution": 2049}, {"resolution": 63}, {"validation_img_size": [2100, 512]},
                 {"validation_img_size": 7}):
        with pytest.raises(ConfigError, match="must be"):
            load_config({"lora_training_urls": URL, **past})


def test_concept_mode_defaults_to_style():
    """Eden's cog model: ``concept_mode ... default="style"``."""
    assert TrainingConfig.model_validate({"lora_training_urls": URL}).concept_mode == "style"
