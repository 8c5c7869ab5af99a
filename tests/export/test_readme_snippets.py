"""Every python block of the README and of the zip's README runs, from a freshly unpacked zip, on the tiny models.

The blocks run as written except for these replacements, which the README states too:
- the base model's id (the hub ids in the README; ``tiny-sd15`` / ``tiny-sdxl`` in a tiny run's zip README) becomes
  the tiny model's folder;
- ``"cuda"`` becomes ``"cpu"`` and ``torch.float16`` becomes ``torch.float32`` (this machine has no GPU);
- the README's example run name ``me`` in file names (``"me_lora.safetensors"``) becomes the run's name.
They run with the unpacked zip as the working directory; the pipeline they build must then be the trained model.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT
from tests.export.test_roundtrip import _fresh_output, _relative_error, _trained_output
from tests.helpers import make_concept_images, prepared_dataset, tiny_config
from trainer.models.loading import model_cache_dir
from trainer.models.tiny import tiny_model_dir

# Every snippet runs against a trained tiny run.
pytestmark = pytest.mark.slow

README_BASE_MODELS = {"sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
                      "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
TINY = {"sdxl": "tiny-sdxl", "sd15": "tiny-sd15"}


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def _unpack(zip_path: Path, target: Path) -> Path:
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(target)
    return target


def _run(block: str, folder: Path, version: str, name: str, monkeypatch) -> dict:
    tiny_folder = str(tiny_model_dir(TINY[version], model_cache_dir()))
    code = block
    for model_id in (README_BASE_MODELS[version], TINY[version]):
        code = code.replace(f'"{model_id}"', f'"{tiny_folder}"')
    code = code.replace('"cuda"', '"cpu"').replace("torch.float16", "torch.float32").replace('"me_', f'"{name}_')
    assert tiny_folder in code, "the block must load the base model"
    monkeypatch.chdir(folder)
    namespace: dict = {"__name__": "__readme__"}
    exec(compile(code, f"{folder.name}/README.md", "exec"), namespace)
    assert isinstance(namespace.get("image"), Image.Image)
    return namespace


def _version(block: str) -> str:
    return "sdxl" if "StableDiffusionXLPipeline" in block else "sd15"


def _assert_trained_model(trained: dict, pipe, tolerance: float) -> None:
    session = trained["session"]
    tokens = "".join(session.run.tokens)
    prompt = f"a photo of {tokens} on a table"
    trained_embeds, trained_out = _trained_output(session, prompt)
    fresh_embeds, fresh_out = _fresh_output(session, pipe, prompt)
    assert _relative_error(fresh_embeds, trained_embeds) < 1e-5
    assert _relative_error(fresh_out, trained_out) < tolerance


@pytest.fixture(params=["sdxl", "sd15"])
def trained(request):
    fixture = {"sdxl": "trained_sdxl", "sd15": "trained_sd15"}[request.param]
    # The SDXL run exports fp32 (exact); the SD1.5 run the default fp16 LoRA.
    return request.param, request.getfixturevalue(fixture), {"sdxl": 1e-4, "sd15": 5e-3}[request.param]


def test_the_zip_readme_snippet_gives_the_trained_model(trained, tmp_path, monkeypatch):
    version, run, tolerance = trained
    folder = _unpack(run["result"].zip_path, tmp_path / "zip")
    blocks = python_blocks((folder / "README.md").read_text(encoding="utf-8"))
    assert len(blocks) == 1
    namespace = _run(blocks[0], folder, version, run["result"].run.name, monkeypatch)
    assert (folder / "sample.png").is_file()
    _assert_trained_model(run, namespace["pipe"], tolerance)


def test_every_repo_readme_snippet_gives_the_trained_model(request, tmp_path, monkeypatch):
    blocks = python_blocks((REPO_ROOT / "README.md").read_text(encoding="utf-8"))
    assert {_version(b) for b in blocks} == {"sdxl", "sd15"}
    for index, block in enumerate(blocks):
        version = _version(block)
        run = request.getfixturevalue({"sdxl": "trained_sdxl", "sd15": "trained_sd15"}[version])
        folder = _unpack(run["result"].zip_path, tmp_path / f"zip-{index}")
        namespace = _run(block, folder, version, run["result"].run.name, monkeypatch)
        _assert_trained_model(run, namespace["pipe"], {"sdxl": 1e-4, "sd15": 5e-3}[version])


@pytest.fixture(scope="module", params=["dora", "full_unet"])
def variant_zip(request, tmp_path_factory, model_cache):
    from trainer.training import loop
    from trainer.training.session import setup

    root = tmp_path_factory.mktemp(f"readme-{request.param}")
    images = make_concept_images(root / "images", n=2)
    overrides = {"use_dora": True, "unet_lr": 2e-2} if request.param == "dora" else {"is_lora": False}
    config = tiny_config(images, root / "runs", model="tiny-sd15", max_train_steps=3, save_dtype="fp32",
                         **overrides)
    session, _ = setup(config, dataset=prepared_dataset(images, root / "prepared"))
    return request.param, {"session": session, "result": loop.run(session)}


def test_dora_and_full_unet_zip_snippets_run(variant_zip, tmp_path, monkeypatch):
    kind, run = variant_zip
    folder = _unpack(run["result"].zip_path, tmp_path / "zip")
    readme = (folder / "README.md").read_text(encoding="utf-8")
    (block,) = python_blocks(readme)
    namespace = _run(block, folder, "sd15", run["result"].run.name, monkeypatch)
    if kind == "dora":
        # diffusers drops the magnitudes: the README says so instead of promising the trained model.
        assert "drops its `dora_scale` tensors" in readme
    else:
        assert 'UNet2DConditionModel.from_pretrained("unet"' in block
        _assert_trained_model(run, namespace["pipe"], 1e-4)
