"""Every generation mode on the real diffusers pipelines: txt2img, img2img, inpainting and both SDXL refiner modes.

The tiny models have random weights, so the properties checked are the ones the pipelines guarantee whatever the
weights: sizes, which steps each model runs, what the output keeps of the input, that the modules are the base
model's own, and that the LoRA is present in every mode but never in the refiner.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLImg2ImgPipeline
from PIL import Image
from safetensors import safe_open

from trainer.inference.bundle import LoraBundle
from trainer.inference.generator import BASE_IMAGE_REFINER_STRENGTH, GenerationRequest, Generator, check_request
from trainer.models.loading import resolve_source
from trainer.models.tiny import TINY_REFINER

SIZE = 64


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) for image in images])


def _start_image(size: int = SIZE) -> Image.Image:
    """A smooth, colourful picture: gradients and a disc."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    image = np.stack([xx * 255, yy * 255, (1 - xx) * 160 + 40], axis=-1)
    image[(xx - 0.5) ** 2 + (yy - 0.5) ** 2 < 0.06] = [230, 40, 40]
    return Image.fromarray(image.astype(np.uint8))


def _mask(size: int = SIZE) -> Image.Image:
    """White (repaint) in the middle square, black (keep) around it."""
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return mask


def _request(**overrides) -> GenerationRequest:
    values = {"prompt": "a photo of a dog", "width": SIZE, "height": SIZE, "num_inference_steps": 6, "seed": 7,
              "guidance_scale": 5.0}
    values.update(overrides)
    return GenerationRequest(**values)


@pytest.fixture(scope="module")
def sdxl(model_cache):
    generator = Generator(device="cpu", weight_type="fp32", refiner=TINY_REFINER)
    generator.load_base(resolve_source("tiny-sdxl", None, None, generator.cache_dir))
    return generator


@pytest.fixture(scope="module")
def sd15(model_cache):
    generator = Generator(device="cpu", weight_type="fp32")
    generator.load_base(resolve_source("tiny-sd15", None, None, generator.cache_dir))
    return generator


# ---------------------------------------------------------------------------------------------- one set of weights
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_mode_pipelines_are_built_from_the_base_modules(family, mode, sdxl, sd15):
    import diffusers

    generator = sdxl if family == "sdxl" else sd15
    base = generator.pipeline
    derived = generator.mode_pipeline(mode)
    prefix = "StableDiffusionXL" if family == "sdxl" else "StableDiffusion"
    assert type(derived) is getattr(diffusers, f"{prefix}{'Img2Img' if mode == 'img2img' else 'Inpaint'}Pipeline")
    names = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if family == "sdxl":
        names += ["text_encoder_2", "tokenizer_2"]
        assert derived.watermark is None, "the watermark is applied once, after the inpainting composite"
    for name in names:
        assert getattr(derived, name) is getattr(base, name), name
    assert generator.mode_pipeline("txt2img") is base


def test_the_refiner_shares_the_base_vae_and_second_text_encoder(sdxl):
    refiner = sdxl.refiner_pipeline()
    assert type(refiner) is StableDiffusionXLImg2ImgPipeline, "the refiner runs as diffusers' SDXL img2img pipeline"
    assert refiner.vae is sdxl.pipeline.vae
    assert refiner.text_encoder_2 is sdxl.pipeline.text_encoder_2
    assert refiner.unet is not sdxl.pipeline.unet and refiner.text_encoder is None
    assert refiner.config.requires_aesthetics_score
    assert sdxl.refiner_pipeline() is refiner, "loaded once"


