"""The predictor core: bundles in, images out, nothing left behind when switching."""

from __future__ import annotations

import zipfile

import numpy as np
import pytest

from trainer.inference.bundle import LoraBundle
from trainer.inference.generator import GenerationRequest, Generator


def _request(**overrides):
    values = {"prompt": "a photo of TOK", "width": 64, "height": 64, "num_inference_steps": 3, "seed": 3,
              "guidance_scale": 5.0}
    values.update(overrides)
    return GenerationRequest(**values)


def _pixels(images):
    return np.stack([np.asarray(image, dtype=np.float32) for image in images])


@pytest.fixture
def generator(model_cache):
    return Generator(device="cpu", weight_type="fp32")


def test_bundle_zip_opens_and_names_its_base_model(trained_sdxl, tmp_path):
    bundle = LoraBundle.open(trained_sdxl["result"].zip_path, tmp_path)
    assert bundle.version == "sdxl" and bundle.trigger == "TOK" and bundle.token_string == "<s0><s1>"
    assert bundle.tokens == ["<s0>", "<s1>"]
    assert bundle.base_source(tmp_path).location == "tiny-sdxl"
    assert bundle.lora is not None and bundle.embeddings is not None and bundle.unet_dir is None


def test_generation_uses_the_bundle_and_switching_restores_the_base(generator, trained_sdxl, tmp_path):
    bundle = LoraBundle.open(trained_sdxl["result"].zip_path, tmp_path)
    generator.load_base(bundle.base_source(tmp_path))
    base = _pixels(generator.generate(_request(prompt="a photo of a dog")))

    generator.activate(bundle)
    assert generator.prompt_text("a photo of TOK in tokyo") == "a photo of <s0><s1> in tokyo"
    with_lora = _pixels(generator.generate(_request(prompt="a photo of a dog")))
    assert np.abs(with_lora - base).mean() > 0.5, "the LoRA must change the output"
    images = generator.generate(_request(num_outputs=2))
    assert len(images) == 2 and images[0].size == (64, 64)

    generator.deactivate()
    restored = _pixels(generator.generate(_request(prompt="a photo of a dog")))
    np.testing.assert_allclose(restored, base, atol=1.0)
    assert "<s0>" not in generator.pipeline.tokenizer.get_vocab()
    assert "<s0>" not in generator.pipeline.tokenizer_2.get_vocab()
    assert generator.pipeline.text_encoder.get_input_embeddings().weight.shape[0] == 49408


def test_switching_between_bundles(generator, trained_sdxl, tmp_path):
    first = LoraBundle.open(trained_sdxl["result"].zip_path, tmp_path / "a")
    second = LoraBundle.open(trained_sdxl["result"].final_checkpoint)
    generator.activate(first)
    a = _pixels(generator.generate(_request()))
    generator.activate(second)
    b = _pixels(generator.generate(_request()))
    # Same trained weights in both bundles: switching reloads cleanly and reproduces the image.
    np.testing.assert_allclose(a, b, atol=1.0)


def test_bad_requests_and_bundles(generator, tmp_path):
    with pytest.raises(RuntimeError, match="no model is loaded"):
        generator.generate(_request())
    not_zip = tmp_path / "weights.zip"
    not_zip.write_text("hello")
    with pytest.raises(ValueError, match="is not a zip file"):
        LoraBundle.open(not_zip)
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as archive:
        archive.writestr("notes.txt", "x")
    with pytest.raises(ValueError, match="is not a trained LoRA bundle"):
        LoraBundle.open(empty, tmp_path / "x")
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../escape.txt", "x")
    with pytest.raises(ValueError, match="is not a trained LoRA bundle"):  # the escaping member was skipped
        LoraBundle.open(evil, tmp_path / "y")
    assert not (tmp_path / "escape.txt").exists()


def test_dora_bundles_apply_exactly_and_restore_the_base(generator, tmp_path, model_cache):
    import torch

    from tests.helpers import make_concept_images, prepared_dataset, tiny_config
    from trainer.training import loop
    from trainer.training.session import setup

    images = make_concept_images(tmp_path / "images", n=2)
    config = tiny_config(images, tmp_path / "runs", model="tiny-sd15", use_dora=True, unet_lr=2e-2,
                         max_train_steps=4, save_dtype="fp32")
    session, _ = setup(config, dataset=prepared_dataset(images, tmp_path))
    result = loop.run(session, make_zip=False)
    bundle = LoraBundle.open(result.final_checkpoint)

    latents, steps = torch.randn(1, 4, 8, 8), torch.tensor([400])
    text = torch.randn(1, 77, 32)
    session.models.unet.eval()
    with torch.no_grad():
        trained = session.models.unet(latents, steps, text).sample
    generator.load_base(bundle.base_source(tmp_path))
    with torch.no_grad():
        base = generator.pipeline.unet(latents, steps, text).sample
    generator.activate(bundle)
    generator.generate(_request(width=64, height=64))  # merges at lora_scale 1.0
    with torch.no_grad():
        merged = generator.pipeline.unet(latents, steps, text).sample
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-5)
    generator.deactivate()
    with torch.no_grad():
        restored = generator.pipeline.unet(latents, steps, text).sample
    assert torch.equal(restored, base)


@pytest.mark.parametrize("layout", ["current", "emb_params"])
def test_sd15_token_vectors_load_from_current_and_earlier_zips(generator, trained_sd15, tmp_path, layout):
    """Current zips hold ``clip_l`` at the top level (and InvokeAI's copy in ``invokeai/``, which the predictor
    ignores); zips made between issue 10 and that copy held ``emb_params`` at the top level."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from trainer.export.files import EMBEDDINGS_SUFFIX, INVOKEAI_DIR

    result = trained_sd15["result"]
    folder = tmp_path / "bundle"
    with zipfile.ZipFile(result.zip_path) as archive:
        archive.extractall(folder)
    path = folder / f"{result.run.name}{EMBEDDINGS_SUFFIX}"
    assert (folder / INVOKEAI_DIR / path.name).is_file()
    if layout == "emb_params":
        save_file({"emb_params": load_file(str(path))["clip_l"]}, str(path))
        shutil.rmtree(folder / INVOKEAI_DIR)
    bundle = LoraBundle.open(folder)
    generator.activate(bundle)
    (trained,) = trained_sd15["session"].tokens.rows().values()
    ids = generator.pipeline.tokenizer.convert_tokens_to_ids(bundle.tokens)
    assert bundle.tokens == ["<s0>", "<s1>"]
    assert torch.equal(generator.pipeline.text_encoder.get_input_embeddings().weight[ids], trained)
