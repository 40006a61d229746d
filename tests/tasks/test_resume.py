"""Exact resume in every way a run can stop and continue, against the uninterrupted run:
the continued run's per-step losses and its final weights (EMA copies, queues and their
pointers, temperature) equal the straight run's to 1e-6 (CPU, fp32, fixed seed). The
optimizer, schedule, RNG states and data position are what makes them equal.

The matrix runs for CLIP, a momentum family (ALBEF) and BLIP-2 stage 1. Stops: mid-epoch
by ``max_steps``, by ``max_time`` (``trainer.should_stop``), by SIGTERM, by a crash (resume
from the last ``every_n_steps`` save, as after ``kill -9``), at an epoch boundary, after
validation, inside a gradient accumulation (SIGTERM) and by ``max_epochs`` followed by a
larger ``max_epochs``. The 2-process DDP case: ``test_ddp_resume_is_exact``.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from tiny_configs import tiny_task

from vlzoo.callbacks import RunCheckpoint
from vlzoo.data.datamodule import ShapesConfig, VLDataModule

STEPS = 8  # 5 batches an epoch: the runs cross an epoch boundary
VAL_EVERY = 3  # training batches between validations


class Recorder(L.Callback):
    """Per-step training losses (the last micro-batch's under accumulation)."""

    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if not trainer.fit_loop.epoch_loop._should_accumulate():
            self.losses.append(float(outputs["loss"]))


class StopAt(L.Callback):
    """An interruption after optimizer step ``step``: ``stop`` sets ``should_stop`` (what
    ``max_time``'s Timer does), ``sigterm`` sends SIGTERM, ``crash`` raises (as ``kill -9``:
    nothing is saved at the stop). ``batch`` counts training batches instead of steps."""

    def __init__(self, how: str, step: int | None = None, batch: int | None = None):
        self.how, self.step, self.batch, self.batches = how, step, batch, 0

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.batches += 1
        due = self.batches == self.batch if self.batch is not None else trainer.global_step == self.step
        if not due:
            return
        if self.how == "stop":
            trainer.should_stop = True
        elif self.how == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        else:
            raise RuntimeError("simulated crash")


def _fit(family: str, root: Path, *, ckpt_path=None, seed: int = 0, callbacks=(), accumulate: int = 1,
         every_n_steps: int | None = None, **limits):
    L.seed_everything(seed)
    task = tiny_task(family)
    data = VLDataModule(shapes=ShapesConfig(image_size=16, train_size=40, val_size=8, test_size=8), batch_size=8)
    recorder = Recorder()
    checkpoint = RunCheckpoint(every_n_steps=every_n_steps, every_minutes=None)
    limits = limits or {"max_steps": STEPS}
    trainer = L.Trainer(accelerator="cpu", devices=1, precision="32-true", logger=False, val_check_interval=VAL_EVERY,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(root), callbacks=[recorder, checkpoint, *callbacks],
                        accumulate_grad_batches=accumulate, **limits)
    try:
        trainer.fit(task, data, ckpt_path=ckpt_path)
    except SIGTERMException:  # a SystemExit(0): the command exits 0 after Preemption saved last.ckpt
        pass
    except RuntimeError as err:
        if "simulated crash" not in str(err):
            raise
    return task, recorder.losses, root / "checkpoints" / "last.ckpt"


_STRAIGHT: dict[tuple, tuple] = {}


def _straight(family: str, tmp_path_factory, accumulate: int = 1, **limits):
    key = (family, accumulate, tuple(sorted(limits.items())))
    if key not in _STRAIGHT:
        task, losses, _ = _fit(family, tmp_path_factory.mktemp("straight"), accumulate=accumulate, **limits)
        _STRAIGHT[key] = ({k: v.clone() for k, v in task.state_dict().items()}, losses)
    return _STRAIGHT[key]


def _assert_same_run(resumed_task, resumed_losses, done_steps, straight):
    state, losses = straight
    assert len(resumed_losses) == len(losses) - done_steps, (len(resumed_losses), len(losses), done_steps)
    torch.testing.assert_close(torch.tensor(resumed_losses), torch.tensor(losses[done_steps:]), atol=1e-6, rtol=0)
    for name, value in resumed_task.state_dict().items():  # weights, momentum copies, queues, temperature
        torch.testing.assert_close(value, state[name], atol=1e-6, rtol=0, msg=name)


def _step_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


# (name, how the first run stops, the step of its last.ckpt)
STOPS = {
    "max_steps": (dict(max_steps=3), 3),
    "max_time": (dict(callbacks=[StopAt("stop", step=3)]), 3),
    "sigterm": (dict(callbacks=[StopAt("sigterm", step=4)]), 4),
    "sigterm_at_epoch_end": (dict(callbacks=[StopAt("sigterm", step=5)]), 5),
    "kill": (dict(callbacks=[StopAt("crash", step=7)], every_n_steps=2), 6),
    "epoch_boundary": (dict(max_steps=5), 5),
    "after_validation": (dict(callbacks=[StopAt("crash", step=5)]), 3),  # validation after batch 3 of each epoch
}
FAMILIES = ["clip", "albef", "blip2"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stop", sorted(STOPS))
def test_resume_after_a_stop_is_exact(tmp_path, tmp_path_factory, family, stop):
    first, saved_step = STOPS[stop]
    _, _, last = _fit(family, tmp_path / "run", **first)
    assert _step_of(last) == saved_step
    resumed, losses, _ = _fit(family, tmp_path / "run", ckpt_path=str(last), seed=123)  # other seed: all restored
    _assert_same_run(resumed, losses, saved_step, _straight(family, tmp_path_factory))


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_inside_a_gradient_accumulation_is_exact(tmp_path, tmp_path_factory, family):
    """SIGTERM after the first micro-batch of step 2 (batch 3): the stop waits for the step."""
    _, _, last = _fit(family, tmp_path / "run", accumulate=2, max_steps=4,
                      callbacks=[StopAt("sigterm", batch=3)])
    assert _step_of(last) == 2
    resumed, losses, _ = _fit(family, tmp_path / "run", accumulate=2, max_steps=4, ckpt_path=str(last), seed=7)
    _assert_same_run(resumed, losses, 2, _straight(family, tmp_path_factory, accumulate=2, max_steps=4))


@pytest.mark.parametrize("family", FAMILIES)
def test_resume_with_more_epochs_is_exact(tmp_path, tmp_path_factory, family):
    _, _, last = _fit(family, tmp_path / "run", max_epochs=1)
    assert _step_of(last) == 5
    resumed, losses, _ = _fit(family, tmp_path / "run", max_epochs=2, ckpt_path=str(last), seed=7)
    _assert_same_run(resumed, losses, 5, _straight(family, tmp_path_factory, max_epochs=2))


def test_last_checkpoint_keeps_up_without_validation_gains(tmp_path):
    """last.ckpt follows the run (every 2 steps here) whatever the monitored metric does."""
    _, _, last = _fit("clip", tmp_path / "run", every_n_steps=2, max_steps=7, callbacks=[StopAt("crash", step=5)])
    assert _step_of(last) == 4
    _, _, last = _fit("clip", tmp_path / "run2", every_n_steps=2, max_steps=7)
    assert _step_of(last) == 7  # the stop itself is saved too
