"""BLIP: multimodal mixture of encoder-decoder (Li et al., 2022).

One BERT-style text model serves three roles: the unimodal encoder ([CLS], ITC), the
image-grounded encoder ([ENC], cross-attention, ITM) and the image-grounded decoder
([DEC], causal self-attention, LM). The decoder shares every parameter with the
encoder except its self-attention (the same module objects, one copy in memory).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlzoo.backbones import BertTextEncoder, VisionEncoder
from vlzoo.distributed import token_mean
from vlzoo.layers.micro_batches import in_micro_batches
from vlzoo.layers.transformer import (
    DecodeCache,
    LMHead,
    TransformerStack,
    causal_padding_mask,
    decode_cached,
    run_by_length,
    share_all_but_self_attention,
)
from vlzoo.losses import IGNORE, caption_lm_total
from vlzoo.models.generation import CachedNextLogits, GenerationConfig, NextTokenLogits, generate
from vlzoo.models.momentum import MomentumModel, MomentumOutput


class BLIP(MomentumModel):
    """BLIP over a vision encoder and a text encoder with cross-attention in every block.

    Args:
        enc_id, dec_id: ids of [ENC] and [DEC], which replace [CLS] for ITM and LM.
        pad_id, eos_id: padding and end-of-text ids.
        prompt_ids: token ids of the captioning prompt ("a picture of "), inserted after
            [DEC] for the LM loss only and never trained on; ITC/ITM see the bare caption.
        label_smoothing: of the LM loss (0.1).
        Other arguments as :class:`~vlzoo.models.momentum.MomentumModel`.
    """

    reuses_text_pass = False  # ITM's [ENC] pass embeds the ids again: its 3B pairs run as one call

    def __init__(
        self,
        vision: VisionEncoder,
        text: BertTextEncoder,
        enc_id: int,
        dec_id: int,
        pad_id: int,
        eos_id: int,
        prompt_ids: list[int] = (),
        label_smoothing: float = 0.1,
        **kwargs,
    ):
        super().__init__(vision, text, **kwargs)
        cross = [b.has_cross_attention for b in text.encoder.layer]
        if not all(cross):
            raise ValueError("BLIP's text encoder needs cross-attention in every layer")
        self.decoder = TransformerStack(text.config, vision.width, range(len(cross)))
        share_all_but_self_attention(self.decoder, text.encoder)
        for dec, enc in zip(self.decoder.layer, text.encoder.layer, strict=True):
            dec.attention.load_state_dict(enc.attention.state_dict())  # start from the encoder's (BERT's) weights
        self.lm_head = LMHead(text.config, text.embeddings.word_embeddings)
        self.enc_id, self.dec_id, self.pad_id, self.eos_id = enc_id, dec_id, pad_id, eos_id
        self.prompt_ids, self.label_smoothing = list(prompt_ids), label_smoothing
        self._make_momentum_copies()

    def fuse(
        self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor, text_hidden: Tensor | None = None
    ) -> Tensor:
        """The image-grounded encoder: [ENC] replaces the first token; ``text_hidden`` is unused."""
        ids = input_ids.clone()
        ids[:, 0] = self.enc_id
        return self.text(ids, attention_mask, context=image_tokens).tokens

    def decoder_logits(self, input_ids: Tensor, attention_mask: Tensor, image_tokens: Tensor) -> Tensor:
        """The image-grounded decoder: (B, L) ids starting with [DEC] -> (B, L, V) logits."""
        def run(h: Tensor, mask: Tensor, context: Tensor | None, _context_mask: None) -> Tensor:
            return self.decoder(h, causal_padding_mask(mask), context)

        x = run_by_length(run, self.text.embeddings(input_ids), attention_mask, image_tokens,
                          buckets=self.text.length_buckets)
        return self.lm_head(x)

    @property
    def prefix_ids(self) -> list[int]:
        """[DEC] + prompt: what every caption starts with, in training and generation."""
        return [self.dec_id, *self.prompt_ids]

    @property
    def prompt_length(self) -> int:
        return len(self.prefix_ids)

    def caption_labels(self, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Captions (B, L) ([CLS] caption [SEP] pad) -> decoder inputs ``[DEC] prompt
        caption [SEP]``, their mask and LM labels (prompt and pad -> -100), each
        (B, <= L + prompt), cut to the text model's position limit."""
        b, limit = input_ids.shape[0], self.text.config.max_position_embeddings
        prefix = torch.tensor(self.prefix_ids, device=input_ids.device).expand(b, -1)
        ids = torch.cat([prefix, input_ids[:, 1:]], dim=1)[:, :limit]
        mask = torch.cat([torch.ones_like(prefix, dtype=attention_mask.dtype), attention_mask[:, 1:]], dim=1)[:, :limit]
        labels = ids.masked_fill(mask == 0, IGNORE)
        labels[:, : self.prompt_length] = IGNORE
        return ids, mask, labels

    def forward(
        self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor, index: Tensor, alpha: float = 0.4
    ) -> MomentumOutput:
        """Losses ``itc``, ``itm``, ``lm``: pixel_values (B, 3, H, W); input_ids (B, L)
        tokenized captions ([CLS] first, no prompt); index (B,)."""
        out, image_tokens, _ = self.itc_itm(pixel_values, input_ids, attention_mask, index, alpha)
        out.losses["lm"] = self.lm_loss(image_tokens, input_ids, attention_mask)
        return out

    def lm_loss(self, image_tokens: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Captioning loss of (B, L) captions (trained after the prompt) given image tokens (B, N, Dv)."""
        ids, mask, labels = self.caption_labels(input_ids, attention_mask)

        def lm_total(ids: Tensor, mask: Tensor, labels: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor]:
            return caption_lm_total(self.decoder_logits(ids, mask, tokens), labels, self.label_smoothing)

        return token_mean(*in_micro_batches(lm_total, self.micro_batches, ids, mask, labels, image_tokens))

    @torch.no_grad()
    def generate(
        self, pixel_values: Tensor, prefix_ids: Tensor | None = None,
        config: GenerationConfig = GenerationConfig(),  # noqa: B008
    ) -> Tensor:
        """Captions for images (B, 3, H, W) after ``prefix_ids`` (B, P) ([DEC] + a prompt;
        default :attr:`prefix_ids`). Returns (B, T) new token ids, right-padded."""
        return self.generate_from_tokens(self.image_tokens_and_feat(pixel_values)[0], prefix_ids, config)

    @torch.no_grad()
    def generate_from_tokens(
        self, image_tokens: Tensor, prefix_ids: Tensor | None = None,
        config: GenerationConfig = GenerationConfig(),  # noqa: B008
    ) -> Tensor:
        """As :meth:`generate`, from image tokens (B, N, Dv) already computed."""
        if prefix_ids is None:
            prefix_ids = torch.tensor(self.prefix_ids, device=image_tokens.device).expand(len(image_tokens), -1)

        return generate(self._next_logits(image_tokens, config.use_cache), prefix_ids, self.eos_id, self.pad_id,
                        config)

    def _next_logits(self, image_tokens: Tensor, use_cache: bool) -> NextTokenLogits:
        """The decoder's next-token logits for captions of image tokens (B, N, Dv)."""
        if not use_cache:
            return lambda ids, rows: self.decoder_logits(ids, torch.ones_like(ids), image_tokens[rows])[:, -1]

        def step(new: Tensor, rows: Tensor, cache: DecodeCache, seen: int) -> Tensor:
            return self.lm_head(decode_cached(self.text.embeddings, self.decoder, new, cache, seen, image_tokens[rows]))

        return CachedNextLogits(step, len(self.decoder.layer))
