"""Evaluation as its own object: what a split's metrics are, apart from how a model is
trained. A task (or, later, ``vlzoo eval``) builds one and hands it the per-image
outputs it computed (``image_outputs`` of each batch, gathered over ranks in dataset
order) and the split's annotations.

An evaluator reads the model through a small interface, documented per class: the
task implements it (``embed_images``, ``embed_texts``, ``itc_similarity``, ...), so the
evaluator never imports a task. Metric names are those the tasks log after
``{stage}/`` (``r1_t2i``, ``compositional_acc``, ``bleu4``, ``vqa_acc``, ``acc``, ...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from vlzoo.config import EvalConfig
from vlzoo.data.datamodule import EvalAnnotations
from vlzoo.eval.captioning import caption_metrics
from vlzoo.eval.retrieval import (
    CaptionIndex,
    compositional_accuracy,
    recall_at_k,
    rerank_top_k,
    unique_texts,
)
from vlzoo.eval.vqa import answer_every_pair, vqa_metrics
from vlzoo.eval.zeroshot import as_template, classification_scores, zeroshot_classifier
from vlzoo.utils import ProgressLines

AnswerPrior = Callable[[], Any] | None  # the data module's majority answers, for the VQA baseline


@torch.no_grad()
def class_embeddings(embed_texts: Callable[[list[str]], Tensor], classes: list[str], templates: list[str]) -> Tensor:
    """(C, D) normalised mean text embedding of each class over the prompt ``templates``
    (``"a photo of a {}"``): the zero-shot classifier."""
    return zeroshot_classifier(embed_texts, classes, [as_template(t) for t in templates])


class Evaluator:
    """Per-image outputs of a batch, and the metrics of a split from all of them."""

    def image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        """(B, 3, H, W) -> per-image tensors kept for :meth:`evaluate`, each (B, ...)."""
        raise NotImplementedError

    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations, answer_prior: AnswerPrior = None
                 ) -> dict[str, float]:
        """Metrics from every image's outputs (dataset order) and the annotations."""
        raise NotImplementedError


class RetrievalEvaluator(Evaluator):
    """ITC retrieval R@1/5/10 both ways, compositional accuracy (a true caption against its
    hard negatives) and zero-shot accuracy (``config.zeroshot_templates``).

    ``model`` gives ``embed_images(pixels) -> (B, D)``, ``embed_texts(texts) -> (T, D)``
    (normalised), ``itc_similarity(image_embeds, text_embeds) -> (N, T)`` and ``device``."""

    def __init__(self, model: Any, config: EvalConfig):
        self.model, self.config = model, config

    def image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return {"embeds": self.model.embed_images(pixel_values)}

    def score_pairs(self, images: dict[str, Tensor], rows: Tensor, texts: list[str]) -> Tensor:
        """Match score of image ``rows[i]`` with ``texts[i]`` -> (P,). Here: cosine."""
        return (images["embeds"][rows] * self.model.embed_texts(texts)).sum(-1)

    def class_embeddings(self, classes: list[str]) -> Tensor:
        """(C, D) normalised mean text embedding of each class over ``zeroshot_templates``."""
        return class_embeddings(self.model.embed_texts, classes, self.config.zeroshot_templates)

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations, answer_prior: AnswerPrior = None
                 ) -> dict[str, float]:
        return {**self.retrieval(images, ann.captions), **self.compositional_and_zeroshot(images, ann)}

    @torch.no_grad()
    def retrieval(self, images: dict[str, Tensor], captions: list[list[str]], match_identical: bool = True
                  ) -> dict[str, float]:
        """R@1/5/10 both ways of the images' embeddings against ``captions`` (per image);
        ``match_identical``: see :class:`~vlzoo.eval.retrieval.CaptionIndex`."""
        index = CaptionIndex.build(captions, match_identical)
        texts, of_text = unique_texts(index.texts)
        similarity = self.model.itc_similarity(images["embeds"], self.model.embed_texts(texts))  # (N, U)
        return recall_at_k(similarity[:, of_text].float().cpu(), index)

    def compositional_and_zeroshot(self, images: dict[str, Tensor], ann: EvalAnnotations) -> dict[str, float]:
        metrics = {"compositional_acc": self.compositional(images, ann)}
        if ann.zeroshot_classes:
            metrics["zeroshot_acc"] = self.zeroshot(images["embeds"], ann)
        return metrics

    def compositional(self, images: dict[str, Tensor], ann: EvalAnnotations) -> float:
        rows, positives, negatives = [], [], []
        for i, negs in enumerate(ann.negatives):
            for neg in negs:
                rows.append(i)
                positives.append(ann.captions[i][0])
                negatives.append(neg)
        if not rows:
            return float("nan")
        row_index = torch.tensor(rows, device=self.model.device)
        return compositional_accuracy(self.score_pairs(images, row_index, positives).cpu(),
                                      self.score_pairs(images, row_index, negatives).cpu())

    def zeroshot(self, image_embeds: Tensor, ann: EvalAnnotations) -> float:
        labelled = [(i, y) for i, y in enumerate(ann.zeroshot_labels) if y is not None]
        if not labelled:
            return float("nan")
        class_embeds = self.class_embeddings(ann.zeroshot_classes)  # (C, D)
        rows = torch.tensor([i for i, _ in labelled], device=image_embeds.device)
        labels = torch.tensor([y for _, y in labelled])
        logits = self.model.itc_similarity(image_embeds[rows], class_embeds).float().cpu()
        return classification_scores(logits, labels, ks=(1,))["top1"]


