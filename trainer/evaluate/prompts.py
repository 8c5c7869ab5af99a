"""The fixed evaluation prompt set: per concept mode, each prompt with the trained token and without it.

Every checkpoint and LoRA scale renders the same prompts with the same seeds, so differences between checkpoints
come from the weights and not from the noise (paired comparison). Each prompt comes with its *adherence text*: the
prompt with the trained token taken out, which CLIP compares the image with. Scoring against the prompt with the
token would reward the image for matching whatever CLIP makes of ``<s0><s1>`` (nothing useful); scoring against the
rest of the prompt measures whether the LoRA still follows the words around the concept ("on a beach at sunset",
"oil painting"), which is what an overfit LoRA stops doing.

- face / object: the token is replaced by the subject phrase (the word or phrase the tokens were initialised from,
  so "TOK walking on a beach" is judged as "a person walking on a beach");
- style: the style clause is dropped ("a lighthouse in a storm, in the style of TOK" → "a lighthouse in a storm").

The prompts avoid the concept's own look (no colours or materials of the subject) so that adherence and likeness do
not measure the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.captions import replace_trigger

#: The placeholder the templates use for the trained tokens (replaced by the bundle's own trigger).
TEMPLATE_TRIGGER = "TOK"
#: Where the adherence templates put the subject phrase.
SUBJECT = "{subject}"

# (prompt with the token, adherence text). Ordered by importance: a smaller evaluation takes the first N.
PROMPT_SETS: dict[str, tuple[tuple[str, str], ...]] = {
    "face": (
        ("a photo of TOK", "a photo of {subject}"),
        ("TOK as a knight in shining armour, oil painting", "{subject} as a knight in shining armour, oil painting"),
        ("TOK walking on a beach at sunset", "{subject} walking on a beach at sunset"),
        ("a pencil sketch of TOK", "a pencil sketch of {subject}"),
        ("TOK wearing a spacesuit on the moon", "{subject} wearing a spacesuit on the moon"),
        ("a portrait of TOK smiling, studio lighting", "a portrait of {subject} smiling, studio lighting"),
    ),
    "object": (
        ("a photo of TOK", "a photo of {subject}"),
        ("TOK on a wooden table, product photo", "{subject} on a wooden table, product photo"),
        ("TOK in a snowy forest clearing", "{subject} in a snowy forest clearing"),
        ("a watercolour painting of TOK", "a watercolour painting of {subject}"),
        ("TOK floating in outer space", "{subject} floating in outer space"),
        ("a pencil sketch of TOK", "a pencil sketch of {subject}"),
    ),
    "style": (
        ("a mountain landscape, in the style of TOK", "a mountain landscape"),
        ("a portrait of an old man, in the style of TOK", "a portrait of an old man"),
        ("a busy city street at night, in the style of TOK", "a busy city street at night"),
        ("a cat sleeping on a sofa, in the style of TOK", "a cat sleeping on a sofa"),
        ("a bowl of fruit on a table, in the style of TOK", "a bowl of fruit on a table"),
        ("a lighthouse in a storm, in the style of TOK", "a lighthouse in a storm"),
    ),
}

#: The subject word when the run named none (the same words the token initialisation uses per mode).
DEFAULT_SUBJECTS = {"face": "person", "object": "object", "style": "style"}


@dataclass(frozen=True)
class EvalPrompt:
    index: int
    prompt: str
    """The prompt as rendered, with the bundle's trigger (the generator swaps in the trained tokens)."""
    adherence_text: str
    """What CLIP compares the image with: the prompt without the trained token."""
    seed: int


def subject_phrase(training_args: dict) -> str:
    """The phrase that stands in for the concept in adherence texts, with an article ("a person", "an apple")."""
    mode = training_args.get("concept_mode", "object")
    phrase = (training_args.get("initial_phrase") or training_args.get("initializer_token")
              or DEFAULT_SUBJECTS.get(mode, "object"))
    phrase = " ".join(str(phrase).split())
    if phrase.lower().split(" ", 1)[0] in ("a", "an", "the") or " " in phrase:
        # A multi-word phrase reads as given ("a bearded man", "my red car"); only a bare word gets an article.
        return phrase
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def evaluation_prompts(concept_mode: str, *, trigger: str = TEMPLATE_TRIGGER, subject: str = "a person",
                       n_prompts: int | None = None, seed: int = 0) -> list[EvalPrompt]:
    """The first ``n_prompts`` prompts of the mode's set (all when None); prompt i renders with seed ``seed + i``."""
    if concept_mode not in PROMPT_SETS:
        raise ValueError(f"concept_mode must be one of {sorted(PROMPT_SETS)}, got {concept_mode!r}")
    templates = PROMPT_SETS[concept_mode]
    if n_prompts is not None and not 1 <= n_prompts <= len(templates):
        raise ValueError(f"the {concept_mode} prompt set has {len(templates)} prompts; n_prompts must be 1 to "
                         f"{len(templates)}, got {n_prompts}")
    chosen = templates[: n_prompts or len(templates)]
    return [
        EvalPrompt(index=i, prompt=replace_trigger(prompt, TEMPLATE_TRIGGER, trigger),
                   adherence_text=adherence.replace(SUBJECT, subject), seed=seed + i)
        for i, (prompt, adherence) in enumerate(chosen)
    ]
