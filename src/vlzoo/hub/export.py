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

from vlzoo import families
from vlzoo.config import VisionConfig, as_config
from vlzoo.data.pipelines import ImagePipeline
from vlzoo.data.tokenizers import HFTokenizer
from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.convert.hf_blip2 import IMAGE_TOKEN
from vlzoo.models.builders import concrete_config
from vlzoo.models.generation import GenerationConfig
from vlzoo.weights import CheckpointKeyError

EXPORT_CONFIG = "vlzoo_config.yaml"
EXPORT_WEIGHTS = "model.safetensors"

FORMAT_VERSION = 1


def _config_dict(config: Any) -> dict:
    return dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)


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

    out = _checked_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    try:
        meta: dict[str, Any] = {
            "format_version": FORMAT_VERSION, "family": parts.family, "source": parts.source,
            "capabilities": sorted(parts.capabilities),
            "config": _config_dict(concrete_config(parts.config, parts.model)),
            "preprocess": _config_dict(parts.preprocess), "tokenizer": None,
        }
        for key in ("generation", "vqa_generation"):  # the decoding the model was evaluated with
            if parts.extra.get(key) is not None:
                meta[key] = dataclasses.asdict(parts.extra[key])
        if parts.pipeline is not None:  # the release's own image pipeline, kept through the export
            meta["pipeline"] = dataclasses.asdict(parts.pipeline)
        if parts.extra.get("classes"):  # a CLIP fine-tuned for classification: its head's classes
            meta["classes"] = list(parts.extra["classes"])
        token_ids = {k: getattr(parts.model, f"{k}_id") for k in ("enc", "dec", "pad", "eos")
                     if hasattr(parts.model, f"{k}_id")}
        if token_ids:  # ids the model was built with (BLIP, BLIP-2)
            meta["token_ids"] = {**token_ids, "prompt": list(getattr(parts.model, "prompt_ids", []))}
        if isinstance(parts.tokenizer, HFTokenizer):
            parts.tokenizer._tok.save_pretrained(tmp / "tokenizer")
            meta["tokenizer"] = "tokenizer"
        if hasattr(parts.model, "llm"):  # BLIP-2 stage 2: the LLM's architecture (weights in the safetensors)
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
    """Rebuild a model written by :func:`export_parts` (through its family's registry
    entry) and load its weights strictly."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    directory = Path(directory)
    meta = yaml.safe_load((directory / EXPORT_CONFIG).read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{directory / EXPORT_CONFIG}: format_version {meta.get('format_version')!r}, "
                         f"expected {FORMAT_VERSION}")
    try:
        family = families.get(meta["family"])
    except ValueError as err:
        raise ValueError(f"{directory / EXPORT_CONFIG}: {err}") from None
    config = as_config(meta["config"], family.config, f"{directory / EXPORT_CONFIG}: config")
    if meta.get("tokenizer") is not None:
        config = families.with_saved_tokenizer(family, config, directory / meta["tokenizer"])
    saved = families.SavedExport(directory, meta.get("tokenizer") is not None, meta.get("token_ids") or {},
                                 meta.get("classes"))
    model, tokenizer, extra = families.rebuild(family, config, saved)
    try:
        missing, unexpected = load_model(model, str(directory / EXPORT_WEIGHTS), strict=False)
    except SafetensorError as err:  # safetensors' own errors do not name the file
        raise ValueError(f"{directory / EXPORT_WEIGHTS}: not a complete safetensors file ({err})") from err
    if missing or unexpected:
        raise CheckpointKeyError(f"{directory / EXPORT_WEIGHTS} does not match {type(model).__name__}: "
                                 f"missing keys {sorted(missing)[:20]}, unexpected keys {sorted(unexpected)[:20]}")
    preprocess = as_config(meta["preprocess"], VisionConfig, f"{directory / EXPORT_CONFIG}: preprocess")
    for key in ("generation", "vqa_generation"):
        if meta.get(key) is not None:
            extra[key] = GenerationConfig(**meta[key])
    pipeline = ImagePipeline(**meta["pipeline"]) if meta.get("pipeline") else None
    return LoadedParts(family.name, model.eval(), config, preprocess, tokenizer, frozenset(meta["capabilities"]),
                       str(directory), extra, pipeline)


def export_to_hf(parts: LoadedParts, out: str | Path, head: str | None = None) -> Path:
    """Write a model as a transformers directory (``save_pretrained``) through its family's
    exporter (the inverse of its converter's key map), with its tokenizer when it has a
    Hugging Face one (stage 2: the LLM's, with the ``<image>`` placeholder transformers
    needs). ``head`` (BLIP): ``retrieval`` or ``captioning`` for a vlzoo BLIP that has both."""
    to_hf = families.get(parts.family).to_hf
    if to_hf is None:
        exporting = [name for name, f in families.all_families().items() if f.to_hf is not None]
        raise ValueError(f"--to hf: transformers has no {parts.family} class vlzoo exports to "
                         f"(families with one: {', '.join(exporting)})")
    hf_model = to_hf(parts, head)
    out = Path(out)
    hf_model.save_pretrained(out)
    if "llm_tokenizer" in parts.extra:  # BLIP-2 stage 2: the LLM's tokenizer is the one transformers uses
        _save_llm_tokenizer(parts.extra.get("llm_tokenizer"), hf_model.config.image_token_index, out)
    elif isinstance(parts.tokenizer, HFTokenizer):
        parts.tokenizer._tok.save_pretrained(out)
    return out


def _save_llm_tokenizer(tokenizer, image_token_index: int, out: Path) -> None:
    """Save a copy of the LLM tokenizer with ``<image>`` at ``image_token_index``."""
    import copy

    if tokenizer is None:
        return
    tokenizer = copy.deepcopy(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_index:
        raise ValueError(f"the LLM tokenizer's {IMAGE_TOKEN} id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)} "
                         f"differs from the exported image_token_index {image_token_index}")
    tokenizer.save_pretrained(out)
