"""How modules import each other: no module hands out another's names, and project imports sit at the top of a
file unless a comment says why they cannot."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO_ROOT

PACKAGE = REPO_ROOT / "trainer"


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts).removesuffix(".__init__")


def _defined(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(target.id for target in node.targets if isinstance(target, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return names


def test_no_module_re_exports_another_modules_names():
    modules = {_module_name(path): _defined(ast.parse(path.read_text(encoding="utf-8")))
               for path in PACKAGE.rglob("*.py")}
    borrowed = []
    for path in [*PACKAGE.rglob("*.py"), *(REPO_ROOT / "tests").rglob("*.py"), REPO_ROOT / "train.py",
                 REPO_ROOT / "predict.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module in modules:
                for alias in node.names:
                    if alias.name not in modules[node.module] and f"{node.module}.{alias.name}" not in modules:
                        borrowed.append(f"{path.relative_to(REPO_ROOT)}: {alias.name} from {node.module}")
    assert not borrowed
    assert not [path for path in PACKAGE.rglob("*.py") if "__all__" in path.read_text(encoding="utf-8")]


def test_project_imports_are_at_the_top_unless_a_comment_says_why():
    unexplained = []
    for path in [*PACKAGE.rglob("*.py"), REPO_ROOT / "train.py", REPO_ROOT / "predict.py"]:
        if path.parent == PACKAGE / "models" and path.name in ("loading.py", "hub.py"):
            continue  # the hub fetcher and the loader import each other: their imports wait for their own clean-up
        lines = path.read_text(encoding="utf-8").splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and node.col_offset > 0:
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                if not any(name.startswith("trainer") for name in names):
                    continue
                # The comment may stand above a block of such imports.
                row = node.lineno - 2
                while row > 0 and lines[row].strip().startswith(("from ", "import ")):
                    row -= 1
                above = lines[row].strip()
                if not (above.startswith("#") or "#" in above or "TYPE_CHECKING" in above):
                    unexplained.append(f"{path.relative_to(REPO_ROOT)}:{node.lineno}")
    assert not unexplained
