"""Where a training step and a decoding step spend their time: a kernel profile.

    python -m benchmarks.profile_steps --llama 7B --adapter reference --device cuda --out DIR
    python -m benchmarks.profile_steps            # tiny on CPU (operators instead of kernels)

For each training shape (one optimiser step as ``bench_model`` times it) and for one
``FastGenerator`` decoding step at each batch size (eager static step, so that every kernel
shows; the timed path replays it as a CUDA graph), ``torch.profiler`` records the device
kernels (CPU: operators). They are grouped by kind: matrix products, attention, elementwise
and reductions, copies, optimiser, other. Reported per step: wall time, summed kernel time
(busy), the share of each kind, the kernel count, and the matrix products' achieved TFLOP/s
from the analytic count of the model's matmul FLOPs (forward 2 per weight per token,
backward to the activations as much again; frozen weights get no weight gradient). The gap
between wall and busy time is launch overhead and host work. Writes ``profile.json`` and
``profile.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.bench_model import ModelBenchConfig, _batch, _train_step_fn, build_model
from ibllm_lab.bench import sync
from ibllm_lab.fast import FastGenerator
from ibllm_lab.io import atomic_write_text
from ibllm_lab.peft import mark_trainable
from ibllm_lab.train import prepare_precision

log = logging.getLogger(__name__)

# kernel / operator name patterns, tried in order
KINDS = (
    ("matmul", r"gemm|nvjet|cutlass|xmma|wgmma|sm\d+_|addmm|aten::mm|aten::bmm|linear|matmul"),
    ("attention", r"flash|fmha|attention"),
    ("optimiser", r"multi_tensor|foreach|adam"),
    ("copy", r"memcpy|memset|copy|cat|index|gather|scatter"),
    ("elementwise", r"elementwise|reduce|vectorized|unrolled|mul|add|silu|pow|mean|rsqrt|neg"),
)


def kind_of(name: str) -> str:
    lowered = name.lower()
    for kind, pattern in KINDS:
        if re.search(pattern, lowered):
            return kind
    return "other"


def matmul_flops(model, tokens: int, backward: bool) -> float:
    """Analytic FLOPs of the LLaMA's weight products for ``tokens`` tokens."""
    cfg = model.llama_cfg
    kv = cfg.kv_heads * cfg.head_dim
    per_layer = cfg.dim * (cfg.dim * 2 + kv * 2) + 3 * cfg.dim * cfg.ffn_hidden_dim
    weights = cfg.n_layers * per_layer + cfg.dim * cfg.vocab_size
    return 2.0 * weights * tokens * (2 if backward else 1)


