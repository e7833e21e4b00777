"""The trainer: base language model, pre-training and fine-tuning phases (METHOD.md).

Parts, from small to whole:

- :class:`TrainConfig` (one phase's hyper-parameters; presets as data in ``PRESETS``);
- the method's optimiser semantics: :func:`param_groups` (no weight decay on biases and 1-d
  parameters), :func:`scaled_lr` (``base_lr * effective_batch / 256``) and :class:`WarmupCosine`
  (per-iteration linear warm-up, then half-cycle cosine to ``min_lr``);
- :class:`DistEnv` (torchrun's environment; gloo on CPU, nccl on CUDA);
- :func:`train_phase`: the loop (gradient accumulation, autocast on GPU, DDP, tqdm, a metrics
  CSV with loss, lr and ``tanh(gate)`` per layer and head, atomic checkpoints with optimiser,
  scheduler, data position and RNG state, and exact resume);
- :func:`train_base_lm`: the embedded default's tiny LLaMA and SentencePiece tokenizer, trained
  on the world's text and saved in Meta's format;
- :func:`train_adapter` (one adapter phase on a generated world), :func:`train_pipeline`
  (base LM, then both phases), :func:`train` (the library form of ``ibllm-lab train``) and
  :func:`cli`.

Phases follow METHOD.md: pre-training trains the bind network, ``prefix_query`` and the gates
on image captions; fine-tuning trains LLaMA's norms, biases and LoRA on image instructions
(first turn) plus text-only instructions (features of zeros). The trainable sets are
``ibllm_lab.peft.mark_trainable``'s. For a 7B LLaMA on several GPUs, ``fsdp=True`` shards
the model under torchrun instead of replicating it (DDP); only DDP is tested (gloo, CPU).

A resumed run replays exactly: the data order is a pure function of ``(seed, epoch)``
(:class:`ibllm_lab.data.ShardedOrder`), the checkpoint records the step reached, and the
optimiser, scheduler, gradient scaler and RNG states are restored.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import math
import os
import random
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ibllm_lab.data import ShardedOrder, collate
from ibllm_lab.io import atomic_save_torch, atomic_write_text, safe_torch_load

logger = logging.getLogger(__name__)

PHASES = ("base-lm", "pretrain", "finetune")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
CAPTION_SOURCES = ("file", "canonical")
# TrainConfig.compile_blocks: torch.compile mode per LLaMA block ("reduce-overhead" adds CUDA
# graphs); measured at 7B on an H200 in benchmarks/README.md
COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune")
_GATE = re.compile(r"layers\.(\d+)\.attention\.gate$")


# ------------------------------------------------------------------------------- config
@dataclass
class TrainConfig:
    """Hyper-parameters of one training phase.

    ``batch_size`` is per process and per micro-step; the effective batch is
    ``batch_size * accum_iter * world_size`` and the peak learning rate
    ``base_lr * effective_batch / 256``. ``warmup_epochs`` may be fractional; the schedule is
    evaluated per iteration. ``amp``: autocast dtype on GPU ("bf16", "fp16" or "none"); on CPU
    training is fp32. ``stop_after``: stop (with a checkpoint) after that many optimiser steps
    without changing the schedule, which simulates an interruption.
    """

    phase: str = "pretrain"
    epochs: int = 1
    batch_size: int = 8
    accum_iter: int = 1
    base_lr: float = 1e-3
    min_lr: float = 0.0
    warmup_epochs: float = 0.0
    weight_decay: float = 0.05
    max_words: int = 96
    clip_grad: float | None = None
    seed: int = 0
    log_every: int = 10
    save_every: int = 0  # optimiser steps between checkpoints; 0 = only at the end
    amp: str = "bf16"
    stop_after: int | None = None
    threads: int = 2  # torch CPU threads per process
    fsdp: bool = False  # shard with FSDP instead of DDP (7B on several GPUs; see train_phase)
    captions: str = "file"  # pre-training captions from a world: "file" or "canonical"
    compile_blocks: str | None = None  # torch.compile each LLaMA block in this mode (GPU speed)
    # batches of similar lengths: each run of this many batches is re-cut from its examples
    # sorted by token count (ShardedOrder); 0 = plain shuffled batches. Off in every preset:
    # on the default world, 8 cut the padded tokens of fine-tuning batches to 0.59 and its
    # time by about a third, but the loss is a mean per batch, so short answers weigh more,
    # and the LLaMA's image answers fell 0.937 -> 0.881 (video 0.929 -> 0.870, 445 scenes)
    group_by_length: int = 0

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r}: expected one of {PHASES}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp {self.amp!r}: expected one of {sorted(AMP_DTYPES)}")
        for name in ("epochs", "batch_size", "accum_iter", "max_words", "log_every", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.group_by_length < 0:
            raise ValueError(f"group_by_length must be >= 0, got {self.group_by_length}")
        if self.base_lr <= 0 or self.min_lr < 0 or self.weight_decay < 0:
            raise ValueError("base_lr must be > 0, min_lr and weight_decay >= 0")
        if self.captions not in CAPTION_SOURCES:
            raise ValueError(f"captions {self.captions!r}: expected one of {CAPTION_SOURCES}")
        if self.compile_blocks not in COMPILE_MODES:
            raise ValueError(
                f"compile_blocks {self.compile_blocks!r}: expected one of {COMPILE_MODES}"
            )
        if not 0 <= self.warmup_epochs <= self.epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} outside [0, epochs]")

    @classmethod
    def from_name(cls, name: str, phase: str, **overrides: Any) -> TrainConfig:
        """A preset from ``PRESETS[name][phase]`` with optional overrides."""
        if name not in PRESETS:
            raise ValueError(f"unknown training preset {name!r}; expected one of {sorted(PRESETS)}")
        if phase not in PRESETS[name]:
            raise ValueError(f"preset {name!r} has no phase {phase!r}")
        return cls(phase=phase, **{**PRESETS[name][phase], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Presets as data: PRESETS[name][phase] = common settings | the phase's own. "reference"
# mirrors the released recipe's semantics (7B on GPUs, fp16). "default" and "quick" are sized
# for the embedded world on two CPU cores: peak lr 0.02 is about the largest at which the
# bind network stays stable here (0.04 diverged, 0.005 learned slower). Measured on the
# default world's test scenes of seen shape-colour combinations (image attribute answers,
# shape / colour / size / position / count, one run each):
#   base LM 1 epoch, pre-train 6, fine-tune 4:    0.94 / 0.43 / 0.99 / 0.58 / 0.98
#   base LM 1 epoch, pre-train 18, fine-tune 4:   0.99 / 0.98 / 0.99 / 0.58 / 0.99
#   base LM 8 epochs, pre-train 18, fine-tune 4:  0.85 / 0.88 / 0.99 / 0.98 / 0.94
#   base LM 8 epochs, pre-train 18, fine-tune 6:  0.93 / 0.93 / 0.99 / 0.99 / 0.93
#                                   (seed 1):     0.87 / 0.98 / 1.00 / 0.96 / 0.90
# Pre-training on batches of 16 (twice the steps at half the peak lr) makes colour reliable:
# seeds 0-3, colour on seen combinations 0.96 / 0.97 / 0.96 / 0.97 against 0.72 / 0.95 / 0.96 /
# 0.94 with batches of 32; shape 0.83-0.88 either way (batches of 8: colour 0.98 / 0.95). The
# base LM then trains 7 epochs instead of 8 to keep within the 300 s budget
# (bench_training.py); with the current encoders (seen combinations, 445 test scenes):
#   base LM 7 epochs, pre-train 18 (batch 16), fine-tune 6: 0.98 / 0.96 / 0.99 / 1.00 / 1.00
# A base LM trained 1-4 epochs does not let fine-tuning learn the second word of a position
# ("top *left*"); pre-training decides how much colour the bind network keeps (frozen in
# fine-tuning); the frozen tiny LM barely uses the injected vector in pre-training (caption
# colour words stay near chance), so its effect on the bind output drifts from run to run.
# The "tiny" adapter preset standardises the features before the bind network
# (AdapterConfig.feature_norm; two image embeddings have cosine 0.29 on average, a shared
# direction): on 300 test scenes, seeds 0-2, image shape answers 0.89 -> 0.92-0.94 (held-out
# combinations 0.71 -> 0.82-0.85), colour 0.87 -> 0.87-0.88 (held-out 0.67 -> 0.67-0.71).
# Centring alone did worse (colour 0.78, held-out 0.44). The transfer table (445 scenes):
# image attribute answers 0.946 -> 0.958 (held-out combinations 0.87 -> 0.90).
# The default world asks 4 questions per train scene (WORLD_PRESETS; it was 2), so the
# corpus is 1.6 times larger: the base LM trains 5 epochs (was 7; 1905 steps against 1617)
# and fine-tuning 3 (was 6: the same steps over twice the questions). With the "tiny"
# preset's linear bind network (bind_blocks 0, was 3), on 445 test scenes, one run each
# (attribute answers on carried attributes, no cache; image / audio / point / video / depth):
#   2 questions, 3 bind blocks, base LM 7, fine-tune 6:  0.958 / 0.826 / 0.855 / 0.879 / 0.875
#   2 questions, linear, same base LM (seeds 0, 1):      0.945 / 0.896 / 0.890 / 0.901 / 0.899
#                                                        0.939 / 0.900 / 0.898 / 0.902 / 0.908
#   4 questions, 3 bind blocks, fine-tune 3, same LM:    0.958 / 0.844 / 0.856 / -     / -
#   4 questions, linear, fine-tune 3, same LM (seeds 0, 1):
#                                                        0.974 / 0.901 / 0.910 / 0.912 / 0.914
#                                                        0.963 / 0.908 / 0.921 / 0.921 / 0.922
#   4 questions, linear, fine-tune 3, base LM 4 epochs:  0.947 / 0.906 / 0.897 / 0.913 / 0.908
#                                                (seed 1) 0.962 / 0.901 / 0.894 / 0.910 / 0.899
#   4 questions, linear, fine-tune 3, base LM 5 epochs:  0.981 / 0.928 / 0.924 / 0.917 / 0.909
#                                                (seed 1) 0.961 / 0.893 / 0.910 / 0.910 / 0.928
# With the method's cache, audio is the closest to 0.9 over these six runs (0.892-0.901).
#   6 questions, linear, fine-tune 2, the first LM:      0.956 / 0.898 / 0.898 / 0.898 / 0.897
# The linear bind network maps every modality's features the same way; three SwiGLU blocks
# fit the image features of seen combinations more closely and transfer worse to the other
# modalities (and to held-out combinations).
_PRESET_TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "reference": {
        "common": dict(batch_size=4, base_lr=1e-4, min_lr=0.0, warmup_epochs=1, amp="fp16"),
        "pretrain": dict(epochs=3, accum_iter=16, weight_decay=0.05, max_words=96),
        "finetune": dict(epochs=4, accum_iter=8, weight_decay=0.02, max_words=512),
    },
    "default": {
        "common": dict(
            batch_size=32, min_lr=1e-4, warmup_epochs=0.1, log_every=20, captions="canonical"
        ),
        # Images show motion and the image tower is additive (ENCODER_PRESETS), and the LLaMA
        # reads those features worse: the same base LM and pre-training (445 test scenes, no
        # cache; image / video / audio / point / depth), fine-tuned 3 epochs: 0.881 / 0.864 /
        # 0.899 / 0.890 / 0.918; 6 epochs: 0.935 / 0.913 / 0.928 / 0.915 / 0.916 (three bind
        # blocks, 3 epochs: image 0.813, video 0.785). The world then asks more attribute
        # questions (WORLD_PRESETS question_weights), and with that world: 4 epochs 0.949 /
        # 0.942 / 0.949 / 0.934 / 0.954, 5 epochs 0.962 / 0.949 / 0.943 / 0.930 / 0.944. The
        # base LM trains 3 epochs instead of 5 to pay for the longer fine-tuning (the 300 s
        # budget, bench_training.py); a fresh pipeline with it: 0.961 / 0.941 / 0.937 / 0.935
        # / 0.947 (every phase's seed 1: 0.937 / 0.925 / 0.954 / 0.949 / 0.947, image motion
        # 0.715). The base LM varies more from run to run than its epochs tell: with 4 epochs
        # and 4 or 5 fine-tuning epochs image answers were 0.936 and 0.943 (colour 0.83-0.85)
        "base-lm": dict(epochs=3, base_lr=0.08, weight_decay=0.05, max_words=96),
        "pretrain": dict(epochs=18, batch_size=16, base_lr=0.16, weight_decay=0.05, max_words=96),
        "finetune": dict(epochs=5, base_lr=0.16, weight_decay=0.02, max_words=512),
    },
    # "quick" pre-trains 8 epochs (27 -> 72 steps of 32, a few seconds): after 3, the linear
    # bind network's vector did not yet lower the answer loss (all gates zeroed: 2.305
    # against 2.306 with the trained gates; after 8: 2.308 against 2.280)
    "quick": {
        "common": dict(
            batch_size=32, min_lr=1e-4, warmup_epochs=0.1, log_every=5, captions="canonical"
        ),
        "base-lm": dict(epochs=1, base_lr=0.08, weight_decay=0.05, max_words=96),
        "pretrain": dict(epochs=8, base_lr=0.16, weight_decay=0.05, max_words=96),
        "finetune": dict(epochs=1, base_lr=0.16, weight_decay=0.02, max_words=512),
    },
}
PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    name: {
        phase: {**table["common"], **values} for phase, values in table.items() if phase != "common"
    }
    for name, table in _PRESET_TABLE.items()
}


# ------------------------------------------------------------------------- optimisation
def scaled_lr(cfg: TrainConfig, world_size: int = 1) -> float:
    """The method's peak learning rate ``base_lr * effective_batch / 256``."""
    return cfg.base_lr * cfg.batch_size * cfg.accum_iter * world_size / 256


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups over trainable parameters: biases and parameters with ``ndim <= 1`` get no
    weight decay (timm's rule, as in the reference); everything else gets ``weight_decay``."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


class WarmupCosine:
    """Per-iteration linear warm-up from 0 to ``lr`` over ``warmup`` steps, then half-cycle
    cosine from ``lr`` to ``min_lr`` at ``total``. Step ``s`` uses ``lr_at(s)``; the reference
    evaluates the same formula at the fractional epoch ``s / steps_per_epoch``."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, warmup: int, total: int
    ):
        if total < 1 or not 0 <= warmup <= total:
            raise ValueError(f"need 0 <= warmup ({warmup}) <= total ({total}), total >= 1")
        self.optimizer, self.lr, self.min_lr = optimizer, lr, min_lr
        self.warmup, self.total, self.step_count = warmup, total, 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * step / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_at(self.step_count)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("lr", "min_lr", "warmup", "total", "step_count")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self._apply()


# ------------------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistEnv:
    """This process's place in a torchrun job (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls) -> DistEnv:
        env = os.environ
        return cls(
            int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0))
        )


