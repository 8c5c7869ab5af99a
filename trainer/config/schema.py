"""The training configuration.

Every parameter of the Eden sd-lora-trainer (and its Intel-XPU fork) exists here under the same name, type and
default, so their ``training_args.json`` files load unchanged. Options from invoke-training's textual-inversion
config that Eden lacks are added under names that fit beside them. Each field carries its documentation as an
attribute docstring: the README's parameter table is generated from them (``python -m trainer docs``).
"""

from __future__ import annotations

import json
import logging
import math
import re
import string
import types
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Optional, Union, get_args, get_origin
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from trainer.device import parse_device
from trainer.utils.download import redact_values

logger = logging.getLogger(__name__)

#: Sizes must divide into the VAE's 8x downsampling and the UNet's down blocks (SD1.5: 3 halvings).
SIZE_MULTIPLE = 64

# ---------------------------------------------------------------------------------------------------- bounds
# Every number a request can set is bounded here, once: the cog inputs (train.py), ``training_args`` and the command
# line all validate through this model. The bounds admit the largest sensible job (SDXL at 2048 px, batch 64,
# 20,000 steps, rank 256) and refuse what would only exhaust a shared server.
MAX_RESOLUTION = 2048
MAX_BATCH_SIZE = 64
MAX_ACCUMULATION = 64
MAX_TRAIN_STEPS = 20_000
MAX_RANK = 256
MAX_TOKENS = 16
MAX_SAMPLE_IMAGES = 32
MAX_TRAIN_IMAGES = 10_000
MAX_AUGMENTED_IMAGES = 1000
MAX_WORKERS = 32
MAX_INFERENCE_STEPS = 200
MAX_GUIDANCE = 30.0
MAX_LORA_SCALE = 2.0
MAX_LEARNING_RATE = 1.0
MAX_LOSS_WEIGHT = 10.0
MAX_SEED = 2**32 - 1
MAX_SOURCES = 1000
#: Free-form objects (``training_attributes``, ``pretrained_model``): nesting depth and size as JSON.
MAX_OBJECT_DEPTH = 8
MAX_OBJECT_CHARS = 64 * 1024
#: Characters: free text (prompts, prefixes), a location (URL, path, hub id), a run name, a token string.
MAX_TEXT_CHARS = 2000
MAX_LOCATION_CHARS = 4096
MAX_NAME_CHARS = 128
MAX_TOKEN_CHARS = 64
MAX_SOURCES_CHARS = MAX_SOURCES * MAX_LOCATION_CHARS // 8

Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
LearningRate = Annotated[float, Field(ge=0.0, le=MAX_LEARNING_RATE)]
WeightDecay = Annotated[float, Field(ge=0.0, le=1.0)]
LossWeight = Annotated[float, Field(ge=0.0, le=MAX_LOSS_WEIGHT)]
LoraScale = Annotated[float, Field(ge=0.0, le=MAX_LORA_SCALE)]
PositiveScale = Annotated[float, Field(gt=0.0, le=MAX_LORA_SCALE)]
Steps = Annotated[int, Field(ge=0, le=MAX_TRAIN_STEPS)]
Rank = Annotated[int, Field(ge=1, le=MAX_RANK)]
Side = Annotated[int, Field(ge=SIZE_MULTIPLE, le=MAX_RESOLUTION)]
#: A sample side: Eden rounds it to a multiple of 64 (at least 64), so any side from 8 up is accepted.
SampleSide = Annotated[int, Field(ge=8, le=MAX_RESOLUTION)]
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Location = Annotated[str, Field(max_length=MAX_LOCATION_CHARS)]
TokenText = Annotated[str, Field(max_length=MAX_TOKEN_CHARS)]
TokenString = Annotated[str, Field(max_length=MAX_TOKENS * MAX_TOKEN_CHARS)]
Sources = Union[Annotated[str, Field(max_length=MAX_SOURCES_CHARS)],
                Annotated[list[Location], Field(max_length=MAX_SOURCES)]]

#: The CLIP model that scores checkpoints unless another is named.
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def _distinct_scales(value: list[float]) -> list[float]:
    if len(set(value)) != len(value):
        raise ValueError("must be distinct LoRA scales > 0, for example [0.8, 1.0]")
    return value


def _named_model(value: str) -> str:
    if not value.strip():
        raise ValueError(f"is empty: give a hub id ({DEFAULT_CLIP_MODEL}) or a local folder")
    return value.strip()


# The checkpoint evaluation's settings, shared by the config's ``evaluation_*`` fields and
# :class:`~trainer.evaluate.settings.EvaluationSettings` (``python -m trainer evaluate``): one rule each.
EvaluationScales = Annotated[list[PositiveScale], Field(min_length=1, max_length=8), AfterValidator(_distinct_scales)]
ImagesPerPrompt = Annotated[int, Field(ge=1, le=8)]
ClipModel = Annotated[Location, AfterValidator(_named_model)]


def _round_side(value: float) -> int:
    """Eden's rounding of a size's side: the nearest multiple of 64, at least 64."""
    return max(SIZE_MULTIPLE, round(value / SIZE_MULTIPLE) * SIZE_MULTIPLE)


def default_token_list(n_tokens: int) -> list[str]:
    return [f"<s{i}>" for i in range(n_tokens)]


#: Characters Eden's ``remove_delimiter_characters`` (trainer/checkpoint.py) turns into ``_`` in a run name.
_NAME_DELIMITERS = ' /\\:*?"<>|'
#: Eden keeps the first 40 characters of the name it takes from the training URL (trainer/config.py).
EDEN_NAME_CHARS = 40


