"""Guards on the core package: self-contained, and never unpickling or evaluating anything."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "kontext_core"
FORBIDDEN_MODULES = {"comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "server", "pickle"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_core_imports_nothing_from_comfyui_or_the_nodes():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        assert not (_imports(path) & FORBIDDEN_MODULES), path


def test_core_never_unpickles_or_evaluates():
    for path in CORE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
                assert not (isinstance(func, ast.Name) and name in {"eval", "exec"}), f"{path}: {name}()"
                assert not (owner == "torch" and name == "load"), f"{path}: torch.load unpickles"


def test_bundled_tokenizers_are_package_data():
    # A non-editable install (pip install .) carries only the data that pyproject.toml names.
    import fnmatch

    import pytest

    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    config = tomllib.loads((CORE.parent / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["package-data"]["kontext_core"]
    files = {p.relative_to(CORE).as_posix() for p in (CORE / "text" / "tokenizers").rglob("*") if p.is_file()}
    assert {"text/tokenizers/t5/tokenizer.json", "text/tokenizers/t5/LICENSE", "text/tokenizers/clip_l/vocab.json",
            "text/tokenizers/clip_l/merges.txt", "text/tokenizers/clip_l/LICENSE"} <= files
    assert {f for f in files if not any(fnmatch.fnmatch(f, pattern) for pattern in patterns)} == set()
