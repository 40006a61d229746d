"""Text for a (frozen) language model: prompt + target batches with LM labels.

One format serves the causal LM vlzoo trains on shapes text and BLIP-2 stage 2, so
the LM is trained on exactly what it later reads:

- decoder-only: ``prompt_ids(prompt) + target_ids(target) + [eos]``; the labels hide
  the prompt (and the soft visual prompt BLIP-2 puts before it);
- encoder-decoder (T5): the prompt goes to the encoder, the target (+ eos) is the
  decoder's label (prefix LM).

``tokenizer`` is a Hugging Face tokenizer. ``prompt_ids`` keeps what the tokenizer
adds in front (BOS for OPT/Llama/shapes) and drops a trailing EOS (BERT/T5 style).
"""

from __future__ import annotations

import torch
from torch import Tensor

from vlzoo.data.tokenizers import _train_shapes_tokenizer
from vlzoo.losses import IGNORE


def shapes_lm_tokenizer(add_bos: bool = True):
    """The shapes word-level vocabulary as a ``PreTrainedTokenizerFast`` for a causal LM:
    BOS ([CLS]) prepended when ``add_bos``, no EOS appended; pad [PAD], eos [SEP]."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(_train_shapes_tokenizer().to_str())
    bos = [("[CLS]", tok.token_to_id("[CLS]"))]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A" if add_bos else "$A", special_tokens=bos)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                                   unk_token="[UNK]", mask_token="[MASK]")


def load_lm_tokenizer(name_or_path: str, add_bos: bool = True):
    """``shapes`` (:func:`shapes_lm_tokenizer`, ``add_bos`` applies) or a Hugging Face
    name/directory; a tokenizer without a pad token pads with its EOS."""
    if name_or_path == "shapes":
        return shapes_lm_tokenizer(add_bos)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(name_or_path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Ids of ``prompt`` with the tokenizer's leading specials, without a trailing EOS."""
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if ids and ids[-1] == tokenizer.eos_token_id:
        ids = ids[:-1]
    return list(ids)


def target_ids(tokenizer, target: str, after_prompt: bool) -> list[int]:
    """Ids of ``target`` (no specials) + EOS; a space goes before it after a prompt, so
    byte-level BPEs (GPT-2, OPT) see the word as they would mid-sentence."""
    text = f" {target.strip()}" if after_prompt else target.strip()
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]


def _pad(rows: list[list[int]], value: int, left: bool = False) -> Tensor:
    width = max(1, max(len(r) for r in rows))
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        if row:
            if left:
                out[i, width - len(row):] = torch.tensor(row)
            else:
                out[i, : len(row)] = torch.tensor(row)
    return out


def causal_lm_batch(tokenizer, prompts: list[str], targets: list[str], max_length: int) -> dict[str, Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (B, L) of prompt +
    target + EOS; labels are -100 on the prompt and padding. Rows are cut to
    ``max_length`` tokens."""
    rows, labels = [], []
    for prompt, target in zip(prompts, targets, strict=True):
        p = prompt_ids(tokenizer, prompt)
        t = target_ids(tokenizer, target, after_prompt=bool(prompt.strip()))
        rows.append((p + t)[:max_length])
        labels.append(([IGNORE] * len(p) + t)[:max_length])
    ids = _pad(rows, tokenizer.pad_token_id)
    mask = _pad([[1] * len(r) for r in rows], 0)
    return {"input_ids": ids, "attention_mask": mask, "labels": _pad(labels, IGNORE)}


def seq2seq_batch(tokenizer, prompts: list[str], targets: list[str], max_length: int) -> dict[str, Tensor]:
    """Encoder ``input_ids``/``attention_mask`` of the prompts and decoder ``labels`` of
    the targets (+ EOS; padding -100), each right-padded and cut to ``max_length``."""
    encoder = [list(tokenizer(p, add_special_tokens=True)["input_ids"])[:max_length] for p in prompts]
    decoder = [target_ids(tokenizer, t, after_prompt=False)[:max_length] for t in targets]
    return {"input_ids": _pad(encoder, tokenizer.pad_token_id), "attention_mask": _pad([[1] * len(r) for r in encoder], 0),
            "labels": _pad(decoder, IGNORE)}


def left_padded_prompts(tokenizer, prompts: list[str], max_length: int) -> dict[str, Tensor]:
    """Prompts for decoder-only generation: ``input_ids``/``attention_mask`` padded on the left."""
    rows = [prompt_ids(tokenizer, p)[-max_length:] for p in prompts]
    return {"input_ids": _pad(rows, tokenizer.pad_token_id, left=True),
            "attention_mask": _pad([[1] * len(r) for r in rows], 0, left=True)}
