"""BLIP from transformers directories: ``BlipForImageTextRetrieval`` (ITC + ITM),
``BlipForConditionalGeneration`` (captioning) and ``BlipForQuestionAnswering`` (VQA).

The vision tower becomes a timm ViT (same pre-norm block, fused ``qkv``); the text
models map one to one onto vlzoo's shared BERT-style block (same parameter names).

- Retrieval -> :class:`~vlzoo.models.BLIP`. The checkpoint holds no captioning decoder
  (its self-attention and LM head transform/bias stay at initialisation), so no
  ``generate``.
- Captioning -> :class:`~vlzoo.models.BLIP`: the decoder's self-attention is the
  decoder's own; its cross-attention and feed-forward are the modules BLIP shares with
  the text encoder, so they land there. The checkpoint holds no text-encoder
  self-attention, projections or ITM head, so no ``encode``/``itm``.
- VQA -> :class:`~vlzoo.models.blip_vqa.BLIPVQA` (question encoder + separate answer
  decoder), with every weight present.

Momentum copies (``*_m``) receive the online weights; the feature queue and the
temperature (which transformers' BLIP does not keep) stay at initialisation: they are
only used when training.

Token ids come from the transformers config: [DEC] = ``text_config.bos_token_id``,
end of text = ``sep_token_id`` (what transformers' ``generate`` stops at), padding =
``pad_token_id``. [ENC] is not in the config: BLIP's tokenizer adds [DEC] then [ENC],
so [ENC] = [DEC] + 1 (``text_config.enc_token_id`` overrides). transformers does *not*
put [ENC] first for ITM or VQA questions (it keeps the processor's [CLS]); vlzoo, like
the original BLIP the weights were trained with, does. Captions start with BLIP's prompt
"a picture of " when the directory has a tokenizer (transformers' ``generate`` starts
from [DEC] alone: pass the prompt "" for that).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlzoo.backbones.vision import TimmVisionEncoder
from vlzoo.config import BLIPConfig, TextConfig, VisionConfig
from vlzoo.data.pipelines import pipeline_statistics, transformers_pipeline
from vlzoo.data.tokenizers import HFTokenizer
from vlzoo.hub.convert import LoadedParts, rename_keys
from vlzoo.hub.convert.hf import hf_vit_rules, hf_weights, timm_mlp_ratio
from vlzoo.hub.convert.precision import cast_parts
from vlzoo.layers.transformer import BertConfig
from vlzoo.models.blip import BLIP
from vlzoo.models.blip_vqa import BLIPVQA
from vlzoo.models.builders import BlipTokenIds, build_blip_from_hf, build_blip_vqa, prompt_prefix
from vlzoo.weights import load_strict

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RETRIEVAL, CAPTIONING, VQA = "BlipForImageTextRetrieval", "BlipForConditionalGeneration", "BlipForQuestionAnswering"
ARCHITECTURES: dict[str, tuple[str, frozenset[str]]] = {  # architecture -> (family, capabilities)
    RETRIEVAL: ("blip", frozenset({"encode", "itm"})),
    CAPTIONING: ("blip", frozenset({"generate"})),
    VQA: ("blip_vqa", frozenset({"vqa"})),
}

# transformers' BlipTextConfig / BlipVisionConfig / BlipConfig defaults: config.json
# files written with ``use_diff`` leave out the fields that equal them.
TEXT_DEFAULTS: dict[str, Any] = dict(
    vocab_size=30524, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=8,
    max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
    attention_probs_dropout_prob=0.0, initializer_range=0.02, bos_token_id=30522, pad_token_id=0, sep_token_id=102,
)
VISION_DEFAULTS: dict[str, Any] = dict(
    hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, image_size=384,
    patch_size=16, hidden_act="gelu", layer_norm_eps=1e-5,
)
EMBED_DIM_DEFAULT = 256  # BlipConfig.image_text_hidden_size

# The ITC queue is only read when training; transformers' checkpoints carry none. 4096
# entries cost 2 x 4096 x D floats (8 MB at D = 256) and divide every power-of-two global
# batch up to 4096 (the queue-size check of training). BLIP's own recipes used 57600.
QUEUE_SIZE = 4096
CAPTION_PROMPT = BLIPConfig.prompt  # "a picture of ", BLIP's captioning prompt
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
_TIMM_NAMES = {(768, 12): "vit_base_patch16_224", (1024, 24): "vit_large_patch16_224"}


# ------------------------------------------------------------------------ configs
def hf_text_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The text config of a transformers ``BlipConfig`` dict, defaults filled in."""
    return {**TEXT_DEFAULTS, **(hf_config.get("text_config") or {})}


