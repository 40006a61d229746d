"""Feature-cached micro-batches give every family the whole batch's losses and gradients
(1e-5): CLIP (InfoNCE, SigLIP), ALBEF and BLIP (queue, distillation, hard negatives,
MLM / LM), BLIP-2 stage 1 (ITC, ITM, ITG)."""

import dataclasses

import pytest
import torch
from tiny_configs import tiny_blip2_config, tiny_clip_config, tiny_momentum_config

from vlzoo.config import ALBEFConfig, BLIPConfig
from vlzoo.losses import clip_loss, siglip_loss
from vlzoo.models.builders import build_albef, build_blip, build_blip2, build_clip

BATCH = 8


def without_dropout(config):
    text = config.text
    kwargs = {**text.kwargs, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}
    return dataclasses.replace(config, text=dataclasses.replace(text, kwargs=kwargs))


def build(family: str):
    torch.manual_seed(0)
    if family.startswith("clip"):
        config = dataclasses.replace(tiny_clip_config(), loss=family.split("-")[1],
                                     init_logit_bias=-10.0 if family.endswith("siglip") else None)
        return build_clip(config)
    if family.startswith("albef"):
        model, tokenizer = build_albef(without_dropout(tiny_momentum_config(ALBEFConfig, fusion_layers=1)))
        for module in model.modules():  # albef-buckets: text passes grouped by length inside each part
            if hasattr(module, "length_buckets"):
                module.length_buckets = 2 if family.endswith("buckets") else 1
        return model, tokenizer
    if family == "blip":
        return build_blip(without_dropout(tiny_momentum_config(BLIPConfig)))
    return build_blip2(tiny_blip2_config())


def batch_of(tokenizer):
    g = torch.Generator().manual_seed(3)
    words = ["a red circle", "a small blue square left of a green star", "a yellow triangle", "a purple cross"]
    tokens = tokenizer([words[i % 4] + " above a diamond" * (i % 3) for i in range(BATCH)])
    index = torch.tensor([0, 1, 2, 3, 4, 5, 2, 7])  # two captions of image 2: ITC's soft positives
    return torch.randn(BATCH, 3, 16, 16, generator=g), tokens["input_ids"], tokens["attention_mask"], index


def losses(family: str, model, batch) -> dict[str, torch.Tensor]:
    images, ids, mask, index = batch
    if family.startswith("clip"):
        out = model(images, ids, mask)
        if family.endswith("siglip"):
            return {"siglip": siglip_loss(out.image_embeds, out.text_embeds, out.logit_scale, out.logit_bias)}
        return {"infonce": clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)}
    if family == "blip2":
        return model(images, ids, mask, index).losses
    out = model(images, ids, mask, index, alpha=0.4)  # albef, albef-buckets, blip
    return {**out.losses, "image_feat_m": out.image_feat_m.sum(), "text_feat_m": out.text_feat_m.sum()}


def step(family: str, model, batch, micro_batches: int):
    model.micro_batches = micro_batches
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same MLM masks and hard negatives
    values = losses(family, model, batch)
    sum(v for k, v in values.items() if not k.endswith("_m")).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in values.items()}, grads


@pytest.mark.parametrize("family", ["clip-infonce", "clip-siglip", "albef", "albef-buckets", "blip", "blip2"])
def test_micro_batches_give_the_whole_batchs_losses_and_gradients(family):
    model, tokenizer = build(family)
    batch = batch_of(tokenizer)
    whole, whole_grads = step(family, model, batch, 1)
    assert whole_grads, "nothing trained"
    for k in (3,):  # unequal parts: 3, 3, 2 rows
        values, grads = step(family, model, batch, k)
        assert values.keys() == whole.keys()
        for name in whole:
            torch.testing.assert_close(values[name], whole[name], atol=1e-5, rtol=1e-5, msg=f"{name}, k={k}")
        assert grads.keys() == whole_grads.keys()
        for name, g in whole_grads.items():
            torch.testing.assert_close(grads[name], g, atol=1e-5, rtol=1e-4, msg=f"{name}, k={k}")
