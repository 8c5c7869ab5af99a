"""Image generation with a trained LoRA bundle on top of its base model.

The base pipeline is loaded once and kept. Activating a bundle loads its LoRA (as a named adapter), its token
vectors and, for full fine-tunes, its UNet; deactivating removes all of it again, so the next request starts from the
untouched base model.

Every mode runs on the base pipeline's own modules: img2img and inpainting pipelines are built around the very same
UNet, VAE, text encoders and tokenizers for each request (no second copy, and the active LoRA and tokens are simply
there). The SDXL refiner is loaded on first use around the base model's VAE and second text encoder; it never sees
the LoRA (the text-encoder adapters are off while it runs) nor the trained tokens (its prompt has the trigger removed,
and it has its own tokenizer).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from trainer.data.captions import normalise_whitespace, replace_trigger
from trainer.device import DeviceInfo, setup_device
from trainer.export.files import EMBEDDING_KEYS, embedding_vectors
from trainer.inference.bundle import LoraBundle
from trainer.inference.dora import MergedDora, has_dora
from trainer.inference.fit import (
    LoraMismatch,
    check_diffusers_lora_state,
    check_lora_state,
    check_token_vectors,
    check_unet_config,
    diffusers_lora_as_peft,
    is_diffusers_lora,
)
from trainer.inference.inputs import composite
from trainer.models.loading import ModelSource, load_models, model_cache_dir
from trainer.models.refiner import load_refiner, resolve_refiner

logger = logging.getLogger(__name__)

ADAPTER = "trained"

#: Scheduler names as Replicate's SDXL models offer them.
SCHEDULERS = {
    "DDIM": ("DDIMScheduler", {}),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", {}),
    "HeunDiscrete": ("HeunDiscreteScheduler", {}),
    "KarrasDPM": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "K_EULER": ("EulerDiscreteScheduler", {}),
    "K_EULER_ANCESTRAL": ("EulerAncestralDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
}
#: cog-sdxl's ``refine`` choices.
REFINE_MODES = ("no_refiner", "expert_ensemble_refiner", "base_image_refiner")
#: How far ``base_image_refiner`` re-noises the base image: diffusers' img2img default, which cog-sdxl relies on.
BASE_IMAGE_REFINER_STRENGTH = 0.3


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    num_outputs: int = 1
    num_inference_steps: int = 30
    guidance_scale: float = 7.5
    scheduler: str = "K_EULER"
    seed: int | None = None
    lora_scale: float = 1.0
    image: Image.Image | None = None
    """Starting image (img2img, inpainting), RGB at the output size."""
    mask: Image.Image | None = None
    """Inpainting mask (L, 255 = repaint) at the output size; needs ``image``."""
    prompt_strength: float = 0.8
    """How much of ``image`` is replaced: the fraction of the schedule that runs."""
    refine: str = "no_refiner"
    high_noise_frac: float = 0.8
    refine_steps: int | None = None

    @property
    def mode(self) -> str:
        return "txt2img" if self.image is None else ("inpaint" if self.mask is not None else "img2img")


@dataclass
class StepLog:
    """The timesteps each model denoised in the last generation, and the refiner's prompt."""

    base: list[int] = field(default_factory=list)
    refiner: list[int] = field(default_factory=list)
    refiner_prompt: str | None = None

    @property
    def total(self) -> int:
        return len(self.base) + len(self.refiner)


def _recorder(steps: list[int]):
    def record(pipe, index, timestep, callback_kwargs):
        steps.append(int(timestep))
        return callback_kwargs

    return record


