"""VQA accuracy as the official VQAv2 evaluation computes it, and exact match for the
single-answer sets (GQA, vlzoo's shapes QA).

The rules of the official script (``vqaEval.py`` of the VQA toolkit, GT-Vision-Lab/VQA
master), kept with their quirks so that a figure here equals the script's:

- the prediction and the human answers have line breaks and tabs turned into spaces and
  are stripped;
- when the ten human answers differ, all of them and the prediction go through
  :func:`process_punctuation` and :func:`process_digits_articles` (lower-case, number
  words to digits, articles dropped, contractions restored); when all ten are the same,
  nothing more is done and the comparison is exact (so "yes" scores 0 against ten "Yes");
- accuracy of a prediction = the mean over the ten leave-one-out subsets of nine human
  answers of min(#matches / 3, 1);
- overall, per answer type and per question type: the mean, times 100, rounded to two
  decimals half away from zero (the script's Python 2 ``round``: 73.125 -> 73.13).

Other copies differ: LAVIS's ``vqa_eval.py`` (BLIP, BLIP-2) always normalises the
prediction and only strips punctuation from the human answers; the evaluation server
(EvalAI) normalises with its own punctuation rule. OK-VQA uses the same files and accuracy.
For one reference answer per question (GQA, shapes) the leave-one-out rule is undefined (it
would always give 0), so the score is exact match after both normalisations on both sides
(:func:`exact_match`).
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from decimal import ROUND_HALF_UP, Decimal

ARTICLES = frozenset({"a", "an", "the"})
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
                "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
               "?", "!")
# written-out contractions the official script restores ("dont" -> "don't"); its one odd
# entry ("somebody'd" -> "somebodyd") is kept, as the server applies it
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
# the official pattern: a period not followed by a digit (its "(?!<=\d)" is a lookahead, not
# the lookbehind it looks like), removed at most 32 times (re.UNICODE passed as the count)
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)", re.ASCII)
_PERIOD_MAX_REMOVALS = int(re.UNICODE)
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)", re.ASCII)


def process_punctuation(text: str) -> str:
    """The official punctuation rule: each mark is deleted where it touches a space (or
    anywhere, if the text has a comma between digits), else replaced by a space; then
    periods not before a digit are deleted."""
    anywhere = _COMMA_IN_NUMBER.search(text) is not None
    out = text
    for mark in PUNCTUATION:
        delete = anywhere or mark + " " in text or " " + mark in text
        out = out.replace(mark, "" if delete else " ")
    return _PERIOD.sub("", out, count=_PERIOD_MAX_REMOVALS)


def process_digits_articles(text: str) -> str:
    """Lower-case, number words to digits, articles dropped, contractions restored."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def clean_whitespace(answer: str) -> str:
    """Line breaks and tabs as spaces, stripped."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """Both official normalisations after :func:`clean_whitespace` (``"The Two."`` -> ``"2"``)."""
    return process_digits_articles(process_punctuation(clean_whitespace(text)))


def official_accuracy(prediction: str, human_answers: Sequence[str]) -> float:
    """VQAv2 accuracy in [0, 1] of one prediction against a question's human answers."""
    if len(human_answers) < 2:
        raise ValueError(f"the VQA accuracy needs several human answers per question, got {len(human_answers)} "
                         "(use exact match for single-answer sets)")
    answer = clean_whitespace(prediction)
    humans = [clean_whitespace(h) for h in human_answers]
    if len(set(humans)) > 1:
        humans = [normalize_answer(h) for h in humans]
        answer = normalize_answer(answer)
    matches = [h == answer for h in humans]
    total = sum(matches)
    return sum(min(1.0, (total - m) / 3) for m in matches) / len(humans)


def exact_match(prediction: str, answer: str) -> float:
    """1.0 when the prediction equals the answer after both official normalisations."""
    return float(normalize_answer(prediction) == normalize_answer(answer))


def _percent(values: list[float]) -> float:
    """100 x the mean, rounded to two decimals half away from zero (on the exact binary value,
    as Python 2's ``round``, which the official script ran under)."""
    total = 0.0
    for v in values:  # left to right, as the script's sum()
        total += v
    exact = Decimal(100 * total / len(values))
    return float(exact.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def grouped_percentages(accuracies: dict, groups: dict[str, dict]) -> dict:
    """``{"overall": %, "per<Group>": {value: %}}`` from per-question accuracies in [0, 1]
    and, per group name, each question's value (e.g. ``AnswerType``: id -> "yes/no")."""
    out: dict = {"overall": _percent(list(accuracies.values()))}
    for name, of_question in groups.items():
        buckets: dict[str, list[float]] = defaultdict(list)
        for qid, acc in accuracies.items():
            buckets[of_question[qid]].append(acc)
        out[f"per{name}"] = {k: _percent(v) for k, v in sorted(buckets.items())}
    return out


def score_answers(predictions: dict, references: dict, score: Callable[[str, object], float],
                  groups: dict[str, dict] | None = None) -> dict:
    """Percentages (overall and per group) of ``predictions`` (id -> answer) scored against
    ``references`` (id -> human answers or one answer) with ``score``, summed in the order of
    ``references`` (the annotations' order, as the official script)."""
    if not predictions:
        raise ValueError("no answers to score")
    accuracies = {qid: score(predictions[qid], refs) for qid, refs in references.items() if qid in predictions}
    return grouped_percentages(accuracies, groups or {})


# ----------------------------------------------------------------- training loops
def vqa_accuracy(predictions: list[str], answers: list[str] | list[list[str]]) -> float:
    """Mean accuracy in [0, 1]: the official VQA accuracy where a question has several human
    answers, exact match where it has one."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return float("nan")
    scores = [official_accuracy(p, a) if not isinstance(a, str) and len(a) > 1
              else exact_match(p, a if isinstance(a, str) else a[0]) for p, a in zip(predictions, answers)]
    return sum(scores) / len(scores)


def majority_accuracy(qa: list[dict[str, str]], answer_prior: dict[str, str]) -> float:
    """Accuracy of always answering the most common training answer of the question's
    type (``answer_prior``: type -> answer); the baseline a VQA model must beat."""
    predictions = [answer_prior.get(q["type"], "") for q in qa]
    return vqa_accuracy(predictions, [q["answer"] for q in qa])


def answer_every_pair(qa_per_image: list[list[dict[str, str]]], answer, batch_size: int
                      ) -> tuple[list[str], list[dict[str, str]]]:
    """(predictions, QA pairs) for every QA pair of every image, asked in batches:
    ``answer(rows, questions)`` answers ``questions[k]`` about image ``rows[k]``."""
    pairs = [(i, q) for i, qa in enumerate(qa_per_image) for q in qa]
    predictions: list[str] = []
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        predictions += answer([i for i, _ in chunk], [q["question"] for _, q in chunk])
    return predictions, [q for _, q in pairs]


def vqa_metrics(predictions: list[str], qa: list[dict[str, str]], answer_prior: dict[str, str]) -> dict[str, float]:
    """``vqa_acc`` of ``predictions`` (one per QA pair of ``qa``) and ``vqa_majority_acc``
    of the majority-answer baseline, as fractions."""
    return {"vqa_acc": vqa_accuracy(predictions, [q["answer"] for q in qa]),
            "vqa_majority_acc": majority_accuracy(qa, answer_prior)}
