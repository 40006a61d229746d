"""CLIP from open_clip checkpoints (ViT and ModifiedResNet towers) and from
transformers ``CLIPModel`` directories.

vlzoo's CLIP with open_clip towers keeps open_clip's parameter names under
``vision.tower.`` / ``text.tower.``, so an open_clip state dict converts by renaming.
A transformers ``CLIPModel`` is the same architecture with other names and separate
q/k/v projections: it is first rewritten to open_clip's layout (q/k/v concatenated
into ``in_proj``, projections transposed).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from vlzoo.config import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, CLIPConfig, TextConfig, VisionConfig
from vlzoo.data.pipelines import (
    ImagePipeline,
    open_clip_pipeline,
    pipeline_statistics,
    transformers_pipeline,
)
from vlzoo.hub.convert import LoadedParts, rename_keys
from vlzoo.hub.convert.hf import timm_mlp_ratio
from vlzoo.hub.convert.precision import cast_parts
from vlzoo.models.builders import build_clip
from vlzoo.utils import read_json_file
from vlzoo.weights import CheckpointKeyError, hf_weights, load_state_dict_file, load_strict

# open_clip key -> vlzoo key. Text-tower keys live at the top level of open_clip's CLIP.
OPEN_CLIP_RULES = [
    (r"visual\.(.+)", r"vision.tower.\1"),
    (r"(token_embedding\..+|positional_embedding|transformer\..+|ln_final\..+|text_projection(\..+)?)",
     r"text.tower.\1"),
    (r"logit_scale|logit_bias", r"\g<0>"),
    (r"attn_mask|input_resolution|context_length|vocab_size", ""),  # buffers / OpenAI JIT metadata
]
OPEN_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def clip_config_from_open_clip(model_cfg: dict[str, Any], preprocess_cfg: dict[str, Any] | None = None) -> CLIPConfig:
    """A vlzoo :class:`CLIPConfig` with open_clip towers from an open_clip model config
    (``embed_dim``, ``vision_cfg``, ``text_cfg``, ``quick_gelu``) and its preprocessing
    (``mean``, ``std``, ``interpolation``; OpenAI's by default)."""
    _check_text_cfg(model_cfg.get("text_cfg", {}))
    pre = preprocess_cfg or {}
    quick_gelu = bool(model_cfg.get("quick_gelu", False))
    vision = dict(model_cfg["vision_cfg"])
    text = dict(model_cfg["text_cfg"])
    image_size = vision.pop("image_size", 224)
    image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
    context_length = text.pop("context_length", 77)
    return CLIPConfig(
        vision=VisionConfig(impl="open_clip", image_size=int(image_size), kwargs={**vision, "quick_gelu": quick_gelu},
                            mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)), std=tuple(pre.get("std", OPENAI_CLIP_STD)),
                            interpolation=pre.get("interpolation", "bicubic")),
        text=TextConfig(impl="open_clip", tokenizer="open_clip", context_length=int(context_length),
                        kwargs={**text, "quick_gelu": quick_gelu}),
        embed_dim=int(model_cfg["embed_dim"]),
        loss="siglip" if model_cfg.get("init_logit_bias") is not None else "infonce",
        init_logit_bias=float(model_cfg.get("init_logit_bias") or -10.0),
    )


def _check_text_cfg(text_cfg: dict[str, Any]) -> None:
    """Reject Hugging Face text towers and tokenizers (vlzoo uses open_clip's BPE tokenizer)."""
    for key, what in (("hf_model_name", "text tower"), ("hf_tokenizer_name", "tokenizer")):
        if text_cfg.get(key):
            raise ValueError(f"open_clip models with a Hugging Face {what} (text_cfg.{key}={text_cfg[key]!r}) "
                             "are not supported")


def convert_open_clip_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """open_clip ``CLIP`` state dict -> vlzoo ``CLIP`` state dict (explicit renames)."""
    return rename_keys(state, OPEN_CLIP_RULES, source="open_clip checkpoint")


