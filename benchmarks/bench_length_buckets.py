"""Whole training steps with text passes grouped by length (``text.length_buckets``) against the same step with every text pass padded to the batch's longest caption.

One step of each family as training runs it: forward with every loss (CLIP: InfoNCE;
ALBEF: ITC with queue and distillation, ITM on hard negatives, MLM; BLIP: ITC, ITM,
LM; BLIP-2 stage 1: ITC, ITM, ITG on a frozen tower), backward, AdamW, and for the
momentum family the EMA update and the enqueue. Both sides are the same model (dropout
off, AdamW with the kernel training picks, the random state reset before every call so
both draw the same MLM masks and hard negatives); only ``length_buckets`` differs (4
against 1), so the ratio is what the grouping buys. The sides train the one model in
turn at lr 1e-5, so its weights drift alike for both. Captions are shapes captions (5 to 24 words), padded to the
batch's longest as the data module does.

    python benchmarks/bench_length_buckets.py --json /tmp/buckets.json [--quick]
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from common import adamw, captions, compare, device, run_benchmarks, train_without_dropout

from vlzoo.config import ALBEFConfig, BLIP2Config, BLIPConfig, CLIPConfig, TextConfig, VisionConfig
from vlzoo.losses.contrastive import clip_loss
from vlzoo.models.builders import build_albef, build_blip, build_blip2, build_clip
from vlzoo.tasks.base import set_fused, use_fused_adamw

BUCKETS = 4
SIZES = {  # vision kwargs (timm ViT), image size, BERT kwargs, open_clip text kwargs
    "tiny": (dict(patch_size=8, embed_dim=96, depth=3, num_heads=3), 64,
             dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512,
                  max_position_embeddings=64), dict(width=128, heads=4, layers=3)),
    "base": (dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), 224,
             dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                  max_position_embeddings=64), dict(width=512, heads=8, layers=12)),
}
# (family, size, batch, timed repeats)
RUNS = [("clip", "tiny", 64, 10), ("albef", "tiny", 64, 10), ("blip", "tiny", 64, 10), ("blip2", "tiny", 64, 10),
        ("clip", "base", 8, 2), ("albef", "base", 8, 2), ("blip", "base", 8, 2), ("blip2", "base", 8, 2)]
QUICK_RUNS = [("albef", "tiny", 16, 3), ("blip2", "tiny", 16, 3)]


def config(family: str, size: str) -> tuple[Any, TextConfig]:
    """The family's config at ``size`` and its text config (BLIP-2: the Q-Former's)."""
    vision_kwargs, image, bert, open_clip = SIZES[size]
    vision = VisionConfig(impl="timm", name="vit_tiny_patch16_224", image_size=image, mean=(0.5,) * 3,
                          std=(0.5,) * 3, kwargs=vision_kwargs)
    bert_text = TextConfig(impl="bert", tokenizer="shapes", context_length=40,
                           kwargs={**bert, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    if family == "clip":
        cfg = CLIPConfig(embed_dim=256, vision=vision, text=TextConfig(impl="open_clip", tokenizer="shapes",
                                                                       context_length=40, kwargs=open_clip))
        return cfg, cfg.text
    if family == "blip2":
        qformer = copy.deepcopy(bert_text)
        qformer.kwargs["num_hidden_layers"] = 2 if size == "tiny" else 12
        cfg = BLIP2Config(embed_dim=256, num_queries=8 if size == "tiny" else 32, vision=vision, qformer=qformer)
        return cfg, cfg.qformer
    schema = ALBEFConfig if family == "albef" else BLIPConfig
    extra = {"fusion_layers": bert["num_hidden_layers"] // 2} if family == "albef" else {}
    cfg = schema(embed_dim=256, queue_size=256, vision=vision, text=bert_text, **extra)
    return cfg, cfg.text


def training_loss(family: str, model: torch.nn.Module, x: dict[str, torch.Tensor], with_output: bool = False):
    """The family's training loss of batch ``x`` (and the model's output, ``with_output``)."""
    if family == "clip":
        out = model(x["pixels"], x["input_ids"], x["attention_mask"])
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
    else:
        extra = {"alpha": 0.4} if family in ("albef", "blip") else {}
        out = model(x["pixels"], x["input_ids"], x["attention_mask"], x["index"], **extra)
        loss = out.loss
    return (loss, out) if with_output else loss


def training_step(family: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  x: dict[str, torch.Tensor]) -> torch.Tensor:
    """Forward with every loss, backward, AdamW, then what follows an optimizer step."""
    loss, out = training_loss(family, model, x, with_output=True)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if family in ("albef", "blip"):
        model.momentum_update()
        model.enqueue(out.image_feat_m, out.text_feat_m, out.index)
    return loss.detach()


def training_optimizer(model: torch.nn.Module) -> torch.optim.AdamW:
    """The benchmarks' AdamW (``common.adamw``) with the kernel training picks (fused where torch has one)."""
    optimizer = adamw(model)
    set_fused(optimizer, use_fused_adamw([p for g in optimizer.param_groups for p in g["params"]]))
    return optimizer


def batch_of(rows: int, image_size: int, tokenizer, dev: torch.device) -> dict[str, torch.Tensor]:
    """A training batch of ``rows`` shapes captions (padded to the longest) and fixed random images."""
    pixels = torch.randn(rows, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    return {"pixels": pixels.to(dev), "index": torch.arange(rows, device=dev),
            **{k: v.to(dev) for k, v in tokenizer(captions(rows)).items()}}


def text_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every module that reads ``length_buckets`` (text encoders, momentum twins, Q-Former)."""
    return [m for m in model.modules() if hasattr(m, "length_buckets")]


def run(family: str, size: str, batch: int, repeats: int) -> dict[str, Any]:
    dev = device()
    cfg, _ = config(family, size)
    torch.manual_seed(0)
    model, tokenizer = {"clip": build_clip, "albef": build_albef, "blip": build_blip, "blip2": build_blip2}[family](cfg)
    model = model.to(dev)
    train_without_dropout(model)
    optimizer = training_optimizer(model)
    x = batch_of(batch, cfg.vision.image_size, tokenizer, dev)
    texts = text_modules(model)

    def side(buckets: int):
        def step() -> torch.Tensor:
            for module in texts:
                module.length_buckets = buckets
            torch.manual_seed(0)  # the same MLM masks and hard negatives on both sides, every call
            return training_step(family, model, optimizer, x)
        return step

    result = compare({"vlzoo": side(BUCKETS), "padded": side(1)}, batch, repeats, dev, memory=False)
    mask = x["attention_mask"]
    result.update(family=family, size=size, batch=batch, buckets=BUCKETS, text_tokens=mask.shape[1],
                  real_text_fraction=mask.float().mean().item(),
                  gflop_per_step={s: result[s]["flops"] / 1e9 for s in ("vlzoo", "padded")})
    return result


def main() -> None:
    run_benchmarks(__doc__.split("\n\n")[0], "length_buckets", "padded", RUNS, QUICK_RUNS, run)


if __name__ == "__main__":
    main()
