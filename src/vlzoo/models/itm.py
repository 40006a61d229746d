"""ITM with hard negatives, shared by ALBEF, BLIP and the BLIP-2 Q-Former.

For every image one negative text and for every text one negative image, drawn in
proportion to softmax(similarity) with positives excluded, from the batch of every
rank; the model is reached through an ``itm_logits`` callable.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from vlzoo.distributed import gather_no_grad, gather_padded, gather_with_grad
from vlzoo.layers.micro_batches import in_micro_batches
from vlzoo.layers.transformer import right_pad
from vlzoo.losses import itm_loss, sample_hard_negatives

ITMLogits = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], Tensor]
"""itm_logits(input_ids (P, L), attention_mask (P, L), image_tokens (P, N, Dv),
text_hidden (P, L, D) or None) -> (P, 2) no-match / match logits."""


def micro_batched_itm_logits(itm_logits: ITMLogits, micro_batches: int, batch: int) -> ITMLogits:
    """``itm_logits`` over P pairs in micro-batches of about ``batch / micro_batches``
    pairs (:func:`~vlzoo.layers.micro_batches.in_micro_batches`); ``micro_batches`` <= 1:
    ``itm_logits`` itself."""
    if micro_batches <= 1:
        return itm_logits

    def logits(input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, text_hidden: Tensor | None = None
               ) -> Tensor:
        parts = -(-len(input_ids) * micro_batches // batch)  # ceil: no part above one micro-batch's rows
        return in_micro_batches(itm_logits, parts, input_ids, attention_mask, image_tokens, text_hidden)

    return logits


def itm_with_hard_negatives(
    itm_logits: ITMLogits,
    input_ids: Tensor,
    attention_mask: Tensor,
    index: Tensor,
    image_tokens: Tensor,
    sim_t2i: Tensor,
    sim_i2t: Tensor,
    text_hidden: Tensor | None = None,
) -> Tensor:
    """ITM loss over B positives, B (text, hard-negative image) and B (image,
    hard-negative text) pairs.

    input_ids, attention_mask: (B, L) this rank's texts; index: (B,) sample ids;
    image_tokens: (B, N, Dv) this rank's images (gathered with gradient);
    sim_t2i: (B, W) this rank's texts vs every rank's images, sim_i2t: (B, W) this
    rank's images vs every rank's texts (W = world batch, no gradient needed);
    text_hidden: (B, L, D) a unimodal text pass the model reuses for the positives and
    negative images (ALBEF); None (BLIP, BLIP-2): the 3B pairs run as one call, this
    rank's texts right-padded to the world's longest.
    """
    b = input_ids.shape[0]
    with torch.no_grad():
        positive = index[:, None] == gather_no_grad(index)[None, :]  # (B, W)
        negative_image = sample_hard_negatives(sim_t2i.detach(), positive)  # (B,)
        negative_text = sample_hard_negatives(sim_i2t.detach(), positive)  # (B,)
        ids_world = gather_padded(input_ids, value=0)
        mask_world = gather_padded(attention_mask, value=0)
    image_tokens_world = gather_with_grad(image_tokens)  # (W, N, Dv)
    images = torch.cat([image_tokens, image_tokens_world[negative_image]])  # positives, then negative images
    if text_hidden is None:  # nothing reused: all 3B pairs in one call (the same FLOPs, one pass)
        ids, mask = (right_pad(t, ids_world.shape[1]) for t in (input_ids, attention_mask))
        logits = itm_logits(torch.cat([ids.repeat(2, 1), ids_world[negative_text]]),
                            torch.cat([mask.repeat(2, 1), mask_world[negative_text]]),
                            torch.cat([images, image_tokens]), None)  # (3B, 2)
        return itm_loss(logits, num_positive=b)
    same_text = itm_logits(input_ids.repeat(2, 1), attention_mask.repeat(2, 1), images,
                           text_hidden.repeat(2, 1, 1))  # (2B, 2): positives, then negative images
    other_text = itm_logits(ids_world[negative_text], mask_world[negative_text], image_tokens, None)  # (B, 2)
    return itm_loss(torch.cat([same_text, other_text]), num_positive=b)
