"""The training configuration.

Every parameter of the Eden sd-lora-trainer (and its Intel-XPU fork) exists here under the same name, type and
default, so their ``training_args.json`` files load unchanged. Options from invoke-training's textual-inversion
config that Eden lacks are added under names that fit beside them. Each field carries its documentation as an
attribute docstring: the README's parameter table is generated from them (``python -m trainer docs``).
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

CONCEPT_MODES = ("face", "style", "object")

#: Sizes must divide into the VAE's 8x downsampling and the UNet's down blocks (SD1.5: 3 halvings).
SIZE_MULTIPLE = 64


def default_token_list(n_tokens: int) -> list[str]:
    return [f"<s{i}>" for i in range(n_tokens)]


class TrainingConfig(BaseModel):
    """All settings of one training run."""

    model_config = ConfigDict(
        extra="forbid",
        use_attribute_docstrings=True,
        validate_assignment=False,
        protected_namespaces=(),
    )

    # ----------------------------------------------------------------------------------------------------- data
    lora_training_urls: Union[str, list[str]]
    """Training images: one or many sources separated by `|`, commas or newlines, or a JSON list. Each source is an
    http(s) URL, an `s3://bucket/key` or `s3://bucket/prefix/`, or a local file or folder. Zip and tar archives,
    single images and nested folders are unpacked."""

    concept_mode: Literal["face", "style", "object"]
    """What the LoRA learns: a `face` (person or character), a `style` (the look of a collection) or an `object`.
    Sets the trigger placement in captions, masking, flips and the token initialisation."""

    caption_prefix: str = ""
    """Hard-coded caption prefix put before every caption (after the trigger). Empty to disable."""

    prompt_modifier: Optional[str] = None
    """Extra text appended to every training caption and sampling prompt."""

    caption_model: Literal["gpt4-v", "blip", "florence", "no_caption"] = "florence"
    """Model that captions images that have no caption of their own. `no_caption` leaves them with the trigger
    only."""

    caption_dropout: float = 0.1
    """Fraction of training samples whose caption is replaced by the empty prompt (robustness, CFG)."""

    caption_model_path: Optional[str] = None
    """The captioning model: a hub id or local folder for `blip` (default `Salesforce/blip-image-captioning-large`)
    and `florence` (default `florence-community/Florence-2-large`), or the OpenAI model name for `gpt4-v` (default
    `gpt-4o`; the key comes from `OPENAI_API_KEY`, another endpoint from `OPENAI_BASE_URL`)."""

    max_train_images: int = 1000
    """Most distinct training images accepted (after removing duplicates, before augmentation); more is an error."""

    s3_endpoint_url: Optional[str] = None
    """Endpoint of an S3-compatible store (MinIO, R2, ...) for `s3://` sources. Default: `AWS_ENDPOINT_URL_S3` or
    `AWS_ENDPOINT_URL`, else AWS itself. Credentials come from the standard AWS chain (environment, profile, role)."""

    # ---------------------------------------------------------------------------------------------------- model
    sd_model_version: Optional[Literal["sdxl", "sd15"]] = None
    """Base model family. `None` detects it from the model files (and means `sdxl` when no model is named). A
    mismatch between this and the files is an error."""

    ckpt_path: Optional[str] = None
    """Base model: a hub id (`stabilityai/stable-diffusion-xl-base-1.0`), a local diffusers folder, a single-file
    `.safetensors`/`.ckpt` checkpoint, an http(s) URL to such a file, or the offline test fixtures `tiny-sd15` /
    `tiny-sdxl`. Overrides `pretrained_model`."""

    pretrained_model: Optional[dict] = None
    """Eden-style model description `{"path": ..., "url": ..., "version": "sdxl"|"sd15"}`. `path` is used when it
    exists, else `url` is downloaded to `path` (or the model cache)."""

    single_file_config: Optional[str] = None
    """For a single-file checkpoint: a diffusers folder or hub id holding the configs of its architecture. Default:
    the official SD1.5 or SDXL repository (read from the model cache when offline)."""

    hf_variant: Optional[str] = None
    """Hub weight variant to load (for example `fp16`). Only used for hub ids."""

    model_cache_dir: Optional[str] = None
    """Folder where hub models and downloaded checkpoints are cached. Default: `$TRAINER_MODEL_CACHE`, else the
    Hugging Face cache."""

    seed: Optional[int] = None
    """Random seed. The same seed and inputs give the same run. `None` draws one, which is logged and saved."""

    # -------------------------------------------------------------------------------------------------- sizes
    resolution: int = 512
    """Training resolution: images are trained at about resolution² pixels. Multiple of 64."""

    validation_img_size: Optional[Union[int, list[int]]] = None
    """Sample image size: an int gives about that² pixels at the training aspect ratio, `[width, height]` an exact
    size, `None` the training size (1024 for SDXL and 512 for SD1.5 when training smaller)."""

    train_img_size: Optional[list[int]] = None
    """Exact training size `[width, height]` (or `[side]`). Overrides `resolution` and `train_aspect_ratio`."""

    train_aspect_ratio: Optional[float] = None
    """Force one training aspect ratio (width / height) at about resolution² pixels. `None` is square, unless
    `aspect_ratio_bucketing` is on."""

    aspect_ratio_bucketing: bool = False
    """Train each image near its own aspect ratio: images are grouped into buckets of about resolution² pixels and
    every batch comes from one bucket."""

    # ---------------------------------------------------------------------------------------------- schedule
    train_batch_size: int = 4
    """Images per step (per device, before gradient accumulation)."""

    max_train_steps: Optional[int] = 300
    """Number of optimisation steps. When both this and `num_train_epochs` are given, this wins (as in the Eden
    trainer); set only `num_train_epochs` to train by epochs."""

    num_train_epochs: Optional[int] = None
    """Train for this many passes over the data instead of `max_train_steps`."""

    checkpointing_steps: int = 10000
    """Save a checkpoint (LoRA, embeddings, resumable state, samples) every N steps; one is always saved at the
    end. 0 saves only at the end."""

    max_checkpoints: Optional[int] = None
    """Keep at most this many intermediate checkpoints (oldest removed first). `None` keeps all."""

    gradient_accumulation_steps: int = 1
    """Micro-batches accumulated before each optimiser step."""

    resume_from: Optional[str] = None
    """A checkpoint folder (`.../checkpoints/checkpoint-200`) or a run folder (its latest checkpoint) to continue
    from. LoRA, embeddings, optimisers, schedulers, step and random state are restored."""

    # ------------------------------------------------------------------------------------------------ unet
    is_lora: bool = True
    """Train a UNet LoRA. `false` fine-tunes the whole UNet (needs far more memory)."""

    unet_optimizer_type: Literal["adamw", "prodigy", "AdamW8bit"] = "adamw"
    """Optimiser for the UNet (LoRA or full). `AdamW8bit` needs bitsandbytes on a CUDA device."""

    unet_lr_warmup_steps: Optional[int] = None
    """Steps of linear warm-up of the UNet learning rate. `None` means 0."""

    unet_lr: float = 0.0003
    """UNet learning rate (AdamW). Prodigy runs at lr 1.0 and adapts; see `prodigy_d_coef`."""

    prodigy_d_coef: float = 1.0
    """Prodigy's d coefficient: scales the step size it estimates."""

    unet_prodigy_growth_factor: float = 1.05
    """Prodigy's growth rate: the most its step size may grow per step. Lower grows slower."""

    lora_weight_decay: float = 0.004
    """Weight decay of the LoRA (or UNet) parameters."""

    lora_rank: int = 16
    """LoRA rank of the UNet adapters."""

    lora_alpha_multiplier: float = 1.0
    """LoRA alpha = `lora_rank` × this. The exported file carries this true alpha."""

    use_dora: bool = False
    """Train DoRA (weight-decomposed LoRA) instead of plain LoRA."""

    freeze_unet_before_completion_f: float = 0.0
    """Stop training the UNet this fraction of the steps before the end (the tail trains only what else is on)."""

    l1_penalty: float = 0.03
    """L1 penalty on the LoRA weights (mean absolute value of the LoRA matrices, times this), for sparsity."""

    # ---------------------------------------------------------------------------------------------- tokens
    disable_ti: bool = False
    """Do not learn new tokens: the trigger stays a plain word in captions and prompts (DreamBooth style) and
    only the LoRA trains."""

    n_tokens: int = 3
    """Number of new token vectors standing for `TOK` (per text encoder)."""

    inserting_list_tokens: list[str] = Field(default_factory=lambda: default_token_list(3))
    """The new token strings; derived from `n_tokens` unless given."""

    token_dict: dict = Field(default_factory=lambda: {"TOK": "<s0><s1><s2>"})
    """Maps the trigger used in captions and prompts to the new tokens; derived unless given."""

    initializer_token: Optional[str] = None
    """A single vocabulary word that initialises every new token (for example `dog`). Default: a word for the
    concept mode (`person`, `object` or `style`)."""

    initial_phrase: Optional[str] = None
    """A short phrase whose token embeddings initialise the new tokens in order. Unless `n_tokens` is given too,
    `n_tokens` becomes the phrase's token count."""

    initial_embedding_file: Optional[str] = None
    """An embedding file (`clip_l`/`clip_g`, `emb_params` or diffusers form) whose vectors initialise the new
    tokens; its vector count must equal `n_tokens`."""

    ti_lr: float = 0.001
    """Learning rate of the new token embeddings."""

    ti_lr_warmup_steps: int = 0
    """Steps of linear warm-up of the token learning rate."""

    ti_optimizer: Literal["adamw", "prodigy"] = "adamw"
    """Optimiser for the new token embeddings (its state covers only the new rows)."""

    ti_weight_decay: float = 0.0
    """Weight decay of the new token embeddings."""

    token_warmup_steps: int = 0
    """First steps during which only the token embeddings train (the UNet and text-encoder LoRA wait)."""

    freeze_ti_after_completion_f: float = 0.7
    """The pivot: token embeddings stop training after this fraction of the steps. From then on, text-encoder
    outputs are cached when nothing else in the text side trains."""

    # -------------------------------------------------------------------------------------- text-encoder LoRA
    text_encoder_lora_optimizer: Optional[Literal["adamw"]] = None
    """Set to `adamw` to also train LoRA adapters in the text encoder(s). `None` skips them."""

    text_encoder_lora_lr: float = 1.0e-5
    """Learning rate of the text-encoder LoRA."""

    txt_encoders_lr_warmup_steps: int = 200
    """Steps of linear warm-up of the text-encoder LoRA learning rate."""

    text_encoder_lora_weight_decay: float = 1.0e-5
    """Weight decay of the text-encoder LoRA."""

    text_encoder_lora_rank: int = 16
    """LoRA rank of the text-encoder adapters."""

    # ---------------------------------------------------------------------------------- optimisation shared
    lr_scheduler: Literal[
        "linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"
    ] = "constant"
    """Learning-rate schedule after warm-up, applied to every optimiser (each with its own warm-up)."""

    max_grad_norm: Optional[float] = None
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

    snr_gamma: Optional[float] = 5.0
    """Min-SNR loss weighting gamma (arXiv 2303.09556). 0 or `None` disables it."""

    noise_offset: float = 0.02
    """Offset noise: adds this × a per-channel constant to the noise, which helps very dark or bright images."""

    use_masks: bool = True
    """Weight the loss by the data's masks (faces, CLIPSeg prompts) where the data has them."""

    token_attention_loss_w: float = 3e-7
    """Weight of the attention loss on the new tokens' cross-attention maps. With a mask it penalises the tokens'
    attention outside the mask; without, the attention share the tokens take from the other words. 0 disables it
    at no cost."""

    cond_reg_w: float = 0.0e-5
    """Weight of the conditioning regulariser: the mean square of the prompt embeddings (keeps the conditioning
    at the scale the UNet knows)."""

    tok_cond_reg_w: float = 0.0e-5
    """Like `cond_reg_w`, restricted to the positions of the new tokens."""

    tok_cov_reg_w: float = 0.0
    """Weight of the token covariance regulariser: the Mahalanobis distance of the new embeddings from the
    distribution of the pretrained ones."""

    # ------------------------------------------------------------------------------------------ augmentation
    left_right_flip_augmentation: bool = True
    """Randomly flip images left-right (always off in face mode: faces are not symmetric)."""

    augment_imgs_up_to_n: int = 40
    """Add augmented copies (crops, flips) until the dataset has at least this many images. 0 disables it."""

    mask_target_prompts: Optional[str] = None
    """Text prompts for CLIPSeg masks (for example `a face`); the masks weight the loss and guide the crops."""

    crop_based_on_salience: bool = True
    """Crop around the mask or a saliency map instead of the centre."""

    use_face_detection_instead: bool = False
    """Use a face detector instead of CLIPSeg to make the masks (face mode does so by default)."""

    clipseg_temperature: float = 0.5
    """Softness of the CLIPSeg masks: higher gives softer masks."""

    clipseg_model_path: Optional[str] = None
    """The CLIPSeg model for `mask_target_prompts`: a hub id or local folder. Default `CIDAS/clipseg-rd64-refined`."""

    # ---------------------------------------------------------------------------------------------- samples
    n_sample_imgs: int = 4
    """Sample images generated with the trained tokens at each checkpoint and at the end (0 disables)."""

    sample_imgs_lora_scale: Optional[float] = None
    """LoRA scale for the sample images. `None` is 1.0."""

    validation_prompts: Optional[list[str]] = None
    """Prompts for the sample images (use `TOK`). Default: a set per concept mode."""

    negative_validation_prompts: Optional[list[str]] = None
    """Negative prompts, one per validation prompt."""

    validation_num_inference_steps: int = 25
    """Denoising steps per sample image."""

    validation_guidance_scale: float = 7.0
    """Classifier-free guidance scale of the sample images."""

    enable_cpu_offload_during_validation: bool = False
    """Keep models in CPU memory while sampling and move them to the device one by one (less memory, slower)."""

    evaluate_checkpoints: bool = False
    """At the end, score every checkpoint (CLIP adherence, likeness, diversity, aesthetics) and put the report in
    the output zip."""

    evaluation_clip_model: str = "openai/clip-vit-large-patch14"
    """The CLIP model that scores the checkpoints (`evaluate_checkpoints`, `python -m trainer evaluate`): a hub id
    or a local folder with the model, tokenizer and image processor."""

    evaluation_aesthetic_weights: Optional[str] = None
    """LAION improved-aesthetic-predictor weights (`sac+logos+ava1-l14-linearMSE.pth`, made for CLIP ViT-L/14): a
    local file or an http(s) URL. `None` leaves the aesthetic score out."""

    evaluation_lora_scales: list[float] = Field(default_factory=lambda: [0.8, 1.0])
    """LoRA scales every checkpoint is evaluated at; the recommendation names a checkpoint and a scale."""

    evaluation_images_per_prompt: int = 2
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
    name: Optional[str] = None
    """Name of the run and of the output files. Default: derived from the concept mode and the time."""

    output_dir: str = "eden_lora_training_runs"
    """Folder under which each run gets its own folder."""

    device: str = "auto"
    """`auto`, `cpu`, `cuda[:N]`, `xpu[:N]` or `mps`. `auto` picks cuda, then xpu, then mps, then cpu. (The XPU
    fork defaulted to `xpu:0`; `auto` gives the same on an XPU machine and still runs elsewhere.)"""

    weight_type: Literal["fp16", "bf16", "fp32"] = "bf16"
    """Precision of the frozen weights and of autocast. Trainable weights stay fp32. Falls back, with a warning,
    where the device lacks the type."""

    allow_tf32: bool = True
    """Allow TF32 matrix maths on NVIDIA Ampere and newer (faster, slightly less precise fp32)."""

    dataloader_num_workers: int = 0
    """Threads that decode images in parallel: for the latent cache, and every step when `cache_vae_outputs` is off.
    0 decodes in the main thread."""

    logging_steps: int = 10
    """Read the loss back from the device (progress bar, CSV log, divergence check) every N steps."""

    debug: bool = False
    """Verbose logging and extra checks."""

    skip_gpt_cleanup: bool = False
    """Do not let the GPT captioner rewrite captions (only with `caption_model: gpt4-v`)."""

    training_attributes: dict = Field(default_factory=dict)
    """Free-form metadata kept with the run (written to `training_args.json`)."""

    start_time: float = 0.0
    """Internal: when the run started (epoch seconds)."""

    job_time: float = 0.0
    """Internal: run time so far in seconds."""

    # ============================================================================================ validation
    @field_validator("lora_training_urls")
    @classmethod
    def _urls_not_empty(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        empty = not value.strip() if isinstance(value, str) else not [v for v in value if str(v).strip()]
        if empty:
            raise ValueError("lora_training_urls is empty: give at least one URL, S3 object or local path")
        return value

    @field_validator("max_train_images")
    @classmethod
    def _max_images_positive(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"max_train_images must be >= 1, got {value}")
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
        from trainer.device import parse_device

        parse_device(value)
        return value.strip().lower()

    @field_validator("evaluation_clip_model")
    @classmethod
    def _clip_model_named(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("evaluation_clip_model is empty: give a hub id (openai/clip-vit-large-patch14) or a "
                             "local folder")
        return value.strip()

    @field_validator("evaluation_lora_scales")
    @classmethod
    def _evaluation_scales(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < s < float("inf") for s in value) or len(set(value)) != len(value):
            raise ValueError("evaluation_lora_scales must be distinct LoRA scales > 0, for example [0.8, 1.0]")
        return value

    @field_validator("evaluation_images_per_prompt")
    @classmethod
    def _images_per_prompt(cls, value: int) -> int:
        if value < 1:
            raise ValueError("evaluation_images_per_prompt must be >= 1 (images per prompt, checkpoint and scale)")
        return value

    @model_validator(mode="after")
    def _cross_field_rules(self) -> TrainingConfig:
        errors: list[str] = []

        def check(ok: bool, message: str) -> None:
            if not ok:
                errors.append(message)

        for field in ("caption_dropout", "freeze_ti_after_completion_f", "freeze_unet_before_completion_f"):
            value = getattr(self, field)
            check(0.0 <= value <= 1.0, f"{field} is a fraction and must be in [0, 1], got {value}")

        for field in (
            "unet_lr", "ti_lr", "text_encoder_lora_lr", "lora_weight_decay", "ti_weight_decay",
            "text_encoder_lora_weight_decay", "l1_penalty", "token_attention_loss_w", "cond_reg_w",
            "tok_cond_reg_w", "tok_cov_reg_w", "token_warmup_steps", "ti_lr_warmup_steps",
            "txt_encoders_lr_warmup_steps", "augment_imgs_up_to_n", "n_sample_imgs", "dataloader_num_workers",
            "checkpointing_steps",
        ):
            value = getattr(self, field)
            check(value >= 0, f"{field} must be >= 0, got {value}")
        for field in ("unet_lr_warmup_steps", "snr_gamma", "sample_imgs_lora_scale"):
            value = getattr(self, field)
            check(value is None or value >= 0, f"{field} must be >= 0 (or null), got {value}")
        for field in (
            "train_batch_size", "gradient_accumulation_steps", "lora_rank", "text_encoder_lora_rank",
            "validation_num_inference_steps", "logging_steps",
        ):
            value = getattr(self, field)
            check(value >= 1, f"{field} must be >= 1, got {value}")
        for field in ("lora_alpha_multiplier", "prodigy_d_coef", "clipseg_temperature", "validation_guidance_scale"):
            value = getattr(self, field)
            check(value > 0, f"{field} must be > 0, got {value}")
        check(
            self.unet_prodigy_growth_factor >= 1.0,
            f"unet_prodigy_growth_factor must be >= 1 (1 keeps Prodigy's step size from growing), "
            f"got {self.unet_prodigy_growth_factor}",
        )
        check(
            self.max_grad_norm is None or self.max_grad_norm > 0,
            f"max_grad_norm must be > 0 (or null to disable clipping), got {self.max_grad_norm}",
        )
        check(
            self.max_checkpoints is None or self.max_checkpoints >= 1,
            f"max_checkpoints must be >= 1 (or null to keep all), got {self.max_checkpoints}",
        )

        # Steps vs epochs: at least one, each positive. Eden writes both (it derives the epochs from the steps),
        # so both being set is allowed and max_train_steps wins unless only the epochs were given explicitly.
        check(
            self.max_train_steps is not None or self.num_train_epochs is not None,
            "set max_train_steps or num_train_epochs: both are null",
        )
        check(
            self.max_train_steps is None or self.max_train_steps >= 1,
            f"max_train_steps must be >= 1, got {self.max_train_steps}",
        )
        check(
            self.num_train_epochs is None or self.num_train_epochs >= 1,
            f"num_train_epochs must be >= 1, got {self.num_train_epochs}",
        )

        # Sizes.
        check(
            self.resolution >= SIZE_MULTIPLE and self.resolution % SIZE_MULTIPLE == 0,
            f"resolution must be a multiple of {SIZE_MULTIPLE} and at least {SIZE_MULTIPLE}, got {self.resolution}",
        )
        if self.train_img_size is not None:
            size = self.train_img_size
            check(
                len(size) in (1, 2) and all(s >= SIZE_MULTIPLE and s % SIZE_MULTIPLE == 0 for s in size),
                f"train_img_size must be [width, height] (or [side]) with multiples of {SIZE_MULTIPLE}, got {size}",
            )
        if isinstance(self.validation_img_size, list):
            size = self.validation_img_size
            check(
                len(size) == 2 and all(s >= 8 and s % 8 == 0 for s in size),
                f"validation_img_size as a list must be [width, height] with multiples of 8, got {size}",
            )
        elif self.validation_img_size is not None:
            check(
                self.validation_img_size >= 8 and self.validation_img_size % 8 == 0,
                f"validation_img_size must be a multiple of 8, got {self.validation_img_size}",
            )
        check(
            self.train_aspect_ratio is None or 0.25 <= self.train_aspect_ratio <= 4.0,
            f"train_aspect_ratio is width / height and must be in [0.25, 4], got {self.train_aspect_ratio}",
        )

        # Tokens.
        self._derive_tokens(errors)
        initialisers = [
            name for name in ("initializer_token", "initial_phrase", "initial_embedding_file") if getattr(self, name)
        ]
        check(
            len(initialisers) <= 1,
            f"set at most one of initializer_token, initial_phrase, initial_embedding_file; got {initialisers}",
        )
        if self.initializer_token is not None:
            check(
                bool(self.initializer_token.strip()) and len(self.initializer_token.split()) == 1,
                f"initializer_token must be a single word, got {self.initializer_token!r} "
                "(use initial_phrase for several words)",
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

    def _derive_tokens(self, errors: list[str]) -> None:
        explicit = self.model_fields_set
        if self.disable_ti:
            return
        if self.n_tokens < 1:
            errors.append(f"n_tokens must be >= 1 (or set disable_ti: true), got {self.n_tokens}")
            return
        if "inserting_list_tokens" in explicit:
            tokens = self.inserting_list_tokens
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

    def to_json_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def explicitly_set(self, field: str) -> bool:
        return field in self.model_fields_set
