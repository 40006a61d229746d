"""From a reference (manifest name, checkpoint, directory, ``hf://``) to
:class:`~vlzoo.hub.convert.LoadedParts`: the dispatch behind ``vlzoo.load``."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from vlzoo import families
from vlzoo.config import as_config
from vlzoo.finetune import has_lora, merge_lora
from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.convert.clip import OPEN_CLIP_WEIGHT_FILES, load_open_clip_dir, load_open_clip_file
from vlzoo.hub.convert.original import load_original
from vlzoo.hub.convert.precision import cast_parts, check_load_dtype
from vlzoo.hub.download import fetch, fetch_hf_repo
from vlzoo.hub.export import EXPORT_CONFIG, load_export
from vlzoo.hub.manifest import config_path, get_entry
from vlzoo.models.builders import concrete_config
from vlzoo.utils import read_json_file
from vlzoo.weights import CheckpointKeyError, read_hf_config

if TYPE_CHECKING:
    import torch


def parts_from_task(task, source: str) -> LoadedParts:
    """The model of a vlzoo task (LightningModule) with its tokenizer and preprocessing."""
    family = families.of_task(type(task))
    if family is None:
        trained = sorted(t.__name__ for f in families.all_families().values() for t in f.tasks)
        raise ValueError(f"{source}: a {type(task).__name__} is not a vision-language zoo model "
                         f"(expected one of {trained})")
    if has_lora(task.model):  # LoRA fine-tuned: adapters folded into plain weights
        merge_lora(task.model)
    extra: dict[str, Any] = {"generation": getattr(task, "generation", None),
                             "vqa_generation": getattr(task, "vqa_generation", None), "task_class": type(task)}
    if getattr(task, "classes", None):
        extra["classes"] = list(task.classes)
    if hasattr(task, "llm_tokenizer"):  # BLIP-2 stage 2 decodes with its LLM's tokenizer
        extra["llm_tokenizer"] = task.llm_tokenizer
    return LoadedParts(family.name, task.model.eval(), task.config, task.preprocess_config, task.tokenizer,
                       family.capabilities, source, extra)


def zoo_config_init_args(path: str | Path) -> tuple[type, dict]:
    """(task class, its init arguments as config dataclasses) of a zoo config YAML."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"zoo config {path} does not exist")
    model = (yaml.safe_load(path.read_text()) or {}).get("model")
    if not isinstance(model, dict) or "class_path" not in model:
        raise ValueError(f"{path}: expected a 'model:' section with 'class_path' and 'init_args'")
    cls = families.task_by_name(model["class_path"], f"{path}: model.class_path")
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
    """The randomly initialised model a zoo config describes. ``family``: build that
    family's architecture from the config's model config when it is not the family the
    config's task trains (e.g. ``blip_vqa``: BLIP's VQA architecture, question encoder +
    answer decoder, from the BLIP config of a BLIPTask zoo config)."""
    cls, init_args = zoo_config_init_args(path)
    trained = families.of_task(cls)
    if family is None or (trained is not None and trained.name == family):
        return parts_from_task(cls(**init_args), str(path))
    wanted = families.get(family)
    config = init_args.get("model")
    if not isinstance(config, wanted.config):
        raise ValueError(f"{path}: a {family} model needs a zoo config whose model is a {wanted.config.__name__}")
    model, tokenizer = wanted.build(config)
    return LoadedParts(family, model.eval(), concrete_config(config, model), config.vision, tokenizer,
                       wanted.capabilities, str(path))


# ------------------------------------------------------------------ references
_HANDED_OVER: dict[str, LoadedParts] = {}


def hand_over(ref: str, parts: LoadedParts) -> None:
    """Keep ``parts`` loaded for the next :func:`load_parts_once` of ``ref`` in this
    process (``vlzoo finetune`` resolves the model, then its run starts from it)."""
    _HANDED_OVER[str(ref)] = parts


def load_parts_once(ref: str | Path) -> LoadedParts:
    """The parts handed over for ``ref`` (taken, so memory is freed), else :func:`load_parts`."""
    return _HANDED_OVER.pop(str(ref), None) or load_parts(ref)


def load_parts(ref: str | Path, dtype: torch.dtype | None = None) -> LoadedParts:
    """Resolve ``ref``: ``hf://org/repo``, an existing file or directory, or a manifest name.
    ``dtype`` (float32, bfloat16, float16 or None: as stored): the precision of the model,
    see :mod:`vlzoo.hub.convert.precision` (BLIP-2: the frozen parts only)."""
    check_load_dtype(dtype)
    text = str(ref)
    if text.startswith("hf://"):
        return load_path(fetch_hf_repo(text.removeprefix("hf://")), dtype)
    path = Path(text).expanduser()
    if path.exists():
        return load_path(path, dtype)
    try:
        entry = get_entry(text)
    except (KeyError, FileNotFoundError) as err:
        raise FileNotFoundError(f"{text!r} is neither a file or directory nor a manifest name: {err.args[0]}") from None
    return load_entry(entry, dtype)


