"""``vlzoo compare``: every family trained under one recipe and one budget, evaluated on
one test split, with learning curves and error bars.

A recipe (``zoo_configs/recipes/*.yaml``) holds the shared settings — data, image size,
budget, global batch, optimizer, learning-rate schedule, precision, seed, evaluation —
and, per model, the zoo config that gives its architecture and the settings only that
family has. The budget (:mod:`vlzoo.budget`) is steps, samples, FLOPs or wall time per
model; a FLOPs or wall-time budget is turned into each model's steps from its measured
step cost. Each model is trained ``seeds`` times, each run by ``vlzoo fit`` in a
subprocess (its own memory peak, its own progress lines) into
``OUT/runs/NAME/seed-S``, validated at ``curve_points`` points along the way. After
each run, ``OUT/results.json``, ``OUT/results.md``, ``OUT/curves.png`` and
``OUT/comparison.png`` are rewritten. Running the command again skips finished runs and
continues an interrupted one from its last checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from vlzoo import __version__
from vlzoo.budget import Budget, measure_step_cost, parse_budget
from vlzoo.plots import plot_comparison, plot_curves
from vlzoo.utils import atomic_write_json, atomic_write_text, read_json_file

SHARED_KEYS = ("seed", "budget", "global_batch", "precision", "optimizer", "data", "eval")
OPTIONAL_KEYS = {"seeds": 1, "curve_points": 4}  # with their defaults
PARTIAL_WALL = "compare_wall.json"  # wall time of an interrupted run, added when it continues
PLAN = "plan.json"  # OUT/plan.json: each model's measured step cost and steps under the budget
DONE_KEY = "compare/finished"
HEADLINE = "test/r1_t2i"
TABLE_METRICS = ("test/r1_t2i", "test/r1_i2t", "test/r10_t2i", "test/compositional_acc", "test/zeroshot_acc",
                 "test/bleu4", "test/cider")
RUN_FIGURES = ("params_total", "params_trainable", "train_samples_per_s", "peak_memory_mb", "wall_time_s",
               "train_time_s", "steps", "samples", "flops")


@dataclass
class Recipe:
    """A parsed recipe; ``models`` maps a name to ``{config, vision_from?, overrides?}``."""

    path: Path
    shared: dict[str, Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def global_batch(self) -> int:
        return int(self.shared["global_batch"])


def load_recipe(path: str | Path) -> Recipe:
    """Read and check a recipe YAML; errors name the file and the field."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of recipe fields")
    if "steps" in raw:
        raise ValueError(f"{path}: steps: the budget is now a mapping, e.g. budget: {{by: steps, steps: "
                         f"{raw['steps']}}} (or by: flops, samples, wall_time)")
    missing = [k for k in (*SHARED_KEYS, "models") if k not in raw]
    if missing:
        raise ValueError(f"{path}: missing fields {missing}")
    unknown = sorted(set(raw) - {*SHARED_KEYS, *OPTIONAL_KEYS, "models"})
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}")
    parse_budget(raw["budget"], None, str(path))  # checked now, not after the first model
    for key in OPTIONAL_KEYS:
        value = raw.get(key, OPTIONAL_KEYS[key])
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{path}: {key}: expected a positive integer, got {value!r}")
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
    shared = {k: raw[k] for k in SHARED_KEYS} | {k: raw.get(k, v) for k, v in OPTIONAL_KEYS.items()}
    return Recipe(path, shared, models)


