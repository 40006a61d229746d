"""LightningModules: one base (optimizer groups, schedule, evaluation) and thin families."""

from vlzoo.tasks.base import VLTask
from vlzoo.tasks.clip import CLIPTask

__all__ = ["VLTask", "CLIPTask"]
