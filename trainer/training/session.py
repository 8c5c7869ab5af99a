"""Setting a run up: :func:`setup` calls one named builder per part, in order, and gathers what they make in a
:class:`Session`, the state the loop works on.

The order matters for reproducibility: everything random after the second seeding (the token initialisation, the
LoRA matrices) is drawn in the same order in every run.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from trainer.adapters import lora as lora_adapters
from trainer.adapters.attention import install_lean_processors
from trainer.adapters.attention_probe import TokenAttentionProbe, install_probe
from trainer.adapters.tokens import CONCEPT_INIT_WORDS, NewTokens, TokenInit
from trainer.config.load import save_training_args
from trainer.config.schema import TrainingConfig
from trainer.data.augment import flips_allowed
from trainer.data.captions import replace_trigger
from trainer.data.dataset import BatchPlan, LatentSource
from trainer.data.manifest import PreparedDataset
from trainer.data.prepare import prepare_dataset
from trainer.device import DeviceInfo, select_device, setup_device
from trainer.distributed import Distributed, init_distributed
from trainer.models.loading import SDModels, load_models, model_cache_dir, resolve_source
from trainer.models.text import PromptEncoder
from trainer.training import checkpoint as ckpt
from trainer.training.optimizers import GroupName, ParamGroup, build_groups
from trainer.training.resolved import ResolvedRun, choose_seed, new_run_dir, resolve_run, resolve_tokens
from trainer.training.schedule import Schedule, eden_lr_lambda

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Adapters:
    """The trainable parameters the adapters added (or the whole UNet for a full fine-tune)."""

    unet: list[torch.nn.Parameter]
    unet_lora: list[torch.nn.Parameter]
    """The LoRA matrices (A and B) of the UNet: what the L1 penalty acts on (not DoRA magnitudes)."""
    text_encoders: list[torch.nn.Parameter]

    @property
    def te_lora(self) -> bool:
        return bool(self.text_encoders)


@dataclass(frozen=True)
class Noise:
    """The training noise schedule and what the UNet predicts."""

    scheduler: DDPMScheduler
    prediction_type: str


@dataclass
class Session:
    """Everything a run holds between steps."""

    config: TrainingConfig
    """As validated; never changed. What the run derived from it is in ``run``."""
    run: ResolvedRun
    device: DeviceInfo
    dist: Distributed
    models: SDModels
    dataset: PreparedDataset
    tokens: NewTokens | None
    adapters: Adapters
    schedule: Schedule
    groups: list[ParamGroup]
    plan: BatchPlan
    latents: LatentSource
    text: PromptEncoder
    noise: Noise
    captions: list[str]
    """Each sample's caption with the trigger replaced by the new tokens."""
    time_ids: torch.Tensor | None
    probe: TokenAttentionProbe | None
    cov_stats: list[tuple[torch.Tensor, torch.Tensor]]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def seed(self) -> int:
        return self.run.seed

    @property
    def total_steps(self) -> int:
        return self.run.total_steps

    @property
    def token_string(self) -> str | None:
        return self.run.token_string if self.tokens is not None else None

    @property
    def dropout_caption(self) -> str:
        return self.token_string or ""

    @property
    def te_lora(self) -> bool:
        return self.adapters.te_lora

    def offload_idle(self, offload: bool) -> None:
        """Move the modules that cached outputs replaced (text encoders; the VAE once latents are cached) off the
        device, or back for sampling."""
        target = torch.device("cpu") if offload else self.device.device
        modules = list(self.models.text_encoders) if self.text.cached else []
        if self.latents.cache_enabled:
            modules.append(self.models.vae)
        for module in modules:
            module.to(target)
        if offload:
            self.device.empty_cache()


@dataclass(frozen=True)
class RunStart:
    """Where a run lives and how it is seeded, decided before anything is loaded."""

    run_dir: Path
    seed: int
    start_time: float
    state: dict | None
    """The training state of the checkpoint being resumed, if any."""


