"""The training run, top to bottom: set up, loop, checkpoint, export.

One step: pick the batch (fixed by seed and step), draw noise and timesteps from a generator seeded by (seed, step),
encode the captions (or read the cache once the text side is frozen), predict, weight the loss, step the optimisers
of the groups that train at this step. The loss is read back from the device only every ``logging_steps`` steps.
"""

from __future__ import annotations

import csv
import logging
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer import checkpoint as ckpt
from trainer.adapters import lora as lora_adapters
from trainer.adapters.tokens import CONCEPT_INIT_WORDS, NewTokens, TokenInit
from trainer.config import TrainingConfig, save_config
from trainer.config.schema import default_token_list
from trainer.data.captions import replace_trigger
from trainer.data.dataset import Batch, BatchPlan, LatentSource
from trainer.data.manifest import PreparedDataset
from trainer.device import DeviceInfo, cpu_rng_state, set_cpu_rng_state, setup_device
from trainer.distributed import Distributed, init_distributed
from trainer.export.bundle import ExportSpec, usage_readme, write_export, write_zip
from trainer.export.files import SAVE_DTYPES, safe_name
from trainer.inference import sampling
from trainer.loss import (
    TokenAttentionProbe,
    add_l1_gradient,
    conditioning_loss,
    denoising_loss,
    lora_l1,
    min_snr_weights,
    offset_noise,
    probe_layer_names,
    snr,
    target_for,
    token_covariance_loss,
)
from trainer.models.loading import SDModels, load_models, model_cache_dir, resolve_source
from trainer.models.text import PromptEncoder
from trainer.optim import ParamGroup, build_groups
from trainer.utils.plot import plot_losses

logger = logging.getLogger(__name__)

LOSS_CSV = "loss.csv"
LOSS_PNG = "loss.png"


