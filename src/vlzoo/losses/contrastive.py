"""Contrastive losses with features gathered over ranks (local-loss form)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from vlzoo.distributed import gather_with_grad, rank


def clip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE over the global batch.

    image_embeds, text_embeds: (B, D) L2-normalised, this rank's pairs; logit_scale: the
    scalar exp(t). Each rank scores its own B rows against all gathered columns, in
    both directions; averaged over ranks (as DDP does) this equals the loss of one
    process on the union batch, with gradients flowing through the gathered features.
    Returns the scalar mean of row and column cross-entropy.
    """
    all_images = gather_with_grad(image_embeds)  # (W*B, D)
    all_texts = gather_with_grad(text_embeds)  # (W*B, D)
    batch = image_embeds.shape[0]
    labels = torch.arange(batch, device=image_embeds.device) + rank() * batch
    logits_per_image = logit_scale * image_embeds @ all_texts.T  # (B, W*B)
    logits_per_text = logit_scale * text_embeds @ all_images.T  # (B, W*B)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss(image_embeds: Tensor, text_embeds: Tensor, logit_scale: Tensor, logit_bias: Tensor) -> Tensor:
    """Pairwise sigmoid loss (SigLIP) of this rank's images against all gathered texts.

    image_embeds, text_embeds: (B, D) normalised. Returns the sum over pairs divided by
    the local batch size; averaged over ranks this equals the union-batch loss.
    """
    all_texts = gather_with_grad(text_embeds)  # (W*B, D)
    batch = image_embeds.shape[0]
    logits = logit_scale * image_embeds @ all_texts.T + logit_bias  # (B, W*B)
    signs = -torch.ones_like(logits)
    own = torch.arange(batch, device=logits.device)
    signs[own, own + rank() * batch] = 1.0
    return -F.logsigmoid(signs * logits).sum() / batch
