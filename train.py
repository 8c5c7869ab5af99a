"""cog training entry point (``train: "train.py:train"``): Eden's cog inputs in, ``TrainingOutput(weights=zip)`` out.

The signature is the API (cog reads it to build the schema); everything else lives in
:mod:`trainer.serving.train_job`. Defaults equal the training config's own, so a job run here and one run with
``python -m trainer train`` from the same values train the same LoRA.
"""

import os

# Progress goes to the job log as one line per logging step; tqdm's carriage-return redraws would arrive there as
# hundreds of fragments. tqdm reads this when it is first imported, so it is set before anything imports it.
os.environ.setdefault("TQDM_DISABLE", "1")

from typing import Optional

from cog import BaseModel, Input, Path

from trainer.serving.common import declared_defaults
from trainer.serving.train_job import run_training_job


class TrainingOutput(BaseModel):
    weights: Path


def train(
    name: Optional[str] = Input(
        default=None, max_length=128,
        description="Name of the LoRA and of its files (ComfyUI and A1111 use `<name>_embeddings` as the trigger). "
        "Default: as Eden names it, the last part of the training URL (xander.zip for https://host/xander.zip).",
    ),
    lora_training_urls: Optional[str] = Input(
        default=None, max_length=512000,
        description="Training images: URLs of images or of zip/tar archives, or s3://bucket/key URIs, separated by "
        "|, commas or new lines, or a JSON list. Captions can come as .txt files beside the images.",
    ),
    # A string, not a cog Path: cog would download a Path's URL itself, before train() runs, with a client that
    # follows any address. The URL is fetched by the trainer's own client (address checks, size cap, deadline).
    input_images: Optional[str] = Input(
        default=None,
        description="Or the training images as one zip or tar file (as Replicate's cog-sdxl trainer takes them): "
        "its http(s) URL or a data: URL. Added to lora_training_urls.",
    ),
    concept_mode: str = Input(
        default="style",
        choices=["face", "style", "object"],
        description="What the LoRA learns: a face (person or character), a style, or an object.",
    ),
    sd_model_version: Optional[str] = Input(
        default=None,
        choices=["sdxl", "sd15"],
        description="Base model family. Default: detected from the base model (ckpt_path in training_args), SDXL "
        "when none is given.",
    ),
    max_train_steps: int = Input(default=300, ge=1, le=20000, description="Number of training steps."),
    checkpointing_steps: int = Input(
        default=10000, ge=0, le=20000, description="Save an intermediate checkpoint every N steps (0: only at the end)."
    ),
    resolution: int = Input(
        default=512, ge=64, le=2048,
        description="Training resolution: images train at about resolution² pixels at their mean aspect ratio, "
        "sides rounded to multiples of 64 (as Eden computes it).",
    ),
    unet_lr: float = Input(default=0.0003, ge=0.0, le=1.0, description="Learning rate of the UNet LoRA."),
    ti_lr: float = Input(default=0.001, ge=0.0, le=1.0, description="Learning rate of the new token embeddings."),
    lora_rank: int = Input(default=16, ge=1, le=256, description="Rank of the UNet LoRA."),
    n_tokens: int = Input(default=3, ge=1, le=16, description="Number of new token vectors that stand for TOK."),
    train_batch_size: int = Input(default=4, ge=1, le=64, description="Images per training step."),
    n_sample_imgs: int = Input(
        default=4, ge=0, le=32, description="Sample images rendered with the trained LoRA into the zip (0: none)."
    ),
    validation_img_size: Optional[int] = Input(
        default=None, ge=8, le=2048,
        description="Size of the sample images (about size² pixels at the training aspect ratio, sides rounded to "
        "multiples of 64). Default: 1024 for SDXL, 768 for SD1.5.",
    ),
    sample_imgs_lora_scale: Optional[float] = Input(
        default=None, ge=0.0, le=2.0, description="LoRA scale of the sample images. Default: 0.75 for SDXL, 0.85 for "
        "SD1.5."
    ),
    seed: Optional[int] = Input(
        default=None, ge=0, le=4294967295,
        description="Random seed; the same seed and inputs train the same LoRA. Default: random."
    ),
    caption_model: str = Input(
        default="florence",
        choices=["gpt4-v", "blip", "florence", "no_caption"],
        description="Captions images that have no caption file. gpt4-v needs OPENAI_API_KEY on the server.",
    ),
    caption_prefix: str = Input(
        default="", max_length=2000,
        description="Text put in front of every caption instead of the automatic trigger, as Eden's (for example 'a "
        "photo of TOK'; TOK is added in front when it is missing)."
    ),
    mask_target_prompts: Optional[str] = Input(
        default=None, max_length=2000,
        description="Text prompts for CLIPSeg masks that weight the loss and guide crops (for example 'a face').",
    ),
    use_face_detection_instead: bool = Input(
        default=False, description="Make the masks with a face detector instead of CLIPSeg."
    ),
    training_args: str = Input(
        default="",
        description='Any other training setting as a JSON object, for example {"lora_alpha_multiplier": 2, '
        '"ckpt_path": "stabilityai/stable-diffusion-xl-base-1.0"}. A pasted training_args.json works too.',
    ),
    output_uri: Optional[str] = Input(
        default=None,
        description="Also upload the zip to S3: s3://bucket/prefix/ (or s3://bucket/key.zip). Uses the server's "
        "AWS credentials and AWS_ENDPOINT_URL_S3.",
    ),
) -> TrainingOutput:
    inputs = dict(locals())
    zip_path = run_training_job(inputs, DEFAULTS)
    return TrainingOutput(weights=Path(zip_path))


def _defaults() -> dict:
    return declared_defaults(train)


#: What each input is when left alone, read from the signature above (it tells a changed input from a default).
DEFAULTS = _defaults()
