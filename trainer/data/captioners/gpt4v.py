"""Captions from OpenAI's vision models over the plain HTTP API (``POST {base}/chat/completions``).

The key comes from ``OPENAI_API_KEY``; ``OPENAI_BASE_URL`` points elsewhere (Azure-style proxies, local servers that
speak the same API). Without a key, asking for ``gpt4-v`` captions is a clear error before anything is sent. The key
never appears in messages or logs.

With ``skip_gpt_cleanup`` off (and no ``caption_prefix``, which replaces it), a second, text-only request rewrites
the captions of face and object runs so that they name the concept by the trigger word, as the Eden trainer did.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests
from PIL import Image
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError

from trainer.data.captioners.base import Captioner
from trainer.data.captions import contains_trigger
from trainer.data.errors import DataError
from trainer.data.limits import DataLimits
from trainer.utils.download import redact_url
from trainer.utils.retry import RETRY_STATUSES, http_retry

logger = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.openai.com/v1"
DEFAULT_MODEL = "gpt-4o"
MAX_WORKERS = 4
CLEANUP_BATCH = 20

SYSTEM_PROMPT = (
    "You write captions for training a text-to-image model. Answer with the caption only: one sentence of at most "
    "40 words, concrete and visual, no preamble and no quotation marks."
)
USER_PROMPTS = {
    "face": "Describe this photo: the person's pose, expression, clothing, hair, the framing and the background. "
    "Do not name or guess who the person is.",
    "object": "Describe this image: the main object, what surrounds it, the lighting and the composition.",
    "style": "Describe what this image shows: subjects, composition and setting. Do not describe its artistic "
    "style, medium or technique.",
}
CLEANUP_PROMPT = (
    "Here are {n} image captions as a JSON list. Rewrite each so that it refers to the main {subject} as {trigger} "
    "(for example: 'a photo of {trigger} wearing a red jacket'), keeping every other detail. Answer with a JSON "
    "list of {n} strings only.\n{captions}"
)


class OpenAIError(DataError):
    """The OpenAI API refused or failed a request; the message says what to check."""


class OpenAIClient:
    def __init__(self, api_key: str, base_url: str, model: str, limits: DataLimits) -> None:
        self.api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.limits = limits
        self._session = requests.Session()
        # The one retry policy; a chat completion is retried although it is a POST (it changes nothing remotely).
        retry = http_retry(limits.http_retries, limits.http_backoff, methods=("POST",))
        self._session.mount("http://", HTTPAdapter(max_retries=retry))
        self._session.mount("https://", HTTPAdapter(max_retries=retry))

    @classmethod
    def from_environment(cls, model: str | None, limits: DataLimits) -> OpenAIClient:
        key = os.environ.get("OPENAI_API_KEY", "").strip()
        if not key:
            raise OpenAIError(
                "caption_model gpt4-v needs an OpenAI API key: set OPENAI_API_KEY (and OPENAI_BASE_URL for another "
                "endpoint), or choose caption_model blip, florence or no_caption"
            )
        base = os.environ.get("OPENAI_BASE_URL", "").strip() or DEFAULT_BASE_URL
        return cls(key, base, model or DEFAULT_MODEL, limits)

    def chat(self, messages: list[dict], max_tokens: int, what: str) -> str:
        """One chat completion; 429, 5xx, timeouts and connection errors are retried by the one retry policy."""
        url = f"{self.base_url}/chat/completions"
        shown = redact_url(url)
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                   "temperature": 0.2}
        headers = {"Authorization": f"Bearer {self.api_key}", "Content-Type": "application/json"}
        attempts = self.limits.http_retries + 1
        try:
            response = self._session.post(url, json=payload, headers=headers, timeout=self.limits.http_timeout)
        except requests.exceptions.RequestException as error:
            failure = "timed out" if _timed_out(error) else f"could not connect ({type(error).__name__})"
            raise self._gave_up(shown, what, failure, attempts) from None
        if response.status_code in RETRY_STATUSES:
            raise self._gave_up(shown, what, f"HTTP {response.status_code}", attempts)
        if response.status_code >= 400:
            raise self._refusal(response, shown, what)
        return self._content(response, shown, what)

    def _gave_up(self, shown: str, what: str, failure: str, attempts: int) -> OpenAIError:
        return OpenAIError(f"captioning {what}: the OpenAI API at {shown} failed ({failure}) after {attempts} "
                           "attempts; try again later or choose another caption_model")

    def _refusal(self, response, shown: str, what: str) -> OpenAIError:
        status = response.status_code
        if status == 401:
            return OpenAIError(f"captioning {what}: the OpenAI API rejected the key (HTTP 401); check OPENAI_API_KEY")
        if status == 403:
            return OpenAIError(f"captioning {what}: the key may not use model {self.model!r} (HTTP 403)")
        if status == 404:
            return OpenAIError(
                f"captioning {what}: {shown} or model {self.model!r} was not found (HTTP 404); check OPENAI_BASE_URL "
                "and caption_model_path"
            )
        try:
            detail = str(response.json().get("error", {}).get("message", ""))[:200]
        except ValueError:
            detail = ""
        return OpenAIError(f"captioning {what}: the OpenAI API refused the request (HTTP {status}) {detail}".strip())

    @staticmethod
    def _content(response, shown: str, what: str) -> str:
        try:
            content = response.json()["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise OpenAIError(f"captioning {what}: unexpected answer from {shown} (no choices[0].message)") from None
        if isinstance(content, list):  # content parts
            content = " ".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content or "")


def _timed_out(error: requests.exceptions.RequestException) -> bool:
    if isinstance(error, requests.exceptions.Timeout):
        return True
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(reason, (ConnectTimeoutError, ReadTimeoutError))


def image_data_url(image: Image.Image, max_side: int = 512) -> str:
    image = image.copy()
    image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


class GPT4VCaptioner(Captioner):
    name = "gpt4-v"
    batch_size = 8
    input_side = 512

    def __init__(self, client: OpenAIClient, concept_mode: str) -> None:
        self.client = client
        self.prompt = USER_PROMPTS.get(concept_mode, USER_PROMPTS["object"])

    def _one(self, image: Image.Image) -> str:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": [
                {"type": "text", "text": self.prompt},
                {"type": "image_url", "image_url": {"url": image_data_url(image, self.input_side), "detail": "low"}},
            ]},
        ]
        return self.client.chat(messages, max_tokens=120, what="an image")

    def caption(self, images: list[Image.Image]) -> list[str]:
        with ThreadPoolExecutor(max_workers=min(MAX_WORKERS, len(images))) as pool:
            return list(pool.map(self._one, images))


def inject_trigger(client: OpenAIClient, captions: list[str], trigger: str, concept_mode: str) -> list[str]:
    """Let GPT rewrite captions so that they name the concept by ``trigger``; captions it fails on stay as they were."""
    subject = "person" if concept_mode == "face" else "object"
    result = list(captions)
    for start in range(0, len(captions), CLEANUP_BATCH):
        batch = captions[start:start + CLEANUP_BATCH]
        prompt = CLEANUP_PROMPT.format(n=len(batch), subject=subject, trigger=trigger,
                                       captions=json.dumps(batch, ensure_ascii=False))
        answer = client.chat([{"role": "user", "content": prompt}], max_tokens=120 * len(batch) + 50,
                             what="the trigger rewrite")
        rewritten = _parse_list(answer, len(batch))
        if rewritten is None:
            logger.warning("the GPT trigger rewrite answered in an unexpected form; keeping those captions as they are")
            continue
        for offset, text in enumerate(rewritten):
            if contains_trigger(text, trigger):
                result[start + offset] = text
    return result


def _parse_list(answer: str, expected: int) -> list[str] | None:
    match = re.search(r"\[.*\]", answer, re.DOTALL)
    if not match:
        return None
    try:
        items = json.loads(match.group(0))
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or len(items) != expected or not all(isinstance(i, str) for i in items):
        return None
    return items
