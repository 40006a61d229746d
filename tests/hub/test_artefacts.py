"""Zoo artefacts: a config naming ``zoo:FAMILY/VARIANT`` gets that model trained once
(in a subprocess), cached under $VLZOO_HOME keyed by its config, and reused; an
interrupted build leaves nothing behind."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlzoo import artefacts
from vlzoo.checkpoints import read_checkpoint
from vlzoo.config import VisionConfig

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

    monkeypatch.setattr(subprocess, "Popen", no_training)
    assert artefacts.artefact_checkpoint("zoo:clip/tiny") == checkpoint

    # the vision tower of that CLIP, with its own preprocessing and weights
    resolved, state = artefacts.resolve_vision(VisionConfig(impl="vlzoo", name="zoo:clip/tiny", output_layer=-2))
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


def test_sigterm_during_a_build_stops_it_and_leaves_no_staging(zoo, tmp_path):
    slow = zoo / "models" / "clip" / "slow.yaml"
    slow.write_text(TINY_CLIP.replace("max_steps: 2", "max_steps: 100000"))
    target = artefacts.artefact_dir("zoo:clip/slow")
    code = "from vlzoo.artefacts import resolve_artefact; resolve_artefact('zoo:clip/slow')"
    build = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    deadline = time.monotonic() + 120
    while not list(target.parent.glob(f".{target.name}.*/run/config.yaml")) and time.monotonic() < deadline:
        time.sleep(0.2)  # the fit has started (LightningCLI saved its config)
    time.sleep(1)
    build.send_signal(signal.SIGTERM)
    _, err = build.communicate(timeout=120)
    assert build.returncode == 143, err[-2000:]
    assert "training it now" in err and "100000 steps" in err
    assert not target.exists() and not list(target.parent.glob(f".{target.name}.*"))


def test_a_stale_staging_folder_is_removed_and_the_duration_announced(zoo, capsys):
    (zoo / "models" / "clip" / "again.yaml").write_text(TINY_CLIP)
    target = artefacts.artefact_dir("zoo:clip/again")
    stale = target.parent / f".{target.name}.leftover"
    (stale / "run").mkdir(parents=True)  # as a SIGKILLed build leaves it
    artefacts._record_duration("zoo:clip/again", 240.0, 4)  # an earlier build: 4 steps in 4 minutes
    artefacts.resolve_artefact("zoo:clip/again")
    assert not stale.exists()
    assert "2 steps; about 2 min, as its last build here" in capsys.readouterr().err