class Generator:
    def __init__(self, device: str = "auto", weight_type: str = "bf16", cache_dir: Path | None = None,
                 refiner: str | None = None):
        self.device: DeviceInfo = setup_device(device, weight_type)
        self.cache_dir = Path(cache_dir) if cache_dir else model_cache_dir()
        self.pipeline = None
        self.base_source: ModelSource | None = None
        self.base_unet = None
        self.active: LoraBundle | None = None
        self.dora: MergedDora | None = None
        self._default_scheduler_config = None
        self.refiner_location = refiner
        """The refiner (hub id, folder, file or URL); None: ``TRAINER_SDXL_REFINER`` or the default, at first use."""
        self.refiner = None
        self._refiner_scheduler_config = None
        self.last_steps = StepLog()

    # ---------------------------------------------------------------------------------------------- models
    def load_base(self, source: ModelSource) -> None:
        if self.base_source == source and self.pipeline is not None:
            return
        self.deactivate()
        # The refiner holds the previous base model's VAE and text encoder: it is rebuilt around the new ones.
        self.refiner = None
        models = load_models(source, dtype=self.device.dtype, cache_dir=self.cache_dir)
        pipeline = models.pipeline()
        pipeline.to(self.device.device)
        pipeline.set_progress_bar_config(disable=True)
        self.pipeline, self.base_source, self.version = pipeline, source, models.version
        self._default_scheduler_config = pipeline.scheduler.config
        logger.info("base model ready: %s", source.describe())

    def activate(self, bundle: LoraBundle, base_override: str | None = None) -> None:
        """Make ``bundle`` the active LoRA (loading its base model first if it differs)."""
        if self.active is not None and self.active.folder == bundle.folder:
            return
        self.load_base(bundle.base_source(self.cache_dir, base_override))
        self.deactivate()
        try:
            if bundle.unet_dir is not None:
                self._load_unet(bundle)
            if bundle.lora is not None:
                self._load_lora(bundle)
            if bundle.embeddings is not None:
                self._load_embeddings(bundle)
        except Exception:
            self.active = bundle  # so that deactivate removes whatever part did load
            self.deactivate()
            raise
        self.active = bundle
        logger.info("activated %s", bundle.folder.name)

    def _load_unet(self, bundle: LoraBundle) -> None:
        from diffusers import UNet2DConditionModel

        pipe = self.pipeline
        check_unet_config(bundle.unet_dir, pipe.unet.config)
        try:
            unet = UNet2DConditionModel.from_pretrained(bundle.unet_dir, dtype=self.device.dtype)
        except (OSError, ValueError, RuntimeError, KeyError, TypeError) as error:
            raise LoraMismatch(f"its UNet does not load ({_first_line(error)})") from None
        for name, tensor in unet.state_dict().items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise LoraMismatch(f"its UNet's {name} holds NaN or infinite values")
        self.base_unet = pipe.unet
        pipe.unet = unet.to(self.device.device)

    def _load_lora(self, bundle: LoraBundle) -> None:
        state = _read_tensors(bundle.lora)
        if is_diffusers_lora(state):  # diffusers' own file, which older Eden checkpoints kept
            check_diffusers_lora_state(state, self.pipeline, self.version)
            state = diffusers_lora_as_peft(state)
        else:
            check_lora_state(state, self.pipeline, self.version)
        try:
            if not has_dora(state):
                self.pipeline.load_lora_weights(state, adapter_name=ADAPTER)
                return
            # DoRA: the UNet part is merged exactly (diffusers would drop the magnitudes); text-encoder LoRA stays an
            # ordinary adapter.
            text_part = {k: v for k, v in state.items() if k.startswith("lora_te")}
            if text_part:
                self.pipeline.load_lora_weights(text_part, adapter_name=ADAPTER)
            unet_part = {k: v for k, v in state.items() if not k.startswith("lora_te")}
            self.dora = MergedDora(self.pipeline.unet, self.version, unet_part)
        except LoraMismatch:
            raise
        except (ValueError, RuntimeError, KeyError, TypeError, IndexError) as error:
            raise LoraMismatch(f"{bundle.lora.name} does not load ({_first_line(error)})") from None

    def _load_embeddings(self, bundle: LoraBundle) -> None:
        state = _read_tensors(bundle.embeddings)
        try:
            vectors = embedding_vectors(state, self.version, bundle.embeddings.name)
        except ValueError as error:
            raise LoraMismatch(str(error)) from None
        pipe = self.pipeline
        pairs = [(pipe.text_encoder, pipe.tokenizer)]
        if self.version == "sdxl":
            pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
        # Named by encoder (clip_l, clip_g), whichever key the file used for them.
        named = dict(zip(EMBEDDING_KEYS[self.version], vectors, strict=True))
        widths = {key: encoder.get_input_embeddings().weight.shape[1]
                  for key, (encoder, _) in zip(named, pairs, strict=True)}
        check_token_vectors(named, widths, len(bundle.tokens), bundle.embeddings.name)
        for rows, (encoder, tokenizer) in zip(vectors, pairs, strict=True):
            pipe.load_textual_inversion(rows, token=bundle.tokens, text_encoder=encoder, tokenizer=tokenizer)

    def deactivate(self) -> None:
        """Remove every trace of the active bundle: adapter, added tokens, swapped UNet."""
        bundle, pipe = self.active, self.pipeline
        self.active = None
        if bundle is None or pipe is None:
            return
        if ADAPTER in _adapter_names(pipe):
            pipe.delete_adapters(ADAPTER)
        if self.dora is not None:
            self.dora.restore()
            self.dora = None
        if bundle.tokens:
            encoders = [(pipe.tokenizer, pipe.text_encoder)]
            if self.version == "sdxl":
                encoders.append((pipe.tokenizer_2, pipe.text_encoder_2))
            for tokenizer, encoder in encoders:
                present = [t for t in bundle.tokens if t in tokenizer.get_vocab()]
                if present:
                    pipe.unload_textual_inversion(tokens=present, tokenizer=tokenizer, text_encoder=encoder)
        if self.base_unet is not None:
            pipe.unet = self.base_unet
            self.base_unet = None
        self.device.empty_cache()

    # ------------------------------------------------------------------------------------------- generation
    def set_scheduler(self, name: str) -> None:
        self.pipeline.scheduler = self._scheduler(name, self._default_scheduler_config)

    def _scheduler(self, name: str, default_config):
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
        class_name, extra = SCHEDULERS[name]
        return getattr(diffusers, class_name).from_config(default_config, **extra)

    def prompt_text(self, prompt: str) -> str:
        """The prompt with the trigger (``TOK``) replaced by the active bundle's tokens."""
        bundle = self.active
        if bundle is None:
            return prompt
        return replace_trigger(prompt, bundle.trigger, bundle.token_string)

    def refiner_prompt(self, prompt: str) -> str:
        """The prompt for the refiner: without the trigger, whose tokens the refiner does not have."""
        bundle = self.active
        if bundle is None or not prompt:
            return prompt
        return normalise_whitespace(replace_trigger(prompt, bundle.trigger, ""))

    def mode_pipeline(self, mode: str):
        """The pipeline of ``mode`` (txt2img, img2img, inpaint), made of the loaded base pipeline's modules."""
        import diffusers

        pipe = self.pipeline
        if mode == "txt2img":
            return pipe
        family = "StableDiffusionXL" if self.version == "sdxl" else "StableDiffusion"
        cls = getattr(diffusers, f"{family}{'Img2Img' if mode == 'img2img' else 'Inpaint'}Pipeline")
        modules = {"vae": pipe.vae, "text_encoder": pipe.text_encoder, "tokenizer": pipe.tokenizer, "unet": pipe.unet,
                   "scheduler": pipe.scheduler}
        if self.version == "sdxl":
            derived = cls(**modules, text_encoder_2=pipe.text_encoder_2, tokenizer_2=pipe.tokenizer_2,
                          force_zeros_for_empty_prompt=pipe.config.force_zeros_for_empty_prompt,
                          add_watermarker=False)
        else:
            derived = cls(**modules, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        derived.set_progress_bar_config(disable=True)
        return derived

    def refiner_pipeline(self):
        """The SDXL refiner around the base model's VAE and second text encoder, loaded on first use."""
        if self.version != "sdxl":
            raise ValueError("refine: the SDXL refiner works only on an SDXL base model, and this one is SD1.5; "
                             "use refine: no_refiner")
        if self.refiner is None:
            refiner = load_refiner(resolve_refiner(self.refiner_location), vae=self.pipeline.vae,
                                   text_encoder_2=self.pipeline.text_encoder_2, dtype=self.device.dtype,
                                   cache_dir=self.cache_dir)
            refiner.to(self.device.device)
            self.refiner, self._refiner_scheduler_config = refiner, refiner.scheduler.config
        return self.refiner

    @contextmanager
    def _lora_off(self):
        """Text-encoder adapters off (the refiner shares CLIP-G with the base model, not its LoRA)."""
        active = self.pipeline is not None and ADAPTER in _adapter_names(self.pipeline)
        if active:
            self.pipeline.disable_lora()
        try:
            yield
        finally:
            if active:
                self.pipeline.enable_lora()

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> list[Image.Image]:
        if self.pipeline is None:
            raise RuntimeError("no model is loaded: activate a LoRA bundle or load a base model first")
        multiple = 8
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"width and height must be multiples of {multiple}, got {request.width}x{request.height}")
        check_request(request, self.version)
        self.set_scheduler(request.scheduler)
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        log = StepLog()
        kwargs = {}
        if self.active is not None and self.active.lora is not None:
            kwargs["cross_attention_kwargs"] = {"scale": request.lora_scale}
        if self.dora is not None:
            self.dora.apply(request.lora_scale)
        if request.image is None or request.mask is not None:
            kwargs.update(width=request.width, height=request.height)
        if request.image is not None:
            kwargs.update(image=request.image, strength=request.prompt_strength)
        if request.mask is not None:
            kwargs["mask_image"] = request.mask
        # The base model hands latents to the refiner: decoding and re-encoding would only lose detail.
        if request.refine == "expert_ensemble_refiner":
            kwargs.update(denoising_end=request.high_noise_frac, output_type="latent")
        elif request.refine == "base_image_refiner":
            kwargs["output_type"] = "latent"
        pipe = self.mode_pipeline(request.mode)
        if request.refine == "expert_ensemble_refiner":
            self._check_split(request)
        with self.device.autocast():
            result = pipe(
                prompt=self.prompt_text(request.prompt),
                negative_prompt=request.negative_prompt or None,
                num_images_per_prompt=request.num_outputs,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                callback_on_step_end=_recorder(log.base),
                **{"output_type": "pil", **kwargs},
            )
        images = result.images
        if request.refine != "no_refiner":
            images = self._refine(request, images, generator, log)
        if request.mask is not None:
            # Outside the mask the output is the input itself, not its trip through the VAE.
            images = [composite(image, request.image, request.mask) for image in images]
        self.last_steps = log
        logger.info("generated %d image(s) with seed %d (%s, %d base step(s)%s)", request.num_outputs, seed,
                    request.mode, len(log.base), f", {len(log.refiner)} refiner step(s)" if log.refiner else "")
        return images

    def _check_split(self, request: GenerationRequest) -> None:
        """Both models of the expert ensemble get at least one step (diffusers' cut: timesteps at or above
        ``(1 - high_noise_frac) * num_train_timesteps`` are the base model's)."""
        scheduler = self.pipeline.scheduler
        scheduler.set_timesteps(request.num_inference_steps)
        total = scheduler.config.num_train_timesteps
        cutoff = round(total - request.high_noise_frac * total)
        base = int((scheduler.timesteps >= cutoff).sum())
        refiner = len(scheduler.timesteps) - base
        if base == 0 or refiner == 0:
            raise ValueError(f"high_noise_frac: {request.high_noise_frac:g} of {request.num_inference_steps} steps "
                             f"gives the base model {base} and the refiner {refiner} step(s); each needs one, so move "
                             "high_noise_frac away from 0 and 1 or raise num_inference_steps")

    def _refine(self, request: GenerationRequest, latents, generator, log: StepLog) -> list[Image.Image]:
        refiner = self.refiner_pipeline()
        refiner.scheduler = self._scheduler(request.scheduler, self._refiner_scheduler_config)
        if request.refine == "expert_ensemble_refiner":
            kwargs = {"num_inference_steps": request.num_inference_steps, "denoising_start": request.high_noise_frac}
        else:
            kwargs = {"num_inference_steps": request.refine_steps or request.num_inference_steps,
                      "strength": BASE_IMAGE_REFINER_STRENGTH}
        count = len(latents)
        log.refiner_prompt = self.refiner_prompt(request.prompt)
        negative = self.refiner_prompt(request.negative_prompt)
        with self._lora_off(), self.device.autocast():
            result = refiner(
                prompt=[log.refiner_prompt] * count,
                negative_prompt=[negative] * count if negative else None,
                image=latents,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type="pil",
                callback_on_step_end=_recorder(log.refiner),
                **kwargs,
            )
        return result.images


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as error:  # any parse failure (header, dtype, truncation) means "not a tensor file"
        raise LoraMismatch(f"{path.name} is not a readable .safetensors file ({_first_line(error)})") from None


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def denoising_steps(steps: int, strength: float) -> int:
    """How many of ``steps`` diffusers' img2img and inpainting pipelines run at ``strength``."""
    return min(int(steps * strength), steps)


