"""Hub ids in requests, end to end: train.py's inputs (training_args) and a LoRA zip's training_args.json in the
predictor, against the fake hub on 127.0.0.1 (tests/models/fake_hub.py).

Each test turns offline mode off for itself only and lets downloads reach the fake hub's port (and, where images or
zips are fetched, the file server's) with TRAINER_ALLOW_PRIVATE_HOSTS.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

import train as train_module
from tests.models.fake_hub import FakeHub
from tests.serving.conftest import TINY_TRAINING_ARGS, server_env, start_predictor, tiny_inputs
from trainer.models.hub import ENV_ALLOWED_HUB_MODELS, REQUESTED_DIR, pipeline_files
from trainer.models.loading import ENV_MAX_MODEL_BYTES
from trainer.models.tiny import tiny_model_dir
from trainer.serving.train_job import TrainingJob, parse_training_request
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS
from trainer.utils.env import ENV_ALLOW_LOCAL

REPO = "testorg/tiny-sdxl"
SMALL = {"width": 64, "height": 64, "num_inference_steps": 2, "seed": 11, "output_format": "png"}


def tree(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture
def cache(tmp_path, model_cache, monkeypatch) -> Path:
    """A model cache of this test's own (so that 'nothing new in it' can be checked), sharing the built tiny models."""
    folder = tmp_path / "model-cache"
    folder.mkdir()
    (folder / "tiny").symlink_to(model_cache / "tiny", target_is_directory=True)
    monkeypatch.setenv("TRAINER_MODEL_CACHE", str(folder))
    return folder


@pytest.fixture
def hub(monkeypatch, model_cache, file_server):
    server = FakeHub()
    server.add_folder(REPO, tiny_model_dir("tiny-sdxl", model_cache), {"sd_xl_base_1.0.safetensors": 7 << 30})
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.delenv(ENV_ALLOW_LOCAL, raising=False)
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.port} {file_server.address}")
    yield server
    server.close()


def _request(file_server, images_zip, inputs: dict | None = None, **training_args):
    args = {**TINY_TRAINING_ARGS, **training_args}
    inputs = tiny_inputs(file_server.url(images_zip.name), training_args=json.dumps(args), **(inputs or {}))
    return parse_training_request(inputs, train_module.DEFAULTS)


# ---------------------------------------------------------------------------------------------- training
def test_a_request_names_only_listed_hub_models(hub, file_server, images_zip, monkeypatch):
    """Refused when the request is parsed, before the job starts and before the hub hears of it; every refused key
    is named."""
    monkeypatch.delenv(ENV_ALLOWED_HUB_MODELS, raising=False)
    with pytest.raises(ValueError) as caught:
        _request(file_server, images_zip, inputs={"caption_model": "blip"}, ckpt_path=REPO,
                 clipseg_model_path="someone/clipseg", evaluation_clip_model="someone/clip",
                 caption_model_path="someone/blip")
    for key in ("ckpt_path 'testorg/tiny-sdxl'", "clipseg_model_path 'someone/clipseg'",
                "evaluation_clip_model 'someone/clip'", "caption_model_path 'someone/blip'"):
        assert f"{key} is not a hub model this server loads for requests" in str(caught.value)
    assert ENV_ALLOWED_HUB_MODELS in str(caught.value)
    with pytest.raises(ValueError, match=r"^pretrained_model.path 'testorg/tiny-sdxl' is not a hub model"):
        _request(file_server, images_zip, ckpt_path=None, pretrained_model={"path": REPO, "version": "sdxl"})
    assert hub.connections == 0

    # The defaults and the models the operator lists are accepted; the job gets to know which names are the request's.
    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "testorg/*")
    request = _request(file_server, images_zip, ckpt_path=REPO, evaluation_clip_model="openai/clip-vit-large-patch14",
                       caption_model_path="gpt-4o", inputs={"caption_model": "gpt4-v"})
    assert request.hub_models == {REPO: "ckpt_path", "openai/clip-vit-large-patch14": "evaluation_clip_model"}
    assert hub.connections == 0


def test_aesthetic_weights_come_by_url_only(hub, file_server, images_zip):
    """A hub-id-shaped value would be read as a path relative to the server's folder."""
    with pytest.raises(ValueError, match=r"evaluation_aesthetic_weights 'trainer/evaluate' is not an http\(s\) URL"):
        _request(file_server, images_zip, evaluation_aesthetic_weights="trainer/evaluate")


def test_a_training_job_trains_on_a_listed_hub_model(hub, file_server, images_zip, cache, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "testorg/*")
    repo = hub.repos[REPO]
    zip_path = TrainingJob(_request(file_server, images_zip, ckpt_path=REPO), root=tmp_path / "work").run()

    with zipfile.ZipFile(zip_path) as archive:
        assert json.loads(archive.read("training_args.json"))["ckpt_path"] == REPO
    index = json.loads(repo.files["model_index.json"].content)
    expected = pipeline_files({name: f.size for name, f in repo.files.items()}, index)
    assert sorted(hub.fetched(REPO)) == sorted(expected)
    assert (cache / REQUESTED_DIR / "testorg--tiny-sdxl" / f"{repo.commit}-pipeline" / "model_index.json").is_file()
    assert not (cache / "hub").exists()