def hf_vision_config(hf_config: dict[str, Any]) -> dict[str, Any]:
    """The vision config of a transformers ``BlipConfig`` dict, defaults filled in."""
    vision = {**VISION_DEFAULTS, **(hf_config.get("vision_config") or {})}
    for key in ("image_size", "patch_size"):
        if isinstance(vision[key], (list, tuple)):
            if len(set(vision[key])) != 1:
                raise ValueError(f"BLIP vision_config.{key} {vision[key]}: only square sizes are supported")
            vision[key] = vision[key][0]
    return vision


def hf_architecture(hf_config: dict[str, Any]) -> str:
    """``architectures[0]`` of a transformers config; an unsupported one is an error."""
    names = hf_config.get("architectures") or [None]
    if names[0] not in ARCHITECTURES:
        raise ValueError(f"transformers BLIP architecture {names[0]!r} is not supported; "
                         f"supported: {sorted(ARCHITECTURES)}")
    return names[0]


def blip_token_ids(hf_config: dict[str, Any]) -> BlipTokenIds:
    """[ENC]/[DEC]/pad/end-of-text ids from the transformers config (see the module docstring)."""
    text = hf_text_config(hf_config)
    dec = int(text["bos_token_id"])
    ids = BlipTokenIds(enc=int(text.get("enc_token_id", dec + 1)), dec=dec, pad=int(text["pad_token_id"]),
                       eos=int(text["sep_token_id"]))
    bad = {k: v for k, v in dataclasses.asdict(ids).items() if not 0 <= v < text["vocab_size"]}
    if bad:
        raise ValueError(f"BLIP token ids {bad} are outside the vocabulary of {text['vocab_size']}")
    return ids


def blip_config_from_hf(
    hf_config: dict[str, Any], tokenizer: str = "bert-base-uncased", preprocess: dict[str, Any] | None = None,
    prompt: str = "",
) -> BLIPConfig:
    """A vlzoo :class:`BLIPConfig` from a transformers ``BlipConfig`` dict (config.json).

    ``tokenizer``: the text tokenizer's name or directory; ``preprocess``: ``mean``,
    ``std``, ``interpolation`` overriding BLIP's (OpenAI CLIP mean/std, bicubic: the
    ``BlipImageProcessor`` defaults); ``prompt``: what captions start with after [DEC]
    ("": [DEC] alone, as transformers' ``generate`` without ``input_ids``).
    """
    pre = preprocess or {}
    text = hf_text_config(hf_config)
    return BLIPConfig(
        vision=_vision_config(hf_vision_config(hf_config), pre),
        text=TextConfig(impl="bert", tokenizer=tokenizer, pooling="cls",
                        context_length=int(text["max_position_embeddings"]),  # transformers' processor
                        kwargs=_bert_kwargs(text)),
        embed_dim=int(hf_config.get("image_text_hidden_size", EMBED_DIM_DEFAULT)),
        queue_size=QUEUE_SIZE,
        prompt=prompt,
    )


def _vision_config(vision: dict[str, Any], pre: dict[str, Any]) -> VisionConfig:
    """A timm ViT with BLIP's sizes and LayerNorm epsilon."""
    if vision["hidden_act"] != "gelu":
        raise ValueError(f"BLIP vision_config.hidden_act {vision['hidden_act']!r}: only 'gelu' is supported")
    width, depth = int(vision["hidden_size"]), int(vision["num_hidden_layers"])
    kwargs = dict(patch_size=int(vision["patch_size"]), embed_dim=width, depth=depth,
                  num_heads=int(vision["num_attention_heads"]),
                  mlp_ratio=timm_mlp_ratio(width, int(vision["intermediate_size"])),
                  qkv_bias=True, norm_eps=float(vision["layer_norm_eps"]))
    defaults = VisionConfig()
    return VisionConfig(impl="timm", name=_TIMM_NAMES.get((width, depth), "vit_base_patch16_224"),
                        image_size=int(vision["image_size"]), kwargs=kwargs,
                        mean=tuple(pre.get("mean", defaults.mean)), std=tuple(pre.get("std", defaults.std)),
                        interpolation=pre.get("interpolation", "bicubic"), resize_mode="squash")


def _bert_kwargs(text: dict[str, Any]) -> dict[str, Any]:
    """BertConfig fields of BLIP's text model (no token-type embeddings)."""
    if text["hidden_act"] not in ("gelu", "gelu_new", "relu"):
        raise ValueError(f"BLIP text_config.hidden_act {text['hidden_act']!r} is not supported")
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "hidden_act", "pad_token_id", "initializer_range")
    return {**{k: text[k] for k in names}, "type_vocab_size": 0}


