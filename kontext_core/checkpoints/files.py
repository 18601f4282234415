"""Reading and writing safetensors files, one tensor at a time, with errors a person can act on.

Nothing here unpickles: other formats are recognised by their first bytes and refused.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files_out import replacing


class CheckpointError(ValueError):
    """A model file is missing, of the wrong kind, or damaged. The message says what to do.

    Where the fix is an option, the message names it as a Python caller passes it, in backticks
    (`allow_download=True`, `clip_path`); the command line puts its own flags in their place (cli.py).
    """


_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SHARD_NAME = re.compile(r"-\d{5}-of-\d{5}\.safetensors$")

_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}


def _refuse_other_formats(path: Path, head: bytes) -> None:
    name = path.name
    if head[:4] == b"GGUF":
        raise CheckpointError(
            f"{name} is a GGUF file; this loader reads .safetensors. Use a safetensors checkpoint "
            "(for example flux1-kontext-dev.safetensors or an fp8 .safetensors), or a GGUF node pack."
        )
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{name} is a pickled PyTorch file (.ckpt/.pt/.bin); for safety only .safetensors files "
            "are loaded. Convert it to safetensors or download the .safetensors release."
        )


def first_few(names: list[str], count: int = 5) -> str:
    """`a, b, c and 4 more`: the first `count` of a list of tensor or module names, for an error message."""
    more = f" and {len(names) - count} more" if len(names) > count else ""
    return ", ".join(names[:count]) + more


def refuse_lone_shard(name: str, what: str = "model") -> None:
    """A file named like one shard of a sharded set cannot be loaded alone: say to pass the folder."""
    if _SHARD_NAME.search(name):
        raise CheckpointError(
            f"{name} is one shard of a sharded diffusers {what}; the other shards hold the rest of it. "
            "Pass the folder that holds all shards and the .safetensors.index.json instead."
        )


@dataclass
class TensorInfo:
    dtype: str  # safetensors dtype name, e.g. "BF16", "F8_E4M3"
    shape: tuple[int, ...]
    file: Path
    name: str  # the tensor's name inside the file (a subset's keys drop a prefix)


@dataclass
class TensorSource:
    """The tensors of one or more safetensors files (a single file or a sharded set), read lazily."""

    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    description: str = ""
    _handles: dict[Path, object] = field(default_factory=dict, repr=False)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def shape(self, key: str) -> tuple[int, ...]:
        return self.tensors[key].shape

    def get(self, key: str) -> torch.Tensor:
        info = self.tensors[key]
        handle = self._handles.get(info.file)
        if handle is None:
            handle = safe_open(str(info.file), framework="pt", device="cpu")
            self._handles[info.file] = handle
        return handle.get_tensor(info.name)

    def subset(self, prefix: str) -> "TensorSource":
        """The tensors under `prefix`, with the prefix removed."""
        return TensorSource(
            {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)},
            self.metadata, self.description, self._handles,
        )


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors file's framing and return its tensor table and metadata."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"model file not found: {path.name} (looked at {path})")
    if path.is_dir():
        raise CheckpointError(
            f"{path.name} is a folder, not a file. If it is a diffusers model folder, pass the folder "
            "to the loader as a whole (it finds transformer/ or vae/ and the sharded files itself)."
        )
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
        # Every safetensors header is JSON, so byte 9 is "{"; anything else is another format.
        if head[8:9] != b"{":
            _refuse_other_formats(path, head)
        head = head[:8]
        if len(head) < 8:
            raise CheckpointError(f"{path.name} is empty or truncated ({size} bytes); download it again.")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path.name} is not a valid safetensors file (its header length is {header_len} bytes "
                f"in a file of {size}); the file is corrupt, truncated, or of another format. "
                "Download it again."
            )
        try:
            handle.seek(8)
            header = json.loads(handle.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path.name} has a corrupt safetensors header ({exc}); download it again.") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} has a corrupt safetensors header; download it again.")
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorInfo] = {}
    data_size = size - 8 - header_len
    for key, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{path.name}: corrupt entry for tensor {key!r}; download it again.") from exc
        if end > data_size:
            raise CheckpointError(
                f"{path.name} is truncated: tensor {key!r} ends at byte {end} of the data but the file holds "
                f"only {data_size}. The download was probably interrupted; download it again."
            )
        expected = _DTYPE_SIZES.get(dtype, 0) * int(torch.Size(shape).numel())
        if dtype in _DTYPE_SIZES and end - begin != expected:
            raise CheckpointError(f"{path.name}: tensor {key!r} has a corrupt size; download the file again.")
        tensors[key] = TensorInfo(dtype, shape, path, key)
    return tensors, metadata


def open_file(path: str | os.PathLike) -> TensorSource:
    path = Path(path)
    if path.suffix == ".json":
        return open_sharded(path)
    tensors, metadata = read_header(path)
    return TensorSource(tensors, metadata, path.name)


def open_sharded(index_path: Path) -> TensorSource:
    """A sharded set through its `*.safetensors.index.json` (diffusers / transformers layout)."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except FileNotFoundError as exc:
        raise CheckpointError(f"shard index not found: {index_path}") from exc
    except (KeyError, json.JSONDecodeError, TypeError) as exc:
        raise CheckpointError(f"{index_path.name} is not a valid shard index (no weight_map)") from exc
    source = TensorSource(description=f"{index_path.parent.name}/{index_path.name}")
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.exists():
            raise CheckpointError(
                f"shard {shard} listed in {index_path.name} is missing from {index_path.parent}; "
                "download the whole folder again."
            )
        tensors, metadata = read_header(shard_path)
        source.tensors.update(tensors)
        source.metadata.update(metadata)
    missing = sorted(set(weight_map) - set(source.tensors))
    if missing:
        raise CheckpointError(
            f"{index_path.name} lists {len(missing)} tensors that its shards do not hold "
            f"(first: {', '.join(missing[:3])}); the folder is incomplete, download it again."
        )
    return source


def save_atomic(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                metadata: Mapping[str, str] | None = None) -> None:
    """Write a safetensors file through a temporary file, so a crash never leaves a half file."""
    with replacing(path) as temporary:
        save_file({k: v.contiguous() for k, v in tensors.items()}, temporary, metadata=dict(metadata or {}))


def write_text_atomic(text: str, path: Path) -> None:
    with replacing(path) as temporary:
        temporary.write_text(text)


def save_sharded(tensors: Mapping[str, torch.Tensor], folder: Path, stem: str,
                 max_shard_bytes: int) -> None:
    """Write `stem-0000N-of-0000M.safetensors` shards and `stem.safetensors.index.json`."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    used = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append({})
            used = 0
        shards[-1][key] = tensor
        used += nbytes
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        name = f"{stem}-{number:05d}-of-{len(shards):05d}.safetensors"
        save_atomic(shard, folder / name)
        weight_map.update({key: name for key in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_text_atomic(json.dumps(index, indent=2), folder / f"{stem}.safetensors.index.json")


