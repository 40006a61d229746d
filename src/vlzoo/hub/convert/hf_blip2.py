"""BLIP-2 from transformers checkpoints (``model_type: blip-2``).

- ``Blip2ForImageTextRetrieval`` -> vlzoo :class:`~vlzoo.models.blip2.BLIP2` (stage 1:
  ``encode`` and ``itm``; the checkpoint has no ITG head, so no ``generate``);
- ``Blip2ForConditionalGeneration`` (OPT, T5 or any causal / seq2seq LLM) ->
  :class:`~vlzoo.models.blip2.BLIP2LLM` (stage 2: ``generate`` and ``vqa``).

What maps to what (read from transformers 5.x ``modeling_blip_2``):

- the vision tower is a pre-norm ViT with a fused ``qkv`` (its bias is stored whole,
  ``[q_bias, 0, v_bias]``), class token and position embedding on every token, exact
  GELU: a timm ``VisionTransformer`` with ``qkv_bias``, no final norm, all blocks
  (``output_layer=-1``; the converted checkpoints already stop where LAVIS read the
  penultimate EVA block);
- ``vision_model.post_layernorm`` (applied to every token, and the only thing between the
  tower and the Q-Former) is BLIP-2's trainable ``ln_vision``; its epsilon is the
  vision ``layer_norm_eps`` (vlzoo's default is 1e-5, so it is set on the module);
- ``qformer.layernorm`` normalises ``[queries; word + position embeddings]``: vlzoo's
  ``qformer.embeddings.LayerNorm``; there are no token-type embeddings;
- Q-Former ``{attention,crossattention}.attention.{query,key,value}`` -> ``.self.``;
  the rest keeps its BERT names;
- stage 1: ``embeddings.*`` -> ``qformer.embeddings.*``, ``vision_projection`` ->
  ``vision_proj``, ``text_projection`` -> ``text_proj``, ``itm_head`` as is;
- stage 2: ``language_projection`` -> ``llm_proj``, ``language_model.*`` -> ``llm.*``
  (weights the LLM ties, e.g. OPT's ``lm_head``, may be absent from the file).

transformers feeds the LLM ``num_query_tokens`` placeholder ids (``image_token_index``)
in front of the text and overwrites their embeddings with the projected queries; vlzoo
puts the soft prompt in front of the embedded text: the same LLM input.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from vlzoo.config import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    BLIP2Config,
    BLIP2LLMConfig,
    TextConfig,
    VisionConfig,
)
from vlzoo.data.llm_text import load_lm_tokenizer
from vlzoo.data.pipelines import pipeline_statistics, transformers_pipeline
from vlzoo.data.tokenizers import HFTokenizer
from vlzoo.hub.convert import LoadedParts, rename_keys
from vlzoo.hub.convert.hf import hf_vit_rules, timm_mlp_ratio
from vlzoo.hub.convert.hf_blip import (
    check_all_exported,
    fold_token_types,
    hf_vit_config,
    invert_conversion,
)
from vlzoo.hub.convert.precision import with_frozen_precision
from vlzoo.models.blip2 import BLIP2, BLIP2LLM, FROZEN_DTYPES
from vlzoo.models.builders import build_blip2_retrieval, build_vision_and_qformer
from vlzoo.weights import LazyWeights, load_lazily, load_strict, parameters_on_meta

if TYPE_CHECKING:
    from transformers import PreTrainedModel

RETRIEVAL, GENERATION = "Blip2ForImageTextRetrieval", "Blip2ForConditionalGeneration"
ARCHITECTURES = (RETRIEVAL, GENERATION)
TIMM_VIT = "vit_base_patch16_224"  # a timm VisionTransformer; every size comes from kwargs
QFORMER_TOKENIZER = "bert-base-uncased"  # BLIP-2's Q-Former tokenizer when the directory has none
QFORMER_CONTEXT = 32  # LAVIS's max_txt_len for the Q-Former
CAPTION_PROMPT = "a photo of"  # the BLIP-2 paper's captioning prompt
VQA_PROMPT = "Question: {} Answer:"  # the BLIP-2 paper's zero-shot VQA prompt (OPT and Flan-T5)
UNTRUNCATED = 1 << 30  # max_text_length of an LLM without a position limit (T5): no truncation
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")

_VIT = "vision.encoder.model"
VISION_RULES = hf_vit_rules(_VIT, "ln_vision")  # post_layernorm is BLIP-2's trainable ln_vision
_QLAYER = r"qformer\.encoder\.layer\.(\d+)"
QFORMER_RULES = [
    (r"query_tokens", "qformer.query_tokens"),
    (r"qformer\.layernorm\.(weight|bias)", r"qformer.embeddings.LayerNorm.\1"),
    (rf"{_QLAYER}\.(attention|crossattention)\.attention\.(query|key|value)\.(weight|bias)",
     r"qformer.encoder.layer.\1.\2.self.\3.\4"),
    (rf"{_QLAYER}\.(attention|crossattention)\.output\.(dense|LayerNorm)\.(weight|bias)", r"\g<0>"),
    (rf"{_QLAYER}\.intermediate(_query)?\.dense\.(weight|bias)", r"\g<0>"),
    (rf"{_QLAYER}\.output(_query)?\.(dense|LayerNorm)\.(weight|bias)", r"\g<0>"),
]
RETRIEVAL_RULES = VISION_RULES + QFORMER_RULES + [
    (r"embeddings\.(word_embeddings|position_embeddings)\.weight", r"qformer.embeddings.\1.weight"),
    (r"embeddings\.position_ids", ""),  # a buffer, saved by older transformers
    (r"vision_projection\.(weight|bias)", r"vision_proj.\1"),
    (r"text_projection\.(weight|bias)", r"text_proj.\1"),
    (r"itm_head\.(weight|bias)", r"itm_head.\1"),
]
GENERATION_RULES = VISION_RULES + QFORMER_RULES + [
    (r"language_projection\.(weight|bias)", r"llm_proj.\1"),
    (r"language_model\.(.+)", r"llm.\1"),  # the LLM keeps its own names (checked against it when loading)
]
LLM_PREFIX = "language_model."  # the LLM's tensors in a Blip2ForConditionalGeneration checkpoint
RULES = {RETRIEVAL: RETRIEVAL_RULES, GENERATION: GENERATION_RULES}
CAPABILITIES = {RETRIEVAL: frozenset({"encode", "itm"}), GENERATION: frozenset({"generate", "vqa"})}


# ----------------------------------------------------------------------------- configs
def parse_hf_config(hf_config: dict[str, Any]):
    """A transformers ``Blip2Config`` from its ``config.json`` dict (defaults filled in)."""
    from transformers import Blip2Config

    if hf_config.get("model_type") != "blip-2":
        raise ValueError(f"not a BLIP-2 config: model_type {hf_config.get('model_type')!r} (expected 'blip-2')")
    return Blip2Config.from_dict(hf_config)


def architecture_of(hf_config: dict[str, Any]) -> str:
    """The checkpoint's class (``architectures[0]``); unsupported ones are an error."""
    found = (hf_config.get("architectures") or [None])[0]
    if found not in ARCHITECTURES:
        raise ValueError(f"BLIP-2 architecture {found!r} is not supported; supported: {ARCHITECTURES}")
    return found