def init_distributed(device: torch.device) -> DistEnv:
    """Initialise the process group from torchrun's environment when ``WORLD_SIZE > 1``
    (nccl on CUDA, gloo otherwise); a single process needs no group."""
    env = DistEnv.from_env()
    if env.distributed and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=env.rank, world_size=env.world_size)
    return env


def _all_reduce_mean(x: float, env: DistEnv, device: torch.device) -> float:
    if not env.distributed:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t) / env.world_size


# ------------------------------------------------------------------------------ metrics
def gate_values(model: nn.Module) -> dict[str, float]:
    """``tanh(gate)`` of every layer and head as ``{"gate_L{l}_H{h}": value}``."""
    out = {}
    for name, p in model.named_parameters():
        m = _GATE.search(name)
        if m:
            for h, v in enumerate(torch.tanh(p.detach().float()).reshape(-1).tolist()):
                out[f"gate_L{m.group(1)}_H{h}"] = v
    return out


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _read_metrics(path: Path, upto_step: int) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if int(r["step"]) <= upto_step]


# -------------------------------------------------------------------------------- loop
@dataclass
class TrainResult:
    """What :func:`train_phase` returns: final step, metrics rows, checkpoint path, seconds."""

    steps: int
    metrics: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    seconds: float = 0.0
    resumed_from: int = 0


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (``requires_grad``) as a detached CPU state dict."""
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rng_state(device: torch.device) -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def prepare_precision(model: nn.Module, device: torch.device, amp: str) -> None:
    """The method's precision on GPU: frozen parameters in half precision (``amp``: fp16 or
    bf16), trainable ones in fp32, forward under autocast. On CPU everything stays fp32."""
    from ibllm_lab.peft import cast_frozen

    half = AMP_DTYPES[amp]
    if device.type == "cuda" and half is not None:
        cast_frozen(model, half)


def compile_blocks(model: nn.Module, mode: str = "default") -> int:
    """``torch.compile`` every block of ``model.llama`` (or of ``model`` itself, a ``Llama``)
    in place, in ``mode``: regional compilation, one graph for all blocks of a kind, so that
    compiling costs one block's time, not the model's. Fuses the norms, rotary embedding and
    SwiGLU elementwise work; "reduce-overhead" also replays each block as a CUDA graph (the
    launch-bound small batches gain most). Returns the number of blocks compiled."""
    if mode is None or mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r}: expected one of {COMPILE_MODES[1:]}")
    llama = getattr(model, "llama", model)
    layers = getattr(llama, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no LLaMA blocks to compile")
    for block in layers:
        block.compile(mode=None if mode == "default" else mode)
    return len(layers)


def _wrap(model: nn.Module, env: DistEnv, device: torch.device, fsdp: bool) -> nn.Module:
    """DDP over ranks; with ``fsdp`` the model is sharded instead (``use_orig_params`` lets the
    frozen LLaMA and the trainable adapter share FSDP units; meant for 7B on several GPUs and
    not exercised by the CPU tests)."""
    if not env.distributed:
        return model
    if fsdp:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(model, device_id=device, use_orig_params=True)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def train_phase(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    device: torch.device | str = "cpu",
    env: DistEnv | None = None,
    resume: bool = True,
    extra: dict[str, Any] | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model``'s parameters that require grad on ``dataset``.

    ``model(tokens (B, T) long, labels (B, T) long, feats (B, D)) -> scalar loss``;
    ``dataset`` yields ``(tokens, labels, feats)`` (see :mod:`ibllm_lab.data`). Which
    parameters train is the caller's choice (``ibllm_lab.peft.mark_trainable``). Writes
    ``out_dir/metrics.csv`` and ``out_dir/checkpoint.pt``; with ``resume`` an existing
    checkpoint there is loaded and training continues from its step. ``extra`` (JSON-like) is
    stored in the checkpoint, e.g. the model configuration.
    """
    device = torch.device(device)
    env = env or DistEnv()
    out_dir = Path(out_dir)
    torch.set_num_threads(min(cfg.threads, torch.get_num_threads()))
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    prepare_precision(model, device, cfg.amp)
    if cfg.compile_blocks:
        compile_blocks(model, cfg.compile_blocks)
    lengths = getattr(dataset, "lengths", None) if cfg.group_by_length else None
    if cfg.group_by_length and lengths is None:
        raise ValueError(f"group_by_length needs a dataset with .lengths, not {type(dataset)}")
    order = ShardedOrder(
        len(dataset), env.world_size, env.rank, cfg.seed, group=cfg.group_by_length, lengths=lengths
    )
    per_epoch = order.n_batches(cfg.batch_size) // cfg.accum_iter
    if per_epoch < 1:
        raise ValueError(
            f"dataset of {len(dataset)} examples is too small for batch {cfg.batch_size} x "
            f"accum {cfg.accum_iter} x {env.world_size} processes"
        )
    total = per_epoch * cfg.epochs
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=0.0, betas=(0.9, 0.95))
    lr = scaled_lr(cfg, env.world_size)
    sched = WarmupCosine(optimizer, lr, cfg.min_lr, round(cfg.warmup_epochs * per_epoch), total)
    amp_dtype = AMP_DTYPES[cfg.amp] if device.type == "cuda" else None
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    step, rows, start = 0, [], 0
    ckpt_path = out_dir / CHECKPOINT
    if resume and ckpt_path.exists() and _same_run(ckpt_path, extra):
        step = _load_checkpoint(ckpt_path, model, optimizer, sched, scaler, cfg, device)
        rows = _read_metrics(out_dir / METRICS, step)
        start = step
        logger.info("resumed %s from step %d", ckpt_path, step)
    wrapped = _wrap(model, env, device, cfg.fsdp)
    wrapped.train()
    t0 = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=cfg.phase, disable=not (progress and env.is_main))
    losses: list[float] = []
    while step < total and (cfg.stop_after is None or step < cfg.stop_after):
        epoch, in_epoch = divmod(step, per_epoch)
        batches = order.batches(epoch, cfg.batch_size, start=in_epoch * cfg.accum_iter)
        for _ in range(per_epoch - in_epoch):
            micro = [next(batches) for _ in range(cfg.accum_iter)]
            loss = _optimizer_step(
                wrapped, dataset, micro, optimizer, scaler, cfg, device, amp_dtype
            )
            sched.step()
            step += 1
            losses.append(loss)
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                rows.append(_log_row(model, step, epoch, losses, sched, env, device))
                losses = []
                if env.is_main:
                    _write_metrics(out_dir / METRICS, rows)
                bar.set_postfix(loss=f"{rows[-1]['loss']:.3f}")
            stopping = cfg.stop_after is not None and step >= cfg.stop_after
            if (cfg.save_every and step % cfg.save_every == 0) or stopping or step == total:
                if env.is_main:
                    _save_checkpoint(
                        ckpt_path,
                        model,
                        optimizer,
                        sched,
                        scaler,
                        cfg,
                        step,
                        per_epoch,
                        device,
                        extra,
                    )
            if stopping:
                break
    bar.close()
    if env.distributed:
        dist.barrier()
    return TrainResult(step, rows, ckpt_path, time.perf_counter() - t0, start)


