"""Callbacks every vlzoo task attaches: training throughput, peak memory and size;
counts of skipped bad samples."""

from __future__ import annotations

import logging
import resource
import sys
import time
from typing import Any

import lightning as L
import torch

from vlzoo.distributed import gather_objects

log = logging.getLogger("vlzoo.data")


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocated on a GPU, else the peak resident set."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kilobytes = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    return kilobytes / (2**20 if sys.platform == "darwin" else 2**10)


class RunStats(L.Callback):
    """Measures training samples/s (training steps only: validation, checkpointing and
    data waits between steps excluded), counts parameters, and reads peak memory.
    :meth:`summary` gives them for ``metrics.json``."""

    def __init__(self) -> None:
        self.train_seconds = 0.0
        self.train_samples = 0
        self._start: float | None = None

    def on_train_batch_start(self, trainer, module, batch: Any, batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int) -> None:
        if self._start is None:
            return
        self.train_seconds += time.perf_counter() - self._start
        self.train_samples += _batch_size(batch) * trainer.world_size
        self._start = None

    def summary(self, trainer, module) -> dict[str, float]:
        params = list(module.parameters())
        total = sum(p.numel() for p in {id(p): p for p in params}.values())
        trainable = sum(p.numel() for p in {id(p): p for p in params if p.requires_grad}.values())
        stats = {"params_total": float(total), "params_trainable": float(trainable),
                 "peak_memory_mb": peak_memory_mb(module.device)}
        if self.train_seconds > 0:
            stats["train/samples_per_s"] = self.train_samples / self.train_seconds
        return stats


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "pixel_values" in batch:
        return len(batch["pixel_values"])
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch)


class SkippedSamples(L.Callback):
    """Counts bad samples per split and logs each once (location and reason).

    Bad rows refused while reading annotations come from the datamodule
    (``skipped_rows``); bad images and captions met while loading come in each batch's
    ``skipped`` list. ``{split}/skipped_samples`` is the number of distinct bad samples,
    over all ranks, logged at the end of each epoch; :meth:`counts` gives it for
    ``metrics.json``.
    """

    def __init__(self) -> None:
        self.seen: dict[str, dict[str, str]] = {}

    def _add(self, split: str, entries) -> None:
        seen = self.seen.setdefault(split, {})
        for location, reason in entries:
            if location not in seen:
                seen[location] = reason
                log.warning("skipped bad sample (%s) %s: %s", split, location, reason)

    def _start(self, trainer, split: str) -> None:
        rows = getattr(trainer.datamodule, "skipped_rows", None) if trainer.datamodule is not None else None
        self.seen.setdefault(split, {})
        if rows is not None:
            self._add(split, rows(split))

    def _batch(self, split: str, batch: Any) -> None:
        if isinstance(batch, dict) and batch.get("skipped"):
            self._add(split, batch["skipped"])

    def count(self, split: str) -> int:
        """Distinct bad samples of ``split`` over all ranks (a collective call under DDP)."""
        locations = set().union(*gather_objects(set(self.seen.get(split, {}))))
        return len(locations)

    def counts(self) -> dict[str, float]:
        """``{split}/skipped_samples`` for every split seen (a collective call)."""
        return {f"{split}/skipped_samples": float(self.count(split)) for split in sorted(self.seen)}

    def on_train_epoch_start(self, trainer, module) -> None:
        self._start(trainer, "train")

    def on_validation_epoch_start(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            self._start(trainer, "val")

    def on_test_epoch_start(self, trainer, module) -> None:
        self._start(trainer, "test")

    def on_train_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int) -> None:
        self._batch("train", batch)

    def on_validation_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int, dataloader_idx=0):
        if not trainer.sanity_checking:
            self._batch("val", batch)

    def on_test_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int, dataloader_idx=0):
        self._batch("test", batch)

    def on_train_epoch_end(self, trainer, module) -> None:
        module.log("train/skipped_samples", float(self.count("train")))

    def on_validation_epoch_end(self, trainer, module) -> None:
        if not trainer.sanity_checking:
            module.log("val/skipped_samples", float(self.count("val")))

    def on_test_epoch_end(self, trainer, module) -> None:
        module.log("test/skipped_samples", float(self.count("test")))
