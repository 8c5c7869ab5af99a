"""The fixed prompt set: seeded, per concept mode, with the token taken out for adherence."""

from __future__ import annotations

import pytest

from trainer.data.captions import contains_trigger
from trainer.evaluate.prompts import PROMPT_SETS, evaluation_prompts, subject_phrase


@pytest.mark.parametrize("mode", sorted(PROMPT_SETS))
def test_every_prompt_has_the_token_and_its_adherence_text_has_not(mode):
    prompts = evaluation_prompts(mode, trigger="TOK", subject="a person", seed=10)
    assert len(prompts) == 6
    assert [p.seed for p in prompts] == list(range(10, 16))
    for prompt in prompts:
        assert contains_trigger(prompt.prompt, "TOK")
        assert "TOK" not in prompt.adherence_text and "{subject}" not in prompt.adherence_text
        if mode == "style":
            assert prompt.prompt.startswith(prompt.adherence_text) and "style" not in prompt.adherence_text
        else:
            assert "a person" in prompt.adherence_text
    # The same call gives the same set: checkpoints and runs are compared on identical prompts and seeds.
    assert prompts == evaluation_prompts(mode, trigger="TOK", subject="a person", seed=10)


def test_another_trigger_and_fewer_prompts():
    prompts = evaluation_prompts("object", trigger="zwx", subject="a mug", n_prompts=2)
    assert [p.prompt for p in prompts] == ["a photo of zwx", "zwx on a wooden table, product photo"]
    assert [p.adherence_text for p in prompts] == ["a photo of a mug", "a mug on a wooden table, product photo"]
    with pytest.raises(ValueError, match="n_prompts must be 1 to 6, got 7"):
        evaluation_prompts("object", n_prompts=7)
    with pytest.raises(ValueError, match="concept_mode must be one of"):
        evaluation_prompts("animal")


def test_subject_phrase_comes_from_the_token_initialisation():
    assert subject_phrase({"concept_mode": "face"}) == "a person"
    assert subject_phrase({"concept_mode": "object"}) == "an object"
    assert subject_phrase({"concept_mode": "object", "initializer_token": "apple"}) == "an apple"
    assert subject_phrase({"concept_mode": "face", "initial_phrase": "a bearded man"}) == "a bearded man"
    assert subject_phrase({"concept_mode": "object", "initial_phrase": "red  sports car"}) == "red sports car"
