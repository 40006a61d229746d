"""Shared vision and text backbones, chosen by ``impl`` name in a config."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields

from vlzoo.backbones.base import EncoderOutput, TextEncoder, VisionEncoder
from vlzoo.backbones.text import BertTextEncoder, OpenCLIPTextEncoder, resize_token_embeddings
from vlzoo.backbones.vision import OpenCLIPVisionEncoder, TimmVisionEncoder
from vlzoo.config import TextConfig, VisionConfig
from vlzoo.data.tokenizers import Tokenizer
from vlzoo.layers.transformer import BertConfig

VISION_IMPLS = ("timm", "open_clip", "vlzoo")
TEXT_IMPLS = ("open_clip", "bert")


def build_vision_encoder(cfg: VisionConfig, embed_dim: int) -> VisionEncoder:
    """A vision encoder from its config; ``embed_dim`` sizes open_clip's own projection.
    impl ``vlzoo`` (a tower of a vlzoo checkpoint) is a reference that
    :func:`vlzoo.artefacts.resolve_vision` resolves first, above the builders."""
    if cfg.impl == "vlzoo":
        raise ValueError(f"vision: impl 'vlzoo' ({cfg.name}) is a reference to another checkpoint's tower; "
                         "resolve it first with vlzoo.artefacts.resolve_vision (the tasks, vlzoo fit and "
                         "vlzoo.load do)")
    common = dict(image_size=cfg.image_size, output_layer=cfg.output_layer, patch_dropout=cfg.patch_dropout)
    if cfg.impl == "timm":
        if not cfg.name:
            raise ValueError("vision.name: a timm model name is required for impl 'timm'")
        encoder = TimmVisionEncoder(cfg.name, **common, **cfg.kwargs)
    elif cfg.impl == "open_clip":
        encoder = OpenCLIPVisionEncoder(embed_dim, cfg.name, **common, **cfg.kwargs)
    else:
        raise ValueError(f"vision.impl must be one of {VISION_IMPLS}, got {cfg.impl!r}")
    _apply_common(encoder, cfg.grad_checkpointing, cfg.locked)
    return encoder


def build_text_encoder(
    cfg: TextConfig,
    embed_dim: int,
    tokenizer: Tokenizer,
    cross_attention_width: int | None = None,
    cross_attention_layers: Sequence[int] = (),
) -> TextEncoder:
    """A text encoder from its config; the vocabulary size defaults to the tokenizer's.

    ``cross_attention_width``/``cross_attention_layers`` (BERT only) add cross-attention
    to image tokens of that width in those blocks (ALBEF fusion, BLIP, Q-Former).
    """
    if cfg.impl == "open_clip":
        if cfg.pooling not in (None, "eot"):
            raise ValueError(f"text.pooling: open_clip's text tower pools its end-of-text token, got {cfg.pooling!r}")
        if cross_attention_layers:
            raise ValueError("text.impl 'open_clip' has no cross-attention; use impl 'bert'")
        kwargs = dict(cfg.kwargs)
        vocab = kwargs.pop("vocab_size", tokenizer.vocab_size)
        encoder = OpenCLIPTextEncoder(embed_dim, vocab, cfg.context_length, cfg.name,
                                      length_buckets=cfg.length_buckets, **kwargs)
    elif cfg.impl == "bert":
        cross = dict(cross_attention_width=cross_attention_width, cross_attention_layers=tuple(cross_attention_layers),
                     pooling=cfg.pooling or "cls", length_buckets=cfg.length_buckets)
        if cfg.pretrained:
            encoder = BertTextEncoder.from_pretrained(cfg.pretrained, **cross)
            if tokenizer.vocab_size > encoder.config.vocab_size:  # e.g. BLIP's [DEC]/[ENC]
                resize_token_embeddings(encoder, tokenizer.vocab_size)
        else:
            encoder = BertTextEncoder(bert_config_from_kwargs(cfg, tokenizer), **cross)
        check_context_length(cfg, encoder.config)
    else:
        raise ValueError(f"text.impl must be one of {TEXT_IMPLS}, got {cfg.impl!r}")
    _apply_common(encoder, cfg.grad_checkpointing, cfg.locked)
    return encoder


def bert_config_from_kwargs(cfg: TextConfig, tokenizer: Tokenizer, where: str = "text") -> BertConfig:
    """A BERT-style stack sized by ``cfg.kwargs`` (BertConfig fields; an unknown one is an
    error naming ``where``), with the tokenizer's vocabulary and padding id by default."""
    unknown = set(cfg.kwargs) - {f.name for f in fields(BertConfig)}
    if unknown:
        raise ValueError(f"{where}.kwargs: unknown BertConfig fields {sorted(unknown)}")
    return BertConfig(**{"vocab_size": tokenizer.vocab_size, "pad_token_id": tokenizer.info.pad_id, **cfg.kwargs})


def check_context_length(cfg: TextConfig, config: BertConfig, where: str = "text") -> None:
    """A clear error when ``cfg.context_length`` exceeds the stack's position embeddings."""
    if cfg.context_length > config.max_position_embeddings:
        raise ValueError(f"{where}.context_length {cfg.context_length} exceeds the encoder's "
                         f"max_position_embeddings {config.max_position_embeddings}")


def _apply_common(encoder, grad_checkpointing: bool, locked: bool) -> None:
    if grad_checkpointing:
        encoder.set_grad_checkpointing(True)
    if locked:
        encoder.lock()


__all__ = [
    "EncoderOutput", "VisionEncoder", "TextEncoder", "TimmVisionEncoder", "OpenCLIPVisionEncoder",
    "OpenCLIPTextEncoder", "BertTextEncoder", "build_vision_encoder", "build_text_encoder",
    "bert_config_from_kwargs", "check_context_length",
]