# ============================================================================================== the recipe
def setup(config: TrainingConfig, *, run_dir: Path | None = None, dataset: PreparedDataset | None = None,
          allow_local_sources: bool = True, local_paths: bool = True) -> tuple[Session, dict | None]:
    """Build a run's session; returns it with the training state to resume from (None for a new run)."""
    timings: dict[str, float] = {}
    dist = init_distributed(cpu=select_device(config.device).type == "cpu")
    start = start_run(config, run_dir, dist)
    _seed_everything(start.seed)
    device = setup_device(config.device, config.weight_type, config.allow_tf32,
                          local_rank=dist.local_rank if dist.enabled else None)
    models = _timed(timings, "model_load_s", load_base_models, config, device, dist, local_paths)
    dataset = _timed(timings, "data_prep_s", prepare_data, config, models, start, dist, dataset,
                     allow_local_sources)
    place_models(models, device, full_unet=not config.is_lora)
    # Seed again right before anything random is initialised: model loading and dataset preparation may or may
    # not draw random numbers (a fixture built on first use, a captioner), and the run must not depend on that.
    _seed_everything(start.seed)

    token_list, token_dict = resolve_tokens(config, _token_counter(models))
    tokens = add_tokens(config, models, token_list)
    adapters = add_adapters(config, models)
    flip = flips_allowed(config.concept_mode, config.left_right_flip_augmentation)
    # The plan is over global batches (every process's share together) so that N processes see the same data as
    # one process with an N times larger batch.
    plan = BatchPlan(dataset, config.train_batch_size * dist.world_size, start.seed, flip)
    run = resolve_run(config, run_dir=start.run_dir, seed=start.seed, start_time=start.start_time,
                      version=models.version, tokens=token_list, token_dict=token_dict,
                      batches_per_epoch=plan.batches_per_epoch, train_size=dataset.target_sizes[0])
    schedule = Schedule.from_config(config, run.total_steps, tokens is not None, adapters.te_lora,
                                    run.steps_per_epoch)
    groups = build_optimizer_groups(config, run, schedule, device, tokens, adapters)
    install_lean_processors(models.unet)
    probe = install_token_probe(config, models, tokens)
    compile_unet(config, models, device, n_sizes=len(set(dataset.target_sizes)))

    session = Session(
        config=config, run=run, device=device, dist=dist, models=models, dataset=dataset, tokens=tokens,
        adapters=adapters, schedule=schedule, groups=groups, plan=plan,
        latents=latent_source(config, dataset, models, device, flip), text=PromptEncoder(
            models.text_encoders, models.tokenizers, models.is_sdxl, device.device),
        noise=noise_setup(config, models, device), captions=training_captions(dataset, run, tokens),
        time_ids=sdxl_time_ids(dataset, device.device) if models.is_sdxl else None, probe=probe,
        cov_stats=covariance_statistics(config, models, tokens), timings=timings,
    )
    if dist.is_main:
        save_training_args(run.training_args(config), run.run_dir / "training_args.json")
    return session, start.state


# ============================================================================================== builders
def start_run(config: TrainingConfig, run_dir: Path | None, dist: Distributed) -> RunStart:
    """The run folder (a resumed checkpoint's, the caller's, or a new one), the seed and the resumable state."""
    resume_checkpoint = ckpt.resolve_resume(config.resume_from) if config.resume_from else None
    if resume_checkpoint is not None:
        run_dir = ckpt.run_dir_of(resume_checkpoint)
    run_dir = Path(dist.broadcast(str(run_dir) if run_dir else str(new_run_dir(config))))
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    state = ckpt.load_state(resume_checkpoint) if resume_checkpoint else None
    seed = state["seed"] if state else dist.broadcast(choose_seed(config))
    return RunStart(run_dir=run_dir, seed=seed, start_time=time.time(), state=state)


def load_base_models(config: TrainingConfig, device: DeviceInfo, dist: Distributed, local_paths: bool) -> SDModels:
    cache_dir = model_cache_dir(config.model_cache_dir)
    source = resolve_source(config.ckpt_path, config.pretrained_model, config.sd_model_version, cache_dir,
                            local_paths=local_paths)
    # The main process loads first, so that downloads and fixture builds into the shared cache happen once.
    if not dist.is_main:
        dist.barrier()
    models = load_models(source, dtype=device.dtype, cache_dir=cache_dir, variant=config.hf_variant,
                         single_file_config=config.single_file_config)
    if dist.is_main:
        dist.barrier()
    return models