class TrainingCancelled(Exception):
    """Raised when the caller asked the run to stop; nothing partial is left behind."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class ProgressEvent:
    step: int
    total: int
    loss: float | None
    elapsed: float
    steps_per_second: float

    @property
    def fraction(self) -> float:
        return self.step / max(1, self.total)

    @property
    def eta_seconds(self) -> float | None:
        if self.steps_per_second <= 0:
            return None
        return (self.total - self.step) / self.steps_per_second


@dataclass
class RunResult:
    run_dir: Path
    final_checkpoint: Path
    zip_path: Path | None
    steps: int
    config: TrainingConfig
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class Phase:
    """Which parts train at a step."""

    ti: bool
    unet: bool
    te_lora: bool

    @property
    def text_trains(self) -> bool:
        return self.ti or self.te_lora


@dataclass
class Schedule:
    total: int
    ti_end: int
    unet_start: int
    unet_end: int
    te_end: int

    @classmethod
    def from_config(cls, config: TrainingConfig, total: int, has_ti: bool, has_te_lora: bool) -> Schedule:
        # The pivot: the text side (tokens and text-encoder LoRA) trains until freeze_ti_after_completion_f.
        pivot = math.floor(config.freeze_ti_after_completion_f * total)
        warmup = config.token_warmup_steps if has_ti else 0
        return cls(
            total=total,
            ti_end=pivot if has_ti else 0,
            unet_start=min(warmup, total),
            unet_end=total - math.floor(config.freeze_unet_before_completion_f * total),
            te_end=pivot if has_te_lora else 0,
        )

    def at(self, step: int) -> Phase:
        return Phase(
            ti=step < self.ti_end,
            unet=self.unet_start <= step < self.unet_end,
            te_lora=self.unet_start <= step < self.te_end,
        )

    def text_frozen_from(self, step: int) -> bool:
        """True when nothing in the text side trains at ``step`` or later."""
        return step >= max(self.ti_end, self.te_end)


def _step_seed(seed: int, micro_step: int) -> int:
    # Counter-based seeding: the randomness of a step does not depend on how the run got there (resume-exact).
    return (seed * 1_000_003 + micro_step * 7_919 + 12_345) % (2**63 - 1)


def _choose_seed(config: TrainingConfig) -> int:
    if config.seed is not None:
        return config.seed
    return random.SystemRandom().randrange(0, 2**31 - 1)


def _run_dir(config: TrainingConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = safe_name(config.name) if config.name else f"{config.concept_mode}"
    base = Path(config.output_dir) / f"{name}_{stamp}"
    path = base
    counter = 1
    while path.exists():
        path = base.with_name(f"{base.name}-{counter}")
        counter += 1
    return path


class LossLog:
    """``loss.csv``: one row per step, appended at each read-back (and truncated to the resume step)."""

    def __init__(self, run_dir: Path, resume_step: int):
        self.path = run_dir / LOSS_CSV
        self.rows: list[tuple[int, float]] = []
        if self.path.is_file():
            with self.path.open(newline="") as handle:
                reader = csv.reader(handle)
                next(reader, None)
                self.rows = [(int(s), float(v)) for s, v in reader if int(s) < resume_step]
        self._rewrite()

    def _rewrite(self) -> None:
        from trainer.utils.atomic import atomic_write_text

        text = "step,loss\n" + "".join(f"{s},{v:.6g}\n" for s, v in self.rows)
        atomic_write_text(self.path, text)

    def extend(self, rows: list[tuple[int, float]]) -> None:
        self.rows.extend(rows)
        with self.path.open("a") as handle:
            handle.writelines(f"{s},{v:.6g}\n" for s, v in rows)


# ================================================================================================= set-up
@dataclass
class Session:
    """Everything a run holds between steps."""

    config: TrainingConfig
    device: DeviceInfo
    models: SDModels
    dataset: PreparedDataset
    run_dir: Path
    seed: int
    total_steps: int
    schedule: Schedule
    groups: list[ParamGroup]
    tokens: NewTokens | None
    unet_lora_params: list[torch.nn.Parameter]
    """The LoRA matrices (A and B) of the UNet: what the L1 penalty acts on (not DoRA magnitudes)."""
    te_lora: bool
    text: PromptEncoder
    latents: LatentSource
    plan: BatchPlan
    noise_scheduler: object
    prediction_type: str
    captions: list[str]
    time_ids: torch.Tensor | None
    token_string: str | None
    probe: TokenAttentionProbe | None
    cov_stats: list[tuple[torch.Tensor, torch.Tensor]]
    dist: Distributed = field(default_factory=Distributed)
    timings: dict[str, float] = field(default_factory=dict)


def resolve_total_steps(config: TrainingConfig, batches_per_epoch: int) -> int:
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / config.gradient_accumulation_steps))
    use_epochs = config.num_train_epochs is not None and (
        config.max_train_steps is None or not config.explicitly_set("max_train_steps")
    )
    if use_epochs:
        return config.num_train_epochs * steps_per_epoch
    return config.max_train_steps


def _resolve_tokens(config: TrainingConfig, tokenizer) -> None:
    """An initial phrase sets n_tokens (unless n_tokens was given): resolve that before inserting tokens."""
    if config.disable_ti or config.initial_phrase is None:
        return
    n = len(tokenizer(config.initial_phrase, add_special_tokens=False).input_ids)
    if n == config.n_tokens:
        return
    if config.explicitly_set("n_tokens") or config.explicitly_set("inserting_list_tokens"):
        raise ValueError(
            f"initial_phrase {config.initial_phrase!r} has {n} tokens but n_tokens is {config.n_tokens}; leave "
            "n_tokens unset to take the phrase's length, or change the phrase"
        )
    config.n_tokens = n
    config.inserting_list_tokens = default_token_list(n)
    config.token_dict = {config.trigger: "".join(config.inserting_list_tokens)}


def setup(config: TrainingConfig, *, run_dir: Path | None = None, dataset: PreparedDataset | None = None,
          allow_local_sources: bool = True) -> tuple[Session, dict | None]:
    timings: dict[str, float] = {}
    config = config.model_copy(deep=True)
    from trainer.device import select_device

    dist = init_distributed(cpu=select_device(config.device).type == "cpu")
    resume_checkpoint = ckpt.resolve_resume(config.resume_from) if config.resume_from else None
    if resume_checkpoint is not None:
        run_dir = ckpt.run_dir_of(resume_checkpoint)
    run_dir = Path(dist.broadcast(str(run_dir) if run_dir else str(_run_dir(config))))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = ckpt.load_state(resume_checkpoint) if resume_checkpoint else None
    seed = state["seed"] if state else dist.broadcast(_choose_seed(config))
    config.seed = seed
    config.name = config.name or run_dir.name
    if not config.start_time:
        config.start_time = time.time()
    _seed_everything(seed)

    device = setup_device(config.device, config.weight_type, config.allow_tf32,
                          local_rank=dist.local_rank if dist.enabled else None)
    cache_dir = model_cache_dir(config.model_cache_dir)

    started = time.perf_counter()
    source = resolve_source(config.ckpt_path, config.pretrained_model, config.sd_model_version, cache_dir)
    # The main process loads first, so that downloads and fixture builds into the shared cache happen once.
    if not dist.is_main:
        dist.barrier()
    models = load_models(source, dtype=device.dtype, cache_dir=cache_dir, variant=config.hf_variant,
                         single_file_config=config.single_file_config)
    if dist.is_main:
        dist.barrier()
    config.sd_model_version = models.version
    timings["model_load_s"] = time.perf_counter() - started

    started = time.perf_counter()
    if dataset is None:
        from trainer.data.prepare import prepare_dataset

        # One process fetches and prepares the data; the others read the manifest it wrote.
        if dist.is_main:
            dataset = prepare_dataset(config, run_dir, allow_local=allow_local_sources)
        dist.barrier()
        if not dist.is_main:
            dataset = PreparedDataset.load(run_dir / "dataset")
    timings["data_prep_s"] = time.perf_counter() - started
    for size in dataset.target_sizes:
        multiple = models.unet_size_multiple
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"training size {size[1]}x{size[0]} is not a multiple of {multiple} for this model")

    _place_models(models, device, full_unet=not config.is_lora)
    # Seed again right before anything random is initialised: model loading and dataset preparation may or may
    # not draw random numbers (a fixture built on first use, a captioner), and the run must not depend on that.
    _seed_everything(seed)

    # ---- new tokens
    tokens = None
    token_string = None
    if not config.disable_ti:
        _resolve_tokens(config, models.tokenizers[0])
        init = TokenInit(
            word=config.initializer_token or (None if config.initial_phrase or config.initial_embedding_file
                                              else CONCEPT_INIT_WORDS[config.concept_mode]),
            phrase=config.initial_phrase,
            file=config.initial_embedding_file,
        )
        tokens = NewTokens.insert(models.text_encoders, models.tokenizers, config.inserting_list_tokens, init)
        token_string = config.token_dict[config.trigger]

    # ---- adapters
    alpha = config.lora_rank * config.lora_alpha_multiplier
    unet_lora_params: list[torch.nn.Parameter] = []
    if config.is_lora:
        unet_params = lora_adapters.add_unet_lora(models.unet, config.lora_rank, alpha, config.use_dora)
        unet_lora_params = [p for n, p in models.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    else:
        models.unet.requires_grad_(True)
        unet_params = list(models.unet.parameters())
    te_lora_params: list[torch.nn.Parameter] = []
    te_lora = config.text_encoder_lora_optimizer is not None
    if te_lora:
        for encoder in models.text_encoders:
            te_lora_params += lora_adapters.add_text_encoder_lora(
                encoder, config.text_encoder_lora_rank, float(config.text_encoder_lora_rank)
            )
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()

    # ---- data
    flip = config.left_right_flip_augmentation and config.concept_mode != "face"
    # The plan is over global batches (every process's share together) so that N processes see the same data as
    # one process with an N times larger batch.
    plan = BatchPlan(dataset, config.train_batch_size * dist.world_size, seed, flip)
    total_steps = resolve_total_steps(config, plan.batches_per_epoch)
    config.max_train_steps = total_steps
    config.num_train_epochs = math.ceil(total_steps * config.gradient_accumulation_steps / plan.batches_per_epoch)
    schedule = Schedule.from_config(config, total_steps, tokens is not None, te_lora)

    groups = []
    if unet_params and schedule.unet_end > schedule.unet_start:
        groups.append(ParamGroup("unet", unet_params, config.unet_optimizer_type, config.unet_lr,
                                 config.lora_weight_decay, config.unet_lr_warmup_steps or 0))
    if tokens is not None and schedule.ti_end > 0:
        groups.append(ParamGroup("ti", tokens.parameters(), config.ti_optimizer, config.ti_lr,
                                 config.ti_weight_decay, config.ti_lr_warmup_steps))
    if te_lora_params and schedule.te_end > schedule.unet_start:
        groups.append(ParamGroup("te_lora", te_lora_params, config.text_encoder_lora_optimizer,
                                 config.text_encoder_lora_lr, config.text_encoder_lora_weight_decay,
                                 config.txt_encoders_lr_warmup_steps))
    if not groups:
        raise ValueError(
            "nothing would train with these settings: check disable_ti, freeze_ti_after_completion_f, "
            "freeze_unet_before_completion_f, token_warmup_steps and text_encoder_lora_optimizer"
        )
    build_groups(groups, device, schedule=config.lr_scheduler, total_steps=total_steps,
                 d_coef=config.prodigy_d_coef, growth_rate=config.unet_prodigy_growth_factor)

    # ---- per-run constants
    from diffusers import DDPMScheduler

    prediction_type = config.prediction_type or models.scheduler.config.get("prediction_type", "epsilon")
    noise_scheduler = DDPMScheduler.from_config(models.scheduler.config, prediction_type=prediction_type)
    noise_scheduler.alphas_cumprod = noise_scheduler.alphas_cumprod.to(device.device)
    captions = [
        replace_trigger(s.caption, dataset.trigger, token_string) if token_string else s.caption
        for s in dataset.samples
    ]
    time_ids = sdxl_time_ids(dataset, device.device) if models.is_sdxl else None
    vae_dtype = models.vae.dtype
    latents = LatentSource(dataset, models.vae, device.device, vae_dtype=vae_dtype, cache=config.cache_vae_outputs,
                           flip=flip, use_masks=config.use_masks, scale_factor=models.vae_scale_factor)
    text = PromptEncoder(models.text_encoders, models.tokenizers, models.is_sdxl, device.device)

    probe = None
    if config.token_attention_loss_w > 0 and tokens is not None:
        probe = TokenAttentionProbe()
        layers = probe_layer_names(models.unet)
        processors = dict(models.unet.attn_processors)
        for name in layers:
            processors[name] = probe.processor()
        models.unet.set_attn_processor(processors)
    cov_stats = []
    if config.tok_cov_reg_w > 0 and tokens is not None:
        cov_stats = [tokens.pretrained_statistics(i) for i in range(len(models.text_encoders))]

    if config.torch_compile if config.torch_compile is not None else device.supports_compile:
        # Regional compilation: each transformer block compiles once and is reused, so the warm-up takes seconds
        # where compiling the whole UNet takes minutes. After LoRA injection, so the adapters are compiled in.
        # TRAINER_COMPILE_BACKEND picks another torch.compile backend (e.g. aot_eager to debug graph capture).
        backend = os.environ.get("TRAINER_COMPILE_BACKEND", "inductor")
        models.unet.compile_repeated_blocks(dynamic=False, backend=backend)
        logger.info("compiling the UNet's transformer blocks (regional torch.compile, %s)", backend)

    session = Session(
        config=config, device=device, models=models, dataset=dataset, run_dir=run_dir, seed=seed, dist=dist,
        total_steps=total_steps, schedule=schedule, groups=groups, tokens=tokens,
        unet_lora_params=unet_lora_params, te_lora=te_lora, text=text, latents=latents, plan=plan,
        noise_scheduler=noise_scheduler, prediction_type=prediction_type, captions=captions, time_ids=time_ids,
        token_string=token_string, probe=probe, cov_stats=cov_stats, timings=timings,
    )
    if dist.is_main:
        save_config(config, run_dir / "training_args.json")
    return session, state


def sdxl_time_ids(dataset: PreparedDataset, device: torch.device) -> torch.Tensor:
    """SDXL's size and crop conditioning per sample, unflipped and flipped: [N, 2, 6].

    A mirrored crop starts at ``resized_width - left - target_width`` (when the manifest knows the resized size).
    """
    rows = []
    for s in dataset.samples:
        top, left = s.crop_top_left
        flipped_left = left
        if s.resized_size is not None:
            flipped_left = max(0, s.resized_size[1] - left - s.target_size[1])
        rows.append([
            [*s.original_size, top, left, *s.target_size],
            [*s.original_size, top, flipped_left, *s.target_size],
        ])
    return torch.tensor(rows, dtype=torch.float32, device=device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def _place_models(models: SDModels, device: DeviceInfo, full_unet: bool) -> None:
    models.unet.to(device.device, dtype=torch.float32 if full_unet else device.dtype)
    # SDXL's VAE overflows in fp16; latents are cached once, so fp32 there costs nothing per step.
    vae_dtype = torch.float32 if (device.dtype == torch.float16 and models.is_sdxl) else device.dtype
    models.vae.to(device.device, dtype=vae_dtype)
    for encoder in models.text_encoders:
        encoder.to(device.device, dtype=device.dtype)
    if device.prefers_channels_last:
        models.unet.to(memory_format=torch.channels_last)


# ================================================================================================= state
def training_state(session: Session, next_step: int) -> dict:
    return {
        "step": next_step,
        "seed": session.seed,
        "total_steps": session.total_steps,
        "groups": {
            g.name: {"optimizer": g.optimizer.state_dict(), "scheduler": g.scheduler.state_dict()}
            for g in session.groups
        },
        "unet_lora": lora_adapters.lora_state_dict(session.models.unet) if session.config.is_lora else None,
        "unet_full": None if session.config.is_lora else {
            k: v.detach().cpu() for k, v in session.models.unet.state_dict().items()
        },
        "te_lora": (
            [lora_adapters.lora_state_dict(e) for e in session.models.text_encoders] if session.te_lora else None
        ),
        "token_rows": session.tokens.rows() if session.tokens else None,
        "rng": {"cpu": cpu_rng_state(), "device": session.device.rng_state()},
    }


def restore(session: Session, state: dict) -> int:
    if state["total_steps"] != session.total_steps:
        raise ValueError(
            f"the checkpoint was made for a run of {state['total_steps']} steps but this configuration gives "
            f"{session.total_steps}; resume with the same max_train_steps / num_train_epochs and data"
        )
    if state["unet_lora"] is not None:
        lora_adapters.load_lora_state_dict(session.models.unet, state["unet_lora"])
    if state["unet_full"] is not None:
        session.models.unet.load_state_dict(state["unet_full"])
    if state["te_lora"] is not None:
        for encoder, te_state in zip(session.models.text_encoders, state["te_lora"], strict=True):
            lora_adapters.load_lora_state_dict(encoder, te_state)
    if state["token_rows"] is not None and session.tokens is not None:
        session.tokens.load_rows(state["token_rows"])
    for group in session.groups:
        saved = state["groups"].get(group.name)
        if saved is None:
            raise ValueError(f"the checkpoint has no state for the {group.name} optimiser: the settings differ")
        group.optimizer.load_state_dict(saved["optimizer"])
        group.scheduler.load_state_dict(saved["scheduler"])
    set_cpu_rng_state(state["rng"]["cpu"])
    session.device.set_rng_state(state["rng"]["device"])
    logger.info("resumed at step %d of %d", state["step"], session.total_steps)
    return state["step"]


# ================================================================================================= one step
def _apply_phase(session: Session, phase: Phase) -> None:
    if session.tokens is not None:
        session.tokens.requires_grad_(phase.ti)
    for group in session.groups:
        if group.name == "unet":
            for p in group.params:
                p.requires_grad_(phase.unet)
        elif group.name == "te_lora":
            for p in group.params:
                p.requires_grad_(phase.te_lora)
    for encoder in session.models.text_encoders:
        encoder.train(phase.text_trains)
    session.models.unet.train(True)


def compute_loss(session: Session, batch: Batch, micro_step: int, phase: Phase) -> torch.Tensor:
    """The loss of this process's share of the global ``batch`` of ``micro_step``."""
    config, device = session.config, session.device
    # Randomness is drawn for the whole global batch and then sliced, so that every sample gets the same noise,
    # timestep and dropout whatever the number of processes.
    share = session.dist.rank_slice(len(batch.indices))
    dropout = random.Random(f"{session.seed}-dropout-{micro_step}")
    texts = ["" if dropout.random() < config.caption_dropout else session.captions[i] for i in batch.indices][share]
    local = Batch(indices=batch.indices[share], flips=batch.flips[share], target_size=batch.target_size)
    latents, masks = session.latents.get(local)
    generator = device.generator(_step_seed(session.seed, micro_step))
    global_shape = (len(batch.indices), *latents.shape[1:])
    noise = torch.randn(global_shape, generator=generator, device=latents.device, dtype=latents.dtype)
    noise = offset_noise(noise, config.noise_offset, generator)[share]
    n_train = session.noise_scheduler.config.num_train_timesteps
    timesteps = torch.randint(0, n_train, (global_shape[0],), generator=generator, device=latents.device)[share]
    noisy = session.noise_scheduler.add_noise(latents, noise, timesteps)
    target = target_for(session.prediction_type, latents, noise, timesteps, session.noise_scheduler)
    batch = local

    with device.autocast():
        with torch.set_grad_enabled(phase.text_trains):
            prompt_embeds, pooled = session.text.encode(texts)
        kwargs = {}
        if session.models.is_sdxl:
            time_ids = session.time_ids[batch.indices, [int(f) for f in batch.flips]]
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids}
        token_mask = None
        if session.probe is not None or config.tok_cond_reg_w > 0:
            token_mask = session.tokens.new_token_mask(session.text.token_ids(texts)[0])
        if session.probe is not None:
            session.probe.reset(token_mask)
        model_pred = session.models.unet(
            noisy.to(memory_format=torch.channels_last) if device.prefers_channels_last else noisy,
            timesteps, encoder_hidden_states=prompt_embeds, **kwargs,
        ).sample

    weights = None
    if config.snr_gamma:
        weights = min_snr_weights(snr(session.noise_scheduler.alphas_cumprod, timesteps), config.snr_gamma,
                                  session.prediction_type)
    loss = denoising_loss(model_pred, target, mask=masks, weights=weights)

    if config.l1_penalty > 0 and session.unet_lora_params and phase.unet:
        # The value joins the logged loss; its gradient is added in optimizer_step (see add_l1_gradient).
        with torch.no_grad():
            penalty = config.l1_penalty * lora_l1(session.unet_lora_params)
        loss = loss + penalty
    if session.cov_stats and phase.ti:
        for (mean, inverse), parameter in zip(session.cov_stats, session.tokens.parameters(), strict=True):
            loss = loss + config.tok_cov_reg_w * token_covariance_loss(parameter, mean, inverse)
    if config.cond_reg_w > 0 and phase.text_trains:
        loss = loss + config.cond_reg_w * conditioning_loss(prompt_embeds)
    if config.tok_cond_reg_w > 0 and phase.text_trains and token_mask is not None:
        loss = loss + config.tok_cond_reg_w * conditioning_loss(prompt_embeds, token_mask)
    if session.probe is not None:
        loss = loss + config.token_attention_loss_w * session.probe.loss(masks)
    return loss


