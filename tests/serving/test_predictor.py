"""predict.py in-process: LoRAs by URL (cached), COG_WEIGHTS as a local SD1.5 zip, switching back to the base."""

from __future__ import annotations

import inspect
import shutil

import numpy as np
import pytest
from PIL import Image

import predict
from trainer.inference import remote
from trainer.inference.service import PredictionInputs
from trainer.serving.cog_client import FileServer
from trainer.serving.common import ENV_ALLOW_LOCAL

SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 11, "output_format": "png"}


@pytest.fixture(scope="module")
def served_loras(trained_sdxl, tmp_path_factory):
    """The session's trained zip (as `python -m trainer` writes it) served over http, plus a file that is not one."""
    folder = tmp_path_factory.mktemp("served-loras")
    shutil.copy(trained_sdxl["result"].zip_path, folder / "sdxl.zip")
    (folder / "notes.zip").write_text("not a zip")
    with FileServer(folder) as server:
        yield server


@pytest.fixture(scope="module")
def base_predictor(tmp_path_factory, model_cache):
    """A predictor started without weights: the default SDXL base (here the tiny one, set by environment)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("TRAINER_SDXL_MODEL", "tiny-sdxl")
    patch.setenv("TRAINER_DEVICE", "cpu")
    patch.setenv("TRAINER_PREDICT_DIR", str(tmp_path_factory.mktemp("predict")))
    patch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)  # keep pytest's logging
    predictor = predict.Predictor()
    predictor.setup(weights=None)
    yield predictor
    patch.undo()


def _pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB"), dtype=np.float32) for p in paths])


def test_switching_loras_restores_the_base_model(base_predictor, served_loras, monkeypatch):
    downloads = []
    real_download = remote.download
    monkeypatch.setattr(remote, "download", lambda url, target, **kw: downloads.append(url) or
                        real_download(url, target, **kw))
    sdxl_url = served_loras.url("sdxl.zip")

    base = _pixels(base_predictor.run(prompt="a photo of a dog", **SMALL))
    with_lora = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=sdxl_url, **SMALL))
    assert np.abs(with_lora - base).mean() > 0.5, "the LoRA must change the image"
    again = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=sdxl_url, **SMALL))
    restored = _pixels(base_predictor.run(prompt="a photo of a dog", **SMALL))

    np.testing.assert_allclose(again, with_lora, atol=1.0)
    np.testing.assert_allclose(restored, base, atol=1.0)
    pipeline = base_predictor.service.generator.pipeline
    assert "<s0>" not in pipeline.tokenizer.get_vocab() and "<s0>" not in pipeline.tokenizer_2.get_vocab()
    assert downloads == [sdxl_url], "each URL is downloaded once"


def test_outputs_formats_and_count(base_predictor, served_loras):
    paths = base_predictor.run(prompt="TOK", lora_url=served_loras.url("sdxl.zip"), num_outputs=2,
                               **{**SMALL, "output_format": "webp"})
    assert [p.suffix for p in paths] == [".webp"] * 2 and all(p.is_file() for p in paths)
    jpg = base_predictor.run(prompt="TOK", **{**SMALL, "output_format": "jpg"})
    assert Image.open(jpg[0]).format == "JPEG"
    assert not paths[0].exists(), "a request's files are removed when the next one writes its own"


def test_local_lora_paths_need_the_operator_flag(base_predictor, trained_sdxl, monkeypatch):
    zip_path = str(trained_sdxl["result"].zip_path)
    monkeypatch.delenv(ENV_ALLOW_LOCAL, raising=False)
    with pytest.raises(ValueError, match="local paths are not accepted here"):
        base_predictor.run(prompt="TOK", lora_url=zip_path, **SMALL)
    monkeypatch.setenv(ENV_ALLOW_LOCAL, "1")
    assert base_predictor.run(prompt="TOK", lora_url=zip_path, **SMALL)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"prompt": ""}, "prompt: String should have at least 1 character"),
        ({"width": 70}, r"width: must be a multiple of 8 \(got 70\)"),
        ({"num_outputs": 9}, "num_outputs: Input should be less than or equal to 4"),
        ({"scheduler": "euler"}, "scheduler: Input should be 'DDIM'"),
        ({"output_format": "gif"}, "output_format: Input should be 'webp', 'png' or 'jpg'"),
        ({"lora_url": "ftp://host/x.zip"}, "use an http\\(s\\):// URL or an s3:// URI"),
    ],
)
def test_bad_requests_say_what_is_wrong(base_predictor, given, message):
    with pytest.raises(ValueError, match=message):
        base_predictor.run(**{"prompt": "TOK", **SMALL, **given})


def test_a_url_that_is_not_a_trained_zip_is_refused_and_not_cached(base_predictor, served_loras):
    url = served_loras.url("notes.zip")
    with pytest.raises(ValueError, match=r"notes.zip\): weights.zip is not a zip file"):
        base_predictor.run(prompt="TOK", lora_url=url, **SMALL)
    assert not (base_predictor.service.store.root / "urls" / remote._digest(url)).exists()


def test_weights_at_setup_from_a_local_zip(trained_sd15, tmp_path, monkeypatch, model_cache):
    """COG_WEIGHTS may be a local path (the operator sets it); TOK becomes the trained tokens."""
    monkeypatch.setenv("TRAINER_DEVICE", "cpu")
    monkeypatch.setenv("TRAINER_PREDICT_DIR", str(tmp_path))
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=str(trained_sd15["result"].zip_path))
    generator = predictor.service.generator
    assert generator.version == "sd15" and generator.active is not None
    assert generator.prompt_text("in the style of TOK") == "in the style of <s0><s1>"
    assert len(predictor.run(prompt="in the style of TOK", **SMALL)) == 1


def test_predict_signature_matches_the_validation():
    """predict.py's schema (defaults, bounds, choices) is what PredictionInputs enforces."""
    parameters = inspect.signature(predict.Predictor.run).parameters
    fields = PredictionInputs.model_fields
    assert [name for name in parameters if name != "self"] == list(fields)
    for name, field in fields.items():
        declared = parameters[name].default
        if name == "prompt":
            assert declared.default is None and field.is_required()
            continue
        assert declared.default == field.default, name
        bounds = {type(m).__name__: m for m in field.metadata}
        assert declared.ge == (bounds["Ge"].ge if "Ge" in bounds else None), name
        assert declared.le == (bounds["Le"].le if "Le" in bounds else None), name
        literal = getattr(field.annotation, "__args__", None)
        if declared.choices is not None:
            assert tuple(declared.choices) == literal, name


