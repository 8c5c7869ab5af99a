"""Our zips, unpacked, through Eden's own loading rules (``tests/eden_reference.py``): the trigger text, the token
vectors and the LoRA reproduce the trained model, for SDXL, SD1.5 and runs without tokens (``disable_ti``)."""

from __future__ import annotations

import json
import zipfile

import pytest
import torch
from safetensors.torch import load_file

from tests import eden_reference as eden
from tests.helpers import fresh_pipeline
from trainer.export.eden import eden_trigger_text
from trainer.export.files import EMBEDDINGS_SUFFIX, INVOKEAI_DIR
from trainer.training.outputs import sample_prompt_list


@pytest.fixture(scope="module")
def trained_without_tokens(tmp_path_factory, model_cache):
    """SD1.5, ``disable_ti``: only the UNet LoRA trains and the trigger stays a plain word."""
    from tests.helpers import make_concept_images, prepared_dataset, tiny_config
    from trainer.training import loop
    from trainer.training.session import setup

    root = tmp_path_factory.mktemp("no-ti-run")
    images = make_concept_images(root / "images", n=2)
    config = tiny_config(images, root / "runs", model="tiny-sd15", disable_ti=True, max_train_steps=4,
                         unet_lr=2e-2, save_dtype="fp32")
    session, _ = setup(config, dataset=prepared_dataset(images, root / "prepared"))
    return {"session": session, "result": loop.run(session)}


def _unzip(result, folder):
    with zipfile.ZipFile(result.zip_path) as archive:
        archive.extractall(folder)
    return folder


def exported_vectors(folder, version) -> list[torch.Tensor]:
    """The token vectors our exporter wrote, one tensor per text encoder, whatever keys it uses for them."""
    data = load_file(str(next(folder.glob(f"*{EMBEDDINGS_SUFFIX}"))))
    keys = ("clip_l", "clip_g") if version == "sdxl" else tuple(data)
    return [data[key] for key in keys]


def _unet_call(unet, prompt_embeds, pooled):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=generator)
    kwargs = {}
    if pooled is not None:
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), prompt_embeds, **kwargs).sample


def _trained(session, prompt):
    session.models.unet.eval()
    with torch.no_grad():
        embeds, pooled = session.text.encode_ids(session.text.token_ids([prompt]))
    return embeds, _unet_call(session.models.unet, embeds, pooled)


def _fresh(session, pipe, prompt):
    with torch.no_grad():
        if session.models.is_sdxl:
            embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                                      do_classifier_free_guidance=False)
        else:
            embeds, _ = pipe.encode_prompt(prompt, device="cpu", num_images_per_prompt=1,
                                           do_classifier_free_guidance=False)
            pooled = None
    return embeds, _unet_call(pipe.unet, embeds, pooled)


def _relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


def _load_the_eden_way(session, folder, prompt):
    """Eden's three steps on an unpacked folder; returns the prepared prompt, its text embedding and UNet output."""
    pipe = fresh_pipeline(session)
    eden_prompt = eden.prepare_prompt_for_lora(prompt, folder)
    tokens = eden.load_ti_embeddings(pipe, folder)
    lora = eden.lora_file(folder)
    pipe.load_lora_weights(str(lora.parent), weight_name=lora.name)
    embeds, out = _fresh(session, pipe, eden_prompt)
    return eden_prompt, tokens, embeds, out, pipe


def test_special_params_and_training_args_carry_edens_keys(trained_sdxl, trained_without_tokens, tmp_path):
    sdxl = _unzip(trained_sdxl["result"], tmp_path / "sdxl")
    # special_params.json is Eden's token map: the trigger and the string it becomes in prompts.
    assert json.loads((sdxl / "special_params.json").read_text()) == {"TOK": "<s0><s1>"}
    args = json.loads((sdxl / "training_args.json").read_text())
    attributes = args["training_attributes"]
    # What Eden's pre-processing records and its prompt preparation reads.
    assert attributes["trigger_text"] == "TOK, "
    assert attributes["n_training_imgs"] == 4 and len(attributes["captions"]) == 4
    assert all("TOK" in caption for caption in attributes["captions"])
    assert {"segmentation_prompt", "gpt_description"} <= set(attributes)
    # Eden's main.py records the sample grid's prompts; its cog output hands them out as grid_prompts.
    session = trained_sdxl["session"]
    assert attributes["validation_prompts"] == [p for p, _ in sample_prompt_list(session.config)]
    assert len(attributes["validation_prompts"]) == session.config.n_sample_imgs
    eden_folder = eden.write_eden_output(session, tmp_path / "eden")
    eden_keys = set(json.loads((eden_folder / "training_args.json").read_text())["training_attributes"])
    assert eden_keys <= set(attributes), f"keys Eden writes that we lack: {eden_keys - set(attributes)}"
    assert isinstance(args["name"], str) and args["name"] and args["concept_mode"] == "object"
    assert args["sd_model_version"] == "sdxl" and args["inserting_list_tokens"] == ["<s0>", "<s1>"]

    plain = _unzip(trained_without_tokens["result"], tmp_path / "plain")
    assert json.loads((plain / "special_params.json").read_text()) == {"TOK": "TOK"}
    assert json.loads((plain / "training_args.json").read_text())["training_attributes"]["trigger_text"] == "TOK, "


