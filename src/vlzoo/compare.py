"""``vlzoo compare``: every family trained under one recipe, evaluated on one test split.

A recipe (``zoo_configs/recipes/*.yaml``) holds the shared settings — data, image size,
steps, global batch, optimizer, learning-rate schedule, precision, seed, evaluation —
and, per model, the zoo config that gives its architecture and the settings only that
family has. Each model is trained by ``vlzoo fit`` in a subprocess (its own memory
peak, its own progress lines) into ``OUT/runs/NAME``; ``OUT/results.json``,
``OUT/results.md`` and ``OUT/comparison.png`` are rewritten after each model. A model
whose run finished is skipped when the command is run again.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from vlzoo.plots import plot_comparison
from vlzoo.utils import atomic_write_json, atomic_write_text

SHARED_KEYS = ("seed", "steps", "global_batch", "precision", "optimizer", "data", "eval")
PARTIAL_WALL = "compare_wall.json"  # wall time of an interrupted run, added when it continues
DONE_KEY = "compare/finished"
TABLE_METRICS = ("test/r1_t2i", "test/r1_i2t", "test/r10_t2i", "test/compositional_acc", "test/zeroshot_acc",
                 "test/bleu4", "test/cider")


@dataclass
class Recipe:
    """A parsed recipe; ``models`` maps a name to ``{config, vision_from?, overrides?}``."""

    path: Path
    shared: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe YAML; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    missing = [k for k in (*SHARED_KEYS, "models") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    unknown = sorted(set(raw) - {*SHARED_KEYS, "models"})
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}")
    if not isinstance(raw["models"], dict) or not raw["models"]:
        raise ValueError(f"{path}: models: expected a mapping name -> {{config: ...}}")
    root = path.resolve().parent
    models = {}
    for name, spec in raw["models"].items():
        if not isinstance(spec, dict) or "config" not in spec:
            raise ValueError(f"{path}: models.{name}: expected {{config: PATH, ...}}")
        config = Path(spec["config"])
        if not config.is_absolute():  # relative to the working directory, else to the recipe's repository
            config = config if config.is_file() else root.parents[1] / config
        if not config.is_file():
            raise FileNotFoundError(f"{path}: models.{name}.config {spec['config']} does not exist")
        models[name] = {**spec, "config": config}
    for name, spec in models.items():
        source = spec.get("vision_from")
        if source is not None and source not in models:
            raise ValueError(f"{path}: models.{name}.vision_from {source!r} is not a model of the recipe")
    return Recipe(path, {k: raw[k] for k in SHARED_KEYS}, models)


def shared_config(recipe: Recipe) -> dict:
    """The recipe's shared settings as a ``vlzoo fit`` config, layered over each model's
    own zoo config (``--config MODEL --config SHARED``: jsonargparse merges them key by
    key, the later file winning)."""
    s = recipe.shared
    steps = int(s["steps"])
    return {
        "seed_everything": s["seed"],
        "trainer": {"max_steps": steps, "val_check_interval": steps, "check_val_every_n_epoch": None,
                    "precision": s["precision"], "devices": 1},
        "data": {**s["data"], "batch_size": int(s["global_batch"])},
        "model": {"init_args": {"optim": dict(s["optimizer"]), "eval": dict(s["eval"])}},
    }


def fit_arguments(recipe: Recipe, name: str, shared: Path, run_dir: Path, vision_checkpoint: Path | None
                  ) -> list[str]:
    """``vlzoo fit`` arguments of model ``name``: its zoo config, the recipe's shared config
    (file ``shared``) on top, then the model's own ``overrides`` (dotted keys) and a
    ``vision_from`` tower as command-line options, which jsonargparse applies last."""
    spec = recipe.models[name]
    args = ["fit", "--config", str(spec["config"]), "--config", str(shared),
            "--trainer.default_root_dir", str(run_dir)]
    for key, value in (spec.get("overrides") or {}).items():
        args += [f"--{key}", value if isinstance(value, str) else json.dumps(value)]
    if vision_checkpoint is not None:
        args += ["--model.init_args.model.vision.impl", "vlzoo", "--model.init_args.model.vision.name",
                 str(vision_checkpoint)]
    return args


def family_settings(config: dict) -> dict:
    """What the architecture brings beyond the recipe: the model's own config section."""
    init = config.get("model", {}).get("init_args", {})
    return {k: v for k, v in init.items() if k not in ("optim", "eval")}


