"""Zoo artefacts: a config naming ``zoo:FAMILY/VARIANT`` gets that model trained once
(in a subprocess), cached under $VLZOO_HOME keyed by its config, and reused."""

import subprocess

import pytest
import torch

from vlzoo.backbones import resolve_vision_config
from vlzoo.config import VisionConfig
from vlzoo.hub import artefacts
from vlzoo.tasks.loading import read_checkpoint

TINY_CLIP = """
seed_everything: 0
trainer: {max_steps: 2, val_check_interval: 2, check_val_every_n_epoch: null, num_sanity_val_steps: 0,
          enable_progress_bar: false, logger: false}
model:
  class_path: vlzoo.tasks.CLIPTask
  init_args:
    model:
      embed_dim: 16
      vision: {impl: timm, name: vit_tiny_patch16_224, image_size: 16, mean: [0.4, 0.4, 0.4], std: [0.2, 0.2, 0.2],
               kwargs: {patch_size: 8, embed_dim: 24, depth: 2, num_heads: 2}}
      text: {impl: open_clip, tokenizer: shapes, context_length: 24, kwargs: {width: 32, heads: 2, layers: 1}}
    optim: {lr: 1.0e-3, warmup_steps: 1}
data:
  batch_size: 8
  shapes: {image_size: 16, train_size: 32, val_size: 8, test_size: 8}
"""


@pytest.fixture()
def zoo(tmp_path, monkeypatch):
    root = tmp_path / "zoo_configs"
    (root / "models" / "clip").mkdir(parents=True)
    (root / "models" / "clip" / "tiny.yaml").write_text(TINY_CLIP)
    monkeypatch.setenv("VLZOO_CONFIGS", str(root))
    return root


def test_missing_artefact_is_trained_once_then_reused(zoo, monkeypatch):
    checkpoint = artefacts.artefact_checkpoint("zoo:clip/tiny")
    directory = checkpoint.parent
    assert directory == artefacts.artefact_dir("zoo:clip/tiny") and directory.parent.name == "artefacts"
    assert (directory / "config.yaml").is_file() and (directory / "metrics.json").is_file()
    assert not list(directory.parent.glob(".clip-tiny-*"))  # no staging left behind

    def no_training(*args, **kwargs):
        raise AssertionError("the cached artefact should have been reused")

    monkeypatch.setattr(subprocess, "run", no_training)
    assert artefacts.artefact_checkpoint("zoo:clip/tiny") == checkpoint

    # the vision tower of that CLIP, with its own preprocessing and weights
    resolved, state = resolve_vision_config(VisionConfig(impl="vlzoo", name="zoo:clip/tiny", output_layer=-2))
    assert resolved.impl == "timm" and resolved.image_size == 16 and tuple(resolved.mean) == (0.4, 0.4, 0.4)
    assert resolved.output_layer == -2
    saved = read_checkpoint(checkpoint)["state_dict"]
    for key, value in state.items():
        torch.testing.assert_close(value, saved[f"model.vision.{key}"])


def test_key_follows_the_config_and_what_it_refers_to(zoo):
    (zoo / "models" / "blip2").mkdir()
    referrer = zoo / "models" / "blip2" / "tiny.yaml"
    referrer.write_text("model:\n  init_args:\n    model:\n      vision: {impl: vlzoo, name: zoo:clip/tiny}\n")
    key, clip_key = artefacts.artefact_key("zoo:blip2/tiny"), artefacts.artefact_key("zoo:clip/tiny")
    assert artefacts.artefact_key("zoo:blip2/tiny") == key  # stable
    tiny = zoo / "models" / "clip" / "tiny.yaml"
    tiny.write_text(TINY_CLIP + "\n# a comment changes nothing\n")
    assert artefacts.artefact_key("zoo:clip/tiny") == clip_key
    tiny.write_text(TINY_CLIP.replace("max_steps: 2", "max_steps: 3"))
    assert artefacts.artefact_key("zoo:clip/tiny") != clip_key
    assert artefacts.artefact_key("zoo:blip2/tiny") != key  # a changed dependency retrains the referrer


def test_key_follows_the_vlzoo_version(zoo, monkeypatch):
    key = artefacts.artefact_key("zoo:clip/tiny")
    monkeypatch.setattr(artefacts, "__version__", "999.0")
    assert artefacts.artefact_key("zoo:clip/tiny") != key  # a new release trains its artefacts anew


def test_unknown_name_and_cycles_are_clear_errors(zoo):
    with pytest.raises(FileNotFoundError, match="zoo:clip/huge.*searched"):
        artefacts.artefact_dir("zoo:clip/huge")
    (zoo / "models" / "a").mkdir()
    (zoo / "models" / "a" / "x.yaml").write_text("ref: zoo:a/y\n")
    (zoo / "models" / "a" / "y.yaml").write_text("ref: zoo:a/x\n")
    with pytest.raises(ValueError, match="cycle"):
        artefacts.artefact_key("zoo:a/x")


def test_failed_training_names_the_config_and_leaves_nothing(zoo):
    broken = zoo / "models" / "clip" / "broken.yaml"
    broken.write_text(TINY_CLIP.replace("embed_dim: 16", "embed_dims: 16"))
    with pytest.raises(RuntimeError, match="broken.yaml"):
        artefacts.resolve_artefact("zoo:clip/broken")
    target = artefacts.artefact_dir("zoo:clip/broken")
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.*"))