class TwoStageEvaluator(RetrievalEvaluator):
    """The families with an ITM head (ALBEF, BLIP, BLIP-2): ITC similarity for all pairs,
    the top ``rerank_k`` reranked by ITM plus the ``rerank_itc`` term, ITM-scored
    compositional accuracy; ``itc_r1_*`` keep ITC alone. With ``captions``: every image
    captioned from its tokens too, ``bleu4``/``cider`` against all references.

    ``model`` also gives ``image_tokens_and_embeds(pixels) -> ((B, N, Dv), embeds)``,
    ``tokenize(texts) -> {input_ids, attention_mask}``, ``itm_logits(ids, mask, image_tokens)
    -> (P, 2)``, ``temperature() -> float`` and, with ``captions``,
    ``caption_ids_from_tokens(tokens) -> (B, T)`` and ``decode(ids) -> str``."""

    def __init__(self, model: Any, config: EvalConfig, captions: bool = False):
        super().__init__(model, config)
        self.captions = captions
        self.progress_lines = False  # vlzoo eval: progress lines through the long ITM passes

    def progress(self, label: str) -> Callable[[int, int], None] | None:
        """``(done, total)`` pairs -> a progress line every 10 s (None: silent, as in training)."""
        if not self.progress_lines:
            return None
        lines: list[ProgressLines] = []

        def advance(done: int, total: int) -> None:
            if not lines:
                lines.append(ProgressLines(label, total, "pairs"))
            lines[0].advance(done - lines[0].done)

        return advance

    def image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        tokens, embeds = self.model.image_tokens_and_embeds(pixel_values)
        outputs = {"embeds": embeds, "tokens": tokens}
        if self.captions:
            outputs["caption_ids"] = self.model.caption_ids_from_tokens(tokens)
        return outputs

    def itm_scores(self, images: dict[str, Tensor], rows: Tensor, tokens: dict[str, Tensor], cols: Tensor) -> Tensor:
        """(P,) ITM match logit minus no-match logit of image rows[p] with text cols[p]."""
        logits = self.model.itm_logits(tokens["input_ids"][cols], tokens["attention_mask"][cols],
                                       images["tokens"][rows])
        return logits[:, 1] if self.config.itm_score == "match_logit" else logits[:, 1] - logits[:, 0]

    @torch.no_grad()
    def retrieval(self, images: dict[str, Tensor], captions: list[list[str]], match_identical: bool = True
                  ) -> dict[str, float]:
        """``itc_r{k}_*`` from ITC alone, ``r{k}_*`` after the ITM rerank of each query's
        top ``rerank_k`` (ITC alone when ``rerank_k`` is 0)."""
        index = CaptionIndex.build(captions, match_identical)
        texts, of_text = unique_texts(index.texts)
        similarity = self.model.itc_similarity(images["embeds"], self.model.embed_texts(texts))  # (N, U) ITC
        itc = recall_at_k(similarity[:, of_text].float().cpu(), index)
        if self.config.rerank_k <= 0:
            return itc
        tokens = self.model.tokenize(texts)
        k, batch, weight = self.config.rerank_k, self.config.itm_batch_size, self.rerank_itc_weight()
        i2t = rerank_top_k(similarity, k, lambda q, c: self.itm_scores(images, q, tokens, c), batch, weight,
                           self.progress("ITM rerank, image to text"))
        t2i = rerank_top_k(similarity.T, k, lambda q, c: self.itm_scores(images, c, tokens, q), batch, weight,
                           self.progress("ITM rerank, text to image"))
        metrics = {f"itc_{k}": v for k, v in itc.items()}
        metrics.update({m: v for m, v in recall_at_k(i2t[:, of_text].cpu(), index).items() if m.endswith("i2t")})
        metrics.update({m: v for m, v in recall_at_k(t2i.T[:, of_text].cpu(), index).items() if m.endswith("t2i")})
        return metrics

    def rerank_itc_weight(self) -> float:
        """What multiplies the ITC cosine in the reranked score (``eval.rerank_itc``)."""
        cfg = self.config
        if cfg.rerank_itc == "logit":
            return cfg.rerank_itc_weight / self.model.temperature()
        return cfg.rerank_itc_weight * {"cosine": 1.0, "none": 0.0}[cfg.rerank_itc]

    def score_pairs(self, images: dict[str, Tensor], rows: Tensor, texts: list[str]) -> Tensor:
        size = self.config.itm_batch_size
        scores = []
        for s in range(0, len(texts), size):
            tokens = self.model.tokenize(texts[s : s + size])
            cols = torch.arange(len(tokens["input_ids"]), device=self.model.device)
            scores.append(self.itm_scores(images, rows[s : s + size], tokens, cols))
        return torch.cat(scores)

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations, answer_prior: AnswerPrior = None
                 ) -> dict[str, float]:
        metrics = {k: v for k, v in self.retrieval(images, ann.captions).items()
                   if not k.startswith("itc_") or k.startswith("itc_r1_")}
        metrics.update(self.compositional_and_zeroshot(images, ann))
        if self.captions:
            predictions = [self.model.decode(row).strip() for row in images["caption_ids"].long()]
            metrics.update(caption_metrics(predictions, ann.captions))
        return metrics


