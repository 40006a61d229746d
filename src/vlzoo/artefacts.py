"""Zoo artefacts: models one config refers to by name, trained by vlzoo on first use.

A config field may name another zoo model as ``zoo:FAMILY/VARIANT`` (for example the
frozen image encoder of BLIP-2 shapes is ``zoo:clip/shapes-tiny``, the vision tower of
the CLIP trained by ``zoo_configs/models/clip/shapes-tiny.yaml``). :func:`resolve_artefact`
returns a directory holding that model; when it is missing, vlzoo trains it with its
own config (``vlzoo fit`` in a subprocess, progress shown) and caches it under
``$VLZOO_HOME/artefacts/FAMILY-VARIANT-KEY``, KEY a hash of the vlzoo version, the config
and every artefact it refers to in turn, so a changed config trains anew and an unchanged one
is reused. Concurrent processes (DDP ranks, two runs) wait on one lock; the directory
appears by an atomic rename only once complete.

An artefact directory holds ``model.ckpt`` (the best checkpoint of that run),
``config.yaml``, ``metrics.json`` and, for models with a Hugging Face form (the
shapes causal LM), ``hf/`` (``save_pretrained`` layout).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from omegaconf import OmegaConf
from torch import Tensor

from vlzoo import __version__
from vlzoo.checkpoints import read_checkpoint
from vlzoo.config import VisionConfig, as_config
from vlzoo.utils import atomic_write_json, file_lock, vlzoo_home

ZOO_PREFIX = "zoo:"
CHECKPOINT_NAME = "model.ckpt"
HF_DIR_NAME = "hf"


def is_zoo_reference(value: object) -> bool:
    return isinstance(value, str) and value.startswith(ZOO_PREFIX)


def zoo_config_roots() -> list[Path]:
    """Where ``zoo:NAME`` configs are looked up, in order: ``$VLZOO_CONFIGS`` (a
    ``zoo_configs``-style directory), the repository's ``zoo_configs``, ``./zoo_configs``."""
    roots = [Path(p) for p in os.environ.get("VLZOO_CONFIGS", "").split(os.pathsep) if p]
    roots += [Path(__file__).resolve().parents[3] / "zoo_configs", Path.cwd() / "zoo_configs"]
    return roots


def zoo_config_path(reference: str) -> Path:
    """``zoo:clip/shapes-tiny`` -> ``.../zoo_configs/models/clip/shapes-tiny.yaml``."""
    name = reference.removeprefix(ZOO_PREFIX)
    if not name or ".." in Path(name).parts:
        raise ValueError(f"{reference!r}: expected zoo:FAMILY/VARIANT (a file under zoo_configs/models)")
    for root in zoo_config_roots():
        path = root / "models" / f"{name}.yaml"
        if path.is_file():
            return path
    searched = ", ".join(str(r / "models" / f"{name}.yaml") for r in zoo_config_roots())
    raise FileNotFoundError(f"{reference}: no zoo config found (searched {searched})")


def _references(node: object) -> list[str]:
    """Every ``zoo:`` string anywhere in a plain config tree."""
    if isinstance(node, dict):
        return [r for v in node.values() for r in _references(v)]
    if isinstance(node, list):
        return [r for v in node for r in _references(v)]
    return [node] if is_zoo_reference(node) else []


def artefact_key(reference: str, _seen: tuple[str, ...] = ()) -> str:
    """sha256 (hex, 16 chars) of the vlzoo version, the config's canonical YAML and the
    keys of the artefacts it refers to (a cycle is an error): a new release, whose
    training code may differ, trains its artefacts anew."""
    if reference in _seen:
        raise ValueError(f"zoo artefacts refer to each other in a cycle: {' -> '.join((*_seen, reference))}")
    tree = OmegaConf.to_container(OmegaConf.load(zoo_config_path(reference)), resolve=False)
    tree.get("trainer", {}).pop("default_root_dir", None)  # where it ran does not change the model
    digest = hashlib.sha256(f"vlzoo {__version__}\n".encode())
    digest.update(OmegaConf.to_yaml(OmegaConf.create(tree), sort_keys=True).encode())
    for ref in sorted(set(_references(tree))):
        digest.update(f"{ref}={artefact_key(ref, (*_seen, reference))}".encode())
    return digest.hexdigest()[:16]


