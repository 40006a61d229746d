"""The field's result and annotation files, read and checked.

- captions: COCO results ``[{"image_id", "caption"}]`` against COCO caption annotations
  (``{"images": [...], "annotations": [{"image_id", "caption"}]}``; nocaps adds a
  ``domain`` to each image);
- VQAv2 / OK-VQA: results ``[{"question_id", "answer"}]``, the questions file
  (``{"questions": [{"question_id", "image_id", "question"}]}``) and the annotations file
  (``{"annotations": [{"question_id", "answers": [{"answer"}...], "answer_type",
  "question_type"}]}``);
- GQA: results ``[{"questionId", "prediction"}]`` against the questions file
  (``{"<id>": {"imageId", "question", "answer", "types": {"structural"}}}``).

Every problem is a :class:`FormatError` naming the file, the entry or id and what was
expected; nothing is dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlzoo.utils import read_json_file


def read_lines(path: str | Path, what: str) -> list[str]:
    """The non-empty lines of a class-names or templates file (one per line)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no {what} in it (expected one per line)")
    return lines


class FormatError(ValueError):
    """A result or annotation file that is not what its benchmark expects."""


def _fail(path: str | Path, message: str) -> FormatError:
    return FormatError(f"{path}: {message}")


def _looks_like(value: Any) -> str | None:
    """What a misplaced file seems to be, for the error message."""
    if isinstance(value, dict):
        if "questions" in value:
            return "a VQA questions file"
        anns = value.get("annotations")
        if isinstance(anns, list) and anns and isinstance(anns[0], dict):
            if "answers" in anns[0]:
                return "VQA annotations"
            if "caption" in anns[0]:
                return "COCO caption annotations"
            if "bbox" in anns[0] or "segmentation" in anns[0]:
                return "COCO detection annotations"
        images = value.get("images")
        if isinstance(images, list) and images and isinstance(images[0], dict) and "sentences" in images[0]:
            return "a Karpathy split file (dataset_*.json)"
        first = next(iter(value.values()), None)
        if isinstance(first, dict) and "imageId" in first:
            return "a GQA questions file"
    if isinstance(value, list) and value and isinstance(value[0], dict):
        keys = set(value[0])
        if {"image_id", "caption"} <= keys:
            return "COCO caption results"
        if {"question_id", "answer"} <= keys:
            return "VQA results"
    return None


def _wrong_file(path: str | Path, value: Any, expected: str) -> FormatError:
    seems = _looks_like(value)
    return _fail(path, f"expected {expected}" + (f"; this looks like {seems}" if seems else ""))


def _entries(path: str | Path, value: Any, fields: dict[str, tuple[type, ...]], expected: str) -> list[dict]:
    """The list ``value`` of dicts, each with ``fields`` of the given types."""
    if not isinstance(value, list):
        raise _wrong_file(path, value, expected)
    for i, entry in enumerate(value):
        if not isinstance(entry, dict):
            raise _fail(path, f"entry {i} is a {type(entry).__name__}; expected {expected}")
        for name, types in fields.items():
            if name not in entry:
                raise _fail(path, f"entry {i} has no {name!r} field; expected {expected}")
            if not isinstance(entry[name], types) or isinstance(entry[name], bool):
                raise _fail(path, f"entry {i}: {name!r} is {entry[name]!r}; expected a "
                                  f"{' or '.join(t.__name__ for t in types)}")
    return value


def _unique(path: str | Path, pairs: list[tuple[Any, Any]], what: str) -> dict:
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _fail(path, f"{what} {key!r} appears more than once (expected one entry per {what})")
        out[key] = value
    return out


def _check_known(results_path: str | Path, ids: set, known: set, what: str, annotations: str | Path) -> None:
    unknown = ids - known
    if unknown:
        shown = ", ".join(map(repr, sorted(unknown, key=str)[:5]))
        raise _fail(results_path, f"{len(unknown)} {what}(s) not in {annotations}: {shown}"
                                  f"{' ...' if len(unknown) > 5 else ''} (expected only {what}s it annotates)")