# ---------------------------------------------------------------- transformers CLIPModel
_HF_LAYER = {
    "layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
HF_CLIP_RULES = [
    (r"text_model\.embeddings\.token_embedding\.weight", "token_embedding.weight"),
    (r"text_model\.embeddings\.position_embedding\.weight", "positional_embedding"),
    (r"text_model\.final_layer_norm\.(weight|bias)", r"ln_final.\1"),
    (r"text_model\.encoder\.layers\.(\d+)\.(.+)", r"transformer.resblocks.\1.\2"),
    (r"vision_model\.embeddings\.class_embedding", "visual.class_embedding"),
    (r"vision_model\.embeddings\.patch_embedding\.weight", "visual.conv1.weight"),
    (r"vision_model\.embeddings\.position_embedding\.weight", "visual.positional_embedding"),
    (r"vision_model\.pre_layrnorm\.(weight|bias)", r"visual.ln_pre.\1"),
    (r"vision_model\.post_layernorm\.(weight|bias)", r"visual.ln_post.\1"),
    (r"vision_model\.encoder\.layers\.(\d+)\.(.+)", r"visual.transformer.resblocks.\1.\2"),
    (r"text_projection\.weight", "text_projection"),
    (r"visual_projection\.weight", "visual.proj"),
    (r"logit_scale", "logit_scale"),
    (r"(text|vision)_model\.embeddings\.position_ids", ""),
]


def hf_clip_to_open_clip(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``CLIPModel`` state dict -> open_clip ``CLIP`` layout."""
    out = rename_keys(state, HF_CLIP_RULES, source="transformers CLIPModel checkpoint")
    absent = [hf for hf, key in (("text_projection.weight", "text_projection"), ("visual_projection.weight",
                                                                                 "visual.proj")) if key not in out]
    if absent:
        raise CheckpointKeyError(f"transformers CLIPModel checkpoint: no {', '.join(absent)} (a CLIPModel has both "
                                 "projections; a CLIPVisionModel or CLIPTextModel alone cannot be loaded as CLIP)")
    for key in ("text_projection", "visual.proj"):
        out[key] = out[key].t().contiguous()  # Linear (E, W) -> matrix (W, E)
    for key in [k for k in out if ".self_attn.q_proj." in k]:
        stem, kind = key.split(".self_attn.q_proj.")
        qkv = [out.pop(f"{stem}.self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")]
        out[f"{stem}.attn.in_proj_{kind}"] = torch.cat(qkv, dim=0)
    for key in [k for k in out if ".resblocks." in k]:
        for old, new in _HF_LAYER.items():
            if f".{old}." in key:
                out[key.replace(f".{old}.", f".{new}.")] = out.pop(key)
                break
    return out


def open_clip_config_from_hf(hf_config: dict[str, Any]) -> dict[str, Any]:
    """An open_clip model config equivalent to a transformers ``CLIPConfig`` dict."""
    v, t = hf_config["vision_config"], hf_config["text_config"]
    acts = {v.get("hidden_act", "quick_gelu"), t.get("hidden_act", "quick_gelu")}
    if not acts <= {"quick_gelu", "gelu"} or len(acts) != 1:
        raise ValueError(f"CLIP config: unsupported hidden_act {sorted(acts)} (quick_gelu or gelu in both towers)")
    for tower in (v, t):
        if abs(tower.get("layer_norm_eps", 1e-5) - 1e-5) > 1e-12:
            raise ValueError(f"CLIP config: layer_norm_eps {tower['layer_norm_eps']} (open_clip towers use 1e-5)")
    return {
        "embed_dim": hf_config.get("projection_dim", 512),
        "quick_gelu": acts == {"quick_gelu"},
        "vision_cfg": {"image_size": v.get("image_size", 224), "layers": v.get("num_hidden_layers", 12),
                       "width": v.get("hidden_size", 768), "patch_size": v.get("patch_size", 32),
                       "head_width": v.get("hidden_size", 768) // v.get("num_attention_heads", 12),
                       "mlp_ratio": timm_mlp_ratio(v.get("hidden_size", 768), v.get("intermediate_size", 3072))},
        "text_cfg": {"context_length": t.get("max_position_embeddings", 77), "vocab_size": t.get("vocab_size", 49408),
                     "width": t.get("hidden_size", 512), "heads": t.get("num_attention_heads", 8),
                     "layers": t.get("num_hidden_layers", 12),
                     "mlp_ratio": timm_mlp_ratio(t.get("hidden_size", 512), t.get("intermediate_size", 2048))},
    }


HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


# ------------------------------------------------------------------------ loading
def build_converted_clip(config: CLIPConfig, state: dict[str, Tensor], source: str, tokenizer=True,
                         pipeline: ImagePipeline | None = None) -> LoadedParts:
    """Build vlzoo's CLIP for ``config``, load ``state`` (vlzoo keys) strictly; ``pipeline``:
    the source's image pipeline."""
    model, tok = build_clip(config)
    load_strict(model, state, source=source)
    return LoadedParts("clip", model.eval(), config, config.vision, tok if tokenizer else None,
                       frozenset({"encode"}), source, pipeline=pipeline)


def load_open_clip_dir(directory: Path) -> LoadedParts:
    """A directory in open_clip's hub layout: ``open_clip_config.json`` (``model_cfg``,
    ``preprocess_cfg``) and ``open_clip_model.safetensors`` or ``open_clip_pytorch_model.bin``."""
    raw = read_json_file(directory / "open_clip_config.json", "an open_clip config object with 'model_cfg'")
    if "model_cfg" not in raw:
        raise ValueError(f"{directory / 'open_clip_config.json'}: no 'model_cfg' entry")
    weights = next((directory / f for f in OPEN_CLIP_WEIGHT_FILES if (directory / f).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{directory}: none of {OPEN_CLIP_WEIGHT_FILES}")
    config = clip_config_from_open_clip(raw["model_cfg"], raw.get("preprocess_cfg"))
    pipeline = open_clip_pipeline(config.vision.image_size, raw["model_cfg"].get("preprocess_cfg"),
                                  raw.get("preprocess_cfg"))
    return build_converted_clip(config, convert_open_clip_state(load_state_dict_file(weights)), str(weights),
                                pipeline=pipeline)


def load_open_clip_file(weights: Path, model_name: str, preprocess_cfg: dict[str, Any] | None = None,
                        tag: str | None = None, model_cfg: dict[str, Any] | None = None) -> LoadedParts:
    """An open_clip state dict file for the open_clip model config ``model_name`` (or
    ``model_cfg`` when given, e.g. from a hub ``open_clip_config.json``); ``tag`` (e.g.
    ``openai``) adds its pretrained settings (QuickGELU, preprocessing)."""
    import open_clip

    model_cfg = model_cfg or open_clip.get_model_config(model_name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {model_name!r}")
    pretrained = open_clip.get_pretrained_cfg(model_name, tag) if tag else {}
    if pretrained.get("quick_gelu"):
        model_cfg = {**model_cfg, "quick_gelu": True}
    preprocess = {**{k: pretrained[k] for k in ("mean", "std", "interpolation") if k in pretrained},
                  **(preprocess_cfg or {})}
    config = clip_config_from_open_clip(model_cfg, preprocess)
    pipeline = open_clip_pipeline(config.vision.image_size, model_cfg.get("preprocess_cfg"), pretrained,
                                  preprocess_cfg)
    return build_converted_clip(config, convert_open_clip_state(load_state_dict_file(weights)), str(weights),
                                pipeline=pipeline)


def load_hf_clip(directory: Path, hf_config: dict[str, Any], dtype: torch.dtype | None = None) -> LoadedParts:
    """A transformers ``CLIPModel`` directory (``config.json`` + weights), cast to ``dtype``
    after loading (:func:`vlzoo.hub.convert.precision.cast_parts`)."""
    model_cfg = open_clip_config_from_hf(hf_config)
    pipeline = transformers_pipeline(directory)
    config = clip_config_from_open_clip(model_cfg, pipeline_statistics(pipeline))
    if any((Path(directory) / name).is_file() for name in HF_TOKENIZER_FILES):  # the directory's own tokenizer
        config = dataclasses.replace(config, text=dataclasses.replace(config.text, tokenizer=str(directory)))
    state = convert_open_clip_state(hf_clip_to_open_clip(hf_weights(directory)))
    return cast_parts(build_converted_clip(config, state, str(directory), pipeline=pipeline), dtype)
