"""Faults a long run survives: non-finite steps skipped and counted (and a stop with a
checkpoint when they persist); SIGTERM saves a checkpoint, exits 0 and resumes exactly;
SIGKILL loses only the steps since the last save interval."""

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from host_reads import HostReads
from tiny_configs import tiny_task

from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.tasks.base import NonFiniteTrainingError

ROOT = Path(__file__).resolve().parents[2]


def _poisoned(task, bad_batches):
    """``task`` whose loss is NaN on the given batch indices."""
    step = task.training_step

    def training_step(batch, batch_idx):
        loss = step(batch, batch_idx)
        return loss * float("nan") if batch_idx in bad_batches else loss

    task.training_step = training_step
    return task


class Snapshots(L.Callback):
    def __init__(self):
        self.before, self.after = {}, {}

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.before[batch_idx] = {k: v.clone() for k, v in module.state_dict().items()}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.after[batch_idx] = {k: v.clone() for k, v in module.state_dict().items()}


def _trainer(root, max_steps, callbacks=()):
    return L.Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                     num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                     default_root_dir=str(root), callbacks=list(callbacks))


def _data():
    return VLDataModule(shapes=ShapesConfig(image_size=16, train_size=64, val_size=8, test_size=8), batch_size=8)


@pytest.mark.parametrize("fused", [True, False], ids=["skipped-on-device", "skipped-on-host"])
@pytest.mark.parametrize("family", ["clip", "albef"])
def test_nan_steps_are_skipped_counted_and_leave_the_weights_alone(tmp_path, family, fused):
    L.seed_everything(0)
    task = _poisoned(tiny_task(family), bad_batches={1, 2})
    task.optim.fused = fused  # fused AdamW skips on the device (found_inf), the foreach one on the host
    snapshots = Snapshots()
    trainer = _trainer(tmp_path, max_steps=5, callbacks=[snapshots])
    trainer.fit(task, _data())
    assert trainer.global_step == 5 and len(snapshots.after) == 5  # a skipped step still counts as a step
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    for name, value in snapshots.after[2].items():  # nothing a skipped step could touch moved: EMA, queues too
        torch.testing.assert_close(value, snapshots.before[1][name], atol=0, rtol=0, msg=name)
    assert any(not torch.equal(v, snapshots.before[3][k]) for k, v in snapshots.after[3].items())
    assert all(torch.isfinite(v).all() for v in task.state_dict().values() if v.is_floating_point())


def test_a_step_skipped_on_the_device_reads_nothing_and_the_count_comes_later(tmp_path, monkeypatch):
    L.seed_everything(0)
    task = _poisoned(tiny_task("albef"), bad_batches={1, 2})
    monkeypatch.setattr(type(task), "nonfinite_check_interval", lambda self: 4)  # as on a GPU: every 4 steps
    reads, counted = [], []
    step = type(task)._step_or_skip_on_device

    def watched(self, *args):
        with HostReads() as mode:
            step(self, *args)
        reads.append(mode.reads)
        counted.append(self._skipped_steps)

    monkeypatch.setattr(type(task), "_step_or_skip_on_device", watched)
    _trainer(tmp_path, max_steps=6).fit(task, _data())
    assert reads[:3] == [0, 0, 0]  # no host read until the 4th step reads the counters
    assert counted == [0, 0, 0, 2, 2, 2]


def test_a_run_of_skips_between_two_reads_still_stops_the_run(tmp_path, monkeypatch):
    L.seed_everything(0)
    task = _poisoned(tiny_task("clip"), bad_batches={1, 2, 3})  # then finite again before the read
    task.optim.max_nonfinite_steps = 3
    monkeypatch.setattr(type(task), "nonfinite_check_interval", lambda self: 6)
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row"):
        _trainer(tmp_path, max_steps=20).fit(task, _data())
    saved = list((tmp_path / "checkpoints").glob("nonfinite-step*.ckpt"))
    assert [p.name for p in saved] == ["nonfinite-step5.ckpt"]  # found at the read after step 5


