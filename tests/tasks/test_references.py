"""A vision tower given as a reference (``impl: vlzoo``, a checkpoint or ``zoo:`` name) is
resolved by every task before its builder runs: the tower's own config and weights, the
concrete tower recorded, and what it exports reloads without the reference."""

import dataclasses

import pytest
import torch
from tiny_configs import (
    save_task_checkpoint,
    tiny_blip2_config,
    tiny_clip_config,
    tiny_momentum_config,
    tiny_task,
)

from vlzoo.backbones import build_vision_encoder
from vlzoo.config import ALBEFConfig, VisionConfig
from vlzoo.hub.export import export_parts, load_export
from vlzoo.hub.loaders import parts_from_task
from vlzoo.tasks import ALBEFTask, BLIP2Task, CLIPTask


@pytest.fixture(scope="module")
def clip_checkpoint(tmp_path_factory):
    torch.manual_seed(3)
    task = tiny_task("clip")
    return task, save_task_checkpoint(task, tmp_path_factory.mktemp("ref") / "clip.ckpt")


def _reference(path, output_layer=-1) -> VisionConfig:
    return VisionConfig(impl="vlzoo", name=str(path), output_layer=output_layer, image_size=999)


@pytest.mark.parametrize("family", ["clip", "albef", "blip2"])
def test_every_task_resolves_a_vision_reference(family, clip_checkpoint, tmp_path):
    source, path = clip_checkpoint
    if family == "clip":
        task = CLIPTask(dataclasses.replace(tiny_clip_config(), vision=_reference(path)))
        tower = task.model.vision
    elif family == "albef":
        task = ALBEFTask(dataclasses.replace(tiny_momentum_config(ALBEFConfig, fusion_layers=1),
                                             vision=_reference(path)))
        tower = task.model.vision
    else:
        task = BLIP2Task(dataclasses.replace(tiny_blip2_config(), vision=_reference(path)))
        tower = task.model.vision.encoder
    assert task.preprocess_config.impl == "timm" and task.preprocess_config.image_size == 16  # the tower's own
    for key, value in source.model.vision.state_dict().items():
        assert torch.equal(tower.state_dict()[key], value), key
    out = export_parts(parts_from_task(task, family), tmp_path / "export")  # records the concrete tower
    assert load_export(out).config.vision.impl == "timm"


def test_a_builder_refuses_an_unresolved_reference(clip_checkpoint):
    with pytest.raises(ValueError, match="reference.*resolve it first"):
        build_vision_encoder(_reference(clip_checkpoint[1]), 16)
