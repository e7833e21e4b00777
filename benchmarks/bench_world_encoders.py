"""Time generating the default world and training every BindLite encoder (issue 3).

Not a timed test: run it by hand (``python benchmarks/bench_world_encoders.py``). It prints
and writes ``benchmarks/results/world_encoders.json`` with wall-clock and CPU seconds per
step, the thread count, and (with ``--measure``) the headline alignment numbers.
The issue's budget: world + every encoder in at most 3 minutes on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

from ibllm_lab.encoders import EncoderConfig, save_default_encoders, train_encoders
from ibllm_lab.io import write_json_atomic
from ibllm_lab.world import World, WorldConfig, generate_world

ROOT = Path(__file__).resolve().parent


def _timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def headline(tables) -> dict:
    """The issue's "must show" numbers from ``measure_all``'s tables."""
    r = tables["retrieval"].set_index(["query", "target"])
    z = tables["zero_shot"]
    out = {
        "image_text_R@1": float(r.loc[("Image", "Text"), "R@1"]),
        "text_image_R@1": float(r.loc[("Text", "Image"), "R@1"]),
        "raw_text_image_R@1": float(r.loc[("Text", "Image"), "raw_R@1"]),
    }
    for m in ("Audio", "Video", "Point", "Depth"):
        out[f"{m}_image_R@5"] = float(r.loc[(m, "Image"), "R@5"])
    for row in z.itertuples():
        out[f"zs_{row.modality}_{row.attribute}"] = round(float(row.accuracy), 4)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world-preset", default="default")
    p.add_argument("--encoder-preset", default="default")
    p.add_argument("--overrides", default="{}", help="JSON EncoderConfig overrides")
    p.add_argument("--world-dir", type=Path, default=Path("data/bench/world"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reuse-world", action="store_true", help="load --world-dir if it exists")
    p.add_argument("--measure", action="store_true", help="also run alignment.measure_all")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "world_encoders.json")
    p.add_argument(
        "--save",
        action="store_true",
        help="also save the encoder as the world's default (what load_default_encoders loads)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    wcfg = WorldConfig.from_name(args.world_preset)
    ecfg = EncoderConfig.from_name(args.encoder_preset, **json.loads(args.overrides))
    if args.reuse_world and (args.world_dir / "scenes.jsonl").exists():
        world, gen_wall, gen_cpu = World.load(args.world_dir), float("nan"), float("nan")
    else:
        world, gen_wall, gen_cpu = _timed(lambda: generate_world(wcfg, args.world_dir))
    history: dict = {}
    enc, tr_wall, tr_cpu = _timed(lambda: train_encoders(world, ecfg, args.device, history))
    result = {
        "world_preset": args.world_preset,
        "n_scenes": wcfg.n_scenes,
        "encoder_config": ecfg.to_dict(),
        "device": args.device,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "generate_wall_s": round(gen_wall, 2),
        "generate_cpu_s": round(gen_cpu, 2),
        "train_wall_s": round(tr_wall, 2),
        "train_cpu_s": round(tr_cpu, 2),
        "total_wall_s": round(gen_wall + tr_wall, 2),
        "train_steps_s": {k: round(v, 2) for k, v in history.items() if k.endswith("_s")},
        "final_losses": {k: round(v[-1], 4) for k, v in history.items() if isinstance(v, list)},
    }
    if args.save:  # after the timing: saving is not part of the budget
        save_default_encoders(enc, world, args.encoder_preset)
    if args.measure:
        from ibllm_lab.alignment import measure_all

        tables, m_wall, _ = _timed(
            lambda: measure_all(enc, world, out_dir=args.out.parent / "tables")
        )
        result["measure_wall_s"] = round(m_wall, 2)
        result["headline"] = headline(tables)
    write_json_atomic(args.out, result)
    json.dump(result, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
