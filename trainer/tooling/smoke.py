"""``sh cog_test_train.sh``: train through the real cog server on the repo's sample images, then predict with the zip.

Two ways to reach a server:

- local (default without Docker, always with ``--tiny``): ``python -m cog.server.http`` from this checkout's
  virtual environment, in train mode and then in predict mode, exactly as a cog image runs it;
- docker (when the ``cog`` CLI and Docker are available): ``cog build`` the image of ``--cog-file`` and run the same
  server inside it (``--device /dev/dri`` for the Intel XPU image, ``--gpus all`` for the CUDA one).

The training images are zipped and served over http on 127.0.0.1, as users give them by URL; the trained zip is
served the same way as the predictor's ``COG_WEIGHTS``. ``--tiny`` uses the offline tiny SDXL fixture on the CPU and
needs no network at all.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import uuid
import zipfile
from pathlib import Path

from trainer.tooling.cog_client import CogServer, CogServerError, FileServer, save_output
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".txt"}


def _say(message: str) -> None:
    print(message, flush=True)


def zip_images(folder: Path, target: Path) -> Path:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not any(p.suffix.lower() != ".txt" for p in files):
        raise SystemExit(f"error: no images in {folder}")
    with zipfile.ZipFile(target, "w") as archive:
        for path in files:
            archive.write(path, path.name)
    return target


def training_inputs(args: argparse.Namespace, images_url: str) -> dict:
    inputs = {
        "name": args.name,
        "lora_training_urls": images_url,
        "concept_mode": args.concept_mode,
        "max_train_steps": args.steps,
        "seed": 0,
    }
    if args.tiny:
        inputs.update({
            "resolution": 64, "train_batch_size": 2, "n_sample_imgs": 2, "validation_img_size": 64,
            "caption_model": "no_caption",
            "checkpointing_steps": 0,
            "training_args": json.dumps({
                "ckpt_path": "tiny-sdxl", "device": "cpu", "weight_type": "fp32", "augment_imgs_up_to_n": 8,
                "validation_num_inference_steps": 4, "logging_steps": max(1, args.steps // 10),
            }),
        })
    return inputs


def prediction_inputs(args: argparse.Namespace) -> dict:
    inputs = {"prompt": args.prompt, "num_outputs": 2, "seed": 1, "output_format": "png"}
    if args.tiny:
        inputs.update({"width": 64, "height": 64, "num_inference_steps": 4})
    return inputs


# ============================================================================================== servers
class LocalServers:
    """The real cog server from this checkout's environment."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.env = {"TRAINER_WORK_DIR": str(out / "work")}
        if args.tiny:
            # Offline: the tiny safety checker, named like the tiny base model (it never flags).
            self.env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                             "TRAINER_SAFETY_CHECKER": "tiny-safety-checker"})

    def start(self, mode: str, extra_env: dict | None = None) -> CogServer:
        ref = "train.py:train" if mode == "train" else "predict.py:Predictor"
        _say(f"starting the cog server ({mode} mode, {ref}) from {REPO_ROOT} ...")
        return CogServer.start(mode=mode, ref=ref, cwd=REPO_ROOT, env={**self.env, **(extra_env or {})},
                               log_path=self.out / f"cog-server-{mode}.log", echo=lambda m: _say(f"  | {m}"))

    def close(self) -> None:
        pass


