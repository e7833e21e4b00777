"""Configuration dataclasses for the LLaMA backbone and the ImageBind-LLM adapter.

Architecture numbers live in ``ibllm_lab/presets/*.json`` (``llama_<name>.json``,
``adapter_<name>.json``); ``from_name`` reads them. Derived values are properties, and
``__post_init__`` rejects inconsistent settings early with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

log = logging.getLogger(__name__)

__all__ = ["LlamaConfig", "AdapterConfig", "INJECTIONS", "BIND_NORMS", "preset_names"]

INJECTIONS = ("gated", "prefix_attention", "ungated", "input_token")
BIND_NORMS = ("rms", "layer")

# Keys of Meta's params.json that describe the architecture (the rest are our run-time knobs).
_PARAMS_JSON_KEYS = (
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "vocab_size",
    "multiple_of",
    "ffn_dim_multiplier",
    "norm_eps",
    "rope_theta",
)


def _read_preset(kind: str, name: str) -> dict[str, Any]:
    preset = resources.files("ibllm_lab") / "presets" / f"{kind}_{name}.json"
    if not preset.is_file():
        raise ValueError(f"unknown {kind} preset {name!r}; known: {preset_names(kind)}")
    return json.loads(preset.read_text(encoding="utf-8"))


def preset_names(kind: Literal["llama", "adapter"]) -> list[str]:
    """Names of the presets shipped for ``kind``."""
    folder = resources.files("ibllm_lab") / "presets"
    prefix = f"{kind}_"
    return sorted(
        p.name[len(prefix) : -len(".json")]
        for p in folder.iterdir()
        if p.name.startswith(prefix) and p.name.endswith(".json")
    )


def _check_fields(cls: type, values: dict[str, Any], source: str) -> None:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown {cls.__name__} fields {unknown}")


@dataclass(kw_only=True)
class LlamaConfig:
    """LLaMA v1/v2 architecture (Meta's ``ModelArgs``) plus run-time limits.

    ``vocab_size`` must be resolved (Meta's ``params.json`` stores -1; take it from the
    tokenizer or the checkpoint's ``tok_embeddings`` shape). ``n_kv_heads`` < ``n_heads``
    gives grouped-query attention (LLaMA 2 70B).
    """

    dim: int
    n_layers: int
    n_heads: int
    vocab_size: int
    n_kv_heads: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 512
    max_batch_size: int = 32

    def __post_init__(self) -> None:
        for name in ("dim", "n_layers", "n_heads", "multiple_of", "max_seq_len", "max_batch_size"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.vocab_size <= 0:
            raise ValueError(
                f"LlamaConfig.vocab_size must be positive, got {self.vocab_size} "
                "(params.json's -1 means: take it from the tokenizer or checkpoint)"
            )
        if self.n_kv_heads is not None and self.n_kv_heads <= 0:
            raise ValueError(f"LlamaConfig.n_kv_heads must be positive, got {self.n_kv_heads}")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even for rotary embeddings")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads {self.n_heads} not divisible by n_kv_heads {self.kv_heads}")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("norm_eps and rope_theta must be positive")
        if self.ffn_dim_multiplier is not None and self.ffn_dim_multiplier <= 0:
            raise ValueError(f"ffn_dim_multiplier must be positive, got {self.ffn_dim_multiplier}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (``n_kv_heads`` or ``n_heads``)."""
        return self.n_kv_heads if self.n_kv_heads is not None else self.n_heads

    @property
    def ffn_hidden_dim(self) -> int:
        """Meta's SwiGLU width: 11008 for dim 4096, multiple_of 256."""
        hidden = int(2 * 4 * self.dim / 3)
        if self.ffn_dim_multiplier is not None:
            hidden = int(self.ffn_dim_multiplier * hidden)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> LlamaConfig:
        """A preset from ``presets/llama_<name>.json`` (``"tiny"``, ``"7B"``), with overrides."""
        values = _read_preset("llama", name) | overrides
        _check_fields(cls, values, f"llama preset {name!r}")
        return cls(**values)

    @classmethod
    def from_params_json(cls, path: str | Path, **overrides: Any) -> LlamaConfig:
        """Read Meta's ``params.json``. Keys we do not model are ignored with a warning;
        ``vocab_size: -1`` must be overridden (``vocab_size=tokenizer.n_words``)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
        known = {f.name for f in dataclasses.fields(cls)}
        ignored = sorted(set(raw) - known)
        if ignored:
            log.warning("%s: ignoring params.json keys %s", path, ignored)
        values = {k: v for k, v in raw.items() if k in known} | overrides
        if values.get("vocab_size", -1) <= 0:
            raise ValueError(
                f"{path}: vocab_size is {values.get('vocab_size')}; pass vocab_size= "
                "(from the tokenizer or the checkpoint's tok_embeddings shape)"
            )
        return cls(**values)

    def to_params_json(self) -> dict[str, Any]:
        """The architecture as Meta's ``params.json`` dict (optional keys only when set)."""
        out = {k: getattr(self, k) for k in _PARAMS_JSON_KEYS}
        return {k: v for k, v in out.items() if v is not None}

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)


@dataclass(kw_only=True)
class AdapterConfig:
    """The ImageBind-LLM parts added to LLaMA (METHOD.md, data-flow steps 4-5 and PEFT).

    - ``encoder_dim``: width of the joint embedding space (ImageBind: 1024).
    - ``bind_blocks``: residual SwiGLU blocks of the bind network (hidden width
      ``bind_hidden_ratio * dim``); ``bind_norm`` ``"rms"`` (released model) or ``"layer"``
      (legacy: LayerNorm and biases on f1/f2/f3), with epsilon ``bind_eps``.
    - ``query_layer``: inject into the last ``query_layer`` layers; ``query_len`` adapter
      tokens per layer (``> 1`` only for ``prefix_attention``).
    - ``injection``: ``gated`` | ``prefix_attention`` | ``ungated`` | ``input_token``.
    - ``w_bias``: zero-initialised biases on wq, wo, w1, w2, w3; ``lora_rank``: LoRA on
      wq wk wv wo w1 w2 w3 (0 = off).
    - ``feature_norm``: standardise each feature dimension with the pre-training features'
      mean and standard deviation, then L2-normalise, before the bind network (buffers
      ``feature_mean`` / ``feature_std``, saved in adapter checkpoints; all-zero features, no
      perceptual input, stay zero). Not part of the released model (off by default).
    """

    encoder_dim: int = 1024
    bind_blocks: int = 3
    bind_norm: Literal["rms", "layer"] = "rms"
    bind_eps: float = 1e-6
    bind_hidden_ratio: int = 4
    query_layer: int = 32
    query_len: int = 1
    injection: Literal["gated", "prefix_attention", "ungated", "input_token"] = "gated"
    w_bias: bool = True
    lora_rank: int = 16
    feature_norm: bool = False

    def __post_init__(self) -> None:
        if self.injection not in INJECTIONS:
            raise ValueError(f"injection {self.injection!r} not in {INJECTIONS}")
        if self.bind_norm not in BIND_NORMS:
            raise ValueError(f"bind_norm {self.bind_norm!r} not in {BIND_NORMS}")
        for name in ("encoder_dim", "query_len", "bind_hidden_ratio"):
            if getattr(self, name) <= 0:
                raise ValueError(f"AdapterConfig.{name} must be positive")
        if self.bind_blocks < 0 or self.lora_rank < 0 or self.query_layer < 0:
            raise ValueError("bind_blocks, lora_rank and query_layer must be >= 0")
        if self.injection in ("gated", "ungated", "input_token") and self.query_len != 1:
            raise ValueError(
                f"injection {self.injection!r} uses one adapter token (query_len 1); "
                f"got query_len {self.query_len}: use injection='prefix_attention'"
            )
        if self.injection != "input_token" and self.query_layer == 0:
            raise ValueError(f"injection {self.injection!r} needs query_layer >= 1")

    @property
    def uses_prefix(self) -> bool:
        """Whether layers receive adapter tokens (all modes but ``input_token``)."""
        return self.injection != "input_token"

    @property
    def gated(self) -> bool:
        return self.injection in ("gated", "prefix_attention")

    def check_against(self, llama: LlamaConfig) -> None:
        """Raise if this adapter does not fit ``llama``."""
        if self.uses_prefix and self.query_layer > llama.n_layers:
            raise ValueError(
                f"query_layer {self.query_layer} > n_layers {llama.n_layers} of the LLaMA"
            )

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> AdapterConfig:
        """A preset from ``presets/adapter_<name>.json`` (``"reference"``, ``"tiny"``)."""
        values = _read_preset("adapter", name) | overrides
        _check_fields(cls, values, f"adapter preset {name!r}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> AdapterConfig:
        return dataclasses.replace(self, **changes)
