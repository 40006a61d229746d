"""Losses of the momentum-queue family (ALBEF, BLIP) and of image-grounded text.

Pure functions over tensors: soft-target ITC with momentum distillation, ITM with
hard negatives, BERT-style MLM masking with distillation, and the captioning LM loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.distributed import token_mean

IGNORE = -100


def positive_targets(index: Tensor, candidate_index: Tensor) -> Tensor:
    """(B,) sample ids vs (C,) candidate ids -> (B, C) targets, uniform over the
    candidates that show the same image (a row with none stays all zeros)."""
    positive = (index[:, None] == candidate_index[None, :]).float()
    return positive / positive.sum(1, keepdim=True).clamp(min=1)


def soft_cross_entropy(logits: Tensor, targets: Tensor, reduction: str = "mean") -> Tensor:
    """``-sum(targets * log_softmax(logits))`` of each row, averaged (``mean``) or summed
    (``sum``) over rows, or per row (``none``: (B,)); (B, C) each."""
    rows = -(F.log_softmax(logits.float(), dim=-1) * targets).sum(-1)
    if reduction == "none":
        return rows
    return rows.sum() if reduction == "sum" else rows.mean()


def distilled_itc_loss(
    sim_i2t: Tensor, sim_t2i: Tensor, sim_i2t_m: Tensor, sim_t2i_m: Tensor, targets: Tensor, alpha: float
) -> Tensor:
    """ITC against the momentum features of batch + queue, with momentum distillation.

    sim_*: (B, C) online similarities / temperature; sim_*_m: the same from the
    momentum features (no gradient); targets: (B, C) ground truth
    (:func:`positive_targets`). Target = alpha * softmax(sim_m) + (1 - alpha) *
    ground truth. Returns the mean of both directions.
    """
    with torch.no_grad():
        targets_i2t = alpha * F.softmax(sim_i2t_m.float(), dim=1) + (1 - alpha) * targets
        targets_t2i = alpha * F.softmax(sim_t2i_m.float(), dim=1) + (1 - alpha) * targets
    return (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2


def sample_hard_negatives(similarity: Tensor, positive: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One negative per row, drawn with probability softmax(similarity), positives excluded.

    similarity: (B, C); positive: (B, C) bool. Returns (B,) column indices. A row
    whose every candidate is positive falls back to a uniform draw.
    """
    weights = F.softmax(similarity.float(), dim=1).masked_fill(positive, 0.0)
    empty = weights.sum(1, keepdim=True) <= 0  # (B, 1); no branch on it: no host read, no graph break
    weights = torch.where(empty, torch.ones_like(weights), weights)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def itm_loss(logits: Tensor, num_positive: int) -> Tensor:
    """logits: (P + N, 2) with the first ``num_positive`` rows matching pairs."""
    labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    labels[:num_positive] = 1
    return F.cross_entropy(logits.float(), labels)


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    mask_id: int,
    vocab_size: int,
    special_ids: list[int],
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT masking: ``probability`` of real, non-special tokens are chosen; of those
    80 % become [MASK], 10 % a random token, 10 % stay. Returns (masked ids, labels)
    with labels = the original id at chosen positions and -100 elsewhere; (B, L) each."""
    device = input_ids.device
    candidates = attention_mask.bool() & ~torch.isin(input_ids, torch.tensor(special_ids, device=device))
    # the generator keyword only when given: torch.compile cannot pass one with a dynamic text length
    drawn = {"device": device} if generator is None else {"device": device, "generator": generator}
    chosen = candidates & (torch.rand(input_ids.shape, **drawn) < probability)
    labels = input_ids.masked_fill(~chosen, IGNORE)
    kind = torch.rand(input_ids.shape, **drawn)
    to_mask = chosen & (kind < 0.8)
    to_random = chosen & (kind >= 0.8) & (kind < 0.9)
    random_ids = torch.randint(vocab_size, input_ids.shape, **drawn)
    masked = input_ids.masked_fill(to_mask, mask_id)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


def distilled_mlm_loss(logits: Tensor, labels: Tensor, logits_m: Tensor | None, alpha: float) -> Tensor:
    """(1 - alpha) * CE(logits, labels) + alpha * CE(logits, softmax(logits_m)), the mean
    over the masked positions (labels != -100) of every rank (:func:`token_mean`).
    logits, logits_m: (B, L, V); labels: (B, L)."""
    return token_mean(*distilled_mlm_total(logits, labels, logits_m, alpha))


def distilled_mlm_total(logits: Tensor, labels: Tensor, logits_m: Tensor | None, alpha: float
                        ) -> tuple[Tensor, Tensor]:
    """:func:`distilled_mlm_loss` as (sum over this rank's masked positions, their
    number), both 0-d: sums of micro-batches add up to the batch's. Every position is
    scored and the unmasked ones weighted 0: no data-dependent shape (no host read, no
    graph break)."""
    chosen = labels.reshape(-1) != IGNORE  # (B L,)
    flat = logits.reshape(len(chosen), -1).float()  # (B L, V)
    loss = F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")
    if logits_m is not None and alpha != 0:
        targets = F.softmax(logits_m.reshape(len(chosen), -1).float(), dim=-1)
        distill = (soft_cross_entropy(flat, targets, reduction="none") * chosen).sum()
        loss = (1 - alpha) * loss + alpha * distill
    return loss, chosen.sum()


def caption_lm_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> Tensor:
    """Next-token loss: logits[:, t] predicts labels[:, t + 1]; labels -100 are ignored.
    The mean over the target tokens of every rank (:func:`token_mean`), so the loss of
    a batch split over ranks equals that of the union batch.

    logits: (B, L, V); labels: (B, L) (the input ids with pad and prompt set to -100).
    """
    return token_mean(*caption_lm_total(logits, labels, label_smoothing))


def caption_lm_total(logits: Tensor, labels: Tensor, label_smoothing: float = 0.1) -> tuple[Tensor, Tensor]:
    """:func:`caption_lm_loss` as (sum over this rank's target tokens, their number), 0-d each."""
    return token_cross_entropy_total(logits[:, :-1], labels[:, 1:], label_smoothing)


def token_cross_entropy(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy of aligned (B, T, V) logits and (B, T) labels (-100 ignored): the
    mean over the target tokens of every rank (:func:`token_mean`)."""
    return token_mean(*token_cross_entropy_total(logits, labels, label_smoothing))


def token_cross_entropy_total(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0
                              ) -> tuple[Tensor, Tensor]:
    """:func:`token_cross_entropy` as (sum over this rank's target tokens, their number), 0-d each."""
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits.reshape(len(labels), -1).float(), labels, ignore_index=IGNORE,
                            label_smoothing=label_smoothing, reduction="sum")
    return total, (labels != IGNORE).sum()
