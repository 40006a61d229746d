"""Torch datasets over sources: decoded image + caption items, bad samples skipped.

An item is ``{"image": (3, H, W) uint8, "index": int, "caption": str, "qa": dict,
"skipped": [(location, reason), ...]}`` (``caption``/``qa`` when training). Under the
``skip`` policy a bad training sample is replaced by the next good one, so batches keep
their size, and travels in ``skipped`` of the item that replaced it (the batch carries
it to :class:`~vlzoo.callbacks.SkippedSamples`, which counts and logs it). A bad
evaluation sample becomes ``{"bad": True, ...}``, which the collator drops.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from vlzoo.data.images import DEFAULT_MAX_PIXELS, BadSample, decode
from vlzoo.data.records import clean_captions
from vlzoo.data.resumable import draw
from vlzoo.data.sources import MapSource, ShapesSource, StreamSource

BAD_SAMPLE_POLICIES = ("skip", "raise")
CAPTION_MODES = ("sample", "expand")


class BadSampleError(RuntimeError):
    """A bad sample under ``data.on_bad_sample=raise``; the message names its location."""


class TooManyBadSamples(RuntimeError):
    """Most samples of a source are bad: the run stops instead of training on nothing."""


@dataclass
class BadSamplePolicy:
    """``mode`` skip or raise; a source whose bad fraction exceeds ``max_bad_fraction``
    (after ``min_samples`` samples) stops the run; ``max_pixels`` guards decoding."""

    mode: str = "skip"
    max_bad_fraction: float = 0.5
    min_samples: int = 50
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.mode not in BAD_SAMPLE_POLICIES:
            raise ValueError(f"data.on_bad_sample must be one of {BAD_SAMPLE_POLICIES}, got {self.mode!r}")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1], got {self.max_bad_fraction}")


class BadSampleTally:
    """Good and bad samples seen by one reader (one dataloader worker)."""

    def __init__(self, policy: BadSamplePolicy, source: str):
        self.policy, self.source = policy, source
        self.good = self.bad = 0

    def record_good(self) -> None:
        self.good += 1

    def record_bad(self, location: str, reason: str) -> None:
        """Count a bad sample; raises under ``raise``, or when most samples are bad."""
        if self.policy.mode == "raise":
            raise BadSampleError(f"{location}: {reason} (data.on_bad_sample=raise; 'skip' skips and counts it)")
        self.bad += 1
        seen = self.good + self.bad
        if seen >= self.policy.min_samples and self.bad > self.policy.max_bad_fraction * seen:
            raise TooManyBadSamples(
                f"{self.source}: {self.bad} of {seen} samples read so far are bad (last: {location}: {reason}); "
                f"more than data.max_bad_fraction={self.policy.max_bad_fraction}. Check the source "
                "(paths relative to the annotation file? data.image_root? column names?)")


def stable_index(location: str) -> int:
    """A non-negative int64 id for a streamed sample, the same in every epoch and process."""
    return int.from_bytes(hashlib.blake2b(location.encode(), digest_size=8).digest(), "big") >> 1


class ImageTextDataset(Dataset):
    """Items from a :class:`MapSource`.

    Args:
        source: records and image reader.
        train: draw one caption (and QA pair) per item; bad samples replaced.
        image_size, resize_mode: per-sample resize of decoded images (sources of
            uniform arrays, like shapes, are resized batch-wise by the collator).
        captions: ``sample`` (one image an item, a random caption each time) or
            ``expand`` (one item per image-caption pair); training only.
    """

    def __init__(self, source: MapSource, train: bool, image_size: int, resize_mode: str = "shortest",
                 with_qa: bool = False, with_labels: bool = False, captions: str = "sample",
                 policy: BadSamplePolicy | None = None, seed: int = 0, label: str | None = None):
        if captions not in CAPTION_MODES:
            raise ValueError(f"data.captions must be one of {CAPTION_MODES}, got {captions!r}")
        self.source, self.train, self.with_qa, self.seed = source, train, with_qa, seed
        self.with_labels = with_labels
        self.image_size = None if isinstance(source, ShapesSource) else image_size
        self.resize_mode = resize_mode
        self.policy = policy or BadSamplePolicy()
        self.tally = BadSampleTally(self.policy, label or source.name)
        self.pairs = None
        if train and captions == "expand":
            self.pairs = [(i, c) for i, r in enumerate(source.records) for c in r["captions"]]

    def __len__(self) -> int:
        return len(self.pairs) if self.pairs is not None else len(self.source)

    def _image(self, record: dict[str, Any]) -> torch.Tensor:
        try:
            image = decode(self.source.read_image(record), self.image_size, self.resize_mode, self.policy.max_pixels)
        except BadSample as bad:
            self.tally.record_bad(record["location"], bad.reason)
            raise
        self.tally.record_good()
        return image

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        """``key``: an index, or ``(epoch, index)`` from a :class:`ResumableSampler`;
        the caption and QA pair drawn depend only on the seed, epoch and index."""
        epoch, i = key if isinstance(key, tuple) else (0, key)
        if not self.train:
            record = self.source.records[i]
            try:
                return {"image": self._image(record), "index": i, "skipped": []}
            except BadSample as bad:
                return {"bad": True, "index": i, "skipped": [(record["location"], bad.reason)]}
        skipped = []
        for attempt in range(len(self)):
            position = (i + attempt) % len(self)
            image_index, caption = self.pairs[position] if self.pairs is not None else (position, None)
            record = self.source.records[image_index]
            try:
                image = self._image(record)
                break
            except BadSample as bad:
                skipped.append((record["location"], bad.reason))
        else:
            location, reason = skipped[0]
            raise TooManyBadSamples(f"{self.tally.source}: no sample could be read (first: {location}: {reason}); "
                                    "are image paths relative to the annotation file, or is data.image_root needed?")
        item = {"image": image, "index": image_index, "skipped": skipped}
        captions = record["captions"]
        item["caption"] = caption if caption is not None else captions[draw(self.seed, epoch, i, len(captions))]
        if self.with_labels and "label" in record:
            item["label"] = record["label"]
        if self.with_qa and record.get("qa"):
            item["qa"] = record["qa"][draw(self.seed, epoch, i, len(record["qa"]), salt=1)]
        return item


class ImageTextStream(IterableDataset):
    """Training items from a :class:`StreamSource`, the same number per worker.

    An epoch is ``len(source)`` samples split evenly over ``world`` ranks and
    ``workers`` dataloader workers (each worker's share rounded down to whole batches),
    so every rank runs the same number of steps. The epoch advances each time the
    stream is iterated (persistent workers keep the count), starting at ``start_epoch``.
    """

    def __init__(self, source: StreamSource, image_size: int, resize_mode: str = "shortest", with_qa: bool = False,
                 policy: BadSamplePolicy | None = None, seed: int = 0, rank: int = 0, world: int = 1,
                 workers: int = 0, batch_size: int = 1, start_epoch: int = 0, label: str | None = None):
        self.source, self.with_qa, self.label = source, with_qa, label or source.name
        self.image_size, self.resize_mode = image_size, resize_mode
        self.policy = policy or BadSamplePolicy()
        self.seed, self.rank, self.world = seed, rank, world
        self.workers, self.batch_size = max(1, workers), batch_size
        self.epoch = start_epoch
        if self.quota(0) == 0:
            raise ValueError(f"{source.name}: {len(source)} samples per epoch are too few for {world} ranks x "
                             f"{self.workers} workers x batch {batch_size}")

    def quota(self, worker: int) -> int:
        """Samples worker ``worker`` of this rank yields per epoch (whole batches)."""
        per_rank = len(self.source) // self.world
        share = per_rank // self.workers + (1 if worker < per_rank % self.workers else 0)
        return share // self.batch_size * self.batch_size

    def __len__(self) -> int:
        return sum(self.quota(w) for w in range(self.workers))

    def __iter__(self):
        info = get_worker_info()
        worker = info.id if info is not None else 0
        if (info.num_workers if info is not None else 1) != self.workers:
            raise RuntimeError(f"ImageTextStream was built for {self.workers} dataloader workers but runs in "
                               f"{info.num_workers if info else 0}: pass workers=num_workers")
        epoch, self.epoch = self.epoch, self.epoch + 1
        tally = BadSampleTally(self.policy, self.label)
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker, 7])
        quota, produced, skipped = self.quota(worker), 0, []
        samples = self.source.samples(epoch, self.seed, self.rank, self.world, worker, self.workers)
        for location, image, caption, extras in samples:
            if produced >= quota:
                break
            try:
                if isinstance(image, BadSample):
                    raise image
                captions = clean_captions(caption)
                pixels = decode(image, self.image_size, self.resize_mode, self.policy.max_pixels)
            except BadSample as bad:
                tally.record_bad(location, bad.reason)
                skipped.append((location, bad.reason))
                continue
            tally.record_good()
            item = {"image": pixels, "index": stable_index(location), "skipped": skipped,
                    "caption": captions[int(rng.integers(len(captions)))]}
            if self.with_qa and extras.get("qa"):
                item["qa"] = extras["qa"][int(rng.integers(len(extras["qa"])))]
            skipped = []
            produced += 1
            yield item