class DockerServers:
    """The image built by ``cog build -f <cog file>``, running the same server in a container."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args = args
        self.out = out
        self.image = f"sd-lora-trainer-smoke:{Path(args.cog_file).stem.replace('.', '-')}"
        self.container: str | None = None
        # gpu: true selects cog's NVIDIA base images; the Intel XPU image is a gpu: false build.
        self.nvidia = bool((_read_yaml(REPO_ROOT / args.cog_file).get("build") or {}).get("gpu"))
        _say(f"building {self.image} with cog build -f {args.cog_file} ...")
        subprocess.run(["cog", "build", "-f", args.cog_file, "-t", self.image], cwd=REPO_ROOT, check=True)

    def start(self, mode: str, extra_env: dict | None = None) -> CogServer:
        port = _free_port()
        cache = Path.home() / ".cache" / "sd-lora-trainer"
        cache.mkdir(parents=True, exist_ok=True)
        command = ["docker", "run", "-d", "--rm", "--network", "host", "-e", f"PORT={port}",
                   "-v", f"{cache}:/root/.cache/sd-lora-trainer"]
        if self.nvidia:
            command += ["--gpus", "all"]
        else:
            # The Intel GPU: its render node, and the by-path links Level Zero uses to enumerate devices.
            command += ["--device", "/dev/dri", "-v", "/dev/dri/by-path:/dev/dri/by-path"]
        for key, value in (extra_env or {}).items():
            command += ["-e", f"{key}={value}"]
        command += [self.image, "python", "-m", "cog.server.http", "--host", "127.0.0.1"]
        if mode == "train":
            command += ["--x-mode", "train"]
        self.close()
        self.container = subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip()
        _say(f"started container {self.container[:12]} ({mode} mode) on port {port}")
        return _ContainerServer(f"http://127.0.0.1:{port}", self)

    def close(self) -> None:
        if self.container:
            subprocess.run(["docker", "stop", self.container], capture_output=True)
            self.container = None


class _ContainerServer(CogServer):
    def __init__(self, base_url: str, owner: DockerServers) -> None:
        super().__init__(base_url)
        self.owner = owner
        self.wait_ready(1800)

    def stop(self, timeout: float = 20.0) -> None:
        self.owner.close()


def _read_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def docker_available() -> bool:
    if not shutil.which("cog") or not shutil.which("docker"):
        return False
    return subprocess.run(["docker", "info"], capture_output=True).returncode == 0


# ============================================================================================== the run
def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    use_docker = not args.tiny and not args.local and docker_available()
    servers = DockerServers(args, out) if use_docker else LocalServers(args, out)
    zip_images(Path(args.images), out / "training_images.zip")
    started = time.perf_counter()
    try:
        with FileServer(out) as files:
            # The images are served on loopback, which the server refuses unless its operator allows this address.
            allow = {ENV_ALLOW_PRIVATE_HOSTS: files.address}
            with servers.start("train", allow) as server:
                _say(f"POST /trainings on {server.base_url} ({args.steps} steps) ...")
                job = server.train(training_inputs(args, files.url("training_images.zip")),
                                   job_id=f"smoke-{uuid.uuid4().hex[:8]}", timeout=args.timeout)
            if job.get("status") != "succeeded":
                _say(f"error: the training {job.get('status')}: {job.get('error')}")
                return 1
            weights = save_output(job["output"]["weights"], out / "lora.zip")
            with zipfile.ZipFile(weights) as archive:
                members = archive.namelist()
                archive.extractall(out / "lora")
            _say(f"trained in {time.perf_counter() - started:.0f}s: {weights} ({len(members)} files)")

            with servers.start("predict", {**allow, "COG_WEIGHTS": files.url("lora.zip")}) as server:
                _say(f"POST /predictions on {server.base_url}: {args.prompt!r} ...")
                prediction = server.predict(prediction_inputs(args), timeout=args.timeout)
            if prediction.get("status") != "succeeded":
                _say(f"error: the prediction {prediction.get('status')}: {prediction.get('error')}")
                return 1
            images = [save_output(value, out / "predictions" / f"image-{i}.png")
                      for i, value in enumerate(prediction["output"])]
    except CogServerError as error:
        _say(f"error: {error}")
        return 1
    finally:
        servers.close()

    samples = sorted((out / "lora" / "samples").glob("*.jpg")) if (out / "lora" / "samples").is_dir() else []
    _say("")
    _say(f"done in {time.perf_counter() - started:.0f}s; everything is in {out}")
    _say(f"  trained LoRA zip:   {weights}")
    _say(f"  unpacked:           {out / 'lora'} (README.md explains ComfyUI, A1111, InvokeAI, diffusers)")
    _say(f"  training samples:   {len(samples)} in {out / 'lora' / 'samples'}")
    _say(f"  loss plot:          {out / 'lora' / 'loss.png'}")
    _say(f"  predictions:        {', '.join(str(p) for p in images)}")
    _say(f"  server logs:        {out}/cog-server-*.log")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cog_test_train.sh", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true",
                        help="offline: the tiny SDXL test model on the CPU (about a minute, no downloads)")
    parser.add_argument("--local", action="store_true",
                        help="use the local server even when cog and Docker are available")
    parser.add_argument("--cog-file", default="cog.yaml",
                        help="cog config of the image to build in Docker mode (cog.yaml: Intel XPU, cog.cuda.yaml: "
                             "NVIDIA)")
    parser.add_argument("--images", default=str(REPO_ROOT / "assets" / "sample_images"),
                        help="folder of training images (default: the repo's sample images)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 40 with --tiny, else 300)")
    parser.add_argument("--concept-mode", default="object", choices=["face", "style", "object"])
    parser.add_argument("--name", default="cog_test")
    parser.add_argument("--prompt", default="a photo of TOK")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "cog_test"),
                        help="output folder, emptied first (default: runs/cog_test)")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds to wait for each job")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.steps is None:
        args.steps = 40 if args.tiny else 300
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
