"""Hub models a request names (trainer/models/hub.py), against a fake hub on 127.0.0.1 built from the tiny models.

Each test turns offline mode off for itself only (monkeypatch; the suite runs with HF_HUB_OFFLINE=1) and lets the
guarded client reach the fake hub's port, and no other, with TRAINER_ALLOW_PRIVATE_HOSTS.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO_ROOT
from tests.helpers import make_concept_images
from tests.models.fake_hub import FakeHub
from trainer.config.schema import DEFAULT_CLIP_MODEL
from trainer.data.captioners.blip import DEFAULT_MODEL as BLIP
from trainer.data.captioners.florence import ALIASES
from trainer.data.captioners.florence import DEFAULT_MODEL as FLORENCE
from trainer.data.masks.clipseg import DEFAULT_MODEL as CLIPSEG
from trainer.models.hub import (
    ENV_ALLOWED_HUB_MODELS,
    ENV_KEEP_HUB_MODELS,
    REQUESTED_DIR,
    fetch_requested,
    pipeline_files,
    requested_key,
    requested_models,
    server_defaults,
    sweep_partial_fetches,
)
from trainer.models.loading import DEFAULT_MODELS, ENV_MAX_MODEL_BYTES, load_models, resolve_source
from trainer.models.tiny import tiny_model_dir
from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS, ENV_DOWNLOAD_DEADLINE, DownloadCancelled, stop_downloads_on

REPO = "testorg/tiny-sd15"
#: What real SD repos hold beside the diffusers layout, none of which diffusers fetches: the single-file checkpoint
#: at the top, pickled and fp16 copies of the weights, a model card. Virtual: listed with their size, never served.
EXTRAS = {
    "v1-5-pruned.safetensors": 40 << 30,
    "unet/diffusion_pytorch_model.bin": 10 << 30,
    "unet/diffusion_pytorch_model.fp16.safetensors": 2 << 30,
    "README.md": b"# tiny\n",
}


def tree(folder: Path) -> set[str]:
    """Every file and folder under ``folder``."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")} if folder.exists() else set()


@pytest.fixture
def hub(monkeypatch):
    """The fake hub as this process's Hugging Face endpoint, online for this test only."""
    server = FakeHub()
    monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv(ENV_ALLOW_PRIVATE_HOSTS, f"127.0.0.1:{server.port}")
    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "testorg/*")
    yield server
    server.close()


@pytest.fixture
def tiny_sd15(model_cache) -> Path:
    return tiny_model_dir("tiny-sd15", model_cache)


@pytest.fixture
def cache(tmp_path) -> Path:
    folder = tmp_path / "model-cache"
    folder.mkdir()
    return folder


def _load_requested(repo_id: str, cache: Path, key: str = "ckpt_path", **options):
    with requested_models({repo_id: key}):
        return load_models(resolve_source(repo_id, None, None, cache, local_paths=False), cache_dir=cache, **options)