# ------------------------------------------------------------------------------------------------------- modes
@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_txt2img_size_and_steps(family, sdxl, sd15):
    generator = sdxl if family == "sdxl" else sd15
    images = generator.generate(_request(width=96, height=64, num_outputs=2))
    assert [image.size for image in images] == [(96, 64)] * 2
    assert len(generator.last_steps.base) == 6 and generator.last_steps.refiner == []


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_img2img_at_low_strength_returns_the_input_as_the_vae_reproduces_it(family, sdxl, sd15):
    generator = sdxl if family == "sdxl" else sd15
    pipe = generator.pipeline
    start = _start_image()
    # A trained VAE encodes to latents of about unit size (after its scaling factor) with a nearly deterministic
    # posterior; the random tiny one to latents of 0.03 with a posterior std of 1, which even the last step's noise
    # would drown. Make it behave like a trained one for this test (the posterior's moments come out of quant_conv):
    # means 30x larger, log-variances -30.
    conv = pipe.vae.quant_conv
    saved = conv.weight.detach().clone(), conv.bias.detach().clone()
    latent = pipe.vae.config.latent_channels
    try:
        with torch.no_grad():
            conv.weight[:latent] *= 30
            conv.bias[:latent] *= 30
            conv.weight[latent:] = 0
            conv.bias[latent:] = -30
            encoded = pipe.vae.encode(pipe.image_processor.preprocess(start)).latent_dist.mode()
            reproduced = _pixels(pipe.image_processor.postprocess(pipe.vae.decode(encoded).sample, output_type="pil"))
        gentle = generator.generate(_request(image=start, prompt_strength=0.04, num_inference_steps=30))
        assert len(generator.last_steps.base) == 1, "int(30 x 0.04) = 1 step"
        strong = generator.generate(_request(image=start, prompt_strength=1.0))
        assert len(generator.last_steps.base) == 6
    finally:
        with torch.no_grad():
            conv.weight.copy_(saved[0])
            conv.bias.copy_(saved[1])
    assert gentle[0].size == (SIZE, SIZE)
    near = np.abs(_pixels(gentle) - reproduced).mean()
    far = np.abs(_pixels(strong) - reproduced).mean()
    assert near < 4.0 and far > 8 * near, (near, far)


@pytest.mark.parametrize("family", ["sdxl", "sd15"])
def test_inpainting_keeps_the_pixels_outside_the_mask(family, sdxl, sd15):
    generator = sdxl if family == "sdxl" else sd15
    start, mask = _start_image(), _mask()
    images = generator.generate(_request(image=start, mask=mask, prompt_strength=1.0, num_outputs=2))
    assert [image.size for image in images] == [(SIZE, SIZE)] * 2
    keep = np.asarray(mask) == 0
    difference = np.abs(_pixels(images) - _pixels([start]))
    assert difference[:, keep].max() <= 1.0, "black in the mask: the input's pixels"
    assert difference[:, ~keep].mean() > 10.0, "white in the mask: repainted"
    assert len(generator.last_steps.base) == 6


def test_expert_ensemble_runs_the_refiner_for_exactly_the_steps_after_high_noise_frac(sdxl):
    steps, fraction = 10, 0.7
    images = sdxl.generate(_request(refine="expert_ensemble_refiner", num_inference_steps=steps,
                                    high_noise_frac=fraction, num_outputs=2))
    assert [image.size for image in images] == [(SIZE, SIZE)] * 2
    # The schedule as the scheduler makes it, cut where diffusers cuts it: t >= (1 - fraction) * 1000 is the base's.
    scheduler = sdxl.pipeline.scheduler
    scheduler.set_timesteps(steps)
    schedule = [int(t) for t in scheduler.timesteps]
    cutoff = round(1000 * (1 - fraction))
    log = sdxl.last_steps
    assert log.base == [t for t in schedule if t >= cutoff]
    assert log.refiner == [t for t in schedule if t < cutoff] and log.refiner
    assert log.total == steps


def test_base_image_refiner_reworks_the_finished_image_for_refine_steps(sdxl):
    images = sdxl.generate(_request(refine="base_image_refiner", num_inference_steps=5, refine_steps=20))
    assert images[0].size == (SIZE, SIZE)
    log = sdxl.last_steps
    assert len(log.base) == 5, "the base model runs its whole schedule"
    # The refiner re-noises to diffusers' img2img default strength and runs that share of refine_steps.
    assert len(log.refiner) == int(20 * BASE_IMAGE_REFINER_STRENGTH) == 6
    assert max(log.refiner) < 1000 * BASE_IMAGE_REFINER_STRENGTH
    default = sdxl.generate(_request(refine="base_image_refiner", num_inference_steps=10))
    assert default[0].size == (SIZE, SIZE) and len(sdxl.last_steps.refiner) == 3, "refine_steps defaults to steps"


@pytest.mark.parametrize("mode", ["img2img", "inpaint"])
def test_refiners_after_img2img_and_inpainting(sdxl, mode):
    start, mask = _start_image(), _mask() if mode == "inpaint" else None
    images = sdxl.generate(_request(image=start, mask=mask, refine="expert_ensemble_refiner", prompt_strength=0.9,
                                    high_noise_frac=0.8, num_inference_steps=10))
    assert images[0].size == (SIZE, SIZE) and sdxl.last_steps.refiner
    if mask is not None:
        keep = np.asarray(mask) == 0
        assert np.abs(_pixels(images) - _pixels([start]))[:, keep].max() <= 1.0


