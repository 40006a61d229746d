"""Data sources behind ``--data.train/val/test PATH``: one word picks the reader.

``shapes`` (embedded); ``*.jsonl``; ``*.csv``/``*.tsv`` (open_clip convention); ``*.json``
(Karpathy split or a list of records; ``file.json:SPLIT`` picks a Karpathy split);
webdataset shards (``dir/{00000..00099}.tar``, a glob, one ``.tar`` or a folder of
them); a folder written by ``datasets.Dataset.save_to_disk`` (``dir:SPLIT`` for a
``DatasetDict``); ``hf:NAME[:SPLIT]`` for the Hugging Face hub or a local dataset folder.

Two kinds: a :class:`MapSource` knows its records (captions, QA) up front and reads
images by record; a :class:`StreamSource` (training on shards or a streamed hub
dataset) yields samples in a per-epoch, per-worker order.
"""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vlzoo.data import shapes as shapes_data
from vlzoo.data import webdataset as wds
from vlzoo.data.images import BadSample
from vlzoo.data.records import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    RecordList,
    clean_captions,
    confined_path,
    optional_lists,
    read_csv,
    read_json,
    read_jsonl,
)

HF_SPLIT_NAMES = {"train": "train", "val": "validation", "test": "test"}
SOURCE_FORMS = ("shapes", "FILE.jsonl", "FILE.csv|.tsv", "FILE.json[:SPLIT]", "SHARDS.tar pattern or folder",
                "save_to_disk folder[:SPLIT]", "hf:NAME[:SPLIT]")


class DataSourceError(ValueError):
    """A data source that cannot be opened (names the ``data.<split>`` field)."""


@dataclass
class SourceOptions:
    """How sources are read (the ``data.*`` options besides the paths)."""

    image_column: str | None = None
    caption_column: str | None = None
    image_root: str | None = None
    csv_separator: str | None = None
    streaming: bool = False
    resampled: bool = False
    samples_per_epoch: int | None = None
    shuffle_buffer: int = 1000
    allow_outside_root: bool = False


class MapSource:
    """Records known up front (``records``; ``skipped`` rows already refused); images
    read by :meth:`read_image` from a record's ``image`` reference."""

    random_access = True

    def __init__(self, name: str, rows: RecordList):
        self.name = name
        self.records = rows.records
        self.skipped = rows.skipped

    def __len__(self) -> int:
        return len(self.records)

    def read_image(self, record: dict[str, Any]) -> Any:
        """Path, bytes, PIL image or array for :func:`vlzoo.data.images.decode`."""
        image = record["image"]
        return image.read() if isinstance(image, wds.TarMember) else image


class ShapesSource(MapSource):
    """The embedded shapes split: images are rows of an in-memory uint8 array."""

    def __init__(self, split: shapes_data.ShapesSplit, name: str = "shapes"):
        records = [{**r, "image": i, "location": f"shapes[{i}]", **_shapes_label(r)} for i, r in enumerate(split.records)]
        super().__init__(name, RecordList(records))
        self.split = split

    def read_image(self, record: dict[str, Any]) -> np.ndarray:
        return np.asarray(self.split.images[record["image"]])


def _shapes_label(record: dict[str, Any]) -> dict[str, str]:
    """A shapes scene's class (its zero-shot class, "red circle") when it has one object."""
    label = shapes_data.zeroshot_label(record)
    return {} if label is None else {"label": shapes_data.zeroshot_classes()[label]}