def artefact_dir(reference: str) -> Path:
    """Cache directory of ``reference`` (it may not exist yet)."""
    name = reference.removeprefix(ZOO_PREFIX).replace("/", "-")
    return vlzoo_home() / "artefacts" / f"{name}-{artefact_key(reference)}"




def resolve_artefact(reference: str) -> Path:
    """The directory of a model: ``zoo:NAME`` from the cache (trained first when
    missing), or a local checkpoint file / directory as given."""
    if not is_zoo_reference(reference):
        path = Path(reference).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"{reference}: no such checkpoint file or directory")
        return path
    target = artefact_dir(reference)
    if (target / CHECKPOINT_NAME).is_file():
        return target
    with file_lock(target.with_name(target.name + ".lock")):
        if not (target / CHECKPOINT_NAME).is_file():  # another process may have built it meanwhile
            _train_artefact(reference, target)
    return target


def artefact_checkpoint(reference: str) -> Path:
    """The checkpoint file behind ``reference`` (``zoo:NAME``, a file, or a directory
    holding ``model.ckpt``)."""
    path = resolve_artefact(reference)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{reference}: {path} is not a checkpoint file")
    return path


def artefact_hf_dir(reference: str) -> Path:
    """The Hugging Face directory behind ``reference``: ``zoo:NAME`` (its ``hf/``) or a
    local directory with a ``config.json``; any other string is returned for
    ``from_pretrained`` to resolve (a hub name)."""
    if not is_zoo_reference(reference):
        return Path(reference).expanduser() if Path(reference).expanduser().exists() else reference
    path = resolve_artefact(reference) / HF_DIR_NAME
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{reference}: the artefact has no Hugging Face export at {path}")
    return path


def _train_artefact(reference: str, target: Path) -> None:
    """Run ``vlzoo fit`` on the artefact's config into a temporary run directory, then
    move the best checkpoint (and exports) into ``target`` atomically. Says first that it
    trains and for about how long (from the last build of the same model here). The
    staging folder goes on any exit: an error, Ctrl-C, SIGTERM (which also stops the
    training process); one left by a SIGKILL is removed by the next build."""
    config = zoo_config_path(reference)
    steps = _max_steps(config)
    print(f"[vlzoo] {reference} is not cached: training it now with {config} ({steps or '?'} steps; "
          f"{_expected_duration(reference, steps)}; once, cached at {target})", file=sys.stderr, flush=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.*"):  # we hold the lock: nobody else is building it
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    started = time.monotonic()
    try:
        run_dir = staging / "run"
        command = [sys.executable, "-m", "vlzoo.cli", "fit", "--config", str(config),
                   "--trainer.default_root_dir", str(run_dir)]
        returncode = _run_to_completion(command)
        if returncode:
            raise RuntimeError(f"{reference}: training with {config} failed (exit {returncode}); "
                               f"command: {' '.join(command)}")
        out = staging / "artefact"
        out.mkdir()
        shutil.copy2(_best_checkpoint(run_dir), out / CHECKPOINT_NAME)
        for name in ("config.yaml", "metrics.json"):
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out / name)
        _export_hf(out)
        if target.exists():
            shutil.rmtree(target)
        os.replace(out, target)
        _record_duration(reference, time.monotonic() - started, steps)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class _Terminated(SystemExit):
    """SIGTERM while an artefact trains: unwinds (cleaning up) and exits 143."""