@pytest.fixture(scope="module")
def served_eden(trained_sdxl, tmp_path_factory):
    """The same trained weights as Eden's trainer delivers them (tests/eden_reference.py), served over http."""
    from tests.eden_reference import eden_outputs

    outputs = eden_outputs(trained_sdxl["session"], tmp_path_factory.mktemp("eden"))
    with FileServer(outputs["tar"].parent.parent) as server:
        yield {"server": server, **outputs}


def test_edens_tar_zip_and_folder_give_the_images_of_our_zip(base_predictor, served_loras, served_eden,
                                                            monkeypatch):
    ours = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=served_loras.url("sdxl.zip"), **SMALL))
    server, root = served_eden["server"], served_eden["tar"].parent.parent
    for form in ("tar", "zip"):
        url = server.url(served_eden[form].relative_to(root))
        edens = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL))
        np.testing.assert_allclose(edens, ours, atol=1.0, err_msg=form)
        assert base_predictor.service.generator.active.layout == "eden"

    folder = str(served_eden["folder"])
    monkeypatch.delenv(ENV_ALLOW_LOCAL, raising=False)
    with pytest.raises(ValueError, match="local paths are not accepted here"):
        base_predictor.run(prompt="a photo of TOK", lora_url=folder, **SMALL)
    monkeypatch.setenv(ENV_ALLOW_LOCAL, "1")
    edens = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=folder, **SMALL))
    np.testing.assert_allclose(edens, ours, atol=1.0)


def test_edens_tar_as_weights_at_setup(base_predictor, served_loras, served_eden, tmp_path, monkeypatch, model_cache):
    """COG_WEIGHTS may name Eden's tar (here a local file, as the operator may set it)."""
    ours = _pixels(base_predictor.run(prompt="a photo of TOK", lora_url=served_loras.url("sdxl.zip"), **SMALL))
    monkeypatch.setenv("TRAINER_DEVICE", "cpu")
    monkeypatch.setenv("TRAINER_PREDICT_DIR", str(tmp_path))
    monkeypatch.setattr("trainer.utils.logs.setup_logging", lambda debug=False: None)
    predictor = predict.Predictor()
    predictor.setup(weights=str(served_eden["tar"]))
    generator = predictor.service.generator
    assert generator.version == "sdxl" and generator.active.layout == "eden"
    assert generator.prompt_text("a photo of TOK") == "a photo of <s0><s1>"
    np.testing.assert_allclose(_pixels(predictor.run(prompt="a photo of TOK", **SMALL)), ours, atol=1.0)
