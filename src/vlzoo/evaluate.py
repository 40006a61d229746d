"""``vlzoo eval``: the field's scorers on the field's files, and a model on a standard
benchmark.

- ``vlzoo eval caption --results RES.json --annotations ANN.json``: coco-caption's scores.
- ``vlzoo eval vqa --results RES.json --questions Q.json --annotations A.json``: the official
  VQAv2 accuracy (``--format gqa``: GQA's exact match).
- ``vlzoo eval --model REF --benchmark NAME --data PATH``: a model on a benchmark in its
  official layout (:mod:`vlzoo.eval.benchmarks`), scored by the same scorers the training
  loops use, under the family's paper protocol (:mod:`vlzoo.eval.protocol`), beside the
  figure the manifest publishes for that checkpoint.

Units: caption scores are fractions (coco-caption's); retrieval R@K, zero-shot accuracy and
VQA accuracy are percentages (as the papers and the VQA script print them). ``--json``
prints only JSON on stdout; logs go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from vlzoo.cli_help import examples

CAPTION_UNITS = "fractions (coco-caption)"
BENCHMARK_HELP = ("coco-retrieval, flickr30k-retrieval, coco-caption, nocaps, vqav2, imagenet-zeroshot, "
                  "zeroshot (any image folder or CLIP_benchmark webdataset)")


def log(message: str) -> None:
    print(f"vlzoo eval: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Route everything written to file descriptor 1 (Python and child processes such as
    the Java scorers) to stderr, so that ``--json`` output stays clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


# ------------------------------------------------------------------ file scorers
def score_caption_files(results_path: str, annotations_path: str) -> dict[str, Any]:
    """coco-caption scores of a results file against an annotations file (nocaps: also per
    ``domain``)."""
    from vlzoo.eval.formats import (
        match_caption_results,
        read_caption_annotations,
        read_caption_results,
    )

    results = read_caption_results(results_path)
    annotations = read_caption_annotations(annotations_path)
    references = match_caption_results(results, annotations, results_path, annotations_path)
    if len(results) < len(annotations.captions):  # coco-caption scores the images results name: said, not silent
        log(f"{results_path} captions {len(results)} of the {len(annotations.captions)} images {annotations_path} "
            "annotates: the scores are over those")
    report = caption_report(results, references.captions, references.domains,
                            n_annotated=len(annotations.captions))
    return {**report, "units": CAPTION_UNITS}


def caption_report(predictions: dict, references: dict, domains: dict, n_annotated: int | None
                   ) -> dict[str, Any]:
    """Scores overall and, when images have a nocaps ``domain``, per domain (each scored as
    its own corpus, as the nocaps server does)."""
    from vlzoo.eval.captioning import coco_caption_scores

    overall = coco_caption_scores(predictions, references)
    report: dict[str, Any] = {"metrics": overall.scores, "images": overall.images, "notes": overall.notes}
    if n_annotated is not None:
        report["annotated_images"] = n_annotated
    for domain in sorted(set(domains.values())):
        keys = [k for k in predictions if domains.get(k) == domain]
        part = coco_caption_scores({k: predictions[k] for k in keys}, {k: references[k] for k in keys})
        report["metrics"].update({f"{domain}/{m}": v for m, v in part.scores.items()})
    return report


def score_vqa_files(results_path: str, questions_path: str, annotations_path: str | None, fmt: str,
                    subset: bool) -> dict[str, Any]:
    """The official VQAv2 accuracy (``fmt`` ``vqa``, also OK-VQA) or GQA's exact match."""
    from vlzoo.eval import formats
    from vlzoo.eval.vqa import exact_match, official_accuracy, score_answers

    if fmt == "gqa":
        questions = formats.read_gqa_questions(questions_path)
        results = formats.read_gqa_results(results_path)
        formats.match_vqa_results(results, questions, results_path, questions_path, subset)
        references = {q: v.answers[0] for q, v in questions.items()}
        groups = {"Structural": {q: questions[q].answer_type for q in results}}
        scores = score_answers(results, references, exact_match, groups)
    else:
        if annotations_path is None:
            raise ValueError("--annotations is required for --format vqa (the VQA annotations file)")
        questions = formats.read_vqa(questions_path, annotations_path)
        results = formats.read_vqa_results(results_path)
        formats.match_vqa_results(results, questions, results_path, questions_path, subset)
        groups = {"AnswerType": {q: questions[q].answer_type for q in results},
                  "QuestionType": {q: questions[q].question_type for q in results}}
        scores = score_answers(results, {q: v.answers for q, v in questions.items()}, official_accuracy, groups)
    return {"metrics": scores, "questions": len(results), "annotated_questions": len(questions), "units": "percent"}


