"""Text encoders: open_clip's causal text transformer, and BERT on the shared block."""

from __future__ import annotations

from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlzoo.backbones.base import EncoderOutput, TextEncoder
from vlzoo.backbones.vision import _open_clip_tower_cfg, open_clip_tower
from vlzoo.layers.transformer import (
    BertConfig,
    BertEmbeddings,
    DecodeCache,
    TransformerStack,
    causal_padding_mask,
    decode_cached,
    init_bert_weights,
    padding_mask,
    run_by_length,
)
from vlzoo.utils import read_json_file
from vlzoo.weights import hf_weights, load_strict

OPEN_CLIP_PAD_ID = 0  # open_clip's tokenizer pads with id 0
OPEN_CLIP_TEXT_POOLING = ("argmax", "first", "last")


def last_token_index(input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(B,) index of each row's end-of-text token: the last attended position.

    Without a mask, the argmax id (open_clip's convention: EOT has the highest id).
    """
    if attention_mask is None:
        return input_ids.argmax(dim=-1)
    return attention_mask.sum(dim=-1).clamp(min=1) - 1


class OpenCLIPTextEncoder(TextEncoder):
    """open_clip's ``TextTransformer`` (causal), pooled as its ``pool_type`` says:
    ``argmax`` (the end-of-text token, open_clip's default), ``first`` or ``last``.

    ``pooled`` is projected to ``embed_dim`` by the tower's own ``text_projection``.
    """

    pooled_is_projected = True

    def __init__(
        self,
        embed_dim: int,
        vocab_size: int,
        context_length: int = 77,
        name: str | None = None,
        quick_gelu: bool = False,
        length_buckets: int = 1,
        **overrides: Any,
    ):
        super().__init__()
        self.length_buckets = check_length_buckets(length_buckets)
        cfg = _open_clip_tower_cfg(name, "text_cfg")
        cfg.update(overrides, vocab_size=vocab_size, context_length=context_length)
        _check_text_cfg(cfg)
        self.tower = open_clip_tower("text", embed_dim, cfg, quick_gelu)
        if getattr(self.tower, "cls_emb", None) is not None:
            raise ValueError("open_clip text towers with embed_cls (CoCa) are not supported")
        self.width = self.tower.width
        self.pooled_width = embed_dim
        self.context_length = context_length
        self.pool_type = self.tower.pool_type

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> EncoderOutput:
        """(B, L) ids, L <= context_length -> tokens (B, L, width), pooled (B, E)."""
        t = self.tower
        length = input_ids.shape[1]
        if length > self.context_length:
            raise ValueError(f"text of {length} tokens exceeds context_length {self.context_length}")
        if self._needs_full_context:  # open_clip's result depends on the padding after the text
            input_ids = torch.nn.functional.pad(input_ids, (0, self.context_length - length), value=OPEN_CLIP_PAD_ID)
        n = input_ids.shape[1]  # open_clip's own forward needs the full context; this runs the batch's length
        x = t.token_embedding(input_ids) + t.positional_embedding[:n]

        def run(h: Tensor, _mask: Tensor | None = None, _context: None = None, _context_mask: None = None) -> Tensor:
            k = h.shape[1]  # causal: a text's positions never see the padding after it
            return t.ln_final(t.transformer(h, attn_mask=t.attn_mask[:k, :k] if t.attn_mask is not None else None))

        if attention_mask is None or self._needs_full_context:
            x = run(x)
        else:
            x = run_by_length(run, x, attention_mask, buckets=self.length_buckets)
        pooled = self._pool(x, input_ids, attention_mask)
        if isinstance(t.text_projection, torch.nn.Linear):
            pooled = t.text_projection(pooled)
        elif t.text_projection is not None:
            pooled = pooled @ t.text_projection
        return EncoderOutput(x[:, :length], pooled)

    @property
    def _needs_full_context(self) -> bool:
        """Whether the tower must see the text padded to ``context_length`` as open_clip
        does: pooling the last position, or attention without a causal mask."""
        return self.pool_type == "last" or self.tower.attn_mask is None

    def _pool(self, x: Tensor, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
        """(B, L, W) -> (B, W) as open_clip's ``text_global_pool`` (``argmax``: the
        end-of-text token, found from the mask when there is one)."""
        if self.pool_type == "first":
            return x[:, 0]
        if self.pool_type == "last":
            return x[:, -1]
        return x[torch.arange(x.shape[0], device=x.device), last_token_index(input_ids, attention_mask)]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.tower.set_grad_checkpointing(enable)


def _check_text_cfg(cfg: dict[str, Any]) -> None:
    """Reject open_clip text-tower options this encoder would not reproduce."""
    for field_name in ("hf_model_name", "hf_tokenizer_name"):  # a Hugging Face tower or tokenizer (SigLIP, ...)
        if cfg.get(field_name):
            raise ValueError(f"open_clip text towers with a Hugging Face model or tokenizer (text_cfg.{field_name}="
                             f"{cfg[field_name]!r}) are not supported")
    pool_type = cfg.get("pool_type", "argmax")
    if pool_type not in OPEN_CLIP_TEXT_POOLING:
        raise ValueError(f"open_clip text_cfg.pool_type {pool_type!r} is not supported "
                         f"(expected one of {OPEN_CLIP_TEXT_POOLING})")


BERT_POOLING = ("cls", "mean")


def check_length_buckets(buckets: int) -> int:
    if not isinstance(buckets, int) or buckets < 1:
        raise ValueError(f"text.length_buckets must be a positive integer (1: one padded call), got {buckets!r}")
    return buckets


def pool_tokens(tokens: Tensor, attention_mask: Tensor, pooling: str) -> Tensor:
    """(B, L, D) -> (B, D): the first ([CLS]) token, or the mean over attended tokens."""
    if pooling == "cls":
        return tokens[:, 0]
    weights = attention_mask.to(tokens.dtype)[..., None]  # (B, L, 1)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class BertTextEncoder(TextEncoder):
    """A BERT-style encoder on vlzoo's shared block; pooled = the [CLS] token
    (``pooling="cls"``, BERT's and the papers' choice) or the mean of the attended
    tokens (``"mean"``: from scratch at tiny sizes it learns far faster, see the
    shapes-tiny configs).

    Keys match Hugging Face ``BertModel`` (``embeddings.*``, ``encoder.layer.{i}.*``).
    Layers listed in ``cross_attention_layers`` attend to image tokens when a
    ``context`` is passed (fusion); without one they run text-only.
    """

    def __init__(
        self,
        config: BertConfig,
        cross_attention_width: int | None = None,
        cross_attention_layers: tuple[int, ...] = (),
        pooling: str = "cls",
        length_buckets: int = 1,
    ):
        super().__init__()
        if pooling not in BERT_POOLING:
            raise ValueError(f"text.pooling must be one of {BERT_POOLING} for a BERT-style encoder, got {pooling!r}")
        self.pooling = pooling
        self.length_buckets = check_length_buckets(length_buckets)
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = TransformerStack(config, cross_attention_width, cross_attention_layers)
        self.width = self.pooled_width = config.hidden_size
        self.apply(partial(init_bert_weights, std=config.initializer_range))

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        layers: slice = slice(None),
        causal: bool = False,
    ) -> EncoderOutput:
        """(B, L) ids -> tokens (B, L, D), pooled (B, D) (see ``pooling``).

        context: (B, N, Dc) image tokens for the cross-attention layers (None: text
        only); layers: which blocks to run (ALBEF's text part is ``slice(0, N)``);
        causal: causal self-attention (a decoder)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.run_layers(self.embeddings(input_ids), attention_mask, context, context_mask, layers, causal)

    def run_layers(
        self,
        hidden: Tensor,
        attention_mask: Tensor,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        layers: slice = slice(None),
        causal: bool = False,
    ) -> EncoderOutput:
        """Run blocks ``layers`` on hidden states (B, L, D) (e.g. ALBEF's fusion layers),
        the rows grouped by length (``length_buckets``, :func:`run_by_length`)."""

        def run(h: Tensor, m: Tensor, c: Tensor | None, cm: Tensor | None) -> Tensor:
            return self.encoder(h, causal_padding_mask(m) if causal else padding_mask(m), c, cm, layers)

        x = run_by_length(run, hidden, attention_mask, context, context_mask, self.length_buckets)
        return EncoderOutput(x, pool_tokens(x, attention_mask, self.pooling))

    def decode_step(
        self, input_ids: Tensor, cache: DecodeCache, seen: int, context: Tensor | None = None,
        context_mask: Tensor | None = None,
    ) -> Tensor:
        """Causal decoding with a key/value cache: ids (R, t) at positions ``seen`` ... after
        the ``seen`` tokens ``cache`` holds (all real) -> hidden states (R, t, D)."""
        return decode_cached(self.embeddings, self.encoder, input_ids, cache, seen, context, context_mask)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.grad_checkpointing = enable

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> BertTextEncoder:
        """Build from a Hugging Face BERT directory (``config.json`` + weights), strictly."""
        directory = Path(directory)
        config = bert_config_from_json(directory / "config.json")
        encoder = cls(config, **kwargs)
        load_strict(encoder, bert_state_dict(directory), source=str(directory), allow_missing=("crossattention.",))
        return encoder


def bert_state_dict(directory: str | Path) -> dict[str, Tensor]:
    """The encoder weights of a Hugging Face BERT directory, keys as ``BertModel``'s
    (``bert.`` prefix dropped; pooler, MLM head and position-id buffer left out)."""
    state = hf_weights(directory)
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    ignored = ("pooler.", "embeddings.position_ids", "cls.")
    return {k: v for k, v in state.items() if not k.startswith(ignored)}


def bert_config_from_json(path: str | Path) -> BertConfig:
    """Read the BertConfig fields of a Hugging Face ``config.json``."""
    raw = read_json_file(path, "a BERT config object")
    names = {f.name for f in fields(BertConfig)}
    return BertConfig(**{k: v for k, v in raw.items() if k in names})


def resize_token_embeddings(encoder: BertTextEncoder, vocab_size: int) -> None:
    """Grow (or shrink) the word embeddings to ``vocab_size`` rows; new rows are
    initialised like the rest (normal, std ``initializer_range``). Used when a tokenizer
    adds [DEC]/[ENC]."""
    old = encoder.embeddings.word_embeddings
    if old.num_embeddings == vocab_size:
        return
    new = torch.nn.Embedding(vocab_size, old.embedding_dim, padding_idx=old.padding_idx)
    torch.nn.init.normal_(new.weight, std=encoder.config.initializer_range)
    keep = min(vocab_size, old.num_embeddings)
    with torch.no_grad():
        new.weight[:keep] = old.weight[:keep]
    encoder.embeddings.word_embeddings = new
    encoder.config.vocab_size = vocab_size