# ------------------------------------------------------------------- captions
CAPTION_RESULTS = 'a JSON list of {"image_id": ..., "caption": "..."} (COCO caption results)'
CAPTION_ANNOTATIONS = 'COCO caption annotations: {"images": [...], "annotations": [{"image_id", "caption"}, ...]}'


@dataclass
class CaptionReferences:
    """Reference captions per image id, and each image's nocaps ``domain`` (if any)."""

    captions: dict[Any, list[str]]
    domains: dict[Any, str] = field(default_factory=dict)


def read_caption_results(path: str | Path) -> dict[Any, str]:
    value = read_json_file(path, CAPTION_RESULTS)
    entries = _entries(path, value, {"image_id": (int, str), "caption": (str,)}, CAPTION_RESULTS)
    if not entries:
        raise _fail(path, f"no results in it; expected {CAPTION_RESULTS}")
    return _unique(path, [(e["image_id"], e["caption"]) for e in entries], "image_id")


def read_caption_annotations(path: str | Path) -> CaptionReferences:
    value = read_json_file(path, CAPTION_ANNOTATIONS)
    if not isinstance(value, dict) or "annotations" not in value or "questions" in value:
        raise _wrong_file(path, value, CAPTION_ANNOTATIONS)
    anns = value["annotations"]
    if isinstance(anns, list) and anns and isinstance(anns[0], dict) and "caption" not in anns[0]:
        raise _wrong_file(path, value, CAPTION_ANNOTATIONS)
    entries = _entries(path, anns, {"image_id": (int, str), "caption": (str,)}, CAPTION_ANNOTATIONS)
    captions: dict[Any, list[str]] = {}
    for e in entries:
        captions.setdefault(e["image_id"], []).append(e["caption"])
    if not captions:
        raise _fail(path, f"no captions in it; expected {CAPTION_ANNOTATIONS}")
    domains = {im["id"]: im["domain"] for im in value.get("images") or []
               if isinstance(im, dict) and "id" in im and "domain" in im}
    return CaptionReferences(captions, domains)


def match_caption_results(results: dict, references: CaptionReferences, results_path: str | Path,
                          annotations_path: str | Path) -> CaptionReferences:
    """The references of the images ``results`` caption (an unknown id is an error)."""
    _check_known(results_path, set(results), set(references.captions), "image_id", annotations_path)
    return CaptionReferences({k: references.captions[k] for k in results},
                             {k: references.domains[k] for k in results if k in references.domains})


# ------------------------------------------------------------------------ VQA
VQA_RESULTS = 'a JSON list of {"question_id": ..., "answer": "..."} (VQA results)'
VQA_QUESTIONS = 'a VQA questions file: {"questions": [{"question_id", "image_id", "question"}, ...]}'
VQA_ANNOTATIONS = ('VQA annotations: {"annotations": [{"question_id", "answers": [{"answer": ...}, ...], '
                   '"answer_type", "question_type"}, ...]}')
GQA_QUESTIONS = 'a GQA questions file: {"<question id>": {"imageId", "question", "answer", ...}, ...}'
GQA_RESULTS = 'a JSON list of {"questionId": ..., "prediction": "..."} (GQA results)'


@dataclass
class VQAQuestion:
    """One annotated question: its image, text, human answers and types."""

    image_id: Any
    question: str
    answers: list[str]
    answer_type: str = "all"
    question_type: str = "all"


def read_vqa_results(path: str | Path) -> dict[Any, str]:
    value = read_json_file(path, VQA_RESULTS)
    entries = _entries(path, value, {"question_id": (int, str), "answer": (str,)}, VQA_RESULTS)
    if not entries:
        raise _fail(path, f"no results in it; expected {VQA_RESULTS}")
    return _unique(path, [(e["question_id"], e["answer"]) for e in entries], "question_id")


def _vqa_questions(path: str | Path) -> dict[Any, dict]:
    value = read_json_file(path, VQA_QUESTIONS)
    if not isinstance(value, dict) or "questions" not in value:
        raise _wrong_file(path, value, VQA_QUESTIONS)
    entries = _entries(path, value["questions"], {"question_id": (int, str), "image_id": (int, str),
                                                  "question": (str,)}, VQA_QUESTIONS)
    return _unique(path, [(e["question_id"], e) for e in entries], "question_id")