# ------------------------------------------------------------------ a model on a benchmark
class ZooEvalModel:
    """A loaded :class:`~vlzoo.zoo.ZooModel` seen through the interface the evaluators read
    (``embed_images``, ``embed_texts``, ``itc_similarity``, ``image_tokens_and_embeds``,
    ``tokenize``, ``itm_logits``, ``temperature``, ``device``)."""

    def __init__(self, zoo, text_batch_size: int = 256):
        self.zoo, self.model, self.text_batch_size = zoo, zoo.model, text_batch_size

    @property
    def device(self):
        return self.zoo.device

    def embed_images(self, pixel_values):
        return self.model.encode_image(pixel_values)

    def embed_texts(self, texts: list[str]):
        import torch

        size = self.text_batch_size
        return torch.cat([self.zoo.encode_text(texts[i : i + size]) for i in range(0, len(texts), size)])

    def itc_similarity(self, image_embeds, text_embeds, chunk: int = 256):
        import torch

        from vlzoo.zoo import embedding_similarity

        return torch.cat([embedding_similarity(image_embeds[i : i + chunk], text_embeds)
                          for i in range(0, len(image_embeds), chunk)])

    def image_tokens_and_embeds(self, pixel_values):
        return self.model.image_tokens_and_embeds(pixel_values)

    def tokenize(self, texts: list[str]) -> dict:
        ids, mask = self.zoo.tokenize(texts)
        return {"input_ids": ids, "attention_mask": mask}

    def itm_logits(self, input_ids, attention_mask, image_tokens):
        return self.model.itm_logits(input_ids, attention_mask, image_tokens)

    def temperature(self) -> float:
        return float(self.model.temp)


@dataclasses.dataclass
class Options:
    """How ``vlzoo eval --model`` runs: batch sizes, reader threads, the rerank depth and the
    VQA inference (None: the family protocol's), quiet progress, and how images are read:
    ``exif_transpose`` (rotate by EXIF orientation; None: as the model's reference, which for
    open_clip, transformers and the original releases means not rotating) and
    ``image_conversion`` (``reference``: the checkpoint's own colour conversion; ``vlzoo``:
    :func:`vlzoo.data.images.to_rgb` first)."""

    batch_size: int = 32
    workers: int = 4
    rerank_k: int | None = None
    vqa_inference: str | None = None
    classnames: str | None = None
    templates: str | None = None
    quiet: bool = False
    save_results: str | None = None
    exif_transpose: bool | None = None  # None: as the model's pipeline's reference
    image_conversion: str = "reference"


def read_images(items: list, options: Options, label: str, skipped: dict[int, str]) -> Iterator[tuple[list[int], Any]]:
    """(indices, PIL images) in batches of ``options.batch_size``, decoded by a thread pool; an
    unreadable image is skipped, named and recorded in ``skipped``."""
    from vlzoo.data.images import BadSample, load_image
    from vlzoo.inference import progress

    def load(i: int):
        try:  # a path, or a webdataset member read now; the mode left to the model's pipeline
            return i, load_image(items[i].read() if hasattr(items[i], "read") else items[i],
                                 exif_transpose=options.exif_transpose)
        except (BadSample, OSError) as bad:
            return i, bad if isinstance(bad, BadSample) else BadSample(f"unreadable ({bad})")

    size = options.batch_size
    batches = [list(range(s, min(s + size, len(items)))) for s in range(0, len(items), size)]
    with ThreadPoolExecutor(max(options.workers, 1)) as pool:
        pending = [pool.submit(load, i) for i in batches[0]] if batches else []
        for b in progress(iter(range(len(batches))), len(batches), label, options.quiet):
            current = pending
            if b + 1 < len(batches):  # the next batch decodes while the model runs on this one
                pending = [pool.submit(load, i) for i in batches[b + 1]]
            loaded = []
            for i, image in (future.result() for future in current):
                if isinstance(image, BadSample):
                    name = str(items[i])
                    skipped[i] = f"{name}: {image.reason}"
                    log(f"skipped {name}: {image.reason}")
                else:
                    loaded.append((i, image))
            if loaded:
                yield [i for i, _ in loaded], [im for _, im in loaded]


def _pixels(zoo, images: list):
    return zoo.pixel_values(list(images))


