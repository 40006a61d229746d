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

# What a loaded model can do (``LoadedParts.capabilities``, ``Family.capabilities``).
CAPABILITIES = ("encode", "itm", "generate", "vqa")

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
    resize_mode: str = "shortest"  # PIL preprocessing: shortest side + centre crop (CLIP); squash (BLIP, ALBEF)
    grad_checkpointing: bool = False
    locked: bool = False


@dataclass
class TextConfig:
    """A text encoder chosen by ``impl``.

    - ``open_clip``: open_clip's causal text transformer (EOT pooling); ``name`` an
      open_clip model config to take the text tower from, ``kwargs`` override
      ``CLIPTextCfg`` fields (``width``, ``heads``, ``layers``, ...).
    - ``bert``: a BERT-style encoder on vlzoo's shared transformer block; ``kwargs``
      are ``BertConfig`` fields; ``pretrained`` a Hugging Face BERT directory to load
      (strictly); ``pooling`` ``cls`` (default, as BERT and the papers) or ``mean``
      (the attended tokens' mean, for the pooled feature that ITC/CLIP use).
    ``vocab_size`` defaults to the tokenizer's.
    """

    impl: str = "open_clip"
    name: str | None = None
    tokenizer: str = "open_clip"  # shapes | open_clip | Hugging Face name or directory
    context_length: int = 77
    kwargs: dict[str, Any] = field(default_factory=dict)
    pretrained: str | None = None
    pooling: str | None = None  # None: the impl's own (bert: cls; open_clip: end-of-text token)
    length_buckets: int = 1  # > 1: text passes run the rows grouped by length, each group cut to its longest
                             # text: the same result at every real position, fewer FLOPs, one host read of the
                             # lengths per pass; 1: one call padded to the batch's longest text
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
class BLIP2Config:
    """BLIP-2 stage 1: a frozen image encoder read by a Q-Former (ITC + ITM + ITG).

    ``vision`` is frozen whatever its ``locked`` says (``impl: vlzoo`` with ``name:
    zoo:clip/shapes-tiny`` takes the vision tower of a vlzoo CLIP); ``qformer`` is a
    BERT-style text config (``impl: bert``): ``kwargs`` its sizes, ``pretrained`` a BERT
    directory to initialise from (cross-attention and queries stay random),
    ``pooling`` the text feature of ITC. ``frozen_precision`` runs the frozen encoder
    in ``bf16``/``fp16`` (the Q-Former stays fp32). ``cache_image_features`` keeps the
    frozen encoder's output per training image (valid without random augmentation).
    """

    vision: VisionConfig = field(default_factory=lambda: VisionConfig(output_layer=-2))
    qformer: TextConfig = field(default_factory=lambda: TextConfig(impl="bert", tokenizer="bert-base-uncased",
                                                                   context_length=32))
    num_queries: int = 32
    cross_attention_every: int = 2
    embed_dim: int = 256
    temperature: float = 0.07
    min_temperature: float = 0.001
    max_temperature: float = 0.5
    label_smoothing: float = 0.1
    frozen_precision: str | None = None
    cache_image_features: bool = False


@dataclass
class BLIP2LLMConfig:
    """BLIP-2 stage 2: the stage-1 Q-Former's queries, projected to the LLM's width, are
    a soft visual prompt for a frozen LLM.

    ``stage1``: a stage-1 checkpoint or ``zoo:blip2/...`` whose frozen image encoder,
    ``ln_vision`` and Q-Former start stage 2 (None: build them from ``vision``,
    ``qformer``, ``num_queries``, ``cross_attention_every`` with a random Q-Former).
    ``llm``: a Hugging Face name or directory, or ``zoo:lm/...``; ``llm_kind``
    ``causal`` (AutoModelForCausalLM: OPT, GPT-2, Llama) or ``seq2seq``
    (AutoModelForSeq2SeqLM: T5/Flan-T5), None = from the LLM's config.
    ``caption_prompt`` precedes captions; ``vqa_prompt`` formats questions;
    ``instruction_aware``: the question is also fed to the Q-Former.
    ``llm_precision``: ``bf16``/``fp16`` for the frozen LLM. ``checkpoint_llm``: keep
    the frozen LLM's weights in checkpoints (else they are reloaded from ``llm``).
    """

    stage1: str | None = None
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(output_layer=-2))
    qformer: TextConfig = field(default_factory=lambda: TextConfig(impl="bert", tokenizer="bert-base-uncased",
                                                                   context_length=32))
    num_queries: int = 32
    cross_attention_every: int = 2
    llm: str = "facebook/opt-2.7b"
    llm_kind: str | None = None
    caption_prompt: str = "a photo of"
    vqa_prompt: str = "Question: {} Answer:"
    instruction_aware: bool = False
    max_text_length: int = 64
    frozen_precision: str | None = None
    llm_precision: str | None = None
    checkpoint_llm: bool = False
    train_vqa: bool = True  # add the LM loss of one QA pair per image when the data has them
    cache_image_features: bool = False  # as BLIP2Config