def _vqa_annotations(path: str | Path) -> dict[Any, dict]:
    value = read_json_file(path, VQA_ANNOTATIONS)
    anns = value.get("annotations") if isinstance(value, dict) else None
    if not isinstance(anns, list) or (anns and isinstance(anns[0], dict) and "answers" not in anns[0]):
        raise _wrong_file(path, value, VQA_ANNOTATIONS)
    entries = _entries(path, anns, {"question_id": (int, str), "answers": (list,)}, VQA_ANNOTATIONS)
    for e in entries:
        bad = [a for a in e["answers"] if not isinstance(a, dict) or not isinstance(a.get("answer"), str)]
        if bad or len(e["answers"]) < 2:
            raise _fail(path, f"question {e['question_id']!r}: expected a list of several "
                              f'{{"answer": "..."}} human answers, got {e["answers"]!r:.120}')
    return _unique(path, [(e["question_id"], e) for e in entries], "question_id")


def read_vqa(questions_path: str | Path, annotations_path: str | Path) -> dict[Any, VQAQuestion]:
    """Questions and their annotations, which must name the same question ids."""
    questions, annotations = _vqa_questions(questions_path), _vqa_annotations(annotations_path)
    _check_known(annotations_path, set(annotations), set(questions), "question_id", questions_path)
    _check_known(questions_path, set(questions), set(annotations), "question_id", annotations_path)
    # in the annotations' order: the official script scores (and sums) in that order
    return {qid: VQAQuestion(questions[qid]["image_id"], questions[qid]["question"],
                             [a["answer"] for a in ann["answers"]], str(ann.get("answer_type", "all")),
                             str(ann.get("question_type", "all")))
            for qid, ann in annotations.items()}


def match_vqa_results(results: dict, questions: dict, results_path: str | Path, questions_path: str | Path,
                      subset: bool) -> None:
    """Unknown question ids are an error; so are unanswered ones, unless ``subset`` (as the
    official script, which refuses results that do not answer every question)."""
    _check_known(results_path, set(results), set(questions), "question_id", questions_path)
    missing = set(questions) - set(results)
    if missing and not subset:
        shown = ", ".join(map(repr, sorted(missing, key=str)[:5]))
        raise _fail(results_path, f"answers {len(results)} of the {len(questions)} questions of {questions_path} "
                                  f"(unanswered: {shown}{' ...' if len(missing) > 5 else ''}); the official "
                                  "evaluation scores every question (pass --subset to score only those answered)")


def read_gqa_questions(path: str | Path) -> dict[str, VQAQuestion]:
    value = read_json_file(path, GQA_QUESTIONS)
    if not isinstance(value, dict) or "questions" in value or "annotations" in value:
        raise _wrong_file(path, value, GQA_QUESTIONS)
    out = {}
    for qid, q in value.items():
        if not isinstance(q, dict) or not isinstance(q.get("answer"), str) or not isinstance(q.get("question"), str):
            raise _fail(path, f"question {qid!r}: expected an object with string 'question' and 'answer'")
        structural = (q.get("types") or {}).get("structural", "all") if isinstance(q.get("types"), dict) else "all"
        out[str(qid)] = VQAQuestion(q.get("imageId"), q["question"], [q["answer"]], str(structural))
    if not out:
        raise _fail(path, f"no questions in it; expected {GQA_QUESTIONS}")
    return out


def read_gqa_results(path: str | Path) -> dict[str, str]:
    value = read_json_file(path, GQA_RESULTS)
    if isinstance(value, list) and value and isinstance(value[0], dict) and "question_id" in value[0]:
        entries = _entries(path, value, {"question_id": (int, str), "answer": (str,)}, VQA_RESULTS)
        return _unique(path, [(str(e["question_id"]), e["answer"]) for e in entries], "question_id")
    entries = _entries(path, value, {"questionId": (int, str), "prediction": (str,)}, GQA_RESULTS)
    if not entries:
        raise _fail(path, f"no results in it; expected {GQA_RESULTS}")
    return _unique(path, [(str(e["questionId"]), e["prediction"]) for e in entries], "questionId")