def test_a_training_job_over_the_cap_fails_and_leaves_the_cache_as_it_was(hub, file_server, images_zip, cache,
                                                                          tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "testorg/*")
    monkeypatch.setenv(ENV_MAX_MODEL_BYTES, str(1 << 20))
    request = _request(file_server, images_zip, ckpt_path=REPO)
    before = tree(cache)
    with pytest.raises(ValueError, match=r"^ckpt_path 'testorg/tiny-sdxl': the files to download come to [\d.]+ MiB, "
                                         r"more than the limit of 1\.0 MiB \(TRAINER_MAX_MODEL_BYTES\)"):
        TrainingJob(request, root=tmp_path / "work").run()
    assert hub.fetched(REPO) == ["model_index.json"]
    assert tree(cache) == before
    assert list((tmp_path / "work" / "jobs").iterdir()) == []


# ---------------------------------------------------------------------------------------------- predictor
@pytest.fixture
def predictor(cache, tmp_path, monkeypatch):
    return start_predictor(monkeypatch, tmp_path / "predict", TRAINER_SDXL_MODEL="tiny-sdxl",
                           TRAINER_SAFETY_CHECKER="tiny-safety-checker")


def _lora_naming(trained_sdxl, file_server, name: str, base: str) -> str:
    """The session's trained zip with its training_args.json naming ``base``, served by the file server."""
    with zipfile.ZipFile(trained_sdxl["result"].zip_path) as archive:
        members = {member: archive.read(member) for member in archive.namelist()}
    args = json.loads(members["training_args.json"])
    members["training_args.json"] = json.dumps({**args, "ckpt_path": base}).encode()
    with zipfile.ZipFile(file_server.folder / name, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return file_server.url(name)


def test_a_lora_zip_names_its_base_model_under_the_same_rules(hub, predictor, trained_sdxl, file_server, cache,
                                                               monkeypatch):
    url = _lora_naming(trained_sdxl, file_server, "hub-base.zip", REPO)
    monkeypatch.delenv(ENV_ALLOWED_HUB_MODELS, raising=False)
    before = tree(cache)
    with pytest.raises(ValueError, match=r"^the LoRA's training_args.json ckpt_path 'testorg/tiny-sdxl' is not a hub "
                                         r"model this server loads for requests"):
        predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL)
    assert hub.connections == 0
    assert tree(cache) == before

    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "testorg/*")
    monkeypatch.setenv(ENV_MAX_MODEL_BYTES, str(1 << 20))
    with pytest.raises(ValueError, match=r"^the LoRA's training_args.json ckpt_path 'testorg/tiny-sdxl': the files to "
                                         r"download come to"):
        predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL)
    assert tree(cache) == before

    monkeypatch.delenv(ENV_MAX_MODEL_BYTES)
    assert predictor.run(prompt="a photo of TOK", lora_url=url, **SMALL)
    assert predictor.service.generator.base_source.location == REPO
    assert "sd_xl_base_1.0.safetensors" not in hub.fetched(REPO)
    assert (cache / REQUESTED_DIR / "testorg--tiny-sdxl").is_dir()


# ---------------------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def hub_server(tmp_path_factory, model_cache, s3_server, file_server):
    """The real cog training server, online to the fake hub (and the file server) only, listing testorg/*."""
    from tests.conftest import REPO_ROOT
    from trainer.tooling.cog_client import CogServer

    hub = FakeHub()
    hub.add_folder(REPO, tiny_model_dir("tiny-sdxl", model_cache), {"sd_xl_base_1.0.safetensors": 7 << 30})
    root = tmp_path_factory.mktemp("hub-server")
    cache = root / "model-cache"
    cache.mkdir()
    (cache / "tiny").symlink_to(model_cache / "tiny", target_is_directory=True)
    env = server_env(cache, root / "work", s3_server, allow=f"{file_server.address} 127.0.0.1:{hub.port}")
    env.update({"HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_ENDPOINT": hub.endpoint,
                ENV_ALLOWED_HUB_MODELS: "testorg/*"})
    server = CogServer.start(mode="train", ref="train.py:train", cwd=REPO_ROOT, env=env, log_path=root / "server.log")
    server.hub, server.cache = hub, cache
    yield server
    server.stop()
    hub.close()


@pytest.mark.slow
def test_the_cog_server_trains_on_a_listed_hub_model_and_refuses_others(hub_server, file_server, images_zip):
    hub, cache = hub_server.hub, hub_server.cache
    url = file_server.url(images_zip.name)
    job = hub_server.train(tiny_inputs(url, training_args=json.dumps({**TINY_TRAINING_ARGS, "ckpt_path": REPO})))
    assert job["status"] == "succeeded", job.get("error") or job.get("logs", "")[-3000:]
    assert "sd_xl_base_1.0.safetensors" not in hub.fetched(REPO)
    assert "unet/diffusion_pytorch_model.safetensors" in hub.fetched(REPO)
    assert (cache / REQUESTED_DIR / "testorg--tiny-sdxl").is_dir()

    before, requests = tree(cache), len(hub.requests)
    args = {**TINY_TRAINING_ARGS, "ckpt_path": "otherorg/tiny-sdxl", "clipseg_model_path": "otherorg/clipseg"}
    job = hub_server.train(tiny_inputs(url, training_args=json.dumps(args)))
    assert job["status"] == "failed"
    for key in ("ckpt_path 'otherorg/tiny-sdxl'", "clipseg_model_path 'otherorg/clipseg'"):
        assert f"{key} is not a hub model this server loads for requests" in job["error"], job["error"]
    assert len(hub.requests) == requests and tree(cache) == before