def _optimizer_step(
    wrapped: nn.Module,
    dataset: Dataset,
    micro: Sequence[list[int]],
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
    amp_dtype: torch.dtype | None,
) -> float:
    """One optimiser step over ``accum_iter`` micro-batches; returns their mean loss."""
    total = 0.0
    for i, idx in enumerate(micro):
        tokens, labels, feats = (x.to(device) for x in collate([dataset[j] for j in idx]))
        last = i == len(micro) - 1
        sync = nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
        autocast = (
            torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext()
        )
        with sync:
            with autocast:
                loss = wrapped(tokens, labels, feats)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"loss is {loss.item()} at micro-batch {idx}")
            scaler.scale(loss / cfg.accum_iter).backward()
        total += loss.item()
    if cfg.clip_grad is not None:
        scaler.unscale_(optimizer)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / len(micro)


def _log_row(
    model: nn.Module,
    step: int,
    epoch: int,
    losses: list[float],
    sched: WarmupCosine,
    env: DistEnv,
    device: torch.device,
) -> dict[str, Any]:
    loss = _all_reduce_mean(sum(losses) / max(len(losses), 1), env, device)
    # lr of the step just taken (the scheduler has already moved to the next one)
    return {
        "step": step,
        "epoch": epoch,
        "loss": loss,
        "lr": sched.lr_at(step - 1),
        **gate_values(model),
    }


