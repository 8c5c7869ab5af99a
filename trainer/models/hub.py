"""Hugging Face hub models that a request names: the operator's allow-list, a size check before anything large is
fetched, and the download itself through the project's one outbound client (:mod:`trainer.utils.download`).

The operator's models (environment, command line, the project's defaults) load as they always did, through
huggingface_hub and its cache. A hub id that comes from a request (``ckpt_path``, ``pretrained_model.path``,
``single_file_config``, ``caption_model_path``, ``clipseg_model_path``, ``evaluation_clip_model``, the base model in a
LoRA zip's ``training_args.json``) is a stranger's choice, so it

- must be one of the server's defaults or match a pattern of ``TRAINER_ALLOWED_HUB_MODELS``; anything else is refused
  before the hub is contacted;
- is listed first (one API call): the files its loader would read, chosen by diffusers' own rules for a pipeline
  (safetensors weights, the variant asked for, nothing a Stable Diffusion pipeline ignores) or by transformers' file
  names for a helper model, with their sizes. More than ``TRAINER_MAX_MODEL_BYTES`` in all, or more than
  :data:`MAX_FILES` files, is refused before any weight is fetched;
- is fetched anonymously (the server's ``HF_TOKEN`` is not spent on a stranger's choice), file by file, by the
  guarded client: internal addresses refused at every redirect, each file capped at its listed size, one deadline for
  the whole model (``TRAINER_DOWNLOAD_DEADLINE``), stopped within a second when the job is cancelled;
- appears in ``<model cache>/hub-requests/<org>--<name>/<commit>-<layout>`` only when complete: the files gather in a
  ``.partial-*`` folder beside it, so a refused, failed or cancelled download leaves nothing in the cache. The least
  recently used of these folders beyond ``TRAINER_KEEP_HUB_MODELS`` are removed when another one arrives.

Which hub ids are a request's is said by :func:`requested_models` around the work of one request (the training job,
one prediction): the loaders ask :func:`requested_key` and fetch with :func:`fetch_requested` where it answers.
"""

from __future__ import annotations

import contextlib
import contextvars
import fnmatch
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

logger = logging.getLogger(__name__)

#: Glob patterns of hub ids (``stabilityai/*``, ``SG161222/RealVisXL_V4.0``; ``*`` for any) that requests may name
#: besides the server's defaults; comma or space separated. Empty: the defaults only.
ENV_ALLOWED_HUB_MODELS = "TRAINER_ALLOWED_HUB_MODELS"
#: How many request-named hub models stay in the model cache (the least recently used beyond are removed).
ENV_KEEP_HUB_MODELS = "TRAINER_KEEP_HUB_MODELS"
DEFAULT_KEEP_HUB_MODELS = 3
#: Folder of the model cache that holds request-named hub models, one plain folder per repo, commit and layout.
REQUESTED_DIR = "hub-requests"
#: An SDXL pipeline is about 30 files; a request's model with far more is not one the loaders need.
MAX_FILES = 512
#: The hub's file list of one repo (JSON); a few hundred KiB for the largest model repos.
MAX_LISTING_BYTES = 32 << 20
#: ``model_index.json`` is read before the size check; it is under 1 KiB in every real pipeline.
MAX_INDEX_BYTES = 1 << 20
DEFAULT_ENDPOINT = "https://huggingface.co"
#: A partial fetch untouched this long belongs to a process that is gone (live ones write continuously).
STALE_SECONDS = 600.0

Layout = Literal["pipeline", "transformers", "configs"]
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
#: diffusers puts the variant into regular expressions unescaped; requests get plain names only (fp16, non_ema).
_VARIANT = re.compile(r"^[A-Za-z0-9_-]{1,32}$")
_SHARD = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
#: What a transformers model folder holds besides its weights: configs, tokenizer and processor files.
_TRANSFORMERS_SUFFIXES = (".json", ".txt", ".model", ".jinja", ".tiktoken")
#: diffusers' own patterns for the configs of a single-file checkpoint (``_download_diffusers_model_config_from_hub``).
_CONFIG_SUFFIXES = (".json", ".txt", ".model")
_TRUE = {"1", "on", "yes", "true"}

_requested: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("requested_hub_models",
                                                                                      default=None)


# ============================================================================================== whose model
@contextlib.contextmanager
def requested_models(named: Mapping[str, str]) -> Iterator[None]:
    """Inside this block (this thread, or a copy of its context) the hub ids in ``named`` (id -> the request key that
    named it) are a request's choice: loaders fetch them with :func:`fetch_requested`.

    A name among the server's defaults stays the operator's: the request gets the server's own copy of it.
    """
    defaults = server_defaults()
    untrusted = {hub_id.strip(): key for hub_id, key in named.items() if hub_id.strip().lower() not in defaults}
    token = _requested.set(untrusted)
    try:
        yield
    finally:
        _requested.reset(token)


