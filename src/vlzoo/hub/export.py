"""``vlzoo export``: any zoo model as ``model.safetensors`` plus ``vlzoo_config.yaml``
(family, model config, preprocessing, capabilities), reloadable bit for bit.

A Hugging Face tokenizer is saved beside it (``tokenizer/``) and a BLIP-2 stage-2
LLM's architecture as ``llm/config.json``, so the directory loads offline with
nothing else.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml

from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.loaders import EXPORT_CONFIG, EXPORT_WEIGHTS

FORMAT_VERSION = 1


def _config_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


def concrete_config(parts: LoadedParts) -> Any:
    """The model config with a BERT-style text encoder's sizes written out (replacing
    ``text.pretrained``, a directory that may not exist where the export is loaded, and
    the vocabulary size a tokenizer implied)."""
    config = parts.config
    text = getattr(config, "text", None)
    if text is not None and text.impl == "bert":  # every size explicit (vocabulary included)
        sizes = dataclasses.asdict(parts.model.text.config)
        config = dataclasses.replace(config, text=dataclasses.replace(text, pretrained=None, kwargs=sizes))
    qformer = getattr(config, "qformer", None)
    if qformer is not None:
        sizes = dataclasses.asdict(parts.model.qformer.config)
        config = dataclasses.replace(config, qformer=dataclasses.replace(qformer, pretrained=None, kwargs=sizes))
    return config


def _checked_out_dir(out: str | Path) -> Path:
    """``out`` resolved; refuses to replace anything but an earlier export or an empty
    directory (never the working directory or one of its parents)."""
    out = Path(out).resolve()
    cwd = Path.cwd().resolve()
    if out == cwd or out in cwd.parents:
        raise ValueError(f"--out {out}: refusing to export over the working directory or a parent of it")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_CONFIG).is_file():
        raise ValueError(f"--out {out}: exists and is not an earlier vlzoo export (no {EXPORT_CONFIG}); "
                         "choose a new or empty directory")
    return out


def export_parts(parts: LoadedParts, out: str | Path) -> Path:
    """Write ``parts`` to directory ``out`` (new, empty, or an earlier export, which is
    replaced atomically: written to a temporary sibling, then renamed)."""
    from safetensors.torch import save_model

    from vlzoo.data.tokenizers import HFTokenizer

    out = _checked_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    try:
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "family": parts.family, "source": parts.source,
            "capabilities": sorted(parts.capabilities), "config": _config_dict(concrete_config(parts)),
            "preprocess": _config_dict(parts.preprocess), "tokenizer": None,
        }
        for key in ("generation", "vqa_generation"):  # the decoding the model was evaluated with
            if parts.extra.get(key) is not None:
                meta[key] = dataclasses.asdict(parts.extra[key])
        if parts.extra.get("classes"):  # a CLIP fine-tuned for classification: its head's classes
            meta["classes"] = list(parts.extra["classes"])
        if parts.family in ("blip", "blip_vqa", "blip2"):  # ids the model was built with
            m = parts.model
            meta["token_ids"] = {k: getattr(m, f"{k}_id") for k in ("enc", "dec", "pad", "eos") if hasattr(m, f"{k}_id")}
            meta["token_ids"]["prompt"] = list(getattr(m, "prompt_ids", []))
        if isinstance(parts.tokenizer, HFTokenizer):
            parts.tokenizer._tok.save_pretrained(tmp / "tokenizer")
            meta["tokenizer"] = "tokenizer"
        if parts.family == "blip2_llm":
            parts.model.llm.config.save_pretrained(tmp / "llm")
            if parts.extra.get("llm_tokenizer") is not None:
                parts.extra["llm_tokenizer"].save_pretrained(tmp / "llm")
        save_model(parts.model, str(tmp / EXPORT_WEIGHTS))  # shared (tied) tensors stored once
        (tmp / EXPORT_CONFIG).write_text(yaml.safe_dump(meta, sort_keys=False))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_export(directory: str | Path) -> LoadedParts:
    """Rebuild a model written by :func:`export_parts` and load its weights strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from vlzoo.hub.weights import CheckpointKeyError

    directory = Path(directory)
    meta = yaml.safe_load((directory / EXPORT_CONFIG).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / EXPORT_CONFIG}: format_version {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    family = meta["family"]
    model, config, tokenizer, extra = build_family(family, meta["config"], directory, meta.get("tokenizer"),
                                                   meta.get("token_ids"), meta.get("classes"))
    try:
        missing, unexpected = load_model(model, str(directory / EXPORT_WEIGHTS), strict=False)
    except SafetensorError as err:  # safetensors' own errors do not name the file
        raise ValueError(f"{directory / EXPORT_WEIGHTS}: not a complete safetensors file ({err})") from err
    if missing or unexpected:
        raise CheckpointKeyError(f"{directory / EXPORT_WEIGHTS} does not match {type(model).__name__}: "
                                 f"missing keys {sorted(missing)[:20]}, unexpected keys {sorted(unexpected)[:20]}")
    from vlzoo.config import VisionConfig
    from vlzoo.tasks.loading import as_config

    preprocess = as_config(meta["preprocess"], VisionConfig, f"{directory / EXPORT_CONFIG}: preprocess")
    from vlzoo.models.generation import GenerationConfig

    for key in ("generation", "vqa_generation"):
        if meta.get(key) is not None:
            extra[key] = GenerationConfig(**meta[key])
    return LoadedParts(family, model.eval(), config, preprocess, tokenizer, frozenset(meta["capabilities"]),
                       str(directory), extra)


def build_family(family: str, raw_config: dict, directory: Path, tokenizer_dir: str | None,
                 token_ids: dict | None = None, classes: list[str] | None = None):
    """(model, config, tokenizer, extra) of ``family`` from its config dict, randomly
    initialised; a saved tokenizer directory replaces the config's tokenizer name;
    ``classes``: a CLIP with a classification head over them."""
    from vlzoo import config as C
    from vlzoo.tasks.loading import as_config

    schemas = {"clip": C.CLIPConfig, "albef": C.ALBEFConfig, "blip": C.BLIPConfig, "blip_vqa": C.BLIPConfig,
               "blip2": C.BLIP2Config, "blip2_llm": C.BLIP2LLMConfig}
    if family not in schemas:
        raise ValueError(f"{directory}: unknown family {family!r}")
    config = as_config(raw_config, schemas[family], f"{directory / EXPORT_CONFIG}: config")
    text_field = "qformer" if family.startswith("blip2") else "text"
    if tokenizer_dir is not None:
        text = dataclasses.replace(getattr(config, text_field), tokenizer=str(directory / tokenizer_dir),
                                   pretrained=None)
        config = dataclasses.replace(config, **{text_field: text})
    extra: dict[str, Any] = {}
    if family == "clip":
        from vlzoo.tasks.clip import build_clip

        model, tokenizer = build_clip(config)
        if classes:
            from vlzoo.tasks.classify import CLIPClassifier

            model, extra["classes"] = CLIPClassifier(model, len(classes)), list(classes)
    elif family == "albef":
        from vlzoo.tasks.momentum import build_albef

        model, tokenizer = build_albef(config)
    elif family in ("blip", "blip_vqa"):
        model, tokenizer = _build_blip(family, config, token_ids, tokenizer_dir is not None)
    elif family == "blip2":
        model, tokenizer = _build_blip2(config, token_ids or {}, tokenizer_dir is not None)
    else:
        model, tokenizer, extra = _build_blip2_llm(config, directory / "llm", tokenizer_dir is not None)
    return model, config, tokenizer, extra


def _build_blip(family: str, config, token_ids: dict | None, has_saved_tokenizer: bool):
    """BLIP or BLIP VQA with the exported special ids; the tokenizer when one was saved or
    the config names a built-in one (shapes), else None (a tokenizer-less conversion)."""
    from vlzoo.hub.convert.hf_blip import BlipTokenIds, build_blip_from_hf, build_blip_vqa

    if not token_ids:
        raise ValueError(f"an exported {family} model needs its token_ids in {EXPORT_CONFIG}")
    ids = BlipTokenIds(**{k: token_ids[k] for k in ("enc", "dec", "pad", "eos")})
    if family == "blip_vqa":
        model = build_blip_vqa(config, ids)
    else:
        model = build_blip_from_hf(config, ids, token_ids.get("prompt", []))
    tokenizer = _optional_tokenizer(config.text, has_saved_tokenizer)
    if tokenizer is not None:
        tokenizer.info = dataclasses.replace(tokenizer.info, enc_id=ids.enc, dec_id=ids.dec, pad_id=ids.pad,
                                             eos_id=ids.eos)
    return model, tokenizer


def _optional_tokenizer(text, has_saved_tokenizer: bool):
    """The text config's tokenizer when it was exported or is built in (shapes,
    open_clip); None for a conversion that came without one."""
    from vlzoo.data.tokenizers import build_tokenizer

    if has_saved_tokenizer or text.tokenizer in ("shapes", "open_clip"):
        return build_tokenizer(text.tokenizer, text.context_length, blip_tokens=text.tokenizer != "open_clip")
    return None


def _build_blip2(config, token_ids: dict, has_saved_tokenizer: bool):
    """BLIP-2 stage 1 with the exported special ids."""
    from vlzoo.hub.convert.hf_blip2 import build_vision_and_qformer
    from vlzoo.models.blip2 import BLIP2

    tokenizer = _optional_tokenizer(config.qformer, has_saved_tokenizer)
    vision, qformer = build_vision_and_qformer(config)
    model = BLIP2(vision, qformer, dec_id=token_ids.get("dec", 0), pad_id=token_ids.get("pad", 0),
                  eos_id=token_ids.get("eos", 0), embed_dim=config.embed_dim, temperature=config.temperature,
                  min_temperature=config.min_temperature, max_temperature=config.max_temperature,
                  text_pooling=config.qformer.pooling or "cls", label_smoothing=config.label_smoothing,
                  frozen_precision=config.frozen_precision)
    return model, tokenizer


def _build_blip2_llm(config, llm_dir: Path, has_saved_tokenizer: bool):
    """BLIP2LLM with its LLM built from the exported ``llm/config.json`` (weights follow)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from vlzoo.data.llm_text import load_lm_tokenizer
    from vlzoo.hub.convert.hf_blip2 import build_vision_and_qformer
    from vlzoo.models.blip2 import BLIP2LLM

    auto = AutoModelForSeq2SeqLM if config.llm_kind == "seq2seq" else AutoModelForCausalLM
    llm = auto.from_config(AutoConfig.from_pretrained(llm_dir), dtype=torch.float32)
    vision, qformer = build_vision_and_qformer(config)
    model = BLIP2LLM(vision, qformer, llm, config.frozen_precision, config.llm_precision)
    has_llm_tokenizer = any((llm_dir / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    extra = {"llm_tokenizer": load_lm_tokenizer(str(llm_dir)) if has_llm_tokenizer else None}
    return model, _optional_tokenizer(config.qformer, has_saved_tokenizer), extra


def export_to_hf(parts: LoadedParts, out: str | Path, head: str | None = None) -> Path:
    """Write a BLIP or BLIP-2 model as a transformers directory (``save_pretrained``),
    through the inverse of its converter's key map, with its tokenizer when it has a
    Hugging Face one (stage 2: the LLM's, with the ``<image>`` placeholder transformers
    needs). ``head`` (BLIP): ``retrieval`` or ``captioning`` for a vlzoo BLIP that has both."""
    from vlzoo.data.tokenizers import HFTokenizer

    if parts.family in ("blip", "blip_vqa"):
        from vlzoo.hub.convert.hf_blip import to_hf_blip

        hf_model = to_hf_blip(parts, head=head)
    elif parts.family in ("blip2", "blip2_llm"):
        from vlzoo.hub.convert.hf_blip2 import to_hf_blip2

        if head is not None:
            raise ValueError("--head applies to BLIP only (BLIP-2 exports its one transformers class)")
        hf_model = to_hf_blip2(parts)
    else:
        raise ValueError(f"--to hf: transformers has no {parts.family} class vlzoo exports to (BLIP and BLIP-2 only)")
    out = Path(out)
    hf_model.save_pretrained(out)
    if parts.family == "blip2_llm":
        _save_llm_tokenizer(parts.extra.get("llm_tokenizer"), hf_model.config.image_token_index, out)
    elif isinstance(parts.tokenizer, HFTokenizer):
        parts.tokenizer._tok.save_pretrained(out)
    return out


def _save_llm_tokenizer(tokenizer, image_token_index: int, out: Path) -> None:
    """Save a copy of the LLM tokenizer with ``<image>`` at ``image_token_index``."""
    import copy

    from vlzoo.hub.convert.hf_blip2 import IMAGE_TOKEN

    if tokenizer is None:
        return
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_index:
        raise ValueError(f"the LLM tokenizer's {IMAGE_TOKEN} id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} "
                         f"differs from the exported image_token_index {image_token_index}")
    tokenizer.save_pretrained(out)