def test_persistent_nan_stops_with_a_checkpoint(tmp_path):
    L.seed_everything(0)
    task = _poisoned(tiny_task("clip"), bad_batches=set(range(2, 100)))
    task.optim.max_nonfinite_steps = 3
    with pytest.raises(NonFiniteTrainingError, match="3 optimizer steps in a row had non-finite gradients"):
        _trainer(tmp_path, max_steps=20).fit(task, _data())
    saved = list((tmp_path / "checkpoints").glob("nonfinite-step*.ckpt"))
    assert len(saved) == 1 and saved[0].name == "nonfinite-step4.ckpt"  # batches 2, 3, 4 were NaN
    assert torch.load(saved[0], weights_only=False)["global_step"] == 4


def _vlzoo_fit(run: Path, *extra: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "vlzoo.cli", "fit", "--config", str(ROOT / "zoo_configs/models/clip/shapes-tiny.yaml"),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "6", "--trainer.val_check_interval", "6",
            "--trainer.enable_progress_bar", "false", "--data.batch_size", "16", "--data.shapes.train_size", "64",
            "--data.shapes.val_size", "16", "--data.shapes.test_size", "16", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "tests")}
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)


def _signalled_at_step_3(tmp_path: Path, callback: str) -> subprocess.CompletedProcess:
    """A real ``vlzoo fit`` whose process signals itself after step 3 (``sigterm_at.CALLBACK``)."""
    extra = tmp_path / "signal.yaml"
    extra.write_text(f"trainer:\n  callbacks:\n    - class_path: sigterm_at.{callback}\n      init_args: {{step: 3}}\n")
    return _vlzoo_fit(tmp_path / "run", "--config", str(extra))


def test_sigterm_saves_exits_zero_and_resumes_exactly(tmp_path):
    stopped = _signalled_at_step_3(tmp_path, "SigtermAt")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert "SIGTERM at step 3" in stopped.stdout and last.is_file()
    assert torch.load(last, weights_only=False)["global_step"] == 3
    resumed = _vlzoo_fit(tmp_path / "run", "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = _vlzoo_fit(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    a = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(tmp_path / "whole" / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 6
    for name, value in b["state_dict"].items():
        torch.testing.assert_close(a["state_dict"][name], value, atol=1e-6, rtol=0, msg=name)


def test_sigkill_resumes_from_the_last_save_interval(tmp_path):
    """A real ``vlzoo fit`` saving every 3 steps, killed with SIGKILL right after its third
    save (no validation in between): ``--ckpt_path last`` resumes at step 9 and finishes."""
    run = tmp_path / "run"
    args = [sys.executable, "-m", "vlzoo.cli", "fit", "--config", str(ROOT / "zoo_configs/models/clip/shapes-tiny.yaml"),
            "--trainer.default_root_dir", str(run), "--trainer.max_steps", "1000", "--trainer.val_check_interval",
            "1000", "--trainer.check_val_every_n_epoch", "null", "--trainer.enable_progress_bar", "false",
            "--data.batch_size", "16", "--data.shapes.train_size", "64", "--data.shapes.val_size", "16",
            "--data.shapes.test_size", "16", "--checkpoint.every_n_steps", "3", "--checkpoint.on_validation", "false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    saved = []
    try:
        for line in process.stdout:
            found = re.match(r"vlzoo: step (\d+): saved .*last\.ckpt", line)
            if found:
                saved.append(int(found.group(1)))
            if len(saved) == 3:
                process.send_signal(signal.SIGKILL)
                break
    finally:
        process.kill()
        process.wait(timeout=60)
    assert saved == [3, 6, 9] and process.returncode == -signal.SIGKILL
    resumed = subprocess.run([*args[:9], "12", *args[10:], "--ckpt_path", "last"], capture_output=True, text=True,
                             env=env, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {run / 'checkpoints' / 'last.ckpt'} (step 9)" in resumed.stdout
    assert "step 12: saved" in resumed.stdout


def test_ctrl_c_stops_after_the_step_saves_and_says_how_to_continue(tmp_path):
    stopped = _signalled_at_step_3(tmp_path, "SigintAt")
    assert stopped.returncode == 130, stopped.stderr[-3000:]
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert "Ctrl-C at step 3" in stopped.stdout and "--ckpt_path last" in stopped.stdout and last.is_file()
    assert torch.load(last, weights_only=False)["global_step"] == 3
    assert "Traceback" not in stopped.stderr and "interrupted (Ctrl-C)" in stopped.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()  # stopped: not tested as if it had finished
