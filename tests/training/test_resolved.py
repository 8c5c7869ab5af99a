"""The resolved run: what a run derives from its config, worked out without loading a model."""

from __future__ import annotations

import dataclasses
import time

import pytest

from trainer.config.load import load_config
from trainer.config.schema import MAX_TOKENS, MAX_TRAIN_STEPS
from trainer.training.resolved import (
    DRAWN_SEED_LIMIT,
    choose_seed,
    epochs_of,
    new_run_dir,
    resolve_run,
    resolve_tokens,
    resolve_total_steps,
    steps_per_epoch_of,
)

URL = "https://host.example/sets/xander.zip?X-Amz-Signature=secret"


def _config(**values):
    return load_config({"lora_training_urls": URL, "concept_mode": "object", **values})


def _words(text: str) -> int:
    """A stand-in tokenizer count: one token per word."""
    return len(text.split())


def test_tokens_come_from_the_config_unless_a_phrase_sets_their_number():
    assert resolve_tokens(_config(), _words) == (("<s0>", "<s1>", "<s2>"), {"TOK": "<s0><s1><s2>"})
    tokens, token_dict = resolve_tokens(_config(initial_phrase="a red wooden chair with legs"), _words)
    assert tokens == tuple(f"<s{i}>" for i in range(6)) and token_dict == {"TOK": "".join(tokens)}
    # A phrase of the configured length changes nothing; disable_ti trains no tokens.
    assert resolve_tokens(_config(initial_phrase="one two three"), _words)[0] == ("<s0>", "<s1>", "<s2>")
    assert resolve_tokens(_config(disable_ti=True), _words)[0] == ()


def test_a_phrase_that_contradicts_the_given_tokens_is_an_error():
    with pytest.raises(ValueError, match="has 2 tokens but n_tokens is 3; leave n_tokens unset"):
        resolve_tokens(_config(initial_phrase="red chair", n_tokens=3), _words)
    with pytest.raises(ValueError, match=f"more than the {MAX_TOKENS} new tokens"):
        resolve_tokens(_config(initial_phrase=" ".join(["word"] * (MAX_TOKENS + 1))), _words)


def test_steps_and_epochs_follow_edens_rule():
    config = _config(max_train_steps=10, gradient_accumulation_steps=2)
    assert resolve_total_steps(config, batches_per_epoch=7) == 10  # max_train_steps always wins
    assert steps_per_epoch_of(config, 7) == 4 and epochs_of(config, 10, 7) == 3  # ceil(10 * 2 / 7)
    by_epochs = _config(max_train_steps=None, num_train_epochs=5)
    assert resolve_total_steps(by_epochs, batches_per_epoch=3) == 15
    with pytest.raises(ValueError, match=f"over the limit of {MAX_TRAIN_STEPS}"):
        resolve_total_steps(_config(max_train_steps=None, num_train_epochs=MAX_TRAIN_STEPS), batches_per_epoch=2)


def test_the_seed_is_the_configs_or_drawn():
    assert choose_seed(_config(seed=7)) == 7
    drawn = {choose_seed(_config()) for _ in range(5)}
    assert all(0 <= seed < DRAWN_SEED_LIMIT for seed in drawn) and len(drawn) > 1


def test_run_folders_never_collide(tmp_path):
    config = _config(output_dir=str(tmp_path))
    first = new_run_dir(config)
    assert first.parent == tmp_path and first.name.startswith("xander_zip_")  # Eden's name, no query
    first.mkdir()
    second = new_run_dir(config)
    assert second != first and not second.exists()
    if second.name.startswith(first.name):  # the same second: a suffix tells them apart
        assert second.name == f"{first.name}-1"


def test_the_resolved_run_is_frozen_and_the_config_stays_as_validated(tmp_path):
    config = _config(initial_phrase="a red wooden chair", seed=None, validation_img_size=None)
    before = config.model_dump()
    tokens, token_dict = resolve_tokens(config, _words)
    run = resolve_run(config, run_dir=tmp_path, seed=11, start_time=time.time() - 5, version="sd15", tokens=tokens,
                      token_dict=token_dict, batches_per_epoch=4, train_size=(512, 384))
    assert (run.name, run.total_steps, run.num_train_epochs, run.steps_per_epoch) == ("xander.zip", 300, 75, 4)
    assert run.sample_size == (896, 640)  # about 768² pixels at the training aspect, sides multiples of 64
    assert run.trigger == "TOK" and run.token_string == "<s0><s1><s2><s3>" and run.dropout_caption == run.token_string
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.seed = 3  # type: ignore[misc]
    with pytest.raises(TypeError):
        run.token_dict["TOK"] = "x"  # type: ignore[index]

    args = run.training_args(config, now=run.start_time + 12.5)
    assert (args["name"], args["seed"], args["sd_model_version"], args["max_train_steps"]) == ("xander.zip", 11,
                                                                                             "sd15", 300)
    assert args["num_train_epochs"] == 75 and args["n_tokens"] == 4 and args["token_dict"] == {"TOK": run.token_string}
    assert args["job_time"] == pytest.approx(12.5) and args["start_time"] == run.start_time
    assert "secret" not in str(args)
    assert config.model_dump() == before
    # What the run wrote loads again: its bookkeeping is read and ignored, its resolved values are settings.
    again = load_config(args)
    assert again.n_tokens == 4 and again.seed == 11 and again.max_train_steps == 300


def test_without_tokens_the_config_keeps_its_token_fields(tmp_path):
    config = _config(disable_ti=True)
    tokens, token_dict = resolve_tokens(config, _words)
    run = resolve_run(config, run_dir=tmp_path, seed=1, start_time=0.0, version="sdxl", tokens=tokens,
                      token_dict=token_dict, batches_per_epoch=2, train_size=(1024, 1024))
    assert run.token_string is None and run.dropout_caption == ""
    args = run.training_args(config)
    assert args["inserting_list_tokens"] == config.inserting_list_tokens and args["job_time"] == 0.0
    assert run.sample_size == (1024, 1024)
