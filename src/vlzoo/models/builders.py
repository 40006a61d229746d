"""Pure builders: a family's model config (every reference already resolved, see
:mod:`vlzoo.artefacts`) -> its ``nn.Module`` and tokenizer, randomly initialised or with
the pretrained text weights a config names. No training, no network, no subprocess."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from vlzoo.backbones import (
    BertTextEncoder,
    bert_config_from_kwargs,
    build_text_encoder,
    build_vision_encoder,
    check_context_length,
)
from vlzoo.backbones.text import bert_config_from_json, resize_token_embeddings
from vlzoo.config import (
    ALBEFConfig,
    BLIP2Config,
    BLIP2LLMConfig,
    BLIPConfig,
    CLIPConfig,
    MomentumConfig,
    TextConfig,
)
from vlzoo.data.tokenizers import Tokenizer, build_tokenizer
from vlzoo.layers.transformer import BertConfig
from vlzoo.models.albef import ALBEF
from vlzoo.models.blip import BLIP
from vlzoo.models.blip2 import BLIP2
from vlzoo.models.blip_vqa import BLIPVQA
from vlzoo.models.clip import CLIP
from vlzoo.models.qformer import QFormer

LOSSES = ("infonce", "siglip")


def build_clip(cfg: CLIPConfig):
    """(CLIP model, tokenizer) from a config."""
    if cfg.loss not in LOSSES:
        raise ValueError(f"model.loss must be one of {LOSSES}, got {cfg.loss!r}")
    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length)
    model = CLIP(
        build_vision_encoder(cfg.vision, cfg.embed_dim),
        build_text_encoder(cfg.text, cfg.embed_dim, tokenizer),
        cfg.embed_dim,
        init_logit_scale=cfg.init_logit_scale,
        max_logit_scale=cfg.max_logit_scale,
        init_logit_bias=cfg.init_logit_bias if cfg.loss == "siglip" else None,
    )
    return model, tokenizer


def momentum_kwargs(cfg: MomentumConfig) -> dict:
    return dict(embed_dim=cfg.embed_dim, queue_size=cfg.queue_size, momentum=cfg.momentum,
                temperature=cfg.temperature, min_temperature=cfg.min_temperature,
                max_temperature=cfg.max_temperature)


def build_albef(cfg: ALBEFConfig) -> tuple[ALBEF, Tokenizer]:
    """(ALBEF, tokenizer) from a config; the text encoder's last ``fusion_layers`` fuse."""
    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length)
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    depth = _text_depth(cfg)
    text = build_text_encoder(cfg.text, cfg.embed_dim, tokenizer, vision.width,
                              range(depth - cfg.fusion_layers, depth))
    info = tokenizer.info
    if info.mask_id is None:
        raise ValueError(f"text.tokenizer {cfg.text.tokenizer!r} has no [MASK] token, which ALBEF's MLM needs")
    model = ALBEF(vision, text, cfg.fusion_layers, info.mask_id, info.special_ids, cfg.mlm_probability,
                  **momentum_kwargs(cfg))
    return model, tokenizer


def build_blip(cfg: BLIPConfig) -> tuple[BLIP, Tokenizer]:
    """(BLIP, tokenizer) from a config; the tokenizer gains [DEC]/[ENC] when missing."""
    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length, blip_tokens=True)
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    text = build_text_encoder(cfg.text, cfg.embed_dim, tokenizer, vision.width, range(_text_depth(cfg)))
    info = tokenizer.info
    model = BLIP(vision, text, enc_id=info.enc_id, dec_id=info.dec_id, pad_id=info.pad_id, eos_id=info.eos_id,
                 prompt_ids=prompt_prefix(tokenizer, cfg.prompt)[1:], label_smoothing=cfg.label_smoothing,
                 **momentum_kwargs(cfg))
    return model, tokenizer


def _text_depth(cfg: MomentumConfig) -> int:
    if cfg.text.impl != "bert":
        raise ValueError(f"text.impl must be 'bert' for ALBEF/BLIP, got {cfg.text.impl!r}")
    if cfg.text.pretrained:
        return bert_config_from_json(f"{cfg.text.pretrained}/config.json").num_hidden_layers
    return int(cfg.text.kwargs.get("num_hidden_layers", 12))


