"""Packaging: pyproject.toml declares the pins the requirements files install, and `pip install .` gives a working
`sd-lora-trainer` command."""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

from tests.conftest import REPO_ROOT
from trainer.tooling.requirements import FOLDER, flatten, pins, project, requirement_files, stale_files


def test_the_requirements_files_are_the_pyproject_pins():
    data = project()["project"]
    declared, extras = pins(data["dependencies"]), data["optional-dependencies"]
    folder = REPO_ROOT / FOLDER

    def installed(name: str) -> dict[str, str]:
        return pins(flatten(folder / name))

    assert installed("cpu.txt") == declared
    assert installed("cuda.txt") == {**declared, **pins(extras["cuda"])}
    assert installed("xpu.txt") == {**declared, **pins(extras["xpu"])} and installed("xpu.txt")["torch"] == "2.13.0+xpu"
    assert installed("dev.txt") == {**declared, **pins(extras["dev"])} and "mypy" in installed("dev.txt")
    assert set(requirement_files()) == {"base.txt", "cpu.txt", "cuda.txt", "xpu.txt", "dev.txt", "cog-xpu.txt",
                                        "cog-cuda.txt"}
    assert stale_files() == [], "run python -m trainer.tooling.requirements --write"
    assert project()["project"]["scripts"]["sd-lora-trainer"] == "trainer.cli:main"


@pytest.mark.slow
def test_pip_install_gives_a_working_command(tmp_path):
    """A throwaway venv gets the package without its dependencies (no CUDA torch is pulled); the command then runs
    with the dependencies of the development install, and the package declares exactly the pyproject pins."""
    # A copy of what the package is made of: pip builds in the source folder, which must not be the checkout.
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "trainer", source / "trainer", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    venv = tmp_path / "venv"
    base_python = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base_python, "-m", "venv", str(venv)], check=True)
    install = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-deps",
                              str(source)], capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    command = venv / "bin" / "sd-lora-trainer"
    assert command.is_file()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*site.getsitepackages(), sysconfig.get_paths()["purelib"]]),
           "OMP_NUM_THREADS": "1"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import trainer; print(trainer.__file__)"],
                           capture_output=True, text=True, env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), where.stdout + where.stderr  # the installed copy, not the checkout
    result = subprocess.run([str(command), "--help"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0 and "train" in result.stdout and "evaluate" in result.stdout, result.stderr
    docs = subprocess.run([str(command), "docs"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert docs.returncode == 0 and "| `lora_training_urls` |" in docs.stdout, docs.stderr
    requires = subprocess.run([str(venv / "bin" / "python"), "-c",
                               "import importlib.metadata as m; print('\\n'.join(m.requires('sd-lora-trainer')))"],
                              capture_output=True, text=True, cwd=tmp_path).stdout.splitlines()
    assert sorted(r for r in requires if "extra ==" not in r) == sorted(project()["project"]["dependencies"])
