"""One LightningDataModule for every family: image-caption pairs plus eval annotations."""

from __future__ import annotations

import os
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from vlzoo.data import shapes as shapes_data
from vlzoo.data.image_text import (
    CAPTION_MODES,
    BadSampleError,
    BadSamplePolicy,
    ImageTextDataset,
    ImageTextStream,
    TooManyBadSamples,
)
from vlzoo.data.images import DEFAULT_MAX_PIXELS
from vlzoo.data.resumable import ResumableDataLoader, ResumableSampler, private_generator
from vlzoo.data.sources import MapSource, SourceOptions, StreamSource, open_source
from vlzoo.data.tokenizers import Tokenizer
from vlzoo.options import ClosedUnitInterval, NonNegativeInt, PositiveInt, check_options

SPLIT_OF_STAGE = {"fit": "train", "train": "train", "val": "val", "validate": "val", "test": "test", "predict": "test"}


@dataclass
class ShapesConfig:
    """Sizes and seed of the embedded shapes splits."""

    image_size: PositiveInt = 64
    train_size: PositiveInt = 20000
    val_size: PositiveInt = 500
    test_size: PositiveInt = 1000
    seed: NonNegativeInt = 0
    cache: bool = True

    def __post_init__(self) -> None:
        check_options(**{f"data__shapes__{name}": getattr(self, name)
                         for name in ("image_size", "train_size", "val_size", "test_size", "seed")})


@dataclass
class ModelInputs:
    """What the data module needs from the model it feeds: the tokenizer, the image
    preprocessing, and which extra fields a training item carries. ``vlzoo fit`` links
    it from the instantiated model (``link_arguments``: ``data.inputs``)."""

    tokenizer: Tokenizer
    image_size: int
    mean: Sequence[float]
    std: Sequence[float]
    resize_mode: str = "shortest"
    with_qa: bool = False  # one QA pair per training item (uses_qa)
    with_labels: bool = False  # the records with a class label only, with their labels (uses_labels)
    qa_only: bool = False  # the records with QA pairs only (needs_qa)

    @classmethod
    def of(cls, task) -> ModelInputs:
        """The inputs a vlzoo task (``tokenizer``, ``preprocess_config``, ``uses_qa``,
        ``uses_labels``, ``needs_qa``) reads."""
        if not hasattr(task, "tokenizer"):
            raise RuntimeError(f"a {type(task).__name__} has no tokenizer: the data module cannot feed it")
        pre = task.preprocess_config
        return cls(task.tokenizer, pre.image_size, pre.mean, pre.std, getattr(pre, "resize_mode", "shortest"),
                   bool(getattr(task, "uses_qa", False)), bool(getattr(task, "uses_labels", False)),
                   bool(getattr(task, "needs_qa", False)))


@dataclass
class EvalAnnotations:
    """What evaluation needs beyond the images.

    captions: per image, all reference captions; negatives: per image, hard-negative
    captions (each to be scored against ``captions[i][0]``); zeroshot_labels: per
    image a class index or None; zeroshot_classes: class names; qa: per image, its
    question/answer pairs.
    """

    captions: list[list[str]]
    negatives: list[list[str]] = field(default_factory=list)
    zeroshot_labels: list[int | None] = field(default_factory=list)
    zeroshot_classes: list[str] = field(default_factory=list)
    qa: list[list[dict[str, str]]] = field(default_factory=list)  # per image: question, answer, type

    def subset(self, rows: Sequence[int]) -> EvalAnnotations:
        """The annotations of images ``rows`` only (e.g. without images that failed to decode)."""
        rows = list(rows)

        def pick(values: list) -> list:
            return [values[i] for i in rows] if values else []

        return EvalAnnotations(pick(self.captions), pick(self.negatives), pick(self.zeroshot_labels),
                               self.zeroshot_classes, pick(self.qa))


