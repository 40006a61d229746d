"""From a reference (manifest name, checkpoint, directory, ``hf://``) to
:class:`~vlzoo.hub.convert.LoadedParts`: the dispatch behind ``vlzoo.load``."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

from vlzoo.hub.convert import LoadedParts

TASK_FAMILIES = {"CLIPTask": "clip", "ALBEFTask": "albef", "BLIPTask": "blip", "BLIP2Task": "blip2",
                 "BLIP2LLMTask": "blip2_llm", "ClassifyTask": "clip", "BLIPVQATask": "blip_vqa"}
FAMILY_CAPABILITIES = {
    "clip": {"encode"}, "albef": {"encode", "itm"}, "blip": {"encode", "itm", "generate"},
    "blip2": {"encode", "itm", "generate"}, "blip2_llm": {"generate", "vqa"}, "blip_vqa": {"vqa"},
}
EXPORT_CONFIG = "vlzoo_config.yaml"
EXPORT_WEIGHTS = "model.safetensors"


def parts_from_task(task, source: str) -> LoadedParts:
    """The model of a vlzoo task (LightningModule) with its tokenizer and preprocessing."""
    family = TASK_FAMILIES.get(type(task).__name__)
    if family is None:
        raise ValueError(f"{source}: a {type(task).__name__} is not a vision-language zoo model "
                         f"(expected one of {sorted(TASK_FAMILIES)})")
    from vlzoo.finetune import has_lora, merge_lora

    if has_lora(task.model):  # LoRA fine-tuned: adapters folded into plain weights
        merge_lora(task.model)
    extra: dict[str, Any] = {"generation": getattr(task, "generation", None),
                             "vqa_generation": getattr(task, "vqa_generation", None), "task_class": type(task)}
    if getattr(task, "classes", None):
        extra["classes"] = list(task.classes)
    if family == "blip2_llm":
        extra["llm_tokenizer"] = task.llm_tokenizer
    return LoadedParts(family, task.model.eval(), task.config, task.preprocess_config, task.tokenizer,
                       frozenset(FAMILY_CAPABILITIES[family]), source, extra)


def zoo_config_init_args(path: str | Path) -> tuple[type, dict]:
    """(task class, its init arguments as config dataclasses) of a zoo config YAML."""
    import yaml

    from vlzoo.tasks.loading import as_config, task_by_name

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"zoo config {path} does not exist")
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{path}: expected a 'model:' section with 'class_path' and 'init_args'")
    cls = task_by_name(model["class_path"], f"{path}: model.class_path")
    hints = typing.get_type_hints(cls.__init__)
    init_args = {}
    for key, value in (model.get("init_args") or {}).items():
        schema = hints.get(key)
        is_dataclass = isinstance(schema, type) and hasattr(schema, "__dataclass_fields__")
        init_args[key] = as_config(value, schema, f"{path}: model.init_args.{key}") if is_dataclass else value
    return cls, init_args


def task_from_zoo_config(path: str | Path):
    """The task a zoo config YAML (a ``vlzoo fit`` config) describes, randomly initialised."""
    cls, init_args = zoo_config_init_args(path)
    return cls(**init_args)


def parts_from_zoo_config(path: str | Path, family: str | None = None) -> LoadedParts:
    """The randomly initialised model a zoo config describes. ``family`` ``blip_vqa``
    builds BLIP's VQA architecture (question encoder + answer decoder) from the BLIP
    config of a BLIPTask zoo config."""
    if family != "blip_vqa":
        return parts_from_task(task_from_zoo_config(path), str(path))
    from vlzoo.config import BLIPConfig
    from vlzoo.tasks.vqa import build_blip_vqa_model

    config = zoo_config_init_args(path)[1].get("model")
    if not isinstance(config, BLIPConfig):
        raise ValueError(f"{path}: a blip_vqa entry needs a BLIPTask zoo config (model: a BLIPConfig)")
    model, tokenizer, config = build_blip_vqa_model(config)
    model.eval()
    return LoadedParts("blip_vqa", model, config, config.vision, tokenizer,
                       frozenset(FAMILY_CAPABILITIES["blip_vqa"]), str(path))


# ------------------------------------------------------------------ references
_HANDED_OVER: dict[str, LoadedParts] = {}


def hand_over(ref: str, parts: LoadedParts) -> None:
    """Keep ``parts`` loaded for the next :func:`load_parts_once` of ``ref`` in this
    process (``vlzoo finetune`` resolves the model, then its run starts from it)."""
    _HANDED_OVER[str(ref)] = parts


def load_parts_once(ref: str | Path) -> LoadedParts:
    """The parts handed over for ``ref`` (taken, so memory is freed), else :func:`load_parts`."""
    return _HANDED_OVER.pop(str(ref), None) or load_parts(ref)


def load_parts(ref: str | Path) -> LoadedParts:
    """Resolve ``ref``: ``hf://org/repo``, an existing file or directory, or a manifest name."""
    text = str(ref)
    if text.startswith("hf://"):
        from vlzoo.hub.download import fetch_hf_repo

        return load_path(fetch_hf_repo(text.removeprefix("hf://")))
    path = Path(text).expanduser()
    if path.exists():
        return load_path(path)
    from vlzoo.hub.manifest import get_entry

    try:
        entry = get_entry(text)
    except (KeyError, FileNotFoundError) as err:
        raise FileNotFoundError(f"{text!r} is neither a file or directory nor a manifest name: {err.args[0]}") from None
    return load_entry(entry)


