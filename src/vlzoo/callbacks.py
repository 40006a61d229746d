"""Callbacks every vlzoo task attaches: training throughput, peak memory and size."""

from __future__ import annotations

import resource
import sys
import time
from typing import Any

import lightning as L
import torch


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
