"""Zero-shot classification as CLIP's paper and CLIP_benchmark score it.

The classifier is each class's text embedding averaged over prompt templates (the mean of
the normalised embeddings, normalised again); images are assigned the class of highest
cosine. Defaults: OpenAI's 1,000 ImageNet class names and 80 templates, read from
``open_clip.zero_shot_metadata`` (the copy the field uses). Scores: top-1, top-5 and the
mean per-class recall, as fractions.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

from vlzoo.eval.formats import read_lines
from vlzoo.eval.retrieval import mean_over_prompts

Template = Callable[[str], str]


def openai_imagenet() -> tuple[list[str], list[Template]]:
    """OpenAI's ImageNet class names (in the sorted-synset order of the val folders) and its
    80 prompt templates."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    return list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)


def as_template(text: str, where: str = "template") -> Template:
    """A template string with one ``{}`` or ``{c}`` where the class name goes."""
    if text.count("{}") + text.count("{c}") != 1:
        raise ValueError(f"{where}: {text!r} must hold the class name's place exactly once, as {{}} or {{c}}")
    return lambda name: text.replace("{c}", name).replace("{}", name)


def read_templates(path: str | Path) -> list[Template]:
    return [as_template(t, f"{path}, line {i + 1}") for i, t in enumerate(read_lines(path, "templates"))]


@torch.no_grad()
def zeroshot_classifier(embed_texts: Callable[[list[str]], Tensor], classnames: list[str],
                        templates: list[Template]) -> Tensor:
    """(C, D) normalised classifier: each class's prompt embeddings averaged."""
    prompts = [template(name) for name in classnames for template in templates]
    return mean_over_prompts(embed_texts(prompts), len(classnames))


def classification_scores(logits: Tensor, labels: Tensor, ks: tuple[int, ...] = (1, 5)
                          ) -> dict[str, float | None]:
    """(N, C) scores and (N,) labels -> ``top{k}`` and ``mean_per_class_recall`` in [0, 1]
    (the recall of every class present among the labels, averaged). ``top{k}`` with fewer
    than k classes is None (it would be 1 whatever the model), as CLIP_benchmark reports it."""
    if len(labels) == 0:
        raise ValueError("no labelled images to score")
    out: dict[str, float | None] = {}
    for k in ks:
        if k > logits.shape[1]:
            out[f"top{k}"] = None
            continue
        top = logits.topk(k, dim=1).indices
        out[f"top{k}"] = (top == labels[:, None]).any(1).double().mean().item()
    correct = logits.argmax(1) == labels
    recalls = [correct[labels == c].double().mean() for c in labels.unique()]
    out["mean_per_class_recall"] = torch.stack(recalls).mean().item()
    return out
