"""``ibllm-lab bench``: the speed benchmarks of ``benchmarks/``, and the harness they share.

The suites live in the source checkout's ``benchmarks/`` folder (beside the deliberately
plain baseline that every speed figure is reported against, in the same run); this module
holds what they share: timing with device synchronisation, peak GPU memory, the environment
record, the issue's targets and the JSON + markdown writer.

    ibllm-lab bench --suite cpu|gpu|cache|all --out benchmarks/results
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from ibllm_lab.io import atomic_write_text, write_json_atomic

log = logging.getLogger(__name__)

SUITES = ("cpu", "gpu", "cache", "all")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    """One measured figure, next to its baseline and target.

    ``value`` is a throughput (higher is better) or a latency (``unit`` "ms", lower is
    better); ``speedup`` is always "times faster than the baseline of the same run".
    """

    group: str  # "train" | "generate" | "cache" | "e2e"
    case: str  # e.g. "pretrain 4x96"
    impl: str  # "baseline" | "ibllm_lab" | "faiss ivf" ...
    value: float | None
    unit: str
    device: str
    dtype: str = ""
    peak_mem_gib: float | None = None
    speedup: float | None = None
    target: str = ""
    met: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(
    fn: Callable[[], Any], device: torch.device, warmup: int = 1, iters: int = 3
) -> list[float]:
    """Seconds per call of ``fn`` after ``warmup`` calls, synchronising the device."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def median(times: Sequence[float]) -> float:
    return float(statistics.median(times))


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float | None]]:
    """Yields a dict whose ``"gib"`` is the peak allocated GPU memory inside the block
    (None on CPU)."""
    record: dict[str, float | None] = {"gib": None}
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    yield record
    if device.type == "cuda":
        sync(device)
        record["gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def environment(device: torch.device) -> dict[str, Any]:
    """What the figures were measured on."""
    import faiss
    import numpy as np

    env = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "faiss": faiss.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2),  # other work sharing the CPUs
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    return env


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}g}" if abs(x) < 1000 else f"{x:,.0f}"


def markdown_table(results: Sequence[Result], env: dict[str, Any], title: str) -> str:
    """The results as a markdown table, with the environment above it."""
    lines = [f"# {title}", ""]
    lines += [f"- {k}: {v}" for k, v in env.items()]
    lines += [
        "",
        "| group | case | impl | value | unit | x baseline | peak GiB | device | dtype "
        "| target | met | notes |",
        "|" + " --- |" * 12,
    ]
    for r in results:
        met = {True: "met", False: "NOT met", None: ""}[r.met]
        notes = ", ".join(
            f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in r.extra.items()
        )
        lines.append(
            f"| {r.group} | {r.case} | {r.impl} | {_fmt(r.value)} | {r.unit} | {_fmt(r.speedup)} "
            f"| {_fmt(r.peak_mem_gib)} | {r.device} | {r.dtype} | {r.target} | {met} | {notes} |"
        )
    return "\n".join(lines) + "\n"


def write_results(
    results: Sequence[Result], env: dict[str, Any], out_dir: Path, name: str
) -> tuple[Path, Path]:
    """Write ``<name>.json`` and ``<name>.md`` under ``out_dir`` (atomically)."""
    payload = {"environment": env, "results": [asdict(r) for r in results]}
    json_path = write_json_atomic(
        out_dir / f"{name}.json", json.loads(json.dumps(payload, default=str))
    )
    md_path = atomic_write_text(
        out_dir / f"{name}.md", markdown_table(results, env, f"ibllm-lab bench: {name}")
    )
    return json_path, md_path


