"""Caption scores exactly as coco-caption computes them, through ``pycocoevalcap``.

Every caption (prediction and reference) goes through coco-caption's PTB tokenizer
(Stanford CoreNLP, lower-cased, punctuation tokens removed), then BLEU-1..4 (``closest``
reference length), METEOR 1.5, ROUGE-L, CIDEr-D (coco-caption's ``CIDEr``: sigma 6,
clipped counts, document frequencies from the scored references) and, when its Stanford
models are present, SPICE. Names are coco-caption's (``Bleu_4``, ``METEOR``, ``ROUGE_L``,
``CIDEr``, ``SPICE``); values are fractions, as coco-caption reports them (papers print
them times 100: CIDEr 1.335 is "133.5").

The PTB tokenizer, METEOR and SPICE run on Java. Without Java, the tokenizer falls back to
:func:`python_tokenize`, an approximation that splits punctuation off and drops it (said
once, on stderr); METEOR and SPICE are then skipped with a note. The training loops use
:func:`caption_metrics` (``bleu4`` = ``Bleu_4``, ``cider`` = ``CIDEr``): the same scorers.
"""

from __future__ import annotations

import functools
import re
import shutil
import sys
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

BLEU = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4")
COCO_METRICS = (*BLEU, "METEOR", "ROUGE_L", "CIDEr", "SPICE")
TRAINING_METRICS = ("Bleu_4", "CIDEr")  # logged as bleu4 / cider by the training loops

# coco-caption drops these PTB tokens after tokenising (pycocoevalcap.tokenizer.ptbtokenizer)
PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])
_PY_TOKEN = re.compile(r"n't|[a-z0-9]+(?:[.,][0-9]+)*|'[a-z]+|\.\.\.|--|\S")


@functools.cache
def java_available() -> bool:
    """Whether a ``java`` executable is on PATH (coco-caption's tokenizer, METEOR, SPICE)."""
    return shutil.which("java") is not None


def spice_missing() -> str | None:
    """Why SPICE cannot run here (None: it can). SPICE needs Java and Stanford CoreNLP 3.6.0,
    which pycocoevalcap downloads on first use (``python -m
    pycocoevalcap.spice.get_stanford_models``); vlzoo never downloads it during scoring."""
    if not java_available():
        return "Java is not installed"
    from pycocoevalcap import spice

    lib = Path(spice.__file__).parent / "lib"
    needed = [lib / "stanford-corenlp-3.6.0.jar", lib / "stanford-corenlp-3.6.0-models.jar"]
    absent = [p.name for p in needed if not p.exists()]
    if absent:
        return (f"its Stanford CoreNLP models are not installed ({', '.join(absent)} in {lib}; "
                "fetch them once with: python -m pycocoevalcap.spice.get_stanford_models)")
    return None


def python_tokenize(text: str) -> str:
    """The approximation used without Java: lower-case, split words from punctuation
    (PTB-like: ``don't`` -> ``do n't``), drop coco-caption's punctuation tokens."""
    text = text.lower().replace("n't", " n't")
    return " ".join(t for t in _PY_TOKEN.findall(text) if t not in PTB_PUNCTUATION)


@functools.cache
def _warn_no_java() -> None:
    print("vlzoo: Java is not installed: captions are tokenised by vlzoo's Python approximation of "
          "coco-caption's PTB tokenizer and METEOR/SPICE are skipped; install Java 11+ for the "
          "field's exact scores", file=sys.stderr)


def ptb_tokenize(captions: dict[Hashable, list[str]]) -> dict[Hashable, list[str]]:
    """coco-caption's tokenisation of every caption: ``{key: [caption, ...]}`` ->
    ``{key: [tokenised caption, ...]}`` (same keys, same counts)."""
    if not java_available():
        _warn_no_java()
        return {k: [python_tokenize(c) for c in caps] for k, caps in captions.items()}
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # the tokenizer reads one line per caption: a line break inside a caption, or trailing
    # empty captions, would misalign its output, so every caption is one non-empty line
    safe = {k: [{"caption": " ".join(c.split()) or "."} for c in caps] for k, caps in captions.items()}
    tokens = PTBTokenizer().tokenize(safe)
    out = {k: tokens.get(k, []) for k in captions}
    for k, caps in captions.items():
        if len(out[k]) != len(caps):
            raise RuntimeError(f"the PTB tokenizer returned {len(out[k])} captions for {k!r}, expected {len(caps)}")
    return out


@dataclass
class CaptionScores:
    """Corpus scores (``scores``: metric -> fraction), how many images were scored, and
    one line per metric that could not be computed (``notes``)."""

    scores: dict[str, float]
    images: int
    notes: list[str] = field(default_factory=list)


