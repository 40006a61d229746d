"""Typed configuration dataclasses.

Zoo YAML files (``zoo_configs/``) are read into these through LightningCLI
(jsonargparse, ``omegaconf+`` mode), or directly with :func:`load_yaml_section`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionConfig:
    """An image encoder chosen by ``impl``.

    - ``timm``: ``name`` is any timm ViT/EVA model; ``kwargs`` go to ``timm.create_model``
      (e.g. ``img_size``, ``patch_size``, ``embed_dim``, ``depth``, ``num_heads``).
    - ``open_clip``: ``name`` is an open_clip model config (``ViT-B-32``, ``RN50``) whose
      vision tower is used; ``kwargs`` override fields of open_clip's ``CLIPVisionCfg``
      (``layers`` as a list of 4 ints builds a ModifiedResNet).
    """

    impl: str = "timm"
    name: str | None = None
    image_size: int = 224
    kwargs: dict[str, Any] = field(default_factory=dict)
    output_layer: int = -1  # -1: last layer (normed); -2: penultimate (BLIP-2), ...
    patch_dropout: float = 0.0  # FLIP: fraction of patches dropped while training
    mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    std: tuple[float, float, float] = OPENAI_CLIP_STD
    interpolation: str = "bicubic"
    grad_checkpointing: bool = False
    locked: bool = False


@dataclass
class TextConfig:
    """A text encoder chosen by ``impl``.

    - ``open_clip``: open_clip's causal text transformer (EOT pooling); ``name`` an
      open_clip model config to take the text tower from, ``kwargs`` override
      ``CLIPTextCfg`` fields (``width``, ``heads``, ``layers``, ...).
    - ``bert``: a BERT-style encoder on vlzoo's shared transformer block ([CLS]
      pooling); ``kwargs`` are ``BertConfig`` fields; ``pretrained`` a Hugging Face
      BERT directory to load (strictly).
    ``vocab_size`` defaults to the tokenizer's.
    """

    impl: str = "open_clip"
    name: str | None = None
    tokenizer: str = "open_clip"  # shapes | open_clip | Hugging Face name or directory
    context_length: int = 77
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    grad_checkpointing: bool = False
    locked: bool = False


@dataclass
class CLIPConfig:
    """CLIP: two towers, projections to ``embed_dim``, a learnable temperature."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 512
    loss: str = "infonce"  # or "siglip"
    init_logit_scale: float = math.log(1 / 0.07)
    max_logit_scale: float = 100.0
    init_logit_bias: float = -10.0  # used by the SigLIP loss only


@dataclass
class MomentumConfig:
    """What ALBEF and BLIP share: ViT + BERT-style text, ITC with a momentum queue.

    ``alpha`` is the momentum-distillation weight, ramped linearly from 0 over
    ``alpha_ramp_steps`` optimizer steps (None: the first epoch). The global batch
    (batch_size x devices x nodes) must divide ``queue_size``.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=lambda: TextConfig(impl="bert", tokenizer="bert-base-uncased",
                                                                context_length=35))
    embed_dim: int = 256
    queue_size: int = 65536
    momentum: float = 0.995
    temperature: float = 0.07
    min_temperature: float = 0.001  # the temperature is clamped to [min, max] after each step
    max_temperature: float = 0.5
    alpha: float = 0.4
    alpha_ramp_steps: int | None = None


@dataclass
class ALBEFConfig(MomentumConfig):
    """ALBEF: the text encoder's last ``fusion_layers`` blocks cross-attend to the image."""

    fusion_layers: int = 6
    mlm_probability: float = 0.15


@dataclass
class BLIPConfig(MomentumConfig):
    """BLIP (MED): cross-attention in every text block; captions trained after ``prompt``."""

    queue_size: int = 57600
    prompt: str = "a picture of "
    label_smoothing: float = 0.1


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0


@dataclass
class EvalConfig:
    """Evaluation settings shared by the families."""

    zeroshot_templates: list[str] = field(
        default_factory=lambda: ["a photo of a {}", "a {}", "there is a {}", "a picture of a {}"]
    )
    text_batch_size: int = 512
    rerank_k: int = 128  # ITM reranks the top k ITC candidates per query (ALBEF, BLIP, BLIP-2)
    itm_batch_size: int = 256


def load_yaml_section(path: str | Path, section: str, schema: type) -> Any:
    """Read ``section`` (dotted, e.g. ``model.init_args.model``) of a YAML into ``schema``.

    Type mismatches and unknown keys raise an error naming the file and the field.
    """
    raw = OmegaConf.load(path)
    node = OmegaConf.select(raw, section)
    if node is None:
        raise KeyError(f"{path}: no section {section!r}")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
    except Exception as err:  # omegaconf names the offending key
        raise ValueError(f"{path}: section {section!r} does not match {schema.__name__}: {err}") from err
    return OmegaConf.to_object(merged)
