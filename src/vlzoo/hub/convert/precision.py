"""The ``dtype`` of ``vlzoo.load``: which parts of a loaded model run in half precision.

- BLIP-2 (``blip2``, ``blip2_llm``): the frozen parts (the vision tower; stage 2's LLM)
  run in ``dtype``; ``ln_vision``, the Q-Former with its queries and the projections
  (``vision_proj``, ``text_proj``, ``itm_head``, ``llm_proj``) stay float32, as in
  transformers (``_keep_in_fp32_modules``) and LAVIS: a float16 Q-Former overflows. It is
  the config's ``frozen_precision`` / ``llm_precision`` (``bf16``, ``fp16``; float32:
  None), so an export of the loaded model records it.
- Every other family (CLIP, ALBEF, BLIP) has no frozen part: the whole model is cast,
  as ``model.to(dtype)`` (``ZooModel.pixel_values`` gives its images in the tower's dtype).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from vlzoo.hub.convert import LoadedParts

LOAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
PRECISION_OF_DTYPE = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}
PRECISION_FIELDS = ("frozen_precision", "llm_precision")  # BLIP2Config, BLIP2LLMConfig


def check_load_dtype(dtype: Any) -> None:
    """A ValueError naming the option and the accepted values unless ``dtype`` is one."""
    if dtype is not None and dtype not in LOAD_DTYPES:
        accepted = ", ".join(str(d) for d in LOAD_DTYPES)
        raise ValueError(f"dtype must be one of {accepted} or None (as stored: float32), got {dtype!r}")


def with_frozen_precision(config: Any, dtype: torch.dtype | None) -> Any:
    """``config`` with the precision fields it has (:data:`PRECISION_FIELDS`) set for
    ``dtype``; unchanged for None."""
    if dtype is None:
        return config
    check_load_dtype(dtype)
    fields = {f: PRECISION_OF_DTYPE[dtype] for f in PRECISION_FIELDS if hasattr(config, f)}
    return dataclasses.replace(config, **fields) if fields else config


def cast_parts(parts: LoadedParts, dtype: torch.dtype | None) -> LoadedParts:
    """``parts`` with its model in ``dtype`` as the module docstring says (None: as loaded)."""
    if dtype is None:
        return parts
    check_load_dtype(dtype)
    model = parts.model
    if hasattr(model, "set_frozen_precision"):  # BLIP-2: frozen parts only
        model.set_frozen_precision(PRECISION_OF_DTYPE[dtype])
        return dataclasses.replace(parts, config=with_frozen_precision(parts.config, dtype))
    model.to(dtype)
    return parts