def load_benchmarks(root: Path = ROOT):
    """Import the checkout's ``benchmarks.run`` (the suites are not part of the package)."""
    if not (root / "benchmarks" / "run.py").is_file():
        raise FileNotFoundError(
            f"no benchmarks/run.py under {root}: the benchmarks ship with the source checkout"
        )
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    return importlib.import_module("benchmarks.run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibllm-lab bench", description=__doc__.splitlines()[0])
    p.add_argument(
        "--suite",
        choices=SUITES,
        default="cpu",
        help="cpu: tiny model + cache on CPU; gpu: 7B random weights + cache on "
        "GPU; cache: the cache only; all: cpu then gpu",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results",
        help="folder for <name>.json and <name>.md",
    )
    p.add_argument("--name", default=None, help="file stem (default: the suite's name)")
    p.add_argument(
        "--groups",
        default=None,
        help="comma-separated subset of generate,train,cache,e2e (default: all)",
    )
    p.add_argument("--device", default=None, help="torch device (cpu suite: cpu, gpu: cuda)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline figures")
    model = p.add_argument_group("model (train, generate)")
    model.add_argument("--llama", default=None, help="LlamaConfig preset (tiny on CPU, 7B on GPU)")
    model.add_argument("--adapter", default=None, help="AdapterConfig preset (tiny / reference)")
    model.add_argument(
        "--train-shapes",
        default=None,
        help="e.g. pretrain:4x96,pretrain:32x96,finetune:4x512 (the default)",
    )
    model.add_argument("--gen-batches", default=None, help="e.g. 1,16 (the default)")
    model.add_argument("--prompt-len", type=int, default=None, help="prompt tokens (64)")
    model.add_argument("--new-tokens", type=int, default=None, help="generated tokens (128)")
    model.add_argument("--iters", type=int, default=None, help="timed repetitions")
    model.add_argument("--warmup", type=int, default=None, help="untimed training steps (2)")
    model.add_argument("--gen-iters", type=int, default=None, help="timed generations (2)")
    model.add_argument(
        "--gen-impls",
        default=None,
        help="generation paths: baseline,eager,fast,compile (default: the first three)",
    )
    model.add_argument(
        "--train-compile",
        action="store_true",
        help="train with every LLaMA block under torch.compile (a proposal for the trainer)",
    )
    model.add_argument(
        "--train-compile-mode",
        default=None,
        choices=["default", "reduce-overhead", "max-autotune"],
        help="torch.compile mode for --train-compile, e.g. reduce-overhead (CUDA graphs)",
    )
    model.add_argument(
        "--compile", action="store_true", help="also time FastGenerator with torch.compile (GPU)"
    )
    cache = p.add_argument_group("visual cache")
    cache.add_argument(
        "--cache-sizes",
        default=None,
        help="bank sizes, e.g. 1000000,3000000 (default: 100000 on CPU, 1000000,3000000 on GPU)",
    )
    cache.add_argument("--cache-dim", type=int, default=1024, help="embedding width (1024)")
    cache.add_argument("--nlist", type=int, default=None, help="IVF lists (1024)")
    cache.add_argument("--nprobe", type=int, default=None, help="IVF lists probed (8)")
    cache.add_argument(
        "--hnsw-max-n", type=int, default=None, help="build HNSW only up to this bank size (200000)"
    )
    cache.add_argument("--n-queries", type=int, default=None, help="queries per batch (64)")
    p.add_argument(
        "--merge",
        nargs="+",
        type=Path,
        default=None,
        metavar="JSON",
        help="instead of running: merge these result files into <out>/<name>",
    )
    return p


GROUP_ORDER = ("generate", "train", "cache", "e2e")


def merge_results(paths: Sequence[Path]) -> tuple[list[Result], dict[str, Any]]:
    """Rows of several result files (ordered by group), and their environments merged (the
    first file's value wins where they differ)."""
    results, env = [], {}
    for path in paths:
        payload = json.loads(Path(path).read_text(encoding="utf-8"))
        env = {**payload["environment"], **env}
        results += [Result(**row) for row in payload["results"]]
    order = {g: i for i, g in enumerate(GROUP_ORDER)}
    results.sort(key=lambda r: order.get(r.group, len(order)))
    baselines = {(r.group, r.case): r.value for r in results if r.impl == "baseline" and r.value}
    for r in results:  # rows measured in another process than their baseline
        base = baselines.get((r.group, r.case))
        if r.speedup is None and r.impl != "baseline" and base and r.value:
            r.speedup = base / r.value if r.unit == "ms" else r.value / base
    env["groups"] = sorted({r.group for r in results})
    return results, env


def cli(argv: Sequence[str]) -> int:
    """``ibllm-lab bench``: run a suite and write its JSON and markdown table."""
    args = build_parser().parse_args(list(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.merge:
        results, env = merge_results(args.merge)
        paths = write_results(results, env, args.out, args.name or args.suite)
        log.info("merged %d files: %s", len(args.merge), ", ".join(map(str, paths)))
        return 0
    run = load_benchmarks()
    suites = ["cpu", "gpu"] if args.suite == "all" else [args.suite]
    for suite in suites:
        name = args.name or suite if len(suites) == 1 else suite

        def progress(rows, env, name=name):
            write_results(rows, env, args.out, name)

        results, env = run.run_suite(suite, args, progress)
        json_path, md_path = write_results(results, env, args.out, name)
        log.info("bench %s: %s, %s", suite, json_path, md_path)
    return 0


if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
