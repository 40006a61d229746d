"""The family registry: every family's entry is consistent, nothing outside it branches
on a family name, and a new family (a module plus one registry entry, here a plugin
written by the test) trains, loads, exports and compares with no other edit."""

from __future__ import annotations

import ast
import json
import os
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from vlzoo import families

SRC = Path(__file__).resolve().parents[1] / "src" / "vlzoo"
ROOT = Path(__file__).resolve().parents[1]


def test_every_entry_is_consistent():
    registered = families.all_families()
    assert set(registered) == {"clip", "albef", "blip", "blip_vqa", "blip2", "blip2_llm"}
    for name, family in registered.items():
        assert family.name == name
        assert all(task.family == name and families.of_task(task) is family for task in family.tasks)
        assert hasattr(family.config, "__dataclass_fields__")
        if family.hf_model_type:
            assert families.of_model_type(family.hf_model_type) is family
        if family.original_format:
            assert families.of_format(family.original_format) is family


def test_a_task_of_no_family_is_known_but_not_a_zoo_model():
    from vlzoo.tasks import CausalLMTask

    assert families.of_task(CausalLMTask) is None
    assert families.task_by_name("vlzoo.tasks.CausalLMTask", "here") is CausalLMTask
    with pytest.raises(ValueError, match="not a vlzoo task.*never imports"):
        families.task_by_name("os.system", "here")


def test_a_second_family_of_the_same_name_is_refused():
    clip = families.get("clip")
    with pytest.raises(ValueError, match="already registered"):
        families.register(families.Family("clip", clip.config, clip.build, clip.task, clip.capabilities))
    with pytest.raises(ValueError, match="unknown model family 'nope'; known: clip"):
        families.get("nope")


