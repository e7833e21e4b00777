"""Safe, atomic file I/O shared by the library.

Every writer goes through a temporary file beside the target and ``os.replace``, so a crash
never leaves a half-written file under the final name. Every tensor reader refuses pickles
that would run code: ``torch.load(weights_only=True)`` or safetensors.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_save_torch",
    "write_json_atomic",
    "read_json",
    "safe_torch_load",
    "load_tensor_file",
    "save_tensor_file",
]


def _tmp_path(path: Path) -> Path:
    return path.with_suffix(path.suffix + ".tmp")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via ``<path>.tmp`` + ``os.replace`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> Path:
    """Atomically write ``obj`` as indented JSON with a trailing newline."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file; errors name the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


def atomic_save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to memory, then write atomically. ``obj`` should hold only tensors,
    containers and plain Python values so that ``safe_torch_load`` can read it back."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def safe_torch_load(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """``torch.load(..., weights_only=True)`` with an error that names the file when the
    pickle would construct arbitrary objects or run code. ``mmap`` maps large files lazily."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"refusing to load {path}: it is a pickle that would construct objects or run "
            f"code, which weights_only loading does not allow ({first_line}). Only load files "
            "from sources you trust; convert them to plain tensors or safetensors."
        ) from e


def load_tensor_file(path: str | os.PathLike, map_location: Any = "cpu", mmap: bool = False) -> Any:
    """Read a ``.safetensors`` file (returns ``{name: tensor}``, plus ``__metadata__`` as a
    dict when the file has metadata) or any torch file through ``safe_torch_load``."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return safe_torch_load(path, map_location, mmap)
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint file: {path}")
    device = str(map_location) if map_location is not None else "cpu"
    out: dict[str, Any] = {}
    with safe_open(str(path), framework="pt", device=device) as f:
        for key in f.keys():
            out[key] = f.get_tensor(key)
        metadata = f.metadata()
    if metadata:
        out["__metadata__"] = dict(metadata)
    return out


def save_tensor_file(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Atomically save ``{name: tensor}`` as safetensors (``.safetensors``) or torch."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return atomic_save_torch(dict(tensors), path)
    from safetensors.torch import save

    contiguous = {k: v.detach().contiguous() for k, v in tensors.items()}
    return atomic_write_bytes(path, save(contiguous, metadata=dict(metadata or {})))