# ------------------------------------------------------------------------ running
def run_model(recipe: Recipe, name: str, out: Path, results: dict[str, Any], position: str) -> None:
    """Train and test model ``name`` in a ``vlzoo fit`` subprocess (skipped when finished)."""
    run_dir = out / "runs" / name
    metrics_path = run_dir / "metrics.json"
    if metrics_path.is_file() and json.loads(metrics_path.read_text()).get(DONE_KEY):
        print(f"[{position}] {name}: finished before, skipped ({metrics_path})", flush=True)
        results[name] = _result(name, run_dir)
        return
    source = recipe.models[name].get("vision_from")
    vision = _best_checkpoint(out / "runs" / source) if source else None
    shared = out / "configs" / "shared.yaml"
    atomic_write_text(shared, yaml.safe_dump(shared_config(recipe), sort_keys=False))
    args = fit_arguments(recipe, name, shared, run_dir, vision)
    partial = run_dir / PARTIAL_WALL
    earlier = json.loads(partial.read_text()).get("wall_time_s", 0.0) if partial.is_file() else 0.0
    if (run_dir / "checkpoints" / "last.ckpt").is_file():  # interrupted before: continue where it stopped
        args += ["--ckpt_path", "last"]
        print(f"[{position}] {name}: continuing the interrupted run from its last checkpoint", flush=True)
    elif run_dir.exists():  # interrupted before its first checkpoint: start it again cleanly
        import shutil

        shutil.rmtree(run_dir)
        earlier = 0.0
    print(f"[{position}] {name}: {recipe.shared['steps']} steps x {recipe.shared['global_batch']} "
          f"({recipe.models[name]['config'].name}" + (f", vision of {source}" if source else "") + ")", flush=True)
    start = time.perf_counter()
    try:
        returncode = _run_fit(args, name, position)
    except KeyboardInterrupt:
        if run_dir.is_dir():
            atomic_write_json(partial, {"wall_time_s": earlier + time.perf_counter() - start})
        raise
    wall = earlier + time.perf_counter() - start
    if returncode != 0:
        if run_dir.is_dir():
            atomic_write_json(partial, {"wall_time_s": wall})
        raise RuntimeError(f"vlzoo compare: {name} failed (exit {returncode}); command: vlzoo {' '.join(args)}")
    partial.unlink(missing_ok=True)
    metrics = json.loads(metrics_path.read_text())
    metrics.update({DONE_KEY: True, "wall_time_s": wall})
    atomic_write_json(metrics_path, metrics)
    results[name] = _result(name, run_dir)
    print(f"[{position}] {name}: done in {wall / 60:.1f} min, test R@1 t2i "
          f"{metrics.get('test/r1_t2i', float('nan')):.3f}", flush=True)


def _run_fit(args: list[str], name: str, position: str) -> int:
    """``vlzoo fit ARGS`` in a subprocess. On Ctrl-C (which the run receives too) wait for
    it to save its checkpoint, then say how to continue."""
    process = subprocess.Popen([sys.executable, "-m", "vlzoo.cli", *args])
    try:
        return process.wait()
    except KeyboardInterrupt:
        print(f"\nvlzoo compare: Ctrl-C during {name} ({position}): waiting for it to save its checkpoint",
              file=sys.stderr, flush=True)
        try:
            process.wait(timeout=300)
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            process.kill()
            process.wait()
        print("vlzoo compare: to continue, run the same command again: finished models are skipped and "
              f"{name} continues from its last checkpoint", file=sys.stderr, flush=True)
        raise


def _best_checkpoint(run_dir: Path) -> Path:
    metrics = run_dir / "metrics.json"
    best = json.loads(metrics.read_text()).get("best_checkpoint") if metrics.is_file() else None
    path = Path(best) if best else run_dir / "checkpoints" / "last.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint in {run_dir} (train that model first)")
    return path


