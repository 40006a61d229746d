"""Losses, separate from models: pure functions or small modules."""

from vlzoo.losses.contrastive import clip_loss, siglip_loss

__all__ = ["clip_loss", "siglip_loss"]
