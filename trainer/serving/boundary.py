"""What a training request from the network may name: the trust boundary of the cog server.

Everything a request carries (cog inputs, ``training_args``) is untrusted. Endpoints, credentials, local paths and
caches belong to the operator: the environment and the command line. So a request

- may name models by hub id (``org/name``) or by http(s) URL (fetched through :mod:`trainer.utils.download`, which
  refuses internal addresses), never by a path on the server, unless the operator sets
  ``TRAINER_ALLOW_LOCAL_SOURCES``;
- may name, by hub id, the server's default models and what the operator lists in ``TRAINER_ALLOWED_HUB_MODELS``
  only; those are then fetched under the rules of :mod:`trainer.models.hub` (size known before the download,
  deadline, nothing left behind by a failure), whatever ``TRAINER_ALLOW_LOCAL_SOURCES`` says;
- may not set the keys that only make sense on the server (caches, resumable runs, embedding files), under the same
  switch;
- may not choose the S3 endpoint, which would receive the server's signed requests, unless the operator sets
  ``TRAINER_ALLOW_REQUEST_S3_ENDPOINT``.

Values are judged by their form alone, never by looking at the disk: a file, a folder and a missing path get the same
answer, so a refusal tells the caller nothing about the server's files.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from trainer.models.hub import hub_model_problem
from trainer.models.loading import is_hub_id
from trainer.models.tiny import TINY_NAMES
from trainer.utils.env import ENV_ALLOW_LOCAL

#: Lets a request set ``s3_endpoint_url`` (the server's AWS credentials then sign requests to it).
ENV_ALLOW_REQUEST_S3_ENDPOINT = "TRAINER_ALLOW_REQUEST_S3_ENDPOINT"

#: Keys that name only the server's own files and folders.
SERVER_PATH_KEYS = {
    "resume_from": "resuming reads a run folder on the server",
    "model_cache_dir": "the model cache is the server's (TRAINER_MODEL_CACHE)",
    "initial_embedding_file": "the embedding file would be read from the server's disk",
}
#: Keys that name a model: a hub id, for some an http(s) URL, or (operator only) a local file or folder.
MODEL_KEYS = ("ckpt_path", "single_file_config", "caption_model_path", "clipseg_model_path", "evaluation_clip_model",
              "evaluation_aesthetic_weights")
URL_KEYS = {"ckpt_path", "evaluation_aesthetic_weights"}
#: Keys whose hub id is fetched from the Hugging Face hub (the aesthetic weights come by URL only).
HUB_KEYS = ("ckpt_path", "single_file_config", "caption_model_path", "clipseg_model_path", "evaluation_clip_model")
#: An OpenAI model name (``gpt-4o``, ``gpt-4o-2024-08-06``): what caption_model_path holds for gpt4-v.
_API_MODEL_NAME = re.compile(r"^[A-Za-z0-9][\w.:-]{0,99}$")


def _shown(value: str) -> str:
    return repr(value if len(value) <= 120 else value[:100] + "...")


def _is_url(value: str) -> bool:
    return value.lower().startswith(("http://", "https://"))


def _location_problem(key: str, value: Any, data: Mapping[str, Any]) -> str | None:
    """Why ``value`` of ``key`` may not come from a request (None: it may)."""
    if not isinstance(value, str) or not value.strip():
        return None  # not a location at all: the config reports a wrong type
    text = value.strip()
    if key in URL_KEYS and _is_url(text):
        return None
    if key == "ckpt_path" and text in TINY_NAMES:
        return None
    if is_hub_id(text) and key in HUB_KEYS:
        return None
    if key == "caption_model_path" and data.get("caption_model") == "gpt4-v" and _API_MODEL_NAME.match(text):
        return None
    accepted = {"evaluation_aesthetic_weights": "an http(s) URL",
                "ckpt_path": "a hub id (org/name) or an http(s) URL"}.get(key, "a hub id (org/name)")
    return (f"{key} {_shown(text)} is not {accepted}; paths on the server are not accepted from a request "
            f"(the operator can allow them with {ENV_ALLOW_LOCAL}=1)")


def requested_hub_models(data: Mapping[str, Any]) -> dict[str, str]:
    """The hub ids a request names for models the job will fetch: hub id -> the key that names it."""
    named: dict[str, str] = {}
    for key in HUB_KEYS:
        value = data.get(key)
        if key == "caption_model_path" and data.get("caption_model") == "gpt4-v":
            continue  # an OpenAI model name, not a hub repository
        if isinstance(value, str) and is_hub_id(value.strip()):
            named.setdefault(value.strip(), key)
    pretrained = data.get("pretrained_model")
    path = pretrained.get("path") if isinstance(pretrained, Mapping) else None
    ckpt_path = data.get("ckpt_path")
    if (ckpt_path is None or not str(ckpt_path).strip()) and isinstance(path, str) and is_hub_id(path.strip()):
        named.setdefault(path.strip(), "pretrained_model.path")
    return named


def check_request(data: Mapping[str, Any], *, allow_local: bool, allow_s3_endpoint: bool) -> None:
    """Refuse config values a network request may not set; one ``ValueError`` lists every refused key."""
    problems = []
    for hub_id, key in requested_hub_models(data).items():
        problem = hub_model_problem(hub_id, key)
        if problem:
            problems.append(problem)
    if not allow_local:
        for key, why in SERVER_PATH_KEYS.items():
            value = data.get(key)
            if value is not None and str(value).strip():
                problems.append(f"{key} may not be set by a request ({why}; the operator can allow it with "
                                f"{ENV_ALLOW_LOCAL}=1)")
        for key in MODEL_KEYS:
            problem = _location_problem(key, data.get(key), data)
            if problem:
                problems.append(problem)
        pretrained = data.get("pretrained_model")
        if isinstance(pretrained, Mapping):
            path, url = pretrained.get("path"), pretrained.get("url")
            problem = _location_problem("ckpt_path", path, data)
            if problem and not (isinstance(url, str) and _is_url(url)):
                problems.append("pretrained_model.path: " + problem.split(" ", 1)[1])
            if url is not None and not (isinstance(url, str) and _is_url(url.strip())):
                problems.append(f"pretrained_model.url {_shown(str(url))} is not an http(s) URL")
    endpoint = data.get("s3_endpoint_url")
    if not allow_s3_endpoint and endpoint is not None and str(endpoint).strip():
        problems.append(
            "s3_endpoint_url may not be set by a request: the server would sign requests to it with its own AWS "
            f"credentials. The operator sets the endpoint (AWS_ENDPOINT_URL_S3), or allows this key with "
            f"{ENV_ALLOW_REQUEST_S3_ENDPOINT}=1"
        )
    if problems:
        raise ValueError("; ".join(problems))
