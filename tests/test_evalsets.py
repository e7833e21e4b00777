"""Readers on small fixtures in the official formats, and mini-benchmarks from a real world."""

import csv
import json
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from ibllm_lab.evalsets import (
    CIRCULAR_OFFSET,
    MissingImagesError,
    load_benchmark,
    make_mini_benchmarks,
    read_gqa,
    read_karpathy,
    read_mmbench,
    read_mme,
    read_okvqa,
    read_scienceqa,
    read_textvqa,
    read_vizwiz,
    read_vqa,
)
from ibllm_lab.metrics import vqa_accuracy

FIX = Path(__file__).parent / "fixtures" / "eval"


def _touch(root: Path, names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


# --- readers -------------------------------------------------------------------------------


def test_read_textvqa():
    b = read_textvqa(FIX / "textvqa_val.json")
    assert b.kind == "vqa" and len(b) == 2
    it = b.items[0]
    assert (it.id, it.image, it.question) == ("34602", "003a8ae2ef43b901.jpg", it.question)
    assert len(it.answers) == 10 and it.answers[2] == "Nikon"
    assert vqa_accuracy("Nikon.", it.answers) == 1.0


def test_read_vqav2_and_okvqa_image_names():
    b = read_vqa(FIX / "vqav2_questions.json", FIX / "vqav2_annotations.json")
    assert [it.id for it in b.items] == ["262148000", "262148001"]
    assert b.items[0].image == "COCO_val2014_000000262148.jpg"
    assert b.items[1].answers.count("2") == 8 and b.items[1].meta["answer_type"] == "number"
    assert vqa_accuracy("two", b.items[1].answers) == 1.0
    ok = read_okvqa(FIX / "vqav2_questions.json", FIX / "vqav2_annotations.json")
    assert ok.name == "okvqa" and len(ok) == 2


def test_read_vizwiz_unanswerable():
    b = read_vizwiz(FIX / "vizwiz_val.json")
    assert b.items[1].id == "VizWiz_val_00000001.jpg"
    assert b.items[1].meta["answerable"] == 0
    assert vqa_accuracy("unanswerable", b.items[1].answers) == 1.0


def test_read_gqa():
    b = read_gqa(FIX / "gqa_testdev_questions.json")
    assert b.kind == "gqa"
    by_id = {it.id: it for it in b.items}
    assert by_id["20968379"].image == "n288870.jpg" and by_id["20968379"].answers == ["girl"]
    assert by_id["201640614"].meta["fullAnswer"].startswith("Yes")


def test_read_mme_folder_layout_and_missing_images(tmp_path):
    b = read_mme(FIX / "mme_folder")
    assert Counter(it.meta["subtask"] for it in b.items) == {"existence": 4, "artwork": 2}
    assert {it.answers[0] for it in b.items} == {"Yes", "No"}
    exist = [it for it in b.items if it.meta["subtask"] == "existence"]
    assert exist[0].image == "existence/images/000000006040.jpg"
    # Only one existence image present: the other image's two questions are reported.
    _touch(tmp_path, ["existence/images/000000006040.jpg", "artwork/10002.jpg"])
    b = read_mme(FIX / "mme_folder", image_dir=tmp_path)
    assert sorted(b.missing) == [
        "existence/000000018150.jpg/0",
        "existence/000000018150.jpg/1",
    ]


def test_read_mme_table_layout(tmp_path):
    b = read_mme(FIX / "mme_table")
    assert [it.meta["subtask"] for it in b.items] == ["OCR", "OCR", "count", "count"]
    assert b.items[0].image == "0001.jpg" and '"angie\'s"' in b.items[0].question
    _touch(tmp_path, ["OCR/0001.jpg"])  # found under the subtask folder
    b = read_mme(FIX / "mme_table", image_dir=tmp_path)
    assert b.missing == ["count/000000006040.jpg/0", "count/000000006040.jpg/1"]
    with pytest.raises(MissingImagesError) as err:
        read_mme(FIX / "mme_table", image_dir=tmp_path, strict=True)
    assert "count/000000006040.jpg/0" in str(err.value) and len(err.value.ids) == 2


def test_read_mmbench(tmp_path):
    b = read_mmbench(FIX / "mmbench_dev_en.tsv")
    first, rotated, two = b.items
    assert first.options == {"A": "Oil Paiting", "B": "Sketch", "C": "Digital art", "D": "Photo"}
    assert first.meta["hint"] == "" and "image_base64" in first.meta
    # The rotated copy points at row 241 for its image and shares its circular group.
    assert rotated.meta["image_base64"] == first.meta["image_base64"]
    assert rotated.meta["index"] % CIRCULAR_OFFSET == first.meta["index"]
    assert rotated.options[rotated.answers[0]] == first.options[first.answers[0]]
    assert two.options == {"A": "red", "B": "green"} and two.meta["hint"].startswith("The object")
    b = read_mmbench(FIX / "mmbench_dev_en.tsv", image_dir=tmp_path)
    assert b.missing == ["242"]  # base64 rows need no file


def test_read_scienceqa(tmp_path):
    b = read_scienceqa(FIX / "scienceqa_problems.json")
    assert [it.id for it in b.items] == ["12", "20"]  # test split, with image
    assert b.items[0].answers == ["A"] and b.items[0].image == "test/12/image.png"
    assert b.items[1].meta["hint"].startswith("The passage")
    assert len(read_scienceqa(FIX / "scienceqa_problems.json", images_only=False)) == 3
    _touch(tmp_path, ["test/12/image.png"])
    assert read_scienceqa(FIX / "scienceqa_problems.json", image_dir=tmp_path).missing == ["20"]


def test_read_karpathy():
    b = read_karpathy(FIX / "karpathy_flickr30k.json")
    assert b.name == "flickr30k" and b.kind == "caption"
    assert [it.image for it in b.items] == ["1000092795.jpg", "1000268201.jpg"]
    assert b.items[0].answers[0] == "Two young guys with shaggy hair."
    assert len(read_karpathy(FIX / "karpathy_flickr30k.json", split=None)) == 3


def test_load_benchmark_from_hand_written_meta(tmp_path):
    (tmp_path / "benchmark.json").write_text(
        json.dumps({"reader": "read_gqa", "files": {"path": "q.json"}, "name": "gqa_small"})
    )
    (tmp_path / "q.json").write_text((FIX / "gqa_testdev_questions.json").read_text())
    b = load_benchmark(tmp_path)
    assert b.name == "gqa_small" and len(b) == 2
    with pytest.raises(FileNotFoundError):
        load_benchmark(tmp_path / "nothing")


# --- mini-benchmarks -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from ibllm_lab.world import WorldConfig, generate_world

    return generate_world(WorldConfig.from_name("quick", n_scenes=40), tmp_path_factory.mktemp("w"))


@pytest.fixture(scope="module")
def mini(world, tmp_path_factory):
    return make_mini_benchmarks(world, tmp_path_factory.mktemp("mini"), n=6, seed=3)


def test_mini_vqa_format(world, mini):
    q = json.loads((mini["vqa"] / "questions.json").read_text())
    a = json.loads((mini["vqa"] / "annotations.json").read_text())
    assert q["task_type"] == "Open-Ended" and len(q["questions"]) == len(a["annotations"])
    scenes = {s.id: s for s in world.scenes}
    for ann in a["annotations"]:
        assert len(ann["answers"]) == 10
        assert {"answer", "answer_confidence", "answer_id"} <= set(ann["answers"][0])
        truth = scenes[ann["image_id"]].attributes[ann["attribute"]]
        assert vqa_accuracy(truth, [x["answer"] for x in ann["answers"]]) >= 0.9
    b = load_benchmark(mini["vqa"])
    assert b.world_dir == Path(world.root) and {it.image for it in b.items} <= set(scenes)
    assert "motion" in {it.meta["attribute"] for it in b.items}  # images show motion trails


def test_mini_mme_pairs(world, mini):
    b = load_benchmark(mini["mme"])
    pairs = defaultdict(list)
    for it in b.items:
        pairs[(it.meta["subtask"], it.image)].append(it.answers[0])
    assert {s for s, _ in pairs} == {"existence", "count", "position", "color", "shape"}
    assert all(sorted(v) == ["No", "Yes"] for v in pairs.values())
    assert all(it.question.endswith("Please answer yes or no.") for it in b.items)
    line = (mini["mme"] / "color.txt").read_text().splitlines()[0]
    assert len(line.split("\t")) == 3  # MME eval_tool layout


def test_mini_mmbench_rotations(mini):
    with open(mini["mmbench"] / "mmbench.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert list(rows[0])[:8] == ["index", "question", "hint", "A", "B", "C", "D", "answer"]
    groups = defaultdict(list)
    for r in rows:
        groups[int(r["index"]) % CIRCULAR_OFFSET].append(r)
    for rs in groups.values():
        letters = [c for c in "ABCD" if rs[0][c]]
        assert len(rs) == len(letters)  # one row per rotation
        assert len({r[r["answer"]] for r in rs}) == 1  # the right option text never changes
        assert len({r["answer"] for r in rs}) == len(rs)  # ... but its letter does
    assert len(load_benchmark(mini["mmbench"])) == len(rows)


def test_mini_captions_and_modality_restriction(world, mini, tmp_path):
    b = load_benchmark(mini["captions"])
    data = json.loads((mini["captions"] / "dataset.json").read_text())
    assert all(s["tokens"] and s["raw"] for img in data["images"] for s in img["sentences"])
    assert len(b) == len(data["images"]) > 0
    audio = make_mini_benchmarks(world, tmp_path, n=4, modality="Audio", kinds=["mme", "vqa"])
    subtasks = {it.meta["subtask"] for it in load_benchmark(audio["mme"]).items}
    assert "position" not in subtasks and "color" in subtasks  # audio carries no position
    asked = {it.meta["attribute"] for it in load_benchmark(audio["vqa"]).items}
    assert "motion" not in asked and "position" not in asked
    video = make_mini_benchmarks(world, tmp_path / "v", n=3, modality="Video", kinds=["vqa"])
    items = load_benchmark(video["vqa"]).items
    assert "motion" in {it.meta["attribute"] for it in items}
    assert any("video" in it.question for it in items)
    with pytest.raises(ValueError):
        make_mini_benchmarks(world, tmp_path, kinds=["pope"])


def test_prompt_styles_change_only_the_post_prompt():
    from ibllm_lab.evalsets import Benchmark, EvalItem

    vqa = Benchmark("v", "vqa", [EvalItem("1", "img", "What colour?", ["red"] * 10)])
    assert (
        vqa.instruction(vqa.items[0])
        == "What colour?\nAnswer the question using a single word or phrase."
    )
    assert vqa.instruction(vqa.items[0], style="plain") == "What colour?"
    mme = Benchmark(
        "m", "mme", [EvalItem("1", "img", "Is it red? Please answer yes or no.", ["yes"])]
    )
    assert mme.instruction(mme.items[0]) == "Is it red? Please answer yes or no."
    assert mme.instruction(mme.items[0], style="plain") == "Is it red?"
    mc = Benchmark(
        "c", "mmbench", [EvalItem("1", "img", "Shape?", ["A"], {"A": "circle", "B": "cross"})]
    )
    assert (
        mc.instruction(mc.items[0], style="plain")
        == "Shape?\nA. circle\nB. cross\nAnswer with the option's letter."
    )
    with pytest.raises(ValueError, match="prompt style"):
        vqa.instruction(vqa.items[0], style="chatty")
