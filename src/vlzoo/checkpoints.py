"""Training checkpoints that survive crashes: atomic writes, and resume that detects a
truncated or corrupt checkpoint and falls back to the previous one."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vlzoo import config as config_module
from vlzoo.models import generation


def safe_checkpoint_globals() -> list[type]:
    """The config classes a task checkpoint may hold in its hyper-parameters."""
    names = ("VisionConfig", "TextConfig", "CLIPConfig", "MomentumConfig", "ALBEFConfig", "BLIPConfig",
             "BLIP2Config", "BLIP2LLMConfig", "CausalLMConfig", "OptimConfig", "EvalConfig", "FinetuneConfig",
             "LoRAConfig")
    return [getattr(config_module, n) for n in names] + [generation.GenerationConfig]


# ``torch.load(weights_only=True)`` (ours and Lightning's: ``trainer.test(ckpt_path=...)``,
# resume) may build vlzoo's config dataclasses and nothing else. Registered once, for the
# process: the ``torch.serialization.safe_globals`` context would unregister them on exit.
torch.serialization.add_safe_globals(safe_checkpoint_globals())


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict:
    """``torch.load(weights_only=True)`` with the vlzoo config classes allowed; a
    truncated or foreign file raises an error that names it. ``mmap`` maps tensors
    instead of reading them (for looking at the metadata only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a vlzoo/Lightning checkpoint (a checkpoint is a zip archive written by "
                         "torch.save; this file is a plain pickle, truncated, or something else)")
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as err:
        raise ValueError(f"{path}: not a readable vlzoo/Lightning checkpoint ({err})") from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes ``path.tmp-PID`` in the same folder, fsyncs it, then renames it over
    ``path``: a crash mid-write leaves the previous checkpoint intact."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def checkpoint_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete checkpoint (missing, truncated, corrupt), or None.

    torch checkpoints are zip archives: every member's CRC is checked. A sharded (FSDP)
    checkpoint is a folder: complete when it holds the shards' index and Lightning's
    metadata file (both written after every shard)."""
    path = Path(path)
    if path.is_dir():
        missing = [name for name in (".metadata", "meta.pt") if not (path / name).is_file()]
        if missing:
            return f"incomplete sharded checkpoint folder (no {', '.join(missing)})"
        return checkpoint_problem(path / "meta.pt")
    if not path.is_file():
        return "no such file"
    if path.stat().st_size == 0:
        return "empty file"
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as err:
        return f"truncated or not a checkpoint ({err})"
    return f"corrupt member {bad}" if bad is not None else None


def resolve_resume(ckpt_path: str | None, checkpoint_dir: str | Path) -> str | None:
    """The checkpoint to resume from: ``last`` is the newest complete checkpoint in
    ``checkpoint_dir`` (None when there is none: a fresh start); a path is used when
    complete, else the newest complete checkpoint beside it. Each unusable one is
    reported and moved aside (``NAME.corrupt``, on the first process only), so the
    next save writes a fresh ``last.ckpt`` in its place; with nothing usable, a clear
    error."""
    if ckpt_path is None or ckpt_path in ("best", "hpc", "registry"):
        return ckpt_path
    if ckpt_path == "last":
        candidates, wanted = _newest_first(Path(checkpoint_dir)), None
        if not candidates and not _moved_aside(Path(checkpoint_dir)):
            return None
    else:
        wanted = Path(ckpt_path)
        if checkpoint_problem(wanted) is None:
            return str(wanted)
        candidates = [wanted] + [p for p in _newest_first(wanted.parent) if p != wanted]
    for candidate in candidates:
        problem = checkpoint_problem(candidate)
        if problem is None:
            return str(candidate)
        aside = move_aside(candidate) if problem != "no such file" else None
        print(f"vlzoo: cannot resume from {candidate}: {problem}"
              + (f" (moved to {aside})" if aside else "") + "; trying the previous checkpoint", flush=True)
    folder = wanted.parent if wanted else Path(checkpoint_dir)
    aside = _moved_aside(folder)
    raise FileNotFoundError(f"no complete checkpoint to resume from (asked for {ckpt_path}; looked in {folder}"
                            + (f"; unusable ones moved aside: {', '.join(p.name for p in aside)}; remove them to "
                               "start afresh" if aside else "") + ")")


def move_aside(path: Path) -> Path | None:
    """Rename an unusable checkpoint to ``NAME.corrupt`` (``NAME.corrupt-2``, ... when
    taken); only the first process of a launch does it. Returns the new path."""
    if os.environ.get("LOCAL_RANK", "0") != "0" or os.environ.get("RANK", "0") != "0":
        return None
    target, n = path.with_name(path.name + ".corrupt"), 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{n}")
    os.replace(path, target)
    return target


def _moved_aside(directory: Path) -> list[Path]:
    return sorted(directory.glob("*.ckpt.corrupt*")) if directory.is_dir() else []


def _newest_first(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(directory.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
