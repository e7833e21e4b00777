"""Benchmark readers for the official annotation formats, and mini-benchmarks from the world.

Every reader returns a :class:`Benchmark`: a ``kind`` that selects the scoring rule in
``ibllm_lab.evaluate`` and a list of :class:`EvalItem`. Images are never opened here; when an
``image_dir`` is given, each item's file is checked and the ids of items whose image is
missing are collected in ``Benchmark.missing`` (or raised together with ``strict=True``), so
a missing file never stops a run halfway.

Formats (official layouts, local paths):

- ``read_textvqa``: ``{"data": [{question_id, question, image_id, answers}]}``, images
  ``<image_id>.jpg``.
- ``read_vqa`` (VQAv2; ``read_okvqa``): questions json ``{"questions": [...]}`` + annotations
  json ``{"annotations": [{question_id, image_id, answers: [{answer, ...}] x 10}]}``, images
  ``COCO_<data_subtype>_<image_id:012d>.jpg``.
- ``read_vizwiz``: ``[{image, question, answers: [{answer, answer_confidence}], answerable}]``.
- ``read_gqa``: ``{qid: {imageId, question, answer, fullAnswer}}``, images ``<imageId>.jpg``.
- ``read_mme``: ``<subtask>/questions_answers_YN/<img>.txt`` (or ``<subtask>/<img>.txt``) with
  lines ``question<TAB>answer``, or ``<subtask>.txt`` lines ``image<TAB>question<TAB>answer``.
- ``read_mmbench``: TSV with index, question, hint, A..D, answer, category, l2-category, image
  (base64, a path, or the index of the row that holds the image).
- ``read_scienceqa``: problems.json ``{id: {question, choices, answer, image, split, hint}}``,
  images ``<split>/<id>/<image>``.
- ``read_karpathy``: ``{"images": [{filename, split, sentences: [{raw, tokens}]}]}``.

Mini-benchmarks (``make_mini_benchmarks``) use the same formats; their "image" is a scene id
of the world, so evaluation can present each scene in any modality.
"""

from __future__ import annotations

import csv
import json
import logging
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ibllm_lab.io import atomic_write_text, write_json_atomic

logger = logging.getLogger(__name__)

KINDS = ("vqa", "gqa", "mme", "mmbench", "scienceqa", "caption")
BENCHMARK_META = "benchmark.json"
VQA_SUFFIX = "\nAnswer the question using a single word or phrase."
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
PLAIN_MC_SUFFIX = "\nAnswer with the option's letter."
PROMPT_STYLES = ("llava", "plain")
CAPTION_INSTRUCTION = "Generate caption of this image"  # the method's pre-training prompt
CIRCULAR_OFFSET = 1_000_000  # MMBench: rotations of one question share index % 1e6


class MissingImagesError(FileNotFoundError):
    """Raised with ``strict=True`` when images are missing; ``.ids`` lists the items."""

    def __init__(self, ids: list[str], image_dir: Path):
        self.ids = ids
        shown = ", ".join(ids[:20]) + (" ..." if len(ids) > 20 else "")
        super().__init__(f"{len(ids)} item(s) have no image under {image_dir}: {shown}")


@dataclass
class EvalItem:
    """One benchmark sample.

    ``id``: unique sample id; ``image``: image file name or world scene id; ``question``: text
    as in the benchmark; ``answers``: references (10 VQA answers, one yes/no or letter, or
    captions); ``options``: letter -> text for multiple choice; ``meta``: subtask, category,
    MMBench index, hint, ...
    """

    id: str
    image: str
    question: str
    answers: list[str]
    options: dict[str, str] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)