def prepare_data(config: TrainingConfig, models: SDModels, start: RunStart, dist: Distributed,
                 dataset: PreparedDataset | None, allow_local_sources: bool) -> PreparedDataset:
    """The prepared training set (given, or made by the main process; the others read its manifest)."""
    if dataset is None:
        if dist.is_main:
            dataset = prepare_dataset(config, start.run_dir, seed=start.seed, allow_local=allow_local_sources)
        dist.barrier()
        if not dist.is_main:
            dataset = PreparedDataset.load(start.run_dir / "dataset")
    assert dataset is not None
    multiple = models.unet_size_multiple
    for size in dataset.target_sizes:
        if size[0] % multiple or size[1] % multiple:
            raise ValueError(f"training size {size[1]}x{size[0]} is not a multiple of {multiple} for this model")
    return dataset


def place_models(models: SDModels, device: DeviceInfo, full_unet: bool) -> None:
    models.unet.to(device.device, dtype=torch.float32 if full_unet else device.dtype)
    # SDXL's VAE overflows in fp16; latents are cached once, so fp32 there costs nothing per step.
    vae_dtype = torch.float32 if (device.dtype == torch.float16 and models.is_sdxl) else device.dtype
    models.vae.to(device.device, dtype=vae_dtype)
    for encoder in models.text_encoders:
        encoder.to(device.device, dtype=device.dtype)
    if device.prefers_channels_last:
        models.unet.to(memory_format=torch.channels_last)


def add_tokens(config: TrainingConfig, models: SDModels, token_list: tuple[str, ...]) -> NewTokens | None:
    """Insert the new tokens into every tokenizer and text encoder (None with ``disable_ti``)."""
    if config.disable_ti:
        return None
    init = TokenInit(
        word=config.initializer_token or (None if config.initial_phrase or config.initial_embedding_file
                                          else CONCEPT_INIT_WORDS[config.concept_mode]),
        phrase=config.initial_phrase,
        file=config.initial_embedding_file,
    )
    return NewTokens.insert(models.text_encoders, models.tokenizers, list(token_list), init)


def add_adapters(config: TrainingConfig, models: SDModels) -> Adapters:
    """The UNet's LoRA (or DoRA; or the whole UNet for a full fine-tune) and the text encoders' LoRA."""
    unet_lora: list[torch.nn.Parameter] = []
    if config.is_lora:
        unet = lora_adapters.add_unet_lora(models.unet, config.lora_rank,
                                           config.lora_rank * config.lora_alpha_multiplier, config.use_dora)
        unet_lora = [p for n, p in models.unet.named_parameters() if ".lora_A." in n or ".lora_B." in n]
    else:
        models.unet.requires_grad_(True)
        unet = list(models.unet.parameters())
    text_encoders: list[torch.nn.Parameter] = []
    if config.text_encoder_lora_optimizer is not None:
        for encoder in models.text_encoders:
            # Eden: the text-encoder LoRA's alpha follows lora_alpha_multiplier too (trainer/optimizer.py).
            text_encoders += lora_adapters.add_text_encoder_lora(
                encoder, config.text_encoder_lora_rank, config.text_encoder_lora_rank * config.lora_alpha_multiplier
            )
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
    return Adapters(unet=unet, unet_lora=unet_lora, text_encoders=text_encoders)


def build_optimizer_groups(config: TrainingConfig, run: ResolvedRun, schedule: Schedule, device: DeviceInfo,
                           tokens: NewTokens | None, adapters: Adapters) -> list[ParamGroup]:
    """One optimiser and learning-rate schedule per part that trains at some step of the run."""
    groups = []
    # Eden builds no UNet optimiser when unet_lr is 0 (a tokens-only run).
    if adapters.unet and config.unet_lr > 0 and schedule.unet_end > schedule.unet_start:
        groups.append(ParamGroup(GroupName.UNET, adapters.unet, config.unet_optimizer_type, config.unet_lr,
                                 config.lora_weight_decay, config.unet_lr_warmup_steps or 0))
    if tokens is not None and schedule.ti_end > 0:
        groups.append(ParamGroup(GroupName.TOKENS, tokens.parameters(), config.ti_optimizer, config.ti_lr,
                                 config.ti_weight_decay, config.ti_lr_warmup_steps))
    te_optimizer = config.text_encoder_lora_optimizer
    if adapters.text_encoders and te_optimizer is not None and schedule.te_end > schedule.unet_start:
        groups.append(ParamGroup(GroupName.TEXT_ENCODER_LORA, adapters.text_encoders, te_optimizer,
                                 config.text_encoder_lora_lr,
                                 config.text_encoder_lora_weight_decay, config.txt_encoders_lr_warmup_steps))
    if not groups:
        raise ValueError(
            "nothing would train with these settings: check unet_lr, disable_ti, freeze_ti_after_completion_f, "
            "freeze_unet_before_completion_f, token_warmup_steps and text_encoder_lora_optimizer"
        )
    if config.lr_scheduler == "eden":
        for group in groups:
            group.lr_lambda = eden_lr_lambda(group.name, config, schedule, group.optimizer_type, group.initial_lr)
    return build_groups(groups, device, schedule=config.lr_scheduler, total_steps=run.total_steps,
                        d_coef=config.prodigy_d_coef, growth_rate=config.unet_prodigy_growth_factor)


