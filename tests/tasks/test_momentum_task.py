"""ALBEF and BLIP tasks: a short fit lowers the loss; EMA/enqueue once per optimizer step;
evaluation reports the two-stage retrieval and caption metrics; checkpoints reload."""

import lightning as L
import pytest
import torch

from vlzoo.config import ALBEFConfig, BLIPConfig, EvalConfig, OptimConfig, TextConfig, VisionConfig
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.families import load_task
from vlzoo.models.generation import GenerationConfig
from vlzoo.tasks import ALBEFTask, BLIPTask


class LossRecorder(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def tiny_model_cfg(schema, **overrides):
    overrides = {"queue_size": 128, **overrides}
    return schema(
        embed_dim=32, momentum=0.9, min_temperature=0.01, alpha_ramp_steps=5,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                            kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
        text=TextConfig(impl="bert", tokenizer="shapes", context_length=40,
                        kwargs=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                    max_position_embeddings=48, initializer_range=0.1)),
        **overrides,
    )


def tiny_task(family: str, **overrides):
    optim = OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.05)
    evaluation = EvalConfig(rerank_k=4, itm_batch_size=64)
    if family == "albef":
        return ALBEFTask(tiny_model_cfg(ALBEFConfig, fusion_layers=1, **overrides), optim, evaluation)
    generation = GenerationConfig(method="greedy", max_length=12, min_length=1)
    return BLIPTask(tiny_model_cfg(BLIPConfig, **overrides), optim, evaluation, generation)


def tiny_data(batch_size=32) -> VLDataModule:
    return VLDataModule(shapes=ShapesConfig(image_size=32, train_size=512, val_size=48, test_size=48),
                        batch_size=batch_size, eval_batch_size=48)


def trainer(tmp_path, **kwargs) -> L.Trainer:
    args = dict(default_root_dir=tmp_path, logger=False, enable_progress_bar=False, enable_model_summary=False,
                num_sanity_val_steps=0)
    return L.Trainer(**{**args, **kwargs})


@pytest.mark.parametrize("family", ["albef", "blip"])
def test_short_fit_lowers_the_loss_and_reports_metrics(tmp_path, family):
    L.seed_everything(0)
    task, recorder = tiny_task(family), LossRecorder()
    fit = trainer(tmp_path, max_steps=60, val_check_interval=60, check_val_every_n_epoch=None, callbacks=[recorder])
    fit.fit(task, datamodule=tiny_data())
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first - 0.25, (first, last)
    assert 0.01 <= float(task.model.temp) <= 0.5
    metrics = fit.test(task, datamodule=tiny_data(), verbose=False)[0]
    names = {f"test/{m}" for m in ("r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i",
                                     "compositional_acc", "zeroshot_acc", "itc_r1_i2t", "itc_r1_t2i")}
    if family == "blip":
        names |= {"test/bleu4", "test/cider"}
    assert names <= set(metrics), names - set(metrics)
    assert all(0.0 <= metrics[n] <= 1.0 for n in names if "cider" not in n)
    path = tmp_path / "task.ckpt"
    fit.save_checkpoint(path)
    loaded = load_task(path)
    assert type(loaded) is type(task)
    for (name, a), b in zip(task.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # queues and momentum copies included
    assert "model.queue.image" in loaded.state_dict() and "model.vision_m.model.cls_token" in loaded.state_dict()


def test_ema_and_enqueue_once_per_optimizer_step_with_accumulation(tmp_path):
    L.seed_everything(0)
    task = tiny_task("albef")
    twin_before = task.model.text_proj_m.weight.clone()
    fit = trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, limit_val_batches=0)
    fit.fit(task, datamodule=tiny_data(batch_size=16))
    assert fit.global_step == 3
    assert int(task.model.queue.ptr) == 3 * 2 * 16  # both micro-batches of each step enqueued
    assert (task.model.queue.index[: 3 * 2 * 16] >= 0).all() and (task.model.queue.index[3 * 2 * 16 :] == -1).all()
    assert not torch.equal(task.model.text_proj_m.weight, twin_before)


def test_queue_not_divisible_by_global_batch_is_a_clear_error(tmp_path):
    task = tiny_task("blip", queue_size=100)
    with pytest.raises(ValueError, match="queue_size 100 is not divisible by the global batch 32"):
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(task, datamodule=tiny_data())


def test_blip_prompt_is_inserted_after_cls_for_the_decoder_only():
    task = tiny_task("blip")
    batch = task.tokenizer(["a red circle"])
    ids, mask, _ = task.model.caption_labels(batch["input_ids"], batch["attention_mask"])
    words = task.tokenizer.decode(ids[0])
    assert words == "a picture of a red circle"
    assert mask.sum() == batch["attention_mask"].sum() + 3
    seen = []  # ITC/ITM see the bare caption: every text-encoder pass gets the unprompted ids
    task.model.text.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    batch = task.tokenizer(["a red circle", "two small blue squares"])
    task.training_step({"pixel_values": torch.zeros(2, 3, 32, 32), "index": torch.arange(2), **batch}, 0)
    assert torch.equal(seen[0], batch["input_ids"])
    assert seen and all(ids.shape[1] == batch["input_ids"].shape[1] for ids in seen)
