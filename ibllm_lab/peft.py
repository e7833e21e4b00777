"""Parameter-efficient tuning of LLaMA (METHOD.md, "Parameter-efficient tuning and phases").

- Bias: ``wq``, ``wo``, ``w1``, ``w2``, ``w3`` carry a zero-initialised bias.
- LoRA: rank ``r`` on ``wq wk wv wo w1 w2 w3`` as sibling modules ``lora_<name>_l1``
  (down, no bias) and ``lora_<name>_l2`` (up, no bias, zero-initialised); a projection's
  output is ``base(x) + l2(l1(x))`` with no scaling factor.

Both extend ``llama.py`` by subclassing (``PEFTAttention``, ``PEFTFeedForward``,
``PEFTBlock``); at initialisation the model equals the plain LLaMA. When a projection and its
LoRA pair are all frozen fp32 (pre-training, inference on CPU), ``base(x) + l2(l1(x))`` is
computed as one matmul with the merged weight ``W + l2 @ l1``, a copy kept in a
``DerivedCache`` (the state dict is unchanged; half-precision weights are never merged:
rounding ``W + BA`` to 8 bits of mantissa would swamp the LoRA term).

Which parameters train is an explicit, named filter per phase (``PHASE_PATTERNS``), tested
by its exact key set.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ibllm_lab.config import LlamaConfig
from ibllm_lab.llama import Attention, DerivedCache, Device, FeedForward, Llama, TransformerBlock

__all__ = [
    "ATTENTION_BIASES",
    "FFN_BIASES",
    "PHASES",
    "PHASE_PATTERNS",
    "PEFTAttention",
    "PEFTFeedForward",
    "PEFTBlock",
    "peft_llama",
    "trainable_keys",
    "mark_trainable",
    "adapter_keys",
    "cast_frozen",
]

ATTENTION_BIASES = ("wq", "wo")
FFN_BIASES = ("w1", "w2", "w3")
ATTENTION_LORA = ("wq", "wk", "wv", "wo")
FFN_LORA = ("w1", "w2", "w3")


FEATURE_STATS = ("feature_mean", "feature_std")  # AdapterConfig.feature_norm buffers


def _add_lora(module: nn.Module, names: Iterable[str], rank: int, device: Device, dtype) -> None:
    """Give ``module`` siblings ``lora_<name>_l1`` / ``_l2`` for each projection ``name``."""
    for name in names:
        base: nn.Linear = getattr(module, name)
        down = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=dtype)
        up = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=dtype)
        nn.init.zeros_(up.weight)  # zero-init: the adapted layer starts equal to the base
        setattr(module, f"lora_{name}_l1", down)
        setattr(module, f"lora_{name}_l2", up)


def _mergeable(*weights: torch.Tensor) -> bool:
    """Frozen fp32 weights (merging rounds ``W + BA`` once; in half precision that loses the
    LoRA term). Under ``torch.compile`` the plain form is left to the compiler."""
    return (
        all(w.dtype == torch.float32 and not w.requires_grad for w in weights)
        and not torch.compiler.is_compiling()
    )


def _project_with_lora(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``base(x) + l2(l1(x))``; one matmul with the cached merged weight when all frozen."""
    base = getattr(module, name)
    if not module.lora_rank:
        return base(x)
    down = getattr(module, f"lora_{name}_l1").weight  # (rank, in)
    up = getattr(module, f"lora_{name}_l2").weight  # (out, rank)
    if _mergeable(base.weight, down, up):
        cache = module.merged.setdefault(name, DerivedCache())
        weight = cache.get((base.weight, down, up), lambda: base.weight + up @ down)
        return F.linear(x, weight, base.bias)
    return base(x) + F.linear(F.linear(x, down), up)


class PEFTAttention(Attention):
    """``Attention`` with optional zero-init biases on wq/wo and LoRA on wq wk wv wo."""

    def __init__(
        self,
        cfg: LlamaConfig,
        lora_rank: int = 0,
        w_bias: bool = False,
        device: Device = None,
        dtype=None,
    ):
        super().__init__(cfg, ATTENTION_BIASES if w_bias else (), device, dtype)
        self.lora_rank = lora_rank
        self.merged: dict[str, DerivedCache] = {}  # projection -> W + l2 @ l1 while frozen
        if lora_rank:
            _add_lora(self, ATTENTION_LORA, lora_rank, device, dtype)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _project_with_lora(self, name, x)