def shared_config(recipe: Recipe, steps: int, seed: int) -> dict:
    """The recipe's shared settings for one run of ``steps`` optimizer steps, as a ``vlzoo
    fit`` config layered over each model's own zoo config (``--config MODEL --config
    SHARED``: jsonargparse merges them key by key, the later file winning). Validation
    runs at ``curve_points`` evenly spaced steps, the last one at the end (``steps`` is a
    multiple of them, see :func:`planned_steps`)."""
    s = recipe.shared
    interval = max(1, steps // int(s["curve_points"]))
    return {
        "seed_everything": seed,
        "trainer": {"max_steps": steps, "val_check_interval": interval, "check_val_every_n_epoch": None,
                    "precision": s["precision"], "devices": 1},
        "data": {**s["data"], "batch_size": recipe.global_batch},
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


# ------------------------------------------------------------------------ the plan
FINGERPRINT_SHARED = ("optimizer", "data", "eval", "precision", "global_batch")


def model_fingerprint(recipe: Recipe, name: str) -> str:
    """sha256 of what decides model ``name``'s results: its zoo config's ``model`` and
    ``data`` sections, its ``model.*``/``data.*`` overrides, ``vision_from`` and the
    recipe's shared training settings. Run settings (``trainer.*`` overrides: callbacks,
    logging) are left out, so an interrupted run may continue under them."""
    spec = recipe.models[name]
    config = yaml.safe_load(Path(spec["config"]).read_text()) or {}
    overrides = {k: v for k, v in (spec.get("overrides") or {}).items() if not k.startswith("trainer.")}
    decisive = {"model": config.get("model"), "data": config.get("data"), "overrides": overrides,
                "vision_from": spec.get("vision_from"),
                "shared": {k: recipe.shared.get(k) for k in FINGERPRINT_SHARED}}
    return hashlib.sha256(json.dumps(decisive, sort_keys=True, default=str).encode()).hexdigest()


def planned_steps(budget_steps: int, curve_points: int) -> int:
    """The budget's steps rounded down to a multiple of ``curve_points``, so that the last
    validation falls on the last step and the test sees the whole budget spent."""
    return budget_steps if budget_steps <= curve_points else budget_steps - budget_steps % curve_points


@dataclass
class Plan:
    """Per model: the measured step cost and the steps the budget gives it, kept in
    ``OUT/plan.json`` so that a continued compare trains every run for the same steps."""

    budget: Budget
    build_run: Callable[[list[str]], Any]
    models: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def read(cls, out: Path, budget: Budget, global_batch: int, build_run: Callable[[list[str]], Any]) -> Plan:
        """The plan of ``out`` (a new one if there is none); an ``out`` planned under another
        budget or global batch is refused, since its runs would not be comparable."""
        path = out / PLAN
        if not path.is_file():
            return cls(budget, build_run)
        saved = read_json_file(path)
        wanted = {"kind": budget.kind, "amount": budget.amount}
        if saved.get("budget") != wanted or saved.get("global_batch", global_batch) != global_batch:
            raise ValueError(f"{path}: {out} was run with budget {saved.get('budget')} and global batch "
                             f"{saved.get('global_batch')}, not {wanted} and {global_batch}: use another --out, "
                             "or the same budget and batch to continue")
        return cls(budget, build_run, saved.get("models", {}))

    def write(self, out: Path, global_batch: int) -> None:
        atomic_write_json(out / PLAN, {"budget": {"kind": self.budget.kind, "amount": self.budget.amount},
                                       "global_batch": global_batch, "models": self.models})

    def steps(self, recipe: Recipe, name: str, out: Path, fit_args: list[str]) -> int:
        """The steps of model ``name``; measures its step cost first when the plan has none
        (FLOPs are measured under every budget: the results report them). A model whose
        settings changed since it was planned is refused: its runs would not be comparable."""
        fingerprint = model_fingerprint(recipe, name)
        planned = self.models.get(name, {}).get("fingerprint")
        if planned is not None and planned != fingerprint:
            raise ValueError(f"{out / PLAN}: models.{name} was planned with other settings (its zoo config's "
                             f"model/data sections, its overrides, vision_from or the recipe's shared training "
                             f"settings changed since): use another --out, or restore them to continue")
        if name not in self.models:
            print(f"vlzoo compare: measuring the cost of one {name} training step", flush=True)
            cost = measure_step_cost(fit_args[1:], self.build_run,
                                     timed_steps=3 if self.budget.kind == "wall_time" else 0)
            try:
                budget_steps = self.budget.steps(recipe.global_batch, cost)
            except ValueError as err:
                raise ValueError(f"{recipe.path}: models.{name}: {err}") from err
            steps = planned_steps(budget_steps, int(recipe.shared["curve_points"]))
            self.models[name] = {"flops_per_step": cost.flops, "seconds_per_step": cost.seconds, "steps": steps,
                                 "config": str(recipe.models[name]["config"]), "fingerprint": fingerprint}
            self.write(out, recipe.global_batch)
            print(f"vlzoo compare: {name}: {steps} steps under {self.budget.describe()} "
                  f"({cost.flops / 1e9:.2f} GFLOP a step)", flush=True)
        return int(self.models[name]["steps"])


# ------------------------------------------------------------------------ running
def run_dir_of(out: Path, name: str, seed: int) -> Path:
    return out / "runs" / name / f"seed-{seed}"


def run_model(recipe: Recipe, plan: Plan, name: str, seed: int, out: Path, position: str) -> dict[str, Any]:
    """Train and test model ``name`` with ``seed`` in a ``vlzoo fit`` subprocess (skipped
    when finished, continued when interrupted); returns its result."""
    run_dir = run_dir_of(out, name, seed)
    metrics_path = run_dir / "metrics.json"
    source = recipe.models[name].get("vision_from")
    vision = _best_checkpoint(run_dir_of(out, source, seed)) if source else None
    shared = out / "configs" / f"{name}-seed-{seed}.yaml"
    if name not in plan.models:  # the step cost is measured on the model this run would train
        atomic_write_text(shared, yaml.safe_dump(shared_config(recipe, 1, seed), sort_keys=False))
    steps = plan.steps(recipe, name, out, fit_arguments(recipe, name, shared, run_dir, vision))
    if _finished(run_dir):
        print(f"[{position}] {name} seed {seed}: finished before, skipped ({metrics_path})", flush=True)
        return _result(run_dir, plan.models[name])
    atomic_write_text(shared, yaml.safe_dump(shared_config(recipe, steps, seed), sort_keys=False))
    args = fit_arguments(recipe, name, shared, run_dir, vision)
    partial = run_dir / PARTIAL_WALL
    earlier = read_json_file(partial).get("wall_time_s", 0.0) if partial.is_file() else 0.0
    if (run_dir / "checkpoints" / "last.ckpt").is_file():  # interrupted before: continue where it stopped
        args += ["--ckpt_path", "last"]
        print(f"[{position}] {name} seed {seed}: continuing the interrupted run from its last checkpoint", flush=True)
    elif run_dir.exists():  # interrupted before its first checkpoint: start it again cleanly
        shutil.rmtree(run_dir)
        earlier = 0.0
    print(f"[{position}] {name} seed {seed}: {steps} steps x {recipe.global_batch} "
          f"({recipe.models[name]['config'].name}" + (f", vision of {source} seed {seed}" if source else "") + ")",
          flush=True)
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
    metrics = read_json_file(metrics_path)
    metrics.update({DONE_KEY: True, "wall_time_s": wall})
    atomic_write_json(metrics_path, metrics)
    print(f"[{position}] {name} seed {seed}: done in {wall / 60:.1f} min, test R@1 t2i "
          f"{metrics.get(HEADLINE, float('nan')):.3f}", flush=True)
    return _result(run_dir, plan.models[name])


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
        print("vlzoo compare: to continue, run the same command again: finished runs are skipped and "
              f"{name} continues from its last checkpoint", file=sys.stderr, flush=True)
        raise


def _finished(run_dir: Path) -> bool:
    metrics = run_dir / "metrics.json"
    return metrics.is_file() and bool(read_json_file(metrics).get(DONE_KEY))


def _best_checkpoint(run_dir: Path) -> Path:
    """The tested checkpoint of a finished run (another model reads its vision tower)."""
    if not _finished(run_dir):
        raise FileNotFoundError(f"{run_dir} has not finished: train that model with this seed first "
                                "(vlzoo compare --models SOURCE,...)")
    best = read_json_file(run_dir / "metrics.json").get("best_checkpoint")
    # the recorded path, then the same file under run_dir (the output folder was moved)
    candidates = [Path(best), run_dir / "checkpoints" / Path(best).name] if best else []
    for path in [*candidates, run_dir / "checkpoints" / "last.ckpt"]:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no checkpoint in {run_dir} (train that model first)")


def _result(run_dir: Path, planned: dict[str, Any]) -> dict[str, Any]:
    """One finished run: its metrics, size, speed, memory and the budget it spent."""
    metrics = read_json_file(run_dir / "metrics.json")
    config = yaml.safe_load((run_dir / "config.yaml").read_text())  # what vlzoo fit parsed, every layer applied
    steps = int(config["trainer"]["max_steps"])
    samples = steps * int(config["data"]["batch_size"])
    speed = metrics.get("train/samples_per_s")
    return {"metrics": {k: v for k, v in metrics.items() if k.startswith(("test/", "val/", "train/"))},
            "params_total": metrics.get("params_total"), "params_trainable": metrics.get("params_trainable"),
            "train_samples_per_s": speed, "peak_memory_mb": metrics.get("peak_memory_mb"),
            "wall_time_s": metrics.get("wall_time_s"), "train_time_s": samples / speed if speed else None,
            "steps": steps, "samples": samples,
            "flops": steps * planned["flops_per_step"] if planned.get("flops_per_step") else None,
            "flops_per_step": planned.get("flops_per_step"),
            "effective_settings": config, "family_settings": family_settings(config), "run_dir": str(run_dir)}


def compare(recipe_path: str | Path, out: str | Path, build_run: Callable[[list[str]], Any],
            models: list[str] | None = None, seeds: int | None = None, budget: str | None = None) -> dict[str, Any]:
    """Run the recipe's models (all, or ``models`` in the recipe's order), ``seeds`` runs
    each (default: the recipe's), under the recipe's budget or ``budget`` (``KIND`` or
    ``KIND=AMOUNT``), and write the results; returns the results dict. ``build_run``
    builds a ``vlzoo fit`` run without running it (:func:`vlzoo.cli.build_lightning_run`),
    to measure a step's cost."""
    recipe = load_recipe(recipe_path)
    if seeds is not None:
        if seeds < 1:
            raise ValueError(f"--seeds: expected a positive integer, got {seeds}")
        recipe.shared["seeds"] = seeds
    chosen = parse_budget(recipe.shared["budget"], budget, str(recipe.path))
    names = _selected(recipe, models)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plan = Plan.read(out, chosen, recipe.global_batch, build_run)
    results = _earlier_results(out / "results.json")
    context = run_context(recipe)
    _print_shared(recipe, chosen)
    seed_list = [int(recipe.shared["seed"]) + i for i in range(int(recipe.shared["seeds"]))]
    for name in names:
        source = recipe.models[name].get("vision_from")
        unfinished = [s for s in seed_list if not _finished(run_dir_of(out, source, s))] if source else []
        if source and source not in names and unfinished:
            raise ValueError(f"{name} takes the vision tower of {source}, whose seed {unfinished[0]} has not "
                             f"finished in {run_dir_of(out, source, unfinished[0])}: include {source} in --models")
    for i, name in enumerate(names, 1):
        runs: dict[str, Any] = {}
        for seed in seed_list:  # the mean is over this command's seeds only
            runs[str(seed)] = run_model(recipe, plan, name, seed, out, f"{i}/{len(names)}")
            results[name] = summarise(runs)
            write_results(recipe, chosen, results, out, context)
    print(results_table(results))
    for line in noise_notes(results):
        print(line)
    return results


def _earlier_results(path: Path) -> dict[str, Any]:
    """The models of an earlier ``results.json`` in this layout (others are dropped: they
    are rebuilt from their run directories when their runs are asked for again)."""
    if not path.is_file():
        return {}
    models = read_json_file(path).get("models", {})
    return {name: r for name, r in models.items() if isinstance(r, dict) and {"runs", "std", "seeds"} <= set(r)}


def _selected(recipe: Recipe, models: list[str] | None) -> list[str]:
    names = list(recipe.models)
    if models:
        unknown = [m for m in models if m not in recipe.models]
        if unknown:
            raise ValueError(f"--models {unknown}: not in {recipe.path} (it has {names})")
        names = [n for n in names if n in models]
    ordered: list[str] = []  # a model whose vision tower another takes runs first
    for name in names:
        source = recipe.models[name].get("vision_from")
        if source in names and source not in ordered:
            ordered.append(source)
        if name not in ordered:
            ordered.append(name)
    return ordered


def _print_shared(recipe: Recipe, budget: Budget) -> None:
    s = recipe.shared
    print(f"recipe {recipe.path}: budget {budget.describe()}, global batch {s['global_batch']}, {s['precision']}, "
          f"seeds {s['seed']}..{s['seed'] + s['seeds'] - 1}, optimizer {s['optimizer']}, data {s['data']}, "
          f"eval {s['eval']}", flush=True)
    for name, spec in recipe.models.items():
        extra = {k: v for k, v in spec.items() if k != "config"}
        print(f"  {name}: architecture and family settings from {spec['config']}" + (f"; {extra}" if extra else ""))


def run_context(recipe: Recipe) -> dict[str, Any]:
    """Where and when: date, commit of the recipe's repository, machine, load at the start."""
    commit = None
    try:
        commit = subprocess.run(["git", "-C", str(recipe.path.resolve().parent), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()}-core CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "commit": commit,
            "vlzoo": __version__, "torch": torch.__version__, "device": device,
            "machine": platform.machine(), "load_average_at_start": load}


# ------------------------------------------------------------------------ statistics
def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A model's runs (by seed) -> the mean of every metric and figure (``metrics``, and
    the figures at the top level, as one run has them), their sample standard
    deviations (``std``, absent with one run) and the runs themselves."""
    finished = list(runs.values())
    metric_keys = sorted({k for r in finished for k, v in r["metrics"].items() if _is_number(v)})
    mean_metrics: dict[str, float] = {}
    std: dict[str, float] = {}
    summary: dict[str, Any] = {"metrics": mean_metrics, "std": std, "seeds": sorted(int(s) for s in runs),
                               "runs": runs}
    for key in metric_keys:
        mean_metrics[key] = _mean_into(std, key, [r["metrics"].get(key) for r in finished])
    for key in RUN_FIGURES:
        summary[key] = _mean_into(std, key, [r.get(key) for r in finished])
    last = finished[-1]
    summary.update(flops_per_step=last.get("flops_per_step"), effective_settings=last["effective_settings"],
                   family_settings=last["family_settings"], run_dir=last["run_dir"])
    return summary


def _mean_into(std: dict[str, float], key: str, values: list[Any]) -> float | None:
    """The mean of the finite ``values`` (None if none); their sample standard deviation
    goes into ``std[key]`` when there are two or more."""
    numbers = [v for v in values if _is_number(v)]
    if len(numbers) > 1:
        std[key] = statistics.stdev(numbers)
    return statistics.fmean(numbers) if numbers else None


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# two-sided 95 % quantiles of Student's t by degrees of freedom (scipy is no dependency);
# a fractional df uses the next lower entry, which is conservative
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042, 60: 2.000}


def t95(df: float) -> float:
    """The two-sided 95 % quantile of Student's t with ``df`` degrees of freedom (rounded
    down to a tabulated df; 1.96 beyond 60)."""
    if df >= 120:
        return 1.96
    return _T95[max([k for k in _T95 if k <= max(1.0, df)])]


def _values(result: dict[str, Any], metric: str) -> list[float]:
    """Each run's finite ``metric``."""
    return [r["metrics"][metric] for r in result["runs"].values() if _is_number(r["metrics"].get(metric))]


