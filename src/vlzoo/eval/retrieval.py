"""Retrieval recall@k where a hit is any ground-truth match.

An image may have several captions, and two images may share a caption string: a
retrieved caption is a hit for an image when the image has that exact caption; a
retrieved image is a hit for a caption when that image has that exact caption.
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
    text_ids: (T,) an id per distinct caption string; image_text_ids: (N, C) the
    distinct-caption ids of each image, padded with -1.
    """

    texts: list[str]
    text_image: Tensor
    text_ids: Tensor
    image_text_ids: Tensor

    @classmethod
    def build(cls, captions_per_image: list[list[str]]) -> CaptionIndex:
        ids: dict[str, int] = {}
        texts, text_image, text_ids = [], [], []
        for i, caps in enumerate(captions_per_image):
            for c in caps:
                texts.append(c)
                text_image.append(i)
                text_ids.append(ids.setdefault(c, len(ids)))
        width = max((len(c) for c in captions_per_image), default=1)
        image_text_ids = torch.full((len(captions_per_image), max(width, 1)), -1, dtype=torch.long)
        for i, caps in enumerate(captions_per_image):
            row = [ids[c] for c in caps]
            image_text_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return cls(texts, torch.tensor(text_image), torch.tensor(text_ids), image_text_ids)


def recall_at_k(
    similarity: Tensor,
    index: CaptionIndex,
    ks: tuple[int, ...] = (1, 5, 10),
    chunk: int = 1024,
) -> dict[str, float]:
    """similarity: (N images, T texts). Returns ``r{k}_i2t`` and ``r{k}_t2i`` in [0, 1]."""
    n_images, n_texts = similarity.shape
    kmax_i2t, kmax_t2i = min(max(ks), n_texts), min(max(ks), n_images)
    i2t_first = torch.empty(n_images)
    for s in range(0, n_images, chunk):
        top = similarity[s : s + chunk].topk(kmax_i2t, dim=1).indices  # (c, k) text indices
        retrieved = index.text_ids[top]  # (c, k) caption ids
        own = index.image_text_ids[s : s + chunk]  # (c, C)
        hits = (retrieved[:, :, None] == own[:, None, :]).any(-1)  # (c, k)
        i2t_first[s : s + chunk] = _first_hit_rank(hits)
    t2i_first = torch.empty(n_texts)
    sim_t = similarity.T
    for s in range(0, n_texts, chunk):
        top = sim_t[s : s + chunk].topk(kmax_t2i, dim=1).indices  # (c, k) image indices
        candidate_ids = index.image_text_ids[top]  # (c, k, C)
        query_ids = index.text_ids[s : s + chunk]  # (c,)
        hits = (candidate_ids == query_ids[:, None, None]).any(-1)  # (c, k)
        t2i_first[s : s + chunk] = _first_hit_rank(hits)
    out = {}
    for k in ks:
        out[f"r{k}_i2t"] = (i2t_first < k).float().mean().item()
        out[f"r{k}_t2i"] = (t2i_first < k).float().mean().item()
    return out


def _first_hit_rank(hits: Tensor) -> Tensor:
    """(Q, k) bool -> (Q,) rank of the first hit, or k when none."""
    k = hits.shape[1]
    ranks = torch.arange(k).expand_as(hits)
    return torch.where(hits, ranks, torch.full_like(ranks, k)).min(dim=1).values.float()


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
) -> Tensor:
    """Second stage of retrieval: rescore each query's top-k candidates.

    similarity: (Q, C) first-stage (ITC) scores. ``score_pairs(query_idx, cand_idx)``
    scores P pairs given as two (P,) index tensors (e.g. ITM logits). Returns (Q, C):
    ``score + similarity_weight * similarity`` on each row's top k, -inf elsewhere, so
    that ranking the row ranks the reranked candidates first. Pairs are scored
    ``batch_size`` at a time.
    """
    q, c = similarity.shape
    k = min(k, c)
    top = similarity.topk(k, dim=1).indices  # (Q, k)
    queries = torch.arange(q, device=similarity.device)[:, None].expand(q, k).reshape(-1)
    candidates = top.reshape(-1)
    scores = torch.cat([
        score_pairs(queries[s : s + batch_size], candidates[s : s + batch_size]).float()
        for s in range(0, len(queries), batch_size)
    ])
    out = torch.full_like(similarity, float("-inf"), dtype=torch.float)
    out[queries, candidates] = scores + similarity_weight * similarity[queries, candidates].float()
    return out


def unique_texts(texts: list[str]) -> tuple[list[str], Tensor]:
    """Distinct strings in first-seen order, and (T,) the position of each text among them."""
    position: dict[str, int] = {}
    of_text = [position.setdefault(t, len(position)) for t in texts]
    return list(position), torch.tensor(of_text, dtype=torch.long)