def vision_config_from_hf(hf_config: dict[str, Any], preprocess: dict[str, Any] | None = None) -> VisionConfig:
    """The frozen tower as a timm ViT (no final norm: ``post_layernorm`` is ``ln_vision``)
    with BLIP-2's preprocessing (``preprocess``: mean, std, interpolation overrides)."""
    v = parse_hf_config(hf_config).vision_config
    if v.hidden_act != "gelu":
        raise ValueError(f"BLIP-2 vision hidden_act {v.hidden_act!r} is not supported (exact 'gelu' only)")
    image_size, patch_size = (s if isinstance(s, int) else s[0] for s in (v.image_size, v.patch_size))
    pre = preprocess or {}
    kwargs = dict(patch_size=patch_size, embed_dim=v.hidden_size, depth=v.num_hidden_layers,
                  num_heads=v.num_attention_heads, mlp_ratio=timm_mlp_ratio(v.hidden_size, v.intermediate_size),
                  qkv_bias=bool(v.qkv_bias), norm_eps=v.layer_norm_eps, final_norm=False)
    return VisionConfig(impl="timm", name=TIMM_VIT, image_size=image_size, kwargs=kwargs, output_layer=-1,
                        mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)), std=tuple(pre.get("std", OPENAI_CLIP_STD)),
                        interpolation=pre.get("interpolation", "bicubic"), resize_mode="squash")


