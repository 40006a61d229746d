"""The interface every vision and text backbone honours."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn


@dataclass
class EncoderOutput:
    """``tokens``: (B, N, width), all tokens incl. prefix/[CLS]; ``pooled``: (B, pooled_width)."""

    tokens: Tensor
    pooled: Tensor


class Encoder(nn.Module):
    """Common methods of vision and text encoders.

    Attributes:
        width: channel width of ``tokens``.
        pooled_width: width of ``pooled``.
        pooled_is_projected: True when ``pooled`` already went through the tower's own
            projection (open_clip towers), so a model needs no projection of its own.
    """

    width: int
    pooled_width: int
    pooled_is_projected: bool = False

    def lock(self) -> None:
        """Freeze every parameter (no gradients) and keep the module in eval mode."""
        for p in self.parameters():
            p.requires_grad_(False)
        self._locked = True
        self.eval()

    @property
    def locked(self) -> bool:
        return getattr(self, "_locked", False)

    def train(self, mode: bool = True) -> Encoder:
        return super().train(mode and not self.locked)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names (relative to this module) of parameters that take no weight decay."""
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or "embed" in n}


class VisionEncoder(Encoder):
    """Images (B, 3, H, W) -> :class:`EncoderOutput`.

    ``output_layer`` picks the block whose output are the tokens: -1 the last (with the
    final norm), -2 the penultimate (no final norm; ``pooled`` is then its first
    token). ``patch_dropout`` drops that fraction of patch tokens while training (FLIP).
    """

    image_size: int
    output_layer: int = -1

    def forward(self, pixel_values: Tensor) -> EncoderOutput:
        raise NotImplementedError


class TextEncoder(Encoder):
    """Token ids (B, L) and attention mask (B, L) -> :class:`EncoderOutput`."""

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        raise NotImplementedError


def resolve_layer(output_layer: int, depth: int) -> int:
    """Number of blocks to run for ``output_layer`` (negative counts from the end)."""
    n = depth + 1 + output_layer if output_layer < 0 else output_layer + 1
    if not 1 <= n <= depth:
        raise ValueError(f"output_layer {output_layer} is outside a {depth}-block encoder")
    return n