def optimizer_step(session: Session, phase: Phase) -> None:
    active = {"unet": phase.unet, "ti": phase.ti, "te_lora": phase.te_lora}
    session.dist.average_gradients([p for g in session.groups if active[g.name] for p in g.params])
    if session.config.l1_penalty > 0 and phase.unet and session.unet_lora_params:
        add_l1_gradient(session.unet_lora_params, session.config.l1_penalty)
    for group in session.groups:
        if active[group.name]:
            if session.config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(group.params, session.config.max_grad_norm, foreach=True)
            group.optimizer.step()
        group.optimizer.zero_grad(set_to_none=True)
        group.scheduler.step()


# ================================================================================================= outputs
def export_spec(session: Session) -> ExportSpec:
    config = session.config
    return ExportSpec(
        name=safe_name(config.name),
        version=session.models.version,
        rank=config.lora_rank,
        alpha=config.lora_rank * config.lora_alpha_multiplier,
        te_rank=config.text_encoder_lora_rank,
        te_alpha=float(config.text_encoder_lora_rank),
        resolution=session.dataset.target_sizes[0],
        n_images=len(session.dataset),
        captions=[s.caption for s in session.dataset.samples],
        base_model=session.models.source.describe(),
        token_dict=config.token_dict if session.tokens else {config.trigger: config.trigger},
        tokens=config.inserting_list_tokens if session.tokens else [],
        training_args=config.to_json_dict(),
        save_dtype=SAVE_DTYPES[config.save_dtype],
    )