def _profile(fn, device: torch.device, steps: int) -> dict:
    """Run ``fn`` ``steps`` times under the profiler (after one untimed call); per step."""
    fn()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = (time.perf_counter() - start) / steps
    by_kind: dict[str, float] = defaultdict(float)
    count, top = 0, []
    for evt in prof.key_averages():
        if device.type == "cuda":
            if getattr(evt, "device_type", None) != torch.autograd.DeviceType.CUDA:
                continue
            if "#" in evt.key:  # a user annotation's span (Optimizer.step#...), not a kernel
                continue
            us = getattr(evt, "self_device_time_total", None)
            if us is None:
                us = evt.self_cuda_time_total
        else:  # CPU: leaf-level operators' own time
            us = evt.self_cpu_time_total
            if not evt.key.startswith("aten::"):
                continue
        by_kind[kind_of(evt.key)] += us / 1e6 / steps
        count += evt.count
        top.append((us / 1e6 / steps, evt.count // steps, evt.key[:90]))
    busy = sum(by_kind.values())
    top.sort(reverse=True)
    return {
        "wall_ms": wall * 1e3,
        "busy_ms": busy * 1e3,
        "kernels_per_step": count // steps,
        "share": {k: round(v / busy, 3) for k, v in sorted(by_kind.items())} if busy else {},
        "matmul_ms": by_kind.get("matmul", 0.0) * 1e3,
        "top": [{"ms": round(s * 1e3, 3), "calls": c, "name": n} for s, c, n in top[:12]],
    }


def profile_train(model, cfg: ModelBenchConfig, steps: int) -> list[dict]:
    rows = []
    model.train()
    for phase, batch_size, seq in cfg.train_shapes:
        batch = _batch(
            cfg, model.llama_cfg.vocab_size, model.adapter_cfg.encoder_dim, batch_size, seq
        )
        mark_trainable(model, phase)
        prepare_precision(model, cfg.device, cfg.amp)
        step = _train_step_fn(model, batch, cfg)
        row = _profile(step, cfg.device, steps)
        flops = matmul_flops(model, batch_size * seq, backward=True)
        row.update(
            what=f"train {phase} {batch_size}x{seq}",
            samples_per_s=batch_size / row["wall_ms"] * 1e3,
            model_tflops=flops / row["wall_ms"] / 1e9,
            matmul_tflops=flops / row["matmul_ms"] / 1e9 if row["matmul_ms"] else None,
        )
        rows.append(row)
        log.info("%s: %.1f ms wall, %.1f ms busy", row["what"], row["wall_ms"], row["busy_ms"])
    mark_trainable(model, "none")
    prepare_precision(model, cfg.device, cfg.amp)
    model.eval()
    return rows


def profile_decode(model, cfg: ModelBenchConfig, steps: int) -> list[dict]:
    """One-token decoding steps of ``FastGenerator``'s static step, run eagerly."""
    rows = []
    engine = FastGenerator(model, cuda_graph=False, static=True)
    for batch in cfg.gen_batches:
        length = cfg.prompt_len + cfg.new_tokens
        cache = engine.new_cache(batch, length + model.extra_positions)
        feats = torch.randn(batch, model.adapter_cfg.encoder_dim, device=cfg.device)
        with torch.inference_mode():
            adapters = engine.set_features(model.bind(feats))
        token = torch.randint(3, model.llama_cfg.vocab_size, (batch, 1), device=cfg.device)
        pos = torch.tensor([cfg.prompt_len], device=cfg.device)

        def step(token=token, pos=pos, cache=cache, adapters=adapters):
            with torch.inference_mode():
                engine._forward(token, pos, cache, adapters)

        row = _profile(step, cfg.device, steps)
        flops = matmul_flops(model, batch, backward=False)
        weight_bytes = flops / 2 / batch * torch.finfo(cfg.frozen_dtype).bits / 8
        row.update(
            what=f"decode step, batch {batch} (eager static)",
            tokens_per_s_eager=batch / row["wall_ms"] * 1e3,
            weight_gb_per_s=weight_bytes / row["matmul_ms"] / 1e6 if row["matmul_ms"] else None,
        )
        rows.append(row)
        log.info("%s: %.2f ms wall, %.2f ms busy", row["what"], row["wall_ms"], row["busy_ms"])
    return rows


def profile_cache(device: torch.device, n: int, steps: int, dim: int = 1024) -> list[dict]:
    """A ``TorchCache`` call (64 queries, top-10, float16 bank) on a random ``n x dim``
    bank; then its two big parts alone: the product and the top-k of the similarities."""
    from ibllm_lab.cache import RESCORE_FACTOR, TorchCache

    gen = torch.Generator(device).manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(n, dim, generator=gen, device=device), dim=-1)
    query = torch.nn.functional.normalize(
        torch.randn(64, dim, generator=gen, device=device), dim=-1
    )
    cache = TorchCache(bank, dtype=torch.float16)
    row = _profile(lambda: cache(query, 10, 20.0, 0.5), device, steps)
    row["what"] = f"cache {n:,} x {dim} float16, 64 queries, top-10"
    rows = [row]
    half, q16 = cache.bank, query.half()
    row = _profile(lambda: q16 @ half.T, device, steps)
    row["what"] = "cache: the product alone"
    row["weight_gb_per_s"] = n * dim * 2 / row["wall_ms"] / 1e6
    rows.append(row)
    sims = q16 @ half.T
    row = _profile(lambda: sims.topk(10 * RESCORE_FACTOR, dim=-1), device, steps)
    row["what"] = f"cache: top-{10 * RESCORE_FACTOR} of the similarities alone"
    rows.append(row)
    return rows


def to_markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"# Step profiles: {meta['config']} on {meta['device']}", ""]
    lines += [f"- {k}: {v}" for k, v in meta.items()] + [""]
    lines += [
        "| step | wall ms | busy ms | kernels | matmul | attention | elementwise | copy | optimiser"
        " | other | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        share = r["share"]
        notes = ", ".join(
            f"{k}={r[k]:.1f}"
            for k in (
                "samples_per_s",
                "model_tflops",
                "matmul_tflops",
                "tokens_per_s_eager",
                "weight_gb_per_s",
            )
            if r.get(k) is not None
        )
        cells = [
            f"{share.get(k, 0):.0%}"
            for k in ("matmul", "attention", "elementwise", "copy", "optimiser", "other")
        ]
        lines.append(
            f"| {r['what']} | {r['wall_ms']:.2f} | {r['busy_ms']:.2f} | {r['kernels_per_step']} | "
            + " | ".join(cells)
            + f" | {notes} |"
        )
    lines.append("")
    for r in rows:
        lines += [
            f"## {r['what']}: top kernels",
            "",
            "| ms/step | calls/step | name |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {t['ms']} | {t['calls']} | `{t['name']}` |" for t in r["top"]] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--llama", default="tiny")
    parser.add_argument("--adapter", default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps per case")
    parser.add_argument("--what", default="train,decode", help="train, decode, cache")
    parser.add_argument("--cache-n", type=int, default=100_000, help="bank size for cache")
    parser.add_argument("--out", default="benchmarks/results/profile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    cfg = ModelBenchConfig(llama=args.llama, adapter=args.adapter, device=torch.device(args.device))
    rows = []
    what = set(args.what.split(","))
    if "cache" in what:
        rows += profile_cache(cfg.device, args.cache_n, args.steps)
    model = build_model(cfg) if what & {"train", "decode"} else None
    if "decode" in what:
        rows += profile_decode(model, cfg, args.steps)
    if "train" in what:
        rows += profile_train(model, cfg, args.steps)
    meta = {
        "config": f"{cfg.llama}/{cfg.adapter}",
        "device": torch.cuda.get_device_name() if cfg.on_gpu else "CPU",
        "dtype": str(cfg.frozen_dtype).removeprefix("torch."),
        "amp": cfg.amp,
        "torch": torch.__version__,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "profile.json", json.dumps({"meta": meta, "rows": rows}, indent=1))
    atomic_write_text(out / "profile.md", to_markdown(meta, rows))
    return {"meta": meta, "rows": rows}


if __name__ == "__main__":
    main()
