"""The benchmark suites behind ``ibllm-lab bench`` / ``python -m benchmarks``.

- ``cpu``: the ``tiny`` model on CPU (training steps, generation) and the visual cache at
  CPU-sized banks (100k x 1024 by default: 1M / 3M take 4-12 GB and minutes to build on two
  cores; pass ``--cache-sizes 1000000,3000000`` on a bigger machine).
- ``gpu``: the ``7B`` model with random weights on CUDA (bf16), and the cache at 1M and 3M
  (faiss on the host CPUs, the torch matmul path on the GPU).
- ``cache``: the cache only.
Each figure sits next to the eager baseline of ``benchmarks/baseline.py`` measured in the
same run, and next to the issue's target.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # run as a script: python benchmarks/run.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ibllm_lab.bench import Result, environment  # noqa: E402

log = logging.getLogger(__name__)

GROUPS = ("generate", "train", "cache", "e2e")
SUITE_DEFAULTS = {
    "cpu": {"device": "cpu", "llama": "tiny", "adapter": "tiny", "cache_sizes": "100000"},
    "gpu": {
        "device": "cuda",
        "llama": "7B",
        "adapter": "reference",
        "cache_sizes": "1000000,3000000",
    },
    "cache": {"device": "cpu", "llama": "tiny", "adapter": "tiny", "cache_sizes": "100000"},
}


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _shapes(text: str) -> tuple[tuple[str, int, int], ...]:
    """``"pretrain:4x96,finetune:4x512"`` -> ``(("pretrain", 4, 96), ("finetune", 4, 512))``."""
    out = []
    for item in text.split(","):
        phase, shape = item.split(":")
        batch, seq = shape.lower().split("x")
        out.append((phase.strip(), int(batch), int(seq)))
    return tuple(out)


def model_config(args: argparse.Namespace, defaults: dict[str, Any]):
    from benchmarks.bench_model import ModelBenchConfig

    options: dict[str, Any] = {
        "llama": args.llama or defaults["llama"],
        "adapter": args.adapter or defaults["adapter"],
        "device": torch.device(args.device or defaults["device"]),
        "baseline": not args.no_baseline,
        "train_compile": args.train_compile,
        "train_compile_mode": args.train_compile_mode,
    }
    if args.gen_impls:
        options["gen_impls"] = tuple(args.gen_impls.split(","))
    if args.compile:
        options["gen_impls"] = options.get("gen_impls", ("baseline", "eager", "fast")) + (
            "compile",
        )
    for name in ("prompt_len", "new_tokens", "iters", "warmup", "gen_iters"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.train_shapes:
        options["train_shapes"] = _shapes(args.train_shapes)
    if args.gen_batches:
        options["gen_batches"] = _ints(args.gen_batches)
    return ModelBenchConfig(**options)


def cache_config(args: argparse.Namespace, defaults: dict[str, Any]):
    from benchmarks.bench_cache import CacheBenchConfig

    options: dict[str, Any] = {
        "sizes": _ints(args.cache_sizes or defaults["cache_sizes"]),
        "dim": args.cache_dim,
    }
    device = torch.device(args.device or defaults["device"])
    if device.type == "cuda":
        options["gpu"] = device
        options["gen_device"] = device  # synthetic embeddings generated on the GPU: faster
    for name in ("nlist", "nprobe", "hnsw_max_n", "n_queries"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    if args.iters is not None:
        options["reps"] = args.iters
    return CacheBenchConfig(**options)


def run_suite(
    suite: str,
    args: argparse.Namespace,
    progress: Callable[[list[Result], dict], None] | None = None,
) -> tuple[list[Result], dict[str, Any]]:
    """Run one suite's groups; returns its rows and the environment record. ``progress(rows,
    env)`` is called as rows arrive (so that a run cut short still leaves its figures)."""
    defaults = SUITE_DEFAULTS[suite]
    groups = set(args.groups.split(",")) if args.groups else set(GROUPS)
    if suite == "cache":
        groups &= {"cache"}
    unknown = groups - set(GROUPS)
    if unknown:
        raise ValueError(f"unknown benchmark groups {sorted(unknown)}; expected {GROUPS}")
    device = torch.device(args.device or defaults["device"])
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"suite {suite!r} needs a CUDA device; none is available here")
    env = environment(device) | {"suite": suite, "groups": sorted(groups)}
    rows: list[Result] = []

    def emit(new: list[Result]) -> None:
        rows.extend(new)
        if progress is not None:
            progress(rows, env)

    if groups & {"train", "generate"}:
        from benchmarks import bench_model

        cfg = model_config(args, defaults)
        env["model"] = f"{cfg.llama}/{cfg.adapter}, frozen {cfg.frozen_dtype}, amp {cfg.amp}"
        bench_model.run(cfg, groups, emit)
    if "cache" in groups:
        from benchmarks import bench_cache

        cfg = cache_config(args, defaults)
        env["cache_data"] = (
            f"synthetic clustered unit vectors, {cfg.points_per_cluster} per "
            f"cluster, noise {cfg.noise}, query noise {cfg.query_noise}"
        )
        bench_cache.run(cfg, emit, with_baseline=not args.no_baseline)
    if "e2e" in groups:
        from benchmarks import bench_e2e

        emit([bench_e2e.main_job_row()])
    return rows, env


if __name__ == "__main__":
    from ibllm_lab.bench import cli

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(cli(sys.argv[1:]))
