"""CLIP: an image tower and a text tower projected into one normalised space."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones import TextEncoder, VisionEncoder
from vlzoo.layers.micro_batches import in_micro_batches


@dataclass
class CLIPOutput:
    """image_embeds (B, D) and text_embeds (B, D), L2-normalised; scalar logit_scale = exp(t)."""

    image_embeds: Tensor
    text_embeds: Tensor
    logit_scale: Tensor
    logit_bias: Tensor | None = None


def _projection(encoder: VisionEncoder | TextEncoder, embed_dim: int) -> nn.Module:
    if encoder.pooled_is_projected:
        if encoder.pooled_width != embed_dim:
            raise ValueError(f"{type(encoder).__name__} projects to {encoder.pooled_width}, not {embed_dim}")
        return nn.Identity()
    return nn.Linear(encoder.pooled_width, embed_dim, bias=False)


class CLIP(nn.Module):
    """Contrastive image-text model built from a vision and a text encoder.

    ``logit_scale`` holds t (the log of the inverse temperature); the logits use
    exp(t), which the training task clamps at ``max_logit_scale`` after each step.
    ``micro_batches``: :meth:`forward` encodes the batch in that many feature-cached
    micro-batches (:mod:`vlzoo.layers.micro_batches`).
    """

    micro_batches: int = 1

    def __init__(
        self,
        vision: VisionEncoder,
        text: TextEncoder,
        embed_dim: int,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        init_logit_bias: float | None = None,
    ):
        super().__init__()
        self.vision = vision
        self.text = text
        self.embed_dim = embed_dim
        self.image_projection = _projection(vision, embed_dim)
        self.text_projection = _projection(text, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.logit_bias = nn.Parameter(torch.tensor(float(init_logit_bias))) if init_logit_bias is not None else None
        self.max_logit_scale = max_logit_scale

    def encode_image(self, pixel_values: Tensor, normalize: bool = True) -> Tensor:
        """(B, 3, H, W) -> (B, D)."""
        x = self.image_projection(self.vision(pixel_values).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor | None = None, normalize: bool = True) -> Tensor:
        """(B, L) -> (B, D)."""
        x = self.text_projection(self.text(input_ids, attention_mask).pooled)
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> CLIPOutput:
        return CLIPOutput(
            in_micro_batches(self.encode_image, self.micro_batches, pixel_values),
            in_micro_batches(self.encode_text, self.micro_batches, input_ids, attention_mask),
            self.logit_scale.exp(),
            self.logit_bias,
        )

    @torch.no_grad()
    def clamp_logit_scale(self) -> None:
        """Keep exp(t) within [1, max_logit_scale] (call after each optimizer step)."""
        self.logit_scale.clamp_(0.0, math.log(self.max_logit_scale))

    def no_weight_decay(self) -> set[str]:
        names = {"logit_scale", "logit_bias"}
        names |= {f"vision.{n}" for n in self.vision.no_weight_decay()}
        names |= {f"text.{n}" for n in self.text.no_weight_decay()}
        return names


class CLIPClassifier(nn.Module):
    """A CLIP (same parameter names) plus ``head``: (B, D) normalised image embeddings
    -> (B, C) class logits."""

    encode_image = CLIP.encode_image
    encode_text = CLIP.encode_text
    no_weight_decay = CLIP.no_weight_decay

    def __init__(self, clip: CLIP, num_classes: int):
        super().__init__()
        self.vision, self.text = clip.vision, clip.text
        self.image_projection, self.text_projection = clip.image_projection, clip.text_projection
        self.logit_scale = clip.logit_scale
        if clip.logit_bias is not None:
            self.logit_bias = clip.logit_bias
        self.embed_dim = clip.embed_dim
        self.head = nn.Linear(clip.embed_dim, num_classes)

    def forward(self, pixel_values: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, C) logits."""
        return self.head(self.encode_image(pixel_values))

    @torch.no_grad()
    def set_zeroshot_head(self, class_embeds: Tensor) -> None:
        """Head = the zero-shot classifier: weights ``exp(logit_scale) * class_embeds``
        ((C, D), normalised), bias 0."""
        self.head.weight.copy_(self.logit_scale.exp() * class_embeds)
        self.head.bias.zero_()
