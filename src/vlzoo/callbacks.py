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


class RNGState(L.Callback):
    """Saves every rank's torch (CPU and CUDA), numpy and Python RNG states in the
    checkpoint and restores them on resume, so that dropout, masking and hard-negative
    draws continue as if the run had never stopped (the data draws its own randomness
    from the seed, epoch and index: :mod:`vlzoo.data.resumable`)."""

    def state_dict(self) -> dict[str, Any]:
        return {"ranks": gather_objects(_rng_states())}  # every rank dumps the checkpoint: a collective

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ranks = state_dict.get("ranks", [])
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if ranks:
            _set_rng_states(ranks[rank] if rank < len(ranks) else ranks[0])


def _rng_states() -> dict[str, Any]:
    import random

    import numpy as np

    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states = {"torch": torch.get_rng_state(), "numpy": [kind, torch.from_numpy(keys.astype("int64")), position,
                                                         has_gauss, gauss],
              "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(states["torch"])
    kind, keys, position, has_gauss, gauss = states["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), position, has_gauss, gauss))
    python = states["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class Preemption(L.Callback):
    """On SIGTERM (a scheduler preempting the job) Lightning stops after the current
    batch; this writes ``last.ckpt`` there, so ``vlzoo fit ... --ckpt_path last``
    resumes exactly, and the process exits 0 (see :func:`vlzoo.cli.main`)."""

    def __init__(self) -> None:
        self.saved: str | None = None

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        keeper = trainer.checkpoint_callback
        directory = getattr(keeper, "dirpath", None) or f"{trainer.default_root_dir}/checkpoints"
        path = f"{directory}/last.ckpt"
        if keeper is not None and hasattr(keeper, "last_model_path"):
            keeper.last_model_path = path  # saved in the state: the resumed run overwrites it, no last-v1.ckpt
        trainer.save_checkpoint(path)
        self.saved = path
        if trainer.is_global_zero:
            print(f"vlzoo: SIGTERM at step {trainer.global_step}: saved {path}; resume with --ckpt_path last",
                  flush=True)
