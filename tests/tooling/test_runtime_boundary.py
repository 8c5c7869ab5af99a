"""The runtime never imports the tooling, and the predictor's code never imports the cog glue: checked in a fresh
interpreter that imports train.py, predict.py and every runtime module."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO_ROOT

_IMPORT_ALL = """
import importlib, json, pathlib, sys
sys.path.insert(0, {root!r})
packages = {packages!r}
# Module names from the files (pkgutil would import every package on its way, trainer.tooling included).
root = pathlib.Path({root!r})
names = sorted(".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
               for path in (root / "trainer").rglob("*.py"))
names = [name for name in names if not name.startswith("trainer.tooling") and name != "trainer.__main__"]
if packages is None:
    import predict, train  # noqa: F401 - the cog entry points
else:
    names = [name for name in names if name.startswith(tuple(packages))]
for name in names:
    importlib.import_module(name)
print(json.dumps({{"imported": names, "loaded": sorted(m for m in sys.modules if m.startswith("trainer"))}}))
"""


def _import(packages: list[str] | None) -> dict:
    code = _IMPORT_ALL.format(root=str(REPO_ROOT), packages=packages)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, check=False,
                            env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # a fresh interpreter imports every module
def test_the_runtime_never_imports_the_tooling():
    report = _import(None)
    assert "trainer.training.loop" in report["imported"] and "trainer.serving.train_job" in report["imported"]
    assert len(report["imported"]) > 60
    assert [name for name in report["loaded"] if name.startswith("trainer.tooling")] == []


@pytest.mark.slow  # a fresh interpreter
def test_inference_does_not_import_the_cog_glue():
    report = _import(["trainer.inference"])
    assert "trainer.inference.service" in report["imported"]
    assert [name for name in report["loaded"] if name.startswith("trainer.serving")] == []
