"""The requirements files the cog images install, generated from the project's own requirements files.

cog copies the single file named by ``build.python_requirements`` into the image build and nothing beside it, so a
``-r requirements-base.txt`` line there would not resolve. ``requirements-cog-xpu.txt`` and
``requirements-cog-cuda.txt`` are therefore the flattened ``requirements-xpu.txt`` and ``requirements-cuda.txt``:
same pins, same index lines, includes inlined. A test fails when they differ from what this module generates;
``python -m trainer.tooling.requirements --write`` rewrites them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
#: cog file name → (generated requirements file, the project requirements file it is made from)
GENERATED = {
    "cog.yaml": ("requirements-cog-xpu.txt", "requirements-xpu.txt"),
    "cog.cuda.yaml": ("requirements-cog-cuda.txt", "requirements-cuda.txt"),
}


def flatten(path: Path, seen: frozenset[Path] = frozenset()) -> list[str]:
    """The requirement and option lines of ``path`` with ``-r`` includes inlined, comments and blanks dropped."""
    path = path.resolve()
    if path in seen:
        raise ValueError(f"{path.name} includes itself")
    lines: list[str] = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.startswith(("-r ", "--requirement ")):
            lines += flatten(path.parent / line.split(None, 1)[1], seen | {path})
        elif line.startswith(("-c ", "--constraint ")):
            raise ValueError(f"{path.name}: constraint files cannot be flattened for cog ({line})")
        else:
            lines.append(line)
    return lines


def generated_text(source: str) -> str:
    lines = flatten(REPO_ROOT / source)
    # Index options first, as pip reads them for the whole file wherever they are.
    options = [line for line in lines if line.startswith("-")]
    packages = [line for line in lines if not line.startswith("-")]
    header = [
        f"# GENERATED from {source} by `python -m trainer.tooling.requirements --write`; edit {source} instead.",
        "# cog copies only this file into the image build, so the -r includes are inlined.",
    ]
    return "\n".join([*header, *dict.fromkeys(options), *packages]) + "\n"


def pins(lines: list[str]) -> dict[str, str]:
    """``name -> version`` of the ``name==version`` lines (names normalised as pip does)."""
    result = {}
    for line in lines:
        if "==" in line and not line.startswith("-"):
            name, version = line.split(";", 1)[0].split("==", 1)
            result[name.strip().lower().replace("_", "-")] = version.strip()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.tooling.requirements", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", action="store_true", help="rewrite the generated files (default: check them)")
    args = parser.parse_args(argv)
    stale = []
    for target, source in GENERATED.values():
        path = REPO_ROOT / target
        text = generated_text(source)
        if args.write:
            path.write_text(text, encoding="utf-8")
            print(f"wrote {target} from {source}")
        elif not path.is_file() or path.read_text(encoding="utf-8") != text:
            stale.append(target)
    if stale:
        print(f"out of date: {', '.join(stale)}; run python -m trainer.tooling.requirements --write", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
