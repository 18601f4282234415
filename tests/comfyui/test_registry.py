"""What the Comfy registry reads: pyproject.toml's [project] and [tool.comfy], the license, the icon, and the
package `comfy node pack` builds (that last one only where comfy-cli is installed; CI runs it in .ci/run)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import pytest
from PIL import Image

from node_pack import REPO, module_from_file

tomllib = pytest.importorskip("tomllib", reason="needs Python 3.11's tomllib to read pyproject.toml")

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT, COMFY = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
# comfy-cli's accepted classifier values (registry/config_parser.py): anything else is dropped with a warning.
REGISTRY_OS = ("Microsoft", "POSIX", "MacOS", "OS Independent")
REGISTRY_ACCELERATORS = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                         "GPU :: Apple Metal"}


def test_version_is_semver_and_urls_point_at_the_repository():
    assert re.fullmatch(r"\d+\.\d+\.\d+", PROJECT["version"])
    repository = PROJECT["urls"]["Repository"]
    assert urlparse(repository).scheme == "https" and urlparse(repository).netloc
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9._-]*", PROJECT["name"]) and len(PROJECT["name"]) < 100


def test_license_is_apache_with_its_text():
    assert PROJECT["license"] == "Apache-2.0" and PROJECT["license-files"] == ["LICENSE"]
    text = (REPO / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text


def test_classifiers_are_ones_the_registry_reads():
    classifiers = PROJECT["classifiers"]
    systems = [c.removeprefix("Operating System :: ") for c in classifiers if c.startswith("Operating System :: ")]
    accelerators = [c.removeprefix("Environment :: ") for c in classifiers if c.startswith("Environment :: ")]
    assert systems and all(s.startswith(REGISTRY_OS) for s in systems)
    assert accelerators and set(accelerators) <= REGISTRY_ACCELERATORS


def test_requires_comfyui_is_a_version_range():
    for part in COMFY["requires-comfyui"].split(","):
        assert re.fullmatch(r"(==|>=|<=|!=|~=|>|<)?\s*\d+\.\d+\.\d+", part.strip()), part


def test_icon_is_a_square_picture_in_the_repository():
    """Icon is a URL (the registry and ComfyUI-Manager show it from there): the raw file of the repository's
    main branch, which must exist here, square, at most 400 px."""
    url = urlparse(COMFY["Icon"])
    assert url.scheme == "https" and url.path.endswith((".png", ".svg", ".jpg", ".gif"))
    repository = urlparse(PROJECT["urls"]["Repository"]).path.strip("/")
    prefix = f"/{repository}/main/"
    assert url.path.startswith(prefix), f"{COMFY['Icon']} is not a file of {PROJECT['urls']['Repository']}"
    icon = REPO / url.path.removeprefix(prefix)
    assert icon.exists(), icon
    with Image.open(icon) as picture:
        assert picture.width == picture.height <= 400


def test_comfyignore_keeps_development_files_out():
    patterns = {line.strip() for line in (REPO / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"tests/", "bench/"} <= patterns
    # Nothing ComfyUI loads is ignored.
    for needed in ("nodes", "kontext_core", "kontext_kernels", "js", "example_workflows", "__init__.py"):
        assert not any(p.strip("/") == needed for p in patterns), needed


def _comfy_cli() -> str | None:
    venv = REPO / ".venv-comfycli" / "bin" / "comfy"
    return str(venv) if venv.exists() else shutil.which("comfy")


def test_comfy_cli_validates_and_packs_the_pack():
    comfy = _comfy_cli()
    if comfy is None:
        pytest.skip("needs comfy-cli (pip install comfy-cli==1.23.0; .ci/run installs it in .venv-comfycli)")
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("needs a git checkout: comfy node pack packs git-tracked files")
    check_pack = module_from_file("check_pack", REPO / ".ci" / "check_pack.py")
    check_pack.validate(comfy)
    with tempfile.TemporaryDirectory() as folder:
        names = check_pack.pack(comfy, Path(folder))
    assert not check_pack.problems(names), check_pack.problems(names)


def test_top_level_packages_shadow_no_other_project():
    """Our importable names all start with `kontext`: a plain name such as `kernels` is also a PyPI project
    (Hugging Face's), which transformers imports when it finds it, so our folder of that name broke
    `import transformers` from the pack's directory (transformers 5.25)."""
    shipped = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    assert shipped and all(pattern.startswith("kontext") for pattern in shipped), shipped
    top_level = {path.name for path in REPO.iterdir() if (path / "__init__.py").is_file()}
    assert all(name.startswith("kontext") or name == "nodes" for name in top_level), top_level
    # The import that failed, from the pack's own directory first on sys.path as ComfyUI and pytest put it.
    probe = ("import sys; sys.path.insert(0, '.'); import kontext_core, kontext_kernels; "
             "from transformers.activations import ACT2FN; print(kontext_kernels.__file__)")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert Path(done.stdout.strip()).parent == REPO / "kontext_kernels"