def _percent(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Fractions as percentages (None, an undefined figure, stays None)."""
    return {k: None if v is None else 100.0 * v for k, v in metrics.items()}


def from_published_release(zoo) -> bool:
    """Whether the model was converted from a published release (a transformers directory or
    the original files record their ``architecture`` / ``format``): the paper's text cleaning
    and prompts apply to it. A model vlzoo trained keeps the text and prompts it learnt with."""
    return "architecture" in zoo.extra or "format" in zoo.extra


def run_retrieval(zoo, protocol, dataset, name: str, options: Options, skipped: dict) -> dict[str, Any]:
    import torch

    from vlzoo.config import EvalConfig
    from vlzoo.eval.evaluator import RetrievalEvaluator, TwoStageEvaluator
    from vlzoo.eval.retrieval import retrieval_summary

    zoo._require("encode", "embed images and texts")
    k = options.rerank_k if options.rerank_k is not None else protocol.k_for(name)
    two_stage = "itm" in zoo.capabilities and k > 0
    config = EvalConfig(rerank_k=k, rerank_itc=protocol.rerank_itc, itm_score=protocol.itm_score,
                        itm_batch_size=max(options.batch_size * 4, 64))
    adapter = ZooEvalModel(zoo)
    evaluator = TwoStageEvaluator(adapter, config) if two_stage else RetrievalEvaluator(adapter, config)
    evaluator.progress_lines = not options.quiet
    outputs: dict[str, list] = {}
    kept: list[int] = []
    for indices, images in read_images(dataset.images, options, "embedding images", skipped):
        for key, value in evaluator.image_outputs(_pixels(zoo, images)).items():
            outputs.setdefault(key, []).append(value)
        kept += indices
    images_out = {key: torch.cat(values) for key, values in outputs.items()}
    clean = protocol.caption_text if from_published_release(zoo) else None
    captions = [[clean(c) for c in dataset.captions[i]] if clean else dataset.captions[i] for i in kept]
    log(f"scoring {len(kept)} images x {sum(map(len, captions))} captions"
        + (f" (ITM rerank of the top {k})" if two_stage else " (ITC)"))
    metrics = evaluator.retrieval(images_out, captions, match_identical=False)
    reranked = {m: v for m, v in metrics.items() if not m.startswith("itc_")}
    metrics = {**metrics, **retrieval_summary(reranked)}
    settings = {"rerank_k": k if two_stage else 0, "itm_score": protocol.itm_score if two_stage else None,
                "rerank_itc": protocol.rerank_itc if two_stage else None,
                "caption_text": f"{clean.kind}, {clean.max_words} words" if clean else "as given",
                "convention": "Karpathy: 5 captions per image; t2i hit = the caption's own image, i2t hit = "
                              "any of the image's own captions"}
    return {"metrics": _percent(metrics), "counts": {"images": len(kept), "texts": sum(map(len, captions))},
            "settings": settings}


def _caption_settings(zoo, protocol):
    """(prompt, GenerationConfig, description) of the captions: the protocol's decoding (its
    lengths converted to new tokens after the start token and prompt), else the model's own."""
    from vlzoo.hub.generation import CAPTION_DEFAULTS
    from vlzoo.models.builders import prompt_prefix

    decoding = protocol.caption
    if decoding is None:
        return None, zoo.extra.get("generation") or CAPTION_DEFAULTS, "the model's own settings"
    prompt = decoding.prompt if from_published_release(zoo) else None
    if prompt is not None:
        prefix = len(prompt_prefix(zoo.tokenizer, prompt))  # [DEC] + the prompt's tokens
    else:  # the model's own prompt (BLIP: its prefix ids), or the start token alone
        prefix = len(getattr(zoo.model, "prefix_ids", [None]))
    described = decoding.describe() + ("" if prompt is not None or decoding.prompt is None
                                       else " (the model's own prompt: it was not trained after the paper's)")
    return prompt, decoding.generation_config(prefix), described