def preprocess_images(images: Tensor, image_size: int, mean: Tensor, std: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, S, S): scaled to [0, 1], resized (bicubic,
    antialiased) when H, W differ from S, normalised with mean/std of shape (1, 3, 1, 1)."""
    x = images.float().div_(255.0)
    if x.shape[-2:] != (image_size, image_size):
        x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", antialias=True,
                          align_corners=False).clamp_(0, 1)
    return (x - mean) / std


class ImageTextCollator:
    """Stacks images, resizes and normalises them, and tokenizes captions.

    Returns ``pixel_values`` (B, 3, S, S) float, ``index`` (B,), ``skipped`` (the
    ``(location, reason)`` of bad samples the items replaced or that were dropped), and
    when captions are present ``input_ids``/``attention_mask`` (B, L) and the strings
    ``captions``; with QA pairs, the strings ``questions`` and ``answers``; with class
    labels, the strings ``labels``.
    """

    def __init__(self, tokenizer: Tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float]):
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = [entry for it in items for entry in it.get("skipped", ())]
        items = [it for it in items if not it.get("bad")]
        if not items:  # every sample of an evaluation batch was bad
            size = self.image_size
            return {"pixel_values": torch.empty(0, 3, size, size), "index": torch.empty(0, dtype=torch.long),
                    "skipped": skipped}
        images = torch.stack([it["image"] for it in items])  # (B, 3, H, W) uint8
        batch: dict[str, Any] = {
            "pixel_values": preprocess_images(images, self.image_size, self.mean, self.std),
            "index": torch.tensor([it["index"] for it in items], dtype=torch.long),
            "skipped": skipped,
        }
        if "caption" in items[0]:
            batch["captions"] = [it["caption"] for it in items]
            batch.update(self.tokenizer(batch["captions"]))
        if all("label" in it for it in items):
            batch["labels"] = [it["label"] for it in items]
        if all("qa" in it for it in items):
            batch["questions"] = [it["qa"]["question"] for it in items]
            batch["answers"] = [it["qa"]["answer"] for it in items]
        return batch


def records_with(source: MapSource | StreamSource, key: str, field_name: str, what: str) -> MapSource:
    """A view of ``source`` with only its records that have a non-empty ``key``; how
    many were left out is printed."""
    import copy

    if not isinstance(source, MapSource):
        raise ValueError(f"{field_name}: training on '{key}' needs a source with records (not a stream)")
    view = copy.copy(source)
    view.records = [r for r in source.records if r.get(key)]
    if not view.records:
        raise ValueError(f"{field_name}: no record of {source.name} has a '{key}' field ({what})")
    if len(view.records) < len(source.records):
        print(f"vlzoo: {field_name}: training on the {len(view.records)} of {len(source.records)} records of "
              f"{source.name} that have '{key}'", flush=True)
    return view


class VLDataModule(L.LightningDataModule):
    """Image-text data for every family, from any source (see :mod:`vlzoo.data.sources`).

    Args:
        train, val, test: data sources per split: ``shapes``, a ``.jsonl``, ``.csv``/
            ``.tsv`` or ``.json`` (Karpathy) file, webdataset shards, a ``save_to_disk``
            folder or ``hf:NAME[:SPLIT]``.
        shapes: sizes and seed of the embedded shapes splits.
        batch_size: training batch per process; eval_batch_size: evaluation batch.
        num_workers: DataLoader worker processes.
        image_column, caption_column: field names (CSV default ``filepath``/``title``;
            others are detected); image_root: base of relative image paths (default:
            the annotation file's folder); csv_separator: default tab for ``.tsv``.
        captions: ``sample`` draws one caption per image per step; ``expand`` makes
            every image-caption pair an item. Evaluation always uses all captions.
        streaming: stream an ``hf:`` training split instead of downloading it.
        resampled, samples_per_epoch, shuffle_buffer: webdataset/streaming training.
        on_bad_sample: ``skip`` (count, log once, go on) or ``raise``.
        max_bad_fraction: stop when more than this fraction of a source is bad.
        max_image_pixels: larger images are bad samples (decompression-bomb guard).
        allow_outside_root: accept relative image paths that leave the annotation file's
            folder (or ``image_root``), such as ``../other/x.png``; by default such a row is
            a bad sample, named in the log.

        inputs: what the model reads (:class:`ModelInputs`); ``vlzoo fit`` links it from the
            model (``link_arguments``), so it is no option of its own.

    Without ``inputs`` the tokenizer and image preprocessing come from the model the
    Trainer fits (its ``tokenizer`` and ``preprocess_config``), or from :meth:`attach`; a model with
    ``uses_qa = True`` also gets one QA pair per training item; one with
    ``uses_labels = True`` trains on the records with a class ``label`` only (shapes:
    the one-object scenes) and gets their labels; one with ``needs_qa = True`` trains on
    the records with QA pairs only.
    """

    random_augmentation = False  # images are only resized and normalised

    def __init__(
        self,
        train: str = "shapes",
        val: str = "shapes",
        test: str = "shapes",
        shapes: ShapesConfig = ShapesConfig(),  # noqa: B008 (jsonargparse needs a default instance)
        batch_size: PositiveInt = 128,
        eval_batch_size: PositiveInt = 256,
        num_workers: NonNegativeInt = 0,
        image_column: str | None = None,
        caption_column: str | None = None,
        image_root: str | None = None,
        csv_separator: str | None = None,
        captions: str = "sample",
        streaming: bool = False,
        resampled: bool = False,
        samples_per_epoch: PositiveInt | None = None,
        shuffle_buffer: PositiveInt = 1000,
        on_bad_sample: str = "skip",
        max_bad_fraction: ClosedUnitInterval = 0.5,
        max_image_pixels: PositiveInt = DEFAULT_MAX_PIXELS,
        allow_outside_root: bool = False,
        inputs: Any = None,
    ):
        super().__init__()
        check_options(data__batch_size=batch_size, data__eval_batch_size=eval_batch_size,
                      data__num_workers=num_workers, data__samples_per_epoch=samples_per_epoch,
                      data__shuffle_buffer=shuffle_buffer, data__max_image_pixels=max_image_pixels)
        if captions not in CAPTION_MODES:
            raise ValueError(f"data.captions must be one of {CAPTION_MODES}, got {captions!r}")
        self.sources = {"train": train, "val": val, "test": test}
        self.shapes = shapes
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.options = SourceOptions(image_column, caption_column, image_root, csv_separator, streaming, resampled,
                                     samples_per_epoch, shuffle_buffer, allow_outside_root)
        self.caption_mode = captions
        self.policy = BadSamplePolicy(on_bad_sample, max_bad_fraction, max_pixels=max_image_pixels)
        self._opened: dict[str, MapSource | StreamSource] = {}
        self._rank_world: tuple[int, int] | None = None
        self.collator: ImageTextCollator | None = None
        self.resize_mode = "shortest"
        self.with_qa = False
        self.with_labels = False
        self.qa_only = False
        self._annotations: dict[str, EvalAnnotations] = {}
        self._answer_prior: dict[str, str] | None = None
        self._resumed_seed: int | None = None
        self._resize_said = False
        self.inputs: ModelInputs | None = inputs

    def attach(self, tokenizer: Tokenizer, image_size: int, mean: Sequence[float], std: Sequence[float],
               resize_mode: str = "shortest") -> None:
        """Set the tokenizer and preprocessing explicitly (when no Trainer/model is attached)."""
        self.collator = ImageTextCollator(tokenizer, image_size, mean, std)
        self.resize_mode = resize_mode

    def _say_if_resized(self) -> None:
        """One line when the shapes images are rendered at another size than the model
        reads (``data.shapes.image_size`` vs ``model...vision.image_size``): they are
        resized, which is allowed but never silent."""
        rendered, read = self.shapes.image_size, self.collator.image_size
        if rendered != read and "shapes" in self.sources.values() and not self._resize_said:
            self._resize_said = True
            print(f"vlzoo: data.shapes.image_size {rendered} differs from the model's image size {read} "
                  f"(model.init_args.model.vision.image_size): shapes images are rendered at {rendered} and "
                  f"resized to {read}", file=sys.stderr, flush=True)

    def set_rank(self, rank: int, world_size: int) -> None:
        """Read as process ``rank`` of ``world_size`` (default: the Trainer's, else 0 of 1)."""
        self._rank_world = (rank, world_size)

    def rank_world(self) -> tuple[int, int]:
        if self._rank_world is not None:
            return self._rank_world
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)

    def source(self, split: str) -> MapSource | StreamSource:
        """The opened source of ``split`` (train, val, test), checked for bad rows."""
        if split not in self._opened:
            source = open_source(self.sources[split], split, self.options, self.shapes)
            self._check_rows(split, source)
            if split == "train" and self.with_labels:
                source = records_with(source, "label", f"data.{split}", "a class name")
            if split == "train" and self.qa_only:
                source = records_with(source, "qa", f"data.{split}", "question/answer pairs")
            self._opened[split] = source
        return self._opened[split]

    def _check_rows(self, split: str, source: MapSource | StreamSource) -> None:
        skipped = source.skipped
        if skipped and self.policy.mode == "raise":
            location, reason = skipped[0]
            raise BadSampleError(f"data.{split}: {location}: {reason} (data.on_bad_sample=raise; {len(skipped)} bad rows)")
        if isinstance(source, MapSource):
            total = len(source) + len(skipped)
            if len(source) == 0:
                raise TooManyBadSamples(f"data.{split}: {source.name} has no usable samples"
                                        + (f" ({len(skipped)} bad, first: {skipped[0][0]}: {skipped[0][1]})"
                                           if skipped else ""))
            if len(skipped) > self.policy.max_bad_fraction * total:
                raise TooManyBadSamples(f"data.{split}: {len(skipped)} of {total} rows of {source.name} are bad "
                                        f"(first: {skipped[0][0]}: {skipped[0][1]}); more than "
                                        f"data.max_bad_fraction={self.policy.max_bad_fraction}")

    def skipped_rows(self, split: str) -> list[tuple[str, str]]:
        """Rows refused while reading the annotations of ``split`` (before any image)."""
        return list(self._opened[split].skipped) if split in self._opened else []

    def prepare_data(self) -> None:
        """Generate and cache the shapes splits this run reads, once, on one process
        (``vlzoo validate`` or ``test`` never waits for the training split)."""
        needed = self.stage_splits(self.trainer.state.fn.value if self.trainer is not None else None)
        for name, spec in self.sources.items():
            if spec == "shapes" and name in needed:
                shapes_data.load_split(name, getattr(self.shapes, f"{name}_size"), self.shapes.image_size,
                                       self.shapes.seed, self.shapes.cache)

    def setup(self, stage: str | None = None) -> None:
        if self.collator is None:
            inputs = self.inputs
            if inputs is None:  # used from Python without inputs: the model the Trainer fits
                module = self.trainer.lightning_module if self.trainer is not None else None
                if module is None:
                    raise RuntimeError("VLDataModule needs its model's inputs (inputs=ModelInputs.of(task)), "
                                       "a Trainer with a model, or attach(...) first")
                inputs = ModelInputs.of(module)
            self.attach(inputs.tokenizer, inputs.image_size, inputs.mean, inputs.std, inputs.resize_mode)
            self.with_qa, self.with_labels, self.qa_only = inputs.with_qa, inputs.with_labels, inputs.qa_only
            self._say_if_resized()
        for split in self.stage_splits(stage):
            self.source(split)  # open early: a bad path fails before the first step

    @staticmethod
    def stage_splits(stage: str | None) -> tuple[str, ...]:
        """The splits a Lightning stage reads (``fit``: train and val; None: all)."""
        splits = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        return splits.get(stage, ("train", "val", "test"))

    def _seed(self) -> int:
        """The data seed: the resumed run's (:meth:`load_state_dict`), else the run's seed."""
        if self._resumed_seed is not None:
            return self._resumed_seed
        return int(os.environ.get("PL_GLOBAL_SEED", self.shapes.seed))

    def state_dict(self) -> dict[str, int]:
        """Saved in every checkpoint: the data seed, so a resumed run draws the same order
        and captions in every later epoch (the loader's own state covers the epoch in
        progress, and Lightning restores it only when a checkpoint is mid-epoch)."""
        return {"seed": self._seed()}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        if "seed" in state_dict:
            self._resumed_seed = int(state_dict["seed"])

    def _loader(self, split: str, train: bool) -> DataLoader:
        source = self.source(split)
        rank, world = self.rank_world()
        size = self.collator.image_size
        common = {"num_workers": self.num_workers, "persistent_workers": self.num_workers > 0,
                  "collate_fn": self.collator}
        if isinstance(source, StreamSource):
            epoch = self.trainer.current_epoch if getattr(self, "trainer", None) is not None else 0
            shards = getattr(getattr(source, "dataset", None), "num_shards", None)  # a streamed hub dataset
            if shards is not None and self.num_workers > shards:
                raise ValueError(f"data.{split}: {source.name} has {shards} shard(s); datasets gives each "
                                 f"dataloader worker whole shards, so use data.num_workers <= {shards}")
            stream = ImageTextStream(source, size, self.resize_mode, self.with_qa, self.policy, self._seed(), rank,
                                     world, self.num_workers, self.batch_size, start_epoch=epoch,
                                     label=f"data.{split}: {source.name}")
            return DataLoader(stream, batch_size=self.batch_size, drop_last=True,
                              generator=private_generator(self._seed()), **common)
        dataset = ImageTextDataset(source, train, size, self.resize_mode, self.with_qa and train, self.with_labels,
                                   self.caption_mode, self.policy, seed=self._seed(),
                                   label=f"data.{split}: {source.name}")
        if train and len(dataset) // world < self.batch_size:
            raise ValueError(f"data.{split}: {len(dataset)} usable samples over {world} process(es) make no whole "
                             f"batch of data.batch_size={self.batch_size}; lower the batch size")
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=self._seed(),
                                   drop_last=train)
        return ResumableDataLoader(dataset, batch_size=self.batch_size if train else self.eval_batch_size,
                                   sampler=sampler, drop_last=train, generator=private_generator(self._seed()),
                                   consumed_batches=self._consumed_batches if train else None, **common)

    def _consumed_batches(self) -> int:
        """Training batches of the current epoch done (for the loader's checkpoint state)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0
        return int(trainer.fit_loop.epoch_loop.batch_progress.current.processed)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def annotations(self, stage: str) -> EvalAnnotations:
        """Captions, hard negatives, zero-shot labels and QA pairs of the split behind
        ``stage``, one entry per image of the source (callers must not modify them)."""
        split = SPLIT_OF_STAGE[stage]
        if split not in self._annotations:
            source = self.source(split)
            if not isinstance(source, MapSource):
                raise ValueError(f"data.{split}: a streamed source cannot be evaluated")
            records = source.records
            classes = self._eval_classes(records) if any("label" in r for r in records) else []
            of_class = {c: i for i, c in enumerate(classes)}
            self._annotations[split] = EvalAnnotations(
                captions=[r["captions"] for r in records],
                negatives=[[n["caption"] if isinstance(n, dict) else n for n in r.get("negatives", [])]
                           for r in records],
                zeroshot_labels=[of_class.get(r.get("label")) for r in records] if classes else [],
                zeroshot_classes=classes,
                qa=[r.get("qa", []) for r in records],
            )
        return self._annotations[split]

    def class_names(self) -> list[str]:
        """The class names of labelled data: shapes' zero-shot classes, else the sorted
        ``label`` values of the training split's records."""
        if self.sources["train"] == "shapes":
            return shapes_data.zeroshot_classes()
        source = self.source("train")
        if not isinstance(source, MapSource):
            raise ValueError("data.train: class names need a training source with records (not a stream)")
        names = sorted({r["label"] for r in source.records if "label" in r})
        if not names:
            raise ValueError(f"data.train: {source.name} has no record with a 'label' field (a class name)")
        return names

    def _eval_classes(self, records: list[dict]) -> list[str]:
        """Zero-shot/classification classes of an evaluation split: the training split's
        classes when it has labels, else the split's own sorted labels."""
        try:
            return self.class_names()
        except ValueError:  # an unlabelled or streamed training split
            return sorted({r["label"] for r in records if "label" in r})

    def answer_prior(self) -> dict[str, str]:
        """Question type -> the most common answer of that type in the training split
        (the VQA baseline; computed on first use; empty for a streamed training split)."""
        if self._answer_prior is None:
            counts: dict[str, Counter] = {}
            source = self.source("train")
            for record in source.records if isinstance(source, MapSource) else []:
                for qa in record.get("qa", []):
                    counts.setdefault(qa.get("type", "all"), Counter())[qa["answer"]] += 1
            self._answer_prior = {t: c.most_common(1)[0][0] for t, c in counts.items()}
        return self._answer_prior