@contextmanager
def _sigterm_unwinds():
    """SIGTERM raises :class:`_Terminated` inside the block (main thread only), so
    ``finally`` clauses run; the previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def unwind(signum, frame):
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, unwind)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_to_completion(command: list[str]) -> int:
    """Run ``command``; if this process is interrupted (Ctrl-C, SIGTERM), stop it too."""
    with _sigterm_unwinds():
        process = subprocess.Popen(command, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            return process.wait()
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


def _max_steps(config: Path) -> int | None:
    steps = (OmegaConf.to_container(OmegaConf.load(config), resolve=False).get("trainer") or {}).get("max_steps")
    return steps if isinstance(steps, int) and steps > 0 else None


def _durations_file() -> Path:
    return vlzoo_home() / "artefacts" / "build_times.json"


def _durations() -> dict:
    """reference -> {seconds, steps} of its last build here ({} when none is recorded)."""
    try:
        times = json.loads(_durations_file().read_text())
    except (OSError, ValueError):
        return {}
    return times if isinstance(times, dict) else {}


def _expected_duration(reference: str, steps: int | None) -> str:
    """``about N min`` from the last build of ``reference`` on this machine (scaled by
    its step count), or a note that there is no timing yet."""
    last = _durations().get(reference)
    if not isinstance(last, dict) or not last.get("seconds"):
        return "no earlier build here to time it by; its progress follows"
    seconds = float(last["seconds"])
    if steps and last.get("steps"):
        seconds *= steps / float(last["steps"])
    return f"about {seconds / 60:.0f} min, as its last build here"


def _record_duration(reference: str, seconds: float, steps: int | None) -> None:
    atomic_write_json(_durations_file(), {**_durations(), reference: {"seconds": round(seconds, 1), "steps": steps}})


def _best_checkpoint(run_dir: Path) -> Path:
    best = sorted((run_dir / "checkpoints").glob("best-*.ckpt"))
    last = run_dir / "checkpoints" / "last.ckpt"
    if best:
        return best[-1]
    if last.is_file():
        return last
    raise FileNotFoundError(f"{run_dir}: the run wrote no checkpoint")


def _export_hf(artefact: Path) -> None:
    """Write ``hf/`` for tasks that have a Hugging Face form (``export_pretrained``), in a
    subprocess: which task wrote the checkpoint is the family registry's answer, a layer
    above this one (:mod:`vlzoo.hub.pretrained`)."""
    command = [sys.executable, "-m", "vlzoo.hub.pretrained", str(artefact / CHECKPOINT_NAME),
               str(artefact / HF_DIR_NAME)]
    returncode = _run_to_completion(command)
    if returncode:
        raise RuntimeError(f"{artefact}: writing the Hugging Face form failed (exit {returncode}); "
                           f"command: {' '.join(command)}")


# ------------------------------------------------------------------ references in configs
def resolve_vision(cfg: VisionConfig) -> tuple[VisionConfig, dict[str, Tensor] | None]:
    """The explicit resolution step of a vision config: impl ``vlzoo`` (``name``: a vlzoo
    checkpoint or ``zoo:FAMILY/VARIANT``, trained first when missing) -> the tower's own
    config and its weights; any other config as is, without weights. Builders
    (:func:`vlzoo.backbones.build_vision_encoder`) take only the resolved form."""
    if cfg.impl != "vlzoo":
        return cfg, None
    if not cfg.name:
        raise ValueError("vision.name: a vlzoo checkpoint path or zoo:FAMILY/VARIANT is required for impl 'vlzoo'")
    resolved, state = vision_tower_from_checkpoint(artefact_checkpoint(cfg.name), cfg)
    if resolved.impl == "vlzoo":
        raise ValueError(f"vision.name {cfg.name}: its vision config is itself a reference; expected a built tower")
    return resolved, state


def vision_tower_from_checkpoint(
    path: str | Path, overrides: VisionConfig
) -> tuple[VisionConfig, dict[str, Tensor]]:
    """The vision tower of a vlzoo task checkpoint: its own vision config (encoder,
    image size, mean/std) with ``output_layer``, ``patch_dropout``, ``grad_checkpointing``
    and ``locked`` taken from ``overrides``, and its weights (keys relative to the tower)."""
    checkpoint = read_checkpoint(path)
    model_config = checkpoint.get("hyper_parameters", {}).get("model")
    vision = model_config.get("vision") if isinstance(model_config, dict) else getattr(model_config, "vision", None)
    if isinstance(vision, dict):  # LightningCLI records plain dicts
        vision = as_config(vision, VisionConfig, f"{path}: model.vision")
    if not isinstance(vision, VisionConfig):
        raise ValueError(f"{path}: the checkpoint's hyper-parameters hold no model.vision config")
    prefix = "model.vision."
    state = {k.removeprefix(prefix): v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise ValueError(f"{path}: no {prefix}* weights in the checkpoint")
    keep = ("output_layer", "patch_dropout", "grad_checkpointing", "locked")
    return dataclasses.replace(vision, **{k: getattr(overrides, k) for k in keep}), state
