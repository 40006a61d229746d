"""Loading weights safely: safetensors, or ``torch.load(weights_only=True)``; strict keys."""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
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
    return read_torch_file(path)


def read_torch_file(path: Path, mmap: bool = False) -> dict[str, Tensor]:
    """A PyTorch weights file read with ``weights_only=True`` (``mmap``: tensors stay in
    the file's pages until used); a ``{"state_dict": ...}`` wrapper is unwrapped."""
    try:
        obj = _torch_load(path, mmap)
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


def _torch_load(path: Path, mmap: bool):
    """``torch.load(weights_only=True)``, memory-mapped when asked and the file allows it
    (the legacy non-zip format cannot be mapped: read whole)."""
    if mmap and not zipfile.is_zipfile(path):
        mmap = False
    return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)


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
    own = module.state_dict()
    allow = tuple(allow_missing)
    missing = [k for k in set(own) - set(state) if not any(a in k for a in allow)]
    refuse_mismatch(module, missing, set(state) - set(own), source)
    refuse_wrong_shapes({k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state.items()}, source)
    refuse_non_finite(state, source)
    module.load_state_dict(state, strict=False)


def refuse_mismatch(module: nn.Module, missing: Iterable[str], unexpected: Iterable[str], source: str) -> None:
    """A :class:`CheckpointKeyError` naming the missing and unexpected keys, if any."""
    missing, unexpected = sorted(missing), sorted(unexpected)
    if missing or unexpected:
        raise CheckpointKeyError(
            f"{source} does not match {type(module).__name__}: "
            f"missing keys {missing[:20]}{' ...' if len(missing) > 20 else ''} ({len(missing)}), "
            f"unexpected keys {unexpected[:20]}{' ...' if len(unexpected) > 20 else ''} ({len(unexpected)})"
        )


def refuse_wrong_shapes(shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]], source: str) -> None:
    """A ValueError naming the keys whose (checkpoint, model) shapes differ."""
    wrong = [f"{k}: {theirs} vs {ours}" for k, (theirs, ours) in shapes.items() if theirs != ours]
    if wrong:
        raise ValueError(f"{source}: shape mismatch (checkpoint vs model) for {wrong[:10]}")


def hf_weights(directory: str | Path) -> dict[str, Tensor]:
    """Every tensor of a Hugging Face model directory: ``model.safetensors``,
    ``pytorch_model.bin`` (read with ``weights_only=True``), or the shards an
    ``*.index.json`` lists."""
    state: dict[str, Tensor] = {}
    for path in hf_weight_files(directory):
        state.update(load_state_dict_file(path))
    return state