def run_name_from_urls(urls: Union[str, list[str]]) -> Optional[str]:
    """Eden's default run name: the last path part of ``lora_training_urls``, cut to 40 characters, delimiters as
    ``_`` (``TrainingConfig.__init__`` in Eden's trainer/config.py). Of a URL only its path counts: user name,
    password, host, query string and fragment never become part of file names or of ``training_args.json`` (a
    presigned signature, ``https://user:password@host``). ``None`` when nothing is left, and for a ``data:`` URI."""
    raw = urls if isinstance(urls, str) else (str(urls[-1]) if urls else "")
    # Several sources in one text: Eden's basename is that of the last one.
    raw = re.split(r"[|\r\n]+", raw.strip())[-1].strip().strip("'\"")
    if raw[:5].lower() == "data:":
        return None
    raw = urlsplit(raw).path if "://" in raw else raw.split("#", 1)[0].split("?", 1)[0]
    name = raw.rsplit("/", 1)[-1][:EDEN_NAME_CHARS]
    for char in _NAME_DELIMITERS:
        name = name.replace(char, "_")
    return name if name.strip("_. ") else None


def check_prompt_template(template: str) -> None:
    """``prompt_modifier`` is a ``str.format`` template with the caption as its only argument (Eden applies
    ``template.format(caption)``); refuse templates that would fail or reach into the caption object."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"prompt_modifier {template!r} is not a valid template ({error}); write {{}} where the "
                         "caption goes and {{ }} for literal braces") from None
    bad = [name for name in fields if name not in ("", "0")]
    if bad:
        raise ValueError(f"prompt_modifier {template!r} may only use {{}} (the caption), got {{{bad[0]}}}; write "
                         "{{ }} for literal braces")
    try:
        template.format("caption")
    except (ValueError, IndexError) as error:
        raise ValueError(f"prompt_modifier {template!r} is not a valid template ({error})") from None


class TrainingConfig(BaseModel):
    """All settings of one training run."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=False,
        protected_namespaces=(),
        # NaN and infinities pass every comparison or none: a bound cannot hold them, so no float field takes them.
        allow_inf_nan=False,
    )

    # ----------------------------------------------------------------------------------------------------- data
    lora_training_urls: Sources
    """Training images: one or many sources separated by `|`, commas or newlines, or a JSON list. Each source is an
    http(s) URL, an `s3://bucket/key` or `s3://bucket/prefix/`, or a local file or folder. Zip and tar archives,
    single images and nested folders are unpacked."""

    concept_mode: Literal["face", "style", "object"] = "style"
    """What the LoRA learns: a `face` (person or character), a `style` (the look of a collection) or an `object`.
    Sets the trigger placement in captions, masking, flips and the token initialisation. `style` when not given, as
    Eden's cog model defaults."""

    caption_prefix: Text = ""
    """Text that replaces the automatic trigger in front of every caption, as Eden's: `<prefix>, <caption>`, and
    `TOK, ` in front of that when the prefix does not name the trigger (`a photo of TOK` gives
    `a photo of TOK, <caption>`). Empty: the trigger per concept mode (`TOK, <caption>`, or
    `in the style of TOK, <caption>` for styles)."""

    caption_trigger: Literal["eden", "where_given"] = "eden"
    """Where the trigger goes in the training captions. `eden`: Eden's placement (see `caption_prefix`), in front of
    every caption, also one that names the trigger already, and a caption counts as naming it when its letters
    appear anywhere, case kept (`TOKYO` too). `where_given`: a caption or prefix that names the trigger as a whole
    word keeps it where it is, without a second one in front."""

    prompt_modifier: Optional[Text] = None
    """A `str.format` template applied to every training caption and sampling prompt, as Eden does: `{}` stands for
    the caption, so `{} in pixel art` turns `TOK, a cat` into `TOK, a cat in pixel art`. A template without `{}`
    replaces every caption by its text (Eden's rule; a warning says so)."""

    caption_model: Literal["gpt4-v", "blip", "florence", "no_caption"] = "florence"
    """Model that captions images that have no caption of their own. `no_caption` leaves them with the trigger
    only."""

    caption_dropout: Fraction = 0.1
    """Fraction of training samples whose caption is replaced by the trigger tokens alone (`<s0><s1><s2>`), as
    Eden's. With `disable_ti` there are no trigger tokens and the dropped caption is empty."""

    caption_model_path: Optional[Location] = None
    """The captioning model: a hub id or local folder for `blip` (default `Salesforce/blip-image-captioning-large`)
    and `florence` (default `florence-community/Florence-2-large`), or the OpenAI model name for `gpt4-v` (default
    `gpt-4o`; the key comes from `OPENAI_API_KEY`, another endpoint from `OPENAI_BASE_URL`)."""

    max_train_images: Annotated[int, Field(ge=1, le=MAX_TRAIN_IMAGES)] = 1000
    """Most distinct training images accepted (after removing duplicates, before augmentation); more is an error."""

    s3_endpoint_url: Optional[Location] = None
    """Endpoint of an S3-compatible store (MinIO, R2, ...) for `s3://` sources. Default: `AWS_ENDPOINT_URL_S3` or
    `AWS_ENDPOINT_URL`, else AWS itself. Credentials come from the standard AWS chain (environment, profile, role)."""

    # ---------------------------------------------------------------------------------------------------- model
    sd_model_version: Optional[Literal["sdxl", "sd15"]] = None
    """Base model family. `None` detects it from the model files (and means `sdxl` when no model is named). A
    mismatch between this and the files is an error."""

    ckpt_path: Optional[Location] = None
    """Base model: a hub id (`stabilityai/stable-diffusion-xl-base-1.0`), a local diffusers folder, a single-file
    `.safetensors`/`.ckpt` checkpoint, an http(s) URL to such a file, or the offline test fixtures `tiny-sd15` /
    `tiny-sdxl`. Overrides `pretrained_model`."""

    pretrained_model: Optional[dict] = None
    """Eden-style model description `{"path": ..., "url": ..., "version": "sdxl"|"sd15"}`. `path` is used when it
    exists, else `url` is downloaded to `path` (or the model cache)."""

    single_file_config: Optional[Location] = None
    """For a single-file checkpoint: a diffusers folder or hub id holding the configs of its architecture. Default:
    the official SD1.5 or SDXL repository (read from the model cache when offline)."""

    hf_variant: Optional[Annotated[str, Field(max_length=64)]] = None
    """Hub weight variant to load (for example `fp16`). Only used for hub ids."""

    model_cache_dir: Optional[Location] = None
    """Folder where hub models and downloaded checkpoints are cached. Default: `$TRAINER_MODEL_CACHE`, else the
    Hugging Face cache."""

    seed: Optional[Annotated[int, Field(ge=0, le=MAX_SEED)]] = None
    """Random seed. The same seed and inputs give the same run. `None` draws one, which is logged and saved."""

    # -------------------------------------------------------------------------------------------------- sizes
    resolution: Side = 512
    """Training resolution: images are trained at about resolution² pixels at the mean aspect ratio (width / height)
    of the training images, each side rounded to the nearest multiple of 64, as Eden computes it (512 with images of
    mean aspect 1.33 trains at 576×448). A value that is not a multiple of 64 is accepted with a warning giving the
    size used."""

    validation_img_size: Optional[Union[SampleSide, Annotated[list[SampleSide], Field(min_length=2,
                                                                                 max_length=2)]]] = None
    """Sample image size: an int gives about that² pixels at the training aspect ratio, `[width, height]` that size;
    every side is rounded to the nearest multiple of 64, as in Eden. `None`: 1024 for SDXL, 768 for SD1.5."""

    train_img_size: Optional[Annotated[list[Side], Field(min_length=1, max_length=2)]] = None
    """Exact training size `[width, height]` (or `[side]`), overriding the size Eden computes from `resolution` and
    the images (Eden itself always computes it)."""

    train_aspect_ratio: Optional[Annotated[float, Field(ge=0.25, le=4.0)]] = None
    """Force one training aspect ratio (width / height) at about resolution² pixels. `None`: the mean aspect ratio
    of the training images (Eden's rule), unless `aspect_ratio_bucketing` is on."""

    aspect_ratio_bucketing: bool = False
    """Train each image near its own aspect ratio: images are grouped into buckets of about resolution² pixels and
    every batch comes from one bucket."""

    # ---------------------------------------------------------------------------------------------- schedule
    train_batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH_SIZE)] = 4
    """Images per step (per device, before gradient accumulation)."""

    max_train_steps: Optional[Annotated[int, Field(ge=1, le=MAX_TRAIN_STEPS)]] = 300
    """Number of optimisation steps. It always wins over `num_train_epochs`, as in Eden (which derives the epochs
    from it); set it to `null` explicitly to train by `num_train_epochs` instead."""

    num_train_epochs: Optional[Annotated[int, Field(ge=1, le=MAX_TRAIN_STEPS)]] = None
    """Passes over the data. As in Eden, only used when `max_train_steps` is explicitly `null`; otherwise it is
    derived from `max_train_steps` and written back."""

    checkpointing_steps: Steps = 10000
    """Save a checkpoint (LoRA, embeddings, resumable state, samples) every N steps; one is always saved at the
    end. With `checkpoint_rule: eden` (the default) the steps counted are 0, N, 2N, ... that lie more than 25 steps
    before the end, and 0 means every `max_train_steps` (so only step 0), as in Eden."""

    checkpoint_rule: Literal["eden", "every"] = "eden"
    """When intermediate checkpoints are saved. `eden`: Eden's rule, at step 0 (before training, the baseline
    samples), N, 2N, ... while more than 25 steps remain. `every`: every N steps up to the end, none at step 0, and
    `checkpointing_steps: 0` saves only at the end."""

    max_checkpoints: Optional[Annotated[int, Field(ge=1, le=MAX_TRAIN_STEPS)]] = None
    """Keep at most this many intermediate checkpoints (oldest removed first). `None` keeps all."""

    gradient_accumulation_steps: Annotated[int, Field(ge=1, le=MAX_ACCUMULATION)] = 1
    """Micro-batches accumulated before each optimiser step."""

    resume_from: Optional[Location] = None
    """A checkpoint folder (`.../checkpoints/checkpoint-200`) or a run folder (its latest checkpoint) to continue
    from. LoRA, embeddings, optimisers, schedulers, step and random state are restored."""

    # ------------------------------------------------------------------------------------------------ unet
    is_lora: bool = True
    """Train a UNet LoRA. `false` fine-tunes the whole UNet (needs far more memory)."""

    unet_optimizer_type: Literal["adamw", "prodigy", "AdamW8bit"] = "adamw"
    """Optimiser for the UNet (LoRA or full). `AdamW8bit` needs bitsandbytes on a CUDA device."""

    unet_lr_warmup_steps: Optional[Steps] = None
    """Warm-up of the UNet learning rate. With `lr_scheduler: eden` the rate grows exponentially from a cold rate
    (5e-5; 2e-4 with `disable_ti`; 1e-5 for a full fine-tune) by (unet_lr / cold)^(step / this), as Eden's, and
    `None` spreads that over the whole run (`max_train_steps`). With another `lr_scheduler`: steps of linear
    warm-up, `None` meaning 0."""

    unet_lr: LearningRate = 0.0003
    """UNet learning rate (AdamW). Prodigy runs at lr 1.0 and adapts; see `prodigy_d_coef`."""

    prodigy_d_coef: Annotated[float, Field(gt=0.0, le=100.0)] = 1.0
    """Prodigy's d coefficient: scales the step size it estimates."""

    unet_prodigy_growth_factor: Annotated[float, Field(ge=1.0, le=100.0)] = 1.05
    """Prodigy's growth rate: the most its step size may grow per step. Lower grows slower."""

    lora_weight_decay: WeightDecay = 0.004
    """Weight decay of the LoRA (or UNet) parameters."""

    lora_rank: Rank = 16
    """LoRA rank of the UNet adapters."""

    lora_alpha_multiplier: Annotated[float, Field(gt=0.0, le=MAX_RANK)] = 1.0
    """LoRA alpha = rank × this, for the UNet LoRA (`lora_rank`) and the text-encoder LoRA
    (`text_encoder_lora_rank`), as Eden's. The exported files carry these true alphas."""

    use_dora: bool = False
    """Train DoRA (weight-decomposed LoRA) instead of plain LoRA. As in Eden, it sets `l1_penalty`,
    `lora_weight_decay` and `text_encoder_lora_weight_decay` to 0."""

    freeze_unet_before_completion_f: Fraction = 0.0
    """The UNet stays frozen until this fraction of the run is done and trains from there to the end (Eden's
    meaning: 0.3 trains it over the last 70%)."""

    l1_penalty: LossWeight = 0.03
    """L1 penalty on the LoRA weights (mean absolute value of the LoRA matrices, times this), for sparsity."""

    # ---------------------------------------------------------------------------------------------- tokens
    disable_ti: bool = False
    """Do not learn new tokens: only the LoRA trains. As in Eden, no trigger is added to the captions and the
    trigger word is removed from them (so a style LoRA trains on the plain captions)."""

    n_tokens: Annotated[int, Field(ge=1, le=MAX_TOKENS)] = 3
    """Number of new token vectors standing for `TOK` (per text encoder)."""

    inserting_list_tokens: Annotated[list[TokenText], Field(max_length=MAX_TOKENS)] = Field(
        default_factory=lambda: default_token_list(3))
    """The new token strings; derived from `n_tokens` unless given."""

    token_dict: Annotated[dict[TokenText, TokenString], Field(max_length=MAX_TOKENS)] = Field(
        default_factory=lambda: {"TOK": "<s0><s1><s2>"})
    """Maps the trigger used in captions and prompts to the new tokens; derived unless given."""

    initializer_token: Optional[TokenText] = None
    """A single vocabulary word that initialises every new token (for example `dog`). Default: a word for the
    concept mode (`person`, `object` or `style`)."""

    initial_phrase: Optional[Text] = None
    """A short phrase whose token embeddings initialise the new tokens in order. Unless `n_tokens` is given too,
    `n_tokens` becomes the phrase's token count."""

    initial_embedding_file: Optional[Location] = None
    """An embedding file (`clip_l`/`clip_g`, `emb_params` or diffusers form) whose vectors initialise the new
    tokens; its vector count must equal `n_tokens`."""

    ti_lr: LearningRate = 0.001
    """Learning rate of the new token embeddings. With `lr_scheduler: eden` it decays over the run as
    ti_lr × (1 − f)^1.7 (f: the fraction of the run done), as Eden's."""

    ti_lr_warmup_steps: Steps = 0
    """Steps of linear warm-up of the token learning rate."""

    ti_optimizer: Literal["adamw", "prodigy"] = "adamw"
    """Optimiser for the new token embeddings (its state covers only the new rows). With `lr_scheduler: eden`,
    Prodigy runs at its own rate for the whole run, without the pivot, as in Eden."""

    ti_weight_decay: WeightDecay = 0.0
    """Weight decay of the new token embeddings."""

    token_warmup_steps: Steps = 0
    """First steps during which only the token embeddings train (the UNet and text-encoder LoRA wait)."""

    freeze_ti_after_completion_f: Fraction = 0.7
    """The pivot: token embeddings stop training once more than this fraction of the run is done. From then on,
    text-encoder outputs are cached when nothing else in the text side trains."""

    # -------------------------------------------------------------------------------------- text-encoder LoRA
    text_encoder_lora_optimizer: Optional[Literal["adamw"]] = None
    """Set to `adamw` to also train LoRA adapters in the text encoder(s). `None` skips them."""

    text_encoder_lora_lr: LearningRate = 1.0e-5
    """Learning rate of the text-encoder LoRA, which trains to the end of the run. With `lr_scheduler: eden` it
    decays as lr × (1 − f)^2 (f: the fraction of the run done) after its warm-up, as Eden's."""

    txt_encoders_lr_warmup_steps: Steps = 200
    """Steps of linear warm-up of the text-encoder LoRA learning rate."""

    text_encoder_lora_weight_decay: WeightDecay = 1.0e-5
    """Weight decay of the text-encoder LoRA."""

    text_encoder_lora_rank: Rank = 16
    """LoRA rank of the text-encoder adapters (their alpha is this × `lora_alpha_multiplier`)."""

    # ---------------------------------------------------------------------------------- optimisation shared
    lr_scheduler: Literal[
        "eden", "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "eden"
    """Learning-rate schedules. `eden`: Eden's, one per part (see `unet_lr_warmup_steps`, `ti_lr`,
    `text_encoder_lora_lr`). The others apply one schedule to every optimiser after its own linear warm-up."""

    max_grad_norm: Optional[Annotated[float, Field(gt=0.0, le=1e4)]] = None
    """Clip the gradient norm of each parameter group to this value. `None` does not clip."""

    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass: much less memory, about 30% slower."""

    torch_compile: Optional[bool] = None
    """Compile the UNet's repeated transformer blocks (regional torch.compile): fewer, fused kernels and far less
    launch overhead, after a warm-up of some seconds. `None` turns it on where it pays (CUDA, XPU) and off on CPU and
    MPS."""

    offload_idle_modules: bool = False
    """Move the text encoders and the VAE to CPU memory while they are idle (after their outputs are cached), and
    back for sampling. Saves about 1.7 GB on SDXL; part of the low-memory preset."""

    # ------------------------------------------------------------------------------------------------ loss
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None
    """Training target. `None` takes the base model's scheduler setting."""

    snr_gamma: Optional[Annotated[float, Field(ge=0.0, le=1e3)]] = 5.0
    """Min-SNR loss weighting gamma (arXiv 2303.09556). 0 or `None` disables it."""

    noise_offset: Annotated[float, Field(ge=0.0, le=1.0)] = 0.02
    """Offset noise: adds this × a per-channel constant to the noise, which helps very dark or bright images."""

    use_masks: bool = True
    """Weight the loss by the data's masks (faces, CLIPSeg prompts) where the data has them."""

    token_attention_loss_w: LossWeight = 3e-7
    """Weight of the attention loss on the new tokens' cross-attention maps. With a mask it penalises the tokens'
    attention outside the mask; without, the attention share the tokens take from the other words. 0 disables it
    at no cost."""

    cond_reg_w: LossWeight = 0.0e-5
    """Weight of the conditioning regulariser: the mean square of the prompt embeddings (keeps the conditioning
    at the scale the UNet knows)."""

    tok_cond_reg_w: LossWeight = 0.0e-5
    """Like `cond_reg_w`, restricted to the positions of the new tokens."""

    tok_cov_reg_w: LossWeight = 0.0
    """Weight of the token covariance regulariser: the Mahalanobis distance of the new embeddings from the
    distribution of the pretrained ones."""

    # ------------------------------------------------------------------------------------------ augmentation
    left_right_flip_augmentation: bool = True
    """Randomly flip images left-right (always off in face mode: faces are not symmetric)."""

    augment_imgs_up_to_n: Annotated[int, Field(ge=0, le=MAX_AUGMENTED_IMAGES)] = 40
    """Add augmented copies (crops, flips) until the dataset has at least this many images. 0 disables it."""

    mask_target_prompts: Optional[Text] = None
    """Text prompts for CLIPSeg masks (for example `a face`); the masks weight the loss and guide the crops. `None`:
    `face` in face mode and no mask otherwise, as in Eden (which also ignores prompts given in style mode and
    replaces them by `face` in face mode; here a given prompt is used)."""

    crop_based_on_salience: bool = True
    """Crop around the mask or a saliency map instead of the centre."""

    use_face_detection_instead: bool = False
    """Use a face detector instead of CLIPSeg to make the masks (face mode masks with CLIPSeg `face` otherwise, as
    Eden's)."""

    clipseg_temperature: Annotated[float, Field(gt=0.0, le=100.0)] = 0.5
    """Softness of the CLIPSeg masks: higher gives softer masks."""

    clipseg_model_path: Optional[Location] = None
    """The CLIPSeg model for `mask_target_prompts`: a hub id or local folder. Default `CIDAS/clipseg-rd64-refined`."""

    # ---------------------------------------------------------------------------------------------- samples
    n_sample_imgs: Annotated[int, Field(ge=0, le=MAX_SAMPLE_IMAGES)] = 4
    """Sample images generated with the trained tokens at each checkpoint and at the end (0 disables)."""

    sample_imgs_lora_scale: Optional[LoraScale] = None
    """LoRA scale for the sample images. `None` (or 0, as in Eden): 0.75 for SDXL, 0.85 for SD1.5."""

    validation_prompts: Optional[Annotated[list[Text], Field(max_length=MAX_SAMPLE_IMAGES)]] = None
    """Prompts for the sample images (use `TOK`). Default: a set per concept mode."""

    negative_validation_prompts: Optional[Annotated[list[Text], Field(max_length=MAX_SAMPLE_IMAGES)]] = None
    """Negative prompts, one per validation prompt."""

    validation_num_inference_steps: Annotated[int, Field(ge=1, le=MAX_INFERENCE_STEPS)] = 25
    """Denoising steps per sample image."""

    validation_guidance_scale: Annotated[float, Field(gt=0.0, le=MAX_GUIDANCE)] = 7.0
    """Classifier-free guidance scale of the sample images."""

    enable_cpu_offload_during_validation: bool = False
    """Keep models in CPU memory while sampling and move them to the device one by one (less memory, slower)."""

    evaluate_checkpoints: bool = False
    """At the end, score every checkpoint (CLIP adherence, likeness, diversity, aesthetics) and put the report in
    the output zip."""

    evaluation_clip_model: ClipModel = DEFAULT_CLIP_MODEL
    """The CLIP model that scores the checkpoints (`evaluate_checkpoints`, `python -m trainer evaluate`): a hub id
    or a local folder with the model, tokenizer and image processor."""

    evaluation_aesthetic_weights: Optional[Location] = None
    """LAION improved-aesthetic-predictor weights (`sac+logos+ava1-l14-linearMSE.pth`, made for CLIP ViT-L/14): a
    local file or an http(s) URL. `None` leaves the aesthetic score out."""

    evaluation_lora_scales: EvaluationScales = Field(default_factory=lambda: [0.8, 1.0])
    """LoRA scales every checkpoint is evaluated at; the recommendation names a checkpoint and a scale."""

    evaluation_images_per_prompt: ImagesPerPrompt = 2
    """Images rendered per evaluation prompt (6 prompts, fixed seeds) for each checkpoint and scale."""

    # ------------------------------------------------------------------------------------------------ caches
    cache_vae_outputs: bool = True
    """Encode each (image, crop, flip) with the VAE once and reuse the latents every step."""

    cache_text_encoder_outputs: bool = True
    """Encode each caption once as soon as nothing in the text side trains (after the pivot, or from the start
    when token and text-encoder training are off)."""

    save_dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    """Precision of the exported LoRA file (fp16 is what other tools expect; fp32 keeps the trained values
    exactly)."""

    # ------------------------------------------------------------------------------------------------ run
    name: Optional[Annotated[str, Field(max_length=MAX_NAME_CHARS)]] = None
    """Name of the run and of the output files. Default: as in Eden, the last part of `lora_training_urls` (at most
    40 characters, `xander.zip` for `https://host/sets/xander.zip`); the concept mode when that is empty."""

    output_dir: Location = "eden_lora_training_runs"
    """Folder under which each run gets its own folder."""

    device: Annotated[str, Field(max_length=32)] = "auto"
    """`auto`, `cpu`, `cuda[:N]`, `xpu[:N]` or `mps`. `auto` picks cuda, then xpu, then mps, then cpu. (The XPU
    fork defaulted to `xpu:0`; `auto` gives the same on an XPU machine and still runs elsewhere.) A `cuda:N` or
    `xpu:N` that this machine lacks, as Eden's saved `training_args.json` files carry (Eden ignores it and picks
    the best GPU), becomes `auto` with a warning when the file is loaded."""

    weight_type: Literal["fp16", "bf16", "fp32"] = "bf16"
    """Precision of the frozen weights and of autocast. Trainable weights stay fp32. Falls back, with a warning,
    where the device lacks the type."""

    allow_tf32: bool = True
    """Allow TF32 matrix maths on NVIDIA Ampere and newer (faster, slightly less precise fp32)."""

    dataloader_num_workers: Annotated[int, Field(ge=0, le=MAX_WORKERS)] = 0
    """Threads that decode images in parallel: for the latent cache, and every step when `cache_vae_outputs` is off.
    0 decodes in the main thread."""

    logging_steps: Annotated[int, Field(ge=1, le=MAX_TRAIN_STEPS)] = 10
    """Read the loss back from the device (progress bar, CSV log, divergence check) every N steps."""

    debug: bool = False
    """Verbose logging and extra checks."""

    skip_gpt_cleanup: bool = False
    """Do not let the GPT captioner rewrite captions (only with `caption_model: gpt4-v`)."""

    training_attributes: dict = Field(default_factory=dict)
    """Free-form metadata kept with the run (written to `training_args.json`)."""

    # ============================================================================================ validation
    # Ranges are part of the field types above; these validators hold the rules a range cannot say.
    @field_validator("lora_training_urls")
    @classmethod
    def _urls_not_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        empty = not value.strip() if isinstance(value, str) else not [v for v in value if str(v).strip()]
        if empty:
            raise ValueError("lora_training_urls is empty: give at least one URL, S3 object or local path")
        return value

    @field_validator("training_attributes", "pretrained_model")
    @classmethod
    def _plain_object(cls, value: Optional[dict], info) -> Optional[dict]:
        if value is None:
            return None
        _check_plain(value, info.field_name, 0)
        size = len(json.dumps(value, allow_nan=False, default=str))
        if size > MAX_OBJECT_CHARS:
            raise ValueError(f"{info.field_name} is {size} characters as JSON, more than the limit of "
                             f"{MAX_OBJECT_CHARS}")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: Optional[str]) -> Optional[str]:
        if value is None:
            return None
        scheme, _, rest = value.strip().partition("://")
        if scheme.lower() not in ("http", "https") or not rest.split("/")[0].strip():
            raise ValueError(f"s3_endpoint_url must be an http(s):// URL such as http://127.0.0.1:9000, got {value!r}")
        return value.strip()

    @field_validator("device")
    @classmethod
    def _device_syntax(cls, value: str) -> str:
        parse_device(value)
        return value.strip().lower()

    @field_validator("train_img_size")
    @classmethod
    def _train_size_multiple(cls, value: Optional[list[int]]) -> Optional[list[int]]:
        if value is not None and any(side % SIZE_MULTIPLE for side in value):
            raise ValueError(f"train_img_size must be [width, height] (or [side]) with multiples of {SIZE_MULTIPLE}, "
                             f"got {value}")
        return value

    @field_validator("initializer_token")
    @classmethod
    def _single_word(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and (not value.strip() or len(value.split()) != 1):
            raise ValueError(f"initializer_token must be a single word, got {value!r} (use initial_phrase for "
                             "several words)")
        return value

    @field_validator("prompt_modifier")
    @classmethod
    def _prompt_template(cls, value: Optional[str]) -> Optional[str]:
        if value:
            check_prompt_template(value)
            if "{" not in value.replace("{{", ""):
                logger.warning("prompt_modifier %r has no {} placeholder: as in Eden (str.format), every caption "
                               "and sample prompt becomes %r", value, value.format())
        return value

    # Eden rounds sizes rather than refusing them: a value inside the bounds of its type that is not a multiple of
    # 64 is kept (or rounded) with a warning; a value past the bounds is refused before these run.
    @field_validator("resolution")
    @classmethod
    def _resolution_rounds(cls, value: int) -> int:
        if value % SIZE_MULTIPLE:
            used = _round_side(value)
            logger.warning("resolution %d is not a multiple of %d: as in Eden, each side of the training size is "
                           "rounded to one (%dx%d for square images)", value, SIZE_MULTIPLE, used, used)
        return value

    @field_validator("validation_img_size", mode="before")
    @classmethod
    def _no_validation_size(cls, value: Any) -> Any:
        # Eden: `if not config.validation_img_size` takes the model's default.
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0 else value

    @field_validator("validation_img_size")
    @classmethod
    def _validation_size_rounds(cls, value: Optional[Union[int, list[int]]]) -> Optional[Union[int, list[int]]]:
        if isinstance(value, list):
            used = [_round_side(side) for side in value]
            if used != value:
                logger.warning("validation_img_size %s rounded to %s: as in Eden, every side is a multiple of %d",
                               value, used, SIZE_MULTIPLE)
            return used
        if value is not None and value % SIZE_MULTIPLE:
            logger.warning("validation_img_size %d is not a multiple of %d: as in Eden, each side of the sample size "
                           "is rounded to one", value, SIZE_MULTIPLE)
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainingConfig:
        errors: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        # Steps vs epochs: at least one. Eden writes both (it derives the epochs from the steps), so both being set
        # is allowed and max_train_steps wins unless it is explicitly null (Eden's rule).
        check(
            self.max_train_steps is not None or self.num_train_epochs is not None,
            "set max_train_steps or num_train_epochs: both are null",
        )

        # Tokens. What is derived here stays "not set": an initial phrase may still set their number at run time.
        given = set(self.model_fields_set)
        self._derive_tokens(errors)
        self.model_fields_set.difference_update({"n_tokens", "inserting_list_tokens", "token_dict"} - given)
        initialisers = [
            name for name in ("initializer_token", "initial_phrase", "initial_embedding_file") if getattr(self, name)
        ]
        check(
            len(initialisers) <= 1,
            f"set at most one of initializer_token, initial_phrase, initial_embedding_file; got {initialisers}",
        )

        if self.validation_prompts is not None and self.negative_validation_prompts is not None:
            check(
                len(self.validation_prompts) == len(self.negative_validation_prompts),
                f"negative_validation_prompts must have one entry per validation prompt: "
                f"{len(self.negative_validation_prompts)} negative vs {len(self.validation_prompts)} prompts",
            )

        # Something must train.
        if self.disable_ti and not self.text_encoder_lora_optimizer:
            unet_window = (1.0 - self.freeze_unet_before_completion_f)
            check(
                unet_window > 0.0,
                "nothing would train: disable_ti is true, text_encoder_lora_optimizer is null and "
                f"freeze_unet_before_completion_f is {self.freeze_unet_before_completion_f}",
            )
        if self.use_dora and not self.is_lora:
            errors.append("use_dora needs is_lora: true (DoRA is a LoRA variant), got is_lora: false")

        if errors:
            raise ValueError("; ".join(errors))
        return self

    @model_validator(mode="after")
    def _eden_dora_settings(self) -> TrainingConfig:
        # Eden's TrainingConfig.__init__: DoRA trains without the L1 penalty and the LoRA weight decays.
        if self.use_dora:
            fields = ("l1_penalty", "lora_weight_decay", "text_encoder_lora_weight_decay")
            zeroed = [f for f in fields if getattr(self, f)]
            if zeroed:
                logger.info("use_dora: %s set to 0, as in Eden", ", ".join(zeroed))
            self.l1_penalty = self.lora_weight_decay = self.text_encoder_lora_weight_decay = 0.0
        return self

    def _derive_tokens(self, errors: list[str]) -> None:
        explicit = self.model_fields_set
        if self.disable_ti:
            return
        if "inserting_list_tokens" in explicit:
            tokens = self.inserting_list_tokens
            if not tokens:
                errors.append("inserting_list_tokens is empty: give the new token strings (or set disable_ti: true)")
                return
            if "n_tokens" in explicit and len(tokens) != self.n_tokens:
                errors.append(
                    f"n_tokens ({self.n_tokens}) must equal the length of inserting_list_tokens "
                    f"({len(tokens)}: {tokens})"
                )
                return
            self.n_tokens = len(tokens)
        else:
            self.inserting_list_tokens = default_token_list(self.n_tokens)
        tokens = self.inserting_list_tokens
        if len(set(tokens)) != len(tokens) or not all(t and not t.isspace() and " " not in t for t in tokens):
            errors.append(f"inserting_list_tokens must be distinct strings without spaces, got {tokens}")
            return
        joined = "".join(tokens)
        if "token_dict" in explicit:
            if not self.token_dict:
                errors.append("token_dict is empty: it maps the trigger (for example TOK) to the new tokens")
                return
            for trigger, value in self.token_dict.items():
                if value != joined:
                    errors.append(
                        f"token_dict[{trigger!r}] must be the new tokens joined ({joined!r}) to match "
                        f"inserting_list_tokens, got {value!r}"
                    )
        else:
            self.token_dict = {"TOK": joined}

    # ================================================================================================ helpers
    @property
    def trigger(self) -> str:
        """The word captions and prompts use for the concept (the first key of `token_dict`)."""
        return next(iter(self.token_dict)) if self.token_dict else "TOK"

    @property
    def run_name(self) -> str:
        """The run's name: `name`, else Eden's (from the training URL), else the concept mode."""
        return self.name or run_name_from_urls(self.lora_training_urls) or self.concept_mode

    def to_json_dict(self) -> dict[str, Any]:
        """The settings as JSON, for ``training_args.json``: URLs lose their credentials and signatures, since the
        file travels in the zip that Replicate serves as the model's public weights."""
        return redact_values(self.model_dump(mode="json"))

    def explicitly_set(self, field: str) -> bool:
        return field in self.model_fields_set


def _check_plain(value: Any, where: str, depth: int) -> None:
    """JSON-like data nested at most MAX_OBJECT_DEPTH deep, with finite numbers only."""
    if depth > MAX_OBJECT_DEPTH:
        raise ValueError(f"{where} is nested more than {MAX_OBJECT_DEPTH} levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} must hold finite numbers, got {value}")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_plain(item, f"{where}.{key}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, f"{where}[{index}]", depth + 1)


# ================================================================================================== bounds
@dataclass(frozen=True)
class Bounds:
    """The range, choices and lengths a field's type admits (read from its annotation, for docs and messages)."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple | None = None
    min_length: int | None = None
    max_length: int | None = None
    unit: str = ""
    """What a length counts: ``characters`` (text) or ``items`` (lists, mappings)."""
    items: Bounds | None = None
    """For lists: the bounds of each item."""
    alternative: Bounds | None = None
    """For a number that may also be given as a list (``validation_img_size``): the list's bounds."""

    def describe(self) -> str:
        """``in [64, 2048]``, ``> 0``, ``one of face, style, object``, ``at most 2000 characters``..."""
        if self.choices is not None:
            return "one of " + ", ".join(str(c) for c in self.choices)
        parts = []
        low, high = self._low(), self._high()
        if low and high:
            parts.append(f"in {low[0]}{low[1]}, {high[1]}{high[0]}")
        elif low:
            parts.append(f"{'≥' if low[0] == '[' else '>'} {low[1]}")
        elif high:
            parts.append(f"{'≤' if high[0] == ']' else '<'} {high[1]}")
        length = _length_text(self.min_length, self.max_length, self.unit)
        if length:
            parts.append(length)
        if self.items is not None and self.items.describe():
            parts.append(f"each {self.items.describe()}")
        text = ", ".join(parts)
        if self.alternative is not None:
            text += f"; or a list of {self.alternative.describe()}"
        return text

    def _low(self) -> tuple[str, str] | None:
        if self.ge is not None:
            return "[", _number(self.ge)
        return ("(", _number(self.gt)) if self.gt is not None else None

    def _high(self) -> tuple[str, str] | None:
        if self.le is not None:
            return "]", _number(self.le)
        return (")", _number(self.lt)) if self.lt is not None else None

    def at(self, path: tuple) -> Bounds:
        """The bounds of a part of the value (list items by index)."""
        bounds = self
        for part in path:
            if isinstance(part, int):
                inner = bounds.items or (bounds.alternative.items if bounds.alternative else None)
                if inner is not None:
                    bounds = inner
        return bounds


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _length_text(low: int | None, high: int | None, unit: str) -> str:
    if low is not None and high is not None:
        return f"{low} to {high} {unit}" if low != high else f"exactly {low} {unit}"
    if high is not None:
        return f"at most {high} {unit}"
    return f"at least {low} {unit}" if low is not None else ""


def _collect(annotation: Any, metadata: list) -> Bounds:
    if get_origin(annotation) is Annotated:
        annotation, *extra = get_args(annotation)
        for item in extra:
            metadata = [*metadata, *(getattr(item, "metadata", None) or [item])]
        return _collect(annotation, metadata)
    values: dict[str, Any] = {}
    for item in metadata:
        for key in ("ge", "gt", "le", "lt", "min_length", "max_length"):
            if getattr(item, key, None) is not None:
                values[key] = getattr(item, key)
    origin = get_origin(annotation)
    if origin is Literal:
        values["choices"] = get_args(annotation)
    elif origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        first = _collect(options[0], [])
        values = {**{k: v for k, v in vars(first).items() if v not in (None, "")}, **values}
        if len(options) > 1 and first.items is None and get_origin(_bare(options[1])) is list:
            values["alternative"] = _collect(options[1], [])
    elif origin is list or origin is dict or annotation in (list, dict):
        values["unit"] = "items"
        if origin is list:
            values["items"] = _collect(get_args(annotation)[0], [])
    elif annotation is str:
        values["unit"] = "characters"
    return Bounds(**values)


def _bare(annotation: Any) -> Any:
    return get_args(annotation)[0] if get_origin(annotation) is Annotated else annotation


def field_bounds(name: str, model: type[BaseModel] = TrainingConfig) -> Bounds:
    """What the field ``name`` of ``model`` (the config, unless given) admits, read off its type."""
    field = model.model_fields[name]
    return _collect(field.annotation, list(field.metadata))