def within_noise(a: dict[str, Any], b: dict[str, Any], metric: str = HEADLINE) -> bool | None:
    """Whether two models' mean ``metric`` differ by less than Welch's 95 % interval of the
    difference (t with Welch-Satterthwaite degrees of freedom); None when either has fewer
    than two runs with the metric, or both have no spread."""
    xa, xb = _values(a, metric), _values(b, metric)
    if len(xa) < 2 or len(xb) < 2:
        return None
    va, vb = statistics.variance(xa) / len(xa), statistics.variance(xb) / len(xb)
    if va + vb == 0:
        return None
    df = (va + vb) ** 2 / (va**2 / (len(xa) - 1) + vb**2 / (len(xb) - 1))
    return abs(statistics.fmean(xa) - statistics.fmean(xb)) <= t95(df) * math.sqrt(va + vb)


def noise_notes(results: dict[str, Any], metric: str = HEADLINE) -> list[str]:
    """One line per pair of models on ``metric``: the difference and whether it is
    within noise (or that one seed each cannot tell)."""
    names = list(results)
    lines = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if metric not in results[a]["metrics"] or metric not in results[b]["metrics"]:
                continue
            diff = results[a]["metrics"][metric] - results[b]["metrics"][metric]
            same = within_noise(results[a], results[b], metric)
            verdict = ("within noise (inside Welch's 95 % interval of the difference)" if same else
                       "beyond noise (outside Welch's 95 % interval of the difference)" if same is False else
                       "not tested against noise (run --seeds 2 or more)")
            lines.append(f"- {a} - {b}: {diff:+.3f} {metric.removeprefix('test/')}, {verdict}")
    return lines


