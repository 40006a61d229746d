"""Text generation behind :meth:`vlzoo.zoo.ZooModel.generate` and ``.vqa``: one small
function per family (the registry's ``caption`` / ``answer``), each taking the loaded
parts (``model``, ``tokenizer``, ``config``, ``extra``), a batch of images and the
decoding settings."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor

from vlzoo.models.blip2 import llm_answer
from vlzoo.models.builders import prompt_prefix
from vlzoo.models.generation import GenerationConfig

CAPTION_DEFAULTS = GenerationConfig(method="beam", num_beams=3, max_length=30, min_length=5)
ANSWER_DEFAULTS = GenerationConfig(method="greedy", max_length=10, min_length=1)


HF_NAMES = {"max_new_tokens": "max_length", "min_new_tokens": "min_length"}  # the same counts of new tokens


def generation_config(extra: dict[str, Any], key: str, default: GenerationConfig, overrides: dict[str, Any]
                      ) -> GenerationConfig:
    """The model's own decoding settings (``extra[key]``: ``generation`` for captions,
    ``vqa_generation`` for answers; else ``default``) with ``overrides``
    (GenerationConfig fields, or transformers' ``max_new_tokens`` / ``min_new_tokens``, which
    count new tokens as vlzoo's ``max_length`` / ``min_length`` do; ``num_beams`` without a
    ``method`` picks beam search above 1 and greedy at 1, as transformers; an unknown one is
    an error naming it)."""
    base = extra.get(key) or default
    both = [(hf, ours) for hf, ours in HF_NAMES.items() if hf in overrides and ours in overrides]
    if both:
        raise TypeError(f"give either {both[0][0]} or {both[0][1]} (the same count of new tokens), not both")
    overrides = {HF_NAMES.get(k, k): v for k, v in overrides.items()}
    if "num_beams" in overrides and "method" not in overrides:  # as transformers: beams > 1 is beam search
        overrides["method"] = "beam" if overrides["num_beams"] > 1 else "greedy"
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}; "
                        f"known: {[f.name for f in dataclasses.fields(GenerationConfig)]}")
    return dataclasses.replace(base, **overrides)


def _decode(tokenizer, ids: Tensor) -> list[str]:
    return [tokenizer.decode(row).strip() for row in ids]


def caption_blip(parts, pixel_values: Tensor, prompt: str | None, config: GenerationConfig) -> list[str]:
    """BLIP: captions after ``prompt`` (default: the model's own prompt)."""
    prefix = None
    if prompt is not None:
        prefix = torch.tensor(prompt_prefix(parts.tokenizer, prompt), device=pixel_values.device)
        prefix = prefix.expand(len(pixel_values), -1)
    return _decode(parts.tokenizer, parts.model.generate(pixel_values, prefix, config))


def caption_blip2(parts, pixel_values: Tensor, prompt: str | None, config: GenerationConfig) -> list[str]:
    """BLIP-2 stage 1: the Q-Former's own captions (no prompt)."""
    if prompt is not None:
        raise ValueError("BLIP-2 stage-1 (Q-Former) captioning takes no prompt")
    return _decode(parts.tokenizer, parts.model.generate(pixel_values, config))


def caption_blip2_llm(parts, pixel_values: Tensor, prompt: str | None, config: GenerationConfig) -> list[str]:
    """BLIP-2 stage 2: the LLM's text after the soft visual prompt and ``prompt``
    (default: the config's ``caption_prompt``)."""
    model, cfg = parts.model, parts.config
    prompt = cfg.caption_prompt if prompt is None else prompt
    soft = model.soft_prompt(model.image_tokens(pixel_values))
    return llm_answer(model, parts.extra["llm_tokenizer"], soft, [prompt] * len(pixel_values), config,
                      cfg.max_text_length)


def answer_blip2_llm(parts, pixel_values: Tensor, questions: list[str], config: GenerationConfig) -> list[str]:
    """BLIP-2 stage 2: answers after ``vqa_prompt``-formatted questions (the question also
    read by the Q-Former when ``instruction_aware``)."""
    model, cfg = parts.model, parts.config
    tokens = model.image_tokens(pixel_values)
    if cfg.instruction_aware:
        ids, mask = parts.tokenize(questions)
        soft = model.soft_prompt(tokens, ids, mask)
    else:
        soft = model.soft_prompt(tokens)
    prompts = [cfg.vqa_prompt.format(q) for q in questions]
    return llm_answer(model, parts.extra["llm_tokenizer"], soft, prompts, config, cfg.max_text_length)


def answer_blip_vqa(parts, pixel_values: Tensor, questions: list[str], config: GenerationConfig) -> list[str]:
    """BLIP VQA: the answer decoder's text for each question."""
    ids, mask = parts.tokenize(questions)
    return _decode(parts.tokenizer, parts.model.answer(pixel_values, ids, mask, config))


def rank_answers_blip_vqa(parts, pixel_values: Tensor, questions: list[str], answer_tokens: tuple[Tensor, Tensor],
                          k: int) -> list[int]:
    """BLIP VQA by ranking: the index in the answer list (``answer_tokens``: its ids and mask,
    (A, La), tokenised once) of each question's answer: the ``k`` answers with the likeliest
    first token, rescored by their whole likelihood."""
    ids, mask = parts.tokenize(questions)
    answer_ids, answer_mask = answer_tokens
    return parts.model.rank_answers(parts.model.vision(pixel_values).tokens, ids, mask, answer_ids, answer_mask,
                                    k).tolist()
