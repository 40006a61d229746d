"""LightningModules: one base (optimizer groups, schedule, evaluation) and thin families."""

from vlzoo.tasks.base import VLTask
from vlzoo.tasks.blip2 import BLIP2LLMTask, BLIP2Task
from vlzoo.tasks.classify import ClassifyTask
from vlzoo.tasks.clip import CLIPTask
from vlzoo.tasks.lm import CausalLMTask
from vlzoo.tasks.momentum import ALBEFTask, BLIPTask, MomentumTask
from vlzoo.tasks.vqa import BLIPVQATask

__all__ = ["VLTask", "CLIPTask", "MomentumTask", "ALBEFTask", "BLIPTask", "BLIP2Task", "BLIP2LLMTask", "CausalLMTask", "ClassifyTask",
           "BLIPVQATask"]
