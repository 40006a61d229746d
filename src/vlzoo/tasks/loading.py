"""Load a ``vlzoo fit`` checkpoint back into its task, safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary pickles);
the task class comes from the checkpoint itself (LightningCLI's ``_class_path``, or
the ``vlzoo_task`` entry every :class:`~vlzoo.tasks.VLTask` writes).
"""

from __future__ import annotations

import dataclasses
import importlib
from pathlib import Path

import torch

from vlzoo import config as config_module
from vlzoo.models import generation


def safe_checkpoint_globals() -> list[type]:
    """The config classes a task checkpoint may hold in its hyper-parameters."""
    names = ("VisionConfig", "TextConfig", "CLIPConfig", "MomentumConfig", "ALBEFConfig", "BLIPConfig",
             "BLIP2Config", "BLIP2LLMConfig", "CausalLMConfig", "OptimConfig", "EvalConfig", "FinetuneConfig",
             "LoRAConfig")
    return [getattr(config_module, n) for n in names] + [generation.GenerationConfig]


# ``torch.load(weights_only=True)`` (ours and Lightning's: ``trainer.test(ckpt_path=...)``,
# resume) may build vlzoo's config dataclasses and nothing else. Registered once, for the
# process: the ``torch.serialization.safe_globals`` context would unregister them on exit.
torch.serialization.add_safe_globals(safe_checkpoint_globals())


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` with the vlzoo config classes allowed; a
    truncated or foreign file raises an error that names it. ``mmap`` maps tensors
    instead of reading them (for looking at the metadata only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
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
    task = cls.load_from_checkpoint(path, map_location=map_location, strict=True, weights_only=True)
    return task.eval() if eval_mode else task


def vision_tower_from_checkpoint(
    path: str | Path, overrides: config_module.VisionConfig
) -> tuple[config_module.VisionConfig, dict[str, torch.Tensor]]:
    """The vision tower of a vlzoo task checkpoint: its own vision config (encoder,
    image size, mean/std) with ``output_layer``, ``patch_dropout``, ``grad_checkpointing``
    and ``locked`` taken from ``overrides``, and its weights (keys relative to the tower)."""
    checkpoint = read_checkpoint(path)
    model_config = checkpoint.get("hyper_parameters", {}).get("model")
    vision = model_config.get("vision") if isinstance(model_config, dict) else getattr(model_config, "vision", None)
    if isinstance(vision, dict):  # LightningCLI records plain dicts
        vision = as_config(vision, config_module.VisionConfig, f"{path}: model.vision")
    if not isinstance(vision, config_module.VisionConfig):
        raise ValueError(f"{path}: the checkpoint's hyper-parameters hold no model.vision config")
    prefix = "model.vision."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no {prefix}* weights in the checkpoint")
    keep = ("output_layer", "patch_dropout", "grad_checkpointing", "locked")
    return dataclasses.replace(vision, **{k: getattr(overrides, k) for k in keep}), state


def as_config(value: object, schema: type, where: str):
    """``value`` as a ``schema`` dataclass: as is, or built from a plain dict (what
    LightningCLI stores in checkpoints); an unknown or mistyped field is an error
    naming ``where``."""
    if isinstance(value, schema):
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{where}: expected a {schema.__name__} or a dict, got {type(value).__name__}")
    from omegaconf import OmegaConf

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), value))
    except Exception as err:
        raise ValueError(f"{where}: does not match {schema.__name__}: {err}") from err
