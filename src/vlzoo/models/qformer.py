"""The BLIP-2 Q-Former on vlzoo's shared transformer block.

Learned queries and text share the self-attention of one BERT-style stack; every
``cross_attention_every``-th block (0, 2, 4, ...) lets the queries (only) attend to
the frozen image tokens; queries have a feed-forward of their own (``*_query``).
Which of queries and text see each other is the task's mask
(:func:`~vlzoo.layers.transformer.qformer_mask`): ``unimodal`` (ITC),
``bidirectional`` (ITM) or ``causal`` (ITG, [DEC] first).
Parameter names follow BERT/LAVIS (``embeddings.*``, ``encoder.layer.{i}.*``,
``query_tokens``), so a BERT checkpoint initialises it (:meth:`QFormer.from_bert`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlzoo.backbones.text import bert_config_from_json, bert_state_dict, check_length_buckets
from vlzoo.layers.transformer import (
    BertConfig,
    BertEmbeddings,
    DecodeCache,
    TransformerStack,
    decode_cached,
    init_bert_weights,
    padding_mask,
    qformer_mask,
    run_by_length,
)
from vlzoo.weights import load_strict


@dataclass
class QFormerOutput:
    """queries: (B, Q, D) query outputs or None; text: (B, L, D) text outputs or None."""

    queries: Tensor | None
    text: Tensor | None


def in_float32(method: Callable) -> Callable:
    """Run a module method in float32 even under autocast (bf16/fp16 mixed precision):
    autocast off inside, floating tensor arguments cast to float32. BLIP-2 keeps its
    Q-Former in fp32 (an fp16 Q-Former overflows) while the rest may run in bf16."""

    @functools.wraps(method)
    def wrapper(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        device = next(self.parameters()).device.type
        if not torch.is_autocast_enabled(device):
            return method(self, *args, **kwargs)
        cast = [a.float() if isinstance(a, Tensor) and a.is_floating_point() else a for a in args]
        named = {k: v.float() if isinstance(v, Tensor) and v.is_floating_point() else v for k, v in kwargs.items()}
        with torch.autocast(device, enabled=False):
            return method(self, *cast, **named)

    return wrapper


class QFormer(nn.Module):
    """Args:
    config: sizes of the BERT-style stack.
    vision_width: width of the image tokens the queries cross-attend to.
    num_queries: Q learned queries (32 in BLIP-2).
    cross_attention_every: blocks 0, k, 2k, ... carry cross-attention (BLIP-2: k = 2).
    length_buckets: text passes run rows grouped by text length (:func:`run_by_length`).
    """

    def __init__(self, config: BertConfig, vision_width: int, num_queries: int = 32, cross_attention_every: int = 2,
                 length_buckets: int = 1):
        super().__init__()
        self.length_buckets = check_length_buckets(length_buckets)
        if num_queries < 1 or cross_attention_every < 1:
            raise ValueError(f"num_queries ({num_queries}) and cross_attention_every ({cross_attention_every}) "
                             "must be >= 1")
        self.config = config
        self.num_queries = num_queries
        self.embeddings = BertEmbeddings(config)
        cross = range(0, config.num_hidden_layers, cross_attention_every)
        self.encoder = TransformerStack(config, vision_width, cross, query_ffn=True)
        self.query_tokens = nn.Parameter(torch.zeros(1, num_queries, config.hidden_size))
        self.apply(partial(init_bert_weights, std=config.initializer_range))
        nn.init.normal_(self.query_tokens, std=config.initializer_range)

    @property
    def width(self) -> int:
        return self.config.hidden_size

    @in_float32
    def forward(
        self,
        image_tokens: Tensor | None = None,
        input_ids: Tensor | None = None,
        attention_mask: Tensor | None = None,
        mask_kind: str = "unimodal",
    ) -> QFormerOutput:
        """image_tokens (B, N, Dv) -> query outputs; input_ids/attention_mask (B, L) ->
        text outputs; both -> one joint pass under ``mask_kind``."""
        if input_ids is not None and attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if image_tokens is None:
            if input_ids is None:
                raise ValueError("QFormer needs image tokens, text, or both")
            x = run_by_length(lambda h, m, _c, _cm: self.encoder(h, padding_mask(m)), self.embeddings(input_ids),
                              attention_mask, buckets=self.length_buckets)
            return QFormerOutput(None, x)
        queries = self.query_tokens.expand(image_tokens.shape[0], -1, -1)
        q = self.num_queries
        if input_ids is None:
            x = self.encoder(self.embeddings(None, prefix=queries), None, image_tokens, query_length=q)
            return QFormerOutput(x, None)
        x = self.embeddings(input_ids, prefix=queries)

        def run(h: Tensor, keys: Tensor | None, context: Tensor | None, _context_mask: None) -> Tensor:
            if keys is None and mask_kind == "bidirectional":  # no padding: every position sees every other
                return self.encoder(h, None, context, query_length=q)
            text = keys[:, q:] if keys is not None else h.new_ones(h.shape[0], h.shape[1] - q, dtype=torch.long)
            return self.encoder(h, qformer_mask(q, text, mask_kind), context, query_length=q)

        keys = torch.cat([attention_mask.new_ones(attention_mask.shape[0], q), attention_mask], dim=1)  # (B, Q + L)
        x = run_by_length(run, x, keys, image_tokens, buckets=self.length_buckets)
        return QFormerOutput(x[:, :q], x[:, q:])

    @in_float32
    def decode_step(self, image_tokens: Tensor, input_ids: Tensor, cache: DecodeCache, seen: int) -> Tensor:
        """ITG decoding with a key/value cache: text ids (R, t) after the ``seen`` text tokens
        ``cache`` holds -> text states (R, t, D). The first call (``seen`` 0) runs the queries
        over image tokens (R, N, Dv) too, under the causal mask; later calls run the new
        tokens alone, reading the queries' and earlier tokens' cached keys (queries never
        read text, so theirs do not change)."""
        q = self.num_queries
        if seen == 0:
            queries = self.query_tokens.expand(input_ids.shape[0], -1, -1)
            mask = qformer_mask(q, torch.ones_like(input_ids), "causal")
            x = self.encoder(self.embeddings(input_ids, prefix=queries), mask, image_tokens, query_length=q,
                             cache=cache)
            return x[:, q:]
        return decode_cached(self.embeddings, self.encoder, input_ids, cache, seen, keys_before=q)

    def text_only_parameters(self) -> list[nn.Parameter]:
        """What only text reads: token embeddings and the text feed-forward of every
        block (queries have their own). Unused when the Q-Former reads queries alone."""
        e = self.embeddings
        params = [*e.word_embeddings.parameters(), *e.position_embeddings.parameters()]
        if e.token_type_embeddings is not None:
            params += list(e.token_type_embeddings.parameters())
        for block in self.encoder.layer:
            params += [*block.intermediate.parameters(), *block.output.parameters()]
        return params

    def no_weight_decay(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.ndim <= 1 or "embeddings" in n or n == "query_tokens"}

    @classmethod
    def from_bert(cls, directory: str | Path, vision_width: int, num_queries: int = 32,
                  cross_attention_every: int = 2, length_buckets: int = 1) -> QFormer:
        """A Q-Former initialised from a Hugging Face BERT directory, strictly: every BERT
        weight is used; the queries' feed-forward starts as a copy of the text's; the
        cross-attention and queries stay random (as in BLIP-2)."""
        directory = Path(directory)
        qformer = cls(bert_config_from_json(directory / "config.json"), vision_width, num_queries,
                      cross_attention_every, length_buckets)
        state = bert_state_dict(directory)
        for key in list(state):
            for part in (".intermediate.", ".output."):
                if part in key and "attention" not in key:
                    state[key.replace(part, part.rstrip(".") + "_query.")] = state[key].clone()
        load_strict(qformer, state, source=str(directory), allow_missing=("crossattention.", "query_tokens"))
        return qformer