def _save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sched: WarmupCosine,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    step: int,
    per_epoch: int,
    device: torch.device,
    extra: dict[str, Any] | None,
) -> None:
    epoch, in_epoch = divmod(step, per_epoch)
    state = {
        "trainable": trainable_state(model),
        "train_config": asdict(cfg),
        "extra": extra or {},
        "optimizer": optimizer.state_dict(),
        "scheduler": sched.state_dict(),
        "scaler": scaler.state_dict(),
        "position": {
            "step": step,
            "epoch": epoch,
            "step_in_epoch": in_epoch,
            "seed": cfg.seed,
            "steps_per_epoch": per_epoch,
        },
        "rng": _rng_state(device),
    }
    atomic_save_torch(state, path)


def _same_run(path: Path, extra: dict[str, Any] | None) -> bool:
    """Whether the checkpoint at ``path`` belongs to this run: its ``extra["fingerprint"]``
    (e.g. of the data) equals ours. A different one is ignored (training restarts)."""
    want = (extra or {}).get("fingerprint")
    have = safe_torch_load(path).get("extra", {}).get("fingerprint")
    if want != have:
        logger.info(
            "%s is from another run (fingerprint %s, not %s); starting afresh", path, have, want
        )
    return want == have


def _load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sched: WarmupCosine,
    scaler: torch.amp.GradScaler,
    cfg: TrainConfig,
    device: torch.device,
) -> int:
    state = safe_torch_load(path)
    saved = TrainConfig.from_dict(state["train_config"])
    free = {"stop_after", "log_every", "save_every", "threads", "amp", "fsdp", "compile_blocks"}
    changed = {
        f.name
        for f in fields(TrainConfig)
        if f.name not in free and getattr(saved, f.name) != getattr(cfg, f.name)
    }
    if changed:
        raise ValueError(f"{path} was written with different {sorted(changed)}; cannot resume")
    params = dict(model.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    if set(state["trainable"]) != trainable:
        missing, unexpected = (
            trainable - set(state["trainable"]),
            set(state["trainable"]) - trainable,
        )
        raise KeyError(
            f"{path}: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    with torch.no_grad():
        for n, v in state["trainable"].items():
            params[n].copy_(v)
    optimizer.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    _set_rng_state(state["rng"], device)
    return int(state["position"]["step"])


# -------------------------------------------------------------------------- base LM
class LMObjective(nn.Module):
    """Next-token cross-entropy for a bare LLaMA, with the trainer's call signature
    ``(tokens, labels, feats) -> loss`` (``feats`` ignored; label 0 ignored)."""

    def __init__(self, llama: nn.Module):
        super().__init__()
        self.llama = llama

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, feats: Any = None
    ) -> torch.Tensor:
        logits = self.llama(tokens)  # (B, T, vocab)
        return F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
            labels[:, 1:].reshape(-1),
            ignore_index=0,
        )


