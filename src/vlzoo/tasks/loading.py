"""Load a ``vlzoo fit`` checkpoint back into its task, safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary pickles);
the task class comes from the checkpoint itself (LightningCLI's ``_class_path``, or
the ``vlzoo_task`` entry every :class:`~vlzoo.tasks.VLTask` writes).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch

from vlzoo import config as config_module
from vlzoo.models import generation


def safe_checkpoint_globals() -> list[type]:
    """The config classes a task checkpoint may hold in its hyper-parameters."""
    names = ("VisionConfig", "TextConfig", "CLIPConfig", "MomentumConfig", "ALBEFConfig", "BLIPConfig",
             "OptimConfig", "EvalConfig")
    return [getattr(config_module, n) for n in names] + [generation.GenerationConfig]


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` with the vlzoo config classes allowed; a
    truncated or foreign file raises an error that names it. ``mmap`` maps tensors
    instead of reading them (for looking at the metadata only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(safe_checkpoint_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(f"{path}: not a readable vlzoo/Lightning checkpoint ({err})") from err


def task_class(checkpoint: dict, path: str | Path):
    """The LightningModule class recorded in ``checkpoint``."""
    class_path = checkpoint.get("vlzoo_task") or checkpoint.get("hyper_parameters", {}).get("_class_path")
    if not class_path:
        raise ValueError(f"{path}: the checkpoint does not say which vlzoo task wrote it")
    module, _, name = class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def load_task(path: str | Path, map_location: str | torch.device = "cpu", eval_mode: bool = True):
    """The task (with ``.model``, ``.tokenizer``, ``.preprocess_config``) saved at ``path``,
    loaded strictly."""
    cls = task_class(read_checkpoint(path, map_location, mmap=True), path)  # Lightning reads the tensors below
    with torch.serialization.safe_globals(safe_checkpoint_globals()):
        task = cls.load_from_checkpoint(path, map_location=map_location, strict=True, weights_only=True)
    return task.eval() if eval_mode else task
