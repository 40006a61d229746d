"""Vision encoders: timm ViT/EVA by name, open_clip towers (ViT and ModifiedResNet)."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor

from vlzoo.backbones.base import EncoderOutput, VisionEncoder, resolve_layer


class TimmVisionEncoder(VisionEncoder):
    """Any timm ViT/EVA (``timm.create_model(name, num_classes=0, **kwargs)``)."""

    def __init__(
        self,
        name: str,
        image_size: int = 224,
        output_layer: int = -1,
        patch_dropout: float = 0.0,
        norm_eps: float | None = None,
        **kwargs: Any,
    ):
        """``norm_eps``: epsilon of every LayerNorm (timm's default is 1e-6; BLIP's
        and CLIP's towers use 1e-5). Other ``kwargs`` go to ``timm.create_model``."""
        super().__init__()
        import timm

        kwargs.setdefault("pretrained", False)
        if norm_eps is not None:
            kwargs["norm_layer"] = partial(torch.nn.LayerNorm, eps=norm_eps)
        if patch_dropout:
            kwargs["patch_drop_rate"] = patch_dropout
        self.model = timm.create_model(name, num_classes=0, img_size=image_size, **kwargs)
        if not hasattr(self.model, "blocks"):
            raise ValueError(f"timm model {name!r} is not a ViT/EVA-style model with .blocks")
        self.image_size = image_size
        self.output_layer = output_layer
        self.norm_eps = norm_eps
        self.width = self.pooled_width = self.model.num_features
        self._blocks_to_run = resolve_layer(output_layer, len(self.model.blocks))

    def forward(self, pixel_values: Tensor) -> EncoderOutput:
        """(B, 3, H, W) -> tokens (B, 1+N, D), pooled (B, D)."""
        if self._blocks_to_run == len(self.model.blocks):
            tokens = self.model.forward_features(pixel_values)
            return EncoderOutput(tokens, self.model.forward_head(tokens, pre_logits=True))
        (spatial, prefix), = self.model.forward_intermediates(
            pixel_values, indices=[self._blocks_to_run - 1], norm=False, output_fmt="NLC",
            intermediates_only=True, return_prefix_tokens=True, stop_early=True,
        )
        tokens = torch.cat([prefix, spatial], dim=1) if prefix is not None else spatial
        return EncoderOutput(tokens, tokens[:, 0])

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        extra = {f"model.{n}" for n in getattr(self.model, "no_weight_decay", lambda: set())()}
        return super().no_weight_decay() | extra


class OpenCLIPVisionEncoder(VisionEncoder):
    """An open_clip visual tower: VisionTransformer, or ModifiedResNet with attention pooling.

    ``pooled`` is the tower's own projected embedding (``embed_dim`` wide), so the state
    dict under ``tower.`` matches open_clip's ``visual.`` keys one to one.
    """

    pooled_is_projected = True

    def __init__(
        self,
        embed_dim: int,
        name: str | None = None,
        image_size: int = 224,
        output_layer: int = -1,
        patch_dropout: float = 0.0,
        quick_gelu: bool = False,
        **overrides: Any,
    ):
        super().__init__()
        from open_clip.modified_resnet import ModifiedResNet  # heavy: open_clip only when used

        cfg = _open_clip_tower_cfg(name, "vision_cfg")
        cfg.update(overrides, image_size=image_size, patch_dropout=patch_dropout)
        _check_vision_cfg(cfg, output_layer)
        self.tower = open_clip_tower("vision", embed_dim, cfg, quick_gelu)
        self.is_resnet = isinstance(self.tower, ModifiedResNet)
        if self.is_resnet and output_layer != -1:
            raise ValueError("open_clip ModifiedResNet towers only support output_layer=-1")
        self.image_size = image_size
        self.output_layer = output_layer
        self.pooled_width = embed_dim
        if self.is_resnet:
            self.width = self.tower.attnpool.k_proj.in_features
            self._blocks_to_run = 0
        else:  # with an attentional pooler the tokens are its queries, embed_dim wide
            self.width = embed_dim if self.tower.attn_pool is not None else self.tower.transformer.width
            self._blocks_to_run = resolve_layer(output_layer, len(self.tower.transformer.resblocks))
        self.grad_checkpointing = False

    def forward(self, pixel_values: Tensor) -> EncoderOutput:
        """(B, 3, H, W) -> tokens (B, 1+N, width) [ViT] or (B, h*w, C) [ResNet]; pooled (B, E)."""
        t = self.tower
        if self.is_resnet:
            x = t.layer4(t.layer3(t.layer2(t.layer1(t.stem(pixel_values)))))  # (B, C, h, w)
            return EncoderOutput(x.flatten(2).transpose(1, 2), t.attnpool(x))
        last = self._blocks_to_run == len(t.transformer.resblocks)
        out = t.forward_intermediates(pixel_values, indices=[self._blocks_to_run - 1], stop_early=True,
                                      normalize_intermediates=last and t.attn_pool is None,
                                      intermediates_only=not last, output_fmt="NLC", output_extra_tokens=True)
        x = torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)  # (B, 1+N, W)
        if not last:
            return EncoderOutput(x, x[:, 0])
        if t.attn_pool is not None:  # open_clip's (CoCa) order: attention pool, then ln_post
            x = t.ln_post(t.attn_pool(x))  # (B, queries, embed_dim)
        return EncoderOutput(x, out["image_features"])  # tokens after ln_post; pooled as open_clip, projected

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        self.tower.set_grad_checkpointing(enable)