def run_caption(zoo, protocol, dataset, name: str, options: Options, skipped: dict) -> dict[str, Any]:
    zoo._require("generate", "caption images")
    prompt, config, described = _caption_settings(zoo, protocol)
    log(f"decoding: {described}")
    predictions: dict = {}
    for indices, images in read_images(dataset.images, options, "captioning", skipped):
        captions = zoo.generate(_pixels(zoo, images), prompt=prompt, **dataclasses.asdict(config))
        predictions.update({dataset.image_ids[i]: c for i, c in zip(indices, captions)})
    if options.save_results:
        _save(options.save_results, [{"image_id": k, "caption": c} for k, c in predictions.items()])
    references = {dataset.image_ids[i]: dataset.captions[i] for i in range(len(dataset.images))
                  if dataset.image_ids[i] in predictions}
    domains = {dataset.image_ids[i]: d for i, d in enumerate(dataset.domains)} if dataset.domains else {}
    log(f"scoring {len(predictions)} captions with coco-caption (PTB tokenizer, BLEU, METEOR, ROUGE-L, CIDEr)")
    with stdout_to_stderr():
        report = caption_report(predictions, references, domains, n_annotated=len(dataset.images))
    return {"metrics": report["metrics"], "counts": {"images": report["images"]}, "notes": report["notes"],
            "settings": {"decoding": described, "prompt": prompt, **dataclasses.asdict(config)}}


def _vqa_mode(zoo, protocol, options: Options) -> str:
    family = zoo_family(zoo)
    mode = options.vqa_inference or protocol.vqa_inference
    if mode == "rank" and family.rank_answers is None:
        if options.vqa_inference == "rank":
            raise ValueError(f"--vqa-inference rank: a {zoo.family} model cannot rank an answer list "
                             "(BLIP VQA can); use --vqa-inference generate")
        mode = "generate"
    return mode


def _vqa_answerer(zoo, protocol, dataset, name: str, options: Options, settings: dict):
    """``answer(pixels (B, 3, S, S), questions) -> answers``: ranking the answer list, or generating."""
    mode = _vqa_mode(zoo, protocol, options)
    settings["inference"] = mode
    family = zoo_family(zoo)
    if mode == "rank":
        if not dataset.answer_list:
            raise ValueError(f"{name}: answer-list ranking needs answer_list.json in the data folder "
                             "(BLIP's VQAv2 answer list); or pass --vqa-inference generate")
        k = protocol.rank_candidates
        answer_tokens = zoo.tokenize(dataset.answer_list)  # once for the whole run
        settings.update(answer_list=len(dataset.answer_list), candidates=k)
        log(f"VQA by ranking {len(dataset.answer_list)} answers ({k} candidates by first-token probability)")
        return lambda pixels, texts: [dataset.answer_list[i]
                                      for i in family.rank_answers(zoo, pixels, texts, answer_tokens, k)]
    decoding = protocol.vqa
    config = dataclasses.asdict(decoding.generation_config()) if decoding else {}
    if decoding is not None and decoding.prompt is not None and from_published_release(zoo):
        if hasattr(zoo.config, "vqa_prompt"):
            zoo.config = dataclasses.replace(zoo.config, vqa_prompt=decoding.prompt)
    settings["decoding"] = decoding.describe() if decoding else "the model's own settings"
    settings["prompt"] = getattr(zoo.config, "vqa_prompt", None)
    log(f"VQA by generation: {settings['decoding']}")
    return lambda pixels, texts: zoo.vqa(pixels, texts, **config)


def run_vqa(zoo, protocol, dataset, name: str, options: Options, skipped: dict) -> dict[str, Any]:
    from vlzoo.eval.vqa import official_accuracy, score_answers

    zoo._require("vqa", "answer questions")
    settings: dict[str, Any] = {}
    answer = _vqa_answerer(zoo, protocol, dataset, name, options, settings)
    clean = protocol.question_text if from_published_release(zoo) else None
    settings["question_text"] = f"{clean.kind}, {clean.max_words} words" if clean else "as given"
    by_image: dict[Path, list[int]] = {}
    for q, image in enumerate(dataset.images):
        by_image.setdefault(image, []).append(q)
    unique = list(by_image)
    answers: dict = {}
    for indices, images in read_images(unique, options, "answering", skipped):
        rows = [j for j, i in enumerate(indices) for _ in by_image[unique[i]]]
        questions = [q for i in indices for q in by_image[unique[i]]]
        pixels = _pixels(zoo, images)
        for s in range(0, len(questions), options.batch_size):
            qs, rs = questions[s : s + options.batch_size], rows[s : s + options.batch_size]
            texts = [clean(dataset.questions[q]) if clean else dataset.questions[q] for q in qs]
            answers.update({dataset.question_ids[q]: a for q, a in zip(qs, answer(pixels[rs], texts))})
    if options.save_results:
        _save(options.save_results, [{"question_id": q, "answer": a} for q, a in answers.items()])
    order = [q for q in dataset.question_ids if q in answers]  # the annotations' order, as the official script
    index = {qid: i for i, qid in enumerate(dataset.question_ids)}
    groups = {"AnswerType": {q: dataset.answer_types[index[q]] for q in order},
              "QuestionType": {q: dataset.question_types[index[q]] for q in order}}
    scores = score_answers(answers, {q: dataset.answers[index[q]] for q in order}, official_accuracy, groups)
    return {"metrics": scores, "counts": {"questions": len(answers), "annotated_questions": len(index)},
            "settings": settings}