def sample_size(session: Session) -> tuple[int, int]:
    from trainer.data.sizes import size_for_aspect

    config, models = session.config, session.models
    train_h, train_w = session.dataset.target_sizes[0]
    if isinstance(config.validation_img_size, list):
        return config.validation_img_size[1], config.validation_img_size[0]
    native = models.unet.config.sample_size * models.vae_scale_factor
    side = config.validation_img_size or max(native, int(math.sqrt(train_h * train_w)))
    return size_for_aspect(side, train_w / train_h, multiple=models.unet_size_multiple)


def render_samples(session: Session, folder: Path, step: int) -> Path | None:
    config = session.config
    if config.n_sample_imgs == 0:
        return None
    models = session.models
    prompts = sampling.sample_prompts(config.concept_mode, config.n_sample_imgs, config.validation_prompts,
                                      config.negative_validation_prompts)
    if config.prompt_modifier:
        prompts = [(f"{p}, {config.prompt_modifier}", n) for p, n in prompts]
    was_training = models.unet.training
    models.unet.eval()
    if config.offload_idle_modules:
        offload_idle(session, False)
    try:
        pipeline = models.pipeline()
        pipeline.set_progress_bar_config(disable=True)
        if config.enable_cpu_offload_during_validation and session.device.backend != "cpu":
            pipeline.enable_model_cpu_offload(device=session.device.device)
        with session.device.autocast():
            images = sampling.render(
                pipeline, prompts, trigger=config.trigger, token_string=session.token_string,
                size_hw=sample_size(session), steps=config.validation_num_inference_steps,
                guidance=config.validation_guidance_scale, lora_scale=config.sample_imgs_lora_scale or 1.0,
                seed=session.seed, device=session.device.device, lora_active=config.is_lora,
            )
    finally:
        models.unet.train(was_training)
        if config.offload_idle_modules:
            offload_idle(session, True)
    return sampling.save_samples(images, prompts, folder / "samples", f"step-{step:06d}")