def _check_vision_cfg(cfg: dict[str, Any], output_layer: int) -> None:
    """Reject open_clip vision-tower options this encoder would not reproduce."""
    if cfg.get("timm_model_name"):
        raise ValueError(f"open_clip timm towers (vision_cfg.timm_model_name={cfg['timm_model_name']!r}) are not "
                         "supported; use vision impl timm with that model name instead")
    pool = cfg.get("attentional_pool", False)
    if isinstance(pool, str):
        raise ValueError(f"open_clip vision_cfg.attentional_pool={pool!r} is not supported (only true/false)")
    if pool and output_layer != -1:
        raise ValueError("open_clip towers with vision_cfg.attentional_pool only support output_layer=-1")
    if cfg.get("pool_type", "tok") == "none":
        raise ValueError("open_clip vision_cfg.pool_type 'none' is not supported (expected 'tok' or 'avg')")


# the smallest tower open_clip builds: stands in for the tower of a CLIP that is not used
_UNUSED_TOWER = {
    "vision": {"image_size": 8, "patch_size": 8, "width": 8, "layers": 1, "head_width": 8},
    "text": {"context_length": 2, "vocab_size": 2, "width": 8, "heads": 1, "layers": 1},
}


def open_clip_tower(kind: str, embed_dim: int, cfg: dict[str, Any], quick_gelu: bool) -> torch.nn.Module:
    """open_clip's ``vision`` (``VisionTransformer`` / ``ModifiedResNet``) or ``text``
    (``TextTransformer``) tower for ``cfg`` (``CLIPVisionCfg`` / ``CLIPTextCfg`` fields),
    through its public ``create_model`` (the other tower is a stand-in of a few hundred
    parameters, dropped)."""
    import open_clip  # heavy: open_clip only when used

    other = "text" if kind == "vision" else "vision"
    with _quiet_random_init():
        model = open_clip.create_model("ViT-B-32", pretrained=None, force_custom_text=True, embed_dim=embed_dim,
                                       quick_gelu=quick_gelu, **{f"{kind}_cfg": cfg, f"{other}_cfg": _UNUSED_TOWER[other]})
    return model.visual if kind == "vision" else model.text


class _NoRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()


@contextmanager
def _quiet_random_init():
    """Without open_clip's notice that a model it built has random weights (vlzoo builds
    towers at random on purpose; the weights follow)."""
    notice = _NoRandomInitNotice()
    logging.getLogger().addFilter(notice)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(notice)


def _open_clip_tower_cfg(name: str | None, key: str) -> dict[str, Any]:
    """The ``vision_cfg``/``text_cfg`` of an open_clip model config, or {}."""
    if name is None:
        return {}
    from open_clip import get_model_config

    model_cfg = get_model_config(name)
    if model_cfg is None:
        raise ValueError(f"open_clip has no model config named {name!r}")
    return dict(model_cfg[key])