@dataclass
class Benchmark:
    name: str
    kind: str
    items: list[EvalItem]
    image_dir: Path | None = None
    missing: list[str] = field(default_factory=list)
    world_dir: Path | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"benchmark kind {self.kind!r}: expected one of {KINDS}")
        ids = [it.id for it in self.items]
        if len(set(ids)) != len(ids):
            raise ValueError(f"benchmark {self.name!r} has duplicate item ids")

    def __len__(self) -> int:
        return len(self.items)

    def instruction(self, item: EvalItem, style: str = "llava") -> str:
        """The instruction given to the model for ``item`` (before the prompt template).

        ``style`` is the harness's post-prompt, as lmms-eval configures per model:
        ``"llava"`` (default) appends LLaVA-1.5's "Answer the question using a single word or
        phrase." to VQA/GQA and "Answer with the option's letter from the given choices
        directly." to multiple choice, and keeps MME's own " Please answer yes or no.";
        ``"plain"`` asks the bare question (MME's suffix removed) and ends multiple choice with
        "Answer with the option's letter.", the wording of the embedded world's training data.
        """
        if style not in PROMPT_STYLES:
            raise ValueError(f"prompt style {style!r}: expected one of {PROMPT_STYLES}")
        plain = style == "plain"
        if self.kind in ("vqa", "gqa"):
            return item.question if plain else item.question + VQA_SUFFIX
        if self.kind == "mme":
            q = item.question
            return q.removesuffix(MME_PROMPT).removesuffix(MME_PROMPT.strip()) if plain else q
        if self.kind == "caption":
            return CAPTION_INSTRUCTION
        hint = item.meta.get("hint") or ""
        lines = ([f"Context: {hint}"] if hint else []) + [item.question]
        lines += [f"{k}. {v}" for k, v in item.options.items()]
        return "\n".join(lines) + (PLAIN_MC_SUFFIX if plain else MC_SUFFIX)


# --- helpers ------------------------------------------------------------------------------


def _read_json(path: Path):
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _check_images(bench: Benchmark, strict: bool, image_path=None) -> Benchmark:
    """Fill ``bench.missing`` with ids whose image file is absent under ``bench.image_dir``."""
    if bench.image_dir is None:
        return bench
    root = Path(bench.image_dir)
    locate = image_path or (lambda item: root / item.image)
    bench.missing = [it.id for it in bench.items if not Path(locate(it)).is_file()]
    if bench.missing:
        if strict:
            raise MissingImagesError(bench.missing, root)
        logger.warning(
            "%s: %d item(s) without image under %s, e.g. %s",
            bench.name,
            len(bench.missing),
            root,
            bench.missing[:5],
        )
    return bench


def _answers(raw: Iterable) -> list[str]:
    return [a["answer"] if isinstance(a, dict) else str(a) for a in raw]


# --- readers ------------------------------------------------------------------------------


def read_textvqa(path: Path, image_dir: Path | None = None, strict: bool = False) -> Benchmark:
    """TextVQA json (``{"data": [...]}``); images ``<image_dir>/<image_id>.jpg``."""
    items = [
        EvalItem(
            id=str(d["question_id"]),
            image=f"{d['image_id']}.jpg",
            question=d["question"],
            answers=_answers(d.get("answers", [])),
        )
        for d in _read_json(Path(path))["data"]
    ]
    return _check_images(Benchmark("textvqa", "vqa", items, image_dir), strict)


def read_vqa(
    questions: Path,
    annotations: Path,
    image_dir: Path | None = None,
    name: str = "vqav2",
    image_template: str | None = None,
    strict: bool = False,
) -> Benchmark:
    """VQAv2 / OKVQA questions + annotations json.

    ``image_template`` formats ``image_id`` (default ``COCO_<data_subtype>_{image_id:012d}.jpg``
    for integer ids, ``{image_id}`` otherwise, as in the mini-benchmarks).
    """
    q = _read_json(Path(questions))
    by_qid = {a["question_id"]: a for a in _read_json(Path(annotations))["annotations"]}
    subtype = q.get("data_subtype", "val2014")
    items = []
    for d in q["questions"]:
        ann = by_qid.get(d["question_id"])
        if ann is None:
            raise ValueError(f"{annotations}: no annotation for question {d['question_id']}")
        image_id = d["image_id"]
        template = image_template or (
            f"COCO_{subtype}_{{image_id:012d}}.jpg" if isinstance(image_id, int) else "{image_id}"
        )
        meta = {k: ann[k] for k in ("question_type", "answer_type") if k in ann}
        meta.update({k: ann[k] for k in ("heldout", "attribute") if k in ann})
        items.append(
            EvalItem(
                id=str(d["question_id"]),
                image=template.format(image_id=image_id),
                question=d["question"],
                answers=_answers(ann["answers"]),
                meta=meta,
            )
        )
    return _check_images(Benchmark(name, "vqa", items, image_dir), strict)