# ------------------------------------------------------------------- world training data
def world_examples(world: Any, phase: str, captions: str = "file") -> list[Any]:
    """The training examples of ``phase`` from a generated world's files (train split only).

    pretrain: ``pretrain.csv`` (one image caption per train scene, a random paraphrase) or,
    with ``captions="canonical"``, the same images with each scene's canonical description
    (``scene.captions[0]``: one fixed template, so the loss is not spent on guessing which
    paraphrase was drawn; measured to learn the attributes faster at this scale);
    finetune: ``instructions.json`` (LLaVA, first turn) plus ``alpaca.json`` (text-only);
    base-lm: all of these, so the LM knows the template, the vocabulary and the answers.
    """
    from ibllm_lab.data import Example, read_alpaca_json, read_llava_json, read_pretrain_csv

    root = Path(world.root)
    train_media = {s.files[m]: s for s in world.split("train") for m in s.files}
    pretrain = read_pretrain_csv(root / "pretrain.csv")
    instructions = read_llava_json(root / "instructions.json")
    alpaca = read_alpaca_json(root / "alpaca.json")
    for ex in pretrain + instructions:
        if ex.media not in train_media:
            raise ValueError(f"{root}: training data refers to non-train media {ex.media!r}")
    if captions == "canonical":
        pretrain = [
            Example(ex.instruction, train_media[ex.media].captions[0], media=ex.media)
            for ex in pretrain
        ]
    if phase == "pretrain":
        return pretrain
    if phase == "finetune":
        return instructions + alpaca
    if phase == "base-lm":
        return pretrain + instructions + alpaca
    raise ValueError(f"phase {phase!r}: expected one of {PHASES}")


def tokenizer_corpus(examples: Sequence[Any]) -> list[str]:
    """Sentences for SentencePiece: every training document (prompt followed by its answer),
    so the pieces match how answers are spelled right after "### Response:"."""
    return sorted({ex.prompt() + ex.output for ex in examples})


# Base-LM architectures as data: LlamaConfig presets plus the tokenizer's vocabulary size.
BASE_LM_PRESETS: dict[str, dict[str, Any]] = {
    "default": dict(llama="tiny", vocab_size=512, dim=64, n_layers=4, n_heads=4, multiple_of=32),
    "quick": dict(llama="tiny", vocab_size=448, dim=32, n_layers=2, n_heads=2, multiple_of=32),
}


