"""Text generation behind :meth:`vlzoo.zoo.ZooModel.generate` and ``.vqa``, per family."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from vlzoo.models.generation import GenerationConfig

if TYPE_CHECKING:
    from vlzoo.zoo import ZooModel

CAPTION_DEFAULTS = GenerationConfig(method="beam", num_beams=3, max_length=30, min_length=5)
ANSWER_DEFAULTS = GenerationConfig(method="greedy", max_length=10, min_length=1)


def generation_config(zoo: ZooModel, key: str, default: GenerationConfig, overrides: dict[str, Any]
                      ) -> GenerationConfig:
    """The model's own decoding settings (``extra[key]``: ``generation`` for captions,
    ``vqa_generation`` for answers; else ``default``) with ``overrides``
    (GenerationConfig fields; an unknown one is an error naming it)."""
    base = zoo.extra.get(key) or default
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GenerationConfig)}
    if unknown:
        raise TypeError(f"unknown generation settings {sorted(unknown)}; "
                        f"known: {[f.name for f in dataclasses.fields(GenerationConfig)]}")
    return dataclasses.replace(base, **overrides)


def _decode(tokenizer, ids: Tensor) -> list[str]:
    return [tokenizer.decode(row).strip() for row in ids]


def generate_text(zoo: ZooModel, pixel_values: Tensor, prompt: str | None, **kwargs: Any) -> list[str]:
    """Captions of (B, 3, H, W) images (after ``prompt`` where the family takes one)."""
    config = generation_config(zoo, "generation", CAPTION_DEFAULTS, kwargs)
    model, b = zoo.model, len(pixel_values)
    if zoo.family == "blip":
        from vlzoo.tasks.momentum import prompt_prefix

        prefix = None
        if prompt is not None:
            prefix = torch.tensor(prompt_prefix(zoo.tokenizer, prompt), device=pixel_values.device).expand(b, -1)
        return _decode(zoo.tokenizer, model.generate(pixel_values, prefix, config))
    if zoo.family == "blip2":
        if prompt is not None:
            raise ValueError("BLIP-2 stage-1 (Q-Former) captioning takes no prompt")
        return _decode(zoo.tokenizer, model.generate(pixel_values, config))
    if zoo.family == "blip2_llm":
        from vlzoo.tasks.blip2 import llm_answer

        prompt = zoo.config.caption_prompt if prompt is None else prompt
        soft = model.soft_prompt(model.image_tokens(pixel_values))
        return llm_answer(model, zoo.extra["llm_tokenizer"], soft, [prompt] * b, config, zoo.config.max_text_length)
    raise ValueError(f"no text generation for family {zoo.family!r}")


def answer_questions(zoo: ZooModel, pixel_values: Tensor, questions: list[str], **kwargs: Any) -> list[str]:
    """One answer per (image, question) pair."""
    if len(questions) != len(pixel_values):
        raise ValueError(f"{len(pixel_values)} images but {len(questions)} questions (one question per image)")
    model = zoo.model
    if zoo.family == "blip2_llm":
        from vlzoo.tasks.blip2 import llm_answer

        config = generation_config(zoo, "vqa_generation", ANSWER_DEFAULTS, kwargs)
        tokens = model.image_tokens(pixel_values)
        if zoo.config.instruction_aware:
            ids, mask = zoo.tokenize(questions)
            soft = model.soft_prompt(tokens, ids, mask)
        else:
            soft = model.soft_prompt(tokens)
        prompts = [zoo.config.vqa_prompt.format(q) for q in questions]
        return llm_answer(model, zoo.extra["llm_tokenizer"], soft, prompts, config, zoo.config.max_text_length)
    if zoo.family == "blip_vqa":
        config = generation_config(zoo, "vqa_generation", ANSWER_DEFAULTS, kwargs)
        ids, mask = zoo.tokenize(questions)
        return _decode(zoo.tokenizer, model.answer(pixel_values, ids, mask, config))
    raise ValueError(f"no question answering for family {zoo.family!r}")
