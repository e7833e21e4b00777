"""Checkpoints: Meta's LLaMA folders, the released adapter file, and our own saves.

- ``load_llama(dir)``: ``params.json`` + ``consolidated.NN.pth`` (model-parallel shards are
  concatenated along the dimension Meta split them on).
- ``load_adapter(model, file)``: ``{'model': state_dict}`` holding exactly the adapter's
  parameters (``adapter_keys``), under ``llama.`` or the old ``llma.`` spelling.
- ``save_trainable(model, file, extra)``: the adapter parameters plus both configurations,
  written atomically (torch or ``.safetensors``).
- ``load(llama_dir, adapter_checkpoint, llama_type)``: the reference's entry point.

Every load checks missing keys, unexpected keys and shapes, and names them in the error;
tensors are read with ``torch.load(weights_only=True)`` or safetensors only.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.io import (
    atomic_save_torch,
    atomic_write_bytes,
    load_tensor_file,
    read_json,
    save_tensor_file,
    write_json_atomic,
)
from ibllm_lab.llama import Device, Llama, meta_keys
from ibllm_lab.peft import adapter_keys

log = logging.getLogger(__name__)

__all__ = [
    "CheckpointError",
    "merge_shards",
    "load_llama",
    "save_llama",
    "load_base_weights",
    "read_adapter_file",
    "infer_adapter_config",
    "load_adapter",
    "save_trainable",
    "load",
]


class CheckpointError(ValueError):
    """A checkpoint does not match the model: names the file and the offending keys."""


# Meta's model-parallel split dimension per weight (ColumnParallel: 0, RowParallel and
# ParallelEmbedding: 1); norms are replicated on every shard.
_SHARD_DIM = {
    "wq": 0,
    "wk": 0,
    "wv": 0,
    "w1": 0,
    "w3": 0,
    "output": 0,
    "wo": 1,
    "w2": 1,
    "tok_embeddings": 1,
}
_IGNORED_META_KEYS = ("rope.freqs",)  # LLaMA 1 files store the rotary table; we recompute it


def _shard_dim(key: str) -> int | None:
    if key.endswith("norm.weight"):
        return None
    name = key.split(".")[-2]
    if name not in _SHARD_DIM:
        raise CheckpointError(f"unknown key {key!r} in a Meta checkpoint shard")
    return _SHARD_DIM[name]


def merge_shards(
    shards: list[Mapping[str, torch.Tensor]], names: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Concatenate Meta's model-parallel shards into one state dict."""
    names = names or [f"shard {i}" for i in range(len(shards))]
    shards = [{k: v for k, v in s.items() if k not in _IGNORED_META_KEYS} for s in shards]
    if len(shards) == 1:
        return dict(shards[0])
    keys = set(shards[0])
    for shard, name in zip(shards[1:], names[1:], strict=True):
        if set(shard) != keys:
            diff = sorted(set(shard) ^ keys)[:10]
            raise CheckpointError(f"{name} and {names[0]} hold different keys, e.g. {diff}")
    merged = {}
    for key in shards[0]:
        dim = _shard_dim(key)
        parts = [s[key] for s in shards]
        merged[key] = parts[0] if dim is None else torch.cat(parts, dim=dim)
    return merged


def _find_shards(folder: Path) -> list[Path]:
    shards = sorted(folder.glob("consolidated.*.pth")) or sorted(
        folder.glob("consolidated.*.safetensors")
    )
    if not shards:
        raise FileNotFoundError(f"no consolidated.*.pth files in {folder}")
    return shards


