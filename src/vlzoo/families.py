"""The family registry: one entry per model family answers "which family is this" and
holds everything that goes with it.

A :class:`Family` names its model config dataclass, its pure builder, the
LightningModule that trains it, what a loaded model can do, its converters and
exporters and the fine-tuning recipes it uses. Every place that used to branch on a
family name asks :func:`get` (or :func:`of_task`) instead. A new family is one module
(config, model, builder, task) plus one :func:`register` call; families from other
packages register through the ``vlzoo.families`` entry-point group (an installed
package's ``FAMILY`` object, see ``docs/architecture.md``), never through a name a file
gives.

Loading a task checkpoint also lives here: the task class a checkpoint names is looked
up among the registered tasks (:func:`task_by_name`), so nothing a file names is ever
imported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vlzoo import config as C
from vlzoo.checkpoints import read_checkpoint
from vlzoo.hub import generation
from vlzoo.hub.convert import CAPABILITIES
from vlzoo.hub.convert.clip import load_hf_clip
from vlzoo.hub.convert.hf_blip import load_hf_blip, to_hf_blip
from vlzoo.hub.convert.hf_blip2 import load_hf_blip2, to_hf_blip2
from vlzoo.hub.convert.native import (
    rebuild_blip,
    rebuild_blip2,
    rebuild_blip2_llm,
    rebuild_blip_vqa,
    rebuild_clip,
)
from vlzoo.hub.convert.original import convert_albef_original_state, convert_blip_original_state
from vlzoo.models import builders
from vlzoo.tasks import (
    ALBEFTask,
    BLIP2LLMTask,
    BLIP2Task,
    BLIPTask,
    BLIPVQATask,
    CausalLMTask,
    ClassifyTask,
    CLIPTask,
)
from vlzoo.weights import refuse_non_finite

ENTRY_POINT_GROUP = "vlzoo.families"


@dataclass(frozen=True)
class Family:
    """Everything vlzoo knows about one model family.

    - ``name``: the family's name (``LoadedParts.family``, the manifest's ``family``,
      an export's ``family``); ``task.family`` must be the same.
    - ``config``: the model config dataclass (``model.init_args.model`` of a zoo config).
    - ``build``: config (references resolved) -> ``(nn.Module, tokenizer or None)``,
      randomly initialised: the pure builder.
    - ``task``: the LightningModule that trains it; ``other_tasks`` further ones whose
      model is this family (e.g. classification fine-tuning of a CLIP).
    - ``capabilities``: a subset of :data:`vlzoo.hub.convert.CAPABILITIES` a model of
      this family loaded from its own checkpoint has.
    - ``text_field``: the config field that holds the tokenizer and text tower.
    - ``rebuild``: ``(config, SavedExport) -> (model, tokenizer, extra)`` reading a
      ``vlzoo export`` directory back (default: ``build``).
    - ``caption`` / ``answer``: ``(parts, pixel_values, prompt or questions, GenerationConfig)
      -> list[str]`` behind ``ZooModel.generate`` / ``.vqa`` (None: cannot).
    - ``hf_model_type`` / ``load_hf``: the transformers ``model_type`` it converts from
      and the converter ``(directory, config.json dict) -> LoadedParts``.
    - ``to_hf``: ``(parts, head) -> PreTrainedModel``, the ``vlzoo export --to hf`` exporter.
    - ``original_format`` / ``convert_original``: the manifest format of the original
      release and its key converter (see :mod:`vlzoo.hub.convert.original`).
    - ``recipes``: task -> the name of the recipe under ``zoo_configs/tasks/TASK/`` it
      fine-tunes with, where that is not its own name (BLIP VQA: BLIP's VQA recipe).
    """

    name: str
    config: type
    build: Callable[[Any], tuple[nn.Module, Any]]
    task: type
    capabilities: frozenset[str]
    other_tasks: tuple[type, ...] = ()
    text_field: str = "text"
    rebuild: Callable | None = None
    caption: Callable | None = None
    answer: Callable | None = None
    hf_model_type: str | None = None
    load_hf: Callable | None = None
    to_hf: Callable | None = None
    original_format: str | None = None
    convert_original: Callable | None = None
    recipes: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"family {self.name}: unknown capabilities {sorted(unknown)}; known: {CAPABILITIES}")
        for task in self.tasks:
            if getattr(task, "family", None) != self.name:
                raise ValueError(f"family {self.name}: {task.__name__}.family is {getattr(task, 'family', None)!r}")

    @property
    def tasks(self) -> tuple[type, ...]:
        return (self.task, *self.other_tasks)


# Tasks that train no zoo family (the causal LM behind the shapes BLIP-2): their
# checkpoints load as tasks, never as zoo models.
OTHER_TASKS: tuple[type, ...] = (CausalLMTask,)

_FAMILIES: dict[str, Family] = {}
_PLUGINS_LOADED = False


def register(family: Family) -> Family:
    """Add ``family`` (its config class may then appear in checkpoints read with
    ``weights_only=True``); a second family of the same name is an error."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    torch.serialization.add_safe_globals([family.config])
    return family


def unregister(name: str) -> None:
    """Remove a family (tests that register a toy family clean up with it)."""
    _FAMILIES.pop(name, None)


def load_plugins() -> None:
    """Register the families that installed packages declare in the ``vlzoo.families``
    entry-point group (once per process)."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    for point in entry_points(group=ENTRY_POINT_GROUP):
        family = point.load()
        if not isinstance(family, Family):
            raise TypeError(f"entry point {point.name} = {point.value} ({ENTRY_POINT_GROUP}): expected a "
                            f"vlzoo.families.Family, got {type(family).__name__}")
        if _FAMILIES.get(family.name) is not family:
            register(family)
    _PLUGINS_LOADED = True  # after every plugin registered: a failing one fails every call, never silently


def all_families() -> dict[str, Family]:
    """Every registered family by name (vlzoo's own and the plugins')."""
    load_plugins()
    return dict(_FAMILIES)


def names() -> tuple[str, ...]:
    return tuple(all_families())


def get(name: str) -> Family:
    """The family called ``name``; an unknown one is an error listing the known ones."""
    families = all_families()
    if name not in families:
        raise ValueError(f"unknown model family {name!r}; known: {', '.join(families)}")
    return families[name]


def of_task(task_class: type) -> Family | None:
    """The family a task class trains (its ``family`` attribute), None for a task that
    trains no zoo family."""
    name = getattr(task_class, "family", None)
    family = all_families().get(name) if name else None
    return family if family is not None and task_class in family.tasks else None


def of_model_type(model_type: object) -> Family | None:
    """The family that converts a transformers directory of ``model_type``."""
    return next((f for f in all_families().values() if f.hf_model_type and f.hf_model_type == model_type), None)


def of_format(fmt: str) -> Family | None:
    """The family whose original release has manifest format ``fmt``."""
    return next((f for f in all_families().values() if f.original_format == fmt), None)


# ------------------------------------------------------------------ task checkpoints
def task_classes() -> dict[str, type]:
    """Every class path a vlzoo checkpoint or config may name for its task
    (``vlzoo.tasks.CLIPTask`` and ``vlzoo.tasks.clip.CLIPTask``) -> the class."""
    classes = [t for family in all_families().values() for t in family.tasks] + list(OTHER_TASKS)
    table = {}
    for cls in classes:
        table[f"{cls.__module__}.{cls.__qualname__}"] = cls
        if cls.__module__.startswith("vlzoo.tasks."):
            table[f"vlzoo.tasks.{cls.__qualname__}"] = cls
    return table


def task_by_name(class_path: object, where: str) -> type:
    """The registered task class ``class_path`` names; anything else is refused, unimported."""
    cls = task_classes().get(class_path) if isinstance(class_path, str) else None
    if cls is None:
        known = ", ".join(sorted({f"{c.__module__}.{c.__qualname__}" for c in task_classes().values()}))
        raise ValueError(f"{where}: names the task {class_path!r}, which is not a vlzoo task (expected one of "
                         f"{known}); vlzoo never imports a module that a file names")
    return cls


def task_class(checkpoint: dict, path: str | Path) -> type:
    """The LightningModule class recorded in ``checkpoint`` (from the registered tasks)."""
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


@dataclass
class SavedExport:
    """What a ``vlzoo export`` directory holds beside the weights: the directory, whether a
    tokenizer was saved, the special token ids the model was built with, the classes of a
    classification head."""

    directory: Path
    has_tokenizer: bool = False
    token_ids: dict[str, Any] = field(default_factory=dict)
    classes: list[str] | None = None


def rebuild(family: Family, config: Any, saved: SavedExport) -> tuple[nn.Module, Any, dict[str, Any]]:
    """A randomly initialised model of ``family`` for an export's ``config``."""
    if family.rebuild is not None:
        return family.rebuild(config, saved)
    model, tokenizer = family.build(config)
    return model, tokenizer, {}


def with_saved_tokenizer(family: Family, config: Any, tokenizer_dir: Path) -> Any:
    """``config`` with its tokenizer replaced by the one saved in an export."""
    text = dataclasses.replace(getattr(config, family.text_field), tokenizer=str(tokenizer_dir), pretrained=None)
    return dataclasses.replace(config, **{family.text_field: text})


# ------------------------------------------------------------------ vlzoo's families
def _build_blip_vqa(config: C.BLIPConfig):
    model, tokenizer, _ = builders.build_blip_vqa_model(config)
    return model, tokenizer


def _build_blip2_llm(config: C.BLIP2LLMConfig):
    raise ValueError("a BLIP-2 stage-2 model is built by its task (it loads its frozen LLM); "
                     "use vlzoo.tasks.BLIP2LLMTask or load an export")


ENCODE, ITM, GENERATE, VQA = "encode", "itm", "generate", "vqa"

register(Family(
    "clip", C.CLIPConfig, builders.build_clip, CLIPTask, frozenset({ENCODE}), other_tasks=(ClassifyTask,),
    rebuild=rebuild_clip, hf_model_type="clip", load_hf=load_hf_clip,
))
register(Family(
    "albef", C.ALBEFConfig, builders.build_albef, ALBEFTask, frozenset({ENCODE, ITM}),
    original_format="albef_original", convert_original=convert_albef_original_state,
))
register(Family(
    "blip", C.BLIPConfig, builders.build_blip, BLIPTask, frozenset({ENCODE, ITM, GENERATE}),
    rebuild=rebuild_blip, caption=generation.caption_blip, hf_model_type="blip", load_hf=load_hf_blip,
    to_hf=to_hf_blip, original_format="blip_original", convert_original=convert_blip_original_state,
))
register(Family(
    "blip_vqa", C.BLIPConfig, _build_blip_vqa, BLIPVQATask, frozenset({VQA}), rebuild=rebuild_blip_vqa,
    answer=generation.answer_blip_vqa, to_hf=to_hf_blip, recipes={"vqa": "blip"},
))
register(Family(
    "blip2", C.BLIP2Config, builders.build_blip2, BLIP2Task, frozenset({ENCODE, ITM, GENERATE}),
    text_field="qformer", rebuild=rebuild_blip2, caption=generation.caption_blip2, hf_model_type="blip-2",
    load_hf=load_hf_blip2, to_hf=to_hf_blip2,
))
register(Family(
    "blip2_llm", C.BLIP2LLMConfig, _build_blip2_llm, BLIP2LLMTask, frozenset({GENERATE, VQA}),
    text_field="qformer", rebuild=rebuild_blip2_llm, caption=generation.caption_blip2_llm,
    answer=generation.answer_blip2_llm, to_hf=to_hf_blip2,
))