def run_zeroshot(zoo, protocol, dataset, name: str, options: Options, skipped: dict) -> dict[str, Any]:
    import torch

    from vlzoo.eval.zeroshot import (
        as_template,
        classification_scores,
        openai_imagenet,
        read_lines,
        read_templates,
        zeroshot_classifier,
    )
    from vlzoo.zoo import embedding_similarity

    zoo._require("encode", "embed images and texts")
    if options.templates:
        templates, source = read_templates(options.templates), options.templates
    elif dataset.templates:
        templates, source = [as_template(t) for t in dataset.templates], "the dataset's templates"
    else:
        templates, source = openai_imagenet()[1], "OpenAI's 80 ImageNet templates"
    classnames = read_lines(options.classnames, "class names") if options.classnames else dataset.classnames
    if len(classnames) != len(dataset.classnames):
        raise ValueError(f"--classnames {options.classnames}: {len(classnames)} names for "
                         f"{len(dataset.classnames)} classes")
    adapter = ZooEvalModel(zoo)
    log(f"zero-shot classifier: {len(classnames)} classes x {len(templates)} templates ({source})")
    classifier = zeroshot_classifier(adapter.embed_texts, classnames, templates)
    logits, labels = [], []
    for indices, images in read_images(dataset.images, options, "classifying", skipped):
        logits.append(embedding_similarity(zoo.model.encode_image(_pixels(zoo, images)), classifier).float().cpu())
        labels += [dataset.labels[i] for i in indices]
    scores = classification_scores(torch.cat(logits), torch.tensor(labels))
    return {"metrics": _percent(scores),
            "counts": {"images": len(labels), "classes": len(classnames)},
            "settings": {"templates": source, "n_templates": len(templates)}}


def _save(path: str, results: list[dict]) -> None:
    from vlzoo.utils import atomic_write_text

    atomic_write_text(path, json.dumps(results) + "\n")
    log(f"results written to {path}")


def zoo_family(zoo):
    from vlzoo import families

    return families.get(zoo.family)


def _default_protocol():
    from vlzoo.eval.protocol import EvalProtocol

    return EvalProtocol("no paper protocol is registered for this family: ITM rerank of the top 128, the model's "
                        "own decoding settings", {"default": 128})


RUNNERS = {"retrieval": run_retrieval, "caption": run_caption, "vqa": run_vqa, "zeroshot": run_zeroshot}


def published_figure(model_ref: str, benchmark: str, kind: str, metrics: dict[str, float]) -> dict[str, Any] | None:
    """The manifest's published figure for ``model_ref`` on ``benchmark`` beside ours (caption
    figures: the manifest's percent as a fraction)."""
    from vlzoo.hub.manifest import load_manifest

    entry = load_manifest().get(model_ref)
    metric = entry.metric if entry is not None else None
    if not metric or metric.get("benchmark") != benchmark:
        return None
    key = metric["key"]
    value = float(metric["value"]) / (100.0 if kind == "caption" else 1.0)
    ours = metrics.get(key)
    return {"key": key, "value": value, "ours": ours, "difference": None if ours is None else ours - value,
            "dataset": metric.get("dataset"), "source": metric.get("source")}