def requested_key(location: str | None) -> str | None:
    """The request key that named hub id ``location`` in the current :func:`requested_models` block, else None."""
    named = _requested.get()
    if not named or not isinstance(location, str):
        return None
    return named.get(location.strip())


def server_defaults() -> frozenset[str]:
    """The hub ids this server loads when a job names none (lower case): the base models (with the operator's
    ``TRAINER_SDXL_MODEL``/``TRAINER_SD15_MODEL``), the captioners, CLIPSeg and the evaluation CLIP."""
    from trainer.config.schema import DEFAULT_CLIP_MODEL
    from trainer.data.captioners.blip import DEFAULT_MODEL as BLIP
    from trainer.data.captioners.florence import ALIASES as FLORENCE_ALIASES
    from trainer.data.captioners.florence import DEFAULT_MODEL as FLORENCE
    from trainer.data.masks.clipseg import DEFAULT_MODEL as CLIPSEG
    from trainer.models.loading import DEFAULT_MODEL_ENV, DEFAULT_MODELS, is_hub_id

    names = {*DEFAULT_MODELS.values(), BLIP, FLORENCE, *FLORENCE_ALIASES, *FLORENCE_ALIASES.values(), CLIPSEG,
             DEFAULT_CLIP_MODEL}
    names |= {os.environ.get(variable, "").strip() for variable in DEFAULT_MODEL_ENV.values()}
    return frozenset(name.lower() for name in names if is_hub_id(name))


def allowed_patterns(value: str | None = None) -> tuple[str, ...]:
    """The operator's ``TRAINER_ALLOWED_HUB_MODELS``, split into glob patterns."""
    text = os.environ.get(ENV_ALLOWED_HUB_MODELS, "") if value is None else value
    return tuple(text.replace(",", " ").split())


def hub_model_problem(hub_id: str, key: str) -> str | None:
    """Why a request may not name ``hub_id`` (as ``key``), or None when it may. Hub ids compare case-insensitively,
    as the hub itself does."""
    name = hub_id.strip().lower()
    if name in server_defaults() or any(fnmatch.fnmatchcase(name, p.lower()) for p in allowed_patterns()):
        return None
    return (f"{key} {hub_id.strip()[:120]!r} is not a hub model this server loads for requests: it loads its default "
            f"models and the repositories the operator lists in {ENV_ALLOWED_HUB_MODELS} (glob patterns such as "
            "'stabilityai/*', or '*' for any)")


def check_allowed(hub_id: str, key: str) -> None:
    problem = hub_model_problem(hub_id, key)
    if problem:
        raise ValueError(problem)


# ============================================================================================== what to fetch
def pipeline_files(sizes: Mapping[str, int], index: Mapping[str, Any], variant: str | None = None,
                   passed: Sequence[str] = ("safety_checker",)) -> list[str]:
    """The files ``DiffusionPipeline.download`` fetches for a Stable Diffusion pipeline loaded with safetensors
    weights (``use_safetensors=True``), ``variant`` and the components in ``passed`` given by the caller (the
    loaders pass ``safety_checker=None`` for SD1.5), less code files (a request's repo runs no code of its own).

    diffusers' own helpers decide; this repeats only the few lines of ``download`` that combine them.
    """
    from diffusers import DiffusionPipeline
    from diffusers.pipelines.pipeline_loading_utils import (
        _get_ignore_patterns,
        filter_model_files,
        variant_compatible_siblings,
    )
    from diffusers.schedulers.scheduling_utils import SCHEDULER_CONFIG_NAME
    from diffusers.utils import CONFIG_NAME
    from diffusers.utils.constants import TRANSFORMERS_COMPONENT_AUX_FILES

    ignored_files = index.get("_ignore_files") or []
    filenames = set(sizes) - {name for name in ignored_files if isinstance(name, str)}
    folder_names = [k for k, v in index.items() if isinstance(v, list) and k != "_class_name"]
    model_folders = {os.path.split(f)[0] for f in filter_model_files(filenames) if os.path.split(f)[0] in folder_names}
    try:
        ignore = _get_ignore_patterns(list(passed), model_folders, filenames, use_safetensors=True,
                                      allow_pickle=False, use_onnx=False, is_onnx=False, use_flashpack=False,
                                      variant=variant)
        model_filenames, _ = variant_compatible_siblings(filenames, variant=variant, ignore_patterns=ignore)
    except (OSError, ValueError) as error:
        wanted = f" for variant {variant!r}" if variant else ""
        raise ValueError(f"it has no complete set of .safetensors weights{wanted} "
                         f"({str(error).splitlines()[0][:200]})") from None
    allow = list(model_filenames)
    allow += [f"{k}/*" for k in folder_names if k not in model_folders]
    allow += [f"{k}/config.json" for k in model_folders]
    allow += [SCHEDULER_CONFIG_NAME, CONFIG_NAME, DiffusionPipeline.config_name]
    allow = [p for p in allow if not (len(p.split("/")) == 2 and p.split("/")[0] in passed)]
    allow += TRANSFORMERS_COMPONENT_AUX_FILES
    ignore = ignore + [f"{i}.index.*json" for i in ignore]
    ignore_res = [re.compile(fnmatch.translate(p)) for p in ignore]
    allow_res = [re.compile(fnmatch.translate(p)) for p in allow]
    chosen = [f for f in filenames if not any(p.match(f) for p in ignore_res) and any(p.match(f) for p in allow_res)]
    return sorted(f for f in chosen if not f.endswith(".py"))