def load_path(path: Path, dtype: torch.dtype | None = None) -> LoadedParts:
    """A local checkpoint file or model directory, in ``dtype`` (see :func:`load_parts`)."""
    if path.is_file():
        return cast_parts(parts_from_task(families.load_task(path), str(path)), dtype)
    if (path / EXPORT_CONFIG).is_file():
        return cast_parts(load_export(path), dtype)
    has_hf_config = (path / "config.json").is_file()
    # open_clip's hub layout may hold a config.json too (timm's, no transformers model_type)
    if (path / "open_clip_config.json").is_file() and (
            not has_hf_config or families.of_model_type(read_hf_config(path).get("model_type")) is None):
        return cast_parts(load_open_clip_dir(path), dtype)
    if has_hf_config:
        return load_hf_dir(path, dtype)
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir():  # a `vlzoo fit` run directory: its best checkpoint, else last
        best = sorted(checkpoints.glob("best*.ckpt"), key=lambda p: p.stat().st_mtime)
        chosen = best[-1] if best else checkpoints / "last.ckpt"
        if chosen.is_file():
            return load_path(chosen, dtype)
    raise ValueError(f"{path}: not a model directory vlzoo can read (expected {EXPORT_CONFIG} from `vlzoo export`, "
                     "a Hugging Face config.json, an open_clip_config.json, or a run directory with checkpoints/)")


def load_hf_dir(directory: str | Path, dtype: torch.dtype | None = None) -> LoadedParts:
    """A local transformers directory whose ``model_type`` a registered family converts
    (``clip``, ``blip``, ``blip-2``); a config field or tensor the converter needs and does
    not find is an error naming the directory and the key. ``dtype`` goes to the
    family's converter (``Family.load_hf``): BLIP-2 reads its LLM straight into it."""
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    family = families.of_model_type(hf_config.get("model_type"))
    if family is None:
        known = [f.hf_model_type for f in families.all_families().values() if f.hf_model_type]
        raise ValueError(f"{directory / 'config.json'}: model_type {hf_config.get('model_type')!r} is not "
                         f"supported; expected one of {known}")
    try:
        return family.load_hf(directory, hf_config, dtype=dtype)
    except CheckpointKeyError:
        raise
    except KeyError as err:
        raise ValueError(f"{directory}: the config.json or weights lack {err.args[0]!r}, which a transformers "
                         f"{hf_config.get('model_type')!r} model has") from err


def load_entry(entry, dtype: torch.dtype | None = None) -> LoadedParts:
    """Fetch (or find in the cache) a manifest entry's weights and convert them (in
    ``dtype``, see :func:`load_parts`)."""

    local = Path(fetch(entry.name, entry.source, entry.sha256))
    if entry.format == "open_clip":
        parts = cast_parts(_load_open_clip_entry(entry, local), dtype)
    elif entry.format in ("hf", "vlzoo"):
        parts = load_path(local, dtype)
    else:
        parts = cast_parts(load_original_entry(entry, local), dtype)
    if parts.family != entry.family:
        raise ValueError(f"manifest entry {entry.name!r} says family {entry.family!r}, "
                         f"but its weights load as {parts.family!r}")
    return dataclasses.replace(parts, source=entry.name)


def load_original_entry(entry, local: Path) -> LoadedParts:
    """An original ALBEF/BLIP release: the model built from the entry's zoo config, the
    release's weights converted by the family whose format it is."""
    family = families.of_format(entry.format)
    if family is None:
        formats = [f.original_format for f in families.all_families().values() if f.original_format]
        raise ValueError(f"{entry.name}: format {entry.format!r} is not one of {sorted(formats)}")
    parts = parts_from_task(task_from_zoo_config(config_path(entry)), entry.name)
    if parts.family != family.name:
        raise ValueError(f"{entry.name}: format {entry.format} needs a {family.name} zoo config, "
                         f"{entry.config} builds {parts.family}")
    return load_original(entry, local, parts, family.convert_original)


def _load_open_clip_entry(entry, local: Path) -> LoadedParts:
    """open_clip weights: a hub snapshot directory (``open_clip_config.json`` optional)
    or a single file; the architecture from the snapshot's config or open_clip's own."""
    preprocess = {k: entry.preprocess[k] for k in ("mean", "std", "interpolation", "resize_mode") if k in entry.preprocess}
    source, model_cfg = entry.source["open_clip"], None
    if local.is_dir():
        if (local / "open_clip_config.json").is_file():
            raw = read_json_file(local / "open_clip_config.json", "an open_clip config object")
            model_cfg = raw.get("model_cfg")
            preprocess = {**(raw.get("preprocess_cfg") or {}), **preprocess}  # e.g. its resize_mode, fill_color
        weights = next((local / f for f in OPEN_CLIP_WEIGHT_FILES if (local / f).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"{entry.name}: {local} holds none of {OPEN_CLIP_WEIGHT_FILES}")
        local = weights
    return load_open_clip_file(local, source["name"], preprocess, source["tag"], model_cfg)
