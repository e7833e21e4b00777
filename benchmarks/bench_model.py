"""Training-step throughput and generation speed: ibllm_lab's model vs the eager baseline.

Both run on the same weights (the baseline shares the model's tensors) in the same process.
Training: one optimiser step as the trainer takes it (autocast on GPU, frozen parameters in
bf16, trainable ones in fp32, AdamW, ``loss.item()``), for the pre-training and fine-tuning
phases, the baseline's and ours timed in turns. Generation: greedy, equal-length prompts,
exactly ``new_tokens`` tokens (EOS never stops it), timed from prompt to last token: the
model's own modules (``fast=False``), ``FastGenerator`` (static cache; CUDA graph on GPU;
what ``ImageBindLLM.generate`` uses by default) and the baseline.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from benchmarks.baseline import BaselineImageBindLLM
from ibllm_lab.bench import Result, median, peak_memory, time_fn
from ibllm_lab.config import AdapterConfig, LlamaConfig
from ibllm_lab.fast import FastGenerator
from ibllm_lab.model import ImageBindLLM
from ibllm_lab.peft import mark_trainable
from ibllm_lab.train import compile_blocks, param_groups, prepare_precision

log = logging.getLogger(__name__)

# The GPU targets at 7B (bf16), by (group, case); CPU: 2x the baseline.
GPU_TARGETS = {
    ("train", "pretrain 4x96"): 80.0,
    ("train", "pretrain 32x96"): 200.0,
    ("train", "finetune 4x512"): 32.0,
    ("generate", "batch 1"): 250.0,
    ("generate", "batch 16"): 2000.0,
}
CPU_SPEEDUP_TARGET = 2.0
# generation paths: the baseline, the model's own decoder, FastGenerator, + torch.compile
GEN_IMPLS = ("baseline", "eager", "fast", "compile")
GEN_MEMORY_TARGET_GIB = 16.0
EAGER = "ibllm_lab (fast=False)"  # generation through the model's own modules


@dataclass
class ModelBenchConfig:
    llama: str = "tiny"  # LlamaConfig preset
    adapter: str = "tiny"  # AdapterConfig preset
    device: torch.device = torch.device("cpu")
    train_shapes: tuple[tuple[str, int, int], ...] = (
        ("pretrain", 4, 96),
        ("pretrain", 32, 96),
        ("finetune", 4, 512),
    )
    gen_batches: tuple[int, ...] = (1, 16)
    prompt_len: int = 64
    new_tokens: int = 128
    warmup: int = 2
    iters: int = 5
    gen_iters: int = 3
    baseline: bool = True
    gen_impls: tuple[str, ...] = ("baseline", "eager", "fast")  # of GEN_IMPLS
    train_compile: bool = False  # train with each LLaMA block under torch.compile
    train_compile_mode: str | None = None  # torch.compile mode ("reduce-overhead": CUDA graphs)
    seed: int = 0

    def __post_init__(self):
        if self.iters < 1 or self.gen_iters < 1 or self.warmup < 0:
            raise ValueError("iters and gen_iters must be >= 1, warmup >= 0")
        unknown = set(self.gen_impls) - set(GEN_IMPLS)
        if unknown:
            raise ValueError(f"unknown generation implementations {sorted(unknown)}: {GEN_IMPLS}")

    @property
    def frozen_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    @property
    def amp(self) -> str:
        return "bf16" if self.device.type == "cuda" else "none"

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"


def build_model(cfg: ModelBenchConfig) -> ImageBindLLM:
    """Random weights (no checkpoint), built directly on the device in the frozen dtype."""
    torch.manual_seed(cfg.seed)
    llama_cfg, adapter_cfg = LlamaConfig.from_name(cfg.llama), AdapterConfig.from_name(cfg.adapter)
    model = ImageBindLLM(llama_cfg, adapter_cfg, device=cfg.device, dtype=cfg.frozen_dtype)
    log.info(
        "model %s/%s: %.2fB parameters",
        cfg.llama,
        cfg.adapter,
        sum(p.numel() for p in model.parameters()) / 1e9,
    )
    return model


def _target(cfg: ModelBenchConfig, group: str, case: str, value: float, speedup: float | None):
    """(target text, met) for a figure of ibllm_lab's implementation."""
    if cfg.on_gpu and cfg.llama == "7B" and (group, case) in GPU_TARGETS:
        goal = GPU_TARGETS[(group, case)]
        unit = "samples/s" if group == "train" else "tokens/s"
        return f">= {goal:g} {unit}", value >= goal
    if not cfg.on_gpu and speedup is not None:
        return f">= {CPU_SPEEDUP_TARGET:g}x baseline", speedup >= CPU_SPEEDUP_TARGET
    return "", None


