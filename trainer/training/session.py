"""A run's session: everything set up before the first step, and its resumable state."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from trainer.adapters import lora as lora_adapters
from trainer.adapters.tokens import CONCEPT_INIT_WORDS, NewTokens, TokenInit
from trainer.config import TrainingConfig, save_config
from trainer.config.schema import MAX_TOKENS, default_token_list
from trainer.data.captions import replace_trigger
from trainer.data.dataset import BatchPlan, LatentSource
from trainer.data.manifest import PreparedDataset
from trainer.device import DeviceInfo, cpu_rng_state, set_cpu_rng_state, setup_device
from trainer.distributed import Distributed, init_distributed
from trainer.export.files import safe_name
from trainer.models.loading import SDModels, load_models, model_cache_dir, resolve_source
from trainer.models.text import PromptEncoder
from trainer.training import checkpoint as ckpt
from trainer.training.losses import (
    TokenAttentionProbe,
    probe_layer_names,
)
from trainer.training.optimizers import ParamGroup, build_groups
from trainer.training.schedule import Schedule, eden_lr_lambda, resolve_total_steps

logger = logging.getLogger(__name__)


def _choose_seed(config: TrainingConfig) -> int:
    if config.seed is not None:
        return config.seed
    return random.SystemRandom().randrange(0, 2**31 - 1)


def _run_dir(config: TrainingConfig) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = safe_name(config.run_name)
    base = Path(config.output_dir) / f"{name}_{stamp}"
    path = base
    counter = 1
    while path.exists():
        path = base.with_name(f"{base.name}-{counter}")
        counter += 1
    return path


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
    dropout_caption: str
    """What a dropped caption becomes: the trigger tokens alone, as in Eden (empty without tokens)."""
    probe: TokenAttentionProbe | None
    cov_stats: list[tuple[torch.Tensor, torch.Tensor]]
    dist: Distributed = field(default_factory=Distributed)
    timings: dict[str, float] = field(default_factory=dict)


def _resolve_tokens(config: TrainingConfig, tokenizer) -> None:
    """An initial phrase sets n_tokens (unless n_tokens was given): resolve that before inserting tokens."""
    if config.disable_ti or config.initial_phrase is None:
        return
    n = len(tokenizer(config.initial_phrase, add_special_tokens=False).input_ids)
    if n == config.n_tokens:
        return
    if n > MAX_TOKENS:
        raise ValueError(f"initial_phrase {config.initial_phrase[:80]!r} has {n} tokens, more than the {MAX_TOKENS} "
                         "new tokens a concept may have; use a shorter phrase")
    if config.explicitly_set("n_tokens") or config.explicitly_set("inserting_list_tokens"):
        raise ValueError(
            f"initial_phrase {config.initial_phrase!r} has {n} tokens but n_tokens is {config.n_tokens}; leave "
            "n_tokens unset to take the phrase's length, or change the phrase"
        )
    config.n_tokens = n
    config.inserting_list_tokens = default_token_list(n)
    config.token_dict = {config.trigger: "".join(config.inserting_list_tokens)}


def setup(config: TrainingConfig, *, run_dir: Path | None = None, dataset: PreparedDataset | None = None,
          allow_local_sources: bool = True, local_paths: bool = True) -> tuple[Session, dict | None]:
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
    config.name = config.run_name
    if not config.start_time:
        config.start_time = time.time()
    _seed_everything(seed)

    device = setup_device(config.device, config.weight_type, config.allow_tf32,
                          local_rank=dist.local_rank if dist.enabled else None)
    cache_dir = model_cache_dir(config.model_cache_dir)

    started = time.perf_counter()
    source = resolve_source(config.ckpt_path, config.pretrained_model, config.sd_model_version, cache_dir,
                            local_paths=local_paths)
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
            # Eden: the text-encoder LoRA's alpha follows lora_alpha_multiplier too (trainer/optimizer.py).
            te_lora_params += lora_adapters.add_text_encoder_lora(
                encoder, config.text_encoder_lora_rank, config.text_encoder_lora_rank * config.lora_alpha_multiplier
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
    steps_per_epoch = max(1, math.ceil(plan.batches_per_epoch / config.gradient_accumulation_steps))
    schedule = Schedule.from_config(config, total_steps, tokens is not None, te_lora, steps_per_epoch)

    groups = []
    # Eden builds no UNet optimiser when unet_lr is 0 (a tokens-only run).
    if unet_params and config.unet_lr > 0 and schedule.unet_end > schedule.unet_start:
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
            "nothing would train with these settings: check unet_lr, disable_ti, freeze_ti_after_completion_f, "
            "freeze_unet_before_completion_f, token_warmup_steps and text_encoder_lora_optimizer"
        )
    if config.lr_scheduler == "eden":
        for group in groups:
            group.lr_lambda = eden_lr_lambda(group.name, config, schedule, group.optimizer_type, group.initial_lr)
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
                           flip=flip, use_masks=config.use_masks, scale_factor=models.vae_scale_factor,
                           workers=config.dataloader_num_workers)
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
        token_string=token_string, dropout_caption=token_string or "", probe=probe, cov_stats=cov_stats,
        timings=timings,
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
