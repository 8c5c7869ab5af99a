"""Caption text rules: where the trigger goes, how it becomes the trained tokens, and tidying generated text.

The training caption follows Eden's preprocessing (``post_process_captions`` and
``load_and_save_masks_and_captions`` in trainer/preprocess.py of edenartlab/sd-lora-trainer): the caption is tidied
(its ``fix_prompt``), the trigger (or ``caption_prefix``) put in front, ``prompt_modifier`` applied as a
``str.format`` template, and ``TOK, `` put in front of what still lacks the trigger. The one deliberate difference:
the trigger matches as a whole word only, where Eden's substring tests also hit ``TOKYO``.
"""

from __future__ import annotations

import re

STYLE_TEMPLATE = "in the style of {trigger}"
#: Longest caption kept (characters); CLIP reads 77 tokens, so anything longer is a mistake in the input.
MAX_CAPTION_CHARS = 2000

# BLIP's training data was scraped with alt texts such as "arafed", "araffe" (from "a raffle"): known artefacts.
_BLIP_ARTEFACTS = re.compile(r"\b(?:ara+f+[a-z]*|arafy)\b\s*", re.IGNORECASE)
# Florence-2 and GPT open descriptions with a frame that says nothing about the picture.
_LEAD_INS = re.compile(
    r"^(?:(?:the|this) (?:image|picture|photo(?:graph)?|illustration|painting|artwork)"
    r"(?: (?:shows|depicts|features|displays|is of|contains|captures|presents))?|in (?:this|the) "
    r"(?:image|picture|photo(?:graph)?)|there (?:is|are))[\s,:]+",
    re.IGNORECASE,
)
_SPECIAL_TOKENS = re.compile(r"</?s>|<pad>|<unk>|\[(?:CLS|SEP|PAD|UNK)\]")
_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    # Word boundaries only, so that "TOK" never matches inside "TOKYO" or "tokyo".
    return re.compile(rf"(?<![\w<>]){re.escape(trigger)}(?![\w<>])")


def contains_trigger(text: str, trigger: str) -> bool:
    return bool(trigger_pattern(trigger).search(text))


def replace_trigger(text: str, trigger: str, replacement: str) -> str:
    """Replace whole-word occurrences of ``trigger`` by ``replacement`` (the new token string)."""
    return trigger_pattern(trigger).sub(lambda _: replacement, text)


def normalise_whitespace(text: str) -> str:
    return " ".join(text.split())


def eden_fix_prompt(text: str) -> str:
    """Eden's ``fix_prompt`` (trainer/utils/utils.py): one space between words, no doubled commas, ``", "`` around
    commas and ``". "`` around full stops."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r",,", ",", text)
    text = re.sub(r"\s?,\s?", ", ", text)
    text = re.sub(r"\s?\.\s?", ". ", text)
    return text.strip()


def apply_prompt_modifier(template: str | None, text: str) -> str:
    """Eden's ``prompt_modifier.format(caption)``; the template was checked when the config was loaded."""
    return template.format(text) if template else text


def place_trigger(caption: str, trigger: str, concept_mode: str, caption_prefix: str = "",
                  prompt_modifier: str | None = None, *, disable_ti: bool = False, rewritten: bool = False,
                  rule: str = "eden") -> str:
    """Build the training caption, as Eden does.

    - no ``caption_prefix``: ``TOK, <caption>`` (face, object) or ``in the style of TOK, <caption>`` (style), even
      when the caption names the trigger already; captions a GPT pass ``rewritten`` around the trigger keep it;
    - with a prefix: ``<prefix>, <caption>``;
    - then ``prompt_modifier`` as a template, then ``TOK, `` in front when the trigger is still missing;
    - ``disable_ti``: no trigger at all, and the trigger word is taken out of the caption.

    ``rule="where_given"`` (``caption_trigger``) keeps this project's earlier placement instead: a caption or prefix
    that names the trigger keeps it where it is and gets no lead.
    """
    text = eden_fix_prompt(caption)
    if disable_ti:
        text = apply_prompt_modifier(prompt_modifier, text)
        text = re.sub(trigger_pattern(trigger).pattern + r", ", ", ", text)
        return normalise_whitespace(replace_trigger(text, trigger, ""))
    prefix = normalise_whitespace(caption_prefix)
    if rule == "where_given":
        body = " ".join(part for part in (prefix, normalise_whitespace(caption)) if part)
        if not contains_trigger(body, trigger):
            lead = STYLE_TEMPLATE.format(trigger=trigger) if concept_mode == "style" else trigger
            body = f"{lead}, {body}" if body else lead
        text = body
    elif prefix:
        text = eden_fix_prompt(f"{prefix}, {text}")
    elif not rewritten:
        lead = STYLE_TEMPLATE.format(trigger=trigger) if concept_mode == "style" else trigger
        text = eden_fix_prompt(f"{lead}, {text}")
    text = apply_prompt_modifier(prompt_modifier, text)
    # Eden's last check (`"TOK" not in caption`) looks for the trigger's letters anywhere, inside words too, so a
    # prefix such as "TOKYO street" leaves the caption without a trigger; `where_given` asks for the whole word.
    named = contains_trigger(text, trigger) if rule == "where_given" else trigger in text
    if not named:
        text = f"{trigger}, {text}"
    return text


def clean_caption_text(text: str) -> str:
    """Tidy a caption read from a file: one line, no surrounding quotes, at most ``MAX_CAPTION_CHARS``."""
    text = normalise_whitespace(text.replace("\x00", " "))
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text[:MAX_CAPTION_CHARS].strip()


def clean_generated_caption(text: str) -> str:
    """Tidy model output: special tokens, BLIP's "arafed" artefacts, "The image shows" lead-ins, final full stop.

    Idempotent: cleaning a cleaned caption changes nothing.
    """
    previous = None
    text = clean_caption_text(_SPECIAL_TOKENS.sub(" ", text))
    while text != previous:
        previous = text
        text = _BLIP_ARTEFACTS.sub("", text)
        stripped = _LEAD_INS.sub("", text, count=1)
        if stripped != text and stripped:
            text = stripped[0].lower() + stripped[1:]
        text = normalise_whitespace(text).strip(" ,;:").rstrip(".").strip()
        if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
            text = text[1:-1].strip()
    return text


def swap_left_right(text: str) -> str:
    """Swap the words left and right (keeping their case): the caption of a mirrored copy."""

    def swap(match: re.Match[str]) -> str:
        word = match.group(1)
        other = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return other.upper()
        if word[0].isupper():
            return other.capitalize()
        return other

    return _LEFT_RIGHT.sub(swap, text)