def _result(name: str, run_dir: Path) -> dict:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # what vlzoo fit parsed, every layer applied
    return {"metrics": {k: v for k, v in metrics.items() if k.startswith(("test/", "val/", "train/"))},
            "params_total": metrics.get("params_total"), "params_trainable": metrics.get("params_trainable"),
            "train_samples_per_s": metrics.get("train/samples_per_s"),
            "peak_memory_mb": metrics.get("peak_memory_mb"), "wall_time_s": metrics.get("wall_time_s"),
            "effective_settings": config, "family_settings": family_settings(config),
            "run_dir": str(run_dir)}


def compare(recipe_path: str | Path, out: str | Path, models: list[str] | None = None) -> dict[str, Any]:
    """Run the recipe's models (all, or ``models`` in the recipe's order) and write the
    results; returns the results dict."""
    recipe = load_recipe(recipe_path)
    names = list(recipe.models)
    if models:
        unknown = [m for m in models if m not in recipe.models]
        if unknown:
            raise ValueError(f"--models {unknown}: not in {recipe.path} (it has {names})")
        names = [n for n in names if n in models]
    names = _sources_first(names, recipe)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    results = json.loads(results_path.read_text()).get("models", {}) if results_path.is_file() else {}
    _print_shared(recipe)
    for i, name in enumerate(names, 1):
        source = recipe.models[name].get("vision_from")
        if source and source not in names and not (out / "runs" / source / "metrics.json").is_file():
            raise ValueError(f"{name} takes the vision tower of {source}: include {source} in --models")
        run_model(recipe, name, out, results, f"{i}/{len(names)}")
        write_results(recipe, results, out)
    table = results_table(results)
    print(table)
    return results


def _sources_first(names: list[str], recipe: Recipe) -> list[str]:
    """``names`` reordered so that a model whose vision tower another takes runs first."""
    ordered: list[str] = []
    for name in names:
        source = recipe.models[name].get("vision_from")
        if source in names and source not in ordered:
            ordered.append(source)
        if name not in ordered:
            ordered.append(name)
    return ordered


def _print_shared(recipe: Recipe) -> None:
    s = recipe.shared
    print(f"recipe {recipe.path}: {s['steps']} steps x global batch {s['global_batch']}, {s['precision']}, "
          f"seed {s['seed']}, optimizer {s['optimizer']}, data {s['data']}, eval {s['eval']}", flush=True)
    for name, spec in recipe.models.items():
        extra = {k: v for k, v in spec.items() if k != "config"}
        print(f"  {name}: architecture and family settings from {spec['config']}" + (f"; {extra}" if extra else ""))


# ------------------------------------------------------------------------ output
def results_table(results: dict[str, Any]) -> str:
    """A markdown table: one row per model."""
    columns = [m.removeprefix("test/") for m in TABLE_METRICS]
    head = ["model", *columns, "params (trainable)", "train samples/s", "peak MB", "wall min"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        m = r["metrics"]
        cells = [f"{m[k]:.3f}" if isinstance(m.get(k), (int, float)) else "–" for k in TABLE_METRICS]
        params = f"{(r['params_total'] or 0) / 1e6:.2f} M ({(r['params_trainable'] or 0) / 1e6:.2f} M)"
        speed = f"{r['train_samples_per_s']:.0f}" if r.get("train_samples_per_s") else "–"
        memory = f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "–"
        wall = f"{r['wall_time_s'] / 60:.1f}" if r.get("wall_time_s") else "–"
        lines.append("| " + " | ".join([name, *cells, params, speed, memory, wall]) + " |")
    return "\n".join(lines)


def write_results(recipe: Recipe, results: dict[str, Any], out: Path) -> None:
    """``results.json``, ``results.md`` and ``comparison.png`` for the models run so far."""
    atomic_write_json(out / "results.json", {"recipe": str(recipe.path), "shared_settings": recipe.shared,
                                             "models": results})
    text = (f"# vlzoo compare\n\nRecipe `{recipe.path}`: {recipe.shared['steps']} steps x global batch "
            f"{recipe.shared['global_batch']}, {recipe.shared['precision']}, seed {recipe.shared['seed']}.\n\n"
            + results_table(results) + "\n\nPer-family settings (beyond the recipe) are in results.json "
            "(`family_settings`).\n")
    atomic_write_text(out / "results.md", text)

    plot_comparison(results, out / "comparison.png")