def qformer_config_from_hf(hf_config: dict[str, Any], tokenizer: str = QFORMER_TOKENIZER) -> TextConfig:
    """The Q-Former as a vlzoo BERT-style text config (``kwargs``: BertConfig fields)."""
    q = parse_hf_config(hf_config).qformer_config
    kwargs = dict(vocab_size=q.vocab_size, hidden_size=q.hidden_size, num_hidden_layers=q.num_hidden_layers,
                  num_attention_heads=q.num_attention_heads, intermediate_size=q.intermediate_size,
                  max_position_embeddings=q.max_position_embeddings, type_vocab_size=0,
                  layer_norm_eps=q.layer_norm_eps, hidden_dropout_prob=q.hidden_dropout_prob,
                  attention_probs_dropout_prob=q.attention_probs_dropout_prob, hidden_act=q.hidden_act,
                  pad_token_id=q.pad_token_id or 0, initializer_range=q.initializer_range)
    return TextConfig(impl="bert", tokenizer=tokenizer, context_length=min(QFORMER_CONTEXT, q.max_position_embeddings),
                      kwargs=kwargs, pooling="cls")


def blip2_config_from_hf(hf_config: dict[str, Any], preprocess: dict[str, Any] | None = None,
                         tokenizer: str = QFORMER_TOKENIZER) -> BLIP2Config:
    """Stage 1 (``Blip2ForImageTextRetrieval``) as a vlzoo :class:`BLIP2Config`."""
    cfg = parse_hf_config(hf_config)
    return BLIP2Config(vision=vision_config_from_hf(hf_config, preprocess),
                       qformer=qformer_config_from_hf(hf_config, tokenizer), num_queries=cfg.num_query_tokens,
                       cross_attention_every=cfg.qformer_config.cross_attention_frequency,
                       embed_dim=cfg.image_text_hidden_size)


def blip2_llm_config_from_hf(hf_config: dict[str, Any], preprocess: dict[str, Any] | None = None,
                             llm: str | None = None) -> BLIP2LLMConfig:
    """Stage 2 (``Blip2ForConditionalGeneration``) as a vlzoo :class:`BLIP2LLMConfig`.
    ``llm`` is the LLM reference recorded: the text config's ``_name_or_path`` (e.g.
    ``facebook/opt-2.7b``) when it has one, else ``llm`` (the checkpoint directory). The
    LLM's weights come with the checkpoint, so ``checkpoint_llm`` is on."""
    cfg = parse_hf_config(hf_config)
    kind = "causal" if cfg.use_decoder_only_language_model else "seq2seq"
    reference = getattr(cfg.text_config, "_name_or_path", "") or llm or ""
    # transformers' Blip2Processor does not truncate text: cut only where the LLM's positions end
    positions = getattr(cfg.text_config, "max_position_embeddings", None)
    max_text = positions - cfg.num_query_tokens if positions else UNTRUNCATED
    return BLIP2LLMConfig(vision=vision_config_from_hf(hf_config, preprocess), qformer=qformer_config_from_hf(hf_config),
                          num_queries=cfg.num_query_tokens,
                          cross_attention_every=cfg.qformer_config.cross_attention_frequency, llm=reference,
                          llm_kind=kind, caption_prompt=CAPTION_PROMPT, vqa_prompt=VQA_PROMPT,
                          max_text_length=max_text, checkpoint_llm=True)


