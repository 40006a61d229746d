"""Reading Hugging Face model directories: weights (single file or sharded) and the
dispatch from ``config.json``'s ``model_type`` to the right converter."""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from vlzoo.hub.convert import LoadedParts
from vlzoo.hub.weights import CheckpointKeyError, load_state_dict_file
from vlzoo.utils import read_json_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
MODEL_TYPES = ("clip", "blip", "blip-2")


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


def hf_weights(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face model directory: ``model.safetensors``,
    ``pytorch_model.bin`` (read with ``weights_only=True``), or the shards an
    ``*.index.json`` lists."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return load_state_dict_file(directory / name)
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            weight_map = read_json_file(index, "a weights index with a 'weight_map' object").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object (expected shard names per tensor)")
            shards = sorted(set(weight_map.values()))
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(load_state_dict_file(directory / shard))
            return state
    raise FileNotFoundError(f"{directory}: no weights (looked for {WEIGHT_FILES + INDEX_FILES})")


def read_hf_config(directory: str | Path) -> dict:
    """``config.json`` of a Hugging Face model directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return read_json_file(path, "a transformers config object with a 'model_type'")


def load_hf_dir(directory: str | Path) -> LoadedParts:
    """A local transformers directory of model_type ``clip``, ``blip`` or ``blip-2``; a
    config field or tensor the converter needs and does not find is an error naming the
    directory and the key."""
    directory = Path(directory)
    hf_config = read_hf_config(directory)
    try:
        return _load_hf_model_type(directory, hf_config)
    except CheckpointKeyError:
        raise
    except KeyError as err:
        raise ValueError(f"{directory}: the config.json or weights lack {err.args[0]!r}, which a transformers "
                         f"{hf_config.get('model_type')!r} model has") from err


def _load_hf_model_type(directory: Path, hf_config: dict) -> LoadedParts:
    model_type = hf_config.get("model_type")
    if model_type == "clip":
        from vlzoo.hub.convert.clip import load_hf_clip

        return load_hf_clip(directory, hf_config)
    if model_type == "blip":
        from vlzoo.hub.convert.hf_blip import load_hf_blip

        return load_hf_blip(directory, hf_config)
    if model_type == "blip-2":
        from vlzoo.hub.convert.hf_blip2 import load_hf_blip2

        return load_hf_blip2(directory, hf_config)
    raise ValueError(f"{directory / 'config.json'}: model_type {model_type!r} is not supported; "
                     f"expected one of {MODEL_TYPES}")
