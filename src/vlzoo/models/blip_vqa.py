"""BLIP's visual question answering model (Li et al., 2022, section 5.3).

Three parts, no weights shared between the two text models:

- the image encoder (a ViT);
- the question encoder: the image-grounded text encoder (``[ENC]`` replaces the first
  token; cross-attention to the image tokens in every block);
- the answer decoder: a causal BERT-style stack whose cross-attention reads the question
  encoder's outputs, plus an LM head tied to the decoder's word embeddings.

Built from vlzoo's shared block (:class:`~vlzoo.backbones.BertTextEncoder`,
:class:`~vlzoo.layers.transformer.LMHead`); answers are decoded by
:func:`vlzoo.models.generation.generate`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlzoo.backbones import BertTextEncoder, VisionEncoder
from vlzoo.layers.transformer import DecodeCache, LMHead, padding_mask
from vlzoo.models.generation import CachedNextLogits, GenerationConfig, NextTokenLogits, generate


class BLIPVQA(nn.Module):
    """Image encoder, question encoder, answer decoder with LM head.

    Args:
        vision: image encoder; its tokens (B, N, Dv) feed the question encoder.
        question_encoder: BERT-style encoder with cross-attention (width Dv) in every block.
        answer_decoder: BERT-style stack with cross-attention (width Dt, the question
            encoder's) in every block, run causally.
        enc_id: [ENC], which replaces the question's first token.
        dec_id: [DEC], the first token of every answer.
        pad_id, eos_id: padding and end-of-answer ids.
    """

    def __init__(
        self,
        vision: VisionEncoder,
        question_encoder: BertTextEncoder,
        answer_decoder: BertTextEncoder,
        enc_id: int,
        dec_id: int,
        pad_id: int,
        eos_id: int,
    ):
        super().__init__()
        _check_cross_attention(question_encoder, "question encoder")
        _check_cross_attention(answer_decoder, "answer decoder")
        self.vision = vision
        self.text = question_encoder
        self.answer_decoder = answer_decoder
        self.lm_head = LMHead(answer_decoder.config, answer_decoder.embeddings.word_embeddings)
        self.enc_id, self.dec_id, self.pad_id, self.eos_id = enc_id, dec_id, pad_id, eos_id

    def encode_question(self, pixel_values: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """Images (B, 3, H, W) and questions (B, Lq) -> question states (B, Lq, Dt);
        ``[ENC]`` replaces each question's first token."""
        return self.question_states(self.vision(pixel_values).tokens, question_ids, question_mask)

    def question_states(self, image_tokens: Tensor, question_ids: Tensor, question_mask: Tensor) -> Tensor:
        """As :meth:`encode_question`, from image tokens (B, N, Dv) already computed."""
        ids = question_ids.clone()
        ids[:, 0] = self.enc_id
        return self.text(ids, question_mask, context=image_tokens).tokens

    def decode(self, answer_ids: Tensor, answer_mask: Tensor, question_states: Tensor, question_mask: Tensor
               ) -> Tensor:
        """Answers (B, La) starting with [DEC] -> (B, La, V) next-token logits, reading
        question states (B, Lq, Dt) where ``question_mask`` (B, Lq) is 1."""
        hidden = self.answer_decoder(answer_ids, answer_mask, context=question_states,
                                     context_mask=padding_mask(question_mask), causal=True).tokens
        return self.lm_head(hidden)

    def answer_logits(
        self, pixel_values: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
        answer_mask: Tensor,
    ) -> Tensor:
        """(B, La, V) logits of answers (B, La) ([DEC] first) to questions (B, Lq) about
        images (B, 3, H, W); position t predicts answer token t + 1."""
        states = self.encode_question(pixel_values, question_ids, question_mask)
        return self.decode(answer_ids, answer_mask, states, question_mask)

    @torch.no_grad()
    def answer(
        self, pixel_values: Tensor, question_ids: Tensor, question_mask: Tensor,
        config: GenerationConfig = GenerationConfig(),  # noqa: B008
    ) -> Tensor:
        """Answer ids (B, T) generated after [DEC], each row ending at its EOS and
        right-padded with ``pad_id``. The decoder never attends to question padding."""
        return self.answer_from_tokens(self.vision(pixel_values).tokens, question_ids, question_mask, config)

    @torch.no_grad()
    def answer_from_tokens(
        self, image_tokens: Tensor, question_ids: Tensor, question_mask: Tensor,
        config: GenerationConfig = GenerationConfig(),  # noqa: B008
    ) -> Tensor:
        """As :meth:`answer`, from image tokens (B, N, Dv) already computed."""
        states = self.question_states(image_tokens, question_ids, question_mask)
        prefix = torch.full((len(states), 1), self.dec_id, dtype=torch.long, device=states.device)

        return generate(self._next_logits(states, question_mask, config.use_cache), prefix, self.eos_id,
                        self.pad_id, config)

    def _next_logits(self, states: Tensor, question_mask: Tensor, use_cache: bool) -> NextTokenLogits:
        """The answer decoder's next-token logits, reading question states (B, Lq, Dt)."""
        if not use_cache:
            return lambda ids, rows: self.decode(ids, torch.ones_like(ids), states[rows], question_mask[rows])[:, -1]

        def step(new: Tensor, rows: Tensor, cache: DecodeCache, seen: int) -> Tensor:
            hidden = self.answer_decoder.decode_step(new, cache, seen, states[rows], padding_mask(question_mask[rows]))
            return self.lm_head(hidden)

        return CachedNextLogits(step, len(self.answer_decoder.encoder.layer))

    @torch.no_grad()
    def rank_answers(
        self, image_tokens: Tensor, question_ids: Tensor, question_mask: Tensor, answer_ids: Tensor,
        answer_mask: Tensor, k: int = 128, label_smoothing: float = 0.1, chunk: int = 512,
    ) -> Tensor:
        """(B,) index into the answer list of each question's answer, as BLIP's ``rank_answer``.

        image_tokens (B, N, Dv); questions (B, Lq); the answer list (A, La), each answer
        tokenised with its end token ([DEC] replaces the first token). The ``k`` answers
        whose first token is likeliest are rescored by the sum over their tokens of the
        decoder's cross-entropy with ``label_smoothing`` (BLIP's decoder loss, 0.1, which
        its ranking keeps); the lowest wins. Candidates are decoded ``chunk`` at a time (the
        logits of B k answers over the vocabulary would not fit at once).
        """
        states = self.question_states(image_tokens, question_ids, question_mask)  # (B, Lq, Dt)
        answers = answer_ids.clone()
        answers[:, 0] = self.dec_id
        n_questions, k = len(states), min(k, len(answers))
        start = answers[:1, :1].expand(n_questions, 1)
        first = self.decode(start, torch.ones_like(start), states, question_mask)[:, 0].softmax(-1)  # (B, V)
        top = first[:, answers[:, 1]].topk(k, dim=1).indices  # (B, k) candidate answers
        cand_ids, cand_mask = answers[top].flatten(0, 1), answer_mask[top].flatten(0, 1)  # (B k, La)
        owner = torch.arange(n_questions, device=states.device).repeat_interleave(k)  # (B k,) its question
        nll = torch.cat([self._answer_nll(cand_ids[s : s + chunk], cand_mask[s : s + chunk],
                                          states[owner[s : s + chunk]], question_mask[owner[s : s + chunk]],
                                          label_smoothing)
                         for s in range(0, len(cand_ids), chunk)])  # (B k,)
        best = nll.view(n_questions, k).argmin(1)
        return top.gather(1, best[:, None]).squeeze(1)

    def _answer_nll(self, ids: Tensor, mask: Tensor, states: Tensor, question_mask: Tensor, label_smoothing: float
                    ) -> Tensor:
        """(C,) summed smoothed cross-entropy of answers (C, La) after [DEC] given question states."""
        logits = self.decode(ids, mask, states, question_mask)  # (C, La, V)
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
        return F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), targets, ignore_index=-100,
                               label_smoothing=label_smoothing, reduction="none").sum(1)


def _check_cross_attention(encoder: BertTextEncoder, what: str) -> None:
    if not all(block.has_cross_attention for block in encoder.encoder.layer):
        raise ValueError(f"BLIP VQA's {what} needs cross-attention in every layer")
