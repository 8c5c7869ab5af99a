"""Image generation with a trained LoRA bundle on top of its base model.

The base pipeline is loaded once and kept. Activating a bundle loads its LoRA (as a named adapter), its token
vectors and, for full fine-tunes, its UNet; deactivating removes all of it again, so the next request starts from the
untouched base model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from trainer.data.captions import replace_trigger
from trainer.device import DeviceInfo, setup_device
from trainer.export.files import embedding_vectors
from trainer.inference.bundle import LoraBundle
from trainer.inference.dora import MergedDora, has_dora
from trainer.models.loading import ModelSource, load_models, model_cache_dir

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


class Generator:
    def __init__(self, device: str = "auto", weight_type: str = "bf16", cache_dir: Path | None = None):
        self.device: DeviceInfo = setup_device(device, weight_type)
        self.cache_dir = Path(cache_dir) if cache_dir else model_cache_dir()
        self.pipeline = None
        self.base_source: ModelSource | None = None
        self.base_unet = None
        self.active: LoraBundle | None = None
        self.dora: MergedDora | None = None
        self._default_scheduler_config = None

    # ---------------------------------------------------------------------------------------------- models
    def load_base(self, source: ModelSource) -> None:
        if self.base_source == source and self.pipeline is not None:
            return
        self.deactivate()
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
        pipe = self.pipeline
        try:
            if bundle.unet_dir is not None:
                from diffusers import UNet2DConditionModel

                self.base_unet = pipe.unet
                pipe.unet = UNet2DConditionModel.from_pretrained(bundle.unet_dir, dtype=self.device.dtype).to(
                    self.device.device
                )
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

    def _load_lora(self, bundle: LoraBundle) -> None:
        from safetensors.torch import load_file

        state = load_file(str(bundle.lora))
        if not has_dora(state):
            self.pipeline.load_lora_weights(str(bundle.lora.parent), weight_name=bundle.lora.name, adapter_name=ADAPTER)
            return
        # DoRA: the UNet part is merged exactly (diffusers would drop the magnitudes); text-encoder LoRA stays an
        # ordinary adapter.
        text_part = {k: v for k, v in state.items() if k.startswith("lora_te")}
        if text_part:
            self.pipeline.load_lora_weights(text_part, adapter_name=ADAPTER)
        unet_part = {k: v for k, v in state.items() if not k.startswith("lora_te")}
        self.dora = MergedDora(self.pipeline.unet, self.version, unet_part)

    def _load_embeddings(self, bundle: LoraBundle) -> None:
        from safetensors.torch import load_file

        vectors = embedding_vectors(load_file(str(bundle.embeddings)), self.version, bundle.embeddings.name)
        pipe = self.pipeline
        pairs = [(pipe.text_encoder, pipe.tokenizer)]
        if self.version == "sdxl":
            pairs.append((pipe.text_encoder_2, pipe.tokenizer_2))
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
        import diffusers

        if name not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
        class_name, extra = SCHEDULERS[name]
        cls = getattr(diffusers, class_name)
        self.pipeline.scheduler = cls.from_config(self._default_scheduler_config, **extra)

    def prompt_text(self, prompt: str) -> str:
        """The prompt with the trigger (``TOK``) replaced by the active bundle's tokens."""
        bundle = self.active
        if bundle is None:
            return prompt
        return replace_trigger(prompt, bundle.trigger, bundle.token_string)

    @torch.no_grad()
    def generate(self, request: GenerationRequest) -> list[Image.Image]:
        if self.pipeline is None:
            raise RuntimeError("no model is loaded: activate a LoRA bundle or load a base model first")
        multiple = 8
        if request.width % multiple or request.height % multiple:
            raise ValueError(f"width and height must be multiples of {multiple}, got {request.width}x{request.height}")
        self.set_scheduler(request.scheduler)
        seed = request.seed if request.seed is not None else int(torch.randint(0, 2**31 - 1, (1,)).item())
        generator = torch.Generator(device="cpu").manual_seed(seed)
        kwargs = {}
        if self.active is not None and self.active.lora is not None:
            kwargs["cross_attention_kwargs"] = {"scale": request.lora_scale}
        if self.dora is not None:
            self.dora.apply(request.lora_scale)
        with self.device.autocast():
            result = self.pipeline(
                prompt=self.prompt_text(request.prompt),
                negative_prompt=request.negative_prompt or None,
                width=request.width,
                height=request.height,
                num_images_per_prompt=request.num_outputs,
                num_inference_steps=request.num_inference_steps,
                guidance_scale=request.guidance_scale,
                generator=generator,
                output_type="pil",
                **kwargs,
            )
        logger.info("generated %d image(s) with seed %d", request.num_outputs, seed)
        return result.images


def _adapter_names(pipe) -> set[str]:
    try:
        names = pipe.get_list_adapters()
    except (AttributeError, ValueError):
        return set()
    return {name for adapters in names.values() for name in adapters}
