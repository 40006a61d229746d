"""Progress in every log: with output to a file or pipe, plain lines at the chosen
interval with steps, rate, ETA and the loss (never an epoch total like 0/-2); on a
terminal a live bar over the optimizer steps; ThreadPolicy follows the free cores."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import lightning as L
import pytest
import torch
from tiny_configs import tiny_task

from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.process import available_cores
from vlzoo.progress import StepProgress, ThreadPolicy
from vlzoo.utils import ProgressLines, duration


def _fit(tmp_path, progress, max_steps=6, callbacks=()):
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, val_check_interval=3,
                        num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[progress, *callbacks], enable_checkpointing=False)
    data = VLDataModule(shapes=ShapesConfig(image_size=16, train_size=64, val_size=8, test_size=8), batch_size=8)
    trainer.fit(tiny_task("clip"), data)
    return trainer


def test_lines_report_steps_rate_eta_and_loss(tmp_path, capsys):
    _fit(tmp_path, StepProgress(every_seconds=1e-6, mode="lines"))
    out = capsys.readouterr().out
    steps = re.findall(r"vlzoo: train step (\d+)/6 \(\d+%\) \| [\d.]+ steps/s, \d+ samples/s \| elapsed [\d:]+, "
                       r"ETA [\d:?]+ \| train/loss [\d.]+", out)
    assert [int(s) for s in steps][-1] == 6 and len(steps) >= 6, out
    assert "vlzoo: training steps 0 to 6" in out and "(done)" in out
    assert re.search(r"vlzoo: validate batch 1/1 \(100%\)", out)
    text = out.replace(str(tmp_path), "TMP")  # pytest's folder (pytest-200) is not a step count
    assert "-2" not in text and "Epoch" not in text


def test_a_long_step_still_prints_a_line_every_interval(tmp_path, capsys):
    task = tiny_task("clip")
    step = task.training_step

    def slow_step(batch, batch_idx):
        if batch_idx == 1:
            time.sleep(2.5)
        return step(batch, batch_idx)

    task.training_step = slow_step
    L.seed_everything(0)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[StepProgress(every_seconds=1.0, mode="lines")], enable_checkpointing=False)
    trainer.fit(task, VLDataModule(shapes=ShapesConfig(image_size=16, train_size=64, val_size=8, test_size=8),
                                   batch_size=8))
    out = capsys.readouterr().out
    assert re.search(r"vlzoo: train step 1/3 .* \(still working\)", out), out


def test_lines_respect_the_interval(tmp_path, capsys):
    _fit(tmp_path, StepProgress(every_seconds=3600, mode="lines"))
    out = capsys.readouterr().out
    assert len(re.findall(r"vlzoo: train step", out)) == 1  # only the last line, at the end


def test_off_prints_nothing(tmp_path, capsys):
    _fit(tmp_path, StepProgress(mode="off"))
    assert "vlzoo: train" not in capsys.readouterr().out


def test_bar_mode_runs_a_live_bar(tmp_path):
    progress = StepProgress(mode="bar")
    trainer = _fit(tmp_path, progress)
    assert trainer.global_step == 6 and progress._live is None  # stopped and cleaned up


@pytest.mark.skipif(available_cores() < 2 or not os.path.exists("/proc/stat"), reason="needs 2 cores and /proc")
def test_thread_policy_gives_a_core_to_a_busy_process(tmp_path, monkeypatch):
    monkeypatch.delenv("VLZOO_THREADS", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(available_cores())
    policy = ThreadPolicy(check_seconds=0.3)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        _fit(tmp_path, StepProgress(mode="off"), max_steps=40, callbacks=[policy])
    finally:
        hog.kill()
        hog.wait()
        torch.set_num_threads(threads)
    assert policy.history[0] == available_cores() and min(policy.history) < available_cores(), policy.history


def test_thread_policy_leaves_a_fixed_count_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("VLZOO_THREADS", "1")
    policy = ThreadPolicy(check_seconds=0.0)
    _fit(tmp_path, StepProgress(mode="off"), callbacks=[policy])
    assert policy.history == []


def test_progress_lines_outside_a_trainer(capsys):
    lines = ProgressLines("generating:", 10, "images", every_seconds=1e-6)
    for _ in range(5):
        lines.advance(2)
    err = capsys.readouterr().err
    assert "vlzoo: generating: 10/10 (100%)" in err and err.count("\n") == 5
    assert duration(3725) == "1:02:05" and duration(65) == "1:05" and duration(float("inf")) == "?"


def test_only_rank_zero_reports(capsys):
    from types import SimpleNamespace

    progress = StepProgress(every_seconds=1e-6, mode="lines")
    progress.setup(SimpleNamespace(is_global_zero=False), None, "fit")
    progress.enable()  # Lightning may re-enable a bar; another rank stays silent
    assert not progress.is_enabled and progress._heartbeat is None