def save_checkpoint(session: Session, step: int, with_samples: bool) -> Path:
    if not session.dist.is_main:
        session.dist.barrier()
        return ckpt.checkpoint_dir(session.run_dir, step)

    def write_files(folder: Path) -> None:
        _check_finite_parameters(session, step)
        write_export(
            folder, export_spec(session), unet=session.models.unet, text_encoders=session.models.text_encoders,
            token_rows=session.tokens.rows() if session.tokens else None, unet_lora=session.config.is_lora,
            te_lora=session.te_lora, full_unet=not session.config.is_lora,
        )
        if with_samples:
            render_samples(session, folder, step)

    try:
        return ckpt.write_checkpoint(session.run_dir, step, write_files, training_state(session, step),
                                     session.config.max_checkpoints, protect={session.total_steps})
    finally:
        session.dist.barrier()


def _check_finite_parameters(session: Session, step: int) -> None:
    params = [p for g in session.groups for p in g.params]
    norms = torch._foreach_norm(params)
    if not torch.isfinite(torch.stack(norms)).all():
        raise TrainingDiverged(
            f"weights became NaN or infinite before step {step}; no checkpoint was written for it. "
            "Lower unet_lr / ti_lr, set max_grad_norm, or use weight_type 'bf16' or 'fp32'."
        )