def hf_weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a Hugging Face model directory: ``model.safetensors``,
    ``pytorch_model.bin``, or the shards an ``*.index.json`` lists."""
    directory = Path(directory)
    for name in WEIGHT_FILES:
        if (directory / name).is_file():
            return [directory / name]
    for name in INDEX_FILES:
        index = directory / name
        if index.is_file():
            weight_map = read_json_file(index, "a weights index with a 'weight_map' object").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: no 'weight_map' object (expected shard names per tensor)")
            return [directory / shard for shard in sorted(set(weight_map.values()))]
    raise FileNotFoundError(f"{directory}: no weights (looked for {WEIGHT_FILES + INDEX_FILES})")


CHUNK_BYTES = 16 << 20  # the most a tensor is read at once in its stored dtype when it is converted


class LazyWeights:
    """The tensors of a Hugging Face model directory, read one at a time when asked for:
    safetensors shards through ``safe_open``, PyTorch files with ``weights_only=True``,
    both memory-mapped. :meth:`read` converts a large tensor to a dtype in row blocks of
    at most :data:`CHUNK_BYTES`, so it is never in memory whole in its stored precision."""

    def __init__(self, directory: str | Path):
        from safetensors import SafetensorError, safe_open

        self.source = str(directory)
        self._files: dict[str, object] = {}  # tensor name -> safe_open handle, or the tensor (mmap)
        for path in hf_weight_files(directory):
            if not path.exists():
                raise FileNotFoundError(f"checkpoint not found: {path}")
            if path.suffix != ".safetensors":
                self._files.update(read_torch_file(path, mmap=True))
                continue
            try:
                handle = safe_open(str(path), framework="pt")
            except SafetensorError as err:
                raise ValueError(f"{path}: not a complete safetensors file ({err})") from err
            self._files.update(dict.fromkeys(handle.keys(), handle))

    def keys(self) -> list[str]:
        return list(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        found = self._files[name]
        return tuple(found.shape) if isinstance(found, Tensor) else tuple(found.get_slice(name).get_shape())

    def __getitem__(self, name: str) -> Tensor:
        """The tensor as stored, possibly backed by the file's pages (copy-on-write)."""
        found = self._files[name]
        return found if isinstance(found, Tensor) else found.get_tensor(name)

    def _rows(self, name: str, start: int, stop: int) -> Tensor:
        found = self._files[name]
        return found[start:stop] if isinstance(found, Tensor) else found.get_slice(name)[start:stop]

    def read(self, name: str, dtype: torch.dtype | None = None) -> Tensor:
        """The tensor in ``dtype`` (None: as stored) in memory of its own, refused if it
        holds NaN or infinity."""
        shape = self.shape(name)
        numel = max(1, int(torch.Size(shape).numel()))
        rows_per_chunk = max(1, shape[0] * CHUNK_BYTES // (numel * 4)) if shape else 1  # 4 bytes: float32
        if not shape or rows_per_chunk >= shape[0]:
            tensor = self[name]
            refuse_non_finite({name: tensor}, self.source)
            return tensor.to(dtype or tensor.dtype, copy=True)
        out = None
        for start in range(0, shape[0], rows_per_chunk):
            chunk = self._rows(name, start, start + rows_per_chunk)
            refuse_non_finite({name: chunk}, self.source)
            if out is None:
                out = torch.empty(shape, dtype=dtype or chunk.dtype)
            out[start:start + len(chunk)].copy_(chunk)
        return out


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Every ``nn.Parameter`` registered inside goes to the meta device (no memory, no
    initialisation), as accelerate's ``init_empty_weights(include_buffers=False)``:
    buffers are made as usual on the real device, so the non-persistent ones (rotary
    frequencies, position ids, masks) hold their values. Assign the parameters
    afterwards with :func:`load_lazily`. Patches ``nn.Module.register_parameter`` while
    active (not for use from several threads at once)."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def load_lazily(module: nn.Module, weights: LazyWeights, prefix: str = "") -> None:
    """Assign ``module``'s parameters and persistent buffers (parameters typically on the
    meta device, see :func:`parameters_on_meta`) from the tensors ``prefix + name`` of
    ``weights``, each read and converted to the dtype of what it replaces one at a time.
    Strict as :func:`load_strict`: a missing or unexpected key (under ``prefix``) is a
    :class:`CheckpointKeyError` naming it, a shape mismatch or a NaN/infinity a ValueError.
    Parameters the module shares (tied embeddings and LM heads, which transformers saves
    once) are read from whichever of their names is present and stay shared."""
    tied: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        tied.setdefault(id(param), []).append(name)
    params = {names[0]: names for names in tied.values()}
    param_names = {n for names in params.values() for n in names}
    buffers = [k for k in module.state_dict(keep_vars=True) if k not in param_names]  # the persistent ones
    present = {k[len(prefix):] for k in weights.keys() if k.startswith(prefix)}
    chosen = {first: next((n for n in names if n in present), None) for first, names in params.items()}
    missing = [n for first, names in params.items() if chosen[first] is None for n in names]
    missing += [k for k in buffers if k not in present]
    expected = param_names | set(buffers)
    refuse_mismatch(module, [prefix + k for k in missing], [prefix + k for k in present - expected], weights.source)
    targets = {chosen[first]: module.get_parameter(first) for first in params} | {
        k: module.get_buffer(k) for k in buffers}
    refuse_wrong_shapes({prefix + k: (weights.shape(prefix + k), tuple(t.shape)) for k, t in targets.items()},
                        weights.source)
    for first, names in params.items():
        old = module.get_parameter(first)
        new = nn.Parameter(weights.read(prefix + chosen[first], old.dtype), requires_grad=old.requires_grad)
        for name in names:
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._parameters[leaf] = new
    for name in buffers:
        owner, _, leaf = name.rpartition(".")
        module.get_submodule(owner)._buffers[leaf] = weights.read(prefix + name, module.get_buffer(name).dtype)
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"{weights.source}: {left[:10]} still on the meta device after loading")


def read_hf_config(directory: str | Path) -> dict:
    """``config.json`` of a Hugging Face model directory."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory}: no config.json (not a Hugging Face model directory)")
    return read_json_file(path, "a transformers config object with a 'model_type'")
