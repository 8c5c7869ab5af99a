"""Speed and memory of the training step, measured with the trainer's own code on whatever device runs it.

``python -m trainer benchmark --model sdxl`` builds the real SDXL-base architecture with random weights (speed and
memory do not depend on the weights), saves it once to the model cache (so load time is a real disk load), and
measures per case (resolution × batch × optimizer):

- images/s in the textual-inversion phase (text encoders in the graph) and after the pivot (cached text outputs),
- peak allocated device memory of each phase,
- model load time,

and, with ``--end-to-end``, the wall time of the default job from a folder of images to the zip. The same command
runs on a CPU with ``--model tiny-sdxl`` as a regression check of the same code. Results go to a JSON file and a
Markdown table; BENCHMARKS.md records the runs.

``--count-ops`` counts instead of timing: the aten ops dispatched per step (all, and those that are not views) and
the host synchronisations, in each phase, by where they come from (``trainer.tooling.opcount``). With
``--model sdxl-narrow`` (SDXL's topology, narrow widths) that is the per-step overhead of SDXL's real topology.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import peft
import torch
import transformers
from PIL import Image

from trainer.config.load import load_config, read_json
from trainer.data.manifest import PreparedDataset, Sample
from trainer.device import select_device, setup_device
from trainer.models.loading import model_cache_dir
from trainer.tooling.architectures import build_random_pipeline
from trainer.tooling.opcount import CATEGORIES, StepOpCounts, count_ops
from trainer.training import step as step_module
from trainer.training.loop import train
from trainer.training.session import setup

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]

REAL_MODELS = ("sdxl", "sd15")
#: SDXL's topology with narrow widths (trainer/tooling/architectures.py), saved in fp32: a few MB.
NARROW_MODELS = ("sdxl-narrow",)
TINY_MODELS = ("tiny-sdxl", "tiny-sd15")


@dataclass
class CaseResult:
    model: str
    resolution: int
    batch: int
    optimizer: str
    compiled: bool
    gradient_checkpointing: bool
    ti_images_per_s: float
    ti_peak_gib: float | None
    pivot_images_per_s: float
    pivot_peak_gib: float | None
    load_s: float
    warmup_s: float


def synthetic_dataset(folder: Path, n: int, size: int):
    """``n`` random images already at the training size, captioned with the trigger (the prepared-data contract)."""
    root = folder / "dataset"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    samples = []
    for index in range(n):
        pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{index}.png")
        samples.append(Sample(image=f"images/{index}.png", caption=f"TOK, a test image number {index}",
                              target_size=(size, size), original_size=(size, size)))
    dataset = PreparedDataset(root=root, samples=samples)
    dataset.save()
    return dataset


def model_location(model: str, cache_dir: Path, device) -> str:
    if model in TINY_MODELS:
        return model
    if model in NARROW_MODELS:
        return str(build_random_pipeline(model, cache_dir / "benchmark" / f"{model}-random-fp32", device="cpu",
                                         dtype=torch.float32))
    return str(build_random_pipeline(model, cache_dir / "benchmark" / f"{model}-random-fp16", device=device))


def _timed_steps(session, first_step: int, warmup: int, steps: int) -> tuple[float, float | None, float]:
    phase = session.schedule.at(first_step)
    step_module.enter_phase(session, phase, first_step)
    device = session.device
    started = time.perf_counter()
    for step in range(first_step, first_step + warmup):
        step_module.train_step(session, step, phase)
    device.synchronize()
    warmup_s = time.perf_counter() - started
    device.reset_peak_memory()
    started = time.perf_counter()
    for step in range(first_step + warmup, first_step + warmup + steps):
        loss = step_module.train_step(session, step, phase)
    loss.item()  # one read-back, as the loop does at its logging interval
    device.synchronize()
    elapsed = time.perf_counter() - started
    peak = device.peak_memory_bytes()
    images = steps * session.config.train_batch_size * session.config.gradient_accumulation_steps
    return images / elapsed, (peak / 2**30 if peak is not None else None), warmup_s


def case_session(scratch: Path, location: str, resolution: int, batch: int, optimizer: str, *, per_phase: int,
                 device: str, weight_type: str, compile_: bool | None, gradient_checkpointing: bool,
                 extra: dict | None = None):
    """A session of ``2 × per_phase`` steps (pivot at half) on a synthetic dataset, its latents cached."""
    dataset = synthetic_dataset(scratch, max(8, batch), resolution)
    config = load_config({
        "lora_training_urls": str(scratch), "concept_mode": "object", "ckpt_path": location,
        "resolution": resolution, "train_batch_size": batch, "unet_optimizer_type": optimizer,
        "ti_optimizer": "prodigy" if optimizer == "prodigy" else "adamw", "max_train_steps": 2 * per_phase,
        "freeze_ti_after_completion_f": 0.5, "checkpointing_steps": 0, "checkpoint_rule": "every",
        # Eden's schedule lets a Prodigy token optimiser train to the end (no pivot); both phases are measured.
        "lr_scheduler": "constant", "n_sample_imgs": 0, "device": device,
        "weight_type": weight_type, "torch_compile": compile_, "gradient_checkpointing": gradient_checkpointing,
        "output_dir": str(scratch / "runs"), "seed": 0, "caption_model": "no_caption", **(extra or {}),
    })
    session, _ = setup(config, dataset=dataset)
    session.latents.build_cache()
    if config.offload_idle_modules:
        session.offload_idle(True)
    return session


def run_case(model: str, location: str, resolution: int, batch: int, optimizer: str, *, steps: int, warmup: int,
             device: str, weight_type: str, compile_: bool | None, gradient_checkpointing: bool,
             extra: dict | None = None) -> CaseResult:
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch_name:
        session = case_session(Path(scratch_name), location, resolution, batch, optimizer, per_phase=warmup + steps,
                               device=device, weight_type=weight_type, compile_=compile_,
                               gradient_checkpointing=gradient_checkpointing, extra=extra)
        config = session.config
        ti_rate, ti_peak, warmup_ti = _timed_steps(session, 0, warmup, steps)
        pivot_rate, pivot_peak, warmup_pivot = _timed_steps(session, session.schedule.ti_end, warmup, steps)
        result = CaseResult(
            model=model, resolution=resolution, batch=batch, optimizer=optimizer,
            compiled=bool(config.torch_compile if config.torch_compile is not None
                          else session.device.supports_compile),
            gradient_checkpointing=gradient_checkpointing, ti_images_per_s=ti_rate, ti_peak_gib=ti_peak,
            pivot_images_per_s=pivot_rate, pivot_peak_gib=pivot_peak,
            load_s=session.timings["model_load_s"], warmup_s=warmup_ti + warmup_pivot,
        )
        session.device.empty_cache()
        del session
        gc.collect()
    return result


def _counted_steps(session, first_step: int, warmup: int, steps: int) -> dict:
    phase = session.schedule.at(first_step)
    step_module.enter_phase(session, phase, first_step)
    for step in range(first_step, first_step + warmup):  # optimiser state and caches are created here
        step_module.train_step(session, step, phase)
    counts = StepOpCounts()
    with count_ops(counts):
        for step in range(first_step + warmup, first_step + warmup + steps):
            step_module.train_step(session, step, phase)
            counts.steps += 1
    return counts.per_step()


def count_case(model: str, location: str, resolution: int, batch: int, optimizer: str, *, steps: int, warmup: int,
               device: str, weight_type: str, gradient_checkpointing: bool, extra: dict | None = None) -> dict:
    """Ops and host syncs per step in each phase (eager: compilation would hide the dispatch from the counter)."""
    warmup = max(1, warmup)
    with tempfile.TemporaryDirectory(prefix="bench-ops-") as scratch_name:
        session = case_session(Path(scratch_name), location, resolution, batch, optimizer, per_phase=warmup + steps,
                               device=device, weight_type=weight_type, compile_=False,
                               gradient_checkpointing=gradient_checkpointing, extra=extra)
        result = {"model": model, "resolution": resolution, "batch": batch, "optimizer": optimizer,
                  "ti": _counted_steps(session, 0, warmup, steps),
                  "pivot": _counted_steps(session, session.schedule.ti_end, warmup, steps)}
        del session
        gc.collect()
    return result


def end_to_end(location: str, *, device: str, weight_type: str, steps: int | None, extra: dict | None = None) -> dict:
    """The default job (Eden's defaults: 300 steps, 512 px, batch 4, 8 images) from an image folder to the zip."""
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as scratch_name:
        scratch = Path(scratch_name)
        images = scratch / "images"
        images.mkdir()
        rng = np.random.default_rng(1)
        for index in range(8):
            Image.fromarray(rng.integers(0, 255, (640, 512, 3), dtype=np.uint8)).save(images / f"{index}.jpg")
        settings = {"lora_training_urls": str(images), "concept_mode": "object", "ckpt_path": location,
                    "device": device, "weight_type": weight_type, "caption_model": "no_caption",
                    "output_dir": str(scratch / "runs"), "seed": 0, **(extra or {})}
        if steps is not None:
            settings["max_train_steps"] = steps
        config = load_config(settings)
        started = time.perf_counter()
        result = train(config)
        total = time.perf_counter() - started
    return {"steps": result.steps, "total_s": total, **{k: round(v, 3) for k, v in result.timings.items()}}


def environment(device: str) -> dict:
    info = setup_device(device, "fp32")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"device": info.describe().rsplit(",", 1)[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__, "python": platform.python_version(),
            "machine": platform.machine(), "commit": commit, "date": time.strftime("%Y-%m-%d")}


def markdown(report: dict) -> str:
    env = report["environment"]
    lines = [
        f"Device: {env['device']}; torch {env['torch']}, diffusers {env['diffusers']}, commit {env['commit']}, "
        f"{env['date']}. Command: `{report['command']}`",
        "",
        "| model | px | batch | optimizer | compiled | TI img/s | TI peak GiB | after pivot img/s | "
        "after pivot peak GiB | load s | warm-up s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def gib(value):
        return f"{value:.1f}" if value is not None else "-"

    for case in report["cases"]:
        lines.append(
            f"| {case['model']} | {case['resolution']} | {case['batch']} | {case['optimizer']} | "
            f"{'yes' if case['compiled'] else 'no'} | {case['ti_images_per_s']:.2f} | {gib(case['ti_peak_gib'])} | "
            f"{case['pivot_images_per_s']:.2f} | {gib(case['pivot_peak_gib'])} | {case['load_s']:.1f} | "
            f"{case['warmup_s']:.1f} |"
        )
    for case in report.get("op_counts", []):
        ti, pivot = case["ti"], case["pivot"]
        lines += ["", f"Ops per step, {case['model']} {case['resolution']} px, batch {case['batch']}, "
                      f"{case['optimizer']} (all / not views; {ti['steps']} counted steps per phase):", "",
                  "| category | before the pivot | after the pivot |", "|---|---|---|"]
        for category in CATEGORIES:
            a, b = ti["by_category"][category], pivot["by_category"][category]
            lines.append(f"| {category} | {a[0]:,} / {a[1]:,} | {b[0]:,} / {b[1]:,} |")
        lines.append(f"| **total** | **{ti['all']:,} / {ti['non_view']:,}** | "
                     f"**{pivot['all']:,} / {pivot['non_view']:,}** |")
        lines.append(f"| host syncs (`.item()`, `.tolist()`) | {ti['syncs']:g} | {pivot['syncs']:g} |")
    if report.get("end_to_end"):
        e2e = report["end_to_end"]
        lines += ["", f"End to end (default job, {e2e['steps']} steps, sources to zip): {e2e['total_s']:.1f} s "
                      f"(model load {e2e.get('model_load_s', 0):.1f} s, data {e2e.get('data_prep_s', 0):.1f} s, "
                      f"training loop {e2e.get('train_loop_s', 0):.1f} s)"]
    return "\n".join(lines)


#: Presets are the repository's configs: the benchmark takes their memory and speed settings and sets the model,
#: the data, the size, the batch, the optimiser and the steps per case itself.
PRESETS = {
    # The documented low-memory preset (16 GiB class cards such as the Intel Arc A770): recomputed activations,
    # text encoders and VAE off the device once their outputs are cached, batch 2 × accumulation 2.
    "low-memory": "configs/low_memory_sdxl_1024.json",
}
#: Keys of a preset file that each benchmark case sets for itself.
CASE_KEYS = frozenset({"lora_training_urls", "concept_mode", "sd_model_version", "ckpt_path", "resolution",
                       "train_batch_size", "unet_optimizer_type", "weight_type", "max_train_steps", "output_dir",
                       "device", "seed"})


def preset_settings(name: str | None) -> dict:
    """The settings a preset adds to every case: its config file less what the cases set themselves."""
    if name is None:
        return {}
    path = REPO_ROOT / PRESETS[name]
    if not path.is_file():
        raise ValueError(f"preset {name!r} reads {PRESETS[name]}, which is not here: run the benchmark from a "
                         "checkout of the repository")
    return {key: value for key, value in read_json(path).items() if key not in CASE_KEYS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer benchmark", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", choices=[*REAL_MODELS, *NARROW_MODELS, *TINY_MODELS])
    parser.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--optimizers", nargs="+", default=["adamw", "prodigy"], choices=["adamw", "prodigy",
                                                                                         "AdamW8bit"])
    parser.add_argument("--steps", type=int, default=10, help="measured steps per phase")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per phase (compilation happens here)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--weight-type", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--compile", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--end-to-end", action="store_true", help="also time the default job from images to zip")
    parser.add_argument("--count-ops", action="store_true",
                        help="count ops and host syncs per step (eager) instead of timing; --steps steps per phase")
    parser.add_argument("--e2e-steps", type=int, default=None, help="steps of the end-to-end job (default 300)")
    parser.add_argument("--output", type=Path, default=Path("benchmark-results.json"))
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    compile_ = {"auto": None, "on": True, "off": False}[args.compile]
    extra = preset_settings(args.preset)
    build_device = select_device(args.device)
    location = model_location(args.model, model_cache_dir(), build_device)
    cases: list[dict] = []
    op_counts: list[dict] = []
    report: dict[str, Any] = {"command": "python -m trainer benchmark " + " ".join(argv or sys.argv[1:]),
                              "environment": environment(args.device), "cases": cases, "end_to_end": None}
    if args.count_ops:
        report["op_counts"] = op_counts
    for resolution in args.resolutions:
        for batch in args.batches:
            for optimizer in args.optimizers:
                logger.info("case: %s %d px, batch %d, %s", args.model, resolution, batch, optimizer)
                if args.count_ops:
                    op_counts.append(count_case(args.model, location, resolution, batch, optimizer,
                                                steps=args.steps, warmup=args.warmup, device=args.device,
                                                weight_type=args.weight_type,
                                                gradient_checkpointing=args.gradient_checkpointing, extra=extra))
                    args.output.write_text(json.dumps(report, indent=2))
                    continue
                case = run_case(args.model, location, resolution, batch, optimizer, steps=args.steps,
                                warmup=args.warmup, device=args.device, weight_type=args.weight_type,
                                compile_=compile_, gradient_checkpointing=args.gradient_checkpointing,
                                extra=extra)
                cases.append(asdict(case))
                args.output.write_text(json.dumps(report, indent=2))
    if args.end_to_end:
        # The tiny models keep the default job's shape (8 images, batch 4, samples) at their own 64 px scale.
        tiny = ({"resolution": 64, "validation_img_size": 64, "validation_num_inference_steps": 2}
                if args.model in TINY_MODELS else {})
        report["end_to_end"] = end_to_end(location, device=args.device, weight_type=args.weight_type,
                                          steps=args.e2e_steps, extra={**extra, **tiny})
    args.output.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    return 0
