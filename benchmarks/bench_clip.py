"""CLIP training step, vlzoo vs open_clip, at identical configurations and weights.

One step = forward of both towers, the symmetric InfoNCE loss (vlzoo's ``clip_loss``,
open_clip's ``ClipLoss``), backward, AdamW, logit-scale clamp. open_clip's model is
built from its model config; vlzoo's is converted from it
(``clip_config_from_open_clip`` + ``build_converted_clip``), so both hold the same
weights and run open_clip's tower modules. The batch is the same images and captions,
each side tokenized by its own tokenizer: open_clip pads every caption to the context
length (77), vlzoo to the batch's longest caption. ``vlzoo_pad77`` (tiny fp32 only)
feeds vlzoo open_clip's 77-token ids: the control that isolates the padding.

    python benchmarks/bench_clip.py --json /tmp/clip.json [--quick]
"""

from __future__ import annotations

import math
from typing import Any

import open_clip
import torch
from common import (
    adamw,
    autocast,
    captions,
    compare,
    device,
    parameter_mib,
    ratio,
    run_benchmarks,
)
from open_clip.loss import ClipLoss

from vlzoo.hub.convert.clip import (
    build_converted_clip,
    clip_config_from_open_clip,
    convert_open_clip_state,
)
from vlzoo.losses import clip_loss

TINY = {"embed_dim": 128,
        "vision_cfg": {"image_size": 64, "layers": 3, "width": 128, "head_width": 32, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 3}}
# (config, dtype, batch, timed repeats, control run)
RUNS = [("tiny", "fp32", 32, 11, True), ("tiny", "bf16", 16, 3, False),
        ("ViT-B-32", "fp32", 8, 3, False), ("ViT-B-32", "bf16", 1, 1, False)]  # bf16 is slow on AVX2 CPUs
QUICK_RUNS = [("tiny", "fp32", 16, 3, True), ("tiny", "bf16", 8, 1, False)]


def model_config(name: str) -> dict[str, Any]:
    return TINY if name == "tiny" else open_clip.get_model_config(name)


def build_pair(cfg: dict[str, Any]):
    """(open_clip CLIP, vlzoo CLIP with the same weights, vlzoo's tokenizer), train mode."""
    torch.manual_seed(0)
    peer = open_clip.model.CLIP(**cfg)
    parts = build_converted_clip(clip_config_from_open_clip(cfg), convert_open_clip_state(peer.state_dict()),
                                 source="open_clip model")
    return peer.train(), parts.model.train(), parts.tokenizer


def vlzoo_step(model, opt, dtype: str, dev, pixels, ids, mask):
    """One vlzoo training step; returns the loss."""
    with autocast(dtype, dev):
        out = model(pixels, ids, mask)
        loss = clip_loss(out.image_embeds, out.text_embeds, out.logit_scale)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    model.clamp_logit_scale()
    return loss.detach()


def open_clip_step(model, opt, loss_fn, dtype: str, dev, pixels, ids):
    """One open_clip training step (as its training loop: loss, backward, step, clamp)."""
    with autocast(dtype, dev):
        image_features, text_features, logit_scale = model(pixels, ids)
        loss = loss_fn(image_features, text_features, logit_scale)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    return loss.detach()


def run(name: str, dtype: str, batch: int, repeats: int, control: bool) -> dict[str, Any]:
    """Both sides (and the padding control) on one batch; figures per side and the ratio."""
    dev = device()
    cfg = model_config(name)
    peer, ours, tokenizer = build_pair(cfg)
    peer, ours = peer.to(dev), ours.to(dev)
    size = cfg["vision_cfg"]["image_size"]
    texts = captions(batch)
    pixels = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(dev)
    peer_ids = open_clip.tokenize(texts, cfg["text_cfg"]["context_length"]).to(dev)
    tokens = {k: v.to(dev) for k, v in tokenizer(texts).items()}
    opts = {"vlzoo": adamw(ours), "open_clip": adamw(peer)}
    loss_fn = ClipLoss()
    sides = {
        "vlzoo": lambda: vlzoo_step(ours, opts["vlzoo"], dtype, dev, pixels, tokens["input_ids"],
                                    tokens["attention_mask"]),
        "open_clip": lambda: open_clip_step(peer, opts["open_clip"], loss_fn, dtype, dev, pixels, peer_ids),
    }
    if control:
        sides["vlzoo_pad77"] = lambda: vlzoo_step(ours, opts["vlzoo"], dtype, dev, pixels, peer_ids,
                                                  (peer_ids != 0).long())
    result = compare(sides, batch, repeats, dev, memory={"vlzoo", "open_clip"})
    result.update(config=name, dtype=dtype, batch=batch, parameter_mib=parameter_mib(ours),
                  text_tokens={"vlzoo": tokens["input_ids"].shape[1], "open_clip": peer_ids.shape[1]},
                  first_loss_abs_diff=abs(result["vlzoo"]["output"] - result["open_clip"]["output"]))
    if control:
        result["control_ratio"] = _control_ratio(result)
    return result


def _control_ratio(result: dict[str, Any]) -> dict[str, float]:
    """vlzoo at 77 tokens / open_clip: identical modules and inputs, so noise around 1."""
    return ratio(result["vlzoo_pad77"]["seconds"], result["open_clip"]["seconds"])


def main() -> None:
    run_benchmarks(__doc__.split("\n\n")[0], "clip_train", "open_clip", RUNS, QUICK_RUNS, run)


if __name__ == "__main__":
    main()