def train_base_lm(
    world: Any,
    cfg: TrainConfig,
    out_dir: str | Path,
    *,
    arch: str = "default",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> Path:
    """Train the embedded default's base LM on ``world``'s text; returns ``out_dir``.

    A SentencePiece tokenizer (BPE, LLaMA's special ids) is trained on the corpus of
    :func:`world_examples` (``"base-lm"``), then a LLaMA of ``BASE_LM_PRESETS[arch]`` with the
    plain next-token objective on every token of ``prompt + answer`` documents. Written in
    Meta's format: ``params.json``, ``consolidated.00.pth`` and ``tokenizer.model``; the
    training run (metrics, checkpoint) is kept under ``out_dir/run``.
    """
    from ibllm_lab.checkpoint import save_llama
    from ibllm_lab.config import LlamaConfig
    from ibllm_lab.data import TokenDataset
    from ibllm_lab.llama import Llama
    from ibllm_lab.tokenizer import Tokenizer, train_tokenizer

    if cfg.phase != "base-lm":
        raise ValueError(f"train_base_lm needs a 'base-lm' TrainConfig, got {cfg.phase!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(BASE_LM_PRESETS[arch])
    examples = world_examples(world, "base-lm", cfg.captions)
    tok_path = train_tokenizer(
        tokenizer_corpus(examples), out_dir / "run" / "tokenizer", spec.pop("vocab_size")
    )
    tokenizer = Tokenizer(tok_path)
    llama_cfg = LlamaConfig.from_name(spec.pop("llama"), vocab_size=tokenizer.n_words, **spec)
    torch.manual_seed(cfg.seed)
    llama = Llama(llama_cfg, device=device)
    llama.init_weights(generator=torch.Generator(device=device).manual_seed(cfg.seed))
    docs = [ex.prompt() + ex.output for ex in examples]
    dataset = TokenDataset(docs, tokenizer, min(cfg.max_words, llama_cfg.max_seq_len))
    train_phase(
        LMObjective(llama),
        dataset,
        cfg,
        out_dir / "run",
        device=device,
        progress=progress,
        extra={"llama": llama_cfg.to_params_json(), "fingerprint": _fingerprint(world, arch)},
    )
    save_llama(llama, llama_cfg, out_dir, tokenizer_model=tok_path)
    return out_dir


# --------------------------------------------------------------------- adapter phases
def _fingerprint(world: Any, *parts: Any) -> str:
    return "-".join([world.fingerprint(), *map(str, parts)])


def _weights_hash(path: str | Path) -> str:
    """A hash of an adapter file's tensors (names, dtypes, shapes, values), not of its bytes:
    re-saving the same weights with other metadata (a finished phase run again with another
    thread count rewrites its file) keeps the next phase's fingerprint, so it resumes."""
    from ibllm_lab.checkpoint import read_adapter_file

    state, _ = read_adapter_file(path)
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def image_features(world: Any, encoder: Any, cache_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{media_key(image path): (D,) feature}`` for every scene, via the on-disk feature
    cache of ``ibllm_lab.encoders.compute_features``."""
    from ibllm_lab.data import features_by_media
    from ibllm_lab.encoders import compute_features
    from ibllm_lab.modality import Modality

    ids, feats = compute_features(encoder, world, Modality.IMAGE, cache_dir)
    files = {s.id: s.files[Modality.IMAGE] for s in world.scenes}
    return features_by_media(ids, feats, files)


def adapter_config(
    llama_dir: str | Path, encoder_dim: int, preset: str = "tiny", **overrides: Any
) -> Any:
    """The ``AdapterConfig`` preset sized for the LLaMA in ``llama_dir``: ``encoder_dim``
    from the encoder, injection into every layer up to the preset's ``query_layer``, then
    ``overrides`` (AdapterConfig fields, e.g. ``injection="ungated"``, ``query_layer=1``,
    ``lora_rank=0``; validated by ``AdapterConfig``, unknown names are an error)."""
    from ibllm_lab.config import AdapterConfig, LlamaConfig

    llama = LlamaConfig.from_params_json(Path(llama_dir) / "params.json", vocab_size=1)
    cfg = AdapterConfig.from_name(preset, encoder_dim=encoder_dim)
    unknown = sorted(set(overrides) - set(cfg.to_dict()))
    if unknown:
        raise ValueError(f"unknown AdapterConfig fields in overrides: {unknown}")
    cfg = cfg.replace(**{"query_layer": min(cfg.query_layer, llama.n_layers), **overrides})
    cfg.check_against(llama)
    return cfg


def train_adapter(
    world: Any,
    cfg: TrainConfig,
    llama_dir: str | Path,
    out_dir: str | Path,
    features: dict[str, torch.Tensor],
    *,
    init: str | Path | None = None,
    adapter: str = "tiny",
    adapter_overrides: dict[str, Any] | None = None,
    max_examples: int | None = None,
    device: torch.device | str = "cpu",
    env: DistEnv | None = None,
    progress: bool = True,
) -> Path:
    """One adapter phase (``cfg.phase`` "pretrain" or "finetune") on ``world``.

    Builds ``ImageBindLLM`` from the Meta-format ``llama_dir`` (plus the adapter checkpoint
    ``init``, e.g. the pre-training result, when given; else the ``adapter`` preset with
    ``adapter_overrides`` applied (:func:`adapter_config`) and zero gates), makes the phase's
    parameters trainable (``ibllm_lab.peft.mark_trainable``) and trains on
    :func:`world_examples` with the image ``features`` (``{media path: (D,)}``; text-only
    examples get zeros). With ``init``, ``adapter_overrides`` must agree with the
    configuration ``init`` was trained with (a check, e.g. when fine-tuning an ablation
    variant). ``max_examples``: train on a seeded random subset of that many examples (a
    reduced budget). Writes ``out_dir/adapter.pth`` (``checkpoint.save_trainable``:
    everything either phase trains, with the LLaMA and adapter configs, the TrainConfig and,
    when given, ``adapter_overrides`` and ``max_examples``) and returns its path.
    """
    from ibllm_lab.checkpoint import load, save_trainable
    from ibllm_lab.data import FeatureDataset
    from ibllm_lab.peft import mark_trainable

    if cfg.phase not in ("pretrain", "finetune"):
        raise ValueError(f"train_adapter trains 'pretrain' or 'finetune', not {cfg.phase!r}")
    env = env or DistEnv()
    out_dir = Path(out_dir)
    overrides = dict(adapter_overrides or {})
    dim = next(iter(features.values())).numel()
    torch.manual_seed(cfg.seed)  # bind network / LoRA initialisation
    acfg = None if init is not None else adapter_config(llama_dir, dim, adapter, **overrides)
    model = load(llama_dir, init, adapter_cfg=acfg, device=device)
    if init is not None and overrides:
        clash = {
            k: (getattr(model.adapter_cfg, k, None), v)
            for k, v in overrides.items()
            if getattr(model.adapter_cfg, k, None) != v
        }
        if clash:
            raise ValueError(f"{init} was trained with another adapter: (has, asked) {clash}")
    mark_trainable(model, cfg.phase)
    model.train()
    examples = world_examples(world, cfg.phase, cfg.captions)
    if max_examples is not None and max_examples < len(examples):
        examples = random.Random(cfg.seed).sample(examples, max_examples)
    max_len = min(cfg.max_words, model.llama_cfg.max_seq_len)
    dataset = FeatureDataset(examples, model.tokenizer, max_len, features, dim)
    if init is None and model.adapter_cfg.feature_norm:
        model.set_feature_stats(dataset.feats)  # this phase's (train split) features
    init_hash = _weights_hash(init) if init else None
    # the whole adapter configuration (preset and overrides), so a run of another adapter,
    # e.g. one made before a preset changed, restarts instead of failing to resume
    acfg_items = sorted(model.adapter_cfg.to_dict().items())
    variant = ["adapter=" + hashlib.sha256(repr(acfg_items).encode()).hexdigest()[:12]]
    variant += [f"examples={max_examples}"] if max_examples is not None else []
    extra = {"fingerprint": _fingerprint(world, cfg.phase, dim, init_hash, *variant)}
    train_phase(
        model, dataset, cfg, out_dir, device=device, env=env, progress=progress, extra=extra
    )
    path = out_dir / "adapter.pth"
    if env.is_main:
        meta: dict[str, Any] = {"phase": cfg.phase, "train_config": asdict(cfg)}
        # recorded only when used: the default's file (hashed by fine-tuning) stays the same
        meta |= {"adapter_overrides": overrides} if overrides else {}
        meta |= {"max_examples": max_examples} if max_examples is not None else {}
        save_trainable(model, path, meta)
    return path


@dataclass
class PipelineResult:
    """Where :func:`train_pipeline` put things, and how long each stage took (seconds)."""

    llama_dir: Path
    pretrain: Path
    finetune: Path
    seconds: dict[str, float]


def train_pipeline(
    world: Any,
    encoder: Any,
    out_dir: str | Path,
    *,
    preset: str = "default",
    arch: str | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    llama_dir: str | Path | None = None,
    feature_dir: str | Path | None = None,
    adapter: str = "tiny",
    adapter_overrides: dict[str, Any] | None = None,
    phase_overrides: dict[str, dict[str, Any]] | None = None,
    max_examples: dict[str, int] | None = None,
    **overrides: Any,
) -> PipelineResult:
    """Base LM, pre-training and fine-tuning on ``world`` with ``encoder``'s image features.

    Layout: ``out_dir/llama`` (Meta format), ``out_dir/features`` (feature cache),
    ``out_dir/pretrain/adapter.pth``, ``out_dir/finetune/adapter.pth``, each phase with its
    ``metrics.csv`` and ``checkpoint.pt``. A finished stage is reused (its checkpoint is
    complete, so resuming runs no steps). ``overrides`` apply to all three TrainConfigs,
    then ``phase_overrides[phase]`` ("base-lm", "pretrain" or "finetune") to that phase's.

    Variants of the adapter (ablations) reuse one base LM and one feature cache:
    ``llama_dir`` (an existing Meta-format base LM: not trained again, ``seconds["base_lm"]``
    is 0) and ``feature_dir`` (default ``out_dir/features``). ``adapter`` (an AdapterConfig
    preset) and ``adapter_overrides`` (its fields, see :func:`adapter_config`) configure the
    pre-training adapter; fine-tuning starts from it. ``max_examples[phase]``: train that
    phase on a seeded subset of that many examples. All of it is recorded in the
    ``adapter.pth`` files.
    """
    out_dir = Path(out_dir)
    phase_overrides, max_examples = phase_overrides or {}, max_examples or {}
    unknown = sorted(set(phase_overrides) - set(PHASES)) + sorted(
        set(max_examples) - {"pretrain", "finetune"}
    )
    if unknown:
        raise ValueError(f"per-phase settings for unknown phases {unknown}")
    lm_cfg = {**overrides, **phase_overrides.get("base-lm", {})}
    seconds: dict[str, float] = {"base_lm": 0.0}
    t = time.perf_counter()
    if llama_dir is None:
        llama_dir = train_base_lm(
            world,
            TrainConfig.from_name(preset, "base-lm", **lm_cfg),
            out_dir / "llama",
            arch=arch or preset,
            device=device,
            progress=progress,
        )
        seconds["base_lm"] = time.perf_counter() - t
    t = time.perf_counter()
    feats = image_features(world, encoder, feature_dir or out_dir / "features")
    seconds["features"] = time.perf_counter() - t
    init = None
    for phase in ("pretrain", "finetune"):
        t = time.perf_counter()
        phase_cfg = {**overrides, **phase_overrides.get(phase, {})}
        cfg = TrainConfig.from_name(preset, phase, **phase_cfg)
        init = train_adapter(
            world,
            cfg,
            llama_dir,
            out_dir / phase,
            feats,
            init=init,
            adapter=adapter,
            adapter_overrides=adapter_overrides,
            max_examples=max_examples.get(phase),
            device=device,
            progress=progress,
        )
        seconds[phase] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    return PipelineResult(Path(llama_dir), out_dir / "pretrain" / "adapter.pth", init, seconds)


# ------------------------------------------------------------------------ entry points
@dataclass
class TrainJob:
    """One ``ibllm-lab train <phase>`` run, as a library value (see :func:`train`).

    ``world``: a generated world folder. ``out``: the run folder. ``llama``: the Meta-format
    base LM (pretrain / finetune). ``init``: the adapter to start from (finetune: the
    pre-training ``adapter.pth``). ``encoder``: a ``bindlite.pt`` (default: the world's
    default encoders, trained if missing). ``features``: the feature cache folder (default
    ``out/features``). ``preset``: a ``PRESETS`` name; ``overrides``: TrainConfig fields.
    """

    phase: str
    world: Path
    out: Path
    llama: Path | None = None
    init: Path | None = None
    encoder: Path | None = None
    features: Path | None = None
    preset: str = "default"
    arch: str | None = None
    adapter: str = "tiny"
    device: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"phase {self.phase!r}: expected one of {PHASES}")
        if self.phase != "base-lm" and self.llama is None:
            raise ValueError(f"phase {self.phase!r} needs llama (a Meta-format folder)")
        self.config()  # validate the preset and overrides now

    def config(self) -> TrainConfig:
        return TrainConfig.from_name(self.preset, self.phase, **self.overrides)


def train(job: TrainJob) -> Path:
    """Run ``job``; returns the base-LM folder or the phase's ``adapter.pth``. Under torchrun
    (``WORLD_SIZE > 1``) each process trains its shard and rank 0 writes the files."""
    from ibllm_lab.encoders import BindLite, load_default_encoders
    from ibllm_lab.runtime import default_device
    from ibllm_lab.world import World

    device = torch.device(job.device) if job.device else default_device()
    env = init_distributed(device)
    if device.type == "cuda" and env.distributed:
        device = torch.device("cuda", env.local_rank)
    world = World.load(job.world)
    cfg = job.config()
    if job.phase == "base-lm":
        if env.distributed:
            raise ValueError("train the base LM in one process (it is tiny)")
        return train_base_lm(world, cfg, job.out, arch=job.arch or job.preset, device=device)
    encoder = (
        BindLite.load(job.encoder, device)
        if job.encoder
        else load_default_encoders(job.world, device)
    )
    feats = image_features(world, encoder, job.features or Path(job.out) / "features")
    return train_adapter(
        world,
        cfg,
        job.llama,
        job.out,
        feats,
        init=job.init,
        adapter=job.adapter,
        device=device,
        env=env,
    )


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ibllm-lab train",
        description="Train the base LM, or the pre-training / fine-tuning phase, on a world. "
        "Multi-GPU / multi-node: launch with torchrun.",
    )
    p.add_argument("phase", choices=PHASES)
    p.add_argument("--world", type=Path, required=True, help="a generated world folder")
    p.add_argument("--out", type=Path, required=True, help="run folder (resumes if present)")
    p.add_argument("--llama", type=Path, help="Meta-format base LM (pretrain, finetune)")
    p.add_argument("--init", type=Path, help="adapter checkpoint to start from (finetune)")
    p.add_argument("--encoder", type=Path, help="bindlite.pt (default: the world's default)")
    p.add_argument("--features", type=Path, help="feature cache folder (default OUT/features)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--arch", choices=sorted(BASE_LM_PRESETS), help="base-LM architecture")
    p.add_argument("--adapter", default="tiny", help="AdapterConfig preset (pretrain)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: best available)")
    for name, kind in (
        ("epochs", int),
        ("batch_size", int),
        ("accum_iter", int),
        ("base_lr", float),
        ("min_lr", float),
        ("warmup_epochs", float),
        ("weight_decay", float),
        ("max_words", int),
        ("clip_grad", float),
        ("seed", int),
        ("log_every", int),
        ("save_every", int),
        ("stop_after", int),
        ("threads", int),
    ):
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, type=kind, help=f"override TrainConfig.{name}"
        )
    p.add_argument("--amp", choices=sorted(AMP_DTYPES), help="autocast dtype on GPU")
    p.add_argument("--fsdp", action="store_true", help="FSDP instead of DDP under torchrun")
    p.add_argument(
        "--compile-blocks",
        choices=[m for m in COMPILE_MODES if m],
        help="torch.compile each LLaMA block in this mode (GPU; reduce-overhead: CUDA graphs)",
    )
    return p


def cli(argv: list[str]) -> int:
    """``ibllm-lab train {base-lm,pretrain,finetune} --world W --out O [--llama L] ...``"""
    args = _parser().parse_args(argv)
    known = {f.name for f in fields(TrainConfig)} - {"phase"}
    overrides = {k: v for k, v in vars(args).items() if k in known and v not in (None, False)}
    job = TrainJob(
        args.phase,
        args.world,
        args.out,
        args.llama,
        args.init,
        args.encoder,
        args.features,
        args.preset,
        args.arch,
        args.adapter,
        args.device,
        overrides,
    )
    result = train(job)
    logger.info("%s written to %s", args.phase, result)
    return 0
