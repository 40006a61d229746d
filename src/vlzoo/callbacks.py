"""Callbacks every vlzoo task attaches: checkpoints that keep up with the run, training
throughput, peak memory and size, counts of skipped bad samples, RNG states, preemption."""

from __future__ import annotations

import logging
import resource
import signal
import sys
import threading
import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from vlzoo.distributed import gather_objects
from vlzoo.options import MinusOneOrMore, PositiveFloat, PositiveInt, check_options
from vlzoo.progress import batch_samples

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
    :meth:`summary` gives them for ``metrics.json``. The training time so far is logged
    as ``train/elapsed_s`` with each validation (the time axis of learning curves) and
    kept in checkpoints, so a resumed run counts on from where it stopped."""

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
        self.train_samples += batch_samples(batch) * trainer.world_size
        self._start = None

    def on_validation_epoch_end(self, trainer, module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            module.log("train/elapsed_s", self.train_seconds)

    def state_dict(self) -> dict[str, float]:
        return {"train_seconds": self.train_seconds, "train_samples": self.train_samples}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        self.train_seconds = float(state_dict.get("train_seconds", 0.0))
        self.train_samples = int(state_dict.get("train_samples", 0))

    def summary(self, trainer, module) -> dict[str, float]:
        params = list(module.parameters())
        total = sum(p.numel() for p in {id(p): p for p in params}.values())
        trainable = sum(p.numel() for p in {id(p): p for p in params if p.requires_grad}.values())
        stats = {"params_total": float(total), "params_trainable": float(trainable),
                 "peak_memory_mb": peak_memory_mb(module.device)}
        if self.train_seconds > 0:
            stats["train/samples_per_s"] = self.train_samples / self.train_seconds
        return stats


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


class RunCheckpoint(ModelCheckpoint):
    """``checkpoints/last.ckpt`` kept up to date, plus the best ``save_top_k`` checkpoints
    (``best-stepN.ckpt``) by the task's validation metric.

    ``last.ckpt`` is rewritten, independent of the metric:

    - every ``every_n_steps`` optimizer steps (None: not by count);
    - at the first optimizer step ``every_minutes`` after the previous save (None: not by time);
    - after every validation (``on_validation``);
    - at the step where the run stops (``max_steps``, ``max_epochs``, ``max_time`` or any
      other ``trainer.should_stop``); on SIGTERM :class:`Preemption` writes it.

    Saves happen only between optimizer steps (never inside a gradient accumulation), so
    every ``last.ckpt`` resumes exactly. Each write is atomic (:mod:`vlzoo.checkpoints`):
    a run killed at any moment resumes from the previous save. Under several processes
    the time trigger is rank 0's decision, broadcast.

    Args:
        every_n_steps: optimizer steps between saves of ``last.ckpt``.
        every_minutes: minutes between saves of ``last.ckpt`` at most.
        on_validation: also save ``last.ckpt`` after each validation.
        save_top_k: best checkpoints kept by the monitored metric (0: none, -1: all).
        monitor, mode: the metric and whether larger (``max``) or smaller is better;
            default: the task's (``VLTask.monitor``, ``VLTask.monitor_mode``).
        dirpath: folder of the checkpoints (default ``ROOT/checkpoints``).
    """

    def __init__(self, every_n_steps: PositiveInt | None = None, every_minutes: PositiveFloat | None = 10.0,
                 on_validation: bool = True, save_top_k: MinusOneOrMore = 1, monitor: str | None = None,
                 mode: str | None = None, dirpath: str | None = None):
        check_options(checkpoint__every_n_steps=every_n_steps, checkpoint__every_minutes=every_minutes,
                      checkpoint__save_top_k=save_top_k)
        if mode not in (None, "min", "max"):
            raise ValueError(f"checkpoint.mode must be 'min' or 'max', got {mode!r}")
        super().__init__(dirpath=dirpath, filename="best-step{step}", monitor=monitor, mode=mode or "max",
                         save_top_k=save_top_k, save_last=False, auto_insert_metric_name=False,
                         save_on_train_epoch_end=False)
        self.every_n_steps = every_n_steps
        self.every_minutes = every_minutes
        self.on_validation = on_validation
        self._monitor_of_task = monitor is None
        self._mode_of_task = mode is None
        self._last_save_time = time.monotonic()
        self._step_seen = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        if self._monitor_of_task:
            self.monitor = getattr(pl_module, "monitor", None)
        if self._mode_of_task:
            self.mode = getattr(pl_module, "monitor_mode", "max")
            self.kth_value = torch.tensor(-torch.inf if self.mode == "max" else torch.inf)
        super().setup(trainer, pl_module, stage)

    @property
    def last_path(self) -> str:
        """Where ``last.ckpt`` is written."""
        return f"{self.dirpath}/{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"

    def on_train_start(self, trainer, pl_module) -> None:
        super().on_train_start(trainer, pl_module)
        self._last_save_time = time.monotonic()
        self._step_seen = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if step == self._step_seen:  # inside a gradient accumulation: the summed gradients are not saved
            return
        self._step_seen = step
        by_count = self.every_n_steps is not None and step % self.every_n_steps == 0
        by_time = (self.every_minutes is not None
                   and time.monotonic() - self._last_save_time >= 60 * self.every_minutes)
        by_time = bool(trainer.strategy.broadcast(by_time))  # every rank saves, or none
        if by_count or by_time or _stops_after_this_step(trainer):
            self.write_last(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if self.on_validation and not trainer.sanity_checking and trainer.state.fn == "fit":
            self.write_last(trainer)

    def write_last(self, trainer) -> None:
        """Write ``last.ckpt`` now (atomically) and say so on rank 0."""
        path = self.last_path
        self.last_model_path = path  # part of the saved state: a resumed run keeps writing last.ckpt
        trainer.save_checkpoint(path, weights_only=False)
        self._last_save_time = time.monotonic()
        if trainer.is_global_zero:
            print(f"vlzoo: step {trainer.global_step}: saved {path}", flush=True)


def _stops_after_this_step(trainer) -> bool:
    """Whether the fit ends after the optimizer step just taken (max_steps, should_stop,
    the last batch of the last epoch)."""
    if trainer.should_stop or (trainer.max_steps not in (None, -1) and trainer.global_step >= trainer.max_steps):
        return True
    last_epoch = trainer.max_epochs not in (None, -1) and trainer.current_epoch + 1 >= trainer.max_epochs
    return last_epoch and bool(trainer.fit_loop.epoch_loop.batch_progress.is_last_batch)


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
    """On SIGTERM (a scheduler preempting the job) the run writes ``last.ckpt`` after the
    optimizer step in progress and stops; the process exits 0 (see :func:`vlzoo.cli.main`),
    so ``vlzoo fit ... --ckpt_path last`` resumes exactly.

    The checkpoint is taken at the end of the training batch, a state Lightning resumes
    exactly wherever it falls in the epoch (at the last batch too). A SIGTERM inside a
    gradient accumulation is held until the accumulation's optimizer step, so no summed
    gradient is lost. Rank 0's signal decides for every rank. A SIGTERM that stops the
    run elsewhere (during validation) is saved where it stops.
    """

    user_interrupted = False  # a Ctrl-C stopped a fit of this process (SIGINT is process-wide)

    def __init__(self) -> None:
        self.saved: str | None = None
        self._held = False
        self._step_seen = -1
        self._saved_step: int | None = None
        self._interrupted = False
        self._previous_sigint: Any = None

    def on_train_start(self, trainer, module) -> None:
        self._step_seen = trainer.global_step
        self._interrupted = False
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # a background job keeps ignoring it
            self._previous_sigint = signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum, frame) -> None:
        """The first Ctrl-C stops the run at the end of the step, with a checkpoint; a
        second one stops at once (the previous handler: KeyboardInterrupt)."""
        self._interrupted = Preemption.user_interrupted = True  # vlzoo.cli exits 130 after the save
        signal.signal(signal.SIGINT, self._previous_sigint or signal.default_int_handler)
        print("\nvlzoo: Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)

    def _restore_sigint(self) -> None:
        if self._previous_sigint is not None and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self._previous_sigint)
        self._previous_sigint = None

    def on_train_end(self, trainer, module) -> None:
        self._restore_sigint()

    def on_train_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int) -> None:
        stepped = trainer.global_step != self._step_seen
        self._step_seen = trainer.global_step
        stop = trainer.received_sigterm or self._held or self._interrupted
        signalled = bool(trainer.strategy.broadcast(bool(stop)))
        if not signalled:
            return
        connector = trainer._signal_connector  # Lightning raises SIGTERMException after the batch when set
        if not stepped:  # inside a gradient accumulation: stop after its optimizer step
            connector.received_sigterm, self._held = False, True
            return
        connector.received_sigterm, self._held = True, False
        self._save(trainer)

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        self._restore_sigint()
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit" \
                and self._saved_step != trainer.global_step:
            self._save(trainer)
        if isinstance(exception, KeyboardInterrupt):  # a second Ctrl-C, or one outside training
            Preemption.user_interrupted = True
            if trainer.is_global_zero:
                print(f"\nvlzoo: Ctrl-C during {trainer.state.fn.value}: stopped at once, nothing saved now"
                      + (f"; the last checkpoint is {self.saved}" if self.saved else "")
                      + ("; to continue training, run the same command with --ckpt_path last"
                         if trainer.state.fn == "fit" else ""), file=sys.stderr, flush=True)

    def _save(self, trainer) -> None:
        keeper = trainer.checkpoint_callback
        if isinstance(keeper, RunCheckpoint):
            keeper.write_last(trainer)
            path = keeper.last_path
        else:  # a trainer without vlzoo's checkpoint callback
            path = f"{trainer.default_root_dir}/checkpoints/last.ckpt"
            trainer.save_checkpoint(path, weights_only=False)
        self.saved, self._saved_step = path, trainer.global_step
        if trainer.is_global_zero:
            reason = "Ctrl-C" if self._interrupted else "SIGTERM"
            print(f"vlzoo: {reason} at step {trainer.global_step}: saved {path}; to continue, run the same "
                  "command with --ckpt_path last", flush=True)