def install_token_probe(config: TrainingConfig, models: SDModels,
                        tokens: NewTokens | None) -> TokenAttentionProbe | None:
    """The attention probe, only while its loss has a weight (it costs nothing otherwise)."""
    if config.token_attention_loss_w > 0 and tokens is not None:
        return install_probe(models.unet)
    return None


#: Graphs one training size can need in a compiled transformer block: one per block width (SDXL has three levels
#: with attention), one more for the probed mid-block layers, each with and without a gradient into the text
#: context (before and after the pivot).
GRAPHS_PER_SIZE = 8


def compile_unet(config: TrainingConfig, models: SDModels, device: DeviceInfo, n_sizes: int = 1) -> None:
    if not (config.torch_compile if config.torch_compile is not None else device.supports_compile):
        return
    # Regional compilation: each transformer block compiles once and is reused, so the warm-up takes seconds where
    # compiling the whole UNet takes minutes. After LoRA injection, so the adapters are compiled in.
    # TRAINER_COMPILE_BACKEND picks another torch.compile backend (e.g. aot_eager to debug graph capture).
    backend = os.environ.get("TRAINER_COMPILE_BACKEND", "inductor")
    # Every block shares one code object, whose graphs count against one recompile limit (8 by default): past it
    # the blocks silently run eager. Shapes are static (a specialised graph per size is faster), so the limit must
    # cover every (width, probe, text gradient) variant of every aspect bucket; it still bounds a runaway.
    limit = GRAPHS_PER_SIZE * max(1, n_sizes)
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, limit)
    torch._dynamo.config.accumulated_recompile_limit = max(torch._dynamo.config.accumulated_recompile_limit, limit)
    models.unet.compile_repeated_blocks(dynamic=False, backend=backend)
    logger.info("compiling the UNet's transformer blocks (regional torch.compile, %s; up to %d graphs)", backend,
                limit)


def latent_source(config: TrainingConfig, dataset: PreparedDataset, models: SDModels, device: DeviceInfo,
                  flip: bool) -> LatentSource:
    return LatentSource(dataset, models.vae, device.device, vae_dtype=models.vae.dtype,
                        cache=config.cache_vae_outputs, flip=flip, use_masks=config.use_masks,
                        scale_factor=models.vae_scale_factor, workers=config.dataloader_num_workers)


def noise_setup(config: TrainingConfig, models: SDModels, device: DeviceInfo) -> Noise:
    prediction_type = config.prediction_type or models.scheduler.config.get("prediction_type", "epsilon")
    scheduler = DDPMScheduler.from_config(models.scheduler.config, prediction_type=prediction_type)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device.device)
    return Noise(scheduler, prediction_type)


def training_captions(dataset: PreparedDataset, run: ResolvedRun, tokens: NewTokens | None) -> list[str]:
    token_string = run.token_string if tokens is not None else None
    return [replace_trigger(s.caption, dataset.trigger, token_string) if token_string else s.caption
            for s in dataset.samples]


def covariance_statistics(config: TrainingConfig, models: SDModels,
                          tokens: NewTokens | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pretrained embeddings' mean and inverse covariance per encoder, for the token covariance term."""
    if config.tok_cov_reg_w > 0 and tokens is not None:
        return [tokens.pretrained_statistics(i) for i in range(len(models.text_encoders))]
    return []


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


# ============================================================================================== helpers
def _token_counter(models: SDModels):
    tokenizer = models.tokenizers[0]
    return lambda text: len(tokenizer(text, add_special_tokens=False).input_ids)


def _timed(timings: dict[str, float], key: str, build, *args):
    started = time.perf_counter()
    result = build(*args)
    timings[key] = time.perf_counter() - started
    return result


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