# ================================================================================================= the run
def train(config: TrainingConfig, *, run_dir: Path | None = None, dataset: PreparedDataset | None = None,
          should_stop: Callable[[], bool] | None = None, on_progress: Callable[[ProgressEvent], None] | None = None,
          allow_local_sources: bool = True, make_zip: bool = True) -> RunResult:
    """Run one training job end to end and return where its outputs are."""
    wall_start = time.perf_counter()
    session, state = setup(config, run_dir=run_dir, dataset=dataset, allow_local_sources=allow_local_sources)
    result = run(session, state, should_stop=should_stop, on_progress=on_progress, make_zip=make_zip)
    result.timings["total_s"] = time.perf_counter() - wall_start
    return result


def enter_phase(session: Session, phase: Phase, step: int) -> None:
    """Switch which parts train; cache text-encoder outputs once the text side is frozen for good."""
    _apply_phase(session, phase)
    config = session.config
    if config.cache_text_encoder_outputs and not session.text.cached and session.schedule.text_frozen_from(step):
        session.text.build_cache([*session.captions, ""], session.device.autocast)
        logger.info("text side frozen from step %d: text-encoder outputs cached", step)
        if config.offload_idle_modules:
            offload_idle(session, True)


def offload_idle(session: Session, offload: bool) -> None:
    """Move the modules that cached outputs replaced (text encoders; the VAE once latents are cached) off the
    device, or back for sampling."""
    target = torch.device("cpu") if offload else session.device.device
    modules = list(session.models.text_encoders) if session.text.cached else []
    if session.latents.cache_enabled:
        modules.append(session.models.vae)
    for module in modules:
        module.to(target)
    if offload:
        session.device.empty_cache()


