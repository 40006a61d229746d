"""VQA accuracy: exact match after normalisation, and the answer-prior baseline."""

from __future__ import annotations

import re
import string

ARTICLES = {"a", "an", "the"}
_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_answer(text: str) -> str:
    """Lower case, punctuation and articles removed, whitespace collapsed
    ("The Red." -> "red")."""
    words = _PUNCTUATION.sub(" ", text.lower()).split()
    return " ".join(w for w in words if w not in ARTICLES)


def vqa_accuracy(predictions: list[str], answers: list[str]) -> float:
    """Fraction of predictions equal to their answer after :func:`normalize_answer`."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        return float("nan")
    hits = sum(normalize_answer(p) == normalize_answer(a) for p, a in zip(predictions, answers, strict=True))
    return hits / len(answers)


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
    of the majority-answer baseline."""
    return {"vqa_acc": vqa_accuracy(predictions, [q["answer"] for q in qa]),
            "vqa_majority_acc": majority_accuracy(qa, answer_prior)}
