"""The cog files: schema keys only, every named file present, pins equal to the requirements files, docs in sync."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.conftest import REPO_ROOT
from trainer.tooling.requirements import GENERATED, flatten, pins, stale_files

#: cog's config schema (pkg/config/data/config_schema_v1.0.json): unknown keys are rejected by `cog build`.
TOP_LEVEL_KEYS = {"build", "image", "predict", "run", "train", "concurrency", "environment", "weights"}
BUILD_KEYS = {"gpu", "cuda", "cudnn", "python_version", "python_packages", "python_requirements", "system_packages",
              "pre_install", "run", "sdk_version"}
COG_FILES = sorted(GENERATED)


def _load(name: str) -> dict:
    return yaml.safe_load((REPO_ROOT / name).read_text(encoding="utf-8"))


@pytest.mark.parametrize("name", COG_FILES)
def test_only_schema_keys_and_the_entry_points(name):
    config = _load(name)
    assert set(config) <= TOP_LEVEL_KEYS, set(config) - TOP_LEVEL_KEYS
    assert set(config["build"]) <= BUILD_KEYS, set(config["build"]) - BUILD_KEYS
    assert config["build"]["python_version"] == "3.11"
    assert config["train"] == "train.py:train"
    assert config["run"] == "predict.py:Predictor"
    for item in config["build"].get("run", []):
        assert isinstance(item, str) or set(item) <= {"command", "mounts"}


@pytest.mark.parametrize("name", COG_FILES)
def test_every_named_file_exists_and_the_entry_points_load(name):
    from cog import _inspector

    config = _load(name)
    for ref in (config["train"], config["run"]):
        module, _, attribute = ref.partition(":")
        assert (REPO_ROOT / module).is_file(), ref
        # What the cog server does at start-up: import the module and read the entry point's signature.
        _inspector.create_predictor(module.removesuffix(".py"), attribute)
    assert (REPO_ROOT / config["build"]["python_requirements"]).is_file()


def test_the_xpu_image_is_a_cpu_base_with_xpu_wheels_and_the_intel_driver():
    config = _load("cog.yaml")
    build = config["build"]
    assert build["gpu"] is False and "cuda" not in build
    lines = flatten(REPO_ROOT / build["python_requirements"])
    assert "--extra-index-url https://download.pytorch.org/whl/xpu" in lines
    assert pins(lines)["torch"].endswith("+xpu")
    assert "intel-extension-for-pytorch" not in pins(lines), "IPEX is optional (it stopped at torch 2.8)"
    commands = " ".join(item["command"] if isinstance(item, dict) else item for item in build["run"])
    assert "repositories.intel.com/gpu" in commands
    for package in ("libze1", "libze-intel-gpu1", "intel-opencl-icd"):
        assert package in commands


def test_the_cuda_image():
    build = _load("cog.cuda.yaml")["build"]
    assert build["gpu"] is True and build["cuda"]
    assert "+xpu" not in pins(flatten(REPO_ROOT / build["python_requirements"]))["torch"]


@pytest.mark.parametrize("name", COG_FILES)
def test_pins_agree_with_the_requirements_files(name):
    generated, source = GENERATED[name]
    assert _load(name)["build"]["python_requirements"] == generated
    assert generated not in stale_files(), f"{generated} is stale: run python -m trainer.tooling.requirements --write"
    image = pins(flatten(REPO_ROOT / generated))
    assert image == pins(flatten(REPO_ROOT / source))
    # Everything the tests run with (requirements/cpu.txt: the CPU build) is in the image at the same version, torch
    # aside (its build differs by design).
    tested = pins(flatten(REPO_ROOT / "requirements/cpu.txt"))
    assert {k: v for k, v in tested.items() if k != "torch"} == {k: v for k, v in image.items()
                                                                 if k in tested and k != "torch"}
    assert image["torch"].split("+")[0] == tested["torch"]


def test_flatten_inlines_includes_and_refuses_cycles(tmp_path):
    (tmp_path / "base.txt").write_text("# pins\na==1  # why\n--extra-index-url https://x\n")
    (tmp_path / "top.txt").write_text("-r base.txt\nb==2 ; python_version < '4'\n")
    assert flatten(tmp_path / "top.txt") == ["a==1", "--extra-index-url https://x", "b==2 ; python_version < '4'"]
    assert pins(flatten(tmp_path / "top.txt")) == {"a": "1", "b": "2"}
    (tmp_path / "loop.txt").write_text("-r loop.txt\n")
    with pytest.raises(ValueError, match="includes itself"):
        flatten(tmp_path / "loop.txt")


def test_readme_starts_with_the_two_commands_and_its_table_is_generated():
    from trainer.config.docs import parameter_table, readme_table

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    first_block = text.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    assert first_block[0].startswith("bash scripts/setup.sh && sh cog_test_train.sh --tiny")
    assert first_block[1].startswith("bash scripts/test.sh")
    assert readme_table(text) == parameter_table(), "run: python -m trainer docs --write-readme"
    assert "scripts/test.sh" in (REPO_ROOT / ".ci" / "run").read_text(), "CI runs the README's test command"


@pytest.mark.slow  # five runs of python -m trainer
def test_docs_command_writes_and_checks_a_readme(tmp_path):
    from trainer.config.docs import TABLE_END, TABLE_START, parameter_table

    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{TABLE_START}\nold table\n{TABLE_END}\n\nafter\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}

    def docs(*args):
        return subprocess.run([sys.executable, "-m", "trainer", "docs", *args], capture_output=True, text=True,
                              env=env, cwd=tmp_path)

    assert docs("--check-readme", str(readme)).returncode == 1
    assert docs("--write-readme", str(readme)).returncode == 0
    assert parameter_table() in readme.read_text() and readme.read_text().endswith(f"{TABLE_END}\n\nafter\n")
    assert docs("--check-readme", str(readme)).returncode == 0
    (tmp_path / "plain.md").write_text("no markers")
    result = docs("--write-readme", str(tmp_path / "plain.md"))
    assert result.returncode == 2 and "has no parameter-table markers" in result.stderr


def test_smoke_script_is_executable_and_documents_itself():
    script = REPO_ROOT / "cog_test_train.sh"
    assert os.access(script, os.X_OK)
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, cwd=REPO_ROOT)
    assert result.returncode == 0 and "--tiny" in result.stdout


def test_the_readme_documents_the_trust_boundary_and_every_operator_variable():
    from trainer.inference.safety import ENV_DISABLE_SAFETY_CHECKER, ENV_SAFETY_CHECKER
    from trainer.models.hub import ENV_ALLOWED_HUB_MODELS, ENV_KEEP_HUB_MODELS
    from trainer.models.loading import ENV_MAX_MODEL_BYTES
    from trainer.models.refiner import ENV_REFINER
    from trainer.serving.boundary import ENV_ALLOW_REQUEST_S3_ENDPOINT
    from trainer.utils.download import ENV_ALLOW_PRIVATE_HOSTS, ENV_DOWNLOAD_DEADLINE
    from trainer.utils.env import ENV_ALLOW_LOCAL

    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    security = text[text.index("## Security"):text.index("## Troubleshooting")]
    environment = text[text.index("## Environment variables"):text.index("## Security")]
    for name in (ENV_ALLOW_LOCAL, ENV_ALLOW_PRIVATE_HOSTS, ENV_ALLOW_REQUEST_S3_ENDPOINT, ENV_DOWNLOAD_DEADLINE,
                 ENV_MAX_MODEL_BYTES, ENV_REFINER, ENV_SAFETY_CHECKER, ENV_DISABLE_SAFETY_CHECKER,
                 ENV_ALLOWED_HUB_MODELS, ENV_KEEP_HUB_MODELS):
        assert f"`{name}`" in environment and name in security, name
    for topic in ("trust boundary", "Outbound requests", "Hub models a request names", "Secrets", "Limits"):
        assert topic in security, topic


@pytest.mark.parametrize("name", COG_FILES)
def test_the_watermark_library_is_installed_without_its_opencv(name):
    """invisible-watermark declares opencv-python (a second cv2 that needs libGL); the images install it --no-deps,
    at the version requirements/nodeps.txt pins, beside everything it imports."""
    pinned = pins(flatten(REPO_ROOT / "requirements/nodeps.txt"))["invisible-watermark"]
    build = _load(name)["build"]
    commands = [item["command"] if isinstance(item, dict) else item for item in build.get("run", [])]
    install = [c for c in commands if "invisible-watermark" in c]
    assert install and all(f"--no-deps invisible-watermark=={pinned}" in c for c in install), install
    image = pins(flatten(REPO_ROOT / build["python_requirements"]))
    # What imwatermark imports: numpy, PIL, pywt, cv2 (from the headless wheel), torch.
    assert {"numpy", "pillow", "pywavelets", "opencv-python-headless", "torch"} <= set(image)
    assert "opencv-python" not in image


def test_the_watermark_library_imports_here():
    """The development install (scripts/setup.sh) has it the same way, and its cv2 is the headless one."""
    from importlib.metadata import PackageNotFoundError, version

    import imwatermark  # noqa: F401

    assert version("invisible-watermark") == pins(flatten(REPO_ROOT / "requirements/nodeps.txt"))["invisible-watermark"]
    with pytest.raises(PackageNotFoundError):
        version("opencv-python")
