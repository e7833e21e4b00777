"""Scoring rules for the benchmarks ImageBind-LLM is reported on, one documented rule each.

Published numbers move by points with the scoring rule, so each rule below names the harness
or official scorer it follows; the tables and regexes are written here as data.

VQAv2, OKVQA, TextVQA, VizWiz -- ``vqa_accuracy``, ``normalize_vqa_answer``
    The official VQA script (GT-Vision-Lab ``vqaEval.py``, as run by EvalAI): accuracy is the
    mean over the 10 leave-one-out subsets of 9 answers of ``min(1, #matches / 3)`` (with a
    single reference answer: exact match). Answer processing: newline/tab -> space, strip;
    ``processPunctuation`` (its list ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !``: a mark
    touching a space, or any mark when the text has a digit,digit comma, is deleted, otherwise
    replaced by a space; then ``periodStrip`` ``(?!<=\\d)(\\.)(?!\\d)`` -- the official typo
    kept, so every period not followed by a digit goes); then ``processDigitArticle``
    (lowercase, ``none``/``zero``..``ten`` -> digits, articles a/an/the dropped, the official
    contractions table). ``mode="normalise_all"`` (default; lmms-eval's VQAv2/TextVQA/VizWiz
    tasks since its PR 794, the TextVQA EvalAI processor) applies both steps to the prediction
    and to every reference. ``mode="official"`` reproduces vqaEval.py exactly: both steps are
    applied to prediction and references only when the references are not all identical (the
    authors' rationale: leave OCR answers untouched), otherwise only newline/tab/strip.
    VizWiz: "unanswerable" is an ordinary answer string; no synonyms are mapped.
GQA -- ``gqa_exact_match``
    lmms-eval ``gqa``: exact match with ``ignore_case`` and ``ignore_punctuation``
    (``string.punctuation`` deleted), whitespace stripped and collapsed; no article removal.
MME -- ``extract_yes_no``, ``mme_scores``
    lmms-eval ``mme/utils.py`` (from Otter): lowercase, strip, delete "."; "yes"/"no" as is; a
    single character "y"/"n"; else "yes" within the first 4 characters -> yes, else "no" there
    -> no, else "other" (wrong). Per image (2 questions): acc = 100 * mean correct, acc+ = 100
    if both are correct; subtask score = mean over images of acc + acc+ (0-200); perception and
    cognition totals = sums over the official subtask lists (plus extra perception subtasks).
MMBench -- ``extract_option``, ``mmbench_circular``
    VLMEvalKit ``can_infer``, without the GPT judge: (1) the whole answer is a letter, "(A)",
    "A.", "A)", "A:", or it contains "Answer: A" / "answer is A"; (2) else ``can_infer_option``:
    ``.()[],:;!*#{}`` -> spaces, split, exactly one option letter among the tokens (a lone "A"
    among more than 3 tokens is taken for the article, VLMEvalKit's guard); (3) else
    ``can_infer_text``: exactly one option text occurs (lowercase, whole words) in the answer;
    (4) else failure, scored wrong. CircularEval: a question counts only if every rotation
    (rows sharing ``index % 1_000_000``) is answered correctly.
ScienceQA-IMG -- ``scienceqa_accuracy``
    Multiple-choice accuracy over the choices lettered A, B, ...; same extraction as MMBench
    (a failed extraction is wrong, as in LLaVA's and lmms-eval's scorers).
Flickr30K, COCO, NoCaps -- ``caption_scores``, ``ptb_tokenize``
    pycocoevalcap ``Bleu(4)`` (option "closest") and ``Cider`` (CIDEr-D: sigma 6, clipping,
    x10, document frequencies over the scored references), on text tokenised by
    ``ptb_tokenize``: a pure-Python stand-in for Stanford PTBTokenizer ``-lowerCase
    -preserveLines`` followed by pycocoevalcap's removal of punctuation tokens (no Java).
"""

from __future__ import annotations

import re
import string
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

# --- VQA answer processing tables (official vqaEval.py data, written out here) ------------

CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    # "somebodyd" is the official table's own (reversed) entry; kept for parity.
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've",
    "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip

NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})
VQA_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
             "@", "`", ",", "?", "!"]  # fmt: skip
# The official regex is "(?!<=\d)(\.)(?!\d)": "(?!<=" is a typo for a look-behind, so in effect
# every period not followed by a digit is removed. Kept verbatim for parity.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """Official ``processPunctuation``: each listed mark is deleted when it touches a space
    (or the text has a digit,digit comma), otherwise replaced by a space; then lone periods go."""
    out = text
    for p in VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    # The official call passes re.UNICODE as ``count`` (= 32 substitutions); kept for parity.
    return _PERIOD_STRIP.sub("", out, count=int(re.UNICODE))


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lowercase, number words to digits, drop articles,
    then the contractions table word by word."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES]
    return " ".join(words)


def _clean_whitespace(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_vqa_answer(answer: str) -> str:
    """Full VQA answer normalisation: whitespace, punctuation, then digits/articles/contractions.

    >>> normalize_vqa_answer("Two.")
    '2'
    """
    return process_digit_article(process_punctuation(_clean_whitespace(answer)))


VQA_MODES = ("normalise_all", "official")


def vqa_accuracy(pred: str, answers: Sequence[str], mode: str = "normalise_all") -> float:
    """VQA accuracy of one prediction against the human answers (usually 10), in [0, 1].

    Mean over the leave-one-out subsets of ``min(1, #matches / 3)``. ``mode`` picks the
    normalisation (module docstring): ``"normalise_all"`` or ``"official"``. The rule is made
    for 10 answers: a prediction equal to all ``n`` answers scores ``min(1, (n - 1) / 3)``;
    with a single answer (leave-one-out undefined) this returns normalised exact match.
    """
    if mode not in VQA_MODES:
        raise ValueError(f"mode={mode!r}: expected one of {VQA_MODES}")
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    refs = [_clean_whitespace(a) for a in answers]
    res = _clean_whitespace(pred)
    if mode == "normalise_all" or len(set(refs)) > 1:
        refs = [process_digit_article(process_punctuation(a)) for a in refs]
        res = process_digit_article(process_punctuation(res))
    matches = [a == res for a in refs]
    if len(refs) == 1:
        return float(matches[0])
    total = sum(matches)
    # Leaving out answer i removes its own match from the count.
    return sum(min(1.0, (total - m) / 3.0) for m in matches) / len(refs)


# --- GQA ------------------------------------------------------------------------------

_PUNCT_TABLE = str.maketrans("", "", string.punctuation)


def normalize_exact(text: str) -> str:
    """lmms-eval exact_match with ignore_case and ignore_punctuation, whitespace collapsed."""
    return " ".join(text.lower().translate(_PUNCT_TABLE).split())


def gqa_exact_match(pred: str, answer: str) -> float:
    """1.0 if the normalised prediction equals the normalised answer, else 0.0."""
    return float(normalize_exact(pred) == normalize_exact(answer))


# --- MME ------------------------------------------------------------------------------

MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene",
                  "landmark", "artwork", "OCR")  # fmt: skip
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation",
                 "code_reasoning")  # fmt: skip


def extract_yes_no(text: str) -> str:
    """Map free text to "yes", "no" or "other" (lmms-eval / Otter rule, module docstring)."""
    t = text.lower().strip().replace(".", "")
    if t in ("yes", "no"):
        return t
    if len(t) == 1:
        return {"y": "yes", "n": "no"}.get(t, "other")
    head = t[:4]
    if "yes" in head:
        return "yes"
    if "no" in head:
        return "no"
    return "other"


def mme_scores(
    records: Iterable[Mapping], perception: Sequence[str] | None = None
) -> dict[str, float]:
    """MME scores from records with keys ``subtask``, ``image``, ``prediction``, ``answer``.

    ``perception``: extra subtask names counted in the perception total (the mini-benchmarks'
    "shape"). Returns ``{subtask: score (0-200), "<subtask>/acc", "<subtask>/acc+",
    "perception": sum, "cognition": sum}``; an image with one question counts its missing
    one as wrong (as lmms-eval does).
    """
    per_image: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        correct = extract_yes_no(r["prediction"]) == extract_yes_no(r["answer"])
        per_image[r["subtask"]][str(r["image"])].append(float(correct))
    out: dict[str, float] = {}
    for subtask, images in sorted(per_image.items()):
        acc = acc_plus = 0.0
        for scores in images.values():
            scores = scores + [0.0] * max(0, 2 - len(scores))
            acc += 100.0 * sum(scores) / len(scores)
            acc_plus += 100.0 * all(s == 1.0 for s in scores)
        out[f"{subtask}/acc"] = acc / len(images)
        out[f"{subtask}/acc+"] = acc_plus / len(images)
        out[subtask] = out[f"{subtask}/acc"] + out[f"{subtask}/acc+"]
    perception_names = set(MME_PERCEPTION) | set(perception or ())
    out["perception"] = sum(out[s] for s in per_image if s in perception_names)
    out["cognition"] = sum(out[s] for s in per_image if s in MME_COGNITION)
    return out


# --- Multiple choice (MMBench, ScienceQA) -------------------------------------------------

_WHOLE_LETTER = re.compile(r"^\(?([A-Z])\)?[.:)]?$")
_ANSWER_IS = re.compile(r"\banswer(?:\s+is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_LETTER_SPLIT = str.maketrans({c: " " for c in ".()[],:;!*#{}"})


def _infer_letter(text: str, letters: Sequence[str]) -> str | None:
    tokens = text.translate(_LETTER_SPLIT).split()
    found = [c for c in letters if c in tokens]
    if len(found) != 1:
        return None
    if found[0] == "A" and len(tokens) > 3:
        return None  # "A" in a sentence is most likely the article (VLMEvalKit's guard)
    return found[0]


def _infer_text(text: str, options: Mapping[str, str]) -> str | None:
    low = " ".join(text.lower().split())
    hits = [
        k
        for k, v in options.items()
        if str(v).strip() and re.search(rf"(?<!\w){re.escape(str(v).strip().lower())}(?!\w)", low)
    ]
    return hits[0] if len(hits) == 1 else None


def extract_option(text: str, options: Mapping[str, str]) -> str | None:
    """The option letter a free-text answer chooses, or None when it cannot be told.

    ``options``: ``{"A": "red", "B": "blue", ...}``. Rule: module docstring (VLMEvalKit).
    """
    letters = list(options)
    stripped = text.strip()
    m = _WHOLE_LETTER.match(stripped)
    if m and m.group(1) in letters:
        return m.group(1)
    m = _ANSWER_IS.search(stripped)
    if m and m.group(1).upper() in letters:
        return m.group(1).upper()
    return _infer_letter(stripped, letters) or _infer_text(stripped, options)


def multiple_choice_correct(prediction: str, options: Mapping[str, str], answer: str) -> bool:
    """True if the extracted option letter equals ``answer`` (a letter)."""
    return extract_option(prediction, options) == answer


CIRCULAR_OFFSET = 1_000_000


def mmbench_circular(records: Iterable[Mapping]) -> dict[str, float]:
    """MMBench CircularEval accuracy (%) from records with keys ``index`` (int),
    ``prediction``, ``options`` (letter -> text), ``answer`` (letter), optional ``category``.

    Rotations of one question share ``index % 1_000_000``. Returns ``circular`` (every rotation
    right), ``vanilla`` (per-row accuracy), ``circular/<category>`` and ``n_questions``.
    """
    groups: dict[int, list[bool]] = defaultdict(list)
    category: dict[int, str] = {}
    rows = []
    for r in records:
        ok = multiple_choice_correct(r["prediction"], r["options"], r["answer"])
        g = int(r["index"]) % CIRCULAR_OFFSET
        groups[g].append(ok)
        category.setdefault(g, r.get("category") or "")
        rows.append(ok)
    if not rows:
        raise ValueError("mmbench_circular: no records")
    out = {
        "circular": 100.0 * sum(all(v) for v in groups.values()) / len(groups),
        "vanilla": 100.0 * sum(rows) / len(rows),
        "n_questions": float(len(groups)),
    }
    by_cat: dict[str, list[bool]] = defaultdict(list)
    for g, v in groups.items():
        by_cat[category[g]].append(all(v))
    for cat, v in sorted(by_cat.items()):
        if cat:
            out[f"circular/{cat}"] = 100.0 * sum(v) / len(v)
    return out


def scienceqa_accuracy(records: Iterable[Mapping]) -> float:
    """Accuracy (%) from records with ``prediction``, ``choices`` (list) and ``answer`` (index).

    Choices are lettered A, B, ... in order.
    """
    n = correct = 0
    for r in records:
        options = {string.ascii_uppercase[i]: c for i, c in enumerate(r["choices"])}
        correct += multiple_choice_correct(
            r["prediction"], options, string.ascii_uppercase[int(r["answer"])]
        )
        n += 1
    if n == 0:
        raise ValueError("scienceqa_accuracy: no records")
    return 100.0 * correct / n


# --- Captioning ---------------------------------------------------------------------------

# pycocoevalcap's PUNCTUATIONS after PTB tokenisation (PTB writes brackets as -LRB- etc.).
PTB_DROP = frozenset(
    [
        "''",
        "'",
        "``",
        "`",
        "-lrb-",
        "-rrb-",
        "-lcb-",
        "-rcb-",
        ".",
        "?",
        "!",
        ",",
        ":",
        "-",
        "--",
        "...",
        ";",
    ]  # fmt: skip
)
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "{": "-lcb-", "}": "-rcb-", "[": "-lsb-",
                 "]": "-rsb-"}  # fmt: skip
_PTB_TOKEN = re.compile(
    r"""(?x)
    \d+(?:[.,:/]\d+)+            # numbers with separators: 3.5, 1,000, 10:30
    | (?:[a-z]\.){2,}            # abbreviations kept whole: u.s., e.g.
    | [a-z0-9]+(?:[-&'./][a-z0-9]+)*(?=n't\b)  # stem before n't (do|n't)
    | n't\b
    | '(?:s|re|ve|ll|d|m)\b      # clitics split off: it 's, we 're
    | [a-z0-9]+(?:[-&/][a-z0-9]+)*   # words, hyphenated words kept whole (PTB)
    | \.\.\.|--|``|''
    | \S                          # any other single character
    """
)


# Words PTBTokenizer splits in two.
_PTB_SPLIT = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na",
              "gimme": "gim me", "lemme": "lem me"}  # fmt: skip


def ptb_tokenize(text: str) -> str:
    """Lowercased PTB-style tokens joined by spaces, punctuation tokens removed.

    Mimics ``PTBTokenizer -lowerCase -preserveLines`` + pycocoevalcap's removal list: clitics
    ('s, n't, 're, ...) split off ("can't" -> "ca n't", "cannot" -> "can not"), hyphenated
    words, numbers and abbreviations kept whole, brackets and quotes dropped.
    Square brackets become "-lsb-"/"-rsb-" as in PTB (pycocoevalcap does not drop them).
    """
    text = text.replace("\n", " ").lower().replace('"', " '' ")
    tokens = [_PTB_SPLIT.get(t, _PTB_BRACKETS.get(t, t)) for t in _PTB_TOKEN.findall(text)]
    return " ".join(t for t in tokens if t not in PTB_DROP)


def caption_scores(preds: Mapping[str, str], refs: Mapping[str, Sequence[str]]) -> dict[str, float]:
    """Corpus CIDEr-D and BLEU-4 (x100) of one caption per id against its references.

    ``preds``: ``{id: caption}``; ``refs``: ``{id: [reference captions]}`` with the same ids.
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if set(preds) != set(refs):
        missing = sorted(set(refs) ^ set(preds))[:10]
        raise ValueError(f"caption_scores: predictions and references differ on ids {missing}")
    if not preds:
        raise ValueError("caption_scores: no captions")
    res = {k: [ptb_tokenize(v)] for k, v in preds.items()}
    gts = {k: [ptb_tokenize(r) for r in refs[k]] for k in preds}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"CIDEr": 100.0 * float(cider), "BLEU-4": 100.0 * float(bleu[3])}