class PEFTFeedForward(FeedForward):
    """``FeedForward`` with optional zero-init biases and LoRA on w1 w2 w3."""

    def __init__(
        self,
        dim: int,
        hidden: int,
        lora_rank: int = 0,
        w_bias: bool = False,
        device: Device = None,
        dtype=None,
    ):
        super().__init__(dim, hidden, FFN_BIASES if w_bias else (), device, dtype)
        self.lora_rank = lora_rank
        self.merged: dict[str, DerivedCache] = {}  # projection -> W + l2 @ l1 while frozen
        if lora_rank:
            _add_lora(self, FFN_LORA, lora_rank, device, dtype)

    def project(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _project_with_lora(self, name, x)


class PEFTBlock(TransformerBlock):
    """A ``TransformerBlock`` whose attention and feed-forward carry bias / LoRA."""

    def __init__(
        self,
        layer_id: int,
        cfg: LlamaConfig,
        device: Device = None,
        dtype=None,
        lora_rank: int = 0,
        w_bias: bool = False,
        attention: nn.Module | None = None,
    ):
        if attention is None:
            attention = PEFTAttention(cfg, lora_rank, w_bias, device, dtype)
        feed_forward = PEFTFeedForward(
            cfg.dim, cfg.ffn_hidden_dim, lora_rank, w_bias, device, dtype
        )
        super().__init__(layer_id, cfg, device, dtype, attention, feed_forward)


def peft_llama(
    cfg: LlamaConfig, lora_rank: int, w_bias: bool, device: Device = None, dtype=None
) -> Llama:
    """A ``Llama`` whose every layer carries bias / LoRA parameters (no adapter)."""
    block = partial(PEFTBlock, lora_rank=lora_rank, w_bias=w_bias)
    return Llama(cfg, device, dtype, make_block=block)


# -- which parameters train in each phase -----------------------------------------------------
_LAYER = r"llama\.layers\.\d+\."
PHASE_PATTERNS: dict[str, tuple[str, ...]] = {
    # bind network, prefix query and every gate
    "pretrain": (
        r"image_bind_(proj|norm_\d+|f[123]_\d+)\.(weight|bias)",
        r"prefix_query\.weight",
        _LAYER + r"attention\.gate",
    ),
    # LLaMA's norms, biases and LoRA
    "finetune": (
        r"llama\.norm\.weight",
        _LAYER + r"(attention_norm|ffn_norm)\.weight",
        _LAYER + r"(attention\.w[qo]|feed_forward\.w[123])\.bias",
        _LAYER + r"(attention\.lora_w[qkvo]|feed_forward\.lora_w[123])_l[12]\.weight",
    ),
    "none": (),
}
PHASES = tuple(PHASE_PATTERNS)
_PHASE_RE = {
    phase: re.compile("|".join(f"(?:{p})" for p in patterns)) if patterns else None
    for phase, patterns in PHASE_PATTERNS.items()
}


def trainable_keys(model: nn.Module, phase: str) -> set[str]:
    """Names of ``model``'s parameters that train in ``phase`` (``"pretrain"``,
    ``"finetune"`` or ``"none"``)."""
    if phase not in _PHASE_RE:
        raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
    regex = _PHASE_RE[phase]
    if regex is None:
        return set()
    return {name for name, _ in model.named_parameters() if regex.fullmatch(name)}


def mark_trainable(model: nn.Module, phase: str) -> list[str]:
    """Freeze everything, then unfreeze ``trainable_keys(model, phase)``; returns those names
    sorted."""
    keys = trainable_keys(model, phase)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keys)
    return sorted(keys)


def adapter_keys(model: nn.Module) -> set[str]:
    """Everything the method trains in either phase: what an adapter checkpoint holds (plus
    ``feature_norm``'s statistics, buffers set before pre-training, when the model has them)."""
    stats = {k for k, _ in model.named_buffers() if k in FEATURE_STATS}
    return trainable_keys(model, "pretrain") | trainable_keys(model, "finetune") | stats


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast frozen parameters (``requires_grad=False``) to ``dtype`` (e.g. fp16) and keep
    trainable ones in fp32, as the method trains. Run the forward under ``torch.autocast``
    so mixed-dtype linears work. Buffers (rotary tables) stay fp32."""
    with torch.no_grad():
        for param in model.parameters():
            target = torch.float32 if param.requires_grad else dtype
            if param.dtype != target:
                param.data = param.data.to(target)
    return model