# -------------------------------------------------------------------- key maps
_P = r"\.(weight|bias)"
_SUB = r"(?:self\.(?:query|key|value)|output\.(?:dense|LayerNorm))"  # inside (cross)attention
_FFN = r"(?:intermediate\.dense|output\.(?:dense|LayerNorm))"

VISION_RULES = hf_vit_rules("vision.model", "vision.model.norm")  # BlipVisionModel -> timm ViT
HEAD_RULES = [  # ITC projections and ITM head keep their names
    (rf"(vision_proj|text_proj|itm_head){_P}", r"\1.\2"),
]


def _embedding_rules(src: str, dst: str) -> list[tuple[str, str]]:
    """BlipTextEmbeddings under ``src`` -> vlzoo BertEmbeddings under ``dst``."""
    return [
        (rf"{src}embeddings\.(word_embeddings|position_embeddings)\.weight", rf"{dst}embeddings.\1.weight"),
        (rf"{src}embeddings\.LayerNorm{_P}", rf"{dst}embeddings.LayerNorm.\1"),
        (rf"{src}embeddings\.position_ids", ""),  # a buffer older exports carry
    ]


def _text_rules(src: str, dst: str) -> list[tuple[str, str]]:
    """A whole BlipTextModel under ``src`` -> a BertTextEncoder under ``dst`` (same block names)."""
    layer = rf"{src}encoder\.layer\.(\d+)\.((?:attention|crossattention)\.{_SUB}|{_FFN}){_P}"
    return [*_embedding_rules(src, dst), (layer, rf"{dst}encoder.layer.\1.\2.\3")]


def _lm_head_rules(dst: str) -> list[tuple[str, str]]:
    """BlipTextOnlyMLMHead -> LMHead; the tied decoder weight/bias are dropped (checked first)."""
    return [
        (rf"text_decoder\.cls\.predictions\.transform\.(dense|LayerNorm){_P}", rf"{dst}transform.\1.\2"),
        (r"text_decoder\.cls\.predictions\.bias", f"{dst}bias"),
        (rf"text_decoder\.cls\.predictions\.decoder{_P}", ""),
    ]


CAPTION_DECODER_RULES = [  # self-attention: the decoder's own; the rest: shared with the text encoder
    *_embedding_rules(r"text_decoder\.bert\.", "text."),
    (rf"text_decoder\.bert\.encoder\.layer\.(\d+)\.(attention\.{_SUB}){_P}", r"decoder.layer.\1.\2.\3"),
    (rf"text_decoder\.bert\.encoder\.layer\.(\d+)\.(crossattention\.{_SUB}|{_FFN}){_P}",
     r"text.encoder.layer.\1.\2.\3"),
    *_lm_head_rules("lm_head."),
]
RULES: dict[str, list[tuple[str, str]]] = {
    RETRIEVAL: [*VISION_RULES, *_text_rules(r"text_encoder\.", "text."), *HEAD_RULES],
    CAPTIONING: [*VISION_RULES, *CAPTION_DECODER_RULES],
    VQA: [*VISION_RULES, *_text_rules(r"text_encoder\.", "text."), *_text_rules(r"text_decoder\.bert\.",
          "answer_decoder."), *_lm_head_rules("lm_head.")],
}
TIED = (  # transformers' tied LM-head tensors: (tied copy, source)
    ("text_decoder.cls.predictions.decoder.weight", "text_decoder.bert.embeddings.word_embeddings.weight"),
    ("text_decoder.cls.predictions.decoder.bias", "text_decoder.cls.predictions.bias"),
)


# ------------------------------------------------------------------ conversion
def convert_hf_blip_state(
    state: dict[str, Tensor], hf_config: dict[str, Any], architecture: str
) -> tuple[dict[str, Tensor], tuple[str, ...], frozenset[str]]:
    """A transformers BLIP state dict -> (vlzoo state dict, ``absent``, capabilities).

    ``absent``: substrings of the vlzoo model's keys that the source does not hold (load
    with ``load_strict(..., allow_missing=absent)``); they stay at initialisation.
    Momentum copies and the tied decoder/LM-head entries are filled in here.
    """
    if architecture not in ARCHITECTURES:
        raise ValueError(f"transformers BLIP architecture {architecture!r} is not supported; "
                         f"supported: {sorted(ARCHITECTURES)}")
    _check_tied(state, architecture)
    out = rename_keys(state, RULES[architecture], source=f"transformers {architecture} checkpoint")
    _check_shapes(out, _expected_shapes(hf_config, architecture), architecture)
    depth = int(hf_text_config(hf_config)["num_hidden_layers"])
    if architecture == VQA:
        _alias(out, "lm_head.decoder.weight", "answer_decoder.embeddings.word_embeddings.weight")
    else:
        _add_blip_aliases(out)
    return out, _absent(architecture, depth), ARCHITECTURES[architecture][1]


