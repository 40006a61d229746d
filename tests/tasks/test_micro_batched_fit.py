"""optim.micro_batches through the Trainer: the same weights, queue and EMA as whole
batches, and a clear error where a task cannot split its step."""

import dataclasses
import types

import lightning as L
import pytest
import torch
from tiny_configs import tiny_clip_config, tiny_momentum_config

from vlzoo.config import ALBEFConfig, BLIPConfig, OptimConfig
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.tasks import ALBEFTask, BLIPVQATask, CLIPTask


def task_of(family: str, micro_batches: int):
    torch.manual_seed(0)
    optim = OptimConfig(lr=2e-3, warmup_steps=2, micro_batches=micro_batches)
    if family == "clip":
        return CLIPTask(tiny_clip_config(), optim)
    config = tiny_momentum_config(ALBEFConfig, fusion_layers=1)
    kwargs = {**config.text.kwargs, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return ALBEFTask(dataclasses.replace(config, text=dataclasses.replace(config.text, kwargs=kwargs)), optim)


class GradientRecorder(L.Callback):
    """Every optimizer step's loss and gradients."""

    def __init__(self):
        self.steps = []

    def on_before_optimizer_step(self, trainer, module, optimizer):
        grads = {n: p.grad.clone() for n, p in module.model.named_parameters() if p.grad is not None}
        self.steps.append((float(trainer.callback_metrics["train/loss"]), grads))


def fit(task, tmp_path):
    L.seed_everything(0)
    data = VLDataModule(shapes=ShapesConfig(image_size=16, train_size=64, val_size=8, test_size=8), batch_size=16)
    recorder = GradientRecorder()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[recorder])
    trainer.fit(task, datamodule=data)
    return recorder.steps, {k: v.clone() for k, v in task.model.named_buffers()}


@pytest.mark.parametrize("family", ["albef"])  # CLIP's model-level test suffices; ALBEF adds queue, EMA, alpha
def test_micro_batched_fit_takes_the_whole_batch_steps(tmp_path, family):
    """Each step's loss and gradients (weights themselves drift apart where a gradient is
    0 up to rounding, e.g. attention's key bias, which Adam rescales), and the ALBEF queue."""
    whole, whole_buffers = fit(task_of(family, 1), tmp_path / "whole")
    task = task_of(family, 4)
    micro, buffers = fit(task, tmp_path / "micro")
    assert task.model.micro_batches == 4 and len(micro) == len(whole) == 3
    for step, ((loss, grads), (whole_loss, whole_grads)) in enumerate(zip(micro, whole, strict=True)):
        assert loss == pytest.approx(whole_loss, rel=1e-5, abs=1e-5), step
        assert grads.keys() == whole_grads.keys()
        for name, g in whole_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=f"step {step}: {name}")
    for name, value in whole_buffers.items():  # ALBEF: the queue's features, ids and pointer
        torch.testing.assert_close(buffers[name], value, atol=1e-4, rtol=1e-4, msg=name)


def test_batch_norm_sharding_and_compile_are_refused(tmp_path):
    task = CLIPTask(tiny_clip_config(), OptimConfig(micro_batches=2))
    task.model.vision.extra_norm = torch.nn.BatchNorm1d(4)  # as a ResNet tower has
    with pytest.raises(ValueError, match="batch-normalisation layers in training mode .BatchNorm1d"):
        task.use_micro_batches()
    task.model.vision.extra_norm.eval()  # frozen statistics normalise every part alike
    task.use_micro_batches()
    assert task.model.micro_batches == 2
    task.optim.compile = "eager"
    with pytest.raises(ValueError, match="optim.compile"):
        task.use_micro_batches()
    task.optim.compile = False

    class FSDP2Strategy:  # what vlzoo fit --trainer.strategy fsdp2 runs under
        pass

    task._trainer = types.SimpleNamespace(strategy=FSDP2Strategy())
    with pytest.raises(ValueError, match=r"sharding \(FSDP2Strategy\)"):
        task.use_micro_batches()


def test_a_task_that_cannot_split_its_step_says_so():
    task = BLIPVQATask(tiny_momentum_config(BLIPConfig), OptimConfig(micro_batches=2))
    with pytest.raises(ValueError, match="optim.micro_batches 2: BLIPVQATask"):
        task.use_micro_batches()
    task.optim.micro_batches = 1
    task.use_micro_batches()  # the default is fine everywhere
    for bad in (0, True, 2.0):
        clip = CLIPTask(tiny_clip_config(), OptimConfig(micro_batches=bad))
        with pytest.raises(ValueError, match=f"positive integer, got {bad!r}"):
            clip.use_micro_batches()
