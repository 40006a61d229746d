"""Loading weights safely: safetensors, or ``torch.load(weights_only=True)``; strict keys."""

from __future__ import annotations

import pickle
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor, nn

from vlzoo.utils import read_json_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


class CheckpointKeyError(KeyError):
    """A state dict does not match a module: names the missing and unexpected keys."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0])


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """Tensors from ``.safetensors``, or a PyTorch file without unpickling arbitrary objects."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except SafetensorError as err:
            raise ValueError(f"{path}: not a complete safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"{path}: refused to load, the file holds Python objects other than tensors "
            f"(unpickling it could run code). Convert it to safetensors. Detail: {err}"
        ) from err
    except (RuntimeError, OSError, EOFError) as err:  # truncated or not a PyTorch file
        raise ValueError(f"{path}: not a readable PyTorch weights file ({err})") from err
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(obj).__name__}")
    return obj


def refuse_non_finite(state: dict[str, Tensor], source: str) -> None:
    """A ValueError naming the tensors of ``state`` that hold NaN or infinity (a corrupt
    or diverged checkpoint would otherwise load silently)."""
    bad = [name for name, t in state.items()
           if isinstance(t, Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        raise ValueError(f"{source}: {len(bad)} tensor(s) hold NaN or infinite values: {bad[:10]}"
                         f"{' ...' if len(bad) > 10 else ''}; refusing to load them")


def load_strict(
    module: nn.Module,
    state: dict[str, Tensor],
    source: str = "state dict",
    allow_missing: Iterable[str] = (),
) -> None:
    """Load ``state`` into ``module``; any missing or unexpected key is an error naming it,
    and so is a tensor holding NaN or infinity.

    ``allow_missing``: key substrings that may be missing (e.g. randomly initialised
    cross-attention when loading a text-only BERT).
    """
    expected = set(module.state_dict())
    allow = tuple(allow_missing)
    missing = sorted(k for k in expected - set(state) if not any(a in k for a in allow))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointKeyError(
            f"{source} does not match {type(module).__name__}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )
    own = module.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{source}: shape mismatch (checkpoint vs model) for {wrong[:10]}")
    refuse_non_finite(state, source)
    module.load_state_dict(state, strict=False)


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