def _check_tied(state: dict[str, Tensor], architecture: str) -> None:
    """vlzoo ties the LM head to the word embeddings: refuse a checkpoint that does not."""
    for copy, source in TIED:
        if copy in state and source in state and not state[copy].equal(state[source]):
            raise ValueError(f"transformers {architecture} checkpoint: {copy} differs from {source} "
                             "(an untied LM head is not supported)")


def _expected_shapes(hf_config: dict[str, Any], architecture: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the size-defining tensors, from the config."""
    text, vision = hf_text_config(hf_config), hf_vision_config(hf_config)
    dv, dt, vocab = vision["hidden_size"], text["hidden_size"], text["vocab_size"]
    patches = (vision["image_size"] // vision["patch_size"]) ** 2
    shapes = {
        "vision.model.cls_token": (1, 1, dv),
        "vision.model.pos_embed": (1, patches + 1, dv),
        "vision.model.patch_embed.proj.weight": (dv, 3, vision["patch_size"], vision["patch_size"]),
        "vision.model.blocks.0.attn.qkv.weight": (3 * dv, dv),
        "vision.model.blocks.0.mlp.fc1.weight": (vision["intermediate_size"], dv),
        "text.embeddings.word_embeddings.weight": (vocab, dt),
        "text.embeddings.position_embeddings.weight": (text["max_position_embeddings"], dt),
        "text.encoder.layer.0.crossattention.self.key.weight": (dt, dv),
        "text.encoder.layer.0.intermediate.dense.weight": (text["intermediate_size"], dt),
    }
    embed = hf_config.get("image_text_hidden_size", EMBED_DIM_DEFAULT)
    if architecture == RETRIEVAL:
        shapes.update({"vision_proj.weight": (embed, dv), "text_proj.weight": (embed, dt), "itm_head.weight": (2, dt)})
    if architecture == VQA:
        shapes.update({"answer_decoder.embeddings.word_embeddings.weight": (vocab, dt),
                       "answer_decoder.encoder.layer.0.crossattention.self.key.weight": (dt, dt)})
    if architecture != RETRIEVAL:
        shapes["lm_head.bias"] = (vocab,)
    return shapes


def _check_shapes(state: dict[str, Tensor], expected: dict[str, tuple[int, ...]], architecture: str) -> None:
    wrong = [f"{k}: {tuple(state[k].shape)}, config says {v}" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v)]
    if wrong:
        raise ValueError(f"transformers {architecture} checkpoint does not match its config.json: {wrong}")


def _add_blip_aliases(state: dict[str, Tensor]) -> None:
    """In place: the names under which vlzoo's BLIP holds tensors a second time — the
    decoder's shared cross-attention/feed-forward, the LM head's tied weight — and the
    momentum copies of every online module present."""
    for key in [k for k in state if k.startswith("text.encoder.layer.")]:
        index, rest = key.removeprefix("text.encoder.layer.").split(".", 1)
        if not rest.startswith("attention."):
            state[f"decoder.layer.{index}.{rest}"] = state[key]
    _alias(state, "lm_head.decoder.weight", "text.embeddings.word_embeddings.weight")
    for online, twin in BLIP.momentum_pairs:
        for key in [k for k in state if k.startswith(online + ".")]:
            state[twin + key[len(online):]] = state[key]


def _alias(state: dict[str, Tensor], name: str, source: str) -> None:
    """``state[name] = state[source]`` when present (a missing source is reported by the strict load)."""
    if source in state:
        state[name] = state[source]


def _absent(architecture: str, depth: int) -> tuple[str, ...]:
    """Key substrings of the vlzoo model that a checkpoint of ``architecture`` lacks."""
    if architecture == VQA:
        return ()
    training_only = ("temp", "queue.")  # transformers keeps neither
    if architecture == RETRIEVAL:  # no captioning decoder: its self-attention, LM head transform and bias
        decoder = tuple(f"decoder.layer.{i}.attention." for i in range(depth))
        return training_only + decoder + ("lm_head.transform.", "lm_head.bias")
    encoder = tuple(f"{t}.encoder.layer.{i}.attention." for t in ("text", "text_m") for i in range(depth))
    return training_only + ("vision_proj", "text_proj", "itm_head") + encoder  # captioning


# ---------------------------------------------------------------------- models
def hf_blip_parts(
    state: dict[str, Tensor], hf_config: dict[str, Any], tokenizer_dir: Path | None = None, source: str = "",
    preprocess: dict[str, Any] | None = None,
) -> LoadedParts:
    """Convert a transformers BLIP state dict (``hf_config`` its config.json) and load it
    strictly into the vlzoo model; the tokenizer is read from ``tokenizer_dir`` (None:
    none). With a tokenizer, captions start with BLIP's prompt "a picture of " (the
    released captioners were fine-tuned after it); without one, with [DEC] alone."""
    architecture = hf_architecture(hf_config)
    converted, absent, capabilities = convert_hf_blip_state(state, hf_config, architecture)
    has_tokenizer = tokenizer_dir is not None
    cfg = blip_config_from_hf(hf_config, str(tokenizer_dir) if has_tokenizer else "bert-base-uncased", preprocess,
                              prompt=CAPTION_PROMPT if has_tokenizer else "")
    ids = blip_token_ids(hf_config)
    tokenizer = _tokenizer(tokenizer_dir, cfg, ids) if has_tokenizer else None
    family = ARCHITECTURES[architecture][0]
    if architecture == VQA:
        model: nn.Module = build_blip_vqa(cfg, ids)
    else:
        prompt_ids = prompt_prefix(tokenizer, cfg.prompt)[1:] if tokenizer is not None else []
        model = build_blip_from_hf(cfg, ids, prompt_ids)
    load_strict(model, converted, source=source or f"transformers {architecture} checkpoint", allow_missing=absent)
    extra = {"architecture": architecture, "absent": absent, "token_ids": ids}
    return LoadedParts(family, model.eval(), cfg, cfg.vision, tokenizer, capabilities, source, extra)


def _tokenizer(directory: Path, cfg: BLIPConfig, ids: BlipTokenIds) -> HFTokenizer:
    """The directory's tokenizer, its special ids set to the model's (the config's)."""
    tokenizer = HFTokenizer(str(directory), context_length=cfg.text.context_length, blip_tokens=True)
    vocab = cfg.text.kwargs["vocab_size"]
    if tokenizer.vocab_size > vocab:
        raise ValueError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens, the text model {vocab}")
    tokenizer.info = dataclasses.replace(tokenizer.info, enc_id=ids.enc, dec_id=ids.dec, pad_id=ids.pad,
                                         eos_id=ids.eos)
    return tokenizer


def load_hf_blip(directory: Path, hf_config: dict[str, Any], dtype: torch.dtype | None = None) -> LoadedParts:
    """A transformers BLIP directory: config.json (``hf_config``), weights
    (``model.safetensors``, ``pytorch_model.bin`` or sharded), optional tokenizer files
    and ``preprocessor_config.json``; cast to ``dtype`` after loading
    (:func:`vlzoo.hub.convert.precision.cast_parts`)."""
    directory = Path(directory)
    architecture = hf_architecture(hf_config)  # fail before reading weights
    has_tokenizer = any((directory / name).is_file() for name in TOKENIZER_FILES)
    pipeline = transformers_pipeline(directory)
    parts = hf_blip_parts(hf_weights(directory), hf_config, directory if has_tokenizer else None,
                          f"{directory} ({architecture})", pipeline_statistics(pipeline))
    return cast_parts(dataclasses.replace(parts, pipeline=pipeline), dtype)


# ------------------------------------------------------ export (vlzoo -> transformers)
HEADS = {"retrieval": RETRIEVAL, "captioning": CAPTIONING, "vqa": VQA}


def to_hf_blip(parts: LoadedParts, head: str | None = None) -> PreTrainedModel:
    """A vlzoo BLIP (``blip``) or BLIP VQA (``blip_vqa``) as a transformers
    ``PreTrainedModel`` holding its weights (eval mode), ready for ``save_pretrained``.

    The class follows the capabilities: ``blip_vqa`` -> ``BlipForQuestionAnswering``;
    ``itm`` -> ``BlipForImageTextRetrieval``; ``generate`` alone ->
    ``BlipForConditionalGeneration``. transformers splits a BLIP that has both (one
    trained by vlzoo: encoder and decoder) across two classes: the retrieval model is
    exported unless ``head="captioning"`` (``head``: ``"retrieval"``, ``"captioning"``,
    ``"vqa"`` or None for the default).

    What is exported: retrieval — vision tower, text encoder, ITC projections, ITM head;
    captioning — vision tower, the decoder (its own self-attention, the cross-attention
    and feed-forward it shares with the encoder, the shared embeddings) and the LM head;
    VQA — everything. Not exported, as transformers' classes have no place for them:
    momentum copies, feature queue and temperature (training only; transformers' ITC
    score is the plain cosine), and the half of a two-headed BLIP the other class holds.
    A text model with token-type embeddings (vlzoo's default for models it trains) has
    the type-0 row, the only one BLIP feeds, added to its position embeddings.
    Special ids go to ``text_config``: [DEC] = ``bos_token_id``, end of text =
    ``sep_token_id``/``eos_token_id``, padding = ``pad_token_id``, and ``enc_token_id``
    when [ENC] is not [DEC] + 1. Captions' prompt and the image preprocessing are not
    part of a transformers model config: they are not exported.
    """
    import transformers

    architecture = _export_architecture(parts, head)
    model = parts.model
    config = transformers.BlipConfig(**_hf_blip_config(model, architecture))
    hf = getattr(transformers, architecture)(config).eval()
    hf_state = hf.state_dict()
    config_dict = {**config.to_dict(), "architectures": [architecture]}
    converted, absent, _ = convert_hf_blip_state(hf_state, config_dict, architecture)
    ours = fold_token_types(model.state_dict())
    check_all_exported(ours, converted, (*absent, "token_type_embeddings"), f"vlzoo {parts.family} -> {architecture}")
    hf.load_state_dict(invert_conversion(hf_state, converted, ours, TIED), strict=True)
    return hf


def _export_architecture(parts: LoadedParts, head: str | None) -> str:
    """The transformers class for ``parts`` and ``head`` (see :func:`to_hf_blip`)."""
    if not isinstance(parts.model, BLIP | BLIPVQA):
        raise ValueError(f"to_hf_blip exports BLIP and BLIP VQA models, not {parts.family!r}")
    if head is not None and head not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)} or None, got {head!r}")
    is_vqa = isinstance(parts.model, BLIPVQA)
    if is_vqa or head == "vqa":
        if not is_vqa or head not in (None, "vqa"):
            raise ValueError(f"head {head!r} does not fit a {parts.family} model")
        return VQA
    caps = parts.capabilities
    head = head or ("retrieval" if "itm" in caps else "captioning")
    needs = {"retrieval": "itm", "captioning": "generate"}[head]
    if needs not in caps:
        raise ValueError(f"head {head!r} needs a model with capability {needs!r}; this one has {sorted(caps)} "
                         "(the part that head exports was never trained)")
    return HEADS[head]


