"""Zero-shot classification: OpenAI's 80 templates and class names, top-k and mean
per-class recall against a direct computation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vlzoo.eval.zeroshot import (
    classification_scores,
    openai_imagenet,
    read_templates,
    zeroshot_classifier,
)


def test_openai_imagenet_metadata():
    classnames, templates = openai_imagenet()
    assert len(classnames) == 1000 and len(templates) == 80
    assert classnames[0] == "tench" and templates[0]("dog") == "a bad photo of a dog."


def test_classifier_equals_a_direct_computation_over_the_80_templates():
    classnames, templates = openai_imagenet()
    classnames = classnames[:7]
    gen = torch.Generator().manual_seed(0)
    table: dict[str, torch.Tensor] = {}

    def embed_texts(texts):  # a deterministic "text tower": one random unit vector per prompt
        for t in texts:
            table.setdefault(t, F.normalize(torch.randn(16, generator=gen), dim=0))
        return torch.stack([table[t] for t in texts])

    classifier = zeroshot_classifier(embed_texts, classnames, templates)
    for c, name in enumerate(classnames):
        direct = torch.stack([table[t(name)] for t in templates]).mean(0)
        torch.testing.assert_close(classifier[c], direct / direct.norm())
    images = F.normalize(torch.randn(30, 16, generator=gen), dim=1)
    labels = torch.randint(0, 7, (30,), generator=gen)
    logits = images @ classifier.T
    scores = classification_scores(logits, labels)
    ranks = [(logits[i] > logits[i, labels[i]]).sum().item() for i in range(30)]
    assert scores["top1"] == pytest.approx(sum(r < 1 for r in ranks) / 30)
    assert scores["top5"] == pytest.approx(sum(r < 5 for r in ranks) / 30)
    per_class = [sum(ranks[i] == 0 for i in range(30) if labels[i] == c) / (labels == c).sum().item()
                 for c in labels.unique().tolist()]
    assert scores["mean_per_class_recall"] == pytest.approx(sum(per_class) / len(per_class))


def test_template_files(tmp_path):
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nitap of a {}.\n")
    assert [t("dog") for t in read_templates(tmp_path / "t.txt")] == ["a photo of a dog.", "itap of a dog."]
    (tmp_path / "bad.txt").write_text("a photo\n")
    with pytest.raises(ValueError, match="bad.txt, line 1"):
        read_templates(tmp_path / "bad.txt")


def test_paper_text_rules():
    from vlzoo.eval.protocol import TextRule

    text = 'A Man\'s (red) bike: near  the x-ray/TV station!!  '
    assert TextRule("blip_caption", 30)(text) == "a man's red bike near the x-ray/tv station"
    assert TextRule("albef_caption", 30)(text) == "a mans red bike near the x ray tv station"
    assert TextRule("blip_caption", 3)(text) == "a man's red"
    assert TextRule("blip_question", 50)("What is it?  ") == "what is it?"
    with pytest.raises(ValueError, match="TextRule.kind"):
        TextRule("lavis", 3)
