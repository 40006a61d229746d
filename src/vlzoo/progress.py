"""Progress that every log shows, and the CPU thread policy while training.

:class:`StepProgress` replaces Lightning's progress bar. On a terminal it is a live bar
over the run's optimizer steps (never an epoch count such as ``0/-2``) with rate, ETA and
the loss; with output to a file or a pipe (a cluster job, ``nohup``) it prints one plain
line every ``every_seconds`` with the same content. Validation and testing report the
same way.

:class:`ThreadPolicy` re-sizes torch's intra-op threads while training to the cores other
processes leave free (see :mod:`vlzoo.process`).
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar

from vlzoo.options import PositiveFloat, check_options
from vlzoo.process import CHECK_SECONDS, THREADS_ENV, CpuShare, parse_threads
from vlzoo.utils import duration


def batch_samples(batch: Any) -> int:
    """Samples in a batch: the length of its images, or of its first field."""
    if isinstance(batch, dict) and "pixel_values" in batch:
        return len(batch["pixel_values"])
    if isinstance(batch, dict):
        return len(next(iter(batch.values())))
    return len(batch)


EVAL_PHASES = ("validate", "test", "predict")


class _Phase:
    """Counts and timing of one stage (training, validation, testing)."""

    def __init__(self, name: str, total: float, done: int = 0) -> None:
        self.name, self.total, self.start_done, self.done = name, total, done, done
        self.samples = 0
        self.start = time.monotonic()

    def rate(self) -> float:
        elapsed = time.monotonic() - self.start
        return (self.done - self.start_done) / elapsed if elapsed > 0 else 0.0

    def eta(self) -> float:
        rate = self.rate()
        return (self.total - self.done) / rate if rate > 0 and math.isfinite(self.total) else math.inf

    def counts(self) -> str:
        total = f"/{int(self.total)}" if math.isfinite(self.total) else ""
        percent = f" ({100 * self.done / self.total:.0f}%)" if math.isfinite(self.total) and self.total else ""
        return f"{self.done}{total}{percent}"


class StepProgress(ProgressBar):
    """Training, validation and test progress: a live bar on a terminal, a plain line every
    ``every_seconds`` otherwise.

    Args:
        every_seconds: seconds between two lines when the output is a file or a pipe.
        mode: ``auto`` (a bar on a terminal, lines otherwise), ``bar``, ``lines`` or ``off``.
    """

    def __init__(self, every_seconds: PositiveFloat = 30.0,
                 mode: Literal["auto", "bar", "lines", "off"] = "auto") -> None:
        super().__init__()
        check_options(progress__every_seconds=every_seconds)
        self.every_seconds = float(every_seconds)
        self.mode = mode
        self._enabled = mode != "off"
        self._rank_zero = True
        self._phase: _Phase | None = None
        self._train: _Phase | None = None
        self._last_line = 0.0
        self._metrics: dict[str, Any] = {}
        self._live = None
        self._tasks: dict[str, Any] = {}
        self._heartbeat: threading.Thread | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._last_batch = 0.0

    # -- ProgressBar's interface
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = self.mode != "off" and self._rank_zero

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    @property
    def uses_bar(self) -> bool:
        return self.mode == "bar" or (self.mode == "auto" and sys.stdout.isatty())

    # -- a line at least every ``every_seconds``, even inside a long step or evaluation
    def setup(self, trainer, module, stage: str) -> None:
        super().setup(trainer, module, stage)  # disables the other ranks: rank 0 alone reports
        self._rank_zero = trainer.is_global_zero
        if self._enabled and not self.uses_bar and trainer.is_global_zero and self._heartbeat is None:
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._beat, name="vlzoo-progress", daemon=True)
            self._heartbeat.start()

    @property
    def _due(self) -> float:
        """Seconds after the last line when the next is due: a little early, so that a
        line comes at least every ``every_seconds`` even with a step in between."""
        return self.every_seconds * 0.9

    def _beat(self) -> None:
        """Print the current line with ``(still working)`` when no batch has finished and
        no line was printed for an interval (a long step or evaluation)."""
        while not self._stop.wait(max(0.2, min(1.0, self.every_seconds / 10))):
            phase, now = self._phase, time.monotonic()
            with self._lock:
                if phase is None or not self._enabled or now - self._last_line < self._due \
                        or now - self._last_batch < self._due:
                    continue
                self._last_line = now
                print(self.line(phase, self._metrics) + " (still working)", flush=True)

    def _stop_heartbeat(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(timeout=10)
        self._heartbeat = None

    # -- training
    def on_train_start(self, trainer, module) -> None:
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._train = _Phase("train", float(total), trainer.global_step)
        end = int(total) if math.isfinite(total) else "?"
        self._begin(self._train, f"training steps {trainer.global_step} to {end}")

    def on_train_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int) -> None:
        if self._train is None:
            return
        self._train.done = trainer.global_step
        self._train.samples += batch_samples(batch) * trainer.world_size
        self._report(self._train, lambda: self.get_metrics(trainer, module))

    def on_train_end(self, trainer, module) -> None:
        if self._train is not None:
            self._report(self._train, lambda: self.get_metrics(trainer, module), final=True)
        self._stop_live()
        self._train = None

    # -- evaluation
    def _eval_start(self, name: str, trainer) -> None:
        if trainer.sanity_checking:
            return
        batches = {"validate": trainer.num_val_batches, "test": trainer.num_test_batches,
                   "predict": trainer.num_predict_batches}[name]
        total = float(sum(b for b in batches if math.isfinite(b))) if batches else math.inf
        phase = _Phase(name, total or math.inf)
        self._begin(phase, f"{name}: {int(total) if math.isfinite(total) else '?'} batches"
                    + (f" at step {trainer.global_step}" if self._train is not None else ""))

    def _eval_batch(self, trainer, batch: Any) -> None:
        if self._phase is None or self._phase.name not in EVAL_PHASES or trainer.sanity_checking:
            return
        self._phase.done += 1
        self._phase.samples += batch_samples(batch) * trainer.world_size
        self._report(self._phase, dict)

    def _eval_end(self, trainer) -> None:
        if self._phase is None or self._phase.name not in EVAL_PHASES or trainer.sanity_checking:
            return
        self._report(self._phase, dict, final=True)
        self._remove_task(self._phase.name)
        self._phase = self._train
        if self._train is None:
            self._stop_live()

    def _eval_hooks(name: str):  # noqa: N805 - builds the three hooks of one evaluation stage
        def start(self, trainer, module) -> None:
            self._eval_start(name, trainer)

        def batch_end(self, trainer, module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
            self._eval_batch(trainer, batch)

        def end(self, trainer, module) -> None:
            self._eval_end(trainer)

        return start, batch_end, end

    on_validation_start, on_validation_batch_end, on_validation_end = _eval_hooks("validate")
    on_test_start, on_test_batch_end, on_test_end = _eval_hooks("test")
    on_predict_start, on_predict_batch_end, on_predict_end = _eval_hooks("predict")
    del _eval_hooks

    def on_exception(self, trainer, module, exception: BaseException) -> None:
        self._stop_live()
        self._stop_heartbeat()

    def teardown(self, trainer, module, stage: str) -> None:
        self._stop_live()
        self._stop_heartbeat()
        self._phase = None

    # -- output
    def line(self, phase: _Phase, metrics: dict[str, Any]) -> str:
        """One progress line: counts, rates, elapsed time, ETA and the logged metrics."""
        elapsed = time.monotonic() - phase.start
        unit = "step" if phase.name == "train" else "batch"
        units = "steps" if phase.name == "train" else "batches"
        rate = phase.rate()
        samples = phase.samples / elapsed if elapsed > 0 else 0.0
        parts = [f"{phase.name} {unit} {phase.counts()}",
                 f"{rate:.2f} {units}/s, {samples:.0f} samples/s",
                 f"elapsed {duration(elapsed)}, ETA {duration(phase.eta())}"]
        shown = _shown(metrics, ", ")
        return "vlzoo: " + " | ".join(parts + ([shown] if shown else []))

    def _begin(self, phase: _Phase, announce: str) -> None:
        self._phase, self._metrics = phase, {}
        if not self._enabled:
            return
        if self.uses_bar:
            self._add_task(phase)
        else:
            print(f"vlzoo: {announce}", flush=True)
            self._last_line = self._last_batch = time.monotonic()

    def _report(self, phase: _Phase, metrics: Callable[[], dict[str, Any]], final: bool = False) -> None:
        """Update the bar, or print a line when one is due; ``metrics`` is called only then."""
        if not self._enabled:
            return
        if self.uses_bar:
            self._update_task(phase, metrics())
            return
        now = self._last_batch = time.monotonic()
        with self._lock:
            if final or now - self._last_line >= self._due:
                self._metrics = metrics() or self._metrics
                print(self.line(phase, self._metrics) + (" (done)" if final else ""), flush=True)
                self._last_line = now

    # -- the live bar (rich)
    def _add_task(self, phase: _Phase) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        if self._live is None:
            self._live = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                  TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"))
            self._live.start()
        total = phase.total if math.isfinite(phase.total) else None
        self._tasks[phase.name] = self._live.add_task(phase.name, total=total, completed=phase.done, rate="",
                                                      metrics="")

    def _update_task(self, phase: _Phase, metrics: dict[str, Any]) -> None:
        task = self._tasks.get(phase.name)
        if self._live is None or task is None:
            return
        elapsed = time.monotonic() - phase.start
        rate = f"{phase.samples / elapsed:.0f} samples/s" if elapsed > 0 else ""
        self._live.update(task, completed=phase.done, rate=rate, metrics=_shown(metrics, " "))

    def _remove_task(self, name: str) -> None:
        task = self._tasks.pop(name, None)
        if self._live is not None and task is not None:
            self._live.remove_task(task)

    def _stop_live(self) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
            self._tasks.clear()


def _shown(metrics: dict[str, Any], separator: str) -> str:
    """``train/loss 2.31`` for every logged metric (Lightning's ``v_num`` left out)."""
    return separator.join(f"{k} {_number(v)}" for k, v in metrics.items() if k != "v_num")


def _number(value: Any) -> str:
    value = float(value.item() if isinstance(value, torch.Tensor) else value)
    return f"{value:.4g}"


class ThreadPolicy(Callback):
    """Every ``check_seconds`` of training, sets torch's intra-op threads to the cores
    other processes leave free; does nothing when ``VLZOO_THREADS`` fixes the count."""

    def __init__(self, check_seconds: float = CHECK_SECONDS) -> None:
        self.check_seconds = check_seconds
        self.history: list[int] = []
        self._share: CpuShare | None = None
        self._last = 0.0

    def on_train_start(self, trainer, module) -> None:
        fixed = parse_threads(os.environ.get(THREADS_ENV), THREADS_ENV)
        if fixed is not None or trainer.strategy.root_device.type != "cpu":
            return
        self._share, self._last = CpuShare(), time.monotonic()
        self.history = [torch.get_num_threads()]

    def on_train_batch_end(self, trainer, module, outputs, batch: Any, batch_idx: int) -> None:
        if self._share is None or time.monotonic() - self._last < self.check_seconds:
            return
        self._last = time.monotonic()
        threads = self._share.free_threads(self._share.sample())
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
            self.history.append(threads)
