"""ALBEF and BLIP from their original release checkpoints (salesforce/ALBEF,
salesforce/BLIP; LAVIS loads the same files).

File layout: ``torch.save({'model': state_dict, 'optimizer': ..., 'config': ...,
'epoch': ...})``; a file holding only ``{'model': ...}``, ``{'state_dict': ...}`` or a
bare state dict is read as well. It is read with ``torch.load(weights_only=True)``: a
file that pickles other Python objects (an ``argparse.Namespace``, say) is refused.

Original names -> vlzoo names (``*_m`` are the momentum copies, same layout):

- ``visual_encoder{,_m}.*``: a timm-style ViT (``cls_token``, ``pos_embed``,
  ``patch_embed.proj``, ``blocks.i.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``,
  ``norm``; no head) -> ``vision{,_m}.model.*``. Its LayerNorm epsilon is 1e-6 in both
  releases (their ``vit.py``); a zoo config that says otherwise is corrected, with a note.
- ALBEF text: ``text_encoder{,_m}.bert.*`` + ``text_encoder{,_m}.cls.predictions.*``
  (pre-training, ``BertForMaskedLM``) or ``text_encoder{,_m}.*`` (fine-tuned,
  ``BertModel`` without pooler, no MLM head) -> ``text{,_m}.*`` and ``mlm_head{,_m}.*``.
  HF-BERT block names (``crossattention`` in the fusion layers), token-type embeddings.
- BLIP text (MED, cross-attention in every layer, no token-type embeddings):
  ``text_encoder{,_m}.*`` (``BertModel``) -> ``text{,_m}.*``; ``text_decoder.bert.*`` +
  ``text_decoder.cls.predictions.*`` (``BertLMHeadModel``) -> the decoder, see below.
- ``vision_proj``, ``text_proj``, ``itm_head``, ``temp`` keep their names.
- Queues: ``image_queue``/``text_queue`` are (D, Q) -> ``queue.image``/``queue.text``
  (Q, D); ``idx_queue`` (1, Q) (fine-tuned files; -100 = empty) -> ``queue.index`` (Q,)
  (-1 = empty; pre-training files have none: all -1); ``queue_ptr`` (ALBEF, BLIP
  pre-training, LAVIS) or ``ptr_queue`` (BLIP fine-tuning) (1,) -> ``queue.ptr`` ().
- ``*.embeddings.position_ids`` buffers are dropped; the tied LM-head copies
  (``cls.predictions.decoder.bias`` = ``cls.predictions.bias``) are checked, then dropped.

BLIP's decoder. In BLIP pre-training the decoder's embeddings, cross-attention and
feed-forward *are* the text encoder's (``tie_encoder_decoder_weights``), only its
self-attention is its own; the file stores both copies. vlzoo's BLIP shares the same
modules, so the shared parts come from ``text_encoder`` and only the self-attention
from ``text_decoder``; where the file's two copies differ, vlzoo cannot hold both: the
encoder's are kept and ``generate`` is not offered (a note says so). A captioning
fine-tune (``BLIP_Decoder``) has no text encoder at all: the decoder's copies fill the
shared modules and only ``generate`` is offered. The pre-training code re-points the
decoder's word embeddings at the encoder's *after* tying its LM head to them, so a
pre-trained file's LM output matrix may differ from the word embeddings; vlzoo ties
them, so such a file loads without ``generate`` (a note says so).

Momentum copies missing from a file receive the online weights; token-type embeddings
missing from a file (BLIP) are zero (the same function as none); parts a file lacks are
listed in ``absent`` and stay at initialisation.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vlzoo.data.pipelines import original_pipeline
from vlzoo.hub.convert import LoadedParts, rename_keys
from vlzoo.weights import load_state_dict_file, load_strict

ORIGINAL_VIT_EPS = 1e-6  # vit.py of both releases: partial(nn.LayerNorm, eps=1e-6)
ORIGINAL_TEXT_EPS = 1e-12  # config_bert.json (ALBEF), med_config.json (BLIP)
BLIP_VOCAB, BLIP_DEC_ID, BLIP_ENC_ID = 30524, 30522, 30523  # bert-base-uncased + [DEC], [ENC]
QUEUE_KEYS = ("image_queue", "text_queue", "idx_queue", "queue_ptr", "ptr_queue")
WORD_EMB = "text.embeddings.word_embeddings.weight"
_SHARED = "decoder-copy:"  # marks the BLIP decoder's copies of shared parts until they are reconciled

_P = r"\.(weight|bias)"
_ATT = r"(?:self\.(?:query|key|value)|output\.(?:dense|LayerNorm))"  # inside (cross)attention
_FFN = r"(?:intermediate\.dense|output\.(?:dense|LayerNorm))"
_BLOCK = r"(?:norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

Converted = tuple[dict[str, Tensor], tuple[str, ...], frozenset[str]]


# ------------------------------------------------------------------- key maps
def vision_rules() -> list[tuple[str, str]]:
    """``visual_encoder{,_m}.*`` (the releases' ViT) -> ``vision{,_m}.model.*`` (timm)."""
    return [
        (r"visual_encoder(_m)?\.(cls_token|pos_embed)", r"vision\1.model.\2"),
        (rf"visual_encoder(_m)?\.patch_embed\.proj{_P}", r"vision\1.model.patch_embed.proj.\2"),
        (rf"visual_encoder(_m)?\.blocks\.(\d+)\.({_BLOCK}){_P}", r"vision\1.model.blocks.\2.\3.\4"),
        (rf"visual_encoder(_m)?\.norm{_P}", r"vision\1.model.norm.\2"),
    ]


def text_rules(src: str, token_types: bool) -> list[tuple[str, str]]:
    """A BERT under ``src`` (a regex whose group 1 is ``_m`` or empty) -> ``text{,_m}.*``.
    ``token_types``: whether the original has token-type embeddings (ALBEF yes, BLIP no)."""
    embeddings = "word_embeddings|position_embeddings" + ("|token_type_embeddings" if token_types else "")
    return [
        (rf"{src}embeddings\.({embeddings})\.weight", r"text\1.embeddings.\2.weight"),
        (rf"{src}embeddings\.LayerNorm{_P}", r"text\1.embeddings.LayerNorm.\2"),
        (rf"{src}embeddings\.position_ids", ""),  # a buffer, arange(max_positions)
        (rf"{src}encoder\.layer\.(\d+)\.((?:attention|crossattention)\.{_ATT}|{_FFN}){_P}",
         r"text\1.encoder.layer.\2.\3.\4"),
    ]


HEAD_RULES = [
    (rf"(vision_proj|text_proj)(_m)?{_P}", r"\1\2.\3"),
    (rf"itm_head{_P}", r"itm_head.\1"),
    (r"temp", "temp"),
]

ALBEF_RULES = [
    *vision_rules(),
    *text_rules(r"text_encoder(_m)?\.(?:bert\.)?", token_types=True),  # bert.: BertForMaskedLM (pre-training)
    (rf"text_encoder(_m)?\.cls\.predictions\.transform\.(dense|LayerNorm){_P}", r"mlm_head\1.transform.\2.\3"),
    (r"text_encoder(_m)?\.cls\.predictions\.bias", r"mlm_head\1.bias"),
    (r"text_encoder(_m)?\.cls\.predictions\.decoder\.weight", r"mlm_head\1.decoder.weight"),  # tied: checked
    (r"text_encoder(_m)?\.cls\.predictions\.decoder\.bias", ""),  # = cls.predictions.bias: checked
    *HEAD_RULES,
]

BLIP_DECODER_RULES = [  # self-attention: the decoder's own; the rest: copies of shared parts
    (rf"text_decoder\.bert\.encoder\.layer\.(\d+)\.(attention\.{_ATT}){_P}", r"decoder.layer.\1.\2.\3"),
    (rf"text_decoder\.bert\.encoder\.layer\.(\d+)\.(crossattention\.{_ATT}|{_FFN}){_P}",
     _SHARED + r"text.encoder.layer.\1.\2.\3"),
    (r"text_decoder\.bert\.embeddings\.(word_embeddings|position_embeddings)\.weight",
     _SHARED + r"text.embeddings.\1.weight"),
    (rf"text_decoder\.bert\.embeddings\.LayerNorm{_P}", _SHARED + r"text.embeddings.LayerNorm.\1"),
    (r"text_decoder\.bert\.embeddings\.position_ids", ""),
    (rf"text_decoder\.cls\.predictions\.transform\.(dense|LayerNorm){_P}", r"lm_head.transform.\1.\2"),
    (r"text_decoder\.cls\.predictions\.bias", "lm_head.bias"),
    (r"text_decoder\.cls\.predictions\.decoder\.weight", "lm_head.decoder.weight"),  # tied?: checked
    (r"text_decoder\.cls\.predictions\.decoder\.bias", ""),  # = cls.predictions.bias: checked
]

BLIP_RULES = [*vision_rules(), *text_rules(r"text_encoder(_m)?\.", token_types=False), *BLIP_DECODER_RULES,
              *HEAD_RULES]

ALBEF_PAIRS = (("vision", "vision_m"), ("vision_proj", "vision_proj_m"), ("text", "text_m"),
               ("text_proj", "text_proj_m"), ("mlm_head", "mlm_head_m"))
BLIP_PAIRS = ALBEF_PAIRS[:4]
ALBEF_LM_BIAS = (("text_encoder.cls.predictions.decoder.bias", "text_encoder.cls.predictions.bias"),
                 ("text_encoder_m.cls.predictions.decoder.bias", "text_encoder_m.cls.predictions.bias"))
BLIP_LM_BIAS = (("text_decoder.cls.predictions.decoder.bias", "text_decoder.cls.predictions.bias"),)


# ----------------------------------------------------------------- the file
def original_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The state dict of a release file: ``obj['model']``, ``obj['state_dict']`` or ``obj``
    itself; every value must be a tensor."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj:
        raise ValueError(f"{source}: expected a state dict (or a dict with 'model'), got {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"{source}: entries that are not tensors: {bad[:10]} (keys {sorted(obj)[:10]} ...)")
    return obj


def _weights_file(path: Path) -> Path:
    """``path``, or the one weights file of a directory."""
    if path.is_file():
        return path
    found = [p for p in sorted(path.glob("*")) if p.suffix in (".pth", ".pt", ".bin", ".safetensors")]
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one .pth/.pt/.bin/.safetensors file, found {[p.name for p in found]}")
    return found[0]


# ----------------------------------------------------------------- shared steps
def _check_same(state: dict[str, Tensor], pairs: tuple[tuple[str, str], ...], source: str) -> None:
    """Entries the original model holds twice (one tensor) must be equal."""
    for copy, original in pairs:
        if copy in state and original in state and not torch.equal(state[copy], state[original]):
            raise ValueError(f"{source}: {copy} differs from {original} (one tensor in the original model)")


def convert_queues(raw: dict[str, Tensor], embed_dim: int | None, source: str) -> dict[str, Tensor]:
    """``image_queue``/``text_queue`` (D, Q), ``idx_queue`` (1, Q), ``queue_ptr``/``ptr_queue``
    (1,) -> ``queue.image``/``queue.text`` (Q, D), ``queue.index`` (Q,), ``queue.ptr`` ().
    Empty when the file has no queue."""
    image, text = raw.get("image_queue"), raw.get("text_queue")
    if image is None and text is None:
        if set(raw):
            raise ValueError(f"{source}: {sorted(raw)} without image_queue/text_queue")
        return {}
    if image is None or text is None or image.dim() != 2 or image.shape != text.shape:
        shapes = {k: tuple(v.shape) for k, v in raw.items()}
        raise ValueError(f"{source}: image_queue and text_queue must both be (D, Q), got {shapes}")
    dim, size = image.shape
    if embed_dim is not None and dim != embed_dim:
        raise ValueError(f"{source}: image_queue is {(dim, size)}, expected (embed_dim {embed_dim}, Q)")
    out = {"queue.image": image.T.contiguous(), "queue.text": text.T.contiguous()}
    index = raw.get("idx_queue")
    if index is not None and index.numel() != size:
        raise ValueError(f"{source}: idx_queue has {index.numel()} entries, the queues {size}")
    index = torch.full((size,), -1, dtype=torch.long) if index is None else index.reshape(size).long()
    out["queue.index"] = torch.where(index < 0, torch.full_like(index, -1), index)  # empty: -100 -> -1
    if "queue_ptr" in raw and "ptr_queue" in raw:
        raise ValueError(f"{source}: both queue_ptr and ptr_queue")
    ptr = raw.get("queue_ptr", raw.get("ptr_queue"))
    out["queue.ptr"] = torch.zeros((), dtype=torch.long) if ptr is None else ptr.reshape(()).long()
    return out


def _split_queues(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    rest = {k: v for k, v in state.items() if k not in QUEUE_KEYS}
    return rest, {k: v for k, v in state.items() if k in QUEUE_KEYS}


def _embed_dim(out: dict[str, Tensor]) -> int | None:
    weight = out.get("vision_proj.weight")
    return None if weight is None else weight.shape[0]


def _add_momentum_copies(out: dict[str, Tensor], pairs: tuple[tuple[str, str], ...], notes: list[str]) -> None:
    """In place: a momentum module the file lacks receives its online module's weights."""
    for online, twin in pairs:
        if any(k.startswith(twin + ".") for k in out):
            continue
        copied = {twin + k[len(online):]: v for k, v in out.items() if k.startswith(online + ".")}
        if copied:
            out.update(copied)
            notes.append(f"{twin}: not in the file, copied from {online}")


def _alias(out: dict[str, Tensor], name: str, source: str) -> None:
    """``out[name] = out[source]`` unless present (a tensor vlzoo holds under two names)."""
    if name not in out and source in out:
        out[name] = out[source]


def _check_tied(out: dict[str, Tensor], head: str, embeddings: str, source: str) -> None:
    if head in out and embeddings in out and not torch.equal(out[head], out[embeddings]):
        raise ValueError(f"{source}: the LM head {head} differs from {embeddings} (tied in the original model)")


def _layers(out: dict[str, Tensor], prefix: str) -> list[int]:
    found = {int(m.group(1)) for k in out if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return sorted(found)


def _has(out: dict[str, Tensor], *prefixes: str) -> bool:
    return all(any(k.startswith(p) for k in out) for p in prefixes)


# ------------------------------------------------------------------------ ALBEF
def convert_albef_original_state(state: dict[str, Tensor], notes: list[str] | None = None) -> Converted:
    """An original ALBEF state dict (pre-training or a fine-tune) -> (vlzoo ``ALBEF``
    state dict, ``absent``, capabilities).

    ``absent``: key substrings of the vlzoo model the file lacks (load with
    ``load_strict(..., allow_missing=absent)``): the MLM head of a fine-tuned file, the
    queue of a file without one. ``notes`` (optional) receives what was filled in.
    """
    notes = [] if notes is None else notes
    source = "original ALBEF checkpoint"
    _check_same(state, ALBEF_LM_BIAS, source)
    weights, queues = _split_queues(state)
    out = rename_keys(weights, ALBEF_RULES, source=source)
    for suffix in ("", "_m"):
        _check_tied(out, f"mlm_head{suffix}.decoder.weight", f"text{suffix}.embeddings.word_embeddings.weight", source)
    _check_parts(out, ("vision.model.", "text.embeddings.", "text.encoder.layer.", "vision_proj.", "text_proj.",
                       "itm_head."), source)
    out.update(convert_queues(queues, _embed_dim(out), source))
    _add_momentum_copies(out, ALBEF_PAIRS, notes)
    for suffix in ("", "_m"):
        _alias(out, f"mlm_head{suffix}.decoder.weight", f"text{suffix}.embeddings.word_embeddings.weight")
    absent: list[str] = []
    if not _has(out, "mlm_head.transform."):
        absent += ["mlm_head.transform.", "mlm_head.bias", "mlm_head_m.transform.", "mlm_head_m.bias"]
        notes.append("no MLM head in the file (a fine-tuned checkpoint): mlm_head stays at initialisation")
    absent += _absent_training_state(out, notes)
    return out, tuple(absent), frozenset({"encode", "itm"})


def _check_parts(out: dict[str, Tensor], prefixes: tuple[str, ...], source: str) -> None:
    missing = [p for p in prefixes if not _has(out, p)]
    if missing:
        raise KeyError(f"{source}: nothing maps to {missing}; is this the right format?")


def _absent_training_state(out: dict[str, Tensor], notes: list[str]) -> list[str]:
    """The queue and temperature when the file has none (only training reads the queue)."""
    absent = []
    if not _has(out, "queue."):
        absent.append("queue.")
        notes.append("no feature queue in the file: the queue stays at initialisation")
    if "temp" not in out:
        absent.append("temp")
        notes.append("no temperature in the file: temp stays at its configured value")
    return absent


# ------------------------------------------------------------------------- BLIP
def convert_blip_original_state(state: dict[str, Tensor], notes: list[str] | None = None) -> Converted:
    """An original BLIP state dict (pre-training, retrieval fine-tune or captioning
    fine-tune) -> (vlzoo ``BLIP`` state dict, ``absent``, capabilities).

    Capabilities: ``encode``/``itm`` when the file has the text encoder, projections and
    ITM head; ``generate`` when it has a decoder vlzoo can represent (see the module
    docstring). ``absent`` and ``notes`` as :func:`convert_albef_original_state`.
    """
    notes = [] if notes is None else notes
    source = "original BLIP checkpoint"
    _check_same(state, BLIP_LM_BIAS, source)
    weights, queues = _split_queues(state)
    out = rename_keys(weights, BLIP_RULES, source=source)
    _check_parts(out, ("vision.model.",), source)
    has_encoder = _has(out, "text.encoder.layer.")
    has_decoder = _has(out, "decoder.layer.", "lm_head.transform.")
    if not (has_encoder or has_decoder):
        raise KeyError(f"{source}: neither text_encoder.* nor text_decoder.* keys; is this a BLIP checkpoint?")
    generate = _reconcile_decoder(out, has_encoder, notes) and has_decoder
    generate = _lm_head_tied(out, notes) and generate
    _alias(out, "lm_head.decoder.weight", WORD_EMB)
    out.update(convert_queues(queues, _embed_dim(out), source))
    _add_momentum_copies(out, BLIP_PAIRS, notes)
    _alias_shared_decoder(out)
    depth = len(_layers(out, "text.encoder.layer."))
    absent = _blip_absent(out, has_encoder, has_decoder, depth, notes)
    capabilities = {"generate"} if generate else set()
    if has_encoder and _has(out, "vision_proj.", "text_proj.", "itm_head."):
        capabilities |= {"encode", "itm"}
    if not capabilities:
        raise ValueError(f"{source}: nothing usable: {notes}")
    return out, tuple(absent), frozenset(capabilities)


def _reconcile_decoder(out: dict[str, Tensor], has_encoder: bool, notes: list[str]) -> bool:
    """In place: resolve the decoder's copies of the parts vlzoo shares with the text
    encoder. Returns whether the decoder is represented faithfully."""
    copies = {k[len(_SHARED):]: out.pop(k) for k in [k for k in out if k.startswith(_SHARED)]}
    if not copies:
        return True
    if not has_encoder:  # a captioning fine-tune: the decoder's copies are the only ones
        out.update(copies)
        notes.append("no text encoder in the file (a captioning checkpoint): the decoder's embeddings, "
                     "cross-attention and feed-forward fill the modules vlzoo shares; the encoder's "
                     "self-attention, the projections and the ITM head stay at initialisation")
        return True
    missing = sorted(k for k in copies if k not in out)
    if missing:
        raise KeyError(f"original BLIP checkpoint: text_decoder has parts text_encoder lacks: {missing[:10]}")
    differ = sorted(k for k, v in copies.items() if not torch.equal(v, out[k]))
    if differ:
        notes.append(f"text_decoder's copies of {len(differ)} shared tensors differ from text_encoder's "
                     f"(e.g. {differ[:3]}); vlzoo's BLIP shares them, so the encoder's are kept and "
                     "the decoder is not offered for generation")
        return False
    return True


def _lm_head_tied(out: dict[str, Tensor], notes: list[str]) -> bool:
    """Whether the file's LM output matrix equals the word embeddings (vlzoo ties them);
    when not, it is dropped."""
    head = out.get("lm_head.decoder.weight")
    if head is None or WORD_EMB not in out or torch.equal(head, out[WORD_EMB]):
        return True
    del out["lm_head.decoder.weight"]
    notes.append("text_decoder.cls.predictions.decoder.weight differs from the word embeddings (the "
                 "pre-training code unties them); vlzoo ties them, so the decoder is not offered for generation")
    return False


def _alias_shared_decoder(out: dict[str, Tensor]) -> None:
    """In place: the decoder's shared cross-attention/feed-forward under its own names."""
    for key in [k for k in out if k.startswith("text.encoder.layer.")]:
        index, rest = key.removeprefix("text.encoder.layer.").split(".", 1)
        if not rest.startswith("attention."):
            out[f"decoder.layer.{index}.{rest}"] = out[key]


def _blip_absent(
    out: dict[str, Tensor], has_encoder: bool, has_decoder: bool, depth: int, notes: list[str]
) -> list[str]:
    absent: list[str] = []
    if not has_encoder:
        absent += [f"{t}.encoder.layer.{i}.attention." for t in ("text", "text_m") for i in range(depth)]
    for head in ("vision_proj", "text_proj", "itm_head"):  # substrings: the momentum copies too
        if not _has(out, head + "."):
            absent.append(head)
    if not has_decoder:
        absent += [f"decoder.layer.{i}.attention." for i in range(depth)]
        absent += ["lm_head.transform.", "lm_head.bias"]
        notes.append("no text decoder in the file (a retrieval checkpoint): no captioning")
    return absent + _absent_training_state(out, notes)


# ------------------------------------------------------------------ the model
def _check_vision_size(state: dict[str, Tensor], model: nn.Module, source: str) -> None:
    """A clear message when the file's position embeddings are for another image size."""
    key = "vision.model.pos_embed"
    own = model.state_dict().get(key)
    if own is None or key not in state or state[key].shape == own.shape:
        return
    vision = model.vision
    patch = vision.model.patch_embed.patch_size[0]
    size = round((state[key].shape[1] - 1) ** 0.5) * patch
    raise ValueError(f"{source}: the file's ViT position embeddings {tuple(state[key].shape)} are for "
                     f"{size} px images (patch {patch}); the zoo config builds {vision.image_size} px "
                     f"({tuple(own.shape)}); use a zoo config with image_size {size}")


def _use_original_vit_eps(model: nn.Module, config: Any, notes: list[str]) -> Any:
    """Set every ViT LayerNorm (online and momentum) to the releases' epsilon; returns the
    config saying so (``vision.kwargs.norm_eps``)."""
    norms = [m for name in ("vision", "vision_m") for m in getattr(model, name).modules() if isinstance(m, nn.LayerNorm)]
    found = sorted({m.eps for m in norms})
    if found == [ORIGINAL_VIT_EPS]:
        return config
    for m in norms:
        m.eps = ORIGINAL_VIT_EPS
    notes.append(f"the zoo config's ViT LayerNorm epsilon {found} was set to {ORIGINAL_VIT_EPS}, the original's")
    vision = dataclasses.replace(config.vision, kwargs={**config.vision.kwargs, "norm_eps": ORIGINAL_VIT_EPS})
    return dataclasses.replace(config, vision=vision)


def _check_text(model: nn.Module, source: str) -> None:
    """The text model's LayerNorm epsilon, and BLIP's [DEC]/[ENC] ids for the released vocabulary."""
    eps = model.text.config.layer_norm_eps
    if eps != ORIGINAL_TEXT_EPS:
        raise ValueError(f"{source}: the zoo config's text layer_norm_eps is {eps}; the original uses {ORIGINAL_TEXT_EPS}")
    if hasattr(model, "dec_id") and model.text.config.vocab_size == BLIP_VOCAB:  # BLIP (ALBEF has no [DEC])
        if (model.dec_id, model.enc_id) != (BLIP_DEC_ID, BLIP_ENC_ID):
            raise ValueError(f"{source}: the tokenizer gives [DEC]={model.dec_id}, [ENC]={model.enc_id}; the "
                             f"original BLIP vocabulary has [DEC]={BLIP_DEC_ID}, [ENC]={BLIP_ENC_ID}")


def _zero_token_types(state: dict[str, Tensor], model: nn.Module, notes: list[str]) -> None:
    """In place: zero token-type embeddings where the model has them and the file not (BLIP)."""
    own = model.state_dict()
    for prefix in ("text", "text_m"):
        key = f"{prefix}.embeddings.token_type_embeddings.weight"
        if key in own and key not in state and f"{prefix}.embeddings.word_embeddings.weight" in state:
            state[key] = torch.zeros_like(own[key])
            notes.append(f"{key}: not in the original model, set to zero (adds nothing)")


def _fit_queue(state: dict[str, Tensor], model: nn.Module, absent: tuple[str, ...], notes: list[str]) -> tuple[str, ...]:
    """Drop a queue of another size than the config's (training-only state)."""
    image = state.get("queue.image")
    if image is None or image.shape[0] == model.queue.size:
        return absent
    for key in [k for k in state if k.startswith("queue.")]:
        del state[key]
    notes.append(f"the file's queue holds {image.shape[0]} entries, the zoo config {model.queue.size}: "
                 "the queue stays at initialisation")
    return (*absent, "queue.")


def load_original(entry: Any, local_path: Path, parts: LoadedParts, convert: Callable) -> LoadedParts:
    """A manifest entry of an original ALBEF/BLIP release: ``parts`` is the model built
    from ``entry.config`` (a zoo config), ``convert`` its family's key converter
    (``Family.convert_original``). Reads ``local_path`` (``torch.load(weights_only=True)``
    or safetensors), converts and loads strictly. ``extra`` gets ``absent`` and ``notes``."""
    source = f"{entry.name} ({local_path})"
    notes: list[str] = []
    state = original_state_dict(load_state_dict_file(_weights_file(Path(local_path))), source)
    converted, absent, capabilities = convert(state, notes)
    model = parts.model
    _check_text(model, source)
    _check_vision_size(converted, model, source)
    config = _use_original_vit_eps(model, parts.config, notes)
    _zero_token_types(converted, model, notes)
    absent = _fit_queue(converted, model, absent, notes)
    load_strict(model, converted, source=source, allow_missing=absent)
    extra = {**parts.extra, "format": entry.format, "absent": absent, "notes": notes}
    preprocess = dataclasses.replace(config.vision, resize_mode="squash")  # the releases resize to S x S
    return dataclasses.replace(parts, family=entry.family, config=config, capabilities=capabilities,
                               source=entry.name, extra=extra, preprocess=preprocess,
                               pipeline=original_pipeline(preprocess))
