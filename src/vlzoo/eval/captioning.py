"""Corpus-level captioning metrics: BLEU-4 and CIDEr-D.

Each image has one predicted caption and one or more reference captions. Both metrics
see the same normalised text: lower-cased, punctuation removed, split on whitespace.

BLEU-4 is delegated to ``torchmetrics.functional.text.bleu_score`` (n_gram=4, no
smoothing, brevity penalty against the closest reference length).

CIDEr-D is implemented here because no maintained package in our dependency set
provides it. The definition follows Vedantam, Zitnick and Parikh, "CIDEr:
Consensus-based Image Description Evaluation" (CVPR 2015), and mirrors the CIDEr-D
variant of the coco-caption reference scorer (``pycocoevalcap/cider/cider_scorer.py``):

- n-grams for n = 1..4, weighted by raw count times idf, where
  ``idf = log(#images) - log(max(1, df))`` and ``df`` is the number of images whose
  reference set contains the n-gram (df is computed over the evaluated corpus);
- per n, ``sum_g min(c_g, r_g) * r_g / (|c| |r|)`` (candidate weights clipped to the
  reference's), times the Gaussian length penalty ``exp(-(l_c - l_r)^2 / (2 sigma^2))``;
- averaged over n and over the image's references, times 10; the corpus score is the
  mean over images.

One deliberate difference: lengths here are word counts (as in the paper), while
coco-caption counts bigrams; the two agree unless a caption has fewer than two words.
"""

from __future__ import annotations

import math
import string
from collections import Counter

from torchmetrics.functional.text import bleu_score

MAX_N = 4
_PUNCT = str.maketrans("", "", string.punctuation)

NGrams = Counter[tuple[str, ...]]


def normalize(text: str) -> list[str]:
    """Lower-case, remove ASCII punctuation and split on whitespace."""
    return text.lower().translate(_PUNCT).split()


def _check(predictions: list[str], references: list[list[str]]) -> None:
    if len(predictions) != len(references):
        raise ValueError(
            f"got {len(predictions)} predictions but {len(references)} reference sets; "
            "expected one prediction per image"
        )
    for i, refs in enumerate(references):
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {i} has no references (expected a non-empty list of str)")


def bleu4(predictions: list[str], references: list[list[str]]) -> float:
    """Corpus BLEU-4 in [0, 1] of normalised predictions against normalised references."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    preds = [" ".join(normalize(p)) for p in predictions]
    refs = [[" ".join(normalize(r)) for r in rs] for rs in references]
    return float(bleu_score(preds, refs, n_gram=MAX_N))


def _ngrams(tokens: list[str], n_max: int = MAX_N) -> NGrams:
    """Counts of all n-grams of ``tokens`` for n = 1..n_max."""
    return Counter(
        tuple(tokens[i : i + n]) for n in range(1, n_max + 1) for i in range(len(tokens) - n + 1)
    )


def _document_frequency(ref_ngrams: list[list[NGrams]]) -> Counter[tuple[str, ...]]:
    """Number of images whose reference set contains each n-gram."""
    df: Counter[tuple[str, ...]] = Counter()
    for refs in ref_ngrams:
        df.update(set().union(*refs))
    return df


def _tfidf(counts: NGrams, df: Counter[tuple[str, ...]], log_n_images: float) -> list[dict]:
    """Per-n tf-idf vectors (index n-1): raw count times log(#images) - log(max(1, df))."""
    vecs: list[dict] = [{} for _ in range(MAX_N)]
    for gram, tf in counts.items():
        vecs[len(gram) - 1][gram] = tf * (log_n_images - math.log(max(1, df[gram])))
    return vecs


def _clipped_cosine(cand: dict, ref: dict) -> float:
    """CIDEr-D similarity of one n: sum min(c, r) * r over the product of the norms."""
    norm_c = math.sqrt(sum(v * v for v in cand.values()))
    norm_r = math.sqrt(sum(v * v for v in ref.values()))
    if norm_c == 0.0 or norm_r == 0.0:
        return 0.0
    dot = sum(min(v, ref[g]) * ref[g] for g, v in cand.items() if g in ref)
    return dot / (norm_c * norm_r)


def _cider_image(
    cand: list[str], refs: list[list[str]], df: Counter[tuple[str, ...]], log_n: float, sigma: float
) -> float:
    """CIDEr-D of one candidate against its references."""
    cand_vecs = _tfidf(_ngrams(cand), df, log_n)
    total = 0.0
    for ref in refs:
        ref_vecs = _tfidf(_ngrams(ref), df, log_n)
        penalty = math.exp(-((len(cand) - len(ref)) ** 2) / (2 * sigma**2))
        total += penalty * sum(_clipped_cosine(c, r) for c, r in zip(cand_vecs, ref_vecs))
    return 10.0 * total / (MAX_N * len(refs))


def cider_d(predictions: list[str], references: list[list[str]], sigma: float = 6.0) -> float:
    """Corpus CIDEr-D (mean over images); df and idf come from this corpus's references."""
    _check(predictions, references)
    if not predictions:
        return 0.0
    cands = [normalize(p) for p in predictions]
    refs = [[normalize(r) for r in rs] for rs in references]
    df = _document_frequency([[_ngrams(r) for r in rs] for rs in refs])
    log_n = math.log(len(refs))
    scores = [_cider_image(c, rs, df, log_n, sigma) for c, rs in zip(cands, refs)]
    return sum(scores) / len(scores)


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus-level {"bleu4": ..., "cider": ...} of one predicted caption per image
    against all its reference captions."""
    return {"bleu4": bleu4(predictions, references), "cider": cider_d(predictions, references)}
