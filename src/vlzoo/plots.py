"""Plots people would rather look at than read: loss curves from a CSV log."""

from __future__ import annotations

import csv
import statistics
from collections import defaultdict
from pathlib import Path

from vlzoo import families


def read_csv_log(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Lightning's ``metrics.csv`` -> {metric: [(step, value), ...]} (empty cells skipped)."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                series[key].append((step, float(value)))
    return dict(series)


def plot_loss_curves(csv_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Training losses (left) and validation metrics (right) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_csv_log(csv_path)
    losses = {k: v for k, v in series.items() if k.startswith("train/") and "loss" in k}
    val = {k: v for k, v in series.items() if k.startswith("val/")}
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in sorted(losses.items()):
        ax_loss.plot(*zip(*points), label=name)
    ax_loss.set(xlabel="step", ylabel="loss", title="training loss")
    for name, points in sorted(val.items()):
        ax_val.plot(*zip(*points), marker="o", label=name)
    ax_val.set(xlabel="step", ylabel="metric", title="validation")
    for ax in (ax_loss, ax_val):
        if ax.lines:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_comparison(results: dict, out_path: str | Path, metrics: tuple[str, ...] = (
        "test/r1_t2i", "test/r1_i2t", "test/r10_t2i", "test/compositional_acc", "test/zeroshot_acc",
        "test/bleu4")) -> Path:
    """``vlzoo compare`` results: one bar per model for each test metric (left) and each
    model's training loss against the step (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, (ax_bars, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        colour = family_colour(family_of_config(results[name].get("effective_settings") or {}))
        values = [results[name]["metrics"].get(m, float("nan")) for m in metrics]
        errors = [results[name].get("std", {}).get(m, 0.0) for m in metrics]
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        ax_bars.bar(positions, values, width, yerr=errors, capsize=2, color=colour, label=name)
        log = Path(results[name]["run_dir"]) / "metrics.csv"
        if log.is_file():
            losses = read_csv_log(log).get("train/loss", [])
            if losses:
                ax_loss.plot(*zip(*losses), color=colour, label=name)
    ax_bars.set_xticks(range(len(metrics)), [m.removeprefix("test/") for m in metrics], rotation=20, fontsize=8)
    ax_bars.set(ylabel="test metric", title="test split, one recipe (error bars: std over seeds)")
    ax_loss.set(xlabel="step", ylabel="train/loss", title="training loss")
    for ax in (ax_bars, ax_loss):
        if ax.has_data():
            ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


CURVE_METRICS = (("val/r1_t2i", "val R@1 t2i"), ("val/bleu4", "val BLEU-4"), ("val/cider", "val CIDEr"))
CURVE_AXES = (("samples", "training samples"), ("flops", "training FLOPs (forward + backward)"),
              ("minutes", "training time (min)"))
LINE_STYLES = ("-", "--", ":", "-.")


def family_colour(family: str | None) -> str:
    """One colour per registered family, the same in every plot (grey: unknown)."""
    names = families.names()
    palette = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf",
               "#bcbd22", "#7f7f7f")
    return palette[names.index(family) % len(palette)] if family in names else "#444444"


def family_of_config(config: dict) -> str | None:
    """The family a run's config trains (its task's registered family), None if unknown."""
    try:
        task = families.task_by_name(config.get("model", {}).get("class_path"), "run config")
    except ValueError:
        return None
    family = families.of_task(task)
    return family.name if family is not None else None


def run_curves(run_dir: str | Path, batch: int, flops_per_step: float | None) -> dict[str, list[dict]]:
    """A run's validation points: metric -> [{samples, flops, minutes, value}], from its
    ``metrics.csv`` (``train/elapsed_s``, logged with each validation, gives the time)."""
    log = Path(run_dir) / "metrics.csv"
    if not log.is_file():
        return {}
    series = read_csv_log(log)
    elapsed = dict(series.get("train/elapsed_s", []))
    curves: dict[str, list[dict]] = {}
    for metric, _ in CURVE_METRICS:
        points = {}
        for step, value in series.get(metric, []):
            points[step] = {"step": step, "samples": step * batch, "value": value,
                            "flops": step * flops_per_step if flops_per_step else float("nan"),
                            "minutes": elapsed[step] / 60 if step in elapsed else float("nan")}
        if points:
            curves[metric] = [points[s] for s in sorted(points)]
    return curves


def mean_curves(runs: list[dict[str, list[dict]]]) -> dict[str, dict[str, list[float]]]:
    """Several seeds' curves -> per metric the mean x values and the mean, min and max of
    the metric at each step all runs reached."""
    out: dict[str, dict[str, list[float]]] = {}
    for metric, _ in CURVE_METRICS:
        per_run = [{p["step"]: p for p in r[metric]} for r in runs if metric in r]
        if not per_run:
            continue
        steps = sorted(set.intersection(*(set(r) for r in per_run)))
        if not steps:
            continue
        entry: dict[str, list[float]] = {k: [] for k in ("samples", "flops", "minutes", "mean", "low", "high")}
        for step in steps:
            values = [r[step]["value"] for r in per_run]
            for axis, _ in CURVE_AXES:
                entry[axis].append(statistics.fmean(r[step][axis] for r in per_run))
            entry["mean"].append(statistics.fmean(values))
            entry["low"].append(min(values))
            entry["high"].append(max(values))
        out[metric] = entry
    return out


def plot_curves(results: dict, out_path: str | Path, batch: int) -> Path:
    """``vlzoo compare`` learning curves: each validation metric (rows: R@1 t2i, and BLEU-4
    / CIDEr where a model captions) against training samples, FLOPs and time (columns).
    One colour per family; the line is the mean over seeds, the band their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {}
    for name, r in results.items():
        runs = [run_curves(run["run_dir"], batch, run.get("flops_per_step")) for run in r.get("runs", {}).values()]
        curves[name] = mean_curves([c for c in runs if c])
    rows = [(m, label) for m, label in CURVE_METRICS if any(m in c for c in curves.values())] or [CURVE_METRICS[0]]
    fig, axes = plt.subplots(len(rows), len(CURVE_AXES), figsize=(4.6 * len(CURVE_AXES), 3.3 * len(rows)),
                             squeeze=False)
    styles: dict[str, int] = {}
    for name, r in results.items():
        family = family_of_config(r.get("effective_settings") or {})
        colour = family_colour(family)
        style = LINE_STYLES[styles.setdefault(family or name, 0) % len(LINE_STYLES)]
        styles[family or name] += 1
        seeds = len(r.get("seeds", [])) or 1
        for row, (metric, _) in enumerate(rows):
            entry = curves[name].get(metric)
            if entry is None:
                continue
            for col, (axis, _) in enumerate(CURVE_AXES):
                ax = axes[row][col]
                ax.plot(entry[axis], entry["mean"], style, marker="o", markersize=3, color=colour,
                        label=f"{name} ({seeds} seed{'s' if seeds > 1 else ''})")
                if seeds > 1:
                    ax.fill_between(entry[axis], entry["low"], entry["high"], color=colour, alpha=0.15)
    for row, (_, label) in enumerate(rows):
        for col, (_, axis_label) in enumerate(CURVE_AXES):
            ax = axes[row][col]
            ax.set(xlabel=axis_label, ylabel=label)
            ax.grid(alpha=0.3)
            if ax.lines and row == 0 and col == 0:
                ax.legend(fontsize=8)
    fig.suptitle("learning curves under one recipe (line: mean over seeds; band: range)")
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