class HFMapSource(MapSource):
    """A ``datasets.Dataset``: captions (and ``qa``) read up front from their columns,
    images read row by row (``Image`` features undecoded, so bad bytes are caught here)."""

    def __init__(self, name: str, dataset, options: SourceOptions, root: Path | None = None):
        import datasets

        self.image_column = _column(dataset.column_names, options.image_column, IMAGE_COLUMNS, "image", name)
        caption_column = _column(dataset.column_names, options.caption_column, CAPTION_COLUMNS, "caption", name)
        if isinstance(dataset.features[self.image_column], datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.root = Path(options.image_root) if options.image_root else root
        self.allow_outside = options.allow_outside_root
        rows = RecordList()
        qa_column = dataset["qa"] if "qa" in dataset.column_names else None
        for i, value in enumerate(dataset[caption_column]):
            location = f"{name}[{i}]"
            try:
                record = {"image": i, "captions": clean_captions(value), "location": location}
            except BadSample as bad:
                rows.skipped.append((location, bad.reason))
                continue
            if qa_column is not None:
                record.update(optional_lists({"qa": qa_column[i]}))
            rows.records.append(record)
        super().__init__(name, rows)

    def read_image(self, record: dict[str, Any]) -> Any:
        return _hf_image_value(self.dataset[record["image"]][self.image_column], self.root, self.allow_outside)


def _hf_image_value(value: Any, root: Path | None, allow_outside: bool = False) -> Any:
    if isinstance(value, dict):  # an undecoded datasets.Image
        if value.get("bytes"):
            return value["bytes"]
        value = value.get("path")
    if isinstance(value, str):
        return Path(value) if root is None else confined_path(value, root, allow_outside)
    if value is None:
        raise BadSample("no image")
    return value  # bytes, PIL image or array


def _column(columns: list[str], chosen: str | None, candidates: tuple[str, ...], what: str, name: str) -> str:
    if chosen is not None:
        if chosen not in columns:
            raise DataSourceError(f"{name}: no column {chosen!r} (data.{what}_column); columns are {columns}")
        return chosen
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise DataSourceError(f"{name}: no {what} column among {columns}; set data.{what}_column")


class StreamSource:
    """Samples in a stream: :meth:`samples` yields ``(location, image, caption value,
    extras)`` or ``(location, BadSample, None, {})``; ``length`` samples make an epoch."""

    random_access = False
    name: str
    length: int
    skipped: list[tuple[str, str]] = []

    def __len__(self) -> int:
        return self.length

    def samples(self, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int) -> Iterator[tuple]:
        raise NotImplementedError


class WebDatasetSource(StreamSource):
    """Training on webdataset shards, split across ranks and workers.

    Not resampled: each epoch the shards are permuted (same order on every rank), and
    global worker ``g`` of ``G`` takes shards ``g, g+G, ...``; with fewer shards than
    workers, every worker reads all shards and keeps samples ``g, g+G, ...``. Resampled:
    each worker draws shards with replacement. Samples pass a shuffle buffer.
    """

    def __init__(self, spec: str, options: SourceOptions):
        self.name = spec
        self.shards = wds.shard_paths(spec)
        self.resampled = options.resampled
        self.shuffle_buffer = options.shuffle_buffer
        if options.samples_per_epoch is None and options.resampled:
            raise DataSourceError(f"{spec}: resampled shards need data.samples_per_epoch")
        self.length = options.samples_per_epoch or sum(count_shard_samples(s) for s in self.shards)

    def samples(self, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int) -> Iterator[tuple]:
        group, groups = rank * workers + worker, world * workers
        rng = np.random.default_rng([seed, epoch, group])
        if self.resampled:
            return _shuffled(self._resampled(rng), self.shuffle_buffer, rng)
        return self._passes(seed, epoch, group, groups, rng)

    def _resampled(self, rng: np.random.Generator) -> Iterator[tuple]:
        while True:
            yield from _shard_samples(self.shards[int(rng.integers(len(self.shards)))])

    def _passes(self, seed: int, epoch: int, group: int, groups: int, rng: np.random.Generator) -> Iterator[tuple]:
        """This worker's part of the shards, pass after pass (each shuffled on its own,
        so one pass is exactly the part); the dataset stops at its quota."""
        for repeat in range(10**9):
            order = np.random.default_rng([seed, epoch, 10**6 + repeat]).permutation(len(self.shards))
            produced = False
            for sample in _shuffled(self._part(order, group, groups), self.shuffle_buffer, rng):
                produced = True
                yield sample
            if not produced:
                return

    def _part(self, order: np.ndarray, group: int, groups: int) -> Iterator[tuple]:
        if len(self.shards) >= groups:
            for shard in order[group::groups]:
                yield from _shard_samples(self.shards[shard])
            return
        k = 0
        for shard in order:
            for sample in _shard_samples(self.shards[shard]):
                if k % groups == group:
                    yield sample
                k += 1


def count_shard_samples(shard: str) -> int:
    """Number of sample keys in a shard (headers only)."""
    keys = set()
    try:
        with tarfile.open(shard, mode="r:") as tar:
            for key, _, _ in wds.file_members(tar):
                keys.add(key)
    except (tarfile.TarError, OSError, EOFError):
        pass  # counted up to the damage; the stream reports the corrupt tail
    return len(keys)


def _shard_samples(shard: str) -> Iterator[tuple]:
    for location, members in wds.iter_samples(shard):
        if isinstance(members, BadSample):
            yield location, members, None, {}
            continue
        try:
            image, caption, extras = wds.split_members(members)
        except BadSample as bad:
            yield location, bad, None, {}
            continue
        yield location, image, caption, extras


def _shuffled(stream: Iterator[tuple], size: int, rng: np.random.Generator) -> Iterator[tuple]:
    """A shuffle buffer of ``size`` samples (``size <= 1``: stream order)."""
    if size <= 1:
        yield from stream
        return
    buffer: list[tuple] = []
    for sample in stream:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        j = int(rng.integers(size))
        buffer[j], sample = sample, buffer[j]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


class HFStreamSource(StreamSource):
    """A streamed hub dataset (training only): ranks split by ``split_dataset_by_node``,
    dataloader workers by ``datasets`` itself; reshuffled each epoch."""

    def __init__(self, name: str, dataset, options: SourceOptions, length: int | None):
        import datasets

        features = dataset.features or {}
        columns = list(features) or list(dataset.column_names or [])
        self.image_column = _column(columns, options.image_column, IMAGE_COLUMNS, "image", name)
        self.caption_column = _column(columns, options.caption_column, CAPTION_COLUMNS, "caption", name)
        if isinstance(features.get(self.image_column), datasets.Image):
            dataset = dataset.cast_column(self.image_column, datasets.Image(decode=False))
        self.dataset = dataset
        self.name = name
        self.root = Path(options.image_root) if options.image_root else None
        self.allow_outside = options.allow_outside_root
        self.shuffle_buffer = options.shuffle_buffer
        length = options.samples_per_epoch or length
        if not length:
            raise DataSourceError(f"{name}: the streamed dataset does not say its size; set data.samples_per_epoch")
        self.length = length

    def samples(self, epoch: int, seed: int, rank: int, world: int, worker: int, workers: int) -> Iterator[tuple]:
        from datasets.distributed import split_dataset_by_node

        dataset = split_dataset_by_node(self.dataset, rank=rank, world_size=world) if world > 1 else self.dataset
        if self.shuffle_buffer > 1:
            dataset = dataset.shuffle(seed=seed, buffer_size=self.shuffle_buffer)
        for repeat in range(10**9):
            dataset.set_epoch(epoch * 1000 + repeat)
            produced = False
            for i, row in enumerate(dataset):
                produced = True
                location = f"{self.name}#rank{rank}.{i}"
                try:
                    image = _hf_image_value(row[self.image_column], self.root, self.allow_outside)
                except BadSample as bad:
                    yield location, bad, None, {}
                    continue
                extras = {"qa": row["qa"]} if isinstance(row.get("qa"), list) else {}
                yield location, image, row[self.caption_column], extras
            if not produced:
                return


# --------------------------------------------------------------------------- opening


def split_suffix(spec: str) -> tuple[str, str | None]:
    """``path:SPLIT`` -> (path, SPLIT) when ``path`` exists; else (spec, None)."""
    head, sep, tail = spec.rpartition(":")
    if sep and tail and "/" not in tail and Path(head).exists():
        return head, tail
    return spec, None


def open_source(spec: str, split: str, options: SourceOptions, shapes: Any = None) -> MapSource | StreamSource:
    """Open the source ``spec`` for ``split`` (train, val or test).

    Training may stream (shards; ``hf:`` with ``options.streaming``); evaluation always
    reads a :class:`MapSource` (shards are indexed), since it needs every caption.
    """
    field = f"data.{split}"
    try:
        return _open(spec, split, options, shapes)
    except FileNotFoundError as err:
        raise DataSourceError(f"{field}: {err}") from err
    except (DataSourceError, ValueError) as err:
        raise DataSourceError(f"{field}: {err}") from err


def _open(spec: str, split: str, options: SourceOptions, shapes: Any) -> MapSource | StreamSource:
    if spec == "shapes":
        size = getattr(shapes, f"{split}_size")
        return ShapesSource(shapes_data.load_split(split, size, shapes.image_size, shapes.seed, shapes.cache))
    if spec.startswith("hf:"):
        return open_hf(spec[3:], split, options)
    if wds.is_shard_spec(spec):
        return WebDatasetSource(spec, options) if split == "train" else indexed_shards(spec)
    path, chosen_split = split_suffix(spec)
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json", ".csv", ".tsv") and not Path(path).is_file():
        raise FileNotFoundError(f"no such file {path}")
    if suffix == ".jsonl":
        return MapSource(path, read_jsonl(path, options.image_root, options.image_column, options.caption_column,
                                          options.allow_outside_root))
    if suffix in (".csv", ".tsv"):
        return MapSource(path, read_csv(path, options.image_column, options.caption_column,
                                        options.csv_separator, options.image_root, options.allow_outside_root))
    if suffix == ".json":
        return MapSource(path, read_json(path, chosen_split or split, options.image_root,
                                         options.image_column, options.caption_column, options.allow_outside_root))
    if Path(path).is_dir() and _is_saved_dataset(Path(path)):
        return open_saved(Path(path), chosen_split or HF_SPLIT_NAMES[split], options)
    if not Path(path).exists():
        raise FileNotFoundError(f"no such file or folder {path!r} (expected one of {', '.join(SOURCE_FORMS)})")
    raise DataSourceError(f"cannot read {spec!r}: expected one of {', '.join(SOURCE_FORMS)}")


def indexed_shards(spec: str) -> MapSource:
    """Shards as a random-access source (for evaluation): one header pass per shard."""
    rows = RecordList()
    for shard in wds.shard_paths(spec):
        samples, skipped = wds.index_shard(shard)
        rows.skipped += skipped
        for location, members in samples:
            try:
                image, caption, extras = wds.split_members(members)
                rows.records.append({**extras, "image": image, "captions": clean_captions(caption),
                                     "location": location})
            except BadSample as bad:
                rows.skipped.append((location, bad.reason))
    return MapSource(spec, rows)


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def open_saved(path: Path, split: str, options: SourceOptions) -> HFMapSource:
    """A ``save_to_disk`` folder (a ``Dataset``, or ``DatasetDict`` and its ``split``)."""
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataSourceError(f"{path}: no split {split!r}; it has {list(loaded)} (write {path}:SPLIT)")
        loaded = loaded[split]
    return HFMapSource(f"{path}:{split}", loaded, options, root=path)


def open_hf(reference: str, split: str, options: SourceOptions) -> MapSource | StreamSource:
    """``NAME[:SPLIT]`` through ``datasets.load_dataset`` (hub name or local folder);
    streamed only for training with ``options.streaming``."""
    import datasets

    name, _, chosen = reference.partition(":")
    hf_split = chosen or HF_SPLIT_NAMES[split]
    streaming = options.streaming and split == "train"
    try:
        dataset = datasets.load_dataset(name, split=hf_split, streaming=streaming)
    except Exception as err:  # noqa: BLE001 (datasets raises many kinds; all mean "cannot load")
        raise DataSourceError(
            f"cannot load Hugging Face dataset {name!r} split {hf_split!r}: {type(err).__name__}: {err}. "
            "Without network (or with HF_HUB_OFFLINE=1) only datasets already in the Hugging Face cache "
            "and local folders load; download it first where the hub is reachable") from err
    root = Path(name) if Path(name).is_dir() else None
    if streaming:
        info = dataset.info.splits.get(hf_split) if dataset.info and dataset.info.splits else None
        return HFStreamSource(f"hf:{name}:{hf_split}", dataset, options, info.num_examples if info else None)
    return HFMapSource(f"hf:{name}:{hf_split}", dataset, options, root=root)
