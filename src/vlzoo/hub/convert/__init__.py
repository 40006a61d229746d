"""Converters from foreign checkpoints (open_clip, transformers, original releases) to
vlzoo models: explicit key maps, shape checks, strict loading.

Every converter ends in a :class:`LoadedParts`: the vlzoo model with its weights
loaded, the vlzoo config that rebuilds it, its preprocessing, its tokenizer and what
it can do, and the image pipeline of the release it came from (:mod:`vlzoo.data.pipelines`).
``vlzoo.load`` wraps that in a :class:`vlzoo.zoo.ZooModel`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from vlzoo.config import CAPABILITIES, VisionConfig
from vlzoo.data.pipelines import ImagePipeline
from vlzoo.data.tokenizers import Tokenizer

__all__ = ["CAPABILITIES", "LoadedParts", "rename_keys"]


@dataclass
class LoadedParts:
    """A converted (or natively loaded) model and what goes with it.

    family: a registered family's name (:mod:`vlzoo.families`); model: the vlzoo ``nn.Module`` (weights loaded);
    config: the vlzoo model config dataclass that builds ``model``; preprocess: image
    size, mean, std, interpolation; tokenizer: None when the source has none (tests);
    capabilities: a subset of :data:`CAPABILITIES` (e.g. a BLIP retrieval checkpoint
    has no trained captioning decoder, so no ``generate``); source: where it came from;
    pipeline: the release's own image pipeline (None: vlzoo's, from ``preprocess``).
    """

    family: str
    model: nn.Module
    config: Any
    preprocess: VisionConfig
    tokenizer: Tokenizer | None
    capabilities: frozenset[str]
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    pipeline: ImagePipeline | None = None

    def __post_init__(self) -> None:
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"unknown capabilities {sorted(unknown)}; known: {CAPABILITIES}")


def rename_keys(
    state: dict[str, Tensor], rules: Iterable[tuple[str, str]], source: str = "checkpoint"
) -> dict[str, Tensor]:
    """Apply regex ``(pattern, replacement)`` rules to every key; the first matching rule
    wins. A key no rule matches is an error naming it (an explicit map leaves nothing
    to chance); a rule with replacement ``""`` drops the key."""
    compiled = [(re.compile(p), r) for p, r in rules]
    out: dict[str, Tensor] = {}
    unmatched = []
    for key, value in state.items():
        for pattern, replacement in compiled:
            if pattern.fullmatch(key):
                new = pattern.sub(replacement, key)
                if new:
                    if new in out:
                        raise ValueError(f"{source}: two keys map to {new!r}")
                    out[new] = value
                break
        else:
            unmatched.append(key)
    if unmatched:
        raise KeyError(f"{source}: no conversion rule for keys {unmatched[:20]} ({len(unmatched)})")
    return out
