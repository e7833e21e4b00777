"""The small experiments the notebooks show, each a function that returns a DataFrame.

They combine the library's parts (the embedded default's artefacts, encoders' embeddings,
the visual cache, the model, the evaluation harness) into the sweeps and comparisons of the
notebooks, so that a notebook cell is one call plus what it shows, and a test can run the
same code.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ibllm_lab.modality import Modality, VisualCache

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- artefacts


@dataclass
class EmbeddedDefault:
    """The embedded default's artefacts for the current profile ("quick" or "default"):
    world, BindLite encoders, per-modality features, the trained base LM and adapter phases
    (``train.train_pipeline``'s layout) and a visual-cache index of the train images."""

    name: str
    world: Any
    encoder: Any
    feature_dir: Path
    run_dir: Path
    llama_dir: Path
    adapters: dict[str, Path]  # phase ("pretrain", "finetune") -> adapter.pth
    cache_path: Path
    _features: dict[Modality, tuple[list[str], torch.Tensor]] = field(
        default_factory=dict, repr=False
    )

    def features(self, modality: Modality | str) -> tuple[list[str], torch.Tensor]:
        """``(scene ids, (N, D) unit-norm features)`` of every scene (cached on disk and
        in memory)."""
        from ibllm_lab.encoders import compute_features

        m = Modality.parse(modality)
        if m not in self._features:
            self._features[m] = compute_features(self.encoder, self.world, m, self.feature_dir)
        return self._features[m]

    def lookup(self, modality: Modality | str, scene_ids: Sequence[str]) -> torch.Tensor:
        """``(len(scene_ids), D)`` features of the given scenes."""
        ids, feats = self.features(modality)
        rows = {k: i for i, k in enumerate(ids)}
        return feats[[rows[k] for k in scene_ids]]

    def model(self, phase: str = "finetune", device=None, cache: bool = True, encoder=False):
        """The ``ImageBindLLM`` after ``phase`` ("base" = zero gates, "pretrain",
        "finetune"), frozen, in eval mode, with the visual cache attached when ``cache`` and
        BindLite attached when ``encoder`` (then inputs are preprocessed media, not
        embeddings)."""
        from ibllm_lab.cache import FaissCache
        from ibllm_lab.checkpoint import load

        adapter = None if phase == "base" else self.adapters[phase]
        acfg = None
        if adapter is None:
            from ibllm_lab.train import adapter_config

            acfg = adapter_config(self.llama_dir, self.encoder.embed_dim)
        model = load(
            self.llama_dir,
            adapter,
            llama_type="",
            device=device,
            adapter_cfg=acfg,
            encoder=self.encoder if encoder else None,
        )
        if cache:
            model.cache = FaissCache.load(self.cache_path)
        return model


def _forget_phases_of_other_encoder(run_dir: Path, encoder_fingerprint: str) -> None:
    """The adapter phases are trained on one encoder's features; when the encoder changed
    (retrained), remove them so that ``train_pipeline`` trains them again (the base LM does
    not depend on the encoder and is kept)."""
    from ibllm_lab.io import atomic_write_text

    marker = run_dir / "encoder_fingerprint.txt"
    recorded = marker.read_text().strip() if marker.is_file() else None  # None: not known
    if (run_dir / "pretrain").exists() and recorded != encoder_fingerprint:
        log.warning("the encoders changed; retraining the adapter phases in %s", run_dir)
        for stale in ("features", "pretrain", "finetune"):
            shutil.rmtree(run_dir / stale, ignore_errors=True)
    atomic_write_text(marker, encoder_fingerprint + "\n")


def embedded_default(device=None, progress: bool = True, threads: int = 2) -> EmbeddedDefault:
    """Load the embedded default's artefacts, building whatever is missing or stale (world,
    encoders, base LM and both adapter phases, the cache index) through the library.

    ``threads``: torch CPU threads while loading and building (at most the CPU count; the
    caller's setting is restored after), so that a notebook that keeps one thread for its
    tiny inference still trains on two cores, the benchmarks' setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    try:
        return _embedded_default(device, progress)
    finally:
        torch.set_num_threads(before)


def _embedded_default(device, progress: bool) -> EmbeddedDefault:
    from ibllm_lab.cache import FaissCache
    from ibllm_lab.encoders import load_default_encoders
    from ibllm_lab.runtime import data_dir, is_quick
    from ibllm_lab.train import train_pipeline
    from ibllm_lab.world import MEDIA_MODALITIES, ensure_world

    name = "quick" if is_quick() else "default"
    world = ensure_world(name)
    encoder = load_default_encoders(world.root)
    run_dir = data_dir() / "checkpoints" / name
    _forget_phases_of_other_encoder(run_dir, encoder.fingerprint())
    try:
        result = train_pipeline(
            world, encoder, run_dir, preset=name, device=device or "cpu", progress=progress
        )
    except ValueError as err:  # a run folder from another configuration cannot resume
        if "cannot resume" not in str(err):
            raise
        log.warning("%s; retraining the embedded default from scratch in %s", err, run_dir)
        shutil.rmtree(run_dir)
        result = train_pipeline(
            world, encoder, run_dir, preset=name, device=device or "cpu", progress=progress
        )
    default = EmbeddedDefault(
        name,
        world,
        encoder,
        data_dir() / "features" / world.root.name,
        run_dir,
        result.llama_dir,
        {"pretrain": result.pretrain, "finetune": result.finetune},
        data_dir() / "cache" / f"{name}.faiss",
    )
    for m in MEDIA_MODALITIES:  # the features every notebook reads
        default.features(m)
    train_ids = [s.id for s in world.split("train")]
    FaissCache.build(default.lookup(Modality.IMAGE, train_ids), "flat").save(default.cache_path)
    return default


# ----------------------------------------------------------------------------- asking


def ask(
    model: Any,
    inputs: Mapping[str, Any | None],
    questions: Sequence[str],
    max_gen_len: int = 32,
    **generate_options: Any,
) -> pd.DataFrame:
    """Greedy answers of ``model`` to every question about every named input.

    ``inputs``: ``{label: {'Image': [tensor, weight], ...} or None (text only)}`` in the
    model's ``generate`` convention. Returns a table with columns input, question, answer."""
    from ibllm_lab.model import format_prompt

    prompts = [format_prompt(q) for q in questions]
    rows = []
    for label, x in inputs.items():
        answers = model.generate(x, prompts, max_gen_len, temperature=0.0, **generate_options)
        rows += [
            {"input": label, "question": q, "answer": a}
            for q, a in zip(questions, answers, strict=True)
        ]
    return pd.DataFrame(rows)


def exact_match(answers: Sequence[str], truths: Sequence[str]) -> list[bool]:
    """Whether each answer equals its truth after ``world.answer_normalise``."""
    from ibllm_lab.world import answer_normalise

    return [
        answer_normalise(a) == answer_normalise(t) for a, t in zip(answers, truths, strict=True)
    ]


def answer_accuracy(answers: Sequence[str], truths: Sequence[str]) -> float:
    """Share of exact matches (``exact_match``)."""
    hits = exact_match(answers, truths)
    return float(np.mean(hits)) if hits else float("nan")


def mixture_sweep(
    model: Any,
    default: Any,
    pairs: Sequence[tuple[Modality, Modality]],
    scene_a: Any,
    scene_b: Any,
    weights: Sequence[float],
    question: str = "Describe the image.",
    max_gen_len: int = 24,
) -> pd.DataFrame:
    """Scene A in one modality mixed with scene B in another, B's weight swept over
    ``weights``. Per (pair, weight): the model's answer and where the fused feature sits,
    ``cos(B's image) - cos(A's image)`` (-1..1 as it moves from A to B)."""
    from ibllm_lab.modality import fuse

    image_a, image_b = (default.lookup(Modality.IMAGE, [s.id]) for s in (scene_a, scene_b))
    inputs, rows = {}, []
    for ma, mb in pairs:
        fa, fb = default.lookup(ma, [scene_a.id]), default.lookup(mb, [scene_b.id])
        for x in weights:
            label = f"{ma.value} A + {mb.value} B @ {x:.2f}"
            inputs[label] = {ma: [fa, 1 - x], mb: [fb, x]}
            fused = F.normalize(fuse([fa, fb], [1 - x, x]), dim=-1)  # (1, D)
            toward_b = float(fused @ image_b.T - fused @ image_a.T)
            rows.append(
                {
                    "pair": f"{ma.value} A + {mb.value} B",
                    "weight_b": x,
                    "cos(B image) - cos(A image)": toward_b,
                }
            )
    answers = ask(model, inputs, [question], max_gen_len)
    return pd.DataFrame(rows).assign(answer=answers.answer.values)


# ----------------------------------------------------------------------------- training


def question_examples(
    world: Any, split: str = "val", kind: str = "attribute", n: int = 64, seed: int = 0
) -> list[Any]:
    """``n`` image questions (``world.make_question`` of ``kind``) about scenes of ``split``,
    as ``data.Example`` with the scene's image as media."""
    from ibllm_lab.data import Example
    from ibllm_lab.world import make_question

    rng = np.random.default_rng(seed)
    scenes = world.split(split)[:n]
    out = []
    for s in scenes:
        _, question, answer = make_question(s.attributes, kind, rng, Modality.IMAGE)
        out.append(Example(question, answer, media=s.files[Modality.IMAGE], id=s.id))
    return out


def loss_batch(model: Any, examples: Sequence[Any], default: Any, max_len: int = 96):
    """``(tokens, labels, feats)`` of ``examples`` for ``model.forward``; image features
    from the embedded default (text-only examples get zeros)."""
    from ibllm_lab.data import FeatureDataset, collate, features_by_media

    ids, feats = default.features(Modality.IMAGE)
    files = {s.id: s.files[Modality.IMAGE] for s in default.world.scenes}
    table = features_by_media(ids, feats, files)
    data = FeatureDataset(examples, model.tokenizer, max_len, table, feats.shape[1])
    return collate([data[i] for i in range(len(data))])


@torch.no_grad()
def mean_loss(model: Any, batch: tuple[torch.Tensor, torch.Tensor, torch.Tensor]) -> float:
    """The answer tokens' cross-entropy of ``batch`` (no visual cache: training conditions)."""
    tokens, labels, feats = (x.to(model.device) for x in batch)
    return float(model(tokens, labels, feats))


def _gates(model: Any) -> dict[int, torch.nn.Parameter]:
    return {
        int(name.split(".")[2]): p
        for name, p in model.named_parameters()
        if name.startswith("llama.layers.") and name.endswith(".attention.gate")
    }


@torch.no_grad()
def gate_ablation(model: Any, batch, open_value: float = 10.0) -> pd.DataFrame:
    """Loss with the trained gates, with each layer's gates zeroed in turn, with all gates
    zeroed (the base LLaMA) and with all gates fully open (``tanh(open_value)`` ~ 1, i.e.
    ungated at inference). The gates are restored afterwards."""
    gates = _gates(model)
    saved = {layer: g.detach().clone() for layer, g in gates.items()}
    rows = [{"variant": "trained gates", "layer": None, "loss": mean_loss(model, batch)}]
    try:
        for layer, g in gates.items():
            g.zero_()
            rows.append(
                {
                    "variant": f"layer {layer} zeroed",
                    "layer": layer,
                    "loss": mean_loss(model, batch),
                }
            )
            g.copy_(saved[layer])
        for variant, value in (("all gates zeroed", 0.0), ("all gates open", open_value)):
            for g in gates.values():
                g.fill_(value)
            rows.append({"variant": variant, "layer": None, "loss": mean_loss(model, batch)})
    finally:
        for layer, g in gates.items():
            g.copy_(saved[layer])
    out = pd.DataFrame(rows)
    out["loss_increase"] = out.loss - out.loss.iloc[0]
    return out


def gate_history(metrics_csv: str | Path) -> pd.DataFrame:
    """A training run's ``tanh(gate)`` log as a long table: step, layer, head, value."""
    df = pd.read_csv(metrics_csv)
    cols = [c for c in df.columns if c.startswith("gate_L")]
    long = df.melt(id_vars=["step"], value_vars=cols, var_name="gate", value_name="tanh_gate")
    parts = long.gate.str.extract(r"gate_L(\d+)_H(\d+)").astype(int)
    return long.assign(layer=parts[0], head=parts[1]).drop(columns="gate")


@torch.no_grad()
def injection_at_init(default: Any, batch, injections=("gated", "ungated"), seed: int = 0):
    """Before any training: the loss on ``batch`` and the largest change of the logits
    against the plain base LLaMA, for each injection mode with a freshly initialised
    adapter. Zero-initialised gates leave the LLaMA exactly unchanged."""
    from ibllm_lab.checkpoint import load, load_base_weights, load_llama
    from ibllm_lab.llama import Llama
    from ibllm_lab.train import adapter_config

    tokens, labels, feats = batch
    state, cfg = load_llama(default.llama_dir)
    llama = Llama(cfg)
    load_base_weights(llama, state)
    base = llama(tokens).float()  # (B, T, vocab)
    base_loss = torch.nn.functional.cross_entropy(
        base[:, :-1].reshape(-1, base.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=0
    )
    rows = [{"injection": "none (base LLaMA)", "loss": float(base_loss), "max |logit change|": 0.0}]
    for injection in injections:
        torch.manual_seed(seed)  # the same bind network and prefix for every mode
        acfg = adapter_config(default.llama_dir, feats.shape[1]).replace(injection=injection)
        model = load(default.llama_dir, None, llama_type="", adapter_cfg=acfg)
        cond = model.logits(tokens, feats)
        rows.append(
            {
                "injection": injection,
                "loss": float(model(tokens, labels, feats)),
                "max |logit change|": float((cond - base).abs().max()),
            }
        )
    return pd.DataFrame(rows)


def trainable_summary(model: Any) -> pd.DataFrame:
    """Per phase: how many tensors and parameters train (``peft.trainable_keys``), and the
    share of all parameters."""
    from ibllm_lab.peft import trainable_keys

    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    rows = []
    for phase in ("pretrain", "finetune"):
        keys = trainable_keys(model, phase)
        n = sum(params[k].numel() for k in keys)
        kinds = sorted({_kind(k) for k in keys})
        rows.append(
            {
                "phase": phase,
                "tensors": len(keys),
                "parameters": n,
                "share": n / total,
                "what": ", ".join(kinds),
            }
        )
    return pd.DataFrame(rows)


def _kind(key: str) -> str:
    """A readable group name of a parameter key."""
    for needle, name in (
        ("image_bind", "bind network"),
        ("prefix_query", "prefix"),
        (".gate", "gates"),
        ("lora", "LoRA"),
        ("bias", "biases"),
        ("norm", "norms"),
    ):
        if needle in key:
            return name
    return key


# ----------------------------------------------------------------------------- visual cache


def zero_shot_accuracy(
    z: torch.Tensor, classifiers: Mapping[str, torch.Tensor], truth: Mapping[str, np.ndarray]
) -> dict[str, float]:
    """Accuracy per attribute of embeddings ``z`` (N, D) against text class embeddings
    ``classifiers[attribute]`` (K, D); ``truth[attribute]`` holds class indices (N,)."""
    return {
        a: float(((z.float() @ classifiers[a].T).argmax(1).numpy() == truth[a]).mean())
        for a in truth
    }


def embedding_stats(z: torch.Tensor, images: torch.Tensor) -> dict[str, float]:
    """How close embeddings ``z`` (N, D) sit to the paired image embeddings ``images`` (N, D):
    mean cosine to the paired image, centroid distance, and raw R@1 of retrieving the paired
    image among ``images``."""
    z, images = F.normalize(z.float(), dim=-1), F.normalize(images.float(), dim=-1)
    sims = z @ images.T  # (N, N)
    hits = sims.argmax(1) == torch.arange(len(z))
    return {
        "cosine_to_paired_image": float(sims.diagonal().mean()),
        "centroid_distance": float((z.mean(0) - images.mean(0)).norm()),
        "R@1_to_image": float(hits.float().mean()),
    }


def cache_sweep(
    queries: Mapping[Modality, torch.Tensor],
    images: torch.Tensor,
    cache: VisualCache,
    grid: Iterable[Mapping[str, float]],
    classifiers: Mapping[str, torch.Tensor] | None = None,
    truth: Mapping[Modality, Mapping[str, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """The visual cache's effect per modality and setting.

    ``queries``: ``{modality: (N, D)}`` embeddings of N scenes; ``images``: (N, D) the same
    scenes' image embeddings (the bank should hold *other* images, e.g. the train split).
    ``grid``: settings ``{"cache_size", "cache_t", "cache_weight"}``. With ``classifiers`` and
    ``truth[modality]`` (attribute -> class indices) the zero-shot accuracy over those
    attributes is added. One row per (modality, setting)."""
    rows = []
    for setting in grid:
        for m, q in queries.items():
            z = cache(q, int(setting["cache_size"]), setting["cache_t"], setting["cache_weight"])
            row: dict[str, Any] = {"modality": m.value, **setting, **embedding_stats(z, images)}
            if classifiers is not None and truth is not None and truth.get(m):
                acc = zero_shot_accuracy(z, classifiers, truth[m])
                row["zero_shot_accuracy"] = float(np.mean(list(acc.values())))
            rows.append(row)
    return pd.DataFrame(rows)


def gate_comparison(
    queries: Mapping[Modality, torch.Tensor],
    images: torch.Tensor,
    cache: Any,
    gate: Any,
    setting: Mapping[str, float],
    classifiers: Mapping[str, torch.Tensor] | None = None,
    truth: Mapping[Modality, Mapping[str, np.ndarray]] | None = None,
) -> pd.DataFrame:
    """Each modality's queries without the cache, with the method's cache and with the gated
    cache (``gate``: an ``ibllm_lab.cache.CacheGate``) at one ``setting`` (``cache_size``,
    ``cache_t``, ``cache_weight``): the statistics of :func:`cache_sweep` plus ``pulled``,
    the share of queries the cache moved. ``queries`` may include the image modality itself
    (test images: the bank should hold other images). One row per (modality, cache)."""
    size, t, weight = int(setting["cache_size"]), setting["cache_t"], setting["cache_weight"]
    rows = []
    for m, q in queries.items():
        plain = F.normalize(q.float(), dim=-1)
        for mode in ("off", "method", "gated"):
            if mode == "off":
                z = plain
            else:
                z = cache(q, size, t, weight, **({"gate": gate} if mode == "gated" else {}))
            moved = (z.float() - plain).norm(dim=-1) > 1e-5
            row: dict[str, Any] = {"modality": m.value, "cache": mode}
            row |= {**embedding_stats(z, images), "pulled": float(moved.float().mean())}
            if classifiers is not None and truth is not None and truth.get(m):
                acc = zero_shot_accuracy(z, classifiers, truth[m])
                row["zero_shot_accuracy"] = float(np.mean(list(acc.values())))
            rows.append(row)
    return pd.DataFrame(rows)


def settings_grid(**axes: Sequence[float]) -> list[dict[str, float]]:
    """The product of the given axes as a list of settings dicts."""
    names = list(axes)
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*axes.values())]


def one_at_a_time(base: Mapping[str, float], **axes: Sequence[float]) -> list[dict[str, float]]:
    """Settings that vary one axis at a time around ``base`` (a sweep per axis)."""
    out = [dict(base)]
    for name, values in axes.items():
        out += [{**base, name: v} for v in values if v != base[name]]
    return out


def index_comparison(
    bank: torch.Tensor | np.ndarray,
    queries: torch.Tensor | np.ndarray,
    kinds: Sequence[str] = ("flat", "ivf", "hnsw", "pq"),
    k: int = 10,
    reps: int = 3,
    **build_options: Any,
) -> pd.DataFrame:
    """Build each faiss index kind over ``bank`` (N, D) and search ``queries`` (B, D):
    build seconds, median search milliseconds per query and recall@k against exact search.
    PQ codebooks get at most ``log2(N / 39)`` bits (faiss wants 39 training points per
    centroid) unless ``pq_bits`` is given."""
    from ibllm_lab.cache import FaissCache

    n = len(bank)
    build_options.setdefault("pq_bits", int(max(1, min(8, np.log2(max(2, n // 39))))))

    exact = FaissCache.build(bank, "flat")
    q = np.ascontiguousarray(np.asarray(queries, dtype=np.float32))
    _, truth = exact.search(q, k)
    rows = []
    for kind in kinds:
        t0 = time.perf_counter()
        cache = exact if kind == "flat" else FaissCache.build(bank, kind, **build_options)
        build_s = time.perf_counter() - t0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            _, found = cache.search(q, k)
            times.append(time.perf_counter() - t0)
        recall = np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth, strict=True)])
        rows.append(
            {
                "kind": kind,
                "vectors": cache.ntotal,
                "build_s": build_s,
                "search_ms_per_query": 1000 * float(np.median(times)) / len(q),
                f"recall@{k}": float(recall),
            }
        )
    return pd.DataFrame(rows)


def attribute_truth(scenes: Sequence[Any], attributes: Iterable[str]) -> dict[str, np.ndarray]:
    """``{attribute: (N,) class indices}`` of the scenes' attribute values (world.ATTRIBUTES)."""
    from ibllm_lab.world import ATTRIBUTES

    return {a: np.array([ATTRIBUTES[a].index(s.attributes[a]) for s in scenes]) for a in attributes}


def linear_probe_accuracy(
    train_x: torch.Tensor,
    train_y: np.ndarray | torch.Tensor,
    test_x: torch.Tensor,
    test_y: np.ndarray | torch.Tensor,
    steps: int = 300,
    seed: int = 0,
) -> float:
    """Test accuracy of a softmax-regression probe (features standardised on the train set,
    Adam, ``steps`` full-batch steps) that reads labels from features: how linearly decodable
    an attribute is."""
    train_y, test_y = torch.as_tensor(train_y).long(), torch.as_tensor(test_y).long()
    if train_x.dim() != 2 or len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError("need (N, D) features with one label per row, train and test")
    mean, std = train_x.float().mean(0), train_x.float().std(0) + 1e-6
    xtr, xte = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    torch.manual_seed(seed)
    probe = torch.nn.Linear(xtr.shape[1], int(max(train_y.max(), test_y.max())) + 1)
    opt = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=1e-4)
    with torch.enable_grad():
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(probe(xtr), train_y).backward()
            opt.step()
    with torch.no_grad():
        return float((probe(xte).argmax(1) == test_y).float().mean())


def bind_probes(
    model: Any,
    train: tuple[Sequence[Any], torch.Tensor],
    test: tuple[Sequence[Any], torch.Tensor],
    attributes: Iterable[str] = ("shape", "color", "size", "position", "count"),
    steps: int = 300,
) -> pd.DataFrame:
    """Where attribute information is lost on its way into the LLM: linear-probe accuracy of
    each attribute from the encoder's features and from the bind network's output ``v``
    (what every injected layer receives). ``train`` / ``test``: (scenes, features) pairs.
    An attribute the encoder carries but the bind output does not was squeezed out in
    pre-training, and fine-tuning (bind network frozen) cannot bring it back."""
    from ibllm_lab.world import ATTRIBUTES

    (train_scenes, train_x), (test_scenes, test_x) = train, test
    with torch.no_grad():
        device = model.device
        bound = [model.bind(x.to(device).float()).cpu() for x in (train_x, test_x)]
    rows = []
    for attribute in attributes:
        ytr = attribute_truth(train_scenes, [attribute])[attribute]
        yte = attribute_truth(test_scenes, [attribute])[attribute]
        rows.append(
            {
                "attribute": attribute,
                "encoder": linear_probe_accuracy(train_x, ytr, test_x, yte, steps),
                "bind output": linear_probe_accuracy(bound[0], ytr, bound[1], yte, steps),
                "chance": 1 / len(ATTRIBUTES[attribute]),
            }
        )
    return pd.DataFrame(rows).set_index("attribute")


# ----------------------------------------------------------------------------- ablations


@contextmanager
def gates_as(model: Any, gates: str | int) -> Iterator[Any]:
    """Temporarily change the injection gates: ``"trained"`` (as they are), ``"zeroed"``
    (the base LLaMA: inputs ignored), ``"open"`` (tanh ~ 1: ungated at inference) or an int
    ``k`` (only the last ``k`` layers' gates kept, the others zeroed)."""
    layers = _gates(model)
    saved = {i: g.detach().clone() for i, g in layers.items()}
    try:
        with torch.no_grad():
            for i, g in layers.items():
                if gates == "zeroed" or (isinstance(gates, int) and i < max(layers) + 1 - gates):
                    g.zero_()
                elif gates == "open":
                    g.fill_(10.0)
                elif gates != "trained" and not isinstance(gates, int):
                    raise ValueError(f"gates={gates!r}: expected trained, zeroed, open or an int")
        yield model
    finally:
        with torch.no_grad():
            for i, g in layers.items():
                g.copy_(saved[i])


def ablation_grid(
    default: Any,
    variants: Sequence[Mapping[str, Any]],
    modalities: Sequence[Modality | str],
    out_dir: str | Path,
    n_scenes: int = 12,
    kinds: Sequence[str] = ("vqa", "mme", "captions"),
    batch_size: int = 64,
    seed: int = 0,
    prompt_style: str = "plain",
) -> pd.DataFrame:
    """Evaluate model variants on the world's mini-benchmarks (``evalsets``) with the
    standard metrics (``evaluate``). ``prompt_style``: the harness post-prompt (``plain``,
    the world's instruction wording, or ``llava``).

    A variant is ``{"name", "phase": "finetune" | "pretrain", "gates": see gates_as,
    "cache": bool}``. Mini-benchmarks ask, per modality, only about what it carries.
    ``out_dir`` is cleared first (``evaluate`` resumes from earlier predictions otherwise).
    Returns the long table: variant, modality, benchmark, metric, value."""
    from ibllm_lab.evalsets import make_mini_benchmarks
    from ibllm_lab.evaluate import evaluate

    out_dir = Path(out_dir)
    shutil.rmtree(out_dir, ignore_errors=True)
    models: dict[str, Any] = {}
    tables = []
    for m in map(Modality.parse, modalities):
        benches = make_mini_benchmarks(
            default.world,
            out_dir / "benchmarks" / m.value,
            n_scenes,
            seed,
            modality=m,
            kinds=kinds,
        )
        feats = default.features(m)
        for v in variants:
            model = models.setdefault(v["phase"], default.model(v["phase"], cache=True))
            with gates_as(model, v.get("gates", "trained")):
                for kind, folder in benches.items():
                    run = out_dir / "runs" / v["name"].replace(" ", "_") / m.value / kind
                    table = evaluate(
                        model,
                        folder,
                        run,
                        modality=m.value,
                        features=feats,
                        batch_size=batch_size,
                        use_cache=bool(v.get("cache")),
                        prompt_style=prompt_style,
                    )
                    tables.append(table.assign(variant=v["name"]))
    return pd.concat(tables, ignore_index=True)


# Trained ablations: every variant is the embedded default's adapter with AdapterConfig
# overrides, both adapter phases trained again on the shared base LM and feature cache.
TRAINED_VARIANTS: dict[str, dict[str, Any]] = {
    "gated (reference)": {},  # the method: gated injection into every layer, bias + LoRA
    "prefix attention": {"injection": "prefix_attention", "query_len": 4},
    "ungated": {"injection": "ungated"},
    "input token": {"injection": "input_token", "query_layer": 0},
    "last layer only": {"query_layer": 1},
    "last 2 layers": {"query_layer": 2},
    "bias + norm (no LoRA)": {"lora_rank": 0},
    "LoRA + norm (no bias)": {"w_bias": False},
    "norm only (no bias, no LoRA)": {"w_bias": False, "lora_rank": 0},
}
# The budget each variant trains with, per embedded default ("quick" or "default") and
# phase: TrainConfig overrides plus "max_examples" (a seeded subset). The embedded default
# itself trains 18 + 3 epochs on 2269 + 9676 examples; "default" here is one epoch of 1024
# captions and 384 instructions (32 + 12 steps of 32), 4-8 s per variant on one CPU thread
# (45-55 s for the nine of TRAINED_VARIANTS), so notebook 06 stays within its share of
# `make run`. All variants get the same budget, the reference included.
ABLATION_BUDGETS: dict[str, dict[str, dict[str, Any]]] = {
    "default": {
        "pretrain": {"epochs": 1, "max_examples": 1024},
        "finetune": {"epochs": 1, "max_examples": 384},
    },
    "quick": {
        "pretrain": {"epochs": 1, "max_examples": 64},
        "finetune": {"epochs": 1, "max_examples": 64},
    },
}
HEADLINE_METRICS = {  # the one metric per mini-benchmark shown in tables and plots
    "mini_vqa": "accuracy",
    "mini_mme": "perception",
    "mini_captions": "CIDEr",
    "mini_mmbench": "circular",
}
VARIANT_FILE = "variant.json"


def _digest(paths: Iterable[Path]) -> str:
    import hashlib

    h = hashlib.sha256()
    for p in sorted(paths):
        h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _variant_spec(default: Any, overrides: Mapping[str, Any], budget: Mapping) -> dict[str, Any]:
    """What a trained variant depends on: its adapter configuration, the budget, and the
    base LM, encoders and world it was trained with (a change of any retrains it)."""
    from ibllm_lab.train import adapter_config

    acfg = adapter_config(default.llama_dir, default.encoder.embed_dim, **overrides)
    llama_files = [default.llama_dir / "params.json", *default.llama_dir.glob("consolidated.*")]
    return {
        "adapter_overrides": dict(overrides),
        "adapter_config": acfg.to_dict(),
        "budget": {phase: dict(v) for phase, v in budget.items()},
        "base_lm": _digest(llama_files),
        "encoder": default.encoder.fingerprint(),
        "world": default.world.fingerprint(),
    }


def train_variant(
    default: Any,
    overrides: Mapping[str, Any],
    out_dir: str | Path,
    budget: Mapping[str, Mapping[str, Any]] | None = None,
    device=None,
    progress: bool = False,
) -> tuple[Path, float]:
    """Train (or reuse) one ablation variant: both adapter phases of the embedded default
    with the AdapterConfig ``overrides`` and ``budget`` (``ABLATION_BUDGETS`` form; default:
    the one of ``default.name``), on ``default``'s base LM and feature cache
    (``train.train_pipeline`` under ``out_dir``). A folder whose ``variant.json`` matches
    is reused as it is; any other content is removed first. Returns the fine-tuned
    ``adapter.pth`` and the training seconds (0.0 when reused)."""
    from ibllm_lab.io import read_json, write_json_atomic
    from ibllm_lab.train import train_pipeline

    out_dir = Path(out_dir)
    budget = budget or ABLATION_BUDGETS[default.name]
    spec = _variant_spec(default, overrides, budget)
    adapter = out_dir / "finetune" / "adapter.pth"
    marker = out_dir / VARIANT_FILE
    if adapter.is_file() and marker.is_file() and read_json(marker) == spec:
        return adapter, 0.0
    shutil.rmtree(out_dir, ignore_errors=True)
    phases = {p: {k: v for k, v in b.items() if k != "max_examples"} for p, b in budget.items()}
    result = train_pipeline(
        default.world,
        default.encoder,
        out_dir,
        preset=default.name,
        device=device or "cpu",
        progress=progress,
        llama_dir=default.llama_dir,
        feature_dir=default.run_dir / "features",
        adapter_overrides=dict(overrides),
        phase_overrides=phases,
        max_examples={p: b["max_examples"] for p, b in budget.items() if "max_examples" in b},
    )
    write_json_atomic(marker, spec)
    return result.finetune, result.seconds["total"]


def _describe(acfg: Any) -> dict[str, Any]:
    peft = [name for name, on in (("bias", acfg.w_bias), ("LoRA", acfg.lora_rank > 0)) if on]
    return {
        "injection": acfg.injection,
        "injected_layers": acfg.query_layer if acfg.uses_prefix else 0,
        "peft": " + ".join(peft + ["norm"]),
    }


def _evaluate_variant(
    model: Any,
    default: Any,
    benches: Mapping[str, Mapping[str, Path]],
    conditions: Sequence[tuple[str, bool]],
    out_dir: Path,
    **evaluate_options: Any,
) -> tuple[dict[str, float], list[pd.DataFrame]]:
    """One variant under every ``(modality, cache)`` condition on every benchmark: its
    headline metrics ``{"<benchmark> <metric> (<modality>[, cache])": value}`` and the
    score tables (with a ``cache`` column)."""
    from ibllm_lab.evaluate import evaluate

    headline, tables = {}, []
    for modality, use_cache in conditions:
        m = Modality.parse(modality).value
        label = f"{m}, cache" if use_cache else m
        for kind, folder in benches[m].items():
            table = evaluate(
                model,
                folder,
                out_dir / label.replace(", ", "_") / kind,
                modality=m,
                features=default.features(m),
                use_cache=use_cache,
                **evaluate_options,
            )
            tables.append(table.assign(cache=use_cache))
            top = table[table.metric == table.benchmark.map(HEADLINE_METRICS)]
            for bench, metric, value in zip(top.benchmark, top.metric, top.value, strict=True):
                headline[f"{bench} {metric} ({label})"] = value
    return headline, tables


def trained_ablations(
    default: Any,
    variants: Mapping[str, Mapping[str, Any]],
    out_dir: str | Path,
    train_dir: str | Path | None = None,
    conditions: Sequence[tuple[str, bool]] = (("Image", False), ("Audio", False), ("Audio", True)),
    n_scenes: int = 8,
    kinds: Sequence[str] = ("vqa", "mme", "captions"),
    budget: Mapping[str, Mapping[str, Any]] | None = None,
    seed: int = 0,
    batch_size: int = 64,
    prompt_style: str = "plain",
    device=None,
    progress: bool = True,
) -> pd.DataFrame:
    """Train each variant (:func:`train_variant`, reused when complete) and evaluate it on
    the world's mini-benchmarks with the standard metrics.

    ``variants``: ``{name: AdapterConfig overrides}`` (see ``TRAINED_VARIANTS``), trained
    under ``train_dir`` (default ``default.run_dir / "ablations"``), one folder per name,
    with ``budget`` (default ``ABLATION_BUDGETS[default.name]``). ``conditions``:
    ``(modality, visual cache on)`` pairs each variant is evaluated under, on ``n_scenes``
    scenes per mini-benchmark of ``kinds``. ``prompt_style``: the harness post-prompt
    (``"plain"`` matches the world's training data). Writes under ``out_dir``: the
    evaluations (``eval/``, cleared first) and, atomically, ``trained_ablations.csv``
    (returned: one row per variant with its injection, injected layers, PEFT kind, training
    seconds (0 when reused) and one column per ``"<benchmark> <headline metric>
    (<modality>[, cache])"``) and ``trained_ablations_long.csv`` (every metric: benchmark,
    modality, metric, value, cache, variant)."""
    from tqdm.auto import tqdm

    from ibllm_lab.cache import FaissCache
    from ibllm_lab.checkpoint import load
    from ibllm_lab.evalsets import make_mini_benchmarks
    from ibllm_lab.io import atomic_write_text

    out_dir = Path(out_dir)
    train_dir = Path(train_dir) if train_dir is not None else default.run_dir / "ablations"
    shutil.rmtree(out_dir / "eval", ignore_errors=True)  # evaluate resumes otherwise
    benches = {}
    for m in sorted({Modality.parse(m).value for m, _ in conditions}):
        folder = out_dir / "eval" / "benchmarks" / m
        benches[m] = make_mini_benchmarks(
            default.world, folder, n_scenes, seed, modality=m, kinds=kinds
        )
    cache = FaissCache.load(default.cache_path)
    rows, tables = [], []
    for name, overrides in tqdm(variants.items(), desc="trained ablations", disable=not progress):
        slug = "".join(c if c.isalnum() else "_" for c in name)
        adapter, seconds = train_variant(default, overrides, train_dir / slug, budget, device)
        model = load(default.llama_dir, adapter, llama_type="", device=device)
        model.cache = cache
        headline, scores = _evaluate_variant(
            model,
            default,
            benches,
            conditions,
            out_dir / "eval" / slug,
            batch_size=batch_size,
            prompt_style=prompt_style,
        )
        desc = _describe(model.adapter_cfg)
        rows.append({"variant": name, **desc, "train_s": round(seconds, 1), **headline})
        tables += [t.assign(variant=name) for t in scores]
    wide, long = pd.DataFrame(rows), pd.concat(tables, ignore_index=True)
    atomic_write_text(out_dir / "trained_ablations.csv", wide.to_csv(index=False))
    atomic_write_text(out_dir / "trained_ablations_long.csv", long.to_csv(index=False))
    return wide


def headline_panels(table: pd.DataFrame) -> dict[str, dict[str, dict[str, float]]]:
    """:func:`trained_ablations`' table as ``{"<benchmark> <metric>": {variant: {condition:
    value}}}`` (the input of ``plots.bar_panels``), in the table's order."""
    import re

    panels: dict[str, dict[str, dict[str, float]]] = {}
    for column in table.columns:
        m = re.fullmatch(r"(\S+) (\S+) \((.+)\)", column)
        if m:
            bench, metric, condition = m.groups()
            panel = panels.setdefault(f"{bench} {metric}", {})
            for variant, value in zip(table.variant, table[column], strict=True):
                panel.setdefault(variant, {})[condition] = float(value)
    return panels


# ----------------------------------------------------------------------------- real files


def real_checkpoint_status(
    llama_dir: str,
    llama_type: str,
    adapter_checkpoint: str,
    features_dir: str,
    cache_index: str,
) -> pd.DataFrame:
    """What is present of a real set-up given by paths ("" = not given): one row per
    component with the path looked at, whether it was found and what is expected there."""

    def row(component: str, path: str, found: bool, expected: str) -> dict[str, Any]:
        status = "found" if found else ("not given" if not path else "missing")
        return {"component": component, "path": path, "status": status, "expected": expected}

    llama = Path(llama_dir) if llama_dir else None
    weights = None
    if llama is not None:
        weights = next(
            (d for d in (llama / llama_type, llama) if (d / "params.json").is_file()), None
        )
    shards = sorted(weights.glob("consolidated.*.pth")) if weights is not None else []
    tokenizer = llama is not None and any(
        (d / "tokenizer.model").is_file() for d in (llama, weights) if d is not None
    )
    feats = Path(features_dir) if features_dir else None
    return pd.DataFrame(
        [
            row(
                "LLaMA params.json",
                str(weights or llama_dir),
                weights is not None,
                f"<llama_dir>/{llama_type + '/' if llama_type else ''}params.json",
            ),
            row(
                "LLaMA weights",
                str(shards[0].parent) if shards else llama_dir,
                bool(shards),
                "consolidated.00.pth (.. .NN.pth for model-parallel shards)",
            ),
            row("tokenizer.model", llama_dir, bool(tokenizer), "SentencePiece, beside the weights"),
            row(
                "adapter checkpoint",
                adapter_checkpoint,
                bool(adapter_checkpoint) and Path(adapter_checkpoint).is_file(),
                "{'model': state_dict} of the adapter keys (ImageBind-LLM release)",
            ),
            row(
                "ImageBind features",
                features_dir,
                feats is not None and any(feats.glob("*.pt")),
                "<Modality>.pt files with {'ids': [...], 'feats': (N, 1024)}",
            ),
            row(
                "visual cache index",
                cache_index,
                bool(cache_index) and Path(cache_index).is_file(),
                "faiss inner-product index of image embeddings",
            ),
        ]
    )
