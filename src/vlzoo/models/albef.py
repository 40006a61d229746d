"""ALBEF: align before fuse (Li et al., 2021).

ViT image encoder; a BERT-style text encoder whose first N blocks are text-only and
whose last M blocks (fusion) cross-attend to image tokens; ITC with a momentum queue
and distillation, ITM with hard negatives, and MLM distilled toward the momentum model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlzoo.backbones import BertTextEncoder, VisionEncoder
from vlzoo.distributed import token_mean
from vlzoo.layers.micro_batches import in_micro_batches
from vlzoo.layers.transformer import LMHead
from vlzoo.losses import distilled_mlm_total, mask_tokens
from vlzoo.models.momentum import MomentumModel, MomentumOutput


class ALBEF(MomentumModel):
    """ALBEF over a vision encoder and a text encoder of ``text_layers + fusion_layers``
    blocks whose last ``fusion_layers`` carry cross-attention.

    Args:
        fusion_layers: M, the number of final blocks that fuse image tokens.
        mask_id, special_ids: tokenizer ids for MLM masking ([MASK]; [CLS]/[SEP]/[PAD]...).
        mlm_probability: fraction of tokens masked (0.15).
        Other arguments as :class:`~vlzoo.models.momentum.MomentumModel`.
    """

    momentum_pairs = MomentumModel.momentum_pairs + (("mlm_head", "mlm_head_m"),)

    def __init__(
        self,
        vision: VisionEncoder,
        text: BertTextEncoder,
        fusion_layers: int,
        mask_id: int,
        special_ids: list[int],
        mlm_probability: float = 0.15,
        **kwargs,
    ):
        depth = len(text.encoder.layer)
        if not 0 < fusion_layers < depth:
            raise ValueError(f"fusion_layers must be in 1..{depth - 1} for a {depth}-layer text encoder")
        super().__init__(vision, text, text_layers=slice(0, depth - fusion_layers), **kwargs)
        self.fusion_slice = slice(depth - fusion_layers, depth)
        self.mlm_head = LMHead(text.config, text.embeddings.word_embeddings)
        self.mask_id, self.special_ids, self.mlm_probability = mask_id, list(special_ids), mlm_probability
        self._make_momentum_copies()
        self.mlm_head_m.decoder.weight = self.text_m.embeddings.word_embeddings.weight  # keep the twin tied

    def fuse(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, text_hidden: Tensor | None = None
    ) -> Tensor:
        return self._fuse(self.text, input_ids, attention_mask, image_tokens, text_hidden)

    def _fuse(self, text, input_ids, attention_mask, image_tokens, text_hidden=None) -> Tensor:
        if text_hidden is None:
            text_hidden = text(input_ids, attention_mask, layers=self.text_layers).tokens
        return text.run_layers(text_hidden, attention_mask, context=image_tokens, layers=self.fusion_slice).tokens

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, index: Tensor, alpha: float = 0.4
    ) -> MomentumOutput:
        """Losses ``itc``, ``itm``, ``mlm`` of a batch: pixel_values (B, 3, H, W),
        input_ids/attention_mask (B, L), index (B,) sample ids (equal ids = same image)."""
        out, image_tokens, image_tokens_m = self.itc_itm(pixel_values, input_ids, attention_mask, index, alpha)
        masked, labels = mask_tokens(input_ids, attention_mask, self.mask_id, self.text.config.vocab_size,
                                     self.special_ids, self.mlm_probability)

        def mlm_total(masked: Tensor, mask: Tensor, labels: Tensor, tokens: Tensor, tokens_m: Tensor
                      ) -> tuple[Tensor, Tensor]:
            logits = self.mlm_head(self.fuse(masked, mask, tokens))
            with torch.no_grad():
                logits_m = self.mlm_head_m(self._fuse(self.text_m, masked, mask, tokens_m))
            return distilled_mlm_total(logits, labels, logits_m, alpha)

        out.losses["mlm"] = token_mean(*in_micro_batches(
            mlm_total, self.micro_batches, masked, attention_mask, labels, image_tokens, image_tokens_m))
        return out
