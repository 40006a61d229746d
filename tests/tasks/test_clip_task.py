import math

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

from vlzoo.config import CLIPConfig, OptimConfig, TextConfig, VisionConfig
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.tasks.base import parameter_groups, warmup_cosine
from vlzoo.tasks.clip import CLIPTask


def tiny_task(**overrides) -> CLIPTask:
    cfg = CLIPConfig(
        embed_dim=32,
        vision=VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3,
                            kwargs=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
        text=TextConfig(impl="open_clip", tokenizer="shapes", context_length=40, kwargs=dict(width=32, heads=2, layers=1)),
        **overrides,
    )
    return CLIPTask(model=cfg, optim=OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.1))


def tiny_data() -> VLDataModule:
    return VLDataModule(shapes=ShapesConfig(image_size=32, train_size=512, val_size=64, test_size=64),
                        batch_size=32, eval_batch_size=64)


class LossRecorder(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def test_no_weight_decay_on_norms_biases_embeddings_and_temperature():
    task = tiny_task()
    decay, no_decay = parameter_groups(task.model, 0.1, 1e-3)
    names = {id(p): n for n, p in task.model.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert "logit_scale" in no_decay_names
    assert "text.tower.token_embedding.weight" in no_decay_names
    assert "vision.model.pos_embed" in no_decay_names and "vision.model.cls_token" in no_decay_names
    assert not any(n.endswith(".bias") or "norm" in n for n in decay_names)
    assert "vision.model.blocks.0.attn.qkv.weight" in decay_names
    assert len(decay_names) + len(no_decay_names) == len(list(task.model.parameters()))


def test_warmup_then_cosine():
    assert warmup_cosine(0, 10, 100, 0.0) == 0.1
    assert warmup_cosine(9, 10, 100, 0.0) == 1.0
    assert math.isclose(warmup_cosine(55, 10, 100, 0.0), 0.5, abs_tol=1e-9)
    assert math.isclose(warmup_cosine(100, 10, 100, 0.1), 0.1)


def test_short_fit_lowers_the_loss_and_clamps_the_logit_scale(tmp_path):
    L.seed_everything(0)
    task = tiny_task(init_logit_scale=math.log(150.0))
    recorder = LossRecorder()
    trainer = L.Trainer(max_steps=40, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[recorder], default_root_dir=tmp_path, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(task, datamodule=tiny_data())
    first, last = sum(recorder.losses[:5]) / 5, sum(recorder.losses[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert task.model.logit_scale.exp().item() <= 100.0 + 1e-4


def test_evaluation_reports_every_metric(tmp_path):
    L.seed_everything(0)
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path)
    metrics = trainer.test(tiny_task(), datamodule=tiny_data(), verbose=False)[0]
    names = {f"test/r{k}_{d}" for k in (1, 5, 10) for d in ("i2t", "t2i")}
    names |= {"test/compositional_acc", "test/zeroshot_acc"}
    assert names <= set(metrics)
    assert all(0.0 <= metrics[n] <= 1.0 for n in names)


def test_siglip_variant_trains(tmp_path):
    task = tiny_task(loss="siglip")
    batch = next(iter(_attached_loader(task)))
    loss = task.training_step(batch, 0)
    assert torch.isfinite(loss) and loss.requires_grad


def _attached_loader(task):
    data = tiny_data()
    data.attach(task.tokenizer, 32, (0.5,) * 3, (0.5,) * 3)
    return data.train_dataloader()


def test_adamw_is_fused_where_torch_has_the_kernel_and_steps_as_the_foreach_one(tmp_path):
    from vlzoo.tasks.base import use_fused_adamw

    params = {}
    for fused in (None, False):
        L.seed_everything(0)
        task = tiny_task()
        task.optim.fused = fused
        trainer = L.Trainer(max_steps=5, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            default_root_dir=tmp_path, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(task, datamodule=tiny_data())
        assert trainer.optimizers[0].defaults["fused"] is (fused is None)  # None: fused on this CPU
        params[fused] = [p.detach().clone() for p in task.model.parameters()]
    for a, b in zip(params[None], params[False], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=5e-5)  # the two kernels round differently
    assert not use_fused_adamw([torch.zeros(2, dtype=torch.long)]) and not use_fused_adamw([])
    assert not use_fused_adamw(params[None], grad_scaler=True)  # fp16: Lightning clips only unfused


def test_a_resumed_optimizer_takes_this_runs_kernel():
    from vlzoo.tasks.base import set_fused

    w = torch.nn.Parameter(torch.ones(3))
    saved = torch.optim.AdamW([w], lr=0.1)  # a checkpoint written before the fused kernel was chosen
    w.grad = torch.ones(3)
    saved.step()
    resumed = torch.optim.AdamW([w], lr=0.1, fused=True)
    resumed.load_state_dict(saved.state_dict())
    assert not resumed.param_groups[0]["fused"]  # the saved flag came back with the state
    set_fused(resumed, True)
    resumed.step()
    assert resumed.param_groups[0]["fused"] and resumed.state[w]["step"].item() == 2
    set_fused(resumed, False)
    resumed.step()
    assert resumed.state[w]["step"].device.type == "cpu" and resumed.state[w]["step"].item() == 3
