"""Finding the model files: a folder the user names, a ComfyUI `models/` tree, the Hugging Face cache.

Nothing is downloaded unless allowed; when a file is not found, the error lists every name looked
for and every place searched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

HF_REPO = "black-forest-labs/FLUX.1-Kontext-dev"

# Names users' files go by, most preferred first; globs allowed.
TRANSFORMER_NAMES = ("flux1-kontext-dev.safetensors", "flux1-kontext-dev*.safetensors", "*kontext*.safetensors")
AUTOENCODER_NAMES = ("ae.safetensors", "flux_ae.safetensors", "flux_vae.safetensors", "*flux*vae*.safetensors")
T5_NAMES = ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn_scaled.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
            "t5xxl*.safetensors")
CLIP_NAMES = ("clip_l.safetensors", "clip_l*.safetensors")

# ComfyUI's folders for each kind (old and new names).
COMFY_FOLDERS = {
    "transformer": ("diffusion_models", "unet"),
    "autoencoder": ("vae",),
    "t5": ("text_encoders", "clip"),
    "clip": ("text_encoders", "clip"),
    "lora": ("loras",),
}
# In a diffusers repo (or its HF snapshot) each part is a subfolder.
DIFFUSERS_FOLDERS = {"transformer": "transformer", "autoencoder": "vae", "t5": "text_encoder_2", "clip": "text_encoder"}
# The single files of the BFL repo.
HF_FILES = {"transformer": "flux1-kontext-dev.safetensors", "autoencoder": "ae.safetensors"}
NAMES = {"transformer": TRANSFORMER_NAMES, "autoencoder": AUTOENCODER_NAMES, "t5": T5_NAMES, "clip": CLIP_NAMES}


class ModelFilesNotFound(FileNotFoundError):
    pass


@dataclass
class ModelFiles:
    transformer: Path
    autoencoder: Path
    t5: Path | None = None
    clip: Path | None = None
    t5_tokenizer: Path | None = None
    clip_tokenizer: Path | None = None
    searched: list[str] = field(default_factory=list)


def _match(folder: Path, names: tuple[str, ...]) -> Path | None:
    if not folder.is_dir():
        return None
    for pattern in names:
        found = sorted(p for p in folder.glob(pattern) if p.is_file())
        if found:
            return found[0]
    return None


def _candidate_folders(kind: str, roots: list[Path]) -> list[Path]:
    folders = []
    for root in roots:
        folders.append(root)
        folders += [root / name for name in COMFY_FOLDERS[kind]]
        folders.append(root / "models")
        folders += [root / "models" / name for name in COMFY_FOLDERS[kind]]
    return folders


def _diffusers_part(kind: str, roots: list[Path]) -> Path | None:
    for root in roots:
        part = root / DIFFUSERS_FOLDERS[kind]
        if part.is_dir() and (any(part.glob("*.safetensors")) or any(part.glob("*.index.json"))):
            return part
    return None


def hf_snapshot_folders(repo: str = HF_REPO) -> list[Path]:
    """Snapshot folders of `repo` in the local Hugging Face cache (none if the cache has no copy)."""
    cache = Path(os.environ.get("HF_HUB_CACHE")
                 or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snapshots = cache / f"models--{repo.replace('/', '--')}" / "snapshots"
    return sorted((p for p in snapshots.iterdir() if p.is_dir()), reverse=True) if snapshots.is_dir() else []


def find_file(kind: str, roots: list[Path], searched: list[str]) -> Path | None:
    for folder in _candidate_folders(kind, roots):
        found = _match(folder, NAMES[kind])
        if found:
            return found
    found = _diffusers_part(kind, roots)
    if found:
        return found
    # The subfolders too: a file in a ComfyUI folder of another kind (a transformer in vae/) is not found.
    subfolders = ", ".join(f"{f.as_posix()}/" for f in _candidate_folders(kind, [Path()])[1:])
    searched.append(f"{kind}: {' or '.join(NAMES[kind])} (or a diffusers {DIFFUSERS_FOLDERS[kind]}/ folder) in "
                    + ", ".join(str(f) for f in roots) + f" and in their {subfolders}")
    return None


def _download(kind: str, repo: str) -> Path:
    """The BFL single file for the transformer / AE, the diffusers subfolder (with its tokenizer) otherwise."""
    from huggingface_hub import hf_hub_download, snapshot_download  # only needed when downloads are allowed

    if kind in HF_FILES:
        return Path(hf_hub_download(repo, HF_FILES[kind]))
    part = DIFFUSERS_FOLDERS[kind]
    tokenizer = "tokenizer_2" if kind == "t5" else "tokenizer"
    root = Path(snapshot_download(repo, allow_patterns=[f"{part}/*", f"{tokenizer}/*"]))
    return root / part


def find_model_files(*folders: str | os.PathLike, use_hf_cache: bool = True, allow_download: bool = False,
                     repo: str = HF_REPO, need_text_encoders: bool = True) -> ModelFiles:
    """Locate the transformer, autoencoder and (optionally) text encoders.

    `folders` may each be a flat folder of files, a ComfyUI install or its `models/` folder, or a
    diffusers-layout repo; then the HF cache is searched; then, if allowed, the BFL files are
    downloaded (the repo is gated: log in with `huggingface-cli login` first).
    """
    roots = [Path(f).expanduser() for f in folders]
    if use_hf_cache:
        roots += hf_snapshot_folders(repo)
    searched: list[str] = []
    found: dict[str, Path | None] = {}
    kinds = ["transformer", "autoencoder"] + (["t5", "clip"] if need_text_encoders else [])
    for kind in kinds:
        found[kind] = find_file(kind, roots, searched)
        if found[kind] is None and allow_download:
            found[kind] = _download(kind, repo)
            roots.append(found[kind].parent)
            searched.pop()
    missing = [k for k in kinds if found[k] is None]
    if missing:
        hint = ("" if allow_download else "\nPut the files in one of those folders, or allow downloading "
                f"(`allow_download=True`) to fetch the BFL files from {repo}.")
        raise ModelFilesNotFound(
            "could not find the " + ", ".join(missing) + " model files. Looked for:\n  " + "\n  ".join(searched) + hint
        )
    tokenizers = {name: next((r / name for r in roots if (r / name).is_dir()), None)
                  for name in ("tokenizer", "tokenizer_2")}
    return ModelFiles(found["transformer"], found["autoencoder"], found.get("t5"), found.get("clip"),
                      tokenizers["tokenizer_2"], tokenizers["tokenizer"], searched)