def _family_branches(path: Path) -> list[str]:
    """Comparisons of something called ``family`` (or a registered family name) with a
    string literal: the name-sniffing the registry replaces."""
    names = set(families.names())
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left, *node.comparators]
        literals = [s.value for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)]
        literals += [e.value for s in sides if isinstance(s, ast.Tuple | ast.List | ast.Set) for e in s.elts
                     if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        about_family = any("family" in ast.unparse(s) for s in sides if not isinstance(s, ast.Constant))
        if (about_family and literals) or names & set(literals):
            found.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_family_name_branches_outside_the_registry():
    found = [hit for path in sorted(SRC.rglob("*.py")) if path.name != "families.py" for hit in _family_branches(path)]
    assert not found, "branches on a family name (ask vlzoo.families instead):\n" + "\n".join(found)


def test_the_branch_check_can_fail(tmp_path):
    planted = SRC / "_planted_for_test.py"
    try:
        planted.write_text("def f(parts):\n    return parts.family == 'blip' or x in ('albef', 'clip')\n")
        assert len(_family_branches(planted)) == 2
    finally:
        planted.unlink()


# ---------------------------------------------------------------------- a toy family
TOY_MODULE = '''
"""A toy family: mean-pooled pixels and a bag of words, each projected and normalised."""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vlzoo.config import EvalConfig, FinetuneConfig, OptimConfig, VisionConfig, as_config
from vlzoo.data.tokenizers import build_tokenizer
from vlzoo.families import Family
from vlzoo.losses import clip_loss
from vlzoo.tasks.base import VLTask


@dataclass
class ToyConfig:
    vision: VisionConfig = field(default_factory=lambda: VisionConfig(image_size=16, mean=(0.5,) * 3, std=(0.5,) * 3))
    tokenizer: str = "shapes"
    context_length: int = 24
    embed_dim: int = 16


class ToyModel(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int):
        super().__init__()
        self.image = nn.Linear(3 * 4 * 4, embed_dim)
        self.words = nn.Embedding(vocab_size, embed_dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.0))

    def encode_image(self, pixel_values):  # (B, 3, H, W) -> (B, D)
        return F.normalize(self.image(F.adaptive_avg_pool2d(pixel_values, 4).flatten(1)), dim=-1)

    def encode_text(self, input_ids, attention_mask=None):  # (B, L) -> (B, D)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        words = (self.words(input_ids) * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return F.normalize(words, dim=-1)


def build_toy(cfg: ToyConfig):
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.context_length)
    return ToyModel(tokenizer.vocab_size, cfg.embed_dim), tokenizer


class ToyTask(VLTask):
    family = "toy"

    def __init__(self, model: ToyConfig = ToyConfig(), optim: OptimConfig = OptimConfig(),
                 eval: EvalConfig = EvalConfig(), finetune: FinetuneConfig = FinetuneConfig()):
        super().__init__(optim, eval, finetune)
        self.save_hyperparameters()
        self.config = as_config(model, ToyConfig, "model")
        self.model, self.tokenizer = build_toy(self.config)
        self.preprocess_config = self.config.vision

    def training_step(self, batch, batch_idx):
        image = self.model.encode_image(batch["pixel_values"])
        text = self.model.encode_text(batch["input_ids"], batch["attention_mask"])
        loss = clip_loss(image, text, self.model.logit_scale.exp())
        self.log("train/loss", loss)
        return loss

    def embed_images(self, pixel_values):
        return self.model.encode_image(pixel_values)


FAMILY = Family("toy", ToyConfig, build_toy, ToyTask, frozenset({"encode"}))
'''

TOY_CONFIG = {
    "seed_everything": 0,
    "trainer": {"max_steps": 4, "val_check_interval": 4, "check_val_every_n_epoch": None, "accelerator": "cpu",
                "devices": 1, "log_every_n_steps": 1, "enable_progress_bar": False},
    "model": {"class_path": "toy_family.ToyTask", "init_args": {"optim": {"lr": 1e-2, "warmup_steps": 1}}},
    "data": {"batch_size": 16, "num_workers": 0,
             "shapes": {"image_size": 16, "train_size": 64, "val_size": 16, "test_size": 16}},
}


@pytest.fixture
def toy_plugin(tmp_path, monkeypatch):
    """``toy_family`` as an installed plugin: the module and a distribution declaring it in
    the ``vlzoo.families`` entry-point group, on the path of this process and of the
    ``vlzoo fit`` subprocesses ``vlzoo compare`` starts."""
    site = tmp_path / "site"
    (site / "toy_family-0.1.dist-info").mkdir(parents=True)
    (site / "toy_family.py").write_text(textwrap.dedent(TOY_MODULE))
    (site / "toy_family-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-family\nVersion: 0.1\n")
    (site / "toy_family-0.1.dist-info" / "entry_points.txt").write_text("[vlzoo.families]\ntoy = toy_family:FAMILY\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setattr(families, "_PLUGINS_LOADED", False)
    yield site
    families.unregister("toy")
    sys.modules.pop("toy_family", None)


@pytest.mark.slow
def test_a_toy_family_fits_loads_exports_and_compares(toy_plugin, tmp_path):
    import vlzoo
    from vlzoo.cli import main

    assert "toy" in families.names()  # the entry point, nothing else
    config = tmp_path / "toy.yaml"
    config.write_text(yaml.safe_dump(TOY_CONFIG))
    run = tmp_path / "run"
    main(["fit", "--config", str(config), "--trainer.default_root_dir", str(run)])
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["test/r1_t2i"] <= 1.0

    model = vlzoo.load(run)  # the run's best checkpoint, through the registry
    assert model.family == "toy" and model.capabilities == {"encode"}
    pixels = torch.rand(2, 3, 16, 16)
    embeds = model.encode_image(pixels)
    assert embeds.shape == (2, 16)

    export = tmp_path / "export"
    assert main(["export", str(run), "--out", str(export)]) == 0
    again = vlzoo.load(export)
    assert again.family == "toy"
    torch.testing.assert_close(again.encode_image(pixels), embeds)
    torch.testing.assert_close(again.encode_text(["a red circle"]), model.encode_text(["a red circle"]))

    recipe = yaml.safe_load((ROOT / "zoo_configs/recipes/shapes.yaml").read_text())
    recipe.update(global_batch=16, budget={"by": "steps", "steps": 3}, curve_points=1)
    recipe["data"]["shapes"] = {"image_size": 16, "train_size": 48, "val_size": 16, "test_size": 16}
    recipe["models"] = {"toy": {"config": str(config), "overrides": {"trainer.enable_progress_bar": False}}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    out = tmp_path / "compare"
    assert main(["compare", "--recipe", str(tmp_path / "recipe.yaml"), "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert 0.0 <= results["models"]["toy"]["metrics"]["test/r1_t2i"] <= 1.0
    assert results["models"]["toy"]["flops_per_step"] > 0  # the flop counter sees a plug-in family's step
    assert "| toy |" in (out / "results.md").read_text()


def test_a_family_fine_tunes_with_the_recipes_its_entry_names():
    from vlzoo.recipes import recipe_path

    assert recipe_path("vqa", "blip_vqa").name == "blip.yaml"  # BLIP VQA: BLIP's VQA recipe
    with pytest.raises(ValueError, match="a blip_vqa model cannot be fine-tuned for retrieval"):
        recipe_path("retrieval", "blip_vqa")  # and only for VQA
