"""cog prediction entry point (``run: "predict.py:Predictor"``): a prompt with TOK in, images out.

The LoRA is the zip a training produced (by ``train.py`` or ``python -m trainer``): given at set-up as
``COG_WEIGHTS`` (a URL, as Replicate passes it after a training, or a local path) or per request as ``lora_url``.
The work happens in :mod:`trainer.inference.service`; the signature below is the API, written out literally (cog
reads it to build the schema) and checked against the service's own validation by the tests.
"""

import os

# Progress bars would reach the request log as carriage-return fragments; tqdm reads this when first imported.
os.environ.setdefault("TQDM_DISABLE", "1")

from typing import Optional

from cog import BaseRunner, Input, Path

from trainer.serving.common import ENV_ALLOW_LOCAL, env_flag, unwrap_inputs


class Predictor(BaseRunner):
    def setup(self, weights: Optional[str] = None) -> None:
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
        lora_scale: float = Input(default=1.0, ge=0.0, le=2.0, description="Strength of the LoRA."),
        negative_prompt: str = Input(default="", max_length=2000, description="What the images should not show."),
        width: Optional[int] = Input(
            default=None, ge=64, le=2048, description="Width in pixels, a multiple of 8. Default: the model's size."
        ),
        height: Optional[int] = Input(
            default=None, ge=64, le=2048, description="Height in pixels, a multiple of 8. Default: the model's size."
        ),
        num_outputs: int = Input(default=1, ge=1, le=4, description="Number of images."),
        num_inference_steps: int = Input(default=30, ge=1, le=200, description="Denoising steps."),
        guidance_scale: float = Input(default=7.5, ge=0.0, le=30.0, description="Classifier-free guidance scale."),
        scheduler: str = Input(
            default="K_EULER",
            choices=["DDIM", "DPMSolverMultistep", "HeunDiscrete", "KarrasDPM", "K_EULER", "K_EULER_ANCESTRAL", "PNDM"],
            description="Sampling scheduler.",
        ),
        seed: Optional[int] = Input(
            default=None, ge=0, le=4294967295, description="Random seed. Default: random (logged)."
        ),
        output_format: str = Input(default="webp", choices=["webp", "png", "jpg"], description="Image format."),
        output_quality: int = Input(
            default=90, ge=1, le=100, description="Quality of webp and jpg images (png is lossless)."
        ),
    ) -> list[Path]:
        values = unwrap_inputs(dict(locals()))
        values.pop("self")
        # lora_url comes from the request, which may be remote: local paths only where the operator allows them.
        paths = self.service.predict(values, allow_local_lora=env_flag(ENV_ALLOW_LOCAL))
        return [Path(p) for p in paths]
