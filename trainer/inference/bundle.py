"""A trained LoRA as delivered: a zip (from train.py or ``python -m trainer``) or a checkpoint folder, or Eden's
``.tar`` or folder (see :mod:`trainer.inference.eden_layout`).

It names its base model (``training_args.json``), its tokens (``special_params.json``) and its weight files, so a
predictor can rebuild the trained model from it alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from trainer.inference import eden_layout
from trainer.models.loading import ModelSource, resolve_source
from trainer.utils.atomic import atomic_dir

logger = logging.getLogger(__name__)

#: A delivered zip is at most a few hundred MB (LoRA, embeddings, samples); refuse archives far beyond that.
MAX_BUNDLE_BYTES = 8 << 30


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

    def base_source(self, cache_dir: Path, override: str | None = None) -> ModelSource:
        """The model this LoRA was trained on (or ``override``, for example a local copy of it)."""
        args = self.training_args
        location = override or args.get("ckpt_path")
        pretrained = None if location else args.get("pretrained_model")
        return resolve_source(location, pretrained, args.get("sd_model_version"), cache_dir)

    @classmethod
    def open(cls, path: Path, work_dir: Path | None = None) -> LoraBundle:
        """Open a checkpoint folder, an unpacked bundle, a zip or an Eden ``.tar`` (unpacked into ``work_dir``)."""
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
                    if kind == "zip":
                        extract_zip(path, tmp)
                    else:
                        eden_layout.extract_tar(path, tmp, max_bytes=MAX_BUNDLE_BYTES, kind=kind)
            path = target
        if not path.is_dir():
            raise ValueError(f"{path} does not exist")
        path = eden_layout.bundle_root(path)
        files = eden_layout.find_bundle_files(path, label)
        training_args = json.loads(files.training_args.read_text(encoding="utf-8"))
        token_dict = json.loads(files.special_params.read_text(encoding="utf-8"))
        embeddings, token_names = files.embeddings, None
        if embeddings is not None:
            rows = eden_layout.embedding_rows(embeddings)
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
            raise ValueError(f"{path.name}: training_args.json has no valid sd_model_version ({version!r})")
        return cls(folder=path, lora=files.lora, embeddings=embeddings, unet_dir=files.unet_dir,
                   token_dict=token_dict, training_args=training_args, version=version, layout=files.layout,
                   token_names=token_names)


def _digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def extract_zip(archive: Path, target: Path) -> None:
    """Extract a bundle zip, refusing members that would land outside ``target`` or inflate beyond the cap."""
    with zipfile.ZipFile(archive) as handle:
        total = 0
        for info in handle.infolist():
            name = PurePosixPath(info.filename)
            if name.is_absolute() or ".." in name.parts or info.filename.startswith(("/", "\\")):
                raise ValueError(f"{archive.name}: refusing the unsafe member path {info.filename!r}")
            total += info.file_size
            if total > MAX_BUNDLE_BYTES:
                raise ValueError(f"{archive.name}: unpacks to more than {MAX_BUNDLE_BYTES} bytes")
            if info.is_dir():
                continue
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            with handle.open(info) as source, destination.open("wb") as sink:
                shutil.copyfileobj(source, sink)