def check_request(request: GenerationRequest, version: str) -> None:
    """Combinations of inputs that cannot run, as errors that name the inputs."""
    if request.mask is not None and request.image is None:
        raise ValueError("mask: inpainting needs the image to repaint too; give image with the mask")
    if request.refine not in REFINE_MODES:
        raise ValueError(f"refine must be one of {list(REFINE_MODES)}, got {request.refine!r}")
    if request.refine != "no_refiner" and version != "sdxl":
        raise ValueError(f"refine: {request.refine} needs an SDXL base model, and this one is SD1.5; use refine: "
                         "no_refiner")
    if request.image is not None and denoising_steps(request.num_inference_steps, request.prompt_strength) < 1:
        raise ValueError(f"prompt_strength: {request.prompt_strength:g} of {request.num_inference_steps} "
                         "num_inference_steps leaves no denoising step; raise prompt_strength or num_inference_steps")
    if request.refine == "base_image_refiner":
        steps = request.refine_steps or request.num_inference_steps
        if denoising_steps(steps, BASE_IMAGE_REFINER_STRENGTH) < 1:
            raise ValueError(f"refine_steps: base_image_refiner runs {BASE_IMAGE_REFINER_STRENGTH:g} of its "
                             f"{steps} steps, which is none; give refine_steps of at least 4")
    if request.refine == "expert_ensemble_refiner":
        if not 0.0 < request.high_noise_frac < 1.0:
            raise ValueError(f"high_noise_frac: must be between 0 and 1 (exclusive) for expert_ensemble_refiner, got "
                             f"{request.high_noise_frac:g}: the base model and the refiner each need part of the "
                             "schedule")
        if request.image is not None and request.prompt_strength <= 1.0 - request.high_noise_frac:
            raise ValueError(f"prompt_strength: {request.prompt_strength:g} starts below the refiner's share of the "
                             f"schedule (1 - high_noise_frac = {1 - request.high_noise_frac:g}), leaving the base "
                             "model nothing to do; raise prompt_strength or high_noise_frac")


def _adapter_names(pipe) -> set[str]:
    try:
        names = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return set()
    return {name for adapters in names.values() for name in adapters}
