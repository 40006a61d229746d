"""torch.compile of every family's training step: one graph (``fullgraph=True``, no
break: no data-dependent branch or shape), the eager losses and gradients; and the
``optim.compile`` option of every task. Dynamo's capture decides graph breaks, so the
tests compile with the ``eager`` backend (the ``aot_eager`` backend, which also traces the
backward, passed the same tests at commit 3d572f8 but takes three times as long)."""

import lightning as L
import pytest
import torch
from tiny_configs import tiny_blip2_config, tiny_clip_config, tiny_momentum_config, tiny_task

from vlzoo.config import ALBEFConfig, BLIPConfig
from vlzoo.data.datamodule import ShapesConfig, VLDataModule
from vlzoo.losses.contrastive import clip_loss
from vlzoo.models.builders import build_albef, build_blip, build_blip2, build_clip

BUILDS = {"clip": (build_clip, tiny_clip_config), "albef": (build_albef, lambda: tiny_momentum_config(ALBEFConfig, fusion_layers=1)),
          "blip": (build_blip, lambda: tiny_momentum_config(BLIPConfig)), "blip2": (build_blip2, tiny_blip2_config)}
TEXTS = ["a red circle", "a small blue square above a green star", "a purple cross", "two yellow circles"]
SHORTER = ["a red circle", "a blue square", "a purple cross", "two circles"]  # another length: a dynamic shape


def _step_and_inputs(family: str):
    build, config = BUILDS[family]
    torch.manual_seed(0)
    model, tokenizer = build(config())
    pixels, index = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 0])
    tokens = [tokenizer(texts) for texts in (TEXTS, SHORTER, TEXTS[::-1])]
    batches = [(pixels, t["input_ids"], t["attention_mask"], index) for t in tokens]

    def step(pixels, ids, mask, index):
        if family == "clip":
            out = model(pixels, ids, mask)
            return clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
        extra = {"alpha": 0.4} if family != "blip2" else {}
        return model(pixels, ids, mask, index, **extra).loss  # index: two captions of sample 0 share a positive

    return model, step, batches


def _loss_and_grads(model, step, inputs):
    torch.manual_seed(2)  # the same MLM masks and hard negatives on both sides
    loss = step(*inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.slow
@pytest.mark.parametrize("family", list(BUILDS))
def test_every_family_step_compiles_to_one_graph_with_the_eager_result(family):
    model, step, batches = _step_and_inputs(family)
    compiled = torch.compile(step, fullgraph=True, backend="eager")  # dynamo capture; a graph break raises
    for inputs in batches:  # the second text length recompiles with a dynamic length
        eager_loss, eager_grads = _loss_and_grads(model, step, inputs)
        loss, grads = _loss_and_grads(model, compiled, inputs)
        torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
        assert grads.keys() == eager_grads.keys()
        for name, grad in grads.items():
            torch.testing.assert_close(grad, eager_grads[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("family", ["albef", "blip2"])  # BLIP-2 trains through forward_frozen, not forward
def test_the_compile_option_compiles_what_training_calls_and_keeps_checkpoint_keys(tmp_path, family):
    L.seed_everything(0)
    task = tiny_task(family)
    keys = set(task.state_dict())
    task.optim.compile = "eager"  # dynamo capture without a compiler: the wiring, quickly
    trainer = L.Trainer(max_steps=3, accelerator="cpu", devices=1, logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    data = VLDataModule(shapes=ShapesConfig(image_size=16, train_size=32, val_size=8, test_size=8), batch_size=8)
    trainer.fit(task, data)
    for name in task.training_methods:
        compiled = task.model._compiled_call_impl if name == "forward" else vars(task.model).get(name)
        assert compiled is not None and hasattr(compiled, "_torchdynamo_orig_callable"), name
    assert set(task.state_dict()) == keys
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