def load_path(path: Path) -> LoadedParts:
    """A local checkpoint file or model directory."""
    if path.is_file():
        from vlzoo.tasks.loading import load_task

        return parts_from_task(load_task(path), str(path))
    if (path / EXPORT_CONFIG).is_file():
        from vlzoo.hub.export import load_export

        return load_export(path)
    from vlzoo.hub.convert.hf import MODEL_TYPES, load_hf_dir, read_hf_config

    has_hf_config = (path / "config.json").is_file()
    # open_clip's hub layout may hold a config.json too (timm's, no transformers model_type)
    if (path / "open_clip_config.json").is_file() and (
            not has_hf_config or read_hf_config(path).get("model_type") not in MODEL_TYPES):
        from vlzoo.hub.convert.clip import load_open_clip_dir

        return load_open_clip_dir(path)
    if has_hf_config:
        return load_hf_dir(path)
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():  # a `vlzoo fit` run directory: its best checkpoint, else last
        best = sorted(checkpoints.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        chosen = best[-1] if best else checkpoints / "last.ckpt"
        if chosen.is_file():
            return load_path(chosen)
    raise ValueError(f"{path}: not a model directory vlzoo can read (expected {EXPORT_CONFIG} from `vlzoo export`, "
                     "a Hugging Face config.json, an open_clip_config.json, or a run directory with checkpoints/)")


def load_entry(entry) -> LoadedParts:
    """Fetch (or find in the cache) a manifest entry's weights and convert them."""

    from vlzoo.hub.download import fetch

    local = Path(fetch(entry.name, entry.source, entry.sha256))
    if entry.format == "open_clip":
        parts = _load_open_clip_entry(entry, local)
    elif entry.format in ("hf", "vlzoo"):
        parts = load_path(local)
    else:
        from vlzoo.hub.convert.original import load_original

        parts = load_original(entry, local)
    if parts.family != entry.family:
        raise ValueError(f"manifest entry {entry.name!r} says family {entry.family!r}, "
                         f"but its weights load as {parts.family!r}")
    return dataclasses.replace(parts, source=entry.name)


def _load_open_clip_entry(entry, local: Path) -> LoadedParts:
    """open_clip weights: a hub snapshot directory (``open_clip_config.json`` optional)
    or a single file; the architecture from the snapshot's config or open_clip's own."""
    from vlzoo.hub.convert.clip import OPEN_CLIP_WEIGHT_FILES, load_open_clip_file
    from vlzoo.utils import read_json_file

    preprocess = {k: entry.preprocess[k] for k in ("mean", "std", "interpolation")}
    source, model_cfg = entry.source["open_clip"], None
    if local.is_dir():
        if (local / "open_clip_config.json").is_file():
            model_cfg = read_json_file(local / "open_clip_config.json", "an open_clip config object").get("model_cfg")
        weights = next((local / f for f in OPEN_CLIP_WEIGHT_FILES if (local / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{entry.name}: {local} holds none of {OPEN_CLIP_WEIGHT_FILES}")
        local = weights
    return load_open_clip_file(local, source["name"], preprocess, source["tag"], model_cfg)
