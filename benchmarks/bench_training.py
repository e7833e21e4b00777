"""Time the base LM plus both training phases on the default world (issue 4).

Not a timed test: run it by hand (``python benchmarks/bench_training.py``). It trains from
scratch into a fresh folder (``ibllm_lab.train.train_pipeline``), then writes
``benchmarks/results/training.json`` with wall-clock and CPU seconds per stage, steps and
final losses per stage, the thread count and the machine's load average (the figures are
only comparable on an otherwise idle machine). The issue's budget: base LM + both phases
in at most 5 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from ibllm_lab.encoders import BindLite, load_default_encoders
from ibllm_lab.io import write_json_atomic
from ibllm_lab.train import PRESETS, train_pipeline
from ibllm_lab.world import ensure_world

ROOT = Path(__file__).resolve().parent
BUDGET_S = 300.0  # the limit for base LM + both phases on two CPU cores


def _stage_metrics(run_dir: Path) -> dict:
    out = {}
    for stage, sub in (
        ("base_lm", "llama/run"),
        ("pretrain", "pretrain"),
        ("finetune", "finetune"),
    ):
        m = pd.read_csv(run_dir / sub / "metrics.csv")
        out[stage] = {
            "steps": int(m["step"].iloc[-1]),
            "first_loss": float(m["loss"].iloc[0]),
            "final_loss": float(m["loss"].iloc[-1]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", default="default", help="world preset (generated if missing)")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS))
    p.add_argument("--run-dir", type=Path, default=Path("data/bench/training"))
    p.add_argument("--encoder", type=Path, help="bindlite.pt (default: the world's default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "training.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    world = ensure_world(args.world)
    encoder = BindLite.load(args.encoder) if args.encoder else load_default_encoders(world.root)
    shutil.rmtree(args.run_dir, ignore_errors=True)  # time from scratch, never a reuse
    load_before = os.getloadavg()
    wall, cpu = time.perf_counter(), time.process_time()
    result = train_pipeline(
        world, encoder, args.run_dir, preset=args.preset, progress=False, threads=args.threads
    )
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    record = {
        "world": args.world,
        "preset": args.preset,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "seconds": {k: round(v, 2) for k, v in result.seconds.items()},
        "wall_s": round(wall, 2),
        "cpu_s": round(cpu, 2),
        "budget_s": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "stages": _stage_metrics(args.run_dir),
    }
    write_json_atomic(args.out, record)
    logging.getLogger(__name__).info("wrote %s: %s", args.out, record["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
