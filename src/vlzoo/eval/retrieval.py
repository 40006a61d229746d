"""Retrieval recall@k, with the field's conventions and explicit ties.

Which retrieved item is a hit (``CaptionIndex.build(..., match_identical=...)``):

- the Karpathy convention of COCO / Flickr30k papers (``match_identical=False``, what
  ``vlzoo eval`` uses): text-to-image, the caption's own image; image-to-text, any of the
  image's own captions (5 per image);
- vlzoo's shapes splits (``match_identical=True``, the training loops' default): also any
  caption string identical to one of the image's captions, since synthetic captions repeat
  across images and the Karpathy rule would call a correct retrieval a miss.

Ranks are exact, with ties broken by position (a stable sort of the scores, highest
first): a query's rank is the number of candidates scoring above its best hit plus the
candidates scoring the same that come before it. A ``-inf`` score (outside an ITM
rerank's top k) is never a hit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class CaptionIndex:
    """Flattened captions of an evaluation split.

    texts: every caption, image by image; text_image: (T,) the image each came from;
    text_ids: (T,) the id that decides matches (per distinct string with
    ``match_identical``, else per caption); image_text_ids: (N, C) those ids of each
    image's captions, padded with -1.
    """

    texts: list[str]
    text_image: Tensor
    text_ids: Tensor
    image_text_ids: Tensor

    @classmethod
    def build(cls, captions_per_image: list[list[str]], match_identical: bool = True) -> CaptionIndex:
        ids: dict[str, int] = {}
        texts, text_image, text_ids, per_image = [], [], [], []
        for i, caps in enumerate(captions_per_image):
            row = []
            for c in caps:
                texts.append(c)
                text_image.append(i)
                row.append(ids.setdefault(c, len(ids)) if match_identical else len(text_ids))
                text_ids.append(row[-1])
            per_image.append(row)
        width = max((len(r) for r in per_image), default=1)
        image_text_ids = torch.full((len(per_image), max(width, 1)), -1, dtype=torch.long)
        for i, row in enumerate(per_image):
            image_text_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return cls(texts, torch.tensor(text_image), torch.tensor(text_ids), image_text_ids)

    def image_hits(self, rows: slice) -> Tensor:
        """(n, T) bool: text t is a ground-truth caption of image i, for the images ``rows``."""
        own = self.image_text_ids[rows]  # (n, C)
        return (own[:, :, None] == self.text_ids[None, None, :]).any(1)

    def text_hits(self, cols: slice) -> Tensor:
        """(m, N) bool: image i is a ground-truth image of text t, for the texts ``cols``."""
        return (self.image_text_ids[None, :, :] == self.text_ids[cols, None, None]).any(-1)


def first_hit_ranks(scores: Tensor, hits: Tensor) -> Tensor:
    """(Q, C) scores and (Q, C) bool hits -> (Q,) 0-based rank of each query's best hit in
    a stable descending sort of its row; C where the query has no (finite) hit."""
    n_candidates = scores.shape[1]
    hits = hits & torch.isfinite(scores)
    masked = torch.where(hits, scores, torch.full_like(scores, float("-inf")))
    best = masked.max(dim=1).values  # (Q,) the best hit's score
    position = torch.arange(n_candidates, device=scores.device).expand_as(scores)
    first_best = torch.where(hits & (masked == best[:, None]), position, n_candidates).min(dim=1).values
    above = (scores > best[:, None]).sum(1)
    tied_before = ((scores == best[:, None]) & (position < first_best[:, None])).sum(1)
    return torch.where(hits.any(1), above + tied_before, torch.full_like(above, n_candidates))


def recall_at_k(
    similarity: Tensor,
    index: CaptionIndex,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 256,
) -> dict[str, float]:
    """similarity: (N images, T texts). Returns ``r{k}_i2t`` and ``r{k}_t2i`` in [0, 1]."""
    similarity = similarity.float()
    n_images, n_texts = similarity.shape
    i2t = torch.cat([first_hit_ranks(similarity[s : s + chunk], index.image_hits(slice(s, s + chunk)))
                     for s in range(0, n_images, chunk)]) if n_images else torch.empty(0)
    t2i = torch.cat([first_hit_ranks(similarity[:, s : s + chunk].T, index.text_hits(slice(s, s + chunk)))
                     for s in range(0, n_texts, chunk)]) if n_texts else torch.empty(0)
    out = {}
    for k in ks:
        out[f"r{k}_i2t"] = (i2t < k).double().mean().item()
        out[f"r{k}_t2i"] = (t2i < k).double().mean().item()
    return out


def retrieval_summary(metrics: dict[str, float], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """``txt_r_mean`` / ``img_r_mean`` (mean R@k image-to-text / text-to-image), ``r_mean``
    (their mean, as BLIP reports) and ``rsum`` (the sum of the six, as VSE papers report)."""
    i2t = [metrics[f"r{k}_i2t"] for k in ks]
    t2i = [metrics[f"r{k}_t2i"] for k in ks]
    return {"txt_r_mean": sum(i2t) / len(ks), "img_r_mean": sum(t2i) / len(ks),
            "r_mean": (sum(i2t) + sum(t2i)) / (2 * len(ks)), "rsum": sum(i2t) + sum(t2i)}


def compositional_accuracy(positive_scores: Tensor, negative_scores: Tensor) -> float:
    """Fraction of (image, hard negative) pairs where the true caption scores higher."""
    if positive_scores.numel() == 0:
        return float("nan")
    return (positive_scores > negative_scores).float().mean().item()


def mean_over_prompts(text_embeds: Tensor, num_classes: int) -> Tensor:
    """(C * P, D) embeddings of P prompts per class, class-major -> (C, D) normalised
    mean per class (CLIP's prompt ensembling, the zero-shot classifier's weights)."""
    return F.normalize(text_embeds.view(num_classes, -1, text_embeds.shape[-1]).mean(1), dim=-1)


def rerank_top_k(
    similarity: Tensor,
    k: int,
    score_pairs: Callable[[Tensor, Tensor], Tensor],
    batch_size: int = 256,
    similarity_weight: float = 1.0,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """Second stage of retrieval: rescore each query's top-k candidates.

    similarity: (Q, C) first-stage (ITC) scores. ``score_pairs(query_idx, cand_idx)``
    scores P pairs given as two (P,) index tensors (e.g. ITM logits). Returns (Q, C):
    ``score + similarity_weight * similarity`` on each row's top k, -inf elsewhere, so
    that ranking the row ranks the reranked candidates first. Pairs are scored
    ``batch_size`` at a time; ``progress(done, total)`` is called after each batch.
    """
    q, c = similarity.shape
    k = min(k, c)
    top = similarity.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(q, device=similarity.device)[:, None].expand(q, k).reshape(-1)
    candidates = top.reshape(-1)
    parts = []
    for s in range(0, len(queries), batch_size):
        parts.append(score_pairs(queries[s : s + batch_size], candidates[s : s + batch_size]).float())
        if progress is not None:
            progress(min(s + batch_size, len(queries)), len(queries))
    scores = torch.cat(parts)
    out = torch.full_like(similarity, float("-inf"), dtype=torch.float)
    out[queries, candidates] = scores + similarity_weight * similarity[queries, candidates].float()
    return out


def unique_texts(texts: list[str]) -> tuple[list[str], Tensor]:
    """Distinct strings in first-seen order, and (T,) the position of each text among them."""
    position: dict[str, int] = {}
    of_text = [position.setdefault(t, len(position)) for t in texts]
    return list(position), torch.tensor(of_text, dtype=torch.long)