def read_okvqa(
    questions: Path, annotations: Path, image_dir: Path | None = None, **kw
) -> Benchmark:
    """OKVQA uses the VQAv2 file format."""
    return read_vqa(questions, annotations, image_dir, name="okvqa", **kw)


def read_vizwiz(path: Path, image_dir: Path | None = None, strict: bool = False) -> Benchmark:
    """VizWiz json list; an item's id is its image file name. Unanswerable questions have
    "unanswerable" among their answers and ``meta["answerable"] == 0``."""
    items = [
        EvalItem(
            id=d["image"],
            image=d["image"],
            question=d["question"],
            answers=_answers(d.get("answers", [])),
            meta={k: d[k] for k in ("answerable", "answer_type") if k in d},
        )
        for d in _read_json(Path(path))
    ]
    return _check_images(Benchmark("vizwiz", "vqa", items, image_dir), strict)


def read_gqa(path: Path, image_dir: Path | None = None, strict: bool = False) -> Benchmark:
    """GQA questions json ``{qid: {imageId, question, answer, fullAnswer}}``."""
    items = [
        EvalItem(
            id=str(qid),
            image=f"{d['imageId']}.jpg",
            question=d["question"],
            answers=[d["answer"]],
            meta={"fullAnswer": d.get("fullAnswer", "")},
        )
        for qid, d in _read_json(Path(path)).items()
    ]
    return _check_images(Benchmark("gqa", "gqa", items, image_dir), strict)


