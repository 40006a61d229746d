"""Task recipes (``zoo_configs/tasks/TASK/FAMILY.yaml``) and the run config of
``vlzoo finetune``: the recipe's trainer, data, optimizer and task, with the model's
own architecture config and ``finetune.init_from`` filled in."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

TASKS = ("retrieval", "caption", "vqa", "classify")
RECIPE_FAMILY = {("vqa", "blip_vqa"): "blip"}  # a BLIP VQA checkpoint fine-tunes with BLIP's VQA recipe


def recipe_path(task: str, family: str) -> Path:
    """The recipe of ``task`` for ``family``; a missing one is an error that lists the
    families the task has recipes for."""
    from vlzoo.hub.artefacts import zoo_config_roots

    if task not in TASKS:
        raise ValueError(f"--task must be one of {TASKS}, got {task!r}")
    name = RECIPE_FAMILY.get((task, family), family)
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


def finetune_config(recipe: Path, model_config: Any, init_from: str, out: str | None) -> dict[str, Any]:
    """The LightningCLI config of a fine-tuning run: ``recipe`` with ``model.init_args``
    ``model`` (the starting model's architecture) and ``finetune.init_from`` set."""
    config = yaml.safe_load(recipe.read_text()) or {}
    model = config.get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{recipe}: expected a 'model:' section with 'class_path'")
    init_args = model.setdefault("init_args", {}) or {}
    model["init_args"] = init_args
    if "model" in init_args:
        raise ValueError(f"{recipe}: a recipe must not set model.init_args.model (it comes from --model)")
    init_args["model"] = plain(model_config)
    finetune = init_args.setdefault("finetune", {}) or {}
    init_args["finetune"] = {**finetune, "init_from": init_from}
    if out is not None:
        config.setdefault("trainer", {})["default_root_dir"] = out
    return config


def write_finetune_config(model_ref: str, task: str, recipe: str | None, out: str | None) -> Path:
    """Resolve ``model_ref`` (manifest name, checkpoint, run or export directory), pick
    the recipe and write ``ROOT/finetune_config.yaml``; returns its path."""
    from vlzoo.hub.loaders import hand_over, load_parts
    from vlzoo.utils import atomic_write_text

    parts = load_parts(model_ref)
    recipe_file = Path(recipe) if recipe else recipe_path(task, parts.family)
    if not recipe_file.is_file():
        raise FileNotFoundError(f"--recipe {recipe_file} does not exist")
    local = Path(model_ref).expanduser()
    init_from = str(local.resolve()) if local.exists() else model_ref
    config = finetune_config(recipe_file, parts.config, init_from, out)
    hand_over(init_from, parts)  # the run in this process starts from these weights without reading them again
    root = Path(config.get("trainer", {}).get("default_root_dir") or f"runs/finetune-{task}-{parts.family}")
    config.setdefault("trainer", {})["default_root_dir"] = str(root)
    root.mkdir(parents=True, exist_ok=True)
    path = root / "finetune_config.yaml"
    header = f"# vlzoo finetune --model {model_ref} --task {task} (recipe {recipe_file})\n"
    atomic_write_text(path, header + yaml.safe_dump(config, sort_keys=False))
    print(f"vlzoo: {parts.family} {model_ref} -> {task} with recipe {recipe_file}; wrote {path}", flush=True)
    return path
