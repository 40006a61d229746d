"""Losses, separate from models: pure functions or small modules."""

from vlzoo.losses.contrastive import clip_loss, siglip_loss
from vlzoo.losses.momentum import (
    IGNORE,
    caption_lm_loss,
    caption_lm_total,
    distilled_itc_loss,
    distilled_mlm_loss,
    distilled_mlm_total,
    itm_loss,
    mask_tokens,
    positive_targets,
    sample_hard_negatives,
)

__all__ = [
    "IGNORE", "clip_loss", "siglip_loss", "caption_lm_loss", "caption_lm_total", "distilled_itc_loss", "distilled_mlm_loss",
    "distilled_mlm_total", "itm_loss",
    "mask_tokens", "positive_targets", "sample_hard_negatives",
]