def _mme_pairs_file(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            question, answer = line.rstrip("\n").split("\t")[:2]
            rows.append((question.strip(), answer.strip()))
    return rows


_IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG")


def _mme_image_name(folder: Path, stem: str) -> str:
    for ext in _IMAGE_EXTS:
        if (folder / f"{stem}{ext}").is_file():
            return f"{stem}{ext}"
    return f"{stem}.jpg"


def _mme_folder_items(root: Path) -> list[EvalItem]:
    """Layout A: ``<subtask>/questions_answers_YN/<img>.txt`` or ``<subtask>/<img>.txt``."""
    items = []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        qa_dir = sub / "questions_answers_YN"
        img_dir = sub / "images" if qa_dir.is_dir() else sub
        for txt in sorted((qa_dir if qa_dir.is_dir() else sub).glob("*.txt")):
            image = _mme_image_name(img_dir, txt.stem)
            rel = str(Path(sub.name) / img_dir.relative_to(sub) / image)
            for k, (question, answer) in enumerate(_mme_pairs_file(txt)):
                items.append(_mme_item(sub.name, rel, question, answer, k))
    return items


def _mme_item(subtask: str, image: str, question: str, answer: str, k: int) -> EvalItem:
    return EvalItem(
        id=f"{subtask}/{Path(image).name}/{k}",
        image=image,
        question=question,
        answers=[answer],
        meta={"subtask": subtask},
    )


def _mme_table_items(root: Path) -> list[EvalItem]:
    """Layout B (MME eval_tool): ``<subtask>.txt`` lines ``image<TAB>question<TAB>answer``."""
    items = []
    for txt in sorted(root.glob("*.txt")):
        lines = [x for x in txt.read_text(encoding="utf-8").splitlines() if x.strip()]
        if not lines or lines[0].count("\t") < 2:
            continue  # not a results table (a readme, say)
        seen: dict[str, int] = {}
        for line in lines:
            image, question, answer = line.split("\t")[:3]
            k = seen[image] = seen.get(image, -1) + 1
            items.append(_mme_item(txt.stem, image.strip(), question.strip(), answer.strip(), k))
    return items


def read_mme(root: Path, image_dir: Path | None = None, strict: bool = False) -> Benchmark:
    """MME from either layout (module docstring). Images are looked up under ``image_dir``
    (default: ``root``) as ``<subtask>/...`` for layout A and ``<subtask>/<image>`` or
    ``<image>`` for layout B."""
    root = Path(root)
    items = _mme_table_items(root) or _mme_folder_items(root)
    if not items:
        raise ValueError(f"{root}: no MME question files found (see read_mme for the layouts)")
    base = Path(image_dir) if image_dir is not None else None

    def locate(item: EvalItem) -> Path:
        candidate = base / item.image
        nested = base / item.meta["subtask"] / item.image
        return nested if not candidate.is_file() and nested.is_file() else candidate

    bench = Benchmark("mme", "mme", items, base)
    return _check_images(bench, strict, locate if base is not None else None)


_OPTION_LETTERS = "ABCDEFGHI"


def _is_missing(value) -> bool:
    return value is None or str(value).strip() in ("", "nan", "NaN", "None")


def _mmbench_image(row: dict, rows_by_index: dict[str, dict]) -> tuple[str, str | None]:
    """(image key, base64 payload or None). Rows may point at another row by index."""
    value = (row.get("image_path") or row.get("image") or "").strip()
    if value.isdigit() and value in rows_by_index and value != row["index"]:
        value = (rows_by_index[value].get("image") or "").strip()
    looks_b64 = (
        len(value) > 64
        and re.fullmatch(r"[A-Za-z0-9+/=\s]+", value) is not None
        and re.search(r"\.[A-Za-z]{2,4}$", value) is None
    )
    if looks_b64:
        return str(int(row["index"]) % CIRCULAR_OFFSET), value
    return value, None


def read_mmbench(path: Path, image_dir: Path | None = None, strict: bool = False) -> Benchmark:
    """MMBench TSV. Base64 images are kept in ``meta["image_base64"]`` (no file check);
    path images are checked under ``image_dir``."""
    csv.field_size_limit(2**31 - 1)
    with open(path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    by_index = {r["index"]: r for r in rows}
    items = []
    for r in rows:
        options = {c: r[c].strip() for c in _OPTION_LETTERS if c in r and not _is_missing(r[c])}
        image, b64 = _mmbench_image(r, by_index)
        meta = {
            "index": int(r["index"]),
            "hint": "" if _is_missing(r.get("hint")) else r["hint"].strip(),
            "category": r.get("category", ""),
            "l2-category": r.get("l2-category", ""),
        }
        if b64 is not None:
            meta["image_base64"] = b64
        answer = [r["answer"].strip()] if not _is_missing(r.get("answer")) else []
        items.append(EvalItem(r["index"], image, r["question"].strip(), answer, options, meta))
    bench = Benchmark("mmbench", "mmbench", items, image_dir)
    if image_dir is not None:
        with_files = [it for it in items if "image_base64" not in it.meta]
        sub = Benchmark(bench.name, bench.kind, with_files, image_dir)
        bench.missing = _check_images(sub, strict).missing
    return bench


def read_scienceqa(
    path: Path,
    image_dir: Path | None = None,
    split: str | None = "test",
    images_only: bool = True,
    strict: bool = False,
) -> Benchmark:
    """ScienceQA problems.json; ``images_only`` keeps the IMG subset. Images are
    ``<image_dir>/<split>/<id>/<image>``; the answer is stored as its letter."""
    items = []
    for pid, d in _read_json(Path(path)).items():
        if split is not None and d.get("split") != split:
            continue
        if images_only and not d.get("image"):
            continue
        options = {string.ascii_uppercase[i]: c for i, c in enumerate(d["choices"])}
        image = f"{d.get('split', '')}/{pid}/{d['image']}" if d.get("image") else ""
        meta = {"hint": d.get("hint") or "", "answer_index": int(d["answer"])}
        letter = string.ascii_uppercase[int(d["answer"])]
        items.append(EvalItem(str(pid), image, d["question"], [letter], options, meta))
    return _check_images(Benchmark("scienceqa", "scienceqa", items, image_dir), strict)


def read_karpathy(
    path: Path, image_dir: Path | None = None, split: str | None = "test", strict: bool = False
) -> Benchmark:
    """Karpathy-split captions json (Flickr30K, COCO). COCO's ``filepath`` is prefixed."""
    data = _read_json(Path(path))
    items = []
    for img in data["images"]:
        if split is not None and img.get("split") != split:
            continue
        image = str(Path(img.get("filepath", "")) / img["filename"])
        refs = [s["raw"] for s in img["sentences"]]
        item_id = str(img.get("imgid", img.get("cocoid", img["filename"])))
        items.append(EvalItem(item_id, image, CAPTION_INSTRUCTION, refs))
    name = data.get("dataset", "captions")
    return _check_images(Benchmark(name, "caption", items, image_dir), strict)


# --- loading by path ----------------------------------------------------------------------


def load_benchmark(path: Path | str, image_dir: Path | None = None, **kw) -> Benchmark:
    """Load a benchmark folder written by ``make_mini_benchmarks`` (it holds
    ``benchmark.json`` naming reader and files) or a folder of official files with such a
    ``benchmark.json`` written by hand: ``{"name", "reader", "files": {arg: relative path}}``."""
    path = Path(path)
    meta_path = path / BENCHMARK_META
    if not meta_path.is_file():
        raise FileNotFoundError(
            f"{meta_path} not found: write one naming the reader, e.g. "
            '{"reader": "read_textvqa", "files": {"path": "TextVQA_0.5.1_val.json"}}'
        )
    meta = _read_json(meta_path)
    reader = READERS.get(meta["reader"])
    if reader is None:
        raise ValueError(f"{meta_path}: unknown reader {meta['reader']!r}; one of {list(READERS)}")
    args = {k: path / v for k, v in meta.get("files", {}).items()}
    args.update(meta.get("options", {}))
    if image_dir is not None:
        args["image_dir"] = Path(image_dir)
    bench = reader(**args, **kw)
    bench.name = meta.get("name", bench.name)
    if meta.get("world_dir"):
        bench.world_dir = Path(meta["world_dir"])
    return bench


READERS = {
    f.__name__: f
    for f in (
        read_textvqa,
        read_vqa,
        read_okvqa,
        read_vizwiz,
        read_gqa,
        read_mme,
        read_mmbench,
        read_scienceqa,
        read_karpathy,
    )
}


# --- mini-benchmarks from the world ---------------------------------------------------------

# Attribute questions are the world's own (``world.ATTRIBUTE_QUESTIONS``), so they are in the
# model's idiom; yes/no questions follow the world's wording with MME's subtasks.
YES_NO_TEMPLATES = {
    "existence": "Is there {article} {value} in the {medium}?",
    "count": "Are there {value} objects?",
    "position": "Are the objects in the {value} of the {medium}?",
    "color": "Are the objects {value}?",
    "shape": "Are the objects in the {medium} {plural}?",
}
YES_NO_ATTRIBUTE = {"existence": "shape", "count": "count", "position": "position",
                    "color": "color", "shape": "shape"}  # fmt: skip
MME_PROMPT = " Please answer yes or no."
MINI_KINDS = ("vqa", "mme", "mmbench", "captions")


def _vocabulary(scenes: Sequence) -> dict[str, list[str]]:
    """Attribute vocabularies: ``ibllm_lab.world.ATTRIBUTES`` merged with the values seen."""
    try:
        from ibllm_lab.world import ATTRIBUTES
    except ImportError:  # the world module is optional for the readers
        ATTRIBUTES = {}
    vocab = {k: list(v) for k, v in ATTRIBUTES.items()}
    for s in scenes:
        for k, v in s.attributes.items():
            vocab.setdefault(k, [])
            if v not in vocab[k]:
                vocab[k].append(v)
    return vocab


def _carried(world, modality) -> set[str] | None:
    """Attributes the modality carries (``world.carries`` or ``ibllm_lab.world.carries``)."""
    if modality is None:
        return None
    carries = getattr(world, "carries", None)
    if carries is None:
        try:
            from ibllm_lab.world import carries
        except ImportError:
            return None
    return set(carries(modality))


def _medium(modality) -> str:
    """The world's questions say "video" for video and "image" for every other modality."""
    return "video" if modality is not None and str(modality).lower() == "video" else "image"


def _plural(word: str) -> str:
    try:
        from ibllm_lab.world import PLURALS
    except ImportError:
        PLURALS = {}
    return PLURALS.get(word, word + "s")


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


_DIGITS = {"one": "1", "two": "2", "three": "3", "four": "4", "five": "5"}


def _annotator_answers(value: str, others: Sequence[str], rng: random.Random) -> list[str]:
    """Ten human-like answers: mostly the value, some in other spellings, sometimes one
    annotator disagreeing."""
    variants = [value.capitalize(), value + ".", f"the {value}", _DIGITS.get(value, value)]
    answers = [value] * 10
    for i in rng.sample(range(10), k=rng.randint(0, 3)):
        answers[i] = rng.choice(variants)
    if others and rng.random() < 0.4:
        answers[rng.randrange(10)] = rng.choice(list(others))
    return answers


def _scene_sample(world, n: int, split: str, rng: random.Random) -> list:
    scenes = [s for s in world.scenes if s.split == split] or list(world.scenes)
    scenes = sorted(scenes, key=lambda s: s.id)
    return rng.sample(scenes, k=min(n, len(scenes)))


def _meta(out: Path, reader: str, files: dict, world_dir, name: str, **options) -> None:
    meta = {"name": name, "reader": reader, "files": files, "options": options}
    meta["world_dir"] = str(world_dir) if world_dir is not None else None
    write_json_atomic(out / BENCHMARK_META, meta)


@dataclass
class _MiniSpec:
    """What every mini-benchmark maker needs."""

    scenes: list
    vocab: dict[str, list[str]]
    attrs: list[str]
    medium: str
    world_dir: Path | None

    def question(self, attr: str) -> str:
        from ibllm_lab.world import ATTRIBUTE_QUESTIONS

        template = ATTRIBUTE_QUESTIONS.get(attr, f"What is the {attr} of the objects?")
        return template.format(medium=self.medium)

    def others(self, attr: str, value: str) -> list[str]:
        return [v for v in self.vocab.get(attr, []) if v != value]


def _mini_vqa(spec: _MiniSpec, rng: random.Random, out: Path) -> None:
    questions, annotations = [], []
    for s in spec.scenes:
        for attr in (a for a in spec.attrs if a in s.attributes):
            value, qid = s.attributes[attr], f"{s.id}_{attr}"
            questions.append(
                {"image_id": s.id, "question": spec.question(attr), "question_id": qid}
            )
            answers = _annotator_answers(value, spec.others(attr, value), rng)
            annotations.append({
                "question_id": qid, "image_id": s.id, "question_type": f"what {attr}",
                "answer_type": "number" if attr == "count" else "other",
                "multiple_choice_answer": value, "attribute": attr,
                "heldout": bool(getattr(s, "heldout", False)),
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i, a in enumerate(answers)],
            })  # fmt: skip
    head = {"task_type": "Open-Ended", "data_type": "ibllm-world", "data_subtype": "test"}
    write_json_atomic(out / "questions.json", {**head, "questions": questions})
    write_json_atomic(out / "annotations.json", {**head, "annotations": annotations})
    files = {"questions": "questions.json", "annotations": "annotations.json"}
    _meta(out, "read_vqa", files, spec.world_dir, "mini_vqa")


def _yes_no_pair(spec: _MiniSpec, scene, subtask: str, rng) -> list[tuple[str, str]]:
    """One "Yes" and one "No" question about ``scene``, in random order (none if the
    attribute is absent or has a single value)."""
    attr = YES_NO_ATTRIBUTE[subtask]
    value = scene.attributes.get(attr)
    if value is None or not spec.others(attr, value):
        return []
    pair = []
    for shown, answer in ((value, "Yes"), (rng.choice(spec.others(attr, value)), "No")):
        q = YES_NO_TEMPLATES[subtask].format(
            medium=spec.medium, value=shown, article=_article(shown), plural=_plural(shown)
        )
        pair.append((q + MME_PROMPT, answer))
    rng.shuffle(pair)
    return pair


def _mini_mme(spec: _MiniSpec, rng: random.Random, out: Path) -> None:
    for subtask, attr in YES_NO_ATTRIBUTE.items():
        if attr not in spec.attrs:
            continue
        lines = [
            f"{s.id}\t{q}\t{a}\n"
            for s in spec.scenes
            for q, a in _yes_no_pair(spec, s, subtask, rng)
        ]
        if lines:
            atomic_write_text(out / f"{subtask}.txt", "".join(lines))
    _meta(out, "read_mme", {"root": "."}, spec.world_dir, "mini_mme")


MMBENCH_COLUMNS = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                   "l2-category", "image"]  # fmt: skip


