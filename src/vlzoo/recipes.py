"""Task recipes (``zoo_configs/tasks/TASK/FAMILY.yaml``) and the run config of
``vlzoo finetune``: the recipe's trainer, data, optimizer and task, with the model's
own architecture config and ``finetune.init_from`` filled in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from vlzoo import families
from vlzoo.artefacts import zoo_config_roots
from vlzoo.hub.loaders import hand_over, load_parts
from vlzoo.utils import atomic_write_text

TASKS = families.FINETUNE_TASKS


def recipe_path(task: str, family: str) -> Path:
    """The recipe of ``task`` for ``family``; a missing one is an error that lists the
    families the task has recipes for."""
    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    name = families.get(family).recipes.get(task, family)  # e.g. a BLIP VQA model: BLIP's VQA recipe
    for root in zoo_config_roots():
        path = root / "tasks" / task / f"{name}.yaml"
        if path.is_file():
            return path
    have = sorted({p.stem for root in zoo_config_roots() for p in (root / "tasks" / task).glob("*.yaml")})
    raise ValueError(f"a {family} model cannot be fine-tuned for {task}: zoo_configs/tasks/{task}/ has recipes "
                     f"for {', '.join(have) or 'no family'}")


def plain(value: Any) -> Any:
    """Config dataclasses as YAML-safe dicts and lists."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.loads(json.dumps(value, default=str))


def start_config(recipe: Path, model_config: Any, init_from: str, out: str) -> dict[str, Any]:
    """The layer ``vlzoo finetune`` puts over ``recipe`` (``vlzoo fit --config RECIPE
    --config START``): the starting model's architecture as ``model.init_args.model``,
    ``finetune.init_from`` and the run directory."""
    config = yaml.safe_load(recipe.read_text()) or {}
    model = config.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{recipe}: expected a 'model:' section with 'class_path'")
    if "model" in (model.get("init_args") or {}):
        raise ValueError(f"{recipe}: a recipe must not set model.init_args.model (it comes from --model)")
    return {"trainer": {"default_root_dir": out},
            "model": {"init_args": {"model": plain(model_config), "finetune": {"init_from": init_from}}}}


def write_finetune_configs(model_ref: str, task: str, recipe: str | None, out: str | None) -> list[Path]:
    """Resolve ``model_ref`` (manifest name, checkpoint, run or export directory), pick
    the recipe and write the starting model's layer as ``ROOT/start_model.yaml``; returns
    the ``--config`` files of the run, in order (the recipe, then that layer)."""
    parts = load_parts(model_ref)
    recipe_file = Path(recipe) if recipe else recipe_path(task, parts.family)
    if not recipe_file.is_file():
        raise FileNotFoundError(f"--recipe {recipe_file} does not exist")
    local = Path(model_ref).expanduser()
    init_from = str(local.resolve()) if local.exists() else model_ref
    recipe_root = (yaml.safe_load(recipe_file.read_text()) or {}).get("trainer", {}).get("default_root_dir")
    root = Path(out or recipe_root or f"runs/finetune-{task}-{parts.family}")
    layer = start_config(recipe_file, parts.config, init_from, str(root))
    hand_over(init_from, parts)  # the run in this process starts from these weights without reading them again
    root.mkdir(parents=True, exist_ok=True)
    path = root / "start_model.yaml"
    header = f"# vlzoo finetune --model {model_ref} --task {task}: layered over {recipe_file}\n"
    atomic_write_text(path, header + yaml.safe_dump(layer, sort_keys=False))
    print(f"vlzoo: {parts.family} {model_ref} -> {task} with recipe {recipe_file}; wrote {path}", flush=True)
    return [recipe_file, path]
