"""One training job behind cog's ``train()``: inputs to a validated config, the run, the zip, the optional upload.

Everything a user can get wrong is checked in :func:`parse_training_request`, before any model is loaded or any
image fetched, and reported as a ``ValueError`` whose message names the input and says what to do (cog reports it
as the job's ``error``). The cog server validates inputs only when the image carries cog's generated schema, so
nothing here relies on it: values may arrive as JSON strings, numbers or booleans of any of those types.

Files live under the work folder (``TRAINER_WORK_DIR``, default ``<tmp>/sd-lora-trainer``): the run in
``jobs/<id>/`` while it trains, the delivered zip in ``outputs/<id>/``. A job removes its run folder when it ends
(the zip holds what is worth keeping) and leaves nothing when it fails or is cancelled. Each new job removes stale
run folders and all but the last ``TRAINER_KEEP_OUTPUTS`` (default 3) zips, so a long-lived container does not fill
its disk.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from trainer.config.load import load_config
from trainer.data.ingest.sources import parse_source, split_sources
from trainer.data.limits import DataLimits
from trainer.device import select_device
from trainer.models.hub import requested_models
from trainer.models.loading import model_cache_dir, resolve_source, sweep_downloads
from trainer.serving.boundary import ENV_ALLOW_REQUEST_S3_ENDPOINT, check_request, requested_hub_models
from trainer.serving.cancel import run_cancellable
from trainer.serving.common import unwrap_inputs
from trainer.training.errors import TrainingCancelled
from trainer.training.loop import train
from trainer.utils.atomic import is_disk_full
from trainer.utils.download import redact_text, stop_downloads_on
from trainer.utils.env import ENV_ALLOW_LOCAL, env_flag, work_root
from trainer.utils.logs import setup_logging
from trainer.utils.s3 import S3Uri, UploadCancelled, check_bucket, delete_object, s3_client, upload_file

logger = logging.getLogger(__name__)

ENV_KEEP_OUTPUTS = "TRAINER_KEEP_OUTPUTS"
#: Where decoded data: uploads wait for their job (under the work folder).
UPLOADS_DIR = "uploads"
#: A pasted training_args.json is a few KiB; the text of the input is refused far beyond that.
MAX_TRAINING_ARGS_CHARS = 256 * 1024

#: Inputs of ``train()`` that are not config keys.
SERVICE_INPUTS = ("training_args", "output_uri", "input_images")
#: Config keys the service sets itself; pasted ``training_args.json`` files carry them, so they are ignored.
SERVICE_OWNED = ("output_dir", "start_time", "job_time")


# ============================================================================================== input values
def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def parse_training_args(value: Any) -> dict[str, Any]:
    """The ``training_args`` input: a JSON object (text) of config keys, or a dict when called directly."""
    if _blank(value):
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    if not isinstance(value, str):
        raise ValueError(f"training_args must be a JSON object as text, got {type(value).__name__}")
    if len(value) > MAX_TRAINING_ARGS_CHARS:
        raise ValueError(f"training_args is {len(value)} characters, more than the limit of "
                         f"{MAX_TRAINING_ARGS_CHARS}; a training_args.json is a few KiB")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"training_args is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); give an "
            'object such as {"unet_lr": 0.0005, "lora_rank": 8}'
        ) from None
    except RecursionError:
        raise ValueError("training_args is nested too deeply to read; give a flat JSON object of settings") from None
    if not isinstance(parsed, dict):
        raise ValueError(f'training_args must be a JSON object such as {{"lora_rank": 8}}, got a JSON '
                         f"{type(parsed).__name__}")
    return parsed


# ============================================================================================== the request
@dataclass
class TrainingRequest:
    config: Any
    """The validated :class:`~trainer.config.TrainingConfig`."""
    allow_local_sources: bool
    destination: S3Uri | None = None
    local_paths: bool = False
    """Whether the config may name model files and folders on the server (the operator's switch)."""
    uploads: list[Path] = field(default_factory=list)
    """Files decoded from the request (``data:`` uploads), removed when the job ends."""
    hub_models: dict[str, str] = field(default_factory=dict)
    """Hub ids the request names (id -> key): fetched under the rules for requests (:mod:`trainer.models.hub`)."""


def merge_inputs(inputs: Mapping[str, Any], defaults: Mapping[str, Any], training_args: Mapping[str, Any]
                 ) -> dict[str, Any]:
    """Config values from the explicit inputs and ``training_args``.

    ``training_args`` may set any config key, including one that is also an input left at its default (so a
    pasted ``training_args.json`` works). An input changed from its default and set differently in
    ``training_args`` is a contradiction, reported rather than resolved silently.
    """
    data = {name: value for name, value in inputs.items() if name not in SERVICE_INPUTS and not _blank(value)}
    # An empty caption prefix is a value of its own (the default), not a missing one.
    if inputs.get("caption_prefix") == "":
        data["caption_prefix"] = ""
    problems = []
    for key, value in training_args.items():
        if key in SERVICE_INPUTS:
            problems.append(f"{key} is an input of its own; set it there, not inside training_args")
            continue
        if key in SERVICE_OWNED:
            logger.info("training_args: ignoring %s (set by the service)", key)
            continue
        given = inputs.get(key)
        if key in inputs and not _blank(given) and not _same(given, defaults.get(key)) and not _same(given, value):
            problems.append(
                f"{key} is set both as an input ({inputs[key]!r}) and in training_args ({value!r}); set it in one "
                "place"
            )
            continue
        data[key] = value
    if problems:
        raise ValueError("; ".join(problems))
    return data


def _same(a: Any, b: Any) -> bool:
    # Without cog's schema the server passes JSON as sent: "300" and 300 are the same setting.
    return a == b or (not isinstance(a, (dict, list)) and str(a).strip().lower() == str(b).strip().lower())


def _check_sources(urls: Any, allow_local: bool) -> None:
    for source in split_sources(urls):
        ref = parse_source(source)
        if ref.kind == "local" and not allow_local:
            raise ValueError(
                f"lora_training_urls: {source!r} is a local path, which this server does not read; give http(s):// "
                "or s3:// URLs, or upload a zip as input_images"
            )


def parse_training_request(inputs: Mapping[str, Any], defaults: Mapping[str, Any]) -> TrainingRequest:
    """Validate every input and build the config; raises ValueError with a message for the user."""
    inputs = unwrap_inputs(inputs)
    allow_local = env_flag(ENV_ALLOW_LOCAL)
    training_args = parse_training_args(inputs.get("training_args"))
    data = merge_inputs(inputs, defaults, training_args)
    check_request(data, allow_local=allow_local, allow_s3_endpoint=env_flag(ENV_ALLOW_REQUEST_S3_ENDPOINT))

    uploaded: list[str] = []
    local_upload = False
    input_images = inputs.get("input_images")
    if not _blank(input_images):
        source, local_upload = _uploaded_source(input_images, allow_local)
        uploaded.append(source)
    urls = data.get("lora_training_urls")
    if _blank(urls) or (isinstance(urls, list) and not urls):
        if not uploaded:
            raise ValueError("no training images: give lora_training_urls (image or archive URLs, s3:// URIs) or "
                             "upload a zip as input_images")
        data["lora_training_urls"] = uploaded
    else:
        _check_sources(urls, allow_local)
        if uploaded:
            data["lora_training_urls"] = [*split_sources(urls), *uploaded]  # type: ignore[arg-type]

    config = load_config(data)

    # Cheap checks of what would otherwise fail only after the data is prepared.
    select_device(config.device)
    resolve_source(config.ckpt_path, config.pretrained_model, config.sd_model_version, model_cache_dir(),
                   local_paths=allow_local)

    destination = None
    output_uri = inputs.get("output_uri")
    if not _blank(output_uri):
        destination = S3Uri.parse(str(output_uri), what="output_uri")
        check_bucket(s3_client(config.s3_endpoint_url, connect_timeout=5.0, read_timeout=15.0, retries=1),
                     destination, "output_uri")
    # A source that is a local file only because cog decoded an upload is admitted; others were checked above.
    return TrainingRequest(config=config, allow_local_sources=allow_local or local_upload, destination=destination,
                           local_paths=allow_local,
                           uploads=[Path(source) for source in uploaded if UPLOADS_DIR in Path(source).parts],
                           hub_models=requested_hub_models(config.model_dump()))


def _uploaded_source(value: Any, allow_local: bool) -> tuple[str, bool]:
    """The ``input_images`` upload as a training source, and whether it is a file written on this server.

    An http(s) URL becomes a source, fetched by this project's client (address checks, size caps, deadline); a
    ``data:`` URL is decoded here, within the download size cap. (A cog ``URLPath``, from a direct call, is read the
    same way through its URL.) A plain path names a file on the server: refused, like every local path in a request,
    unless the operator allows local sources.
    """
    text = str(getattr(value, "source", None) or value).strip()
    if text.lower().startswith(("http://", "https://")):
        return text, False
    if text.lower().startswith("data:"):
        return str(_decode_data_url(text)), True
    if "://" in text:
        raise ValueError("input_images must be an http(s) URL or a data: URL of a zip or tar archive")
    if not allow_local:
        raise ValueError("input_images names a path on the server, which requests may not read; upload the file or "
                         f"give its http(s) URL (the operator can allow local paths with {ENV_ALLOW_LOCAL}=1)")
    path = Path(text)
    if not path.is_file():
        raise ValueError(f"input_images: the file {path.name!r} is missing on the server")
    return str(path), True


def _decode_data_url(text: str) -> Path:
    """A ``data:`` upload written to the work folder's ``uploads/`` (the job removes it when it ends)."""
    header, comma, payload = text.partition(",")
    limit = DataLimits().max_download_bytes
    if not comma:
        raise ValueError("input_images: a data: URL needs a comma before its data")
    if len(payload) > limit * 4 // 3 + 4:
        raise ValueError(f"input_images: the uploaded file is over the limit of {limit >> 20} MiB")
    try:
        data = (base64.b64decode("".join(payload.split()), validate=True) if header.lower().endswith(";base64")
                else unquote_to_bytes(payload))
    except (ValueError, binascii.Error):
        raise ValueError("input_images: the data: URL is not valid base64") from None
    folder = work_root() / UPLOADS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{secrets.token_hex(8)}-input_images"
    path.write_bytes(data)
    return path


def object_key(destination: S3Uri, file_name: str) -> S3Uri:
    """``s3://b/prefix/`` or ``s3://b/prefix`` → ``prefix/<file>``; a key ending in ``.zip`` is used as it is."""
    if destination.key.lower().endswith(".zip"):
        return destination
    prefix = destination.key.rstrip("/")
    return S3Uri(destination.bucket, f"{prefix}/{file_name}" if prefix else file_name)


# ============================================================================================== progress
def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    return f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


def progress_line(event) -> str:
    """``step 40/300 (13%), 2.10 steps/s, loss 0.1234, about 2m 04s left``."""
    loss = f"{event.loss:.4f}" if event.loss is not None else "-"
    return (f"step {event.step}/{event.total} ({event.fraction * 100:.0f}%), {event.steps_per_second:.2f} steps/s, "
            f"loss {loss}, about {format_duration(event.eta_seconds)} left")


# ============================================================================================== the job
def _keep_outputs() -> int:
    try:
        return max(1, int(os.environ.get(ENV_KEEP_OUTPUTS, "3")))
    except ValueError:
        return 3


class TrainingJob:
    """Runs a validated request in a worker thread; cancellation leaves neither a zip nor an uploaded object."""

    def __init__(self, request: TrainingRequest, root: Path | None = None) -> None:
        self.request = request
        self.root = Path(root) if root else work_root()
        self.id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        self.job_dir = self.root / "jobs" / self.id
        self.output_dir = self.root / "outputs" / self.id
        self.stop = threading.Event()
        self.zip_path: Path | None = None
        self.uploaded: S3Uri | None = None
        self._client = None
        self._cleaning = False

    # ------------------------------------------------------------------------------------------- running
    def run(self) -> Path:
        self._prune()
        try:
            return run_cancellable(self._work, stop=self.stop, interrupt_with=TrainingCancelled,
                                   may_interrupt=lambda: not self._cleaning, name=f"training-{self.id}")
        except BaseException:
            # Also covers a cancellation that raced a finished job: its zip and upload must go too.
            _retrying(self.discard)
            raise
        finally:
            for upload in self.request.uploads:
                upload.unlink(missing_ok=True)

    def _work(self) -> Path:
        config = self.request.config
        try:
            logger.info("training %s (%s, %s steps) in %s", config.run_name, config.concept_mode,
                        config.max_train_steps, self.job_dir)
            with stop_downloads_on(self.stop), requested_models(self.request.hub_models):
                result = train(config, run_dir=self.job_dir / "run", should_stop=self.stop.is_set,
                               on_progress=lambda event: logger.info("%s", progress_line(event)),
                               allow_local_sources=self.request.allow_local_sources,
                               local_paths=self.request.local_paths)
            if self.stop.is_set() or result.zip_path is None:
                raise TrainingCancelled("training was cancelled after its last step")
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.zip_path = self.output_dir / result.zip_path.name
            os.replace(result.zip_path, self.zip_path)
            shutil.rmtree(self.job_dir, ignore_errors=True)
            if self.request.destination is not None:
                self._upload()
            if self.stop.is_set():
                raise TrainingCancelled("training was cancelled during the upload")
            logger.info("done: %s (%.1f MiB)", self.zip_path.name, self.zip_path.stat().st_size / 2**20)
            return self.zip_path
        except BaseException:
            self._cleaning = True
            _retrying(self.discard)
            raise

    def _upload(self) -> None:
        assert self.request.destination is not None and self.zip_path is not None
        target = object_key(self.request.destination, self.zip_path.name)
        self._client = s3_client(self.request.config.s3_endpoint_url)
        # Recorded before the first byte goes out: a PUT can complete on the server after the cancellation reached
        # us, and the clean-up must then know the key to delete.
        self.uploaded = target
        logger.info("uploading %s to %s", self.zip_path.name, target)
        try:
            upload_file(self._client, self.zip_path, target, should_stop=self.stop.is_set)
        except UploadCancelled:
            raise TrainingCancelled("training was cancelled during the upload") from None
        logger.info("uploaded %s", target)

    # ----------------------------------------------------------------------------------------- clean-up
    def discard(self) -> None:
        """Remove everything this job made: run folder, zip, uploaded object. Idempotent."""
        self._cleaning = True
        shutil.rmtree(self.job_dir, ignore_errors=True)
        shutil.rmtree(self.output_dir, ignore_errors=True)
        self.zip_path = None
        if self.uploaded is not None and self._client is not None:
            delete_object(self._client, self.uploaded)
            self.uploaded = None

    def _prune(self) -> None:
        """Remove stale run folders, all but the newest outputs of earlier jobs, and partial downloads."""
        sweep_downloads(model_cache_dir())
        for folder in sorted((self.root / "jobs").glob("*")):
            shutil.rmtree(folder, ignore_errors=True)
        outputs = sorted((self.root / "outputs").glob("*"))
        for folder in outputs[: max(0, len(outputs) - (_keep_outputs() - 1))]:
            shutil.rmtree(folder, ignore_errors=True)
        current = {str(upload) for upload in self.request.uploads}
        for upload in (self.root / UPLOADS_DIR).glob("*"):
            if str(upload) not in current:
                upload.unlink(missing_ok=True)


def _retrying(action: Callable[[], None], attempts: int = 3) -> None:
    # A second cancel request (or the interruption racing the job's own clean-up) can land inside the clean-up.
    for _ in range(attempts):
        try:
            action()
            return
        except BaseException:  # whatever interrupted it, the clean-up must still run
            continue


def run_training_job(inputs: Mapping[str, Any], defaults: Mapping[str, Any]) -> Path:
    """Validate, train and deliver; returns the zip. What ``train.py`` calls."""
    setup_logging()
    try:
        request = parse_training_request(inputs, defaults)
        return TrainingJob(request).run()
    except Exception as error:
        if is_disk_full(error):
            where = getattr(error, "filename", None) or work_root()
            raise ValueError(f"the disk is full: could not write {where} (free space in {work_root()})") from None
        # cog shows the message as the job's error (and logs it): an input quoted in it may carry secrets.
        message = str(error)
        cleaned = redact_text(message)
        if cleaned == message:
            raise
        raise ValueError(cleaned) from None