@dataclass
class CausalLMConfig:
    """A small causal LM trained by vlzoo on the training text (each image's captions
    and ``vqa_prompt``-formatted QA pairs, after a caption of the same image when
    ``qa_context``; with ``caption_context`` each caption also follows another caption
    of its image): the frozen LM of the shapes BLIP-2. Answering and describing from a
    preceding description is what lets stage 2 put a soft visual prompt in its place.

    ``architecture``: a transformers model type (``gpt2``, ``opt``, ``llama``, ...);
    ``kwargs``: its config fields (sizes); ``tokenizer``: ``shapes`` or a Hugging Face name.
    """

    architecture: str = "gpt2"
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokenizer: str = "shapes"
    vqa_prompt: str = "Question: {} Answer:"
    max_text_length: int = 48
    qa_context: bool = True  # a QA pair follows a caption of its image: the LM learns to answer from context
    caption_context: bool = False  # a caption also follows another caption of its image: it learns to describe
                                   # a scene it has read about (what a soft visual prompt then stands for)
    add_bos: bool = True  # the shapes tokenizer: start each text with [CLS] (GPT-2 style: no BOS)


@dataclass
class OptimConfig:
    """AdamW with a linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 5e-4
    weight_decay: float = 0.2
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    warmup_steps: int = 100
    min_lr_ratio: float = 0.0
    max_nonfinite_steps: int = 10  # consecutive steps with non-finite gradients skipped before the run stops
    fused: bool | None = None  # AdamW's fused kernel; None: where torch has one for the parameters (plain
                               # tensors on CPU or CUDA; FSDP2's sharded DTensors keep the foreach kernel)
    compile: bool | str = False  # torch.compile what training_step calls on the model, in place, keys unchanged;
                                 # true: the default backend (inductor), a string: that backend. The first steps
                                 # (and each new text length) compile; no family's step breaks the graph
    micro_batches: int = 1  # k > 1: each batch runs as k feature-cached micro-batches (clip, albef, blip, blip2
                            # stage 1): the loss and gradients of the whole batch (every negative, the same
                            # queue and hard negatives; exactly so without dropout) at about one micro-batch's
                            # activation memory, for one extra forward pass. Unlike
                            # trainer.accumulate_grad_batches, contrastive losses see the whole batch. Refused
                            # with batch norm, under FSDP and with compile (vlzoo.layers.micro_batches)


@dataclass
class LoRAConfig:
    """LoRA adapters (through ``peft``) of rank ``rank`` (0: none) on the linear layers
    whose names end with one of ``targets`` inside the model parts ``parts``; those
    parts' own weights are frozen."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["qkv", "query", "value", "q_proj", "v_proj", "c_attn"])
    parts: list[str] = field(default_factory=lambda: ["vision", "text", "llm"])


@dataclass
class FinetuneConfig:
    """How a task starts from pretrained weights and what it trains (``vlzoo finetune``).

    ``init_from``: a manifest name, checkpoint, run or export directory whose weights
    start the model (loaded strictly at the start of fit/validate/test; a resumed run
    takes its own checkpoint's). ``freeze``: model parts (``vision``, ``text``, ``llm``,
    ``qformer``) or parameter-name prefixes that do not train. ``layer_decay``:
    layer-wise learning-rate decay, block i of a tower of depth L trains at
    ``lr * layer_decay ** (L - i)`` (embeddings one step lower, 1.0 = off).
    ``grad_checkpointing``: recompute the blocks' activations in the backward pass.
    ``lora``: LoRA adapters instead of full fine-tuning of the large parts (``rank`` > 0).
    ``losses``: train only these of the family's losses (e.g. ``[lm]`` for BLIP captioning).
    """

    init_from: str | None = None
    freeze: list[str] = field(default_factory=list)
    layer_decay: float = 1.0
    grad_checkpointing: bool = False
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    losses: list[str] | None = None


RERANK_ITC_TERMS = ("cosine", "logit", "none")
ITM_SCORES = ("margin", "match_logit")


@dataclass
class EvalConfig:
    """Evaluation settings shared by the families."""

    zeroshot_templates: list[str] = field(
        default_factory=lambda: ["a photo of a {}", "a {}", "there is a {}", "a picture of a {}"]
    )
    text_batch_size: int = 512
    rerank_k: int = 128  # ITM reranks the top k ITC candidates per query (ALBEF, BLIP, BLIP-2)
    # the reranked score is the ITM logit + rerank_itc_weight x the ITC term: "cosine" (as LAVIS for
    # BLIP and BLIP-2), "logit" (cosine / the learned temperature: ITC's own scale) or "none" (ITM alone)
    rerank_itc: str = "cosine"
    rerank_itc_weight: float = 1.0
    itm_batch_size: int = 256
    # the ITM term: "margin" (match minus no-match logit) or "match_logit" (the match logit alone,
    # what ALBEF's, BLIP's and BLIP-2's released code rank by; vlzoo eval uses the family's protocol)
    itm_score: str = "margin"

    def __post_init__(self) -> None:
        if self.rerank_itc not in RERANK_ITC_TERMS:
            raise ValueError(f"eval.rerank_itc must be one of {RERANK_ITC_TERMS}, got {self.rerank_itc!r}")
        if self.itm_score not in ITM_SCORES:
            raise ValueError(f"eval.itm_score must be one of {ITM_SCORES}, got {self.itm_score!r}")


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


def as_config(value: object, schema: type, where: str):
    """``value`` as a ``schema`` dataclass: as is, or built from a plain dict (what
    LightningCLI stores in checkpoints); an unknown or mistyped field is an error
    naming ``where``."""
    if isinstance(value, schema):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a {schema.__name__} or a dict, got {type(value).__name__}")
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
    except Exception as err:
        raise ValueError(f"{where}: does not match {schema.__name__}: {err}") from err