def test_trigger_text_follows_edens_caption_rule():
    assert eden_trigger_text("TOK", "object") == "TOK, "
    assert eden_trigger_text("TOK", "face") == "TOK, "
    assert eden_trigger_text("TOK", "style") == "in the style of TOK, "
    assert eden_trigger_text("TOK", "object", "a photo of TOK") == "a photo of TOK"  # Eden: the prefix itself
    assert eden_trigger_text("TOK", "object", "a photo of") == "TOK, a photo of"


def test_our_sdxl_zip_loads_through_edens_rules(trained_sdxl, tmp_path):
    session = trained_sdxl["session"]
    folder = _unzip(trained_sdxl["result"], tmp_path / "zip")
    eden_prompt, tokens, embeds, out, pipe = _load_the_eden_way(session, folder, "a photo of TOK on a table")

    assert eden_prompt == "<s0><s1>, a photo of <s0><s1> on a table"
    assert tokens == ["<s0>", "<s1>"]
    for encoder, vectors in zip((pipe.text_encoder, pipe.text_encoder_2), exported_vectors(folder, "sdxl"),
                                strict=True):
        assert torch.equal(encoder.get_input_embeddings().weight[-2:], vectors)
    trained_embeds, trained_out = _trained(session, eden_prompt)
    assert _relative_error(embeds, trained_embeds) < 1e-5
    assert _relative_error(out, trained_out) < 1e-4  # saved in fp32: exact up to float reassociation
    _, base_out = _fresh(session, fresh_pipeline(session), "a photo of a table")
    assert _relative_error(base_out, trained_out) > 1e-3


def test_our_sd15_zip_loads_through_edens_rules(trained_sd15, tmp_path):
    session = trained_sd15["session"]
    folder = _unzip(trained_sd15["result"], tmp_path / "zip")
    # The InvokeAI copy sits one folder down: Eden lists the top level only, and finds the clip_l file there.
    name = f"{trained_sd15['result'].run.name}{EMBEDDINGS_SUFFIX}"
    assert (folder / INVOKEAI_DIR / name).is_file()
    assert eden.embeddings_file(folder) == folder / name
    assert set(load_file(str(eden.embeddings_file(folder)))) == {"clip_l"}
    eden_prompt, tokens, embeds, out, pipe = _load_the_eden_way(session, folder, "a cat on a sofa")

    assert eden_prompt == "in the style of <s0><s1>, a cat on a sofa"  # style mode
    assert tokens == ["<s0>", "<s1>"]
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[-2:], exported_vectors(folder, "sd15")[0])
    trained_embeds, trained_out = _trained(session, eden_prompt)
    assert _relative_error(embeds, trained_embeds) < 1e-5
    assert _relative_error(out, trained_out) < 5e-3  # LoRA in fp16


def test_our_zip_without_tokens_loads_through_edens_rules(trained_without_tokens, tmp_path):
    session = trained_without_tokens["session"]
    folder = _unzip(trained_without_tokens["result"], tmp_path / "zip")
    # Eden's load_ti_embeddings needs a file: ours holds zero vectors, so Eden adds no token.
    assert load_file(str(eden.embeddings_file(folder)))["clip_l"].shape == (0, 32)
    assert not (folder / INVOKEAI_DIR).exists(), "no InvokeAI copy of zero vectors"
    eden_prompt, tokens, embeds, out, pipe = _load_the_eden_way(session, folder, "a photo of TOK")

    assert eden_prompt == "TOK, a photo of TOK" and tokens == []
    assert len(pipe.tokenizer) == 49408, "no token may be added"
    trained_embeds, trained_out = _trained(session, eden_prompt)
    assert _relative_error(embeds, trained_embeds) < 1e-6
    assert _relative_error(out, trained_out) < 1e-4
    _, base_out = _fresh(session, fresh_pipeline(session), eden_prompt)
    assert _relative_error(base_out, trained_out) > 1e-4, "the LoRA must have trained"


@pytest.mark.parametrize("run", ["trained_sdxl", "trained_without_tokens"])
def test_the_zip_readme_names_every_trained_file(run, request, tmp_path):
    """The zip's README lists each safetensors file it carries, the empty embeddings file of a run without tokens
    included, so nobody has to guess what a file is for."""
    folder = _unzip(request.getfixturevalue(run)["result"], tmp_path / "zip")
    readme = (folder / "README.md").read_text()
    listed = [line for line in readme.splitlines() if line.startswith("| `")]
    for path in folder.rglob("*.safetensors"):
        name = path.relative_to(folder).as_posix()
        assert any(line.startswith(f"| `{name}`") for line in listed), f"{name} is not described in README.md"