def _hf_blip_config(model: nn.Module, architecture: str) -> dict[str, Any]:
    """``BlipConfig`` keyword arguments for ``model`` (the inverse of :func:`blip_config_from_hf`)."""
    vision = hf_vit_config(model.vision, "BLIP", final_norm=True)
    if vision["qkv_bias"] is False:
        raise ValueError("BLIP: transformers' BLIP vision attention always has a qkv bias; this ViT has none")
    del vision["qkv_bias"]
    text = model.text
    if architecture == RETRIEVAL and (text.pooling != "cls" or model.text_layers != slice(None)):
        raise ValueError(f"BLIP: transformers' retrieval model takes the text feature from [CLS] after every "
                         f"layer; this model pools {text.pooling!r} over layers {model.text_layers}")
    if architecture == VQA:
        _check_vqa_sizes(model, vision["hidden_size"])
    ids = BlipTokenIds(enc=model.enc_id, dec=model.dec_id, pad=model.pad_id, eos=model.eos_id)
    return dict(vision_config=vision, text_config=_hf_text_config(text.config, ids),
                image_text_hidden_size=model.vision_proj.out_features if architecture == RETRIEVAL
                else EMBED_DIM_DEFAULT)


def _check_vqa_sizes(model: nn.Module, vision_width: int) -> None:
    """transformers' VQA model has one text config for both text models, and its answer
    decoder's cross-attention reads ``vision_config.hidden_size`` wide states."""
    sizes = {k: v for k, v in dataclasses.asdict(model.text.config).items() if k != "type_vocab_size"}
    other = {k: v for k, v in dataclasses.asdict(model.answer_decoder.config).items() if k != "type_vocab_size"}
    if sizes != other:
        raise ValueError(f"BLIP VQA: transformers needs equal question-encoder and answer-decoder configs; "
                         f"they differ in {sorted(k for k in sizes if sizes[k] != other[k])}")
    if model.text.width != vision_width:
        raise ValueError(f"BLIP VQA: transformers' answer decoder needs text width {model.text.width} == "
                         f"vision width {vision_width}")