def _read_shard(path: Path) -> dict[str, torch.Tensor]:
    """A shard, memory-mapped when its format allows (large files load lazily)."""
    if path.suffix != ".pth":
        return load_tensor_file(path)
    try:
        return load_tensor_file(path, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch format cannot be memory-mapped
        return load_tensor_file(path)


def load_llama(
    llama_dir: str | os.PathLike, **overrides: Any
) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """Read a Meta folder (``params.json``, ``consolidated.NN.pth``): returns the merged
    state dict (Meta keys) and its ``LlamaConfig``. ``vocab_size`` comes from the
    ``tok_embeddings`` shape when ``params.json`` says -1; ``overrides`` set run-time fields
    such as ``max_seq_len``."""
    folder = Path(llama_dir)
    params_path = folder / "params.json"
    if not params_path.is_file():
        raise FileNotFoundError(f"no params.json in {folder}")
    shards = _find_shards(folder)
    state = merge_shards([_read_shard(p) for p in shards], [str(p) for p in shards])
    if "tok_embeddings.weight" not in state:
        raise CheckpointError(f"{shards[0]}: no tok_embeddings.weight; not a Meta checkpoint")
    vocab = state["tok_embeddings.weight"].shape[0]
    declared = read_json(params_path).get("vocab_size", -1)
    if declared > 0 and declared != vocab:
        raise CheckpointError(
            f"{params_path}: vocab_size {declared} but tok_embeddings has {vocab} rows"
        )
    cfg = LlamaConfig.from_params_json(params_path, **({"vocab_size": vocab} | overrides))
    return state, cfg


def save_llama(
    llama: Llama,
    cfg: LlamaConfig,
    out_dir: str | os.PathLike,
    tokenizer_model: str | os.PathLike | None = None,
) -> Path:
    """Write ``llama``'s Meta-layout weights as ``out_dir/{params.json, consolidated.00.pth}``
    (and copy ``tokenizer.model`` there when given). PEFT / adapter parameters are not part
    of Meta's format and are not written."""
    out = Path(out_dir)
    state = llama.state_dict()
    weights = {k: state[k].detach().clone() for k in meta_keys(cfg)}
    atomic_save_torch(weights, out / "consolidated.00.pth")
    write_json_atomic(out / "params.json", cfg.to_params_json())
    if tokenizer_model is not None:
        atomic_write_bytes(out / "tokenizer.model", Path(tokenizer_model).read_bytes())
    return out


def _check_keys(
    source: str,
    provided: Mapping[str, torch.Tensor],
    expected: Iterable[str],
    targets: Mapping[str, torch.Tensor],
) -> None:
    """Raise ``CheckpointError`` naming missing / unexpected keys and shape mismatches."""
    expected = set(expected)
    missing = sorted(expected - set(provided))
    unexpected = sorted(set(provided) - expected)
    shapes = [
        f"{k}: checkpoint {tuple(provided[k].shape)} vs model {tuple(targets[k].shape)}"
        for k in sorted(expected & set(provided))
        if tuple(provided[k].shape) != tuple(targets[k].shape)
    ]

    def listing(title: str, items: list[str]) -> str:
        shown = ", ".join(items[:20]) + (f", ... ({len(items)} in all)" if len(items) > 20 else "")
        return f"\n  {title}: {shown}"

    problems = ""
    if missing:
        problems += listing("missing keys", missing)
    if unexpected:
        problems += listing("unexpected keys", unexpected)
    if shapes:
        problems += listing("shape mismatches", shapes)
    if problems:
        raise CheckpointError(f"{source} does not match the model:{problems}")


def _copy_into(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    targets = module.state_dict()
    with torch.no_grad():
        for key, value in state.items():
            targets[key].copy_(value)


def load_base_weights(
    llama: Llama, state: Mapping[str, torch.Tensor], source: str = "LLaMA"
) -> None:
    """Copy Meta-layout weights into ``llama`` (any subclass), checking keys and shapes."""
    _check_keys(source, state, meta_keys(llama.cfg), llama.state_dict())
    _copy_into(llama, state)


_META_FIELD = "ibllm"  # safetensors metadata key holding our JSON metadata


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an adapter checkpoint: ``(state_dict, metadata)``. Accepts ``{'model': sd, ...}``
    (the released format; other entries become metadata), a bare state dict, or safetensors.
    The old ``llma.`` prefix is renamed to ``llama.``."""
    path = Path(path)
    obj = load_tensor_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    if path.suffix == ".safetensors":
        raw_meta = obj.pop("__metadata__", {})
        meta = json.loads(raw_meta.get(_META_FIELD, "{}"))
        state = obj
    elif "model" in obj:
        state = obj["model"]
        meta = {k: v for k, v in obj.items() if k != "model"}
    else:
        state, meta = obj, {}
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors: {bad[:10]}")
    renamed = {re.sub(r"^llma\.", "llama.", k): v for k, v in state.items()}
    return renamed, meta


def infer_adapter_config(
    state: Mapping[str, torch.Tensor], llama_cfg: LlamaConfig
) -> AdapterConfig:
    """Reconstruct the ``AdapterConfig`` of an adapter state dict from its keys and shapes
    (the released file carries no configuration)."""
    if "image_bind_proj.weight" not in state:
        raise CheckpointError("adapter state dict has no image_bind_proj.weight")
    blocks = sum(1 for k in state if re.fullmatch(r"image_bind_norm_\d+\.weight", k))
    legacy = "image_bind_norm_1.bias" in state
    gates = [k for k in state if re.fullmatch(r"llama\.layers\.\d+\.attention\.gate", k)]
    lora = state.get("llama.layers.0.attention.lora_wq_l1.weight")
    values: dict[str, Any] = {
        "encoder_dim": state["image_bind_proj.weight"].shape[1],
        "bind_blocks": blocks,
        "bind_norm": "layer" if legacy else "rms",
        "bind_eps": 1e-5 if legacy else 1e-6,
        "w_bias": "llama.layers.0.attention.wq.bias" in state,
        "lora_rank": 0 if lora is None else lora.shape[0],
        "feature_norm": "feature_mean" in state,
    }
    if blocks:
        values["bind_hidden_ratio"] = state["image_bind_f1_1.weight"].shape[0] // llama_cfg.dim
    if "prefix_query.weight" not in state:
        values |= {"injection": "input_token", "query_layer": 0}
    else:
        rows = state["prefix_query.weight"].shape[0]
        query_layer = len(gates) or rows
        query_len = rows // query_layer
        injection = "ungated" if not gates else "gated" if query_len == 1 else "prefix_attention"
        values |= {"injection": injection, "query_layer": query_layer, "query_len": query_len}
    return AdapterConfig(**values)


def load_adapter(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Load an adapter checkpoint into ``model`` (an ``ImageBindLLM``), strictly: the file
    must hold exactly ``adapter_keys(model)`` with matching shapes. Returns its metadata."""
    state, meta = read_adapter_file(path)
    _check_keys(str(path), state, adapter_keys(model), model.state_dict())
    _copy_into(model, state)
    return meta


def save_trainable(
    model: nn.Module, path: str | os.PathLike, extra: Mapping[str, Any] | None = None
) -> Path:
    """Atomically save ``adapter_keys(model)`` (what either phase trains) with the model's
    ``llama_config`` / ``adapter_config`` and ``extra`` (plain values: step, phase, ...).
    ``.safetensors`` stores the metadata as JSON; otherwise ``{'model': sd, ...}`` (torch)."""
    path = Path(path)
    extra = dict(extra or {})
    if "model" in extra:
        raise ValueError("extra must not contain the key 'model'")
    state = model.state_dict()
    weights = {k: state[k].detach().cpu().clone() for k in sorted(adapter_keys(model))}
    meta = {
        "llama_config": dataclasses.asdict(model.llama_cfg),
        "adapter_config": model.adapter_cfg.to_dict(),
        **extra,
    }
    if path.suffix == ".safetensors":
        return save_tensor_file(weights, path, {_META_FIELD: json.dumps(meta)})
    return atomic_save_torch({"model": weights, **meta}, path)


def _resolve_llama_dir(llama_dir: Path, llama_type: str) -> tuple[Path, Path]:
    """``(weights folder, tokenizer.model)`` for the reference layout
    ``llama_dir/<llama_type>/params.json`` + ``llama_dir/tokenizer.model``, or a folder
    that holds ``params.json`` (and possibly ``tokenizer.model``) itself."""
    candidates = [llama_dir / llama_type, llama_dir]
    weights = next((c for c in candidates if (c / "params.json").is_file()), None)
    if weights is None:
        tried = ", ".join(str(c / "params.json") for c in candidates)
        raise FileNotFoundError(f"no LLaMA weights: looked for {tried}")
    tokenizers = [llama_dir / "tokenizer.model", weights / "tokenizer.model"]
    tokenizer = next((t for t in tokenizers if t.is_file()), None)
    if tokenizer is None:
        tried = ", ".join(str(t) for t in tokenizers)
        raise FileNotFoundError(f"no tokenizer.model: looked for {tried}")
    return weights, tokenizer


def _check_saved_llama(meta: Mapping[str, Any], cfg: LlamaConfig, path: Path) -> None:
    saved = meta.get("llama_config")
    if not saved:
        return
    fields = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "multiple_of")
    diff = [
        f"{f}: adapter {saved.get(f)} vs LLaMA {getattr(cfg, f)}"
        for f in fields
        if f in saved and saved[f] != getattr(cfg, f)
    ]
    if diff:
        raise CheckpointError(f"{path} was trained on another LLaMA: {'; '.join(diff)}")


def load(
    llama_dir: str | os.PathLike,
    adapter_checkpoint: str | os.PathLike | None = None,
    llama_type: str = "7B",
    device: Device = None,
    dtype: torch.dtype | None = None,
    encoder=None,
    cache=None,
    adapter_cfg: AdapterConfig | None = None,
    max_seq_len: int = 512,
    max_batch_size: int = 32,
):
    """The reference's ``llama.load``: build an ``ImageBindLLM`` from a LLaMA folder
    (``llama_dir/<llama_type>/{params.json, consolidated.*.pth}`` and
    ``llama_dir/tokenizer.model``) and an optional adapter checkpoint (released
    ``{'model': sd}`` with ``llama.`` or ``llma.`` keys, or one of ours). The adapter
    configuration comes from ``adapter_cfg``, the file's metadata, or the file's keys and
    shapes; without a file, the ``reference`` preset (limited to the LLaMA's depth) with
    zero gates, i.e. exactly the base LLaMA. Returns the model in eval mode, frozen."""
    from ibllm_lab.model import ImageBindLLM
    from ibllm_lab.peft import mark_trainable
    from ibllm_lab.tokenizer import Tokenizer

    weights_dir, tokenizer_path = _resolve_llama_dir(Path(llama_dir), llama_type)
    tokenizer = Tokenizer(tokenizer_path)
    base, llama_cfg = load_llama(
        weights_dir, max_seq_len=max_seq_len, max_batch_size=max_batch_size
    )
    adapter_state, meta = (None, {})
    if adapter_checkpoint is not None:
        adapter_state, meta = read_adapter_file(adapter_checkpoint)
        _check_saved_llama(meta, llama_cfg, Path(adapter_checkpoint))
    if adapter_cfg is None:
        if "adapter_config" in meta:
            adapter_cfg = AdapterConfig(**meta["adapter_config"])
        elif adapter_state is not None:
            adapter_cfg = infer_adapter_config(adapter_state, llama_cfg)
        else:
            preset = AdapterConfig.from_name("reference")
            adapter_cfg = preset.replace(query_layer=min(preset.query_layer, llama_cfg.n_layers))
    log.info("loading ImageBind-LLM: %s, %s", llama_cfg, adapter_cfg)
    # Build without initialising (meta device), then allocate on the target device: a 7B
    # model is not randomly initialised only to be overwritten.
    with torch.device("meta"):
        model = ImageBindLLM(llama_cfg, adapter_cfg, tokenizer, encoder, cache, dtype=dtype)
    model = model.to_empty(device=device if device is not None else "cpu")
    load_base_weights(model.llama, base, str(weights_dir))
    del base
    if adapter_state is not None:
        _check_keys(str(adapter_checkpoint), adapter_state, adapter_keys(model), model.state_dict())
        _copy_into(model, adapter_state)
    else:
        model.reset_adapter_parameters()
    mark_trainable(model, "none")
    return model.eval()
