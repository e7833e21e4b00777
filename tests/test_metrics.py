"""Scoring rules: hand-verified worked examples, edge cases, and properties."""

import itertools
import math
import random

import pytest

from ibllm_lab.metrics import (
    caption_scores,
    extract_option,
    extract_yes_no,
    gqa_exact_match,
    mmbench_circular,
    mme_scores,
    normalize_vqa_answer,
    process_punctuation,
    ptb_tokenize,
    scienceqa_accuracy,
    vqa_accuracy,
)

# --- VQA -----------------------------------------------------------------------------------


def test_vqa_worked_example_from_the_authors():
    # GT-Vision-Lab/VQA issue 1: 8 "yes" and 2 "no"; the authors give 1.0 and 0.6.
    refs = ["yes"] * 8 + ["no"] * 2
    assert vqa_accuracy("yes", refs) == pytest.approx(1.0)
    assert vqa_accuracy("no", refs) == pytest.approx(0.6)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Two.", "2"),  # number word, trailing period, case
        ("none", "0"),
        ("ten", "10"),
        ("The dog", "dog"),  # articles
        ("an apple", "apple"),
        ("dont", "don't"),  # contractions table
        ("3.5", "3.5"),  # a period before a digit stays
        ("1,000", "1000"),  # digit,digit comma: punctuation deleted, not spaced
        ("yes!", "yes"),
        ("hello-world", "hello world"),  # a mark touching no space becomes a space
        ("red\tand\nblue ", "red and blue"),
    ],
)
def test_normalize_vqa_answer(raw, expected):
    assert normalize_vqa_answer(raw) == expected


def test_process_punctuation_deletes_marks_next_to_spaces():
    assert process_punctuation("yes - no") == "yes  no"
    assert process_punctuation("a/b") == "a b"


def test_vqa_articles_and_partial_matches():
    # 3 "dog" + 7 "cat": leaving out a dog leaves 2 matches (2/3), a cat leaves 3 (1).
    refs = ["dog"] * 3 + ["cat"] * 7
    assert vqa_accuracy("the dog", refs) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)


def test_vizwiz_unanswerable():
    refs = ["unanswerable"] * 8 + ["blue"] * 2
    assert vqa_accuracy("Unanswerable.", refs) == pytest.approx(1.0)
    # "blue": 8 subsets keep both blues (2/3), 2 keep one (1/3).
    assert vqa_accuracy("blue", refs) == pytest.approx(0.6)
    assert vqa_accuracy("I cannot tell", refs) == 0.0


def test_vqa_official_mode_skips_processing_when_humans_agree():
    refs = ["black"] * 10
    assert vqa_accuracy("Black.", refs, mode="normalise_all") == 1.0
    assert vqa_accuracy("Black.", refs, mode="official") == 0.0
    # With disagreeing humans the official script normalises both sides.
    assert vqa_accuracy("Black.", ["black"] * 9 + ["gray"], mode="official") == 1.0


def _naive_vqa(pred, refs):
    """The official loop written out: score each 9-answer subset and average."""
    scores = []
    for i in range(len(refs)):
        others = refs[:i] + refs[i + 1 :]
        scores.append(min(1.0, sum(o == pred for o in others) / 3))
    return sum(scores) / len(scores)


def test_vqa_matches_naive_leave_one_out_on_random_cases():
    rng = random.Random(0)
    vocab = ["red", "blue", "2", "yes", "no"]
    for _ in range(300):
        refs = [rng.choice(vocab) for _ in range(10)]
        pred = rng.choice(vocab)
        assert vqa_accuracy(pred, refs) == pytest.approx(_naive_vqa(pred, refs))


def test_vqa_prediction_equal_to_every_reference_scores_one():
    rng = random.Random(1)
    for answer in ["red", "Two.", "the big dog", "unanswerable", "3.5", "don't know", "a/b"]:
        for n in (1, 4, 10):
            refs = [answer] * n
            for mode in ("normalise_all", "official"):
                assert vqa_accuracy(answer, refs, mode=mode) == 1.0
        noisy = [answer, answer.upper(), answer + "."] * 3 + [answer]
        rng.shuffle(noisy)
        assert vqa_accuracy(answer, noisy) == 1.0


def test_vqa_rejects_bad_input():
    with pytest.raises(ValueError):
        vqa_accuracy("x", [])
    with pytest.raises(ValueError):
        vqa_accuracy("x", ["x"], mode="lenient")


def test_gqa_exact_match():
    assert gqa_exact_match("Yes.", "yes") == 1.0
    assert gqa_exact_match("  Girl ", "girl") == 1.0
    assert gqa_exact_match("the girl", "girl") == 0.0  # no article removal in this rule
    assert gqa_exact_match("girl on the left", "girl") == 0.0


# --- MME -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, label",
    [
        ("Yes", "yes"),
        ("no.", "no"),
        ("Y", "yes"),
        ("n", "no"),
        ("Yes, there is a cat.", "yes"),
        ("No, it is not.", "no"),
        ("There is no cat", "other"),  # neither word in the first four characters
        ("I think so", "other"),
        ("x", "other"),
        ("", "other"),
    ],
)
def test_extract_yes_no(text, label):
    assert extract_yes_no(text) == label


