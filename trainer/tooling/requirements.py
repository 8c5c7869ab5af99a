"""The requirements files, generated from ``pyproject.toml`` (its dependencies and extras are the one list of pins).

``requirements/`` holds what pip and cog install: ``base.txt`` (every build), ``cpu.txt`` (the development and CI
machines), ``cuda.txt``, ``xpu.txt`` (with PyTorch's XPU index), ``dev.txt`` (tests, lint, type checks), and the two
files the cog images install, ``cog-xpu.txt`` and ``cog-cuda.txt``: cog copies the single file named by
``build.python_requirements`` into the image build and nothing beside it, so those are ``xpu.txt`` and ``cuda.txt``
with their ``-r`` includes inlined. ``nodeps.txt`` is written by hand: wheels installed ``--no-deps``, which
``pyproject.toml`` cannot say. A test fails when a generated file differs from what this module makes;
``python -m trainer.tooling.requirements --write`` rewrites them.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import tomllib

REPO_ROOT = Path(__file__).resolve().parents[2]
FOLDER = "requirements"
#: The cog files; each names the (generated) requirements file its image installs.
COG_FILES = ("cog.yaml", "cog.cuda.yaml")
_PYTHON_REQUIREMENTS = re.compile(r"^\s*python_requirements:\s*[\"']?([^\"'\s]+)", re.MULTILINE)
_HEADER = "# GENERATED from pyproject.toml by `python -m trainer.tooling.requirements --write`; edit pyproject.toml."


def project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def cog_requirements() -> dict[str, tuple[str, str]]:
    """cog file → (the requirements file its image installs, the build's file that one is made from)."""
    result = {}
    for name in COG_FILES:
        found = _PYTHON_REQUIREMENTS.search((REPO_ROOT / name).read_text(encoding="utf-8"))
        if found is None:
            raise ValueError(f"{name} names no build.python_requirements")
        target = found.group(1)
        result[name] = (target, target.replace("/cog-", "/"))
    return result


GENERATED = cog_requirements()


def _name(line: str) -> str:
    return line.split("==", 1)[0].split("[", 1)[0].strip().lower()


def requirement_files() -> dict[str, str]:
    """``requirements/<name>`` → its text, as made from ``pyproject.toml``."""
    data = project()
    dependencies = data["project"]["dependencies"]
    extras = data["project"]["optional-dependencies"]

    def text(comment: str, lines: list[str]) -> str:
        return "\n".join([_HEADER, f"# {comment}", *lines]) + "\n"

    files = {"base.txt": text("What every build shares; torch is pinned per build.",
                              [line for line in dependencies if _name(line) != "torch"])}
    for build, spec in data["tool"]["sd-lora-trainer"]["builds"].items():
        added = extras.get(spec.get("extra", ""), [])
        # An extra that pins torch (a build from another index) replaces the shared pin.
        torch = [] if any(_name(line) == "torch" for line in added) else [
            line for line in dependencies if _name(line) == "torch"]
        index = [f"--extra-index-url {spec['index']}"] if "index" in spec else []
        files[f"{build}.txt"] = text(spec["comment"], [*index, "-r base.txt", *torch, *added])
    files["dev.txt"] = text("Tests, lint, type checks and the offline smoke run, on top of the CPU build.",
                            ["-r cpu.txt", *extras["dev"]])
    folder = REPO_ROOT / FOLDER
    for target, source in GENERATED.values():
        files[Path(target).name] = cog_text(source, files, folder)
    return files


def cog_text(source: str, files: dict[str, str], folder: Path) -> str:
    """``source`` with its includes inlined (from ``files`` where they are generated), index options first, as pip
    reads them for the whole file wherever they are."""
    lines = _flatten_text(files[Path(source).name], files, folder, frozenset())
    options = [line for line in lines if line.startswith("-")]
    packages = [line for line in lines if not line.startswith("-")]
    header = [
        f"{_HEADER} Made from {source}.",
        "# cog copies only this file into the image build, so the -r includes are inlined.",
    ]
    return "\n".join([*header, *dict.fromkeys(options), *packages]) + "\n"


def _flatten_text(text: str, files: dict[str, str], folder: Path, seen: frozenset[str]) -> list[str]:
    lines: list[str] = []
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            name = line.split(None, 1)[1]
            if name in seen:
                raise ValueError(f"{name} includes itself")
            included = files[name] if name in files else (folder / name).read_text(encoding="utf-8")
            lines += _flatten_text(included, files, folder, seen | {name})
        elif line.startswith(("-c ", "--constraint ")):
            raise ValueError(f"constraint files cannot be flattened for cog ({line})")
        else:
            lines.append(line)
    return lines


def flatten(path: Path) -> list[str]:
    """The requirement and option lines of ``path`` with ``-r`` includes inlined, comments and blanks dropped."""
    path = Path(path).resolve()
    return _flatten_text(path.read_text(encoding="utf-8"), {}, path.parent, frozenset({path.name}))


def pins(lines: list[str]) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines (names normalised as pip does)."""
    result = {}
    for line in lines:
        if "==" in line and not line.startswith("-"):
            name, version = line.split(";", 1)[0].split("==", 1)
            result[name.split("[", 1)[0].strip().lower().replace("_", "-")] = version.strip()
    return result


def stale_files() -> list[str]:
    folder = REPO_ROOT / FOLDER
    return [f"{FOLDER}/{name}" for name, text in requirement_files().items()
            if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tooling.requirements", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the generated files (default: check them)")
    args = parser.parse_args(argv)
    if args.write:
        for name, text in requirement_files().items():
            (REPO_ROOT / FOLDER / name).write_text(text, encoding="utf-8")
            print(f"wrote {FOLDER}/{name}")
        return 0
    stale = stale_files()
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m trainer.tooling.requirements --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