# ------------------------------------------------------------------------ output
def _cell(result: dict[str, Any], key: str, digits: int = 3) -> str:
    value = result["metrics"].get(key)
    if not _is_number(value):
        return "–"
    spread = result["std"].get(key)
    return f"{value:.{digits}f}" + (f" ± {spread:.{digits}f}" if spread is not None else "")


def _table_head(head: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def _number(r: dict[str, Any], key: str, scale: float = 1.0, digits: int = 0) -> str:
    value = r.get(key)
    return f"{value / scale:.{digits}f}" if _is_number(value) else "–"


def results_table(results: dict[str, Any]) -> str:
    """The test metrics, mean ± standard deviation over seeds: one row per model."""
    lines = _table_head(["model", "seeds", *(m.removeprefix("test/") for m in TABLE_METRICS)])
    for name, r in results.items():
        cells = [_cell(r, k) for k in TABLE_METRICS]
        lines.append("| " + " | ".join([name, str(len(r["seeds"])), *cells]) + " |")
    return "\n".join(lines)


def cost_table(results: dict[str, Any]) -> str:
    """What each model spent and what it is: steps, samples, FLOPs, wall time, size,
    speed and memory (means over seeds)."""
    lines = _table_head(["model", "steps", "samples", "GFLOP/step", "PFLOP", "train min", "wall min",
                         "params (trainable)", "train samples/s", "peak MB"])
    for name, r in results.items():
        params = f"{(r['params_total'] or 0) / 1e6:.2f} M ({(r['params_trainable'] or 0) / 1e6:.2f} M)"
        lines.append("| " + " | ".join([
            name, _number(r, "steps"), _number(r, "samples"), _number(r, "flops_per_step", 1e9, 2),
            _number(r, "flops", 1e15, 3), _number(r, "train_time_s", 60, 1), _number(r, "wall_time_s", 60, 1), params,
            _number(r, "train_samples_per_s"), _number(r, "peak_memory_mb")]) + " |")
    return "\n".join(lines)


def starting_points(recipe: Recipe, results: dict[str, Any]) -> list[str]:
    """The results.md lines saying which models start from another's vision tower: its
    training is spent before theirs and is not in their budget."""
    started = {name: recipe.models[name]["vision_from"] for name in results if recipe.models[name].get("vision_from")}
    if not started:
        return []
    lines = ["Starting points: the budget counts each model's own training. These models start from the "
             "vision tower of another model trained above (its test checkpoint, same seed), as the papers "
             "start ALBEF and BLIP from a pretrained ViT and BLIP-2 from a frozen CLIP/EVA tower:", ""]
    for name, source in started.items():
        spent = results.get(source, {}).get("flops")
        lines.append(f"- {name}: the vision tower of {source}" + (
            f" ({spent / 1e15:.3f} PFLOP spent on {source})" if _is_number(spent) else ""))
    return [*lines, ""]


def write_results(recipe: Recipe, budget: Budget, results: dict[str, Any], out: Path,
                  context: dict[str, Any]) -> None:
    """``results.json``, ``results.md``, ``curves.png`` and ``comparison.png`` for the
    runs so far."""
    atomic_write_json(out / "results.json", {"recipe": str(recipe.path), "shared_settings": recipe.shared,
                                             "budget": {"kind": budget.kind, "amount": budget.amount},
                                             "context": context, "models": results})
    plot_curves(results, out / "curves.png", recipe.global_batch)
    plot_comparison(results, out / "comparison.png")
    s = recipe.shared
    load = context.get("load_average_at_start")
    text = "\n".join([
        "# vlzoo compare", "",
        f"Recipe `{recipe.path.name}`: budget {budget.describe()}, global batch {s['global_batch']}, "
        f"{s['precision']}, seeds per model as the table's column says. "
        f"Measured {context['date']} at commit {context.get('commit') or 'unknown'} (vlzoo {context['vlzoo']}, "
        f"torch {context['torch']}) on {context['device']}"
        + (f", load average {load:.2f} at the start" if load is not None else "") + ".", "",
        "Test split, mean ± standard deviation over seeds (coco-caption BLEU-4 and CIDEr):", "",
        results_table(results), "",
        "Budget spent and cost (means over seeds; FLOPs: forward + backward, torch's flop counter on the "
        "first step; train min: training steps only; wall min: the whole run with its evaluations):", "",
        cost_table(results), "",
        *starting_points(recipe, results),
        "Differences in R@1 t2i:", "", *(noise_notes(results) or ["- one model only"]), "",
        "![learning curves](curves.png)", "",
        "Per-family settings (beyond the recipe) are in results.json (`family_settings`).", ""])
    atomic_write_text(out / "results.md", text)


def parse_results_table(markdown: str) -> dict[str, dict[str, str]]:
    """The first results table of a markdown text (``results.md``, or a README quoting it):
    model -> {column: cell}."""
    lines = [line.strip() for line in markdown.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("| model | seeds |") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            head = [c.strip() for c in line.strip("|").split("|")]
            rows = {}
            for row in lines[i + 2:]:
                if not row.startswith("|"):
                    break
                cells = [c.strip() for c in row.strip("|").split("|")]
                if len(cells) != len(head):
                    raise ValueError(f"results table row {row!r}: {len(cells)} cells, the header has {len(head)}")
                rows[cells[0]] = dict(zip(head, cells, strict=True))
            return rows
    raise ValueError("no results table (a '| model | seeds | ...' header) found")


def mean_of(cell: str) -> float | None:
    """``"0.512 ± 0.020"`` -> 0.512; ``"–"`` -> None."""
    head = cell.split("±")[0].strip()
    return None if head in ("–", "-", "") else float(head)