class ImageTokensEvaluator(Evaluator):
    """For evaluators that answer or caption from the image tokens the model reads:
    ``model.image_tokens(pixels) -> (B, N, Dv)`` is what each batch keeps."""

    def __init__(self, model: Any, config: EvalConfig):
        self.model, self.config = model, config

    def image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return {"tokens": self.model.image_tokens(pixel_values)}


def _vqa_metrics(predictions: list[str], qa: list[dict[str, str]], answer_prior: AnswerPrior) -> dict[str, float]:
    if answer_prior is None:
        raise ValueError("VQA evaluation needs the data module's answer prior (the majority-answer baseline)")
    return vqa_metrics(predictions, qa, answer_prior())


class VQAEvaluator(ImageTokensEvaluator):
    """BLIP VQA: every QA pair of the split answered from the image tokens; ``vqa_acc``
    and the majority-answer baseline ``vqa_majority_acc``.

    ``model`` gives ``image_tokens(pixels) -> (B, N, Dv)`` and
    ``answer_from_tokens(tokens, questions) -> list[str]``."""

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations, answer_prior: AnswerPrior = None
                 ) -> dict[str, float]:
        if not any(ann.qa):
            raise ValueError("the evaluation split has no QA pairs (records need a 'qa' field)")
        tokens = images["tokens"]

        def answer(rows: list[int], questions: list[str]) -> list[str]:
            return self.model.answer_from_tokens(tokens[torch.tensor(rows, device=tokens.device)], questions)

        predictions, qa = answer_every_pair(ann.qa, answer, self.config.itm_batch_size)
        return _vqa_metrics(predictions, qa, answer_prior)


class PromptedLLMEvaluator(ImageTokensEvaluator):
    """BLIP-2 stage 2: every image captioned after the caption prompt (``bleu4``,
    ``cider``) and, when the split has QA pairs, every pair answered (``vqa_acc``,
    ``vqa_majority_acc``).

    ``model`` gives ``image_tokens(pixels)``, ``soft_prompt(tokens) -> (B, Q, H)``,
    ``caption_from_soft(soft) -> list[str]`` and
    ``answer_from_soft(tokens, soft, questions) -> list[str]``."""

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations, answer_prior: AnswerPrior = None
                 ) -> dict[str, float]:
        tokens, size = images["tokens"], self.config.itm_batch_size
        soft = torch.cat([self.model.soft_prompt(tokens[s : s + size]) for s in range(0, len(tokens), size)])
        captions = []
        for s in range(0, len(tokens), size):
            captions += self.model.caption_from_soft(soft[s : s + size])
        metrics = caption_metrics(captions, ann.captions)
        if any(ann.qa):

            def answer(rows: list[int], questions: list[str]) -> list[str]:
                rows = torch.tensor(rows, device=tokens.device)
                return self.model.answer_from_soft(tokens[rows], soft[rows], questions)

            predictions, qa = answer_every_pair(ann.qa, answer, size)
            metrics.update(_vqa_metrics(predictions, qa, answer_prior))
        return metrics


class ClassificationEvaluator(Evaluator):
    """A classifier over ``model.classes``: top-1 ``acc`` and ``top5_acc`` on the images
    labelled with one of them. ``model`` gives ``class_logits(pixels) -> (B, C)``."""

    def __init__(self, model: Any):
        self.model = model

    def image_outputs(self, pixel_values: Tensor) -> dict[str, Tensor]:
        return {"logits": self.model.class_logits(pixel_values)}

    @torch.no_grad()
    def evaluate(self, images: dict[str, Tensor], ann: EvalAnnotations, answer_prior: AnswerPrior = None
                 ) -> dict[str, float]:
        index = {name: i for i, name in enumerate(self.model.classes)}
        rows, labels = [], []
        for i, y in enumerate(ann.zeroshot_labels):
            if y is not None and ann.zeroshot_classes[y] in index:
                rows.append(i)
                labels.append(index[ann.zeroshot_classes[y]])
        if not rows:
            raise ValueError("the evaluation split has no image labelled with one of this model's classes")
        logits = images["logits"][torch.tensor(rows, device=images["logits"].device)].float().cpu()
        scores = classification_scores(logits, torch.tensor(labels), ks=(1, 5))
        return {"acc": scores["top1"], **({"top5_acc": scores["top5"]} if scores["top5"] is not None else {})}
