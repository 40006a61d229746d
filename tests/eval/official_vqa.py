"""Test reference: a re-implementation of the official VQA accuracy.

Reproduces, behaviour for behaviour, ``VQAEval.evaluate`` from GT-Vision-Lab/VQA
(``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, master) together with the few
pieces of ``PythonHelperTools/vqaTools/vqa.py`` (``createIndex``, ``getQuesIds``,
``loadRes``) that the evaluation relies on.  It is written independently and is
only meant to be a yardstick for tests; the quirks of the original are kept on
purpose and are pointed out where they occur.

The official code is Python 2.7 code; by default its Python 2.7 semantics are
reproduced (``round`` ties away from zero, ASCII-only ``\\d``).  Pass
``interpreter="python3"`` for what the same code gives when run under Python 3
(the only differences: exact rounding ties such as 73.125, and non-ASCII digits).

Entry point: :func:`official_vqa_scores`.
"""

from __future__ import annotations

import copy
import re
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, Literal

Interpreter = Literal["python2", "python3"]

# ----------------------------------------------------------------------------
# Normalisation tables (data identical to the official script)
# ----------------------------------------------------------------------------

# Applied word by word *after* lower-casing, so the keys containing capitals
# ("Id've", "I'dve", "Im", "Ive") can never match -- kept as in the original.
# Note also the odd reverse entry "somebody'd" -> "somebodyd".
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}

# "manualMap": only whole words, only zero..ten.
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}

ARTICLES: tuple[str, ...] = ("a", "an", "the")

# The official pattern is "(?!<=\d)(\.)(?!\d)": the first group is a negative
# *lookahead* for the text "<=<digit>" (a typo for a lookbehind), which can never
# match at a '.', so in effect every '.' that is not followed by a digit goes.
_PERIOD_PATTERN = r"(?!<=\d)(\.)(?!\d)"
# Only used as a yes/no test: does the text contain <digit>,<digit> anywhere?
_COMMA_PATTERN = r"(\d)(\,)(\d)"
# The official script (Python 2.7) compiles these without re.UNICODE, so on the
# unicode strings json.load gives, \d means [0-9] only; under Python 3 \d
# matches any Unicode decimal digit.  Only non-ASCII digits can tell them apart.
_REGEXES = {
    "python2": (re.compile(_PERIOD_PATTERN, re.ASCII), re.compile(_COMMA_PATTERN, re.ASCII)),
    "python3": (re.compile(_PERIOD_PATTERN), re.compile(_COMMA_PATTERN)),
}
PERIOD_STRIP, COMMA_STRIP = _REGEXES["python2"]
# Order matters only for readability; note that '.', ':', "'", '#', '$', '%',
# '&', '*', '|', '~', '^' are NOT in the list and survive untouched.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
    ">", "<", "@", "`", ",", "?", "!",
)
# The official call is ``periodStrip.sub("", outText, re.UNICODE)``: re.UNICODE
# lands in the *count* argument, so at most 32 periods are removed per answer.
PERIOD_SUB_COUNT: int = int(re.UNICODE)


# ----------------------------------------------------------------------------
# Normalisation steps
# ----------------------------------------------------------------------------

