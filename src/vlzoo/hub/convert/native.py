"""The ``vlzoo export`` format read back, per family: a randomly initialised model for the
export's config (the weights follow from ``model.safetensors``), with the special token
ids, tokenizer, classification classes and LLM the export recorded beside it. The family
registry names one of these per family (``Family.rebuild``); a family without one is
rebuilt by its builder."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlzoo.data.llm_text import load_lm_tokenizer
from vlzoo.data.tokenizers import build_tokenizer
from vlzoo.models.blip2 import BLIP2, BLIP2LLM
from vlzoo.models.builders import (
    BlipTokenIds,
    build_blip_from_hf,
    build_blip_vqa,
    build_clip,
    build_vision_and_qformer,
)
from vlzoo.models.clip import CLIPClassifier


def optional_tokenizer(text, has_saved_tokenizer: bool):
    """The text config's tokenizer when it was exported or is built in (shapes,
    open_clip); None for a conversion that came without one."""
    if has_saved_tokenizer or text.tokenizer in ("shapes", "open_clip"):
        return build_tokenizer(text.tokenizer, text.context_length, blip_tokens=text.tokenizer != "open_clip")
    return None


def rebuild_clip(config, saved) -> tuple[Any, Any, dict[str, Any]]:
    """CLIP, with a classification head over ``saved.classes`` when it had one."""
    model, tokenizer = build_clip(config)
    if saved.classes:
        return CLIPClassifier(model, len(saved.classes)), tokenizer, {"classes": list(saved.classes)}
    return model, tokenizer, {}


def _blip_ids(saved, what: str) -> BlipTokenIds:
    if not saved.token_ids:
        raise ValueError(f"{saved.directory}: an exported {what} model needs its token_ids")
    return BlipTokenIds(**{k: saved.token_ids[k] for k in ("enc", "dec", "pad", "eos")})


def _blip_tokenizer(config, saved, ids: BlipTokenIds):
    tokenizer = optional_tokenizer(config.text, saved.has_tokenizer)
    if tokenizer is not None:
        tokenizer.info = dataclasses.replace(tokenizer.info, enc_id=ids.enc, dec_id=ids.dec, pad_id=ids.pad,
                                             eos_id=ids.eos)
    return tokenizer


def rebuild_blip(config, saved) -> tuple[Any, Any, dict[str, Any]]:
    """BLIP with the exported special ids and caption prompt."""
    ids = _blip_ids(saved, "blip")
    model = build_blip_from_hf(config, ids, saved.token_ids.get("prompt", []))
    return model, _blip_tokenizer(config, saved, ids), {}


def rebuild_blip_vqa(config, saved) -> tuple[Any, Any, dict[str, Any]]:
    """BLIP VQA with the exported special ids."""
    ids = _blip_ids(saved, "blip_vqa")
    return build_blip_vqa(config, ids), _blip_tokenizer(config, saved, ids), {}


def rebuild_blip2(config, saved) -> tuple[Any, Any, dict[str, Any]]:
    """BLIP-2 stage 1 with the exported special ids."""
    ids = saved.token_ids or {}
    vision, qformer = build_vision_and_qformer(config)
    model = BLIP2(vision, qformer, dec_id=ids.get("dec", 0), pad_id=ids.get("pad", 0), eos_id=ids.get("eos", 0),
                  embed_dim=config.embed_dim, temperature=config.temperature,
                  min_temperature=config.min_temperature, max_temperature=config.max_temperature,
                  text_pooling=config.qformer.pooling or "cls", label_smoothing=config.label_smoothing,
                  frozen_precision=config.frozen_precision)
    return model, optional_tokenizer(config.qformer, saved.has_tokenizer), {}


def rebuild_blip2_llm(config, saved) -> tuple[Any, Any, dict[str, Any]]:
    """BLIP-2 stage 2 with its LLM built from the exported ``llm/config.json``."""
    from transformers import (  # heavy: only stage 2 needs it
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSeq2SeqLM,
    )

    llm_dir = saved.directory / "llm"
    auto = AutoModelForSeq2SeqLM if config.llm_kind == "seq2seq" else AutoModelForCausalLM
    llm = auto.from_config(AutoConfig.from_pretrained(llm_dir), dtype=torch.float32)
    vision, qformer = build_vision_and_qformer(config)
    model = BLIP2LLM(vision, qformer, llm, config.frozen_precision, config.llm_precision)
    has_llm_tokenizer = any((llm_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    extra = {"llm_tokenizer": load_lm_tokenizer(str(llm_dir)) if has_llm_tokenizer else None}
    return model, optional_tokenizer(config.qformer, saved.has_tokenizer), extra
