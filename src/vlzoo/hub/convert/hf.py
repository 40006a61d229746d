"""What the transformers converters share: key rules for transformers' ViT, timm's MLP
ratio, and (from :mod:`vlzoo.weights`) reading a directory's weights and config. Which
converter reads a directory is the family registry's answer (``Family.hf_model_type``)."""

from __future__ import annotations

from vlzoo.weights import (  # noqa: F401 - hf_weights, read_hf_config: the converters' entry points
    INDEX_FILES,
    WEIGHT_FILES,
    CheckpointKeyError,
    hf_weights,
    read_hf_config,
)


def timm_mlp_ratio(width: int, hidden: int) -> float:
    """The ``mlp_ratio`` for which timm's (and open_clip's) ``int(width * mlp_ratio)`` is ``hidden``
    (``hidden / width`` does not always survive the float round trip: width 88, hidden
    120 gives 119)."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def hf_vit_rules(tower: str, post_layernorm: str) -> list[tuple[str, str]]:
    """Key rules from transformers' BLIP / BLIP-2 vision model (``vision_model.*``) to a
    timm ``VisionTransformer`` at ``tower`` (e.g. ``vision.model``); ``post_layernorm``
    names where that final LayerNorm goes (timm's ``norm``, or BLIP-2's ``ln_vision``)."""
    layer = r"vision_model\.encoder\.layers\.(\d+)"
    return [
        (r"vision_model\.embeddings\.class_embedding", f"{tower}.cls_token"),
        (r"vision_model\.embeddings\.position_embedding", f"{tower}.pos_embed"),
        (r"vision_model\.embeddings\.patch_embedding\.(weight|bias)", rf"{tower}.patch_embed.proj.\1"),
        (rf"{layer}\.self_attn\.qkv\.(weight|bias)", rf"{tower}.blocks.\1.attn.qkv.\2"),
        (rf"{layer}\.self_attn\.projection\.(weight|bias)", rf"{tower}.blocks.\1.attn.proj.\2"),
        (rf"{layer}\.layer_norm(1|2)\.(weight|bias)", rf"{tower}.blocks.\1.norm\2.\3"),
        (rf"{layer}\.mlp\.fc(1|2)\.(weight|bias)", rf"{tower}.blocks.\1.mlp.fc\2.\3"),
        (r"vision_model\.post_layernorm\.(weight|bias)", rf"{post_layernorm}.\1"),
    ]