def _check_inputs(predictions: dict, references: dict) -> None:
    if set(predictions) != set(references):
        extra, missing = set(predictions) - set(references), set(references) - set(predictions)
        raise ValueError(f"predictions and references must have the same keys: {len(extra)} predictions without "
                         f"references (e.g. {sorted(map(str, extra))[:3]}), {len(missing)} references without a "
                         f"prediction (e.g. {sorted(map(str, missing))[:3]})")
    for key, refs in references.items():
        if isinstance(refs, str) or not refs:
            raise ValueError(f"image {key!r} has no reference captions (expected a non-empty list of strings)")


def _wanted(metrics: Iterable[str]) -> list[str]:
    metrics = list(metrics)
    unknown = set(metrics) - set(COCO_METRICS)
    if unknown:
        raise ValueError(f"unknown caption metrics {sorted(unknown)}; known: {list(COCO_METRICS)}")
    return metrics


@functools.cache
def _meteor():
    """One METEOR 1.5 process per Python process (it takes seconds to start: it loads its
    paraphrase tables), stopped at exit."""
    import atexit

    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()

    def stop() -> None:
        meteor.meteor_p.stdin.close()
        meteor.meteor_p.kill()
        meteor.meteor_p.wait()

    atexit.register(stop)
    return meteor


def _run_meteor(gts: dict, res: dict) -> float:
    meteor = _meteor()
    if meteor.meteor_p.poll() is not None:  # the Java process died: start another
        _meteor.cache_clear()
        meteor = _meteor()
    return float(meteor.compute_score(gts, res)[0])


def _score(name: str, gts: dict, res: dict) -> list[tuple[str, float]]:
    """(metric, value) pairs of one pycocoevalcap scorer on tokenised captions."""
    if name == "Bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        values = Bleu(4).compute_score(gts, res, verbose=0)[0]
        return list(zip(BLEU, map(float, values)))
    if name == "METEOR":
        return [("METEOR", _run_meteor(gts, res))]
    if name == "ROUGE_L":
        from pycocoevalcap.rouge.rouge import Rouge

        return [("ROUGE_L", float(Rouge().compute_score(gts, res)[0]))]
    if name == "CIDEr":
        from pycocoevalcap.cider.cider import Cider

        return [("CIDEr", float(Cider().compute_score(gts, res)[0]))]
    from pycocoevalcap.spice.spice import Spice

    return [("SPICE", float(Spice().compute_score(gts, res)[0]))]


def _skipped(metric: str) -> str | None:
    """Why ``metric`` cannot be computed here, or None."""
    if metric == "SPICE":
        reason = spice_missing()
        return None if reason is None else f"SPICE skipped: {reason}"
    if metric == "METEOR" and not java_available():
        return "METEOR skipped: Java is not installed (METEOR 1.5 is a Java program)"
    return None


def coco_caption_scores(predictions: dict[Hashable, str], references: dict[Hashable, list[str]],
                        metrics: Iterable[str] = COCO_METRICS) -> CaptionScores:
    """coco-caption's corpus scores of one predicted caption per image against that
    image's references (both keyed by image id). ``metrics``: a subset of
    :data:`COCO_METRICS`; the Bleu_n come together, one skipped metric is a note."""
    _check_inputs(predictions, references)
    wanted = _wanted(metrics)
    if not predictions:
        raise ValueError("no captions to score")
    notes = [n for n in map(_skipped, wanted) if n]
    if not java_available():
        notes.insert(0, "captions tokenised by vlzoo's Python approximation of the PTB tokenizer (Java is not "
                        "installed): the scores are not comparable with coco-caption's")
    tokens = ptb_tokenize({**{("res", k): [c] for k, c in predictions.items()},
                           **{("gts", k): list(r) for k, r in references.items()}})
    res = {k: tokens[("res", k)] for k in predictions}
    gts = {k: tokens[("gts", k)] for k in predictions}
    scorers = dict.fromkeys("Bleu" if m in BLEU else m for m in wanted if not _skipped(m))
    scores: dict[str, float] = {}
    for name in scorers:
        scores.update((m, v) for m, v in _score(name, gts, res) if m in wanted)
    return CaptionScores({m: scores[m] for m in wanted if m in scores}, len(predictions), notes)


def caption_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """``{"bleu4", "cider"}`` of one predicted caption per image against all its references:
    coco-caption's ``Bleu_4`` and ``CIDEr`` (what ``vlzoo fit`` / ``compare`` log)."""
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference sets; "
                         "expected one prediction per image")
    if not predictions:
        return {"bleu4": 0.0, "cider": 0.0}
    result = coco_caption_scores(dict(enumerate(predictions)), dict(enumerate(references)), TRAINING_METRICS)
    return {"bleu4": result.scores["Bleu_4"], "cider": result.scores["CIDEr"]}