def evaluate_model(model_ref: str, benchmark: str, data: str, device: str | None = None,
                   options: Options | None = None) -> dict[str, Any]:
    """Load ``model_ref``, run it on ``benchmark`` read from ``data``, score it; the report
    (metrics, counts, settings, protocol, skipped images, published figure)."""
    import torch

    from vlzoo.eval.benchmarks import BENCHMARKS, BenchmarkDataError
    from vlzoo.inference import load_model

    options = options or Options()
    if benchmark not in BENCHMARKS:
        raise ValueError(f"--benchmark {benchmark!r}: expected one of {', '.join(BENCHMARKS)}")
    spec = BENCHMARKS[benchmark]
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"--data {data}: not a folder (expected {benchmark}'s files in their official "
                                f"layout: {spec.layout})")
    started = time.perf_counter()
    try:
        dataset = spec.read(root)
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise BenchmarkDataError(f"{data}: not in {benchmark}'s layout ({spec.layout}): {type(err).__name__}: "
                                 f"{err}") from err
    log(f"{benchmark}: read {spec.describe(dataset)} from {data}")
    zoo = load_model(model_ref, device)
    zoo.set_image_options(options.image_conversion, options.exif_transpose)
    options = dataclasses.replace(options, exif_transpose=zoo.exif_transpose)  # read as the model's reference
    protocol = zoo_family(zoo).protocol or _default_protocol()
    log(f"protocol: {protocol.source}")
    log(f"images: {zoo.pipeline.kind} pipeline, {options.image_conversion} colour conversion, EXIF orientation "
        f"{'applied' if options.exif_transpose else 'ignored'}")
    skipped: dict = {f"data {i}": why for i, why in enumerate(getattr(dataset, "skipped", []))}
    with torch.inference_mode():
        report = RUNNERS[spec.kind](zoo, protocol, dataset, benchmark, options, skipped)
    report.update(model=model_ref, benchmark=benchmark, data=str(data), family=zoo.family,
                  device=str(zoo.device), protocol=protocol.source,
                  skipped=list(skipped.values()), seconds=round(time.perf_counter() - started, 1),
                  units=CAPTION_UNITS if spec.kind == "caption" else "percent")
    report["published"] = published_figure(model_ref, benchmark, spec.kind, report["metrics"])
    report.setdefault("notes", [])
    return report


# ------------------------------------------------------------------ downloads
@dataclasses.dataclass(frozen=True)
class DataFile:
    """A public file of a benchmark: its URL, whether it is a zip to unpack into the folder,
    and its sha256 where one was confirmed (none is guessed: otherwise the digest is recorded
    beside the file on first download and printed)."""

    url: str
    extract: bool = False
    sha256: str | None = None


_SFR = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
COCO_VAL2014 = DataFile("http://images.cocodataset.org/zips/val2014.zip", extract=True)
_COCO = [DataFile(_SFR + "coco_karpathy_test.json"), COCO_VAL2014]
DOWNLOADS: dict[str, tuple[list[DataFile], str | None]] = {
    "coco-retrieval": (_COCO, None),
    "coco-caption": (_COCO, None),
    "flickr30k-retrieval": ([DataFile(_SFR + "flickr30k_test.json")],
                            "Flickr30k's images are not public: request them from the dataset's authors "
                            "(https://shannon.cs.illinois.edu/DenotationGraph/) and unpack them as flickr30k-images/"),
    "nocaps": ([DataFile("https://s3.amazonaws.com/nocaps/nocaps_val_4500_captions.json")], None),
    "vqav2": ([DataFile("https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Questions_Val_mscoco.zip", extract=True),
               DataFile("https://s3.amazonaws.com/cvmlp/vqa/mscoco/vqa/v2_Annotations_Val_mscoco.zip", extract=True),
               DataFile(_SFR + "answer_list.json"), COCO_VAL2014], None),
    "imagenet-zeroshot": ([], "ImageNet is not public: download ILSVRC2012_img_val.tar from image-net.org after "
                              "signing its terms, and sort it into its 1,000 synset folders"),
    "zeroshot": ([], "zeroshot reads your own folder (one sub-folder per class) or a CLIP_benchmark webdataset"),
}


def safe_extract(archive: Path, root: Path) -> int:
    """Unpack a zip into ``root``, refusing members that would land outside it; the number
    of files."""
    import zipfile

    root = root.resolve()
    with zipfile.ZipFile(archive) as zf:
        members = zf.infolist()
        for member in members:
            target = (root / member.filename).resolve()
            if root != target and root not in target.parents:
                raise ValueError(f"{archive}: member {member.filename!r} would be written outside {root}; refused")
        zf.extractall(root)
    return sum(not m.is_dir() for m in members)


def _nocaps_images(root: Path, progress: bool) -> int:
    """nocaps val images, each from the ``coco_url`` its annotation file gives, into validation/."""
    from vlzoo.hub.download import download_to
    from vlzoo.inference import progress as bar
    from vlzoo.utils import read_json_file

    images = read_json_file(root / "nocaps_val_4500_captions.json", "the nocaps annotation file object")["images"]
    (root / "validation").mkdir(exist_ok=True)
    for image in bar(iter(images), len(images), "nocaps images", not progress):
        download_to(image["coco_url"], root / "validation" / image["file_name"], "nocaps", progress=False)
    return len(images)


