"""cog prediction entry point (``run: "predict.py:Predictor"``): a prompt with TOK in, images out.

The LoRA is the zip a training produced (by ``train.py`` or ``python -m trainer``): given at set-up as
``COG_WEIGHTS`` (a URL, as Replicate passes it after a training, or a local path) or per request as ``lora_url``.
The work happens in :mod:`trainer.inference.service`; the signature below is the API, written out literally (cog
reads it to build the schema) and checked against the service's own validation by the tests. The inputs are
cog-sdxl's (``replicate/cog-sdxl``), so its clients work unchanged.

``image`` and ``mask`` are strings, not ``cog.Path``: cog would fetch a URL itself before the code runs, with no size
cap, and would pass a local path named by the request like one of its downloads. The service fetches them instead.
"""

import os

# Progress bars would reach the request log as carriage-return fragments; tqdm reads this when first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

from typing import Optional

from cog import BaseRunner, Input, Path

from trainer.serving.common import unwrap_inputs
from trainer.utils.env import ENV_ALLOW_LOCAL, env_flag


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
        # The model stack is imported here, in the worker's set-up: cog also imports this file only to read the
        # signature below (the schema), which needs none of it.
        from trainer.inference.service import PredictionService
        from trainer.utils.logs import setup_logging

        setup_logging()
        self.service = PredictionService.start(str(weights) if weights else None)

    def run(
        self,
        prompt: str = Input(
            max_length=2000,
            description="The prompt. Write TOK for the trained concept (it becomes the trained tokens), for example "
            "'a photo of TOK on a beach'.",
        ),
        lora_url: Optional[str] = Input(
            default=None,
            description="URL (or s3:// URI) of a trained LoRA zip for this request; downloads are cached. Default: "
            "the LoRA the predictor was started with, else the plain base model.",
        ),
        lora_scale: Optional[float] = Input(
            default=None, ge=0.0, le=2.0,
            description="Strength of the LoRA. Default: the scale the checkpoint evaluation recommended for these "
            "weights when the zip carries one (trained with evaluate_checkpoints), else 1.0.",
        ),
        negative_prompt: str = Input(default="", max_length=2000, description="What the images should not show."),
        image: Optional[str] = Input(
            default=None,
            description="Starting image for img2img or inpainting: an http(s) URL or a data URI (any common format; "
            "EXIF orientation applied, transparency on white). The output takes its size unless width or height "
            "is given.",
        ),
        mask: Optional[str] = Input(
            default=None,
            description="Inpainting mask for image, same size, greyscale: white areas are repainted, black areas are "
            "kept. An http(s) URL or a data URI.",
        ),
        prompt_strength: float = Input(
            default=0.8, ge=0.0, le=1.0,
            description="With image: how much of it is replaced (1.0 repaints it completely).",
        ),
        width: Optional[int] = Input(
            default=None, ge=64, le=2048,
            description="Width in pixels, a multiple of 8. Default: the image's, else the model's size.",
        ),
        height: Optional[int] = Input(
            default=None, ge=64, le=2048,
            description="Height in pixels, a multiple of 8. Default: the image's, else the model's size.",
        ),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of images."),
        num_inference_steps: int = Input(default=30, ge=1, le=200, description="Denoising steps."),
        guidance_scale: float = Input(default=7.5, ge=0.0, le=30.0, description="Classifier-free guidance scale."),
        scheduler: str = Input(
            default="K_EULER",
            choices=["DDIM", "DPMSolverMultistep", "HeunDiscrete", "KarrasDPM", "K_EULER", "K_EULER_ANCESTRAL", "PNDM"],
            description="Sampling scheduler.",
        ),
        refine: str = Input(
            default="no_refiner",
            choices=["no_refiner", "expert_ensemble_refiner", "base_image_refiner"],
            description="SDXL only. expert_ensemble_refiner: the SDXL refiner denoises the last part of the schedule "
            "(after high_noise_frac); base_image_refiner: the refiner reworks the finished image for refine_steps. "
            "The refiner sees neither the LoRA nor the trained tokens.",
        ),
        high_noise_frac: float = Input(
            default=0.8, ge=0.0, le=1.0,
            description="expert_ensemble_refiner: the fraction of the schedule the base model denoises.",
        ),
        refine_steps: Optional[int] = Input(
            default=None, ge=1, le=200,
            description="base_image_refiner: the refiner's num_inference_steps (it runs 30% of them). Default: "
            "num_inference_steps.",
        ),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295, description="Random seed. Default: random (logged)."
        ),
        apply_watermark: bool = Input(
            default=True,
            description="Embed the invisible watermark of the model family's reference scripts (SDXL: diffusers' "
            "SDXL watermark; SD1.5: 'StableDiffusionV1'), so that downstream tools can tell the image is generated.",
        ),
        disable_safety_checker: bool = Input(
            default=False,
            description="Skip the safety checker. When it runs, flagged outputs are black images and their "
            "indices are in the response's metrics (nsfw_outputs).",
        ),
        output_format: str = Input(default="webp", choices=["webp", "png", "jpg"], description="Image format."),
        output_quality: int = Input(
            default=90, ge=1, le=100, description="Quality of webp and jpg images (png is lossless)."
        ),
    ) -> list[Path]:
        values = unwrap_inputs(dict(locals()))
        values.pop("self")
        # lora_url, image and mask come from the request, which may be remote: local paths only where the operator
        # allows them.
        result = self.service.run(values, allow_local=env_flag(ENV_ALLOW_LOCAL))
        self.record_metric("nsfw_outputs", result.flagged)
        self.record_metric("total_inference_steps", result.total_steps)
        if result.lora_scale is not None:
            self.record_metric("lora_scale", result.lora_scale)
        return [Path(p) for p in result.paths]