# ------------------------------------------------------------------------------------------ the happy path
def test_an_allowed_repo_loads_through_the_guarded_client(hub, tiny_sd15, cache, monkeypatch):
    repo = hub.add_folder(REPO, tiny_sd15, EXTRAS)
    monkeypatch.setenv("HF_TOKEN", "hf_the_operators_secret")
    models = _load_requested(REPO, cache)

    assert models.version == "sd15"
    reference = load_models(resolve_source(str(tiny_sd15), None, None, cache), cache_dir=cache)
    for got, want in zip(models.unet.state_dict().values(), reference.unet.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    fetched = hub.fetched(REPO)
    assert sorted(fetched) == sorted(set(fetched)), "a file was fetched twice"
    assert set(fetched) == set(pipeline_files({n: f.size for n, f in repo.files.items()}, json.loads(
        (tiny_sd15 / "model_index.json").read_text())))
    assert not set(fetched) & set(EXTRAS), "a file the pipeline does not read was fetched"
    assert all("authorization" not in {k.lower() for k in headers} for _m, _p, headers in hub.requests), \
        "the operator's HF_TOKEN went out with a request's download"
    # One plain folder per repo and commit; huggingface_hub's own cache is not touched.
    assert tree(cache / REQUESTED_DIR) >= {"testorg--tiny-sd15", f"testorg--tiny-sd15/{repo.commit}-pipeline"}
    assert not (cache / "hub").exists()
    assert not [p for p in cache.rglob("*") if ".partial-" in p.name]

    # Cached: the next load asks for the file list only.
    hub.requests.clear()
    _load_requested(REPO, cache)
    assert hub.fetched(REPO) == [] and len(hub.requests) == 1
    # Offline (the operator's HF_HUB_OFFLINE), the cached copy is used without a connection.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    _load_requested(REPO, cache)
    assert hub.requests == []


def test_the_files_chosen_are_the_ones_diffusers_downloads(hub, tiny_sd15, tmp_path, monkeypatch):
    """Our selection against diffusers' own DiffusionPipeline.download through huggingface_hub, on the same repo:
    with and without a variant, SD1.5 with its safety checker passed as None (as the loaders do)."""
    import huggingface_hub.constants
    import huggingface_hub.hf_api
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
    monkeypatch.setattr(huggingface_hub.constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                        hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", hub.endpoint)
    files = {p.relative_to(tiny_sd15).as_posix(): p.read_bytes() for p in tiny_sd15.rglob("*") if p.is_file()}
    fp16 = {name.replace(".safetensors", ".fp16.safetensors"): data for name, data in files.items()
            if name.endswith(".safetensors")}
    index = json.loads(files["model_index.json"])
    index["safety_checker"] = ["stable_diffusion", "StableDiffusionSafetyChecker"]
    extras = {"safety_checker/config.json": b"{}", "safety_checker/model.safetensors": 1 << 30,
              "feature_extractor/preprocessor_config.json": b"{}", "v1-5-pruned.safetensors": 4 << 30,
              "unet/diffusion_pytorch_model.bin": 3 << 30, "vae/diffusion_pytorch_model.bin": 1 << 30,
              "README.md": b"card", "model_index.json": json.dumps(index).encode()}
    repo = hub.add(REPO, {**files, **fp16, **extras})
    sizes = {name: file.size for name, file in repo.files.items()}
    for variant in (None, "fp16"):
        folder = StableDiffusionPipeline.download(REPO, cache_dir=tmp_path / f"hf-{variant}", variant=variant,
                                                  safety_checker=None)
        downloaded = {p.relative_to(folder).as_posix() for p in Path(folder).rglob("*") if p.is_file()}
        assert downloaded == set(pipeline_files(sizes, index, variant)), variant
        assert "safety_checker/model.safetensors" not in downloaded
        assert ("unet/diffusion_pytorch_model.fp16.safetensors" in downloaded) == (variant == "fp16")


# ------------------------------------------------------------------------------------------------ refusals
def test_a_repo_over_the_cap_is_refused_before_its_weights(hub, tiny_sd15, cache, monkeypatch):
    repo = hub.add_folder(REPO, tiny_sd15, EXTRAS)
    chosen = pipeline_files({n: f.size for n, f in repo.files.items()},
                            json.loads((tiny_sd15 / "model_index.json").read_text()))
    total = sum(repo.files[name].size for name in chosen)
    monkeypatch.setenv(ENV_MAX_MODEL_BYTES, str(total - 1))
    before = tree(cache)
    with pytest.raises(ValueError, match=r"^ckpt_path 'testorg/tiny-sd15': the files to download come to [\d.]+ MiB, "
                                         r"more than the limit of [\d.]+ MiB \(TRAINER_MAX_MODEL_BYTES\)"):
        _load_requested(REPO, cache)
    # The listing and model_index.json (needed to know what the pipeline reads), and nothing else.
    assert hub.fetched(REPO) == ["model_index.json"]
    assert tree(cache) == before
    # The same total passes at the exact limit: what is counted is what is fetched, not the 50 GB of extras.
    monkeypatch.setenv(ENV_MAX_MODEL_BYTES, str(total))
    assert _load_requested(REPO, cache).version == "sd15"


def test_a_repo_not_on_the_list_is_refused_without_contacting_the_hub(hub, tiny_sd15, cache, monkeypatch):
    hub.add_folder("otherorg/tiny-sd15", tiny_sd15)
    with pytest.raises(ValueError, match=r"^ckpt_path 'otherorg/tiny-sd15' is not a hub model this server loads "
                                         r"for requests: .* TRAINER_ALLOWED_HUB_MODELS"):
        _load_requested("otherorg/tiny-sd15", cache)
    monkeypatch.delenv(ENV_ALLOWED_HUB_MODELS)
    with pytest.raises(ValueError, match=r"is not a hub model this server loads"):
        _load_requested(REPO, cache)
    assert hub.connections == 0
    assert tree(cache) == set()
    # Glob patterns; the hub compares ids case-insensitively, and so does the list.
    monkeypatch.setenv(ENV_ALLOWED_HUB_MODELS, "someone/else, OtherOrg/tiny-*")
    assert _load_requested("otherorg/tiny-sd15", cache).version == "sd15"


def test_the_servers_defaults_stay_the_operators():
    """A request naming a default model gets the server's copy, loaded as the operator's models are."""
    defaults = {*DEFAULT_MODELS.values(), BLIP, FLORENCE, CLIPSEG, DEFAULT_CLIP_MODEL, *ALIASES}
    with requested_models({name: "ckpt_path" for name in defaults} | {REPO: "ckpt_path"}):
        assert [name for name in defaults if requested_key(name) is not None] == []
        assert requested_key(REPO) == "ckpt_path"
    assert requested_key(REPO) is None, "the request's names outlived its block"
    assert {name.lower() for name in defaults} <= server_defaults()


def test_a_failed_download_leaves_nothing_in_the_cache(hub, tiny_sd15, cache):
    hub.add_folder(REPO, tiny_sd15)
    # The UNet comes after the text encoder and tokenizer: those are fetched, then the hub sends more than it listed.
    hub.oversized.add("unet/diffusion_pytorch_model.safetensors")
    before = tree(cache)
    with pytest.raises(ValueError, match=r"^ckpt_path 'testorg/tiny-sd15': .*unet/diffusion_pytorch_model"
                                         r"\.safetensors: [\d.]+ (KiB|MiB) is over the limit"):
        _load_requested(REPO, cache)
    assert "text_encoder/model.safetensors" in hub.fetched(REPO)
    assert tree(cache) == before


def test_a_slow_hub_meets_one_deadline_for_the_whole_model(hub, tiny_sd15, cache, monkeypatch):
    """Each file comes within the deadline, the model does not: the deadline is the model's, not each file's."""
    hub.add_folder(REPO, tiny_sd15)
    hub.delay = 0.5
    monkeypatch.setenv(ENV_DOWNLOAD_DEADLINE, "2")
    with pytest.raises(ValueError, match=r"^ckpt_path 'testorg/tiny-sd15': the download took longer than the limit "
                                         r"of 2s \(TRAINER_DOWNLOAD_DEADLINE\)$"):
        _load_requested(REPO, cache)
    assert 1 <= len(hub.fetched(REPO)) < 10
    assert tree(cache) == set()


def test_a_cancel_stops_a_stalled_hub_download(hub, tiny_sd15, cache):
    hub.add_folder(REPO, tiny_sd15)
    hub.stalls.add("text_encoder/model.safetensors")
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    with stop_downloads_on(stop), pytest.raises(DownloadCancelled):
        _load_requested(REPO, cache)
    assert "text_encoder/model.safetensors" in hub.fetched(REPO)
    assert tree(cache) == set()


def test_a_hostile_listing_is_refused(hub, tiny_sd15, cache):
    repo = hub.add_folder(REPO, tiny_sd15)
    repo.extra_listing.append({"rfilename": "../../escaped.json", "size": 10})
    with pytest.raises(ValueError, match=r"the hub's file list has an entry without a usable name and size "
                                         r"\('\.\./\.\./escaped\.json'\)"):
        _load_requested(REPO, cache)
    repo.extra_listing[:] = [{"rfilename": "tokenizer/vocab.json"}]
    with pytest.raises(ValueError, match=r"without a usable name and size"):
        _load_requested(REPO, cache)
    assert hub.fetched(REPO) == []
    assert tree(cache) == set()


def test_a_pipeline_of_the_wrong_kind_is_refused_before_its_weights(hub, model_cache, cache):
    hub.add_folder(REPO, tiny_model_dir("tiny-sdxl", model_cache))
    with requested_models({REPO: "ckpt_path"}), pytest.raises(
            ValueError, match=r"sd_model_version is 'sd15' but testorg/tiny-sd15 is an SDXL model"):
        load_models(resolve_source(REPO, None, "sd15", cache, local_paths=False), cache_dir=cache)
    assert hub.fetched(REPO) == ["model_index.json"]
    assert tree(cache) == set()


def test_a_missing_repo_says_so(hub, cache):
    with pytest.raises(ValueError, match=r"^ckpt_path 'testorg/nothing': the hub has no public model of that name"):
        _load_requested("testorg/nothing", cache)
    assert tree(cache) == set()


# --------------------------------------------------------------------------------------- helper models
def test_a_requested_helper_model_is_fetched_with_its_processor_only(hub, tmp_path, cache, monkeypatch):
    from tests.data.tiny_models import build_clipseg
    from trainer.data.aux_models import check_model_location
    from trainer.data.masks.clipseg import ClipSegMasker
    from trainer.device import DeviceInfo

    folder = build_clipseg(tmp_path / "clipseg")
    extras = {"pytorch_model.bin": 5 << 30, "tf_model.h5": 5 << 30, "onnx/model.onnx": 5 << 30}
    repo = hub.add_folder("testorg/clipseg", folder, extras)
    monkeypatch.setenv("TRAINER_MODEL_CACHE", str(cache))
    with requested_models({"testorg/clipseg": "clipseg_model_path"}):
        location = check_model_location("testorg/clipseg", "CLIPSeg", "clipseg_model_path")
    assert Path(location).parent.parent == cache / REQUESTED_DIR
    top_level = {name for name in repo.files if "/" not in name and not name.endswith((".bin", ".h5"))}
    assert set(hub.fetched("testorg/clipseg")) == top_level
    masker = ClipSegMasker(location, ["a face"], 1.0, DeviceInfo(device=torch.device("cpu"), dtype=torch.float32))
    assert masker.model.config.projection_dim == 32

    # Without safetensors weights (pickles only), nothing is fetched.
    hub.add("testorg/pickled", {"config.json": b"{}", "pytorch_model.bin": 1000})
    with requested_models({"testorg/pickled": "clipseg_model_path"}), pytest.raises(
            ValueError, match=r"^clipseg_model_path 'testorg/pickled': it has no model.safetensors .*safetensors "
                              r"weights only"):
        check_model_location("testorg/pickled", "CLIPSeg", "clipseg_model_path")
    assert hub.fetched("testorg/pickled") == []


def test_a_requested_name_is_never_looked_up_on_the_servers_disk(hub, tmp_path, cache, monkeypatch):
    """A request's hub id that is also a folder below the server's working directory comes from the hub, never from
    that folder (whose existence the answer would otherwise betray)."""
    from tests.data.tiny_models import build_clipseg
    from trainer.data.aux_models import check_model_location
    from trainer.evaluate.clip import ClipScorer

    build_clipseg(tmp_path / "testorg" / "clipseg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRAINER_MODEL_CACHE", str(cache))
    assert check_model_location("testorg/clipseg", "CLIPSeg", "clipseg_model_path").endswith("testorg/clipseg")
    with requested_models({"testorg/clipseg": "clipseg_model_path"}), pytest.raises(
            ValueError, match=r"^clipseg_model_path 'testorg/clipseg': the hub has no public model of that name"):
        check_model_location("testorg/clipseg", "CLIPSeg", "clipseg_model_path")
    with requested_models({"testorg/clipseg": "evaluation_clip_model"}), pytest.raises(
            ValueError, match=r"^evaluation_clip_model 'testorg/clipseg': the hub has no public model of that name"):
        ClipScorer.load("testorg/clipseg", torch.device("cpu"))
    assert [path.split("?")[0] for _m, path, _h in hub.requests] == ["/api/models/testorg/clipseg/revision/main"] * 2
    assert tree(cache) == set()


def test_the_cache_keeps_the_most_recently_used_request_models(hub, cache, monkeypatch):
    monkeypatch.setenv(ENV_KEEP_HUB_MODELS, "2")
    for name in ("a", "b", "c"):
        hub.add(f"testorg/{name}", {"config.json": name.encode(), "model.safetensors": b"weights"})
    first = fetch_requested("testorg/a", "caption_model_path", cache, "transformers")
    time.sleep(0.01)
    fetch_requested("testorg/b", "caption_model_path", cache, "transformers")
    time.sleep(0.01)
    assert fetch_requested("testorg/a", "caption_model_path", cache, "transformers") == first  # used again
    time.sleep(0.01)
    fetch_requested("testorg/c", "caption_model_path", cache, "transformers")
    assert sorted(p.name for p in (cache / REQUESTED_DIR).iterdir()) == ["testorg--a", "testorg--c"]


def test_stale_partial_fetches_are_swept(cache):
    stale = cache / ".partial-hub-dead" / "model" / "unet"
    stale.mkdir(parents=True)
    (stale / "weights").write_bytes(b"x")
    live = cache / ".partial-hub-live" / "model"
    live.mkdir(parents=True)
    (live / "growing").write_bytes(b"x")
    old = time.time() - 3600
    for path in (stale / "weights", stale, stale.parent, stale.parent.parent, live.parent):
        os.utime(path, (old, old))
    # The live fetch's folder is old, but the file it writes is fresh.
    assert sweep_partial_fetches(cache) == 1
    assert tree(cache) == {".partial-hub-live", ".partial-hub-live/model", ".partial-hub-live/model/growing"}


# ------------------------------------------------------------------------------------------- the operator
def test_the_command_line_loads_any_hub_id_as_before(hub, tiny_sd15, tmp_path):
    """`python -m trainer` is the operator: an unlisted hub id goes through huggingface_hub into its cache, with no
    size check, as it always did."""
    hub.add_folder("anyone/tiny-sd15", tiny_sd15)
    images = make_concept_images(tmp_path / "images", n=2)
    config = {"lora_training_urls": str(images), "concept_mode": "object", "ckpt_path": "anyone/tiny-sd15",
              "caption_model": "no_caption", "resolution": 64, "max_train_steps": 2, "train_batch_size": 2,
              "device": "cpu", "weight_type": "fp32", "n_sample_imgs": 0, "output_dir": str(tmp_path / "runs")}
    (tmp_path / "args.json").write_text(json.dumps(config))
    cache = tmp_path / "operator-cache"
    env = {key: value for key, value in os.environ.items()
           if key not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", ENV_ALLOWED_HUB_MODELS, ENV_ALLOW_PRIVATE_HOSTS)}
    env.update({"TRAINER_MODEL_CACHE": str(cache), "HF_ENDPOINT": hub.endpoint, ENV_MAX_MODEL_BYTES: "1000",
                "PYTHONPATH": str(REPO_ROOT)})
    result = subprocess.run([sys.executable, "-m", "trainer", "train", str(tmp_path / "args.json")], cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "unet/diffusion_pytorch_model.safetensors" in hub.fetched("anyone/tiny-sd15")
    assert (cache / "hub" / "models--anyone--tiny-sd15").is_dir()
    assert not (cache / REQUESTED_DIR).exists()