# ----------------------------------------------------------------------------- weights
def _expected_shapes(cfg, architecture: str) -> dict[str, tuple[int, ...]]:
    """Shapes of representative transformers keys implied by the config."""
    v, q = cfg.vision_config, cfg.qformer_config
    image, patch = (s if isinstance(s, int) else s[0] for s in (v.image_size, v.patch_size))
    dv, dq = v.hidden_size, q.hidden_size
    shapes = {
        "query_tokens": (1, cfg.num_query_tokens, dq),
        "vision_model.embeddings.class_embedding": (1, 1, dv),
        "vision_model.embeddings.position_embedding": (1, (image // patch) ** 2 + 1, dv),
        "vision_model.embeddings.patch_embedding.weight": (dv, 3, patch, patch),
        "vision_model.encoder.layers.0.self_attn.qkv.weight": (3 * dv, dv),
        "vision_model.encoder.layers.0.mlp.fc1.weight": (v.intermediate_size, dv),
        "qformer.encoder.layer.0.crossattention.attention.key.weight": (dq, dv),
        "qformer.encoder.layer.0.intermediate_query.dense.weight": (q.intermediate_size, dq),
    }
    if architecture == RETRIEVAL:
        e = cfg.image_text_hidden_size
        shapes.update({"embeddings.word_embeddings.weight": (q.vocab_size, dq),
                       "embeddings.position_embeddings.weight": (q.max_position_embeddings, dq),
                       "vision_projection.weight": (e, dq), "text_projection.weight": (e, dq),
                       "itm_head.weight": (2, dq)})
    else:
        shapes["language_projection.weight"] = (cfg.text_config.hidden_size, dq)
    return shapes


def check_shapes(state: dict[str, Tensor], cfg, architecture: str) -> None:
    """A clear error when a tensor's shape contradicts the config."""
    wrong = [f"{k}: {tuple(state[k].shape)}, config implies {s}"
             for k, s in _expected_shapes(cfg, architecture).items() if k in state and tuple(state[k].shape) != s]
    if wrong:
        raise ValueError(f"{architecture} checkpoint does not match its config: {wrong}")


def absent_keys(cfg, architecture: str) -> list[str]:
    """Substrings of vlzoo keys the checkpoint does not carry (they keep their init)."""
    if architecture == RETRIEVAL:
        return ["lm_head.", "temp"]  # no ITG head, no temperature (its ITC scores are plain cosines)
    absent = ["qformer.embeddings.word_embeddings.", "qformer.embeddings.position_embeddings."]
    if not cfg.qformer_config.use_qformer_text_input:  # stage 2 drops the Q-Former's text feed-forward
        for i in range(cfg.qformer_config.num_hidden_layers):
            absent += [f"qformer.encoder.layer.{i}.intermediate.", f"qformer.encoder.layer.{i}.output."]
    return absent


def convert_hf_blip2_state(
    state: dict[str, Tensor], hf_config: dict[str, Any], architecture: str
) -> tuple[dict[str, Tensor], list[str], frozenset[str]]:
    """transformers BLIP-2 state dict -> (vlzoo state dict, substrings of vlzoo keys the
    checkpoint lacks, capabilities). A key without a rule, or a shape the config
    contradicts, is an error naming it."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"BLIP-2 architecture {architecture!r} is not supported; supported: {ARCHITECTURES}")
    cfg = parse_hf_config(hf_config)
    if architecture == RETRIEVAL and not cfg.qformer_config.use_qformer_text_input:
        raise ValueError(f"{RETRIEVAL} needs qformer_config.use_qformer_text_input (the Q-Former's text path)")
    check_shapes(state, cfg, architecture)
    ours = rename_keys(state, RULES[architecture], source=f"transformers {architecture} checkpoint")
    return ours, absent_keys(cfg, architecture), CAPABILITIES[architecture]


# ----------------------------------------------------------------------------- loading
def _has_tokenizer(directory: Path) -> bool:
    return any((directory / f).is_file() for f in TOKENIZER_FILES)


def build_blip2_llm_from_hf(cfg: BLIP2LLMConfig, hf_cfg) -> BLIP2LLM:
    """vlzoo BLIP2LLM for ``cfg``: the vision tower and Q-Former randomly initialised,
    the LLM built from the transformers ``text_config`` in ``cfg.llm_precision`` (float32
    when None) with its parameters on the meta device (no memory): fill it with
    :func:`~vlzoo.weights.load_lazily`. Built in its dtype, the LLM is not cast again:
    buffers transformers makes in float32 (rotary frequencies) stay so, as in its own
    ``from_pretrained(..., dtype=...)``."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    vision, qformer = build_vision_and_qformer(cfg)
    auto = AutoModelForCausalLM if cfg.llm_kind == "causal" else AutoModelForSeq2SeqLM
    with parameters_on_meta():
        llm = auto.from_config(hf_cfg.text_config, dtype=FROZEN_DTYPES[cfg.llm_precision] or torch.float32)
    return BLIP2LLM(vision, qformer, llm, cfg.frozen_precision)


def load_hf_blip2(directory: Path, hf_config: dict[str, Any], dtype: torch.dtype | None = None) -> LoadedParts:
    """A transformers BLIP-2 directory (``config.json``, weights, optional tokenizer and
    ``preprocessor_config.json``) as a vlzoo model, loaded strictly, in eval mode.

    Stage 1: ``tokenizer`` is the directory's (BERT) tokenizer for the Q-Former's text.
    Stage 2: ``tokenizer`` is None; the LLM's tokenizer is ``extra["llm_tokenizer"]``
    (None when the directory has none).

    ``dtype`` (:mod:`vlzoo.hub.convert.precision`): the frozen tower and LLM in it, the Q-Former
    float32. Stage 2's LLM is built on the meta device and each of its tensors read from
    the checkpoint (safetensors lazily) and converted to the LLM's dtype one at a time:
    no float32 copy of the LLM is made on the way."""
    directory = Path(directory)
    architecture = architecture_of(hf_config)
    hf_cfg = parse_hf_config(hf_config)
    weights = LazyWeights(directory)
    lazy = LLM_PREFIX if architecture == GENERATION else None  # the LLM's tensors: read into the LLM itself
    own = {k: weights[k] for k in weights.keys() if lazy is None or not k.startswith(lazy)}
    state, absent, capabilities = convert_hf_blip2_state(own, hf_config, architecture)
    pipeline = transformers_pipeline(directory)
    preprocess = pipeline_statistics(pipeline)
    has_tokenizer = _has_tokenizer(directory)
    extra: dict[str, Any] = {"architecture": architecture}
    if architecture == RETRIEVAL:
        tok_name = str(directory) if has_tokenizer else QFORMER_TOKENIZER
        config = with_frozen_precision(blip2_config_from_hf(hf_config, preprocess, tok_name), dtype)
        tokenizer = HFTokenizer(str(directory), config.qformer.context_length, blip_tokens=False) if has_tokenizer else None
        model, family = build_blip2_retrieval(config, tokenizer), "blip2"
    else:
        config = with_frozen_precision(blip2_llm_config_from_hf(hf_config, preprocess, llm=str(directory)), dtype)
        tokenizer, family = None, "blip2_llm"
        model = build_blip2_llm_from_hf(config, hf_cfg)
        model.image_token_id = hf_cfg.image_token_index  # transformers' placeholder id (BLIP2LLM.generate)
        load_lazily(model.llm, weights, prefix=LLM_PREFIX)
        absent = [*absent, "llm."]
        extra["llm_tokenizer"] = load_lm_tokenizer(str(directory)) if has_tokenizer else None
    load_strict(model, state, source=str(directory), allow_missing=absent)
    return LoadedParts(family, model.eval(), config, config.vision, tokenizer, capabilities, str(directory), extra,
                       pipeline=pipeline)


# ------------------------------------------------------------- export (vlzoo -> transformers)
IMAGE_TOKEN = "<image>"  # the placeholder transformers' BLIP-2 processors put in front of the text


def to_hf_blip2(parts: LoadedParts, head: str | None = None, image_token_index: int | None = None
                ) -> PreTrainedModel:
    """A vlzoo BLIP-2 as a transformers ``PreTrainedModel`` holding its weights (eval
    mode; tower and Q-Former in float32, a frozen half-precision tower upcast, the LLM in
    its config's dtype), ready for ``save_pretrained``: stage 1 (``blip2``) ->
    ``Blip2ForImageTextRetrieval``, stage 2 (``blip2_llm``) -> ``Blip2ForConditionalGeneration``.

    The tower must be a timm ViT transformers' BLIP-2 vision model expresses: only the
    blocks it runs are exported (``output_layer``), it must not apply a final norm of its
    own (``ln_vision`` becomes ``post_layernorm``), and one LayerNorm epsilon must serve
    the tower and ``ln_vision``. Not exported: stage 1's ITG head (``lm_head``) and
    temperature (transformers' retrieval class has neither: no Q-Former captioning, plain
    cosine ITC scores); stage 2's Q-Former text embeddings and text feed-forward (unused
    without an instruction; transformers' stage 2 has no Q-Former text input). A Q-Former
    with token-type embeddings has the type-0 row added to its position embeddings.

    Stage 2: transformers' ``Blip2ForConditionalGeneration`` finds the image in the LLM
    input by ``image_token_index`` placeholders (``num_query_tokens`` of them before the
    text, which the processor inserts). ``image_token_index`` chooses it; by default it is
    the LLM tokenizer's ``<image>`` (``parts.extra["llm_tokenizer"]``) if it has one,
    else the first embedding row past the tokenizer's vocabulary if the LLM has spare
    rows, else a new row (the vocabulary grows by one, as when transformers' BLIP-2
    conversions add ``<image>`` to the tokenizer). Either way, without an ``<image>`` in
    the tokenizer the id is the one ``tokenizer.add_tokens("<image>")`` would give. A new
    row is zero (its input embedding is always replaced by a query) and goes into the
    generation config's ``suppress_tokens``: ``generate`` never writes it, as vlzoo's
    model cannot. The LLM tokenizer itself is not part of the returned model.
    """
    import transformers

    if head is not None:
        raise ValueError("--head applies to BLIP only (BLIP-2 exports its one transformers class)")
    model = parts.model
    if not isinstance(model, BLIP2 | BLIP2LLM):
        raise ValueError(f"to_hf_blip2 exports BLIP-2 models (blip2, blip2_llm), not {parts.family!r}")
    architecture = GENERATION if isinstance(model, BLIP2LLM) else RETRIEVAL
    kwargs, vision_extra = _hf_blip2_config(model, architecture)
    token, grown = None, False
    if architecture == GENERATION:
        rows = model.llm.get_input_embeddings().num_embeddings
        token = _image_token_index(parts, rows, image_token_index)
        grown = token == rows
        text = model.llm.config.to_dict()
        kwargs.update(text_config={**text, "vocab_size": rows + 1} if grown else text, image_token_index=token)
    config = transformers.Blip2Config(**kwargs)
    hf = getattr(transformers, architecture)(config).eval()
    _load_blip2_weights(hf, config, architecture, fold_token_types(model.state_dict()), vision_extra)
    if grown:
        hf.generation_config.suppress_tokens = [token]
    return hf


def _load_blip2_weights(hf: nn.Module, config, architecture: str, ours: dict[str, Tensor],
                        vision_extra: list[str]) -> None:
    """Fill ``hf`` from the vlzoo state ``ours`` through the inverse of :data:`RULES`
    (strictly); LLM tensors one vocabulary row short get a zero row."""
    hf_state = hf.state_dict()
    converted, absent, _ = convert_hf_blip2_state(hf_state, {**config.to_dict(), "architectures": [architecture]},
                                                  architecture)
    check_all_exported(ours, converted, [*absent, *vision_extra, "token_type_embeddings"],
                       f"vlzoo BLIP-2 -> {architecture}")
    state = invert_conversion(hf_state, converted, ours)
    hf.load_state_dict({k: _grow_rows(v, hf_state[k].shape) for k, v in state.items()}, strict=True)


def _grow_rows(value: Tensor, shape: torch.Size) -> Tensor:
    """``value`` zero-padded by one along each dimension where ``shape`` is one larger
    (the vocabulary row added for the image token); otherwise ``value`` itself."""
    if value.shape == shape or value.dim() != len(shape):
        return value
    pads = [n - m for m, n in zip(value.shape, shape, strict=True)]
    if any(p not in (0, 1) for p in pads):
        return value  # a real mismatch: load_state_dict names it
    padding = [x for p in reversed(pads) for x in (0, p)]
    return torch.nn.functional.pad(value, padding)


def _image_token_index(parts: LoadedParts, rows: int, requested: int | None) -> int:
    """The LLM id of the image placeholder (see :func:`to_hf_blip2`); ``rows``: the LLM's
    embedding rows (``rows`` itself means a new row)."""
    if requested is not None:
        if not 0 <= requested <= rows:
            raise ValueError(f"image_token_index {requested} is outside the LLM's {rows} embedding rows "
                             f"(or {rows}, a new row)")
        return requested
    tokenizer = parts.extra.get("llm_tokenizer")
    if tokenizer is None or not hasattr(tokenizer, "get_vocab"):
        return rows
    known = tokenizer.get_vocab().get(IMAGE_TOKEN)
    if known is not None and known < rows:
        return known
    return min(len(tokenizer), rows)


def _hf_blip2_config(model: nn.Module, architecture: str) -> tuple[dict[str, Any], list[str]]:
    """``Blip2Config`` keyword arguments for ``model`` (the inverse of
    :func:`blip2_config_from_hf` / :func:`blip2_llm_config_from_hf`, without the LLM),
    and the vlzoo key prefixes of tower parts it never runs."""
    encoder = model.vision.encoder
    vision = hf_vit_config(encoder, "BLIP-2", final_norm=False)
    if model.ln_vision.eps != vision["layer_norm_eps"]:
        raise ValueError(f"BLIP-2: ln_vision's epsilon {model.ln_vision.eps} differs from the tower's LayerNorm "
                         f"epsilon {vision['layer_norm_eps']}; transformers' vision config has one layer_norm_eps "
                         "(set vision.kwargs.norm_eps)")
    is_retrieval = architecture == RETRIEVAL
    kwargs: dict[str, Any] = dict(vision_config=vision, num_query_tokens=model.qformer.num_queries,
                                  qformer_config=_hf_qformer_config(model.qformer, vision["hidden_size"], is_retrieval))
    if is_retrieval:
        if model.text_pooling != "cls":
            raise ValueError(f"BLIP-2: transformers' retrieval model takes the text feature from [CLS]; this model "
                             f"pools {model.text_pooling!r}")
        kwargs["image_text_hidden_size"] = model.vision_proj.out_features
    unused = [f"vision.encoder.model.blocks.{i}." for i in range(vision["num_hidden_layers"], len(encoder.model.blocks))]
    if unused:
        unused.append("vision.encoder.model.norm.")  # a stopped tower never reaches its final norm
    return kwargs, [*unused, "vision.encoder.model.fc_norm."]  # pooling only: BLIP-2 reads tokens


def _hf_qformer_config(qformer: nn.Module, vision_width: int, text_input: bool) -> dict[str, Any]:
    """``Blip2QFormerConfig`` fields of a vlzoo Q-Former (the inverse of :func:`qformer_config_from_hf`)."""
    cfg = qformer.config
    depth = cfg.num_hidden_layers
    cross = [i for i, block in enumerate(qformer.encoder.layer) if block.has_cross_attention]
    every = cross[1] - cross[0] if len(cross) > 1 else depth
    if cross != list(range(0, depth, every)):
        raise ValueError(f"BLIP-2: transformers puts Q-Former cross-attention in layers 0, k, 2k, ...; this one "
                         f"has it in {cross}")
    names = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
             "max_position_embeddings", "layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
             "hidden_act", "pad_token_id", "initializer_range")
    return {**{k: getattr(cfg, k) for k in names}, "cross_attention_frequency": every,
            "encoder_hidden_size": vision_width, "use_qformer_text_input": text_input}
