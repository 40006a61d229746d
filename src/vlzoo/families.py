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
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vlzoo.config import CAPABILITIES

if TYPE_CHECKING:
    import torch
    from torch import nn

ENTRY_POINT_GROUP = "vlzoo.families"
FINETUNE_TASKS = ("retrieval", "caption", "vqa", "classify")  # zoo_configs/tasks/TASK/ (vlzoo finetune --task)

# The fields of a Family that may be given as "package.module:attribute" and are imported
# on first use: the registry itself imports neither torch nor Lightning, so ``vlzoo list``
# and ``--help`` start at once. The paths are this code's constants, never a file's.
LAZY_FIELDS = ("config", "build", "task", "other_tasks", "rebuild", "caption", "answer", "load_hf", "to_hf",
               "convert_original", "protocol", "rank_answers")


def resolve_ref(value: Any) -> Any:
    """``"package.module:attribute"`` -> the attribute (imported); a tuple of them -> a
    tuple; anything else unchanged."""
    if isinstance(value, tuple):
        return tuple(resolve_ref(v) for v in value)
    if not isinstance(value, str):
        return value
    module, _, attribute = value.partition(":")
    if not attribute:
        raise ValueError(f"family reference {value!r}: expected 'package.module:attribute'")
    target: Any = importlib.import_module(module)
    for part in attribute.split("."):
        target = getattr(target, part)
    return target


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
      and the converter ``(directory, config.json dict, dtype=None) -> LoadedParts``
      (``dtype``: torch.float32/bfloat16/float16 or None, see :mod:`vlzoo.hub.convert.precision`;
      a converter may load and then :func:`~vlzoo.hub.convert.precision.cast_parts`).
    - ``to_hf``: ``(parts, head) -> PreTrainedModel``, the ``vlzoo export --to hf`` exporter.
    - ``original_format`` / ``convert_original``: the manifest format of the original
      release and its key converter (see :mod:`vlzoo.hub.convert.original`).
    - ``protocol``: its paper's :class:`~vlzoo.eval.protocol.EvalProtocol` (rerank, decoding),
      what ``vlzoo eval`` applies (None: vlzoo's defaults).
    - ``rank_answers``: ``(parts, pixel_values, questions, (answer ids, mask), k) -> list[int]``,
      VQA by ranking a tokenised answer list (None: cannot).
    - ``recipes``: task -> the name of the recipe under ``zoo_configs/tasks/TASK/`` it
      fine-tunes with, where that is not its own name (BLIP VQA: BLIP's VQA recipe).
    """

    name: str
    config: type | str
    build: Callable[[Any], tuple[nn.Module, Any]] | str
    task: type | str
    capabilities: frozenset[str]
    other_tasks: tuple[type | str, ...] = ()
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
    protocol: Any = None
    rank_answers: Callable | None = None

    def __post_init__(self) -> None:
        unknown = set(self.capabilities) - set(CAPABILITIES)
        if unknown:
            raise ValueError(f"family {self.name}: unknown capabilities {sorted(unknown)}; known: {CAPABILITIES}")
        if not any(isinstance(object.__getattribute__(self, f), str) for f in ("task", "other_tasks")):
            self._check_tasks()  # given as classes: checked now; as references: when first imported

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        return resolve_ref(value) if name in LAZY_FIELDS else value

    def _check_tasks(self) -> None:
        for task in (self.task, *self.other_tasks):
            if getattr(task, "family", None) != self.name:
                raise ValueError(f"family {self.name}: {task.__name__}.family is {getattr(task, 'family', None)!r}")

    @property
    def tasks(self) -> tuple[type, ...]:
        """The task classes (imported), each checked to train this family."""
        self._check_tasks()
        return (self.task, *self.other_tasks)


# Tasks that train no zoo family (the causal LM behind the shapes BLIP-2): their
# checkpoints load as tasks, never as zoo models.
OTHER_TASKS: tuple[str, ...] = ("vlzoo.tasks:CausalLMTask",)

_FAMILIES: dict[str, Family] = {}
_ALLOWED_CONFIGS: set[type] = set()
_PLUGINS_LOADED = False


def register(family: Family) -> Family:
    """Add ``family`` (its config class may then appear in checkpoints read with
    ``weights_only=True``); a second family of the same name is an error."""
    if family.name in _FAMILIES and _FAMILIES[family.name] is not family:
        raise ValueError(f"a family named {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def allow_configs_in_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` build every registered family's config class
    (a plugin's among them); called before a task checkpoint is read."""
    configs = {family.config for family in all_families().values()} - _ALLOWED_CONFIGS
    if configs:  # once per class: task_classes() runs for every checkpoint a process reads
        import torch

        torch.serialization.add_safe_globals(list(configs))
        _ALLOWED_CONFIGS.update(configs)


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
    allow_configs_in_checkpoints()
    classes = [t for family in all_families().values() for t in family.tasks] + list(resolve_ref(OTHER_TASKS))
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
    from vlzoo.checkpoints import read_checkpoint
    from vlzoo.weights import refuse_non_finite

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
ENCODE, ITM, GENERATE, VQA = CAPABILITIES
_B, _N, _G = "vlzoo.models.builders:", "vlzoo.hub.convert.native:", "vlzoo.hub.generation:"
_P = "vlzoo.eval.protocol:"

register(Family(
    "clip", "vlzoo.config:CLIPConfig", _B + "build_clip", "vlzoo.tasks:CLIPTask", frozenset({ENCODE}),
    other_tasks=("vlzoo.tasks:ClassifyTask",), rebuild=_N + "rebuild_clip", hf_model_type="clip",
    load_hf="vlzoo.hub.convert.clip:load_hf_clip", protocol=_P + "CLIP",
))
register(Family(
    "albef", "vlzoo.config:ALBEFConfig", _B + "build_albef", "vlzoo.tasks:ALBEFTask", frozenset({ENCODE, ITM}),
    original_format="albef_original", convert_original="vlzoo.hub.convert.original:convert_albef_original_state",
    protocol=_P + "ALBEF",
))
register(Family(
    "blip", "vlzoo.config:BLIPConfig", _B + "build_blip", "vlzoo.tasks:BLIPTask", frozenset({ENCODE, ITM, GENERATE}),
    rebuild=_N + "rebuild_blip", caption=_G + "caption_blip", hf_model_type="blip",
    load_hf="vlzoo.hub.convert.hf_blip:load_hf_blip", to_hf="vlzoo.hub.convert.hf_blip:to_hf_blip",
    original_format="blip_original", convert_original="vlzoo.hub.convert.original:convert_blip_original_state",
    protocol=_P + "BLIP",
))
register(Family(
    "blip_vqa", "vlzoo.config:BLIPConfig", _B + "build_blip_vqa_family", "vlzoo.tasks:BLIPVQATask", frozenset({VQA}),
    rebuild=_N + "rebuild_blip_vqa", answer=_G + "answer_blip_vqa", to_hf="vlzoo.hub.convert.hf_blip:to_hf_blip",
    recipes={"vqa": "blip"}, protocol=_P + "BLIP_VQA", rank_answers=_G + "rank_answers_blip_vqa",
))
register(Family(
    "blip2", "vlzoo.config:BLIP2Config", _B + "build_blip2", "vlzoo.tasks:BLIP2Task",
    frozenset({ENCODE, ITM, GENERATE}), text_field="qformer", rebuild=_N + "rebuild_blip2",
    caption=_G + "caption_blip2", hf_model_type="blip-2", load_hf="vlzoo.hub.convert.hf_blip2:load_hf_blip2",
    to_hf="vlzoo.hub.convert.hf_blip2:to_hf_blip2", protocol=_P + "BLIP2",
))
register(Family(
    "blip2_llm", "vlzoo.config:BLIP2LLMConfig", _B + "build_blip2_llm", "vlzoo.tasks:BLIP2LLMTask",
    frozenset({GENERATE, VQA}), text_field="qformer", rebuild=_N + "rebuild_blip2_llm",
    caption=_G + "caption_blip2_llm", answer=_G + "answer_blip2_llm", to_hf="vlzoo.hub.convert.hf_blip2:to_hf_blip2",
    protocol=_P + "BLIP2_LLM",
))