# ---------------------------------------------------------------------------------------- LoRA in every mode
@pytest.mark.parametrize("mode", ["img2img", "inpaint", "expert_ensemble_refiner", "base_image_refiner"])
def test_the_lora_acts_in_every_mode_and_switching_back_restores_the_base(mode, trained_sdxl, tmp_path, model_cache):
    generator = Generator(device="cpu", weight_type="fp32", refiner=TINY_REFINER)
    bundle = LoraBundle.open(trained_sdxl["result"].zip_path, tmp_path)
    generator.load_base(bundle.base_source(tmp_path))
    if mode in ("img2img", "inpaint"):
        request = _request(image=_start_image(), mask=_mask() if mode == "inpaint" else None, prompt_strength=0.9)
    else:
        request = _request(refine=mode, refine_steps=10)
    base = _pixels(generator.generate(request))
    generator.activate(bundle)
    with_lora = _pixels(generator.generate(request))
    generator.deactivate()
    restored = _pixels(generator.generate(request))
    assert np.abs(with_lora - base).mean() > 0.5, "the LoRA changes the output"
    np.testing.assert_allclose(restored, base, atol=1.0)


def test_the_refiner_sees_neither_the_lora_nor_the_tokens(trained_sdxl, tmp_path, model_cache):
    generator = Generator(device="cpu", weight_type="fp32", refiner=TINY_REFINER)
    bundle = LoraBundle.open(trained_sdxl["result"].zip_path, tmp_path)
    generator.load_base(bundle.base_source(tmp_path))
    refiner = generator.refiner_pipeline()
    seen = []
    original = refiner.encode_prompt

    def spy(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result[0].detach().clone())  # the prompt embeddings the refiner's UNet attends to
        return result

    refiner.encode_prompt = spy
    request = _request(prompt="a photo of a dog", refine="base_image_refiner", refine_steps=4)
    generator.generate(request)
    generator.activate(bundle)
    with safe_open(str(bundle.lora), framework="pt") as handle:
        names = handle.keys()
    assert any(name.startswith("lora_te2_") for name in names), "the bundle has a CLIP-G LoRA"
    generator.generate(request)
    base_embeds, lora_embeds = seen
    torch.testing.assert_close(lora_embeds, base_embeds, rtol=0, atol=0)

    generator.generate(_request(prompt="a photo of TOK on a beach", refine="base_image_refiner", refine_steps=4))
    assert generator.last_steps.refiner_prompt == "a photo of on a beach"
    tokens = set(bundle.tokens)
    assert tokens and not tokens & set(refiner.tokenizer_2.get_vocab()), "the refiner's own tokenizer"
    assert tokens <= set(generator.pipeline.tokenizer_2.get_vocab()), "while the base model has them"


# --------------------------------------------------------------------------------------------------- refusals
def test_refine_is_refused_on_sd15(sd15):
    with pytest.raises(ValueError, match="refine: expert_ensemble_refiner needs an SDXL base model"):
        sd15.generate(_request(refine="expert_ensemble_refiner"))
    with pytest.raises(ValueError, match="the SDXL refiner works only on an SDXL base model"):
        sd15.refiner_pipeline()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mask": Image.new("L", (SIZE, SIZE))}, "mask: inpainting needs the image to repaint too"),
        ({"image": Image.new("RGB", (SIZE, SIZE)), "prompt_strength": 0.01, "num_inference_steps": 30},
         r"prompt_strength: 0.01 of 30 num_inference_steps leaves no denoising step"),
        ({"refine": "base_image_refiner", "refine_steps": 3}, "refine_steps: base_image_refiner runs 0.3 of its 3"),
        ({"refine": "expert_ensemble_refiner", "high_noise_frac": 1.0}, "high_noise_frac: must be between 0 and 1"),
        ({"refine": "expert_ensemble_refiner", "image": Image.new("RGB", (SIZE, SIZE)), "prompt_strength": 0.15,
          "num_inference_steps": 30},
         r"prompt_strength: 0.15 starts below the refiner's share"),
        ({"refine": "upscale"}, "refine must be one of"),
    ],
)
def test_impossible_combinations_name_their_inputs(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_request(_request(**overrides), "sdxl")


def test_an_expert_split_that_leaves_a_model_no_step_is_refused(sdxl):
    with pytest.raises(ValueError, match=r"high_noise_frac: 0.02 of 4 steps gives the base model 0 and the refiner 4"):
        sdxl.generate(_request(refine="expert_ensemble_refiner", high_noise_frac=0.02, num_inference_steps=4))
