"""LightningModules: one base (optimizer groups, schedule, evaluation) and thin families."""

from vlzoo.tasks.base import VLTask
from vlzoo.tasks.clip import CLIPTask
from vlzoo.tasks.momentum import ALBEFTask, BLIPTask, MomentumTask

__all__ = ["VLTask", "CLIPTask", "MomentumTask", "ALBEFTask", "BLIPTask"]