def prompt_prefix(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """Token ids of ``[DEC] + prompt`` (the tokenized prompt without its end token)."""
    ids = tokenizer(prompt)["input_ids"][0].tolist()
    if ids and ids[-1] == tokenizer.info.eos_id:
        ids = ids[:-1]
    return [tokenizer.info.dec_id] + ids[1:]


def build_blip_vqa_model(cfg: BLIPConfig) -> tuple[BLIPVQA, Tokenizer, BLIPConfig]:
    """(BLIPVQA, tokenizer, the config with concrete BERT sizes) from a BLIP config."""
    tokenizer = build_tokenizer(cfg.text.tokenizer, cfg.text.context_length, blip_tokens=True)
    info = tokenizer.info
    sizes = dataclasses.asdict(bert_config_from_kwargs(cfg.text, tokenizer))
    concrete = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, pretrained=None, kwargs=sizes))
    ids = BlipTokenIds(enc=info.enc_id, dec=info.dec_id, pad=info.pad_id, eos=info.eos_id)
    return build_blip_vqa(concrete, ids), tokenizer, concrete


def build_blip_vqa_family(cfg: BLIPConfig) -> tuple[BLIPVQA, Tokenizer]:
    """The ``blip_vqa`` family's builder: (BLIPVQA, tokenizer)."""
    model, tokenizer, _ = build_blip_vqa_model(cfg)
    return model, tokenizer


def build_blip2_llm(cfg: BLIP2LLMConfig):
    """The ``blip2_llm`` family has no pure builder: its task loads the frozen LLM."""
    raise ValueError("a BLIP-2 stage-2 model is built by its task (it loads its frozen LLM); "
                     "use vlzoo.tasks.BLIP2LLMTask or load an export")


def build_qformer(cfg: BLIP2Config, tokenizer: Tokenizer, vision_width: int) -> QFormer:
    """The Q-Former of ``cfg.qformer``: from a BERT directory (``pretrained``) or sized
    by ``kwargs`` (BertConfig fields); word embeddings grown for [DEC] when needed."""
    q = cfg.qformer
    if q.impl != "bert":
        raise ValueError(f"qformer.impl must be 'bert' (the Q-Former is BERT-style), got {q.impl!r}")
    if q.pretrained:
        qformer = QFormer.from_bert(q.pretrained, vision_width, cfg.num_queries, cfg.cross_attention_every,
                                    q.length_buckets)
        if tokenizer.vocab_size > qformer.config.vocab_size:
            resize_token_embeddings(qformer, tokenizer.vocab_size)
    else:
        qformer = QFormer(bert_config_from_kwargs(q, tokenizer, "qformer"), vision_width, cfg.num_queries,
                          cfg.cross_attention_every, q.length_buckets)
    check_context_length(q, qformer.config, "qformer")
    return qformer


def build_blip2(cfg: BLIP2Config) -> tuple[BLIP2, Tokenizer]:
    """(BLIP2, tokenizer) from a config whose vision tower is concrete (see
    :func:`vlzoo.artefacts.resolve_vision`)."""
    tokenizer = build_tokenizer(cfg.qformer.tokenizer, cfg.qformer.context_length, blip_tokens=True)
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    info = tokenizer.info
    model = BLIP2(
        vision, build_qformer(cfg, tokenizer, vision.width), dec_id=info.dec_id, pad_id=info.pad_id,
        eos_id=info.eos_id, embed_dim=cfg.embed_dim, temperature=cfg.temperature,
        min_temperature=cfg.min_temperature, max_temperature=cfg.max_temperature,
        text_pooling=cfg.qformer.pooling or "cls", label_smoothing=cfg.label_smoothing,
        frozen_precision=cfg.frozen_precision,
    )
    return model, tokenizer


def concrete_text_config(text_cfg: TextConfig, encoder: BertTextEncoder | QFormer) -> TextConfig:
    """A BERT-style text config (text model or Q-Former) with the encoder's actual sizes
    and no ``pretrained`` path: what a checkpoint or export records (the weights are in
    its state dict)."""
    return dataclasses.replace(text_cfg, pretrained=None, kwargs=dataclasses.asdict(encoder.config))