def clean_whitespace(text: str) -> str:
    """Newlines and tabs become spaces, then outer whitespace is stripped."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, interpreter: Interpreter = "python2") -> str:
    """``VQAEval.processPunctuation``.

    For every mark the decision "delete" versus "turn into a space" is taken by
    looking at the *original* text (not the partly cleaned one): the mark is
    deleted when it appears next to a space anywhere in the text, or when the
    text contains a digit-comma-digit sequence anywhere (then *all* marks are
    deleted); otherwise every occurrence becomes a space.  Finally periods not
    followed by a digit are removed (at most 32 of them, see PERIOD_SUB_COUNT).
    No lower-casing happens here.
    """
    period_strip, comma_strip = _REGEXES[interpreter]
    has_digit_comma = comma_strip.search(text) is not None
    cleaned = text
    for mark in PUNCTUATION:
        next_to_space = (mark + " ") in text or (" " + mark) in text
        replacement = "" if (next_to_space or has_digit_comma) else " "
        cleaned = cleaned.replace(mark, replacement)
    return period_strip.sub("", cleaned, count=PERIOD_SUB_COUNT)


def process_digit_article(text: str) -> str:
    """``VQAEval.processDigitArticle``.

    Lower-cases, splits on whitespace (collapsing runs), maps number words to
    digits, drops articles, expands contractions word by word, re-joins with a
    single space.  (The original grows ``manualMap`` through ``setdefault``;
    every added entry maps a word to itself, so this has no visible effect.)
    """
    kept = []
    for word in text.lower().split():
        word = NUMBER_WORDS.get(word, word)
        if word in ARTICLES:
            continue
        kept.append(word)
    return " ".join(CONTRACTIONS.get(word, word) for word in kept)


# ----------------------------------------------------------------------------
# Scoring helpers
# ----------------------------------------------------------------------------

def _left_fold_sum(values: list[float]) -> float:
    """Plain left-to-right addition, as ``sum`` did in Python 2 and before 3.12.

    (Python 3.12 switched ``sum`` of floats to compensated summation; this keeps
    the reference bit-for-bit independent of the interpreter.)
    """
    total: float = 0
    for value in values:
        total = total + value
    return total


def _round_python2(value: float, ndigits: int) -> float:
    """Python 2.7 ``round``: nearest multiple of 10**-ndigits of the *exact* binary
    value, ties away from zero (Python 3 ``round`` sends ties to even instead).
    The two differ only on exact ties such as 73.125 -> 73.13 (py2) / 73.12 (py3),
    which do occur, e.g. for a mean over 8 or 40 questions."""
    exact = Decimal(value)  # exact conversion of the double, no decimal rounding
    return float(exact.quantize(Decimal(1).scaleb(-ndigits), rounding=ROUND_HALF_UP))


def _round(value: float, ndigits: int, interpreter: Interpreter) -> float:
    if interpreter == "python2":
        return _round_python2(value, ndigits)
    return round(value, ndigits)


def _mean_percent(values: list[float], ndigits: int, interpreter: Interpreter) -> float:
    # Same operation order as the original: round(100*float(sum(v))/len(v), n)
    return _round(100 * float(_left_fold_sum(values)) / len(values), ndigits, interpreter)


def _question_accuracy(answer_dicts: list[dict[str, Any]], prediction: str) -> float:
    """Leave-one-out accuracy of one prediction against the human answers.

    For each human answer, count how many of the *other* answer dicts hold the
    same (already processed) string; score min(1, count/3); average over all.
    "Other" is decided by dict inequality (``item != gtAnsDatum``) exactly as in
    the original, so with distinct answer_ids exactly one dict is left out.
    """
    per_annotator = []
    for held_out in answer_dicts:
        matches = sum(
            1 for other in answer_dicts if other != held_out and other["answer"] == prediction
        )
        per_annotator.append(min(1, float(matches) / 3))
    return float(_left_fold_sum(per_annotator)) / len(per_annotator)


# ----------------------------------------------------------------------------
# Minimal stand-ins for vqa.py (createIndex / getQuesIds / loadRes)
# ----------------------------------------------------------------------------

def _index_by_question(entries: list[dict[str, Any]]) -> dict[Any, dict[str, Any]]:
    # createIndex: ``qa[ann['question_id']] = ann`` -- a later duplicate wins.
    index: dict[Any, dict[str, Any]] = {}
    for entry in entries:
        index[entry["question_id"]] = entry
    return index


def _load_results(
    questions: dict[str, Any],
    gt_question_ids: list[Any],
    results: list[dict[str, Any]],
) -> dict[Any, dict[str, Any]]:
    """The checks and indexing of ``VQA.loadRes`` (result file given as a list)."""
    assert isinstance(results, list), "results is not an array of objects"
    result_ids = [entry["question_id"] for entry in results]
    assert set(result_ids) == set(gt_question_ids), (
        "Results do not correspond to current VQA set. Either the results do not have "
        "predictions for all question ids in annotation file or there is atleast one "
        "question id that does not belong to the question ids in the annotation file."
    )
    if questions.get("task_type") == "Multiple Choice":
        by_question = _index_by_question(questions["questions"])
        for entry in results:
            choices = by_question[entry["question_id"]]["multiple_choices"]
            assert entry["answer"] in choices, "predicted answer is not one of the multiple choices"
    return _index_by_question(copy.deepcopy(results))


# ----------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------

def official_vqa_evaluate(
    questions: dict[str, Any],
    annotations: dict[str, Any],
    results: list[dict[str, Any]],
    ndigits: int = 2,
    *,
    interpreter: Interpreter = "python2",
) -> tuple[dict[str, Any], dict[Any, float]]:
    """Run the official evaluation; return (``accuracy``, ``evalQA``).

    ``accuracy`` is what ``VQAEval.accuracy`` holds after ``evaluate()``;
    ``evalQA`` maps question_id -> per-question percentage rounded to ``ndigits``.
    ``interpreter`` picks the semantics of the interpreter running the official
    code: "python2" (what the official repository targets: Python 2.7) or
    "python3" (what a Python-3 port of it gives).  They differ only in ``round``
    on exact ties (half away from zero vs half to even) and in whether the regex digit class
    matches non-ASCII digits.  The inputs are not modified (the original mutates
    the loaded annotations).
    """
    if interpreter not in _REGEXES:
        raise ValueError(f"interpreter must be 'python2' or 'python3', not {interpreter!r}")
    # VQA(...).dataset['annotations']; the evaluation mutates these in place.
    gt_entries = copy.deepcopy(annotations["annotations"])
    gt_by_question = _index_by_question(gt_entries)
    # VQAEval.params['question_id'] = vqa.getQuesIds(): annotation order,
    # duplicates included (a duplicated id is scored twice, on its last entry).
    question_ids = [entry["question_id"] for entry in gt_entries]
    result_by_question = _load_results(questions, question_ids, results)

    def normalise(text: str) -> str:
        return process_digit_article(process_punctuation(text, interpreter))

    all_scores: list[float] = []
    by_question_type: dict[Any, list[float]] = {}
    by_answer_type: dict[Any, list[float]] = {}
    per_question: dict[Any, float] = {}

    for question_id in question_ids:
        gt = gt_by_question[question_id]
        answer_dicts = gt["answers"]

        # Whitespace clean-up of the humans (in place) and of the prediction.
        for answer_dict in answer_dicts:
            answer_dict["answer"] = clean_whitespace(answer_dict["answer"])
        prediction = clean_whitespace(result_by_question[question_id]["answer"])

        # Punctuation / digit / article / contraction processing (and with it
        # lower-casing) happens ONLY when the cleaned human answers are not all
        # identical -- for the humans and for the prediction alike.
        if len({answer_dict["answer"] for answer_dict in answer_dicts}) > 1:
            for answer_dict in answer_dicts:
                answer_dict["answer"] = normalise(answer_dict["answer"])
            prediction = normalise(prediction)

        score = _question_accuracy(answer_dicts, prediction)
        all_scores.append(score)
        by_question_type.setdefault(gt["question_type"], []).append(score)
        by_answer_type.setdefault(gt["answer_type"], []).append(score)
        per_question[question_id] = _round(100 * score, ndigits, interpreter)

    accuracy = {
        "overall": _mean_percent(all_scores, ndigits, interpreter),
        "perQuestionType": {
            qtype: _mean_percent(scores, ndigits, interpreter)
            for qtype, scores in by_question_type.items()
        },
        "perAnswerType": {
            atype: _mean_percent(scores, ndigits, interpreter)
            for atype, scores in by_answer_type.items()
        },
    }
    return accuracy, per_question


def official_vqa_scores(
    questions: dict[str, Any],
    annotations: dict[str, Any],
    results: list[dict[str, Any]],
    *,
    interpreter: Interpreter = "python2",
) -> dict[str, Any]:
    """``VQAEval(vqa, vqaRes, n=2).evaluate(); return vqaEval.accuracy``.

    Returns ``{"overall": float, "perQuestionType": {...}, "perAnswerType": {...}}``
    with percentages rounded to 2 decimals.  See :func:`official_vqa_evaluate`
    for ``interpreter`` (default: Python 2.7 semantics, as the official code).
    """
    accuracy, _ = official_vqa_evaluate(
        questions, annotations, results, ndigits=2, interpreter=interpreter
    )
    return accuracy