def _mini_mmbench(spec: _MiniSpec, rng: random.Random, out: Path, n_options: int = 4) -> None:
    rows, base = [], 0
    for s in spec.scenes:
        for attr in (a for a in spec.attrs if a in s.attributes):
            value = s.attributes[attr]
            others = spec.others(attr, value)
            if not others:
                continue
            options = [value] + rng.sample(others, k=min(n_options - 1, len(others)))
            rng.shuffle(options)
            for k in range(len(options)):  # every circular rotation, index + k * 1e6
                rotated = options[k:] + options[:k]
                cells = [rotated[i] if i < len(rotated) else "" for i in range(4)]
                answer = "ABCD"[rotated.index(value)]
                rows.append([base + k * CIRCULAR_OFFSET, spec.question(attr), "", *cells,
                             answer, attr, "attribute_perception", s.id])  # fmt: skip
            base += 1
    lines = ["\t".join(MMBENCH_COLUMNS)] + ["\t".join(map(str, r)) for r in rows]
    atomic_write_text(out / "mmbench.tsv", "\n".join(lines) + "\n")
    _meta(out, "read_mmbench", {"path": "mmbench.tsv"}, spec.world_dir, "mini_mmbench")


def _caption_tokens(raw: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", raw.lower())


def _mini_captions(spec: _MiniSpec, rng: random.Random, out: Path) -> None:
    images, sent_id = [], 0
    for i, s in enumerate(spec.scenes):
        caps = list(getattr(s, "captions", []) or [])
        if not caps:
            continue
        sentences = []
        for c in caps:
            sentences.append(
                {"raw": c, "tokens": _caption_tokens(c), "imgid": i, "sentid": sent_id}
            )
            sent_id += 1
        images.append({"filename": s.id, "imgid": i, "split": "test", "sentences": sentences,
                       "sentids": [x["sentid"] for x in sentences]})  # fmt: skip
    write_json_atomic(out / "dataset.json", {"dataset": "mini_captions", "images": images})
    _meta(out, "read_karpathy", {"path": "dataset.json"}, spec.world_dir, "mini_captions")


def make_mini_benchmarks(
    world,
    out_dir: Path,
    n: int = 20,
    seed: int = 0,
    split: str = "test",
    modality=None,
    kinds: Sequence[str] = MINI_KINDS,
    attributes: Sequence[str] | None = None,
) -> dict[str, Path]:
    """Write mini-benchmarks in the official formats from ``world`` (a ``World`` or anything
    with ``.scenes`` of Scene-like objects).

    ``n`` scenes of ``split`` per benchmark (all scenes if the split is empty); questions are
    asked about ``attributes`` (default: every attribute of the scenes), restricted to what
    ``modality`` carries when given; the questions say
    "video" for video and "image" otherwise, as the world's instruction data does.
    Returns ``{kind: folder}``: ``vqa`` (VQAv2 files, 10 answers), ``mme`` (eval_tool
    layout, 2 questions per scene and subtask, one yes one no; subtasks existence, count,
    position, color and the custom "shape"), ``mmbench`` (TSV with every circular
    rotation), ``captions`` (Karpathy json).
    """
    unknown = set(kinds) - set(MINI_KINDS)
    if unknown:
        raise ValueError(f"unknown mini-benchmark kinds {sorted(unknown)}; one of {MINI_KINDS}")
    out_dir = Path(out_dir)
    scenes = _scene_sample(world, n, split, random.Random(seed))
    if not scenes:
        raise ValueError("make_mini_benchmarks: the world has no scenes")
    vocab = _vocabulary(world.scenes)
    attrs = list(attributes) if attributes is not None else list(vocab)
    carried = _carried(world, modality)
    if carried is not None:
        attrs = [a for a in attrs if a in carried]
    world_dir = getattr(world, "root", None) or getattr(world, "out_dir", None)
    spec = _MiniSpec(scenes, vocab, attrs, _medium(modality), world_dir)
    makers = {"vqa": _mini_vqa, "mme": _mini_mme, "mmbench": _mini_mmbench,
              "captions": _mini_captions}  # fmt: skip
    written = {}
    for k, kind in enumerate(kinds):
        written[kind] = out_dir / kind
        makers[kind](spec, random.Random(seed * 1000 + k), written[kind])
    logger.info("mini-benchmarks from %d scenes written to %s", len(scenes), out_dir)
    return written