def _row(cfg, group, case, impl, value, unit, mem, base_value, extra=None) -> Result:
    speedup = 1.0 if impl == "baseline" else value / base_value if base_value else None
    target, met = ("", None) if impl == "baseline" else _target(cfg, group, case, value, speedup)
    return Result(
        group=group,
        case=case,
        impl=impl,
        value=value,
        unit=unit,
        device=str(cfg.device),
        dtype=f"{cfg.frozen_dtype}".removeprefix("torch."),
        peak_mem_gib=mem,
        speedup=speedup,
        target=target,
        met=met,
        extra={"config": f"{cfg.llama}/{cfg.adapter}", **(extra or {})},
    )


# -- training ----------------------------------------------------------------------------------
def _train_step_fn(module, batch, cfg: ModelBenchConfig) -> Callable[[], float]:
    """One optimiser step as ``train.train_phase`` takes it."""
    optimizer = torch.optim.AdamW(param_groups(module, 0.05), lr=1e-5, betas=(0.9, 0.95))
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if cfg.on_gpu else nullcontext

    def step() -> float:
        with autocast():
            loss = module(*batch)
        value = loss.item()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return value

    return step


def _batch(cfg: ModelBenchConfig, vocab: int, width: int, batch: int, seq: int):
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed)
    tokens = torch.randint(3, vocab, (batch, seq), generator=gen, device=cfg.device)
    labels = tokens.clone()
    labels[:, : seq // 4] = 0  # prompt positions are not labelled
    feats = torch.nn.functional.normalize(
        torch.randn(batch, width, generator=gen, device=cfg.device), dim=-1
    )
    return tokens, labels, feats


def _time_train(modules: dict[str, torch.nn.Module], batch, cfg) -> dict[str, tuple]:
    """``{impl: (samples/s, peak GiB)}`` of each module's training step. The steps are timed
    in turns (baseline, ours, baseline, ...) so that a load change on a shared machine
    touches both alike; peak memory is read during each one's warm-up."""
    steps, peaks = {}, {}
    for impl, module in modules.items():
        with peak_memory(cfg.device) as mem:
            steps[impl] = _train_step_fn(module, batch, cfg)
            time_fn(steps[impl], cfg.device, max(cfg.warmup, 1), 0)
        peaks[impl] = mem["gib"]
    times: dict[str, list[float]] = {impl: [] for impl in steps}
    for _ in range(cfg.iters):
        for impl, step in steps.items():
            times[impl] += time_fn(step, cfg.device, 0, 1)
    return {impl: (batch[0].shape[0] / median(times[impl]), peaks[impl]) for impl in steps}


def bench_train(model: ImageBindLLM, baseline: BaselineImageBindLLM | None, cfg, emit) -> None:
    impl = "ibllm_lab"
    modules = (
        {"ibllm_lab": model} if baseline is None else {"baseline": baseline, "ibllm_lab": model}
    )
    for module in modules.values():
        module.train()
    if cfg.train_compile:  # regional compilation: one graph per block kind, reused per layer
        compile_blocks(model, cfg.train_compile_mode or "default")
        mode = f", {cfg.train_compile_mode}" if cfg.train_compile_mode else ""
        impl = f"ibllm_lab + torch.compile (per block{mode})"
    for phase, batch_size, seq in cfg.train_shapes:
        case = f"{phase} {batch_size}x{seq}"
        batch = _batch(
            cfg, model.llama_cfg.vocab_size, model.adapter_cfg.encoder_dim, batch_size, seq
        )
        for module in modules.values():
            mark_trainable(module, phase)
            prepare_precision(module, cfg.device, cfg.amp)
        figures = _time_train(modules, batch, cfg)
        base_value = figures["baseline"][0] if baseline is not None else None
        rows = []
        if baseline is not None:
            value, mem = figures["baseline"]
            rows.append(_row(cfg, "train", case, "baseline", value, "samples/s", mem, None))
        value, mem = figures["ibllm_lab"]
        rows.append(_row(cfg, "train", case, impl, value, "samples/s", mem, base_value))
        log.info("train %s: %.1f samples/s (baseline %s)", case, value, base_value)
        emit(rows)
        _free(cfg.device)
    for module in modules.values():
        mark_trainable(module, "none")
        prepare_precision(module, cfg.device, cfg.amp)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- generation --------------------------------------------------------------------------------
def _generators(model, baseline, cfg) -> dict[str, Callable]:
    """impl name -> fn(feats, prompt_tensor, new_tokens) -> (B, new_tokens) token tensor,
    for the implementations in ``cfg.gen_impls``."""

    def eager(feats, prompt, n):  # the model's own modules
        out = model.generate_ids_from_feats(
            feats, prompt.tolist(), n, temperature=0, eos_id=-1, fast=False
        )
        return torch.tensor(out)

    def fast(engine):
        return lambda feats, prompt, n: torch.tensor(
            engine.generate_ids(feats, prompt.tolist(), n, temperature=0, eos_id=-1)
        )

    def base(feats, prompt, n):
        return baseline.generate(feats, prompt, n)[:, prompt.shape[1] :].cpu()

    gens = {}
    if "baseline" in cfg.gen_impls and baseline is not None:
        gens["baseline"] = base
    if "eager" in cfg.gen_impls:
        gens[EAGER] = eager
    if "fast" in cfg.gen_impls:
        kind = "CUDA graph" if cfg.on_gpu else "packed"
        gens[f"ibllm_lab FastGenerator ({kind})"] = fast(FastGenerator(model))
    if "compile" in cfg.gen_impls and cfg.on_gpu:
        name = "ibllm_lab FastGenerator (CUDA graph + torch.compile)"
        gens[name] = fast(FastGenerator(model, compile=True))
    return gens


def bench_generate(model, baseline, cfg: ModelBenchConfig, emit) -> None:
    model.eval()
    gen = torch.Generator(cfg.device).manual_seed(cfg.seed + 1)
    for batch in cfg.gen_batches:
        prompt = torch.randint(
            3, model.llama_cfg.vocab_size, (batch, cfg.prompt_len), generator=gen, device=cfg.device
        )
        feats = torch.randn(batch, model.adapter_cfg.encoder_dim, generator=gen, device=cfg.device)
        emit(_bench_batch(model, baseline, cfg, batch, prompt, feats))


def _bench_batch(model, baseline, cfg, batch, prompt, feats) -> list[Result]:
    case, rows, base_value, reference = f"batch {batch}", [], None, None
    for impl, fn in _generators(model, baseline, cfg).items():
        with peak_memory(cfg.device) as mem:
            fn(feats, prompt, 4)  # warm-up: kernels, graph capture, compilation
            out = {}
            times = time_fn(
                lambda f=fn, o=out: o.update(ids=f(feats, prompt, cfg.new_tokens)),
                cfg.device,
                0,
                1 if impl in ("baseline", EAGER) and cfg.on_gpu else cfg.gen_iters,
            )
        value = batch * cfg.new_tokens / median(times)
        extra = {}
        if reference is None and impl == EAGER:
            reference = out["ids"]
        elif reference is not None:  # greedy tokens of this path equal the model's own
            extra["same_tokens"] = round(float((out["ids"] == reference).float().mean()), 3)
        if impl == "baseline":
            base_value = value
        row = _row(cfg, "generate", case, impl, value, "tokens/s", mem["gib"], base_value, extra)
        if cfg.on_gpu and impl != "baseline" and row.peak_mem_gib is not None and cfg.llama == "7B":
            row.extra["fits_16GiB"] = row.peak_mem_gib <= GEN_MEMORY_TARGET_GIB
        rows.append(row)
        log.info("generate %s %s: %.1f tokens/s", case, impl, value)
        _free(cfg.device)
    return rows


def run(cfg: ModelBenchConfig, groups: set[str], emit: Callable[[list[Result]], None]) -> None:
    """The ``generate`` and / or ``train`` rows for one configuration, passed to ``emit`` as
    they are measured."""
    model = build_model(cfg)
    baseline = BaselineImageBindLLM.from_model(model) if cfg.baseline else None
    if "generate" in groups:
        bench_generate(model, baseline, cfg, emit)
    if "train" in groups:
        bench_train(model, baseline, cfg, emit)