def _hf_text_config(cfg: BertConfig, ids: BlipTokenIds) -> dict[str, Any]:
    """``BlipTextConfig`` fields of a vlzoo BERT-style text model with BLIP's special ids."""
    names = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "max_position_embeddings", "hidden_act", "layer_norm_eps", "hidden_dropout_prob",
             "attention_probs_dropout_prob", "initializer_range")
    text = {k: getattr(cfg, k) for k in names}
    text.update(pad_token_id=ids.pad, bos_token_id=ids.dec, sep_token_id=ids.eos, eos_token_id=ids.eos)
    if ids.enc != ids.dec + 1:  # read back by blip_token_ids
        text["enc_token_id"] = ids.enc
    return text


def hf_vit_config(encoder: nn.Module, what: str, final_norm: bool) -> dict[str, Any]:
    """Sizes of a vlzoo timm ViT as transformers' BLIP/BLIP-2 vision config (``hidden_size``,
    ..., ``layer_norm_eps``, ``qkv_bias``), over the blocks it runs. ``final_norm``: the
    tokens pass the ViT's final LayerNorm (BLIP's ``post_layernorm``); otherwise they must
    not (BLIP-2, whose ``post_layernorm`` is ``ln_vision``). Anything transformers' plain
    pre-norm ViT cannot express is an error naming it."""
    vit = getattr(encoder, "model", None)
    if not isinstance(encoder, TimmVisionEncoder) or type(vit).__name__ != "VisionTransformer":
        kind = type(vit if isinstance(encoder, TimmVisionEncoder) else encoder).__name__
        raise ValueError(f"{what}: transformers' vision model is a plain ViT (timm VisionTransformer); "
                         f"a {kind} tower cannot be expressed")
    blocks = list(vit.blocks)[: encoder._blocks_to_run]
    runs_all = len(blocks) == len(vit.blocks)
    if final_norm and not runs_all:
        raise ValueError(f"{what}: transformers applies post_layernorm after the last block; this tower stops "
                         f"after block {len(blocks)} of {len(vit.blocks)} (output_layer {encoder.output_layer})")
    last_norm, problems = _final_norm(vit, runs_all, final_norm)
    problems += _vit_problems(vit, blocks)
    norms = [m for b in blocks for m in (b.norm1, b.norm2)] + last_norm
    qkv_bias = {b.attn.qkv.bias is not None for b in blocks}
    if len(qkv_bias) > 1:
        problems.append("qkv bias in some blocks only")
    eps = {m.eps for m in norms if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        problems.append(f"LayerNorm epsilons {sorted(eps)} (transformers has one layer_norm_eps)")
    if problems:
        raise ValueError(f"{what}: transformers' vision model cannot express this timm ViT: {'; '.join(problems)}")
    return _vit_sizes(vit, blocks, eps.pop() if eps else 1e-6, qkv_bias.pop())


def _final_norm(vit: nn.Module, runs_all: bool, final_norm: bool) -> tuple[list[nn.Module], list[str]]:
    """The ViT's final norm as the tokens pass it ([] or [norm]), and what is wrong with it:
    BLIP needs a LayerNorm there (``post_layernorm``); BLIP-2 none (``ln_vision`` follows)."""
    applied = runs_all and not _identity(vit.norm)  # a tower stopped early never reaches it
    if final_norm:
        if applied and isinstance(vit.norm, nn.LayerNorm):
            return [vit.norm], []
        return [], ["no final LayerNorm (post_layernorm)"]
    return [], ["a final norm before ln_vision (transformers has one LayerNorm there)"] if applied else []


def _vit_problems(vit: nn.Module, blocks: list[nn.Module]) -> list[str]:
    """What a timm VisionTransformer has that transformers' BLIP vision model lacks."""
    embed = vit.patch_embed
    if type(embed).__name__ != "PatchEmbed":
        return [f"a {type(embed).__name__} patch embedding"]
    problems = []
    checks = {
        "no class token": vit.cls_token is None,
        "register tokens": bool(getattr(vit, "num_reg_tokens", 0)),
        "no position embedding, or none on the class token": vit.pos_embed is None or vit.no_embed_class,
        "a LayerNorm before the blocks (norm_pre)": not isinstance(vit.norm_pre, nn.Identity),
        "dynamic image size or padding": bool(getattr(vit, "dynamic_img_size", False))
        or bool(getattr(embed, "dynamic_img_pad", False)),
        "a normalised or bias-free patch embedding": not _identity(embed.norm) or embed.proj.bias is None,
        "non-square images or patches": len(set(embed.img_size)) != 1 or len(set(embed.patch_size)) != 1,
    }
    problems += [name for name, bad in checks.items() if bad]
    for i, block in enumerate(blocks):
        problems += [f"block {i}: {p}" for p in _block_problems(block)]
    return problems


def _identity(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, nn.Identity)


def _block_problems(block: nn.Module) -> list[str]:
    """What a timm ViT block has beyond pre-norm attention + GELU MLP with biases."""
    attn, mlp = block.attn, block.mlp
    kinds = {"block": (block, "Block"), "attention": (attn, "Attention"), "MLP": (mlp, "Mlp")}
    wrong = [f"a {type(m).__name__} {what}" for what, (m, name) in kinds.items() if type(m).__name__ != name]
    if wrong:
        return wrong
    act = mlp.act
    checks = {
        "q/k normalisation": not (_identity(getattr(attn, "q_norm", None)) and _identity(getattr(attn, "k_norm", None))),
        "attention output normalisation": not _identity(getattr(attn, "norm", None)),
        "layer scale": not (_identity(getattr(block, "ls1", None)) and _identity(getattr(block, "ls2", None))),
        "an MLP normalisation": not _identity(getattr(mlp, "norm", None)),
        f"activation {act}": not (isinstance(act, nn.GELU) and act.approximate == "none"),
        "non-LayerNorm norms": not (isinstance(block.norm1, nn.LayerNorm) and isinstance(block.norm2, nn.LayerNorm)),
        "bias-free linear layers": any(m.bias is None for m in (attn.proj, mlp.fc1, mlp.fc2)),
    }
    return [name for name, bad in checks.items() if bad]


def _vit_sizes(vit: nn.Module, blocks: list[nn.Module], eps: float, qkv_bias: bool) -> dict[str, Any]:
    """transformers' vision config fields of a checked timm ViT over ``blocks``."""
    width = vit.embed_dim
    return dict(hidden_size=width, intermediate_size=blocks[0].mlp.fc1.out_features, num_hidden_layers=len(blocks),
                num_attention_heads=blocks[0].attn.num_heads, image_size=vit.patch_embed.img_size[0],
                patch_size=vit.patch_embed.patch_size[0], hidden_act="gelu", layer_norm_eps=eps, qkv_bias=qkv_bias)


def fold_token_types(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A copy of ``state`` in which every BERT-style embedding's token-type-0 row is added
    to its position embeddings (transformers' BLIP/BLIP-2 text has no token types; vlzoo
    feeds type 0 only). The token-type keys stay (they are not exported)."""
    out = dict(state)
    suffix = "embeddings.token_type_embeddings.weight"
    for key in [k for k in state if k.endswith(suffix)]:
        positions = key.removesuffix(suffix) + "embeddings.position_embeddings.weight"
        out[positions] = state[positions] + state[key][0]
    return out


def check_all_exported(ours: dict[str, Tensor], converted: dict[str, Tensor], absent: Sequence[str], what: str) -> None:
    """Every key of the vlzoo state is exported (a key of ``converted``) or known to be
    left out (contains one of ``absent``): anything else cannot be expressed."""
    left = [k for k in ours if k not in converted and not any(a in k for a in absent)]
    if left:
        raise ValueError(f"{what}: transformers' class has no place for {left[:20]} ({len(left)})")


def invert_conversion(
    hf_state: dict[str, Tensor], converted: dict[str, Tensor], ours: dict[str, Tensor],
    tied: Sequence[tuple[str, str]] = (),
) -> dict[str, Tensor]:
    """The transformers state dict holding the vlzoo tensors ``ours``.

    ``converted`` is the forward converter run on ``hf_state`` (the empty transformers
    model's own state): it holds the very tensor objects of ``hf_state`` under vlzoo
    names, which gives each transformers key its vlzoo key (the first name a tensor
    got, before any alias). ``tied``: (copy, source) transformers keys the converter
    drops, filled from their source."""
    by_id = {id(v): k for k, v in hf_state.items()}
    source: dict[str, str] = {}
    for key, value in converted.items():
        if id(value) in by_id:
            source.setdefault(by_id[id(value)], key)
    lacking = sorted({v for v in source.values() if v not in ours})
    if lacking:
        raise ValueError(f"the vlzoo model lacks {lacking[:20]} ({len(lacking)}), which transformers' class needs")
    out = {k: ours[source[k]] for k in hf_state if k in source}
    for copy, src in tied:
        if copy in hf_state and copy not in out and src in out:
            out[copy] = out[src]
    missing = [k for k in hf_state if k not in out]
    if missing:
        raise ValueError(f"no vlzoo tensor for transformers keys {missing[:20]} ({len(missing)})")
    return out
