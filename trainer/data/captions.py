"""Caption text rules: where the trigger goes and how it becomes the trained tokens."""

from __future__ import annotations

import re

STYLE_TEMPLATE = "in the style of {trigger}"


def trigger_pattern(trigger: str) -> re.Pattern[str]:
    # Word boundaries only, so that "TOK" never matches inside "TOKYO" or "tokyo".
    return re.compile(rf"(?<![\w<>]){re.escape(trigger)}(?![\w<>])")


def contains_trigger(text: str, trigger: str) -> bool:
    return bool(trigger_pattern(trigger).search(text))


def replace_trigger(text: str, trigger: str, replacement: str) -> str:
    """Replace whole-word occurrences of ``trigger`` by ``replacement`` (the new token string)."""
    return trigger_pattern(trigger).sub(lambda _: replacement, text)


def place_trigger(caption: str, trigger: str, concept_mode: str, caption_prefix: str = "",
                  prompt_modifier: str | None = None) -> str:
    """Build the training caption: the trigger placed per concept mode, then the prefix, caption and modifier.

    face/object: ``"TOK, <prefix> <caption>"``; style: ``"in the style of TOK, <prefix> <caption>"``. A caption that
    already names the trigger keeps it where it is.
    """
    caption = " ".join(caption.split())
    parts = []
    if caption_prefix.strip():
        parts.append(caption_prefix.strip())
    if caption:
        parts.append(caption)
    body = " ".join(parts)
    if not contains_trigger(body, trigger):
        lead = STYLE_TEMPLATE.format(trigger=trigger) if concept_mode == "style" else trigger
        body = f"{lead}, {body}" if body else lead
    if prompt_modifier and prompt_modifier.strip():
        body = f"{body}, {prompt_modifier.strip()}"
    return body