def transformers_files(sizes: Mapping[str, int]) -> list[str]:
    """The files ``from_pretrained`` of a transformers model and its processor reads from a repo's top level, with the
    weights as ``model.safetensors`` or its shards (a stranger's pickles are never fetched)."""
    top = [name for name in sizes if "/" not in name]
    if "model.safetensors" in top:
        weights = ["model.safetensors"]
    else:
        weights = sorted(name for name in top if _SHARD.match(name))
        if not weights or "model.safetensors.index.json" not in top:
            raise ValueError("it has no model.safetensors (nor its shards with model.safetensors.index.json); "
                             "requests may name models with safetensors weights only")
    return sorted({*weights, *(name for name in top if name.endswith(_TRANSFORMERS_SUFFIXES))})


def config_files(sizes: Mapping[str, int]) -> list[str]:
    """The configuration files diffusers reads for a single-file checkpoint's architecture."""
    return sorted(name for name in sizes if name.endswith(_CONFIG_SUFFIXES))


# ============================================================================================== fetching
def fetch_requested(hub_id: str, key: str, cache_dir: Path, layout: Layout, *, variant: str | None = None,
                    check_index: Callable[[dict], Any] | None = None) -> Path:
    """The local folder of request-named ``hub_id``, fetched under the rules of this module if it is not cached.

    ``layout``: ``pipeline`` (a diffusers pipeline; ``check_index`` may refuse its ``model_index.json`` before any
    weight is fetched), ``transformers`` (a helper model and its processor) or ``configs`` (a single-file checkpoint's
    architecture). Every refusal is a ``ValueError`` naming ``key``; a cancelled job raises ``DownloadCancelled``.
    """
    from trainer.utils.atomic import TMP_MARK

    hub_id = hub_id.strip()
    check_allowed(hub_id, key)
    if variant is not None and not _VARIANT.match(variant):
        raise ValueError(f"hf_variant {variant[:40]!r} is not a variant name (letters, digits, '_' and '-', such as "
                         "fp16)")
    tag = layout + (f"-{variant}" if variant and layout == "pipeline" else "")
    cache_dir = Path(cache_dir)
    repo_dir = cache_dir / REQUESTED_DIR / hub_id.replace("/", "--")
    if _offline():
        cached = _newest(repo_dir, tag)
        if cached is None:
            raise ValueError(f"{key} {hub_id!r}: the hub is off (HF_HUB_OFFLINE) and this model is not in the "
                             "server's cache")
        _touch(cached)
        return cached

    cache_dir.mkdir(parents=True, exist_ok=True)
    # The scratch folder sits in the cache's top folder, so a failed fetch leaves not even an empty folder behind.
    scratch = Path(tempfile.mkdtemp(prefix=f"{TMP_MARK}hub-", dir=cache_dir))
    try:
        fetcher = _Fetcher(hub_id, key)
        sizes, commit = fetcher.listing(scratch / "listing.json")
        target = repo_dir / f"{commit}-{tag}"
        if target.is_dir():
            _touch(target)
            return target
        staging = scratch / "model"
        index = fetcher.model_index(sizes, commit, staging / "model_index.json") if layout == "pipeline" else {}
        if check_index is not None:
            check_index(index)  # a pipeline of the wrong kind is refused before any weight is fetched
        try:
            if layout == "pipeline":
                names = pipeline_files(sizes, index, variant)
            elif layout == "transformers":
                names = transformers_files(sizes)
            else:
                names = config_files(sizes)
        except ValueError as error:
            raise ValueError(f"{key} {hub_id!r}: {error}") from None
        fetcher.check_budget(names, sizes)
        fetcher.download(names, sizes, commit, staging)
        repo_dir.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(staging, target)
        except OSError:
            if not target.is_dir():  # else another process placed the same model first: use it
                raise
        logger.info("%s: %s is in the cache (%s)", key, hub_id, target)
        _prune(cache_dir / REQUESTED_DIR, keep=_keep(), current=target)
        return target
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            repo_dir.rmdir()  # only if empty: a refusal before the first placement leaves no folder
        with contextlib.suppress(OSError):
            (cache_dir / REQUESTED_DIR).rmdir()


