"""A trained LoRA as delivered: a zip (from train.py or ``python -m trainer``) or a checkpoint folder, or Eden's
``.tar`` or folder (see :mod:`trainer.inference.eden_layout`).

It names its base model (``training_args.json``), its tokens (``special_params.json``) and its weight files, so a
predictor can rebuild the trained model from it alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from trainer.config.schema import MAX_TOKEN_CHARS, MAX_TOKENS
from trainer.data.ingest.archives import unpack_untrusted
from trainer.data.limits import DataLimits
from trainer.evaluate.recommended import recommended_scale
from trainer.inference import eden_layout
from trainer.models.loading import ModelSource, is_hub_id, resolve_source
from trainer.utils.atomic import atomic_dir

logger = logging.getLogger(__name__)

#: A delivered zip is at most a few hundred MB (LoRA, embeddings, samples); refuse archives far beyond that.
MAX_BUNDLE_BYTES = 8 << 30
#: What a bundle zip may unpack to: its files are weights and JPEGs, which barely compress, so a high ratio can only
#: be a bomb; a bundle holds tens of files, not thousands.
BUNDLE_LIMITS = DataLimits(max_download_bytes=MAX_BUNDLE_BYTES, max_total_bytes=MAX_BUNDLE_BYTES,
                           max_archive_entries=2000, max_total_files=2000, max_compression_ratio=20.0,
                           ratio_check_min_bytes=32 << 20, max_archive_depth=1)
#: training_args.json and special_params.json are a few KiB.
MAX_JSON_BYTES = 1 << 20


@dataclass
class LoraBundle:
    folder: Path
    lora: Path | None
    embeddings: Path | None
    unet_dir: Path | None
    token_dict: dict[str, str]
    training_args: dict
    version: str
    layout: str = eden_layout.OURS
    """``ours`` or ``eden``: whose file names, key names and token rule the folder follows."""
    token_names: list[str] | None = None
    """The tokens of the embedding rows when the layout fixes them (Eden: ``<s0>``, ``<s1>``, ...)."""
    local_paths: bool = True
    """Whether ``training_args.json`` may name a base model on this machine's disk: only for the operator's own
    bundles. An archive from a request (or a URL), in either layout, names hub ids and URLs only, fetched through
    the guarded client."""

    @property
    def trigger(self) -> str:
        return next(iter(self.token_dict), "TOK")

    @property
    def token_string(self) -> str:
        return self.token_dict.get(self.trigger, self.trigger)

    @property
    def tokens(self) -> list[str]:
        if self.embeddings is None:
            return []
        if self.token_names is not None:
            return self.token_names
        return self.training_args.get("inserting_list_tokens") or []

    @property
    def recommended_lora_scale(self) -> float | None:
        """The LoRA scale the zip's checkpoint evaluation recommends for these weights, when it carries one."""
        return recommended_scale(self.folder, self.training_args.get("max_train_steps"))

    def base_source(self, cache_dir: Path, override: str | None = None) -> ModelSource:
        """The model this LoRA was trained on (or ``override``, for example a local copy of it)."""
        args = self.training_args
        location = override or args.get("ckpt_path")
        pretrained = None if location else args.get("pretrained_model")
        return resolve_source(location, pretrained, args.get("sd_model_version"), cache_dir,
                              local_paths=self.local_paths or override is not None)

    def named_hub_models(self) -> dict[str, str]:
        """The hub id this bundle's ``training_args.json`` names as its base model (id -> the key that names it):
        for a bundle from a request, fetched under the rules for requests (:mod:`trainer.models.hub`)."""
        args = self.training_args
        location, key = args.get("ckpt_path"), "ckpt_path"
        pretrained = args.get("pretrained_model")
        if not location and isinstance(pretrained, dict):
            location, key = pretrained.get("path"), "pretrained_model.path"
        if isinstance(location, str) and is_hub_id(location.strip()):
            return {location.strip(): f"the LoRA's training_args.json {key}"}
        return {}

    @classmethod
    def open(cls, path: Path, work_dir: Path | None = None, *, local_paths: bool = True) -> LoraBundle:
        """Open a checkpoint folder, an unpacked bundle, a zip or an Eden ``.tar`` (unpacked into ``work_dir``).

        Any archive (our zip, Eden's tar, plain or recompressed) is unpacked by the same code and under the same
        kind of limits as training archives (:func:`extract_bundle`), and what its files say is checked and clamped
        (:func:`read_training_args`, :func:`read_token_dict`), whichever layout they follow: it may come from anyone.
        """
        path = Path(path)
        label = None
        if path.is_file():
            label = path.name
            kind = eden_layout.archive_kind(path)
            if kind is None:
                raise ValueError(f"{path.name} is not a zip file (nor a tar archive); expected the zip a training "
                                 "produced, or the .tar of Eden's trainer")
            target = Path(work_dir or path.parent) / f"{path.stem}-{_digest(path)}"
            if not target.is_dir():
                with atomic_dir(target, replace=False) as tmp:
                    extract_bundle(path, tmp)
            path = target
        if not path.is_dir():
            raise ValueError(f"{path} does not exist")
        path = eden_layout.bundle_root(path)
        files = eden_layout.find_bundle_files(path, label)
        training_args = read_training_args(files.training_args)
        embeddings, token_names = files.embeddings, None
        if embeddings is not None:
            rows = eden_layout.embedding_rows(embeddings, max_rows=MAX_TOKENS)
            if rows == 0:
                embeddings = None  # a run without new tokens: the file is there for Eden's loaders only
            elif files.layout == eden_layout.EDEN:
                token_names = eden_layout.eden_tokens(rows)
        if files.lora is None and files.unet_dir is None and embeddings is None:
            raise ValueError(f"{path.name} holds no LoRA, embeddings or UNet weights")
        version = training_args.get("sd_model_version")
        if files.layout == eden_layout.EDEN:
            version = eden_layout.eden_version(training_args, files)
        if version not in ("sdxl", "sd15"):
            raise ValueError(f"{path.name}: training_args.json has no valid sd_model_version ({str(version)[:40]!r})")
        if embeddings is None:
            tokens = None
        elif token_names is not None:
            tokens = token_names
        else:
            tokens = training_args.get("inserting_list_tokens") or []
        token_dict = read_token_dict(files.special_params, tokens)
        return cls(folder=path, lora=files.lora, embeddings=embeddings, unet_dir=files.unet_dir,
                   token_dict=token_dict, training_args=training_args, version=version, layout=files.layout,
                   token_names=token_names, local_paths=local_paths)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def extract_bundle(archive: Path, target: Path) -> None:
    """Unpack a bundle archive (our zip, Eden's tar, plain or compressed) into the (empty) folder ``target`` under
    :data:`BUNDLE_LIMITS`: the one extractor for every archive a request can send."""
    report = unpack_untrusted(archive, target, archive.name, BUNDLE_LIMITS)
    if report.counts["skipped"]:
        logger.warning("%s: %d member(s) skipped while unpacking", archive.name, report.counts["skipped"])