def download_benchmark(name: str, root: str | Path, progress: bool = True) -> list[str]:
    """Fetch the public files of benchmark ``name`` into ``root`` in its official layout
    (zips unpacked, then removed); lines saying what was done and what must come from
    elsewhere."""
    from vlzoo.hub.download import download_to, file_sha256

    if name not in DOWNLOADS:
        raise ValueError(f"unknown benchmark {name!r}; expected one of {', '.join(DOWNLOADS)}")
    files, manual = DOWNLOADS[name]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for data in files:
        filename = data.url.rsplit("/", 1)[-1]
        done = root / f".{filename}.unpacked"
        if data.extract and done.is_file():
            lines.append(f"{filename}: already unpacked in {root}")
            continue
        target = download_to(data.url, root / filename, name, data.sha256, progress)
        digest = file_sha256(target)
        if data.extract:
            count = safe_extract(target, root)
            done.write_text(digest + "\n")
            target.unlink()
            lines.append(f"{filename}: {count} files unpacked into {root} (sha256 {digest})")
        else:
            lines.append(f"{filename}: {target} (sha256 {digest})")
    if name == "nocaps":
        lines.append(f"nocaps: {_nocaps_images(root, progress)} images in {root / 'validation'}")
    if manual:
        lines.append(manual)
    return lines


def _download_command(args: argparse.Namespace) -> None:
    for line in download_benchmark(args.benchmark, args.to):
        print(line)