@dataclass(frozen=True)
class BlipTokenIds:
    """The special ids the converted model uses: [ENC], [DEC], padding, end of text."""

    enc: int
    dec: int
    pad: int
    eos: int


def build_blip_from_hf(cfg: BLIPConfig, ids: BlipTokenIds, prompt_ids: Sequence[int] = ()) -> BLIP:
    """vlzoo's BLIP for a converted config, with the transformers config's token ids and
    the tokenized ``cfg.prompt`` (no tokenizer needed, unlike
    :func:`build_blip`)."""
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    text = _bert_encoder(cfg.text, vision.width)
    return BLIP(vision, text, enc_id=ids.enc, dec_id=ids.dec, pad_id=ids.pad, eos_id=ids.eos,
                prompt_ids=list(prompt_ids), label_smoothing=cfg.label_smoothing, **momentum_kwargs(cfg))


def build_blip_vqa(cfg: BLIPConfig, ids: BlipTokenIds) -> BLIPVQA:
    """:class:`BLIPVQA` sized by ``cfg`` (the answer decoder has the text model's sizes)."""
    vision = build_vision_encoder(cfg.vision, cfg.embed_dim)
    question = _bert_encoder(cfg.text, vision.width)
    answer = _bert_encoder(cfg.text, question.width)
    return BLIPVQA(vision, question, answer, enc_id=ids.enc, dec_id=ids.dec, pad_id=ids.pad, eos_id=ids.eos)


def _bert_encoder(text: TextConfig, cross_width: int) -> BertTextEncoder:
    """A BERT-style encoder from ``text.kwargs`` with cross-attention (to width ``cross_width``) in every block."""
    config = BertConfig(**text.kwargs)
    check_context_length(text, config)
    return BertTextEncoder(config, cross_width, tuple(range(config.num_hidden_layers)), pooling=text.pooling or "cls",
                           length_buckets=text.length_buckets)


def build_vision_and_qformer(cfg: BLIP2Config | BLIP2LLMConfig):
    """The frozen vision tower and the Q-Former of ``cfg`` (sized by ``qformer.kwargs``:
    a converted or exported config, no tokenizer needed)."""
    vision = build_vision_encoder(cfg.vision, 1)  # no projection of its own is used
    qformer = QFormer(BertConfig(**cfg.qformer.kwargs), vision.width, cfg.num_queries, cfg.cross_attention_every,
                      cfg.qformer.length_buckets)
    return vision, qformer


def build_blip2_retrieval(cfg: BLIP2Config, tokenizer=None) -> nn.Module:
    """vlzoo BLIP2 for ``cfg``; [DEC]/pad/end ids from the tokenizer (BERT's otherwise)."""
    vision, qformer = build_vision_and_qformer(cfg)
    pad = cfg.qformer.kwargs.get("pad_token_id", 0)
    dec, eos = 101, 102  # BERT's [CLS] and [SEP]: the ITG head is absent, [DEC] is never used
    if tokenizer is not None:
        info = tokenizer.info
        dec, pad, eos = info.dec_id if info.dec_id is not None else info.bos_id, info.pad_id, info.eos_id
    return BLIP2(vision, qformer, dec_id=dec, pad_id=pad, eos_id=eos, embed_dim=cfg.embed_dim,
                 text_pooling=cfg.qformer.pooling or "cls", frozen_precision=cfg.frozen_precision)


def concrete_config(config: Any, model: nn.Module) -> Any:
    """The model config with a BERT-style text encoder's sizes written out (replacing
    ``text.pretrained``, a directory that may not exist where the export is loaded, and
    the vocabulary size a tokenizer implied)."""
    text = getattr(config, "text", None)
    if text is not None and text.impl == "bert":  # every size explicit (vocabulary included)
        config = dataclasses.replace(config, text=concrete_text_config(text, model.text))
    qformer = getattr(config, "qformer", None)
    if qformer is not None:
        config = dataclasses.replace(config, qformer=concrete_text_config(qformer, model.qformer))
    return config
