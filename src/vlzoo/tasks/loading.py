"""Load a ``vlzoo fit`` checkpoint back into its task, safely.

Checkpoints are read with ``torch.load(weights_only=True)`` (no arbitrary pickles).
The task class is the one the checkpoint names (LightningCLI's ``_class_path``, or the
``vlzoo_task`` entry every :class:`~vlzoo.tasks.VLTask` writes), looked up in a fixed
table of vlzoo's tasks: nothing a file names is ever imported.
"""

from __future__ import annotations

import dataclasses
import zipfile
from pathlib import Path

import torch

from vlzoo import config as config_module
from vlzoo.hub.weights import refuse_non_finite
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
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a vlzoo/Lightning checkpoint (a checkpoint is a zip archive written by "
                         "torch.save; this file is a plain pickle, truncated, or something else)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(f"{path}: not a readable vlzoo/Lightning checkpoint ({err})") from err


TASK_NAMES = ("CLIPTask", "ALBEFTask", "BLIPTask", "BLIP2Task", "BLIP2LLMTask", "CausalLMTask", "ClassifyTask",
              "BLIPVQATask")


def task_classes() -> dict[str, type]:
    """Every class path a vlzoo checkpoint or config may name for its task
    (``vlzoo.tasks.CLIPTask`` and ``vlzoo.tasks.clip.CLIPTask``) -> the class."""
    import vlzoo.tasks as tasks  # the package imports this module: looked up at call time

    table = {}
    for name in TASK_NAMES:
        cls = getattr(tasks, name)
        table[f"vlzoo.tasks.{name}"] = table[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return table


def task_by_name(class_path: object, where: str) -> type:
    """The vlzoo task class ``class_path`` names; anything else is refused, unimported."""
    cls = task_classes().get(class_path) if isinstance(class_path, str) else None
    if cls is None:
        known = ", ".join(f"vlzoo.tasks.{n}" for n in TASK_NAMES)
        raise ValueError(f"{where}: names the task {class_path!r}, which is not a vlzoo task (expected one of "
                         f"{known}); vlzoo never imports a module that a file names")
    return cls


def task_class(checkpoint: dict, path: str | Path) -> type:
    """The LightningModule class recorded in ``checkpoint`` (from the fixed table)."""
    hparams = checkpoint.get("hyper_parameters")
    named = {"vlzoo_task": checkpoint.get("vlzoo_task"),  # LightningCLI would instantiate _class_path: check both
             "hyper_parameters._class_path": hparams.get("_class_path") if isinstance(hparams, dict) else None}
    classes = [task_by_name(name, f"{path}: {where}") for where, name in named.items() if name is not None]
    if not classes:
        raise ValueError(f"{path}: the checkpoint does not say which vlzoo task wrote it")
    return classes[0]


def load_task(path: str | Path, map_location: str | torch.device = "cpu", eval_mode: bool = True):
    """The task (with ``.model``, ``.tokenizer``, ``.preprocess_config``) saved at ``path``,
    loaded strictly."""
    cls = task_class(read_checkpoint(path, map_location, mmap=True), path)  # Lightning reads the tensors below
    task = cls.load_from_checkpoint(path, map_location=map_location, strict=True, weights_only=True)
    refuse_non_finite(task.state_dict(), str(path))
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