# ------------------------------------------------------------------ output
def _format(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if kind == "fraction" else f"{value:.2f}"


def report_table(report: dict[str, Any]) -> str:
    """The report as a plain table: metric, ours, published, difference."""
    kind = "fraction" if report.get("units", "").startswith("fractions") else "percent"
    published = report.get("published") or {}
    rows = [("metric", "value", "published", "difference")]
    for key, value in _flat(report["metrics"]).items():
        theirs = published if published.get("key") == key else {}
        difference = theirs.get("difference")
        rows.append((key, _format(value, kind), _format(theirs["value"], kind) if theirs else "",
                     "" if difference is None else "+" * (difference >= 0) + _format(difference, kind)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _flat(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _summary_lines(report: dict[str, Any]) -> list[str]:
    head = []
    if "model" in report:
        head.append(f"{report['model']} ({report['family']}) on {report['benchmark']}: {report['data']} "
                    f"[{report['device']}, {report['seconds']} s]")
    counts = report.get("counts") or {k: report[k] for k in ("images", "questions", "annotated_images",
                                                             "annotated_questions") if k in report}
    head.append("scored: " + ", ".join(f"{v} {k.replace('_', ' ')}" for k, v in counts.items()))
    for key, value in (report.get("settings") or {}).items():
        head.append(f"{key}: {value}")
    published = report.get("published")
    if published:
        head.append(f"published: {published['key']} = {published['value']} on {published['dataset']} "
                    f"({published['source']})")
    elif "model" in report:
        head.append("published: the manifest records no figure of this checkpoint on this benchmark")
    return head


def emit(report: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(report, indent=2, default=str))
        return
    print("\n".join(_summary_lines(report)))
    print()
    print(report_table(report))
    for note in report.get("notes") or []:
        print(f"note: {note}")
    if report.get("skipped"):
        print(f"skipped {len(report['skipped'])} unreadable image(s): scores are over the rest")


# ------------------------------------------------------------------ commands
def _caption_command(args: argparse.Namespace) -> None:
    with stdout_to_stderr():
        report = score_caption_files(args.results, args.annotations)
    log(f"scored {report['images']} captions of {args.results}")
    emit(report, args.json)


def _vqa_command(args: argparse.Namespace) -> None:
    with stdout_to_stderr():
        report = score_vqa_files(args.results, args.questions, args.annotations, args.format, args.subset)
    log(f"scored {report['questions']} answers of {args.results}")
    emit(report, args.json)


def _benchmark_command(args: argparse.Namespace) -> None:
    missing = [f"--{n}" for n in ("model", "benchmark", "data") if getattr(args, n) is None]
    if missing:
        raise ValueError(f"{', '.join(missing)} required (vlzoo eval --model REF --benchmark NAME --data PATH), "
                         "or a scorer: vlzoo eval caption|vqa --help")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    options = Options(batch_size=args.batch_size, workers=args.workers, rerank_k=args.rerank_k,
                      vqa_inference=args.vqa_inference, classnames=args.classnames, templates=args.templates,
                      quiet=args.json and not sys.stderr.isatty(), save_results=args.save_results,
                      exif_transpose=args.exif_transpose, image_conversion=args.image_conversion)
    report = evaluate_model(args.model, args.benchmark, args.data, args.device, options)
    if args.out:
        from vlzoo.utils import atomic_write_json

        atomic_write_json(args.out, report)
        log(f"report written to {args.out}")
    emit(report, args.json)


def add_eval_command(commands) -> None:
    """``vlzoo eval`` with its scorers ``caption`` and ``vqa``."""
    p = commands.add_parser(
        "eval", help="score results files the field's way, or a model on a standard benchmark",
        description="A model on a benchmark: --model REF --benchmark NAME --data PATH. Scorers of result files: "
                    "vlzoo eval caption|vqa. Caption scores are fractions; the others percentages.",
        epilog=examples("vlzoo eval --model blip-caption-base --benchmark coco-caption --data data/coco",
                        "vlzoo eval --model clip-vit-b32-openai --benchmark imagenet-zeroshot --data data/imagenet",
                        "vlzoo eval caption --results captions.json --annotations captions_val2014.json"))
    p.add_argument("--model", default=None, help="manifest name, checkpoint, run, export or transformers folder")
    p.add_argument("--benchmark", default=None, help=BENCHMARK_HELP)
    p.add_argument("--data", default=None, help="the benchmark's folder, in its official layout")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=4, help="image decoding threads")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    p.add_argument("--rerank-k", type=int, default=None, help="ITM rerank depth (default: the paper's)")
    p.add_argument("--vqa-inference", choices=["generate", "rank"], default=None,
                   help="VQA answers generated or ranked over answer_list.json (default: the paper's)")
    p.add_argument("--classnames", default=None, help="zero-shot: class names file, one per line")
    p.add_argument("--templates", default=None, help="zero-shot: prompt templates file, one per line with {}")
    p.add_argument("--exif-transpose", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate images by their EXIF orientation (default: as the model's reference: ignored by "
                        "open_clip, transformers and the original releases, applied for a model vlzoo trained)")
    p.add_argument("--image-conversion", choices=["reference", "vlzoo"], default="reference",
                   help="colour conversion: the checkpoint's own (default) or vlzoo's (palette, alpha, 16-bit)")
    p.add_argument("--save-results", default=None, help="write captions / answers in the official results format")
    p.add_argument("--out", default=None, help="write the report (JSON) here too")
    p.add_argument("--json", action="store_true", help="print only JSON on stdout")
    p.set_defaults(run=_benchmark_command)
    scorers = p.add_subparsers(dest="scorer", metavar="SCORER")
    c = scorers.add_parser(
        "caption", help="coco-caption scores of COCO-format results (BLEU-1..4, METEOR, ROUGE-L, CIDEr, SPICE)",
        epilog=examples("vlzoo eval caption --results captions_val2014_results.json "
                        "--annotations captions_val2014.json --json"))
    c.add_argument("--results", required=True, help='[{"image_id": ..., "caption": "..."}]')
    c.add_argument("--annotations", required=True, help="COCO caption annotations (nocaps: scored per domain too)")
    c.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print only JSON on stdout")
    c.set_defaults(run=_caption_command)
    v = scorers.add_parser(
        "vqa", help="the official VQAv2 accuracy (also OK-VQA), or GQA's exact match",
        epilog=examples("vlzoo eval vqa --results vqa_result.json --questions "
                        "v2_OpenEnded_mscoco_val2014_questions.json --annotations v2_mscoco_val2014_annotations.json",
                        "vlzoo eval vqa --format gqa --results gqa_result.json --questions testdev_balanced_questions.json"))
    v.add_argument("--results", required=True, help='[{"question_id": ..., "answer": "..."}]')
    v.add_argument("--questions", required=True, help="the questions file")
    v.add_argument("--annotations", default=None, help="the annotations file (VQAv2, OK-VQA)")
    v.add_argument("--format", choices=["vqa", "gqa"], default="vqa")
    v.add_argument("--subset", action="store_true", help="score only the questions answered")
    v.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print only JSON on stdout")
    v.set_defaults(run=_vqa_command)
    d = scorers.add_parser(
        "download", help="fetch a benchmark's public files into a folder, in its official layout",
        epilog=examples("vlzoo eval download coco-caption --to data/coco"))
    d.add_argument("benchmark", help=BENCHMARK_HELP)
    d.add_argument("--to", required=True, help="the data folder (then: vlzoo eval ... --data FOLDER)")
    d.set_defaults(run=_download_command)
