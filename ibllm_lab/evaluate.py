"""Run a model on a benchmark: batched generation, per-sample JSONL, a score table, resume.

``evaluate(model, benchmark, out_dir, modality=...)`` formats each item's instruction with the
method's prompt template, generates in batches through ``model.generate_from_feats`` (any
object with that method works), appends one JSON line per sample to
``out_dir/predictions.jsonl`` (flushed after every batch), and scores with the rule of the
benchmark's kind (``ibllm_lab.metrics``). Rerunning on the same ``out_dir`` skips the ids
already written, so an interrupted evaluation resumes without redoing finished samples. The
score table is written atomically to ``scores.csv`` and ``scores.json``.

A benchmark item names an image or a world scene; ``features`` (or an ``encoder`` with the
benchmark's world) supply one ``(D,)`` feature per name for the chosen modality, so the same
mini-benchmark can be presented as images, audio, point clouds, ... ``modality=None`` runs
the language model alone (blind baseline).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ibllm_lab import metrics
from ibllm_lab.evalsets import Benchmark, EvalItem, load_benchmark
from ibllm_lab.io import atomic_write_text, safe_torch_load, write_json_atomic
from ibllm_lab.modality import Modality

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_INFO = "run.json"
SCORES_CSV = "scores.csv"
SCORES_JSON = "scores.json"
# Answers are short except captions; generating no more than needed keeps CPU runs fast.
MAX_GEN_LEN = {"vqa": 10, "gqa": 10, "mme": 8, "mmbench": 8, "scienceqa": 8, "caption": 32}
# The Alpaca template of METHOD.md; used only until ibllm_lab.format_prompt is exported.
_ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:"
)


def _format_prompt():
    """``ibllm_lab.format_prompt`` wherever it is exported (the template of METHOD.md)."""
    import importlib

    for module in ("ibllm_lab", "ibllm_lab.model", "ibllm_lab.checkpoint"):
        try:
            return importlib.import_module(module).format_prompt
        except (ImportError, AttributeError):
            continue
    return lambda instruction, input=None: _ALPACA.format(instruction=instruction)


# --- features -----------------------------------------------------------------------------


def _as_feature_map(features) -> dict[str, torch.Tensor]:
    """Accept ``{name: (D,)}``, ``(ids, (N, D))``, or a torch file holding either
    (``{"ids": [...], "feats": (N, D)}``)."""
    if isinstance(features, (str, Path)):
        features = safe_torch_load(features)
    if isinstance(features, Mapping) and "ids" in features and "feats" in features:
        features = (features["ids"], features["feats"])
    if isinstance(features, tuple):
        ids, feats = features
        if len(ids) != len(feats):
            raise ValueError(f"{len(ids)} feature ids but {len(feats)} rows")
        return {str(i): feats[k] for k, i in enumerate(ids)}
    if isinstance(features, Mapping):
        return {str(k): v for k, v in features.items()}
    raise TypeError(f"features: expected a mapping, (ids, feats) or a path, got {type(features)}")


def _features_from_encoder(encoder, benchmark: Benchmark, modality, world, cache_dir):
    from ibllm_lab.encoders import compute_features
    from ibllm_lab.world import World

    if world is None:
        if benchmark.world_dir is None:
            raise ValueError("an encoder needs a world: pass world= or use a mini-benchmark")
        world = World.load(benchmark.world_dir)
    return compute_features(encoder, world, modality, cache_dir)


def _lookup(fmap: Mapping[str, torch.Tensor], name: str) -> torch.Tensor | None:
    for key in (name, Path(name).stem, Path(name).as_posix().lstrip("./")):
        if key in fmap:
            return fmap[key]
    return None


def _item_features(items: Sequence[EvalItem], fmap, skip_missing: bool):
    """``({item id: (D,)}, [ids without a feature])``; raises listing all missing ids."""
    found, missing = {}, []
    for it in items:
        f = _lookup(fmap, it.image)
        if f is None:
            missing.append(it.id)
        else:
            found[it.id] = f
    if missing:
        shown = ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else "")
        message = f"{len(missing)} item(s) have no feature for their image/scene: {shown}"
        if not skip_missing:
            raise KeyError(message)
        logger.warning("skipped: %s", message)
    return found, missing


# --- predictions file -----------------------------------------------------------------------


def read_predictions(path: Path) -> dict[str, dict]:
    """Records of a predictions JSONL by id. A torn last line (a crash mid-write) is dropped
    and the file is rewritten without it, so appending stays valid."""
    path = Path(path)
    if not path.is_file():
        return {}
    good, torn = [], False
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        try:
            good.append(json.loads(line))
            torn = torn or not line.endswith("\n")
        except json.JSONDecodeError:
            torn = True
    if torn:
        logger.warning("%s: dropping a partly written line", path)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in good))
    return {r["id"]: r for r in good}


def _check_run(out_dir: Path, info: dict) -> None:
    path = out_dir / RUN_INFO
    if path.is_file():
        old = json.loads(path.read_text(encoding="utf-8"))
        clash = {k: (old.get(k), v) for k, v in info.items() if old.get(k) != v}
        if clash:
            raise ValueError(f"{out_dir} holds another evaluation (differs in {clash}); "
                             "use a new out_dir")  # fmt: skip
    write_json_atomic(path, info)


# --- scoring --------------------------------------------------------------------------------


def _vqa_scores(items, preds) -> dict[str, float]:
    accs = {it.id: metrics.vqa_accuracy(preds[it.id], it.answers) for it in items}
    out = {"accuracy": 100.0 * statistics.fmean(accs.values())}
    groups: dict[str, list[float]] = {}
    for it in items:
        if "heldout" in it.meta:
            groups.setdefault("heldout" if it.meta["heldout"] else "seen", []).append(accs[it.id])
        if "attribute" in it.meta:
            groups.setdefault(it.meta["attribute"], []).append(accs[it.id])
    out.update({f"accuracy/{k}": 100.0 * statistics.fmean(v) for k, v in sorted(groups.items())})
    return out


def _mc_records(items, preds):
    return [
        {"index": it.meta.get("index", k), "prediction": preds[it.id], "options": it.options,
         "answer": it.answers[0], "category": it.meta.get("category", "")}
        for k, it in enumerate(items)
    ]  # fmt: skip


def score_benchmark(benchmark: Benchmark, predictions: Mapping[str, str]) -> dict[str, float]:
    """Scores (percent, MME points, CIDEr x100) of the items that have a prediction."""
    items = [it for it in benchmark.items if it.id in predictions and it.answers]
    if not items:
        raise ValueError(f"{benchmark.name}: no predictions to score")
    p = predictions
    kind = benchmark.kind
    if kind == "vqa":
        out = _vqa_scores(items, p)
    elif kind == "gqa":
        hits = [metrics.gqa_exact_match(p[it.id], it.answers[0]) for it in items]
        out = {"accuracy": 100.0 * statistics.fmean(hits)}
    elif kind == "mme":
        records = [{"subtask": it.meta["subtask"], "image": it.image, "prediction": p[it.id],
                    "answer": it.answers[0]} for it in items]  # fmt: skip
        out = metrics.mme_scores(records, perception=("shape",))
    elif kind == "mmbench":
        out = metrics.mmbench_circular(_mc_records(items, p))
    elif kind == "scienceqa":
        records = [{"prediction": p[it.id], "choices": list(it.options.values()),
                    "answer": it.meta["answer_index"]} for it in items]  # fmt: skip
        out = {"accuracy": metrics.scienceqa_accuracy(records)}
    else:  # caption
        out = metrics.caption_scores({it.id: p[it.id] for it in items},
                                     {it.id: it.answers for it in items})  # fmt: skip
    out["n"] = float(len(items))
    return out


def _table(benchmark: Benchmark, modality, scores: Mapping[str, float]) -> pd.DataFrame:
    rows = [
        {"benchmark": benchmark.name, "modality": modality or "none", "metric": k, "value": v}
        for k, v in scores.items()
    ]
    return pd.DataFrame(rows, columns=["benchmark", "modality", "metric", "value"])


def _write_table(out_dir: Path, table: pd.DataFrame) -> None:
    atomic_write_text(out_dir / SCORES_CSV, table.to_csv(index=False))
    write_json_atomic(out_dir / SCORES_JSON, table.to_dict(orient="records"))


# --- evaluation -----------------------------------------------------------------------------


def _model_device(model) -> torch.device:
    params = getattr(model, "parameters", None)
    if callable(params):
        for p in params():
            return p.device
    return torch.device("cpu")


def evaluate(
    model,
    benchmark: Benchmark | str | Path,
    out_dir: str | Path,
    modality: str | None = "Image",
    features=None,
    encoder=None,
    world=None,
    batch_size: int = 16,
    max_gen_len: int | None = None,
    temperature: float = 0.0,
    limit: int | None = None,
    skip_missing: bool = False,
    device: torch.device | str | None = None,
    cache_dir: Path | None = None,
    use_cache: bool = False,
    cache_size: int = 10,
    cache_t: float = 20.0,
    cache_weight: float = 0.5,
    prompt_style: str = "llava",
    **generate_kwargs,
) -> pd.DataFrame:
    """Evaluate ``model`` on ``benchmark`` and return the score table.

    ``model``: anything with ``generate_from_feats(feats (B, D) | None, prompts: list[str],
    max_gen_len=, temperature=, ...) -> list[str]`` (``ImageBindLLM``). ``benchmark``: a
    :class:`Benchmark` or a folder for ``load_benchmark``. ``features``: ``{image or scene id:
    (D,)}``, ``(ids, (N, D))`` or a torch file of either; else ``encoder`` (+ ``world``, else the
    benchmark's world) computes them for ``modality``. ``modality=None``: no features (blind).
    ``cache_dir``: where computed features are cached (default ``out_dir/features``).
    ``limit``: first N items only. ``skip_missing``: leave out items without a feature instead
    of raising. ``max_gen_len``: default per benchmark kind (``MAX_GEN_LEN``).
    ``prompt_style``: the harness post-prompt (``Benchmark.instruction``): "llava" or "plain".
    ``use_cache``: pass the L2-normalised features through ``model.cache`` (the
    visual cache, METHOD.md step 3) with ``cache_size``, ``cache_t``, ``cache_weight``.
    Extra keyword arguments go to ``generate_from_feats``.
    Writes ``predictions.jsonl``, ``run.json``, ``scores.csv``, ``scores.json`` in ``out_dir``.
    Returns a DataFrame with columns benchmark, modality, metric, value.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    bench = benchmark if isinstance(benchmark, Benchmark) else load_benchmark(benchmark)
    out_dir = Path(out_dir)
    items = bench.items[:limit] if limit is not None else list(bench.items)
    modality_name = None
    feats: dict[str, torch.Tensor] = {}
    if modality is not None and str(modality).lower() != "none":
        modality_name = Modality.parse(modality).value
        if features is None and encoder is None:
            raise ValueError("pass features= or encoder= (or modality=None for a blind run)")
        if features is None:
            cache_dir = cache_dir if cache_dir is not None else out_dir / "features"
            features = _features_from_encoder(encoder, bench, modality_name, world, cache_dir)
        feats, missing = _item_features(items, _as_feature_map(features), skip_missing)
        items = [it for it in items if it.id in feats]
    cache = None
    if use_cache:
        if getattr(model, "cache", None) is None:
            raise ValueError("use_cache=True but the model has no visual cache attached")
        cache = functools.partial(
            model.cache, cache_size=cache_size, cache_t=cache_t, cache_weight=cache_weight
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run(out_dir, {"benchmark": bench.name, "kind": bench.kind, "modality": modality_name,
                         "use_cache": use_cache, "prompt_style": prompt_style})  # fmt: skip
    done = read_predictions(out_dir / PREDICTIONS)
    todo = [it for it in items if it.id not in done]
    logger.info("%s: %d done, %d to generate", bench.name, len(items) - len(todo), len(todo))
    gen = {"max_gen_len": max_gen_len or MAX_GEN_LEN[bench.kind], "temperature": temperature}
    device = torch.device(device) if device is not None else _model_device(model)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    with open(out_dir / PREDICTIONS, "a", encoding="utf-8") as f:
        for batch in tqdm(batches, desc=f"eval {bench.name}", disable=not batches):
            x = _batch_features(batch, feats, device, cache) if modality_name else None
            for rec in _generate(model, bench, batch, x, prompt_style, **gen, **generate_kwargs):
                f.write(json.dumps(rec) + "\n")
                done[rec["id"]] = rec
            f.flush()  # a finished batch survives an interruption
            os.fsync(f.fileno())
    preds = {it.id: done[it.id]["prediction"] for it in items if it.id in done}
    table = _table(bench, modality_name, score_benchmark(bench, preds))
    _write_table(out_dir, table)
    return table


def _batch_features(batch, feats, device, cache) -> torch.Tensor:
    """``(B, D)`` features of a batch, through the visual cache when one is given."""
    x = torch.stack([feats[it.id].float().reshape(-1) for it in batch]).to(device)  # (B, D)
    return cache(F.normalize(x, dim=-1)) if cache is not None else x


def _generate(model, bench: Benchmark, batch, x, prompt_style: str, **gen) -> list[dict]:
    """One generation call; returns the batch's prediction records."""
    fmt = _format_prompt()
    instructions = [bench.instruction(it, style=prompt_style) for it in batch]
    outs = model.generate_from_feats(x, [fmt(s) for s in instructions], **gen)
    return [
        {"id": it.id, "image": it.image, "instruction": s, "prediction": pred}
        for it, s, pred in zip(batch, instructions, outs, strict=True)
    ]


# --- command line ---------------------------------------------------------------------------


def _benchmark_dirs(path: Path) -> list[Path]:
    """A benchmark folder, or a folder of benchmark folders (the mini-benchmarks)."""
    if (path / "benchmark.json").is_file():
        return [path]
    subs = sorted(p for p in path.iterdir() if (p / "benchmark.json").is_file())
    if not subs:
        raise FileNotFoundError(f"{path}: no benchmark.json here or in its subfolders")
    return subs


def _adapter_path(args) -> Path | None:
    """``--adapter FILE``, or ``--model`` as a file or a training run folder
    (``<run>/checkpoint.pt``, the name ``ibllm_lab.train`` writes)."""
    if args.model is None:
        return args.adapter
    path = Path(args.model)
    return path / "checkpoint.pt" if path.is_dir() else path


def _load_model(args):
    from ibllm_lab.checkpoint import load

    return load(args.llama, _adapter_path(args), llama_type=args.llama_type, device=args.device)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ibllm-lab eval", description=__doc__.splitlines()[0])
    add = p.add_argument
    add(
        "--default",
        action="store_true",
        help="the embedded default: its trained model, mini-benchmarks and features "
        "(built if missing); --modality picks how scenes are presented",
    )
    add("--mini-n", type=int, default=10, help="with --default: scenes per mini-benchmark")
    add("--use-cache", action="store_true", help="pass features through the visual cache")
    add(
        "--prompt-style",
        choices=("llava", "plain"),
        default=None,
        help="harness post-prompt: llava (LLaVA-1.5 suffixes; default for checkpoints) or "
        "plain (bare questions; default with --default, matching the world's training data)",
    )
    add("--benchmark", type=Path, default=None, help="benchmark folder or a folder of them")
    add("--llama", type=Path, default=None, help="LLaMA folder (params.json, tokenizer.model)")
    add("--llama-type", default="7B", help="subfolder of --llama holding the weights, if any")
    add("--adapter", type=Path, default=None, help="trained adapter checkpoint file")
    add("--model", type=Path, default=None, help="adapter file or run folder (checkpoint.pt)")
    add("--modality", default="Image", help="Image, Audio, Point, Video, Depth, ... or none")
    add("--features", type=Path, default=None, help="torch file {'ids', 'feats' (N, D)}")
    add("--encoder", type=Path, default=None, help="BindLite file (with --world)")
    add("--world", type=Path, default=None, help="world folder for --encoder")
    add("--out", type=Path, default=None, help="output folder")
    add("--batch-size", type=int, default=16)
    add("--max-gen-len", type=int, default=None, help="default: per benchmark kind")
    add("--limit", type=int, default=None, help="first N items of each benchmark")
    add("--device", default=None, help="default: CUDA, else MPS, else CPU")
    return p


def cli(argv: list[str] | None = None) -> int:
    """``ibllm-lab eval``: evaluate a checkpoint on one or more benchmarks, print the table."""
    args = _parser().parse_args(argv)
    from ibllm_lab.runtime import default_device

    args.device = args.device or str(default_device())
    if args.default:
        return _cli_default(args)
    missing = [f"--{k}" for k in ("benchmark", "llama", "out") if getattr(args, k) is None]
    if missing:
        _parser().error(f"{', '.join(missing)} required (or --default for the embedded default)")
    model = _load_model(args)
    encoder = world = None
    if args.encoder is not None:
        from ibllm_lab.encoders import BindLite
        from ibllm_lab.world import World

        encoder = BindLite.load(args.encoder)
        world = World.load(args.world) if args.world is not None else None
    tables = []
    for bdir in _benchmark_dirs(args.benchmark):
        tables.append(
            evaluate(model, bdir, args.out / bdir.name, modality=args.modality,
                     features=args.features, encoder=encoder, world=world,
                     batch_size=args.batch_size, max_gen_len=args.max_gen_len,
                     limit=args.limit, device=args.device, use_cache=args.use_cache,
                     prompt_style=args.prompt_style or "llava")
        )  # fmt: skip
    return _finish(args.out, tables)


def _finish(out: Path, tables: list[pd.DataFrame]) -> int:
    table = pd.concat(tables, ignore_index=True)
    _write_table(out, table)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def _cli_default(args) -> int:
    """The embedded default end to end: its trained model (fine-tuned phase), its world's
    mini-benchmarks presented in ``--modality``, its cached features, and its cache index."""
    from ibllm_lab.evalsets import make_mini_benchmarks
    from ibllm_lab.modality import Modality
    from ibllm_lab.runtime import data_dir
    from ibllm_lab.studies import embedded_default

    default = embedded_default(device=args.device)
    modality = Modality.parse(args.modality)
    bench_root = data_dir() / "mini" / default.name / modality.value
    if not bench_root.is_dir():
        make_mini_benchmarks(default.world, bench_root, n=args.mini_n, modality=modality)
    model = default.model("finetune", device=args.device, cache=args.use_cache)
    features = default.features(modality)
    style = args.prompt_style or "plain"
    out = args.out or data_dir() / "eval" / default.name / f"{modality.value}-{style}"
    if args.use_cache:
        out = out.with_name(out.name + "-cache")
    tables = [
        evaluate(model, bdir, out / bdir.name, modality=modality.value, features=features,
                 batch_size=args.batch_size, max_gen_len=args.max_gen_len, limit=args.limit,
                 device=args.device, use_cache=args.use_cache, prompt_style=style)
        for bdir in _benchmark_dirs(args.benchmark or bench_root)
    ]  # fmt: skip
    return _finish(out, tables)