def test_mme_scores_worked_example():
    recs = [
        # existence, image 1: both right; image 2: one right.
        {"subtask": "existence", "image": "1", "prediction": "Yes", "answer": "Yes"},
        {"subtask": "existence", "image": "1", "prediction": "No", "answer": "No"},
        {"subtask": "existence", "image": "2", "prediction": "Yes", "answer": "Yes"},
        {"subtask": "existence", "image": "2", "prediction": "Yes", "answer": "No"},
        # count: both wrong.
        {"subtask": "count", "image": "3", "prediction": "No", "answer": "Yes"},
        {"subtask": "count", "image": "3", "prediction": "maybe", "answer": "No"},
        # cognition subtask: both right.
        {"subtask": "code_reasoning", "image": "4", "prediction": "yes", "answer": "Yes"},
        {"subtask": "code_reasoning", "image": "4", "prediction": "no", "answer": "No"},
        # custom perception subtask of the mini-benchmarks.
        {"subtask": "shape", "image": "5", "prediction": "yes", "answer": "Yes"},
        {"subtask": "shape", "image": "5", "prediction": "no", "answer": "Yes"},
    ]
    s = mme_scores(recs, perception=["shape"])
    assert s["existence/acc"] == pytest.approx(75.0)
    assert s["existence/acc+"] == pytest.approx(50.0)
    assert s["existence"] == pytest.approx(125.0)
    assert s["count"] == 0.0
    assert s["code_reasoning"] == pytest.approx(200.0)
    assert s["shape"] == pytest.approx(50.0)
    assert s["perception"] == pytest.approx(175.0)
    assert s["cognition"] == pytest.approx(200.0)
    assert mme_scores(recs)["perception"] == pytest.approx(125.0)  # shape not official


# --- multiple choice -----------------------------------------------------------------------

OPTS = {"A": "red", "B": "blue", "C": "dark green", "D": "green"}


@pytest.mark.parametrize(
    "text, letter",
    [
        ("A", "A"),
        ("(B)", "B"),
        ("C.", "C"),
        ("D)", "D"),
        ("Answer: B", "B"),
        ("The answer is C.", "C"),
        ("B. blue", "B"),
        ("blue", "B"),  # unique option text
        ("It is blue.", "B"),
        ("The object is dark green.", None),  # "green" and "dark green" both occur (VLMEvalKit)
        ("red or blue", None),  # two options named
        ("A blue square on a table", "B"),  # leading "A" is the article
        ("I do not know", None),
        ("E", None),  # not an option
    ],
)
def test_extract_option(text, letter):
    assert extract_option(text, OPTS) == letter


def test_mmbench_circular_worked_example():
    opts = ["red", "blue", "green", "yellow"]
    recs = []
    for q, wrong_rotations in ((0, set()), (1, {2})):
        for k in range(4):
            rotated = opts[k:] + opts[:k]
            options = dict(zip("ABCD", rotated, strict=True))
            answer = "ABCD"[rotated.index("red")]
            guess = "ABCD"[(rotated.index("red") + 1) % 4] if k in wrong_rotations else answer
            recs.append({"index": q + k * 1_000_000, "prediction": guess, "options": options,
                         "answer": answer, "category": "color"})  # fmt: skip
    s = mmbench_circular(recs)
    assert s["circular"] == pytest.approx(50.0)
    assert s["vanilla"] == pytest.approx(100.0 * 7 / 8)
    assert s["circular/color"] == pytest.approx(50.0)
    assert s["n_questions"] == 2


def test_scienceqa_accuracy():
    recs = [
        {"prediction": "B", "choices": ["simile", "metaphor"], "answer": 1},
        {"prediction": "The answer is West Virginia.", "choices": ["West Virginia", "Arizona"],
         "answer": 0},
        {"prediction": "I am not sure", "choices": ["a", "b"], "answer": 0},
    ]  # fmt: skip
    assert scienceqa_accuracy(recs) == pytest.approx(200.0 / 3)


# --- captions ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, tokens",
    [
        ("A man's dog.", "a man 's dog"),
        ("It doesn't run!", "it does n't run"),
        ('He said "hi" (twice), then left...', "he said hi twice then left"),
        ("A well-known 3.5 km race; fun", "a well-known 3.5 km race fun"),
        ("Two\nlines -- here", "two lines here"),
        ("We can't, cannot: U.S. $5", "we ca n't can not u.s. $ 5"),
    ],
)
def test_ptb_tokenize(raw, tokens):
    assert ptb_tokenize(raw) == tokens


def test_bleu4_worked_example():
    # p1..p4 = 4/5, 3/4, 2/3, 1/2 and no brevity penalty: BLEU-4 = 0.2 ** 0.25.
    s = caption_scores({"1": "a b c d e"}, {"1": ["a b c d f"]})
    assert s["BLEU-4"] == pytest.approx(100 * 0.2**0.25, rel=1e-6)


def test_caption_scores_reward_the_right_caption():
    refs = {
        "1": ["A red circle on the left.", "a red ring at left"],
        "2": ["Two blue squares.", "two squares, blue"],
        "3": ["A green triangle moving up.", "green triangle going up"],
    }
    good = {"1": "a red circle on the left", "2": "two blue squares", "3": "a green triangle"}
    bad = {"1": "two blue squares", "2": "a green triangle", "3": "a red circle on the left"}
    sg, sb = caption_scores(good, refs), caption_scores(bad, refs)
    assert sg["CIDEr"] > sb["CIDEr"] and sg["BLEU-4"] > sb["BLEU-4"]
    # Same tokens after PTB processing give identical scores.
    punct = {k: v.upper() + "." for k, v in good.items()}
    assert caption_scores(punct, refs) == pytest.approx(sg)
    assert all(math.isfinite(v) for v in sg.values())


def test_caption_scores_need_matching_ids():
    with pytest.raises(ValueError):
        caption_scores({"1": "x"}, {"2": ["x"]})


def test_all_metric_combinations_bounded():
    for pred, ref in itertools.product(["yes", "no", "2", "red"], repeat=2):
        assert 0.0 <= vqa_accuracy(pred, [ref] * 10) <= 1.0