def train_step(session: Session, step: int, phase: Phase) -> torch.Tensor:
    """One optimisation step (all micro-batches); returns the mean loss as a device tensor (no synchronisation)."""
    accum = session.config.gradient_accumulation_steps
    step_loss = None
    for micro in range(accum):
        micro_step = step * accum + micro
        loss = compute_loss(session, session.plan.batch(micro_step), micro_step, phase)
        (loss / accum).backward()
        if session.probe is not None:
            session.probe.disarm()
        step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
    optimizer_step(session, phase)
    return session.dist.average(step_loss / accum)


def run(session: Session, state: dict | None = None, *, should_stop: Callable[[], bool] | None = None,
        on_progress: Callable[[ProgressEvent], None] | None = None, make_zip: bool = True) -> RunResult:
    """The training loop over a prepared session (``state``: a checkpoint's training state to resume from)."""
    from tqdm.auto import tqdm

    config, dist = session.config, session.dist
    start_step = restore(session, state) if state else 0
    log = LossLog(session.run_dir, start_step) if dist.is_main else None

    started = time.perf_counter()
    session.latents.build_cache()
    session.timings["latent_cache_s"] = time.perf_counter() - started
    if config.offload_idle_modules:
        offload_idle(session, True)

    current: Phase | None = None
    existing = ckpt.list_checkpoints(session.run_dir)
    last_good = existing[-1][1] if existing else None
    bar = tqdm(total=session.total_steps, initial=start_step, desc="training", unit="step", dynamic_ncols=True,
               disable=not dist.is_main)
    loop_start = time.perf_counter()
    last_loss: float | None = None
    pending: list[tuple[int, torch.Tensor]] = []
    try:
        for step in range(start_step, session.total_steps):
            if should_stop is not None and should_stop():
                raise TrainingCancelled(f"training was cancelled at step {step}")
            phase = session.schedule.at(step)
            if not (phase.ti or phase.unet or phase.te_lora):
                # Nothing trains in this stretch (for example after the UNet froze and the tokens pivoted): the
                # schedules still advance so that a resumed run lines up.
                optimizer_step(session, phase)
                continue
            if phase != current:
                enter_phase(session, phase, step)
                current = phase
            pending.append((step, train_step(session, step, phase)))

            done = step + 1
            checkpoint_due = config.checkpointing_steps and done % config.checkpointing_steps == 0
            if done % config.logging_steps == 0 or checkpoint_due or done == session.total_steps:
                # The only read-back of the loss: once per logging interval, all pending steps together.
                values = torch.stack([v for _, v in pending]).float().cpu().tolist()
                flushed = [(s, v) for (s, _), v in zip(pending, values, strict=True)]
                pending = []
                if log is not None:
                    log.extend(flushed)
                for logged_step, value in flushed:
                    if not math.isfinite(value):
                        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved"
                        raise TrainingDiverged(
                            f"the loss became {value} at step {logged_step + 1}; {where}. Lower unet_lr / ti_lr, set "
                            "max_grad_norm, or use weight_type 'bf16' or 'fp32'."
                        )
                    last_loss = value
                elapsed = time.perf_counter() - loop_start
                rate = (done - start_step) / elapsed if elapsed > 0 else 0.0
                bar.set_postfix(loss=f"{last_loss:.4f}" if last_loss is not None else "-", refresh=False)
                bar.update(done - bar.n)
                if on_progress is not None and dist.is_main:
                    on_progress(ProgressEvent(done, session.total_steps, last_loss, elapsed, rate))
            if checkpoint_due and done < session.total_steps:
                last_good = save_checkpoint(session, done, with_samples=True)
    finally:
        bar.close()
    session.timings["train_loop_s"] = time.perf_counter() - loop_start

    final = save_checkpoint(session, session.total_steps, with_samples=True)
    zip_path = None
    if dist.is_main:
        plot_losses(log.rows, session.run_dir / LOSS_PNG)
        extras = {}
        if config.evaluate_checkpoints:
            from trainer.evaluate import evaluate_after_training

            extras = evaluate_after_training(session)
        if make_zip:
            zip_path = build_zip(session, final, extras)
        logger.info("done: %s", zip_path or final)
    dist.barrier()
    return RunResult(session.run_dir, final, zip_path, session.total_steps, config, session.timings)


def build_zip(session: Session, final: Path, extras: dict[str, Path] | None = None) -> Path:
    spec = export_spec(session)
    extras = dict(extras or {})
    extras.setdefault(LOSS_CSV, session.run_dir / LOSS_CSV)
    extras.setdefault(LOSS_PNG, session.run_dir / LOSS_PNG)
    readme = usage_readme(spec, has_lora=session.config.is_lora or session.te_lora,
                          has_embeddings=session.tokens is not None, full_unet=not session.config.is_lora)
    return write_zip(session.run_dir / f"{spec.name}.zip", final, extras, readme)