class _Fetcher:
    """One request-named model's fetch: one deadline and the messages' names for all of its requests."""

    def __init__(self, hub_id: str, key: str) -> None:
        from trainer.utils.download import download_deadline

        self.hub_id = hub_id
        self.key = key
        self.endpoint = (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")
        self.limit = download_deadline()
        self.ends_at = time.monotonic() + self.limit

    def _get(self, url: str, target: Path, max_bytes: int, progress: bool = False) -> Path:
        from trainer.utils.download import ENV_DOWNLOAD_DEADLINE, DownloadError, download

        def too_late() -> DownloadError:
            return DownloadError(f"{self.key} {self.hub_id!r}: the download took longer than the limit of "
                                 f"{self.limit:g}s ({ENV_DOWNLOAD_DEADLINE})")

        left = self.ends_at - time.monotonic()
        if left <= 0:
            raise too_late()
        try:
            return download(url, target, max_bytes=max_bytes, deadline=left, progress=progress)
        except DownloadError as error:
            if ENV_DOWNLOAD_DEADLINE in str(error) or time.monotonic() >= self.ends_at:
                raise too_late() from None
            raise DownloadError(f"{self.key} {self.hub_id!r}: {error}") from None

    def listing(self, target: Path) -> tuple[dict[str, int], str]:
        """File name -> size at the head of ``main``, and the commit it names (files are then fetched at that
        commit, so a push in between cannot mix two versions)."""
        from trainer.utils.download import DownloadError

        try:
            path = self._get(f"{self.endpoint}/api/models/{self.hub_id}/revision/main?blobs=true", target,
                             MAX_LISTING_BYTES)
        except DownloadError as error:
            if not any(f"HTTP {status}" in str(error) for status in (401, 403, 404)):
                raise
            # The hub answers 401 for a missing repo as for a private one, so that names do not leak.
            raise DownloadError(f"{self.key} {self.hub_id!r}: the hub has no public model of that name (private and "
                                "gated repositories are not fetched for requests)") from None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            data = None
        commit = data.get("sha") if isinstance(data, dict) else None
        siblings = data.get("siblings") if isinstance(data, dict) else None
        if not isinstance(commit, str) or not _COMMIT.match(commit) or not isinstance(siblings, list):
            raise ValueError(f"{self.key} {self.hub_id!r}: the hub's file list is not readable")
        sizes: dict[str, int] = {}
        for sibling in siblings:
            sibling = sibling if isinstance(sibling, dict) else {}
            name, lfs = sibling.get("rfilename"), sibling.get("lfs")
            # An LFS file's own size is the pointer's; the blob's is under "lfs".
            size = lfs.get("size") if isinstance(lfs, dict) else sibling.get("size")
            if not _safe_name(name) or not isinstance(size, int) or isinstance(size, bool) or size < 0:
                raise ValueError(f"{self.key} {self.hub_id!r}: the hub's file list has an entry without a usable "
                                 f"name and size ({str(name)[:80]!r})")
            sizes[name] = size
        return sizes, commit

    def model_index(self, sizes: Mapping[str, int], commit: str, target: Path) -> dict:
        if "model_index.json" not in sizes:
            raise ValueError(f"{self.key} {self.hub_id!r} is not a diffusers pipeline (it has no model_index.json)")
        if sizes["model_index.json"] > MAX_INDEX_BYTES:
            raise ValueError(f"{self.key} {self.hub_id!r}: its model_index.json is over {MAX_INDEX_BYTES >> 10} KiB")
        self._file("model_index.json", sizes, commit, target)
        try:
            index = json.loads(target.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError, RecursionError):
            index = None
        if not isinstance(index, dict):
            raise ValueError(f"{self.key} {self.hub_id!r}: its model_index.json is not a JSON object")
        return index

    def check_budget(self, names: Sequence[str], sizes: Mapping[str, int]) -> None:
        from trainer.models.loading import ENV_MAX_MODEL_BYTES, max_model_bytes
        from trainer.utils.download import human_size

        if len(names) > MAX_FILES:
            raise ValueError(f"{self.key} {self.hub_id!r}: it would download {len(names)} files, more than the limit "
                             f"of {MAX_FILES}")
        total, limit = sum(sizes[name] for name in names), max_model_bytes()
        if total > limit:
            raise ValueError(f"{self.key} {self.hub_id!r}: the files to download come to {human_size(total)}, more "
                             f"than the limit of {human_size(limit)} ({ENV_MAX_MODEL_BYTES}); nothing was downloaded")
        logger.info("%s: downloading %s (%d files, %s) from the hub", self.key, self.hub_id, len(names),
                    human_size(total))

    def download(self, names: Iterable[str], sizes: Mapping[str, int], commit: str, folder: Path) -> None:
        for name in sorted(names):
            target = folder / name
            if not target.is_file():
                self._file(name, sizes, commit, target, progress=sizes[name] > 64 << 20)

    def _file(self, name: str, sizes: Mapping[str, int], commit: str, target: Path, progress: bool = False) -> None:
        url = f"{self.endpoint}/{self.hub_id}/resolve/{commit}/{quote(name)}"
        self._get(url, target, sizes[name], progress=progress)
        if target.stat().st_size != sizes[name]:
            raise ValueError(f"{self.key} {self.hub_id!r}: {name} has {target.stat().st_size} bytes, the hub listed "
                             f"{sizes[name]}")


def _safe_name(name: Any) -> bool:
    """A relative file name that stays inside the folder it is written to."""
    if not isinstance(name, str) or not name or len(name) > 512 or name.startswith("/") or "\\" in name:
        return False
    return all(part and part not in (".", "..") and part.isprintable() for part in name.split("/"))


def _offline() -> bool:
    # Read at each call (huggingface_hub reads it once, at import): the operator's switch, as the hub client sees it.
    return any(os.environ.get(name, "").strip().lower() in _TRUE for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _keep() -> int:
    value = os.environ.get(ENV_KEEP_HUB_MODELS, "").strip()
    try:
        return max(1, int(value)) if value else DEFAULT_KEEP_HUB_MODELS
    except ValueError:
        raise ValueError(f"{ENV_KEEP_HUB_MODELS} must be a whole number, got {value!r}") from None


def _touch(folder: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(folder)


def _model_folders(root: Path) -> list[Path]:
    from trainer.utils.atomic import TMP_MARK

    if not root.is_dir():
        return []
    return [model for repo in root.iterdir() if repo.is_dir() and not repo.name.startswith(TMP_MARK)
            for model in repo.iterdir() if model.is_dir() and not model.name.startswith(TMP_MARK)]


def _newest(repo_dir: Path, tag: str) -> Path | None:
    if not repo_dir.is_dir():
        return None
    found = [p for p in repo_dir.iterdir() if p.is_dir() and p.name.endswith(f"-{tag}") and _COMMIT.match(p.name[:40])
             and p.name == f"{p.name[:40]}-{tag}"]
    return max(found, key=lambda p: p.stat().st_mtime, default=None)


def _prune(root: Path, keep: int, current: Path) -> None:
    """Remove the least recently used request-named models beyond ``keep`` (never ``current``)."""
    others = sorted((p for p in _model_folders(root) if p != current), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in others[max(0, keep - 1):]:
        logger.info("removing the least recently used hub model %s from the cache", old)
        shutil.rmtree(old, ignore_errors=True)
        with contextlib.suppress(OSError):
            old.parent.rmdir()


def sweep_partial_fetches(cache_dir: Path, older_than: float = STALE_SECONDS) -> int:
    """Remove the scratch folders of request-named hub fetches that killed processes left (at start-up).

    A live fetch may write one large file for many minutes without touching its folder, so a scratch folder counts
    as stale by its most recently modified file.
    """
    from trainer.utils.atomic import TMP_MARK

    cache_dir = Path(cache_dir)
    if not cache_dir.is_dir():
        return 0
    removed, now = 0, time.time()
    for entry in cache_dir.glob(f"{TMP_MARK}hub-*"):
        newest = entry.stat().st_mtime
        for folder, _dirs, files in os.walk(entry):
            for name in files:
                with contextlib.suppress(OSError):
                    newest = max(newest, os.stat(os.path.join(folder, name)).st_mtime)
        if now - newest >= older_than:
            shutil.rmtree(entry, ignore_errors=True)
            removed += 1
    return removed
