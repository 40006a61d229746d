"""Text passes grouped by length (``text.length_buckets``): every family's training
losses and gradients equal those of the padded passes, for fewer FLOPs."""

import copy

import pytest
import torch
from tiny_configs import tiny_blip2_config, tiny_clip_config, tiny_momentum_config

from vlzoo.budget import flop_counter_with_attention
from vlzoo.config import ALBEFConfig, BLIPConfig
from vlzoo.losses.contrastive import clip_loss
from vlzoo.models.builders import build_albef, build_blip, build_blip2, build_clip

TEXTS = ["a red circle", "a small blue square above a green star left of a red cross", "a purple cross",
         "two yellow circles and one tiny grey triangle", "a star", "a green square below a blue circle"]


def configs():
    return {"clip": (build_clip, tiny_clip_config(), "text"),
            "albef": (build_albef, tiny_momentum_config(ALBEFConfig, fusion_layers=1), "text"),
            "blip": (build_blip, tiny_momentum_config(BLIPConfig), "text"),
            "blip2": (build_blip2, tiny_blip2_config(), "qformer")}


def losses_and_grads(family: str, buckets: int):
    build, cfg, text = configs()[family]
    cfg = copy.deepcopy(cfg)
    getattr(cfg, text).length_buckets = buckets
    torch.manual_seed(0)
    model, tok = build(cfg)
    model.eval()  # dropout off: its random masks are drawn per call
    tokens = tok(TEXTS)
    images = torch.randn(len(TEXTS), 3, 16, 16, generator=torch.Generator().manual_seed(0))
    index = torch.arange(len(TEXTS))
    torch.manual_seed(1)  # the same MLM masks and hard negatives
    with flop_counter_with_attention() as flops:  # attention counted on CPU too
        if family == "clip":
            out = model(images, tokens["input_ids"], tokens["attention_mask"])
            losses = {"itc": clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)}
        else:
            extra = {"alpha": 0.4} if family != "blip2" else {}
            losses = model(images, tokens["input_ids"], tokens["attention_mask"], index, **extra).losses
        sum(losses.values()).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in losses.items()}, grads, flops.get_total_flops()


@pytest.mark.parametrize("family", ["clip", "albef", "blip", "blip2"])
def test_every_family_trains_the_same_with_fewer_flops(family):
    padded, padded_grads, padded_flops = losses_and_grads(family, 1)
    bucketed, grads, flops = losses_and_grads(family, 3)
    assert bucketed == pytest.approx(padded, rel=1e-5, abs=1e-6)
    assert grads.keys() == padded_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, padded_grads[name], rtol=1e-4, atol=1e-5, msg=name)
    assert flops < padded_flops
