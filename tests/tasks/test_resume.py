"""Exact resume for every family: a run resumed from a mid-epoch checkpoint produces the
same losses and final weights (EMA copies, queues, temperature, optimizer, schedule,
RNG, data position) as the uninterrupted run. CPU, fp32, fixed seed."""

import lightning as L
import pytest
import torch
from tiny_configs import tiny_task

from vlzoo.data.datamodule import ShapesConfig, VLDataModule

STEPS, STOP = 8, 3  # 5 batches an epoch: the checkpoint is mid-epoch, the run crosses an epoch


class Recorder(L.Callback):
    """Per-step training losses; a checkpoint at step ``save_at``."""

    def __init__(self, path=None, save_at: int | None = None):
        self.losses, self.path, self.save_at = [], path, save_at

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        if trainer.global_step == self.save_at:
            trainer.save_checkpoint(self.path)


def _fit(family: str, root, recorder: Recorder, ckpt_path=None, seed: int = 0):
    L.seed_everything(seed)
    task = tiny_task(family)
    data = VLDataModule(shapes=ShapesConfig(image_size=16, train_size=40, val_size=8, test_size=8), batch_size=8)
    trainer = L.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, precision="32-true", logger=False,
                        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(root), callbacks=[recorder])
    trainer.fit(task, data, ckpt_path=ckpt_path)
    return task


@pytest.mark.parametrize("family, stop", [("clip", STOP), ("albef", STOP), ("blip", STOP), ("blip2", STOP),
                                          ("albef", 5)])  # 5: after the last batch of epoch 0
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tmp_path, family, stop):
    path = tmp_path / f"step{stop}.ckpt"
    whole = Recorder(path, save_at=stop)
    uninterrupted = _fit(family, tmp_path / "a", whole)
    resumed_losses = Recorder()
    resumed = _fit(family, tmp_path / "b", resumed_losses, ckpt_path=str(path), seed=123)  # other seed: all restored
    assert len(whole.losses) == STEPS and len(resumed_losses.losses) == STEPS - stop
    torch.testing.assert_close(torch.tensor(resumed_losses.losses), torch.tensor(whole.losses[stop:]),
                               atol=1e-6, rtol=0)
    expected = uninterrupted.state_dict()
    for name, value in resumed.state_dict().items():  # weights, momentum copies, queues and pointers, temperature
        torch.testing.assert_close(value, expected[name], atol=1e-6, rtol=0, msg=name)