def _read_json(path: Path, what: str):
    with path.open("rb") as handle:
        data = handle.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise ValueError(f"{what} is larger than {MAX_JSON_BYTES // 1024} KiB; a trained bundle's is a few KiB")
    try:
        return json.loads(data.decode("utf-8-sig"))
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply to read") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{what} is not valid JSON ({type(error).__name__})") from None


def read_training_args(path: Path) -> dict:
    """``training_args.json`` as a dict; what the predictor uses from it is checked where it is used."""
    data = _read_json(path, "training_args.json")
    if not isinstance(data, dict):
        raise ValueError(f"training_args.json must hold a JSON object, got a JSON {type(data).__name__}")
    tokens = data.get("inserting_list_tokens")
    if tokens is not None and not (isinstance(tokens, list) and len(tokens) <= MAX_TOKENS
                                   and all(isinstance(t, str) and 0 < len(t) <= MAX_TOKEN_CHARS for t in tokens)):
        raise ValueError(f"training_args.json: inserting_list_tokens must be at most {MAX_TOKENS} token strings of at "
                         f"most {MAX_TOKEN_CHARS} characters")
    return data


def read_token_dict(path: Path, tokens: list[str] | None) -> dict[str, str]:
    """``special_params.json``: one trigger mapped to exactly the bundle's tokens (``tokens``: ours from
    ``inserting_list_tokens``, Eden's one ``<s{i}>`` per embedding row; ``None`` when it has no token vectors, and
    then to short text). Anything else would let the file rewrite prompts at will (a trigger mapped to 100,000
    characters turns each use into a 100,000-character prompt)."""
    data = _read_json(path, "special_params.json")
    if not isinstance(data, dict) or not data:
        raise ValueError("special_params.json must map the trigger to the new tokens, for example "
                         '{"TOK": "<s0><s1>"}')
    trigger, value = next(iter(data.items()))
    if not isinstance(value, str) or not trigger.strip() or len(trigger) > MAX_TOKEN_CHARS:
        raise ValueError(f"special_params.json: the trigger must be a word of at most {MAX_TOKEN_CHARS} characters "
                         "mapped to text")
    shown = value if len(value) <= 80 else f"{value[:60]}... ({len(value)} characters)"
    if tokens is not None:
        if not tokens:
            raise ValueError("training_args.json names no inserting_list_tokens for the bundle's embeddings")
        if value != "".join(tokens):
            raise ValueError(f"special_params.json maps {trigger[:40]!r} to {shown!r}, not to the bundle's tokens "
                             f"({''.join(tokens)!r})")
    elif len(value) > MAX_TOKENS * MAX_TOKEN_CHARS:
        raise ValueError(f"special_params.json maps {trigger[:40]!r} to {shown!r}, longer than "
                         f"{MAX_TOKENS * MAX_TOKEN_CHARS} characters")
    if len(data) > 1:
        logger.warning("special_params.json: using the trigger %r; %d other entries ignored", trigger, len(data) - 1)
    return {trigger: value}
