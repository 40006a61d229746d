"""Plots people would rather look at than read: loss curves from a CSV log."""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path


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
        values = [results[name]["metrics"].get(m, float("nan")) for m in metrics]
        positions = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        ax_bars.bar(positions, values, width, label=name)
        log = Path(results[name]["run_dir"]) / "metrics.csv"
        if log.is_file():
            losses = read_csv_log(log).get("train/loss", [])
            if losses:
                ax_loss.plot(*zip(*losses), label=name)
    ax_bars.set_xticks(range(len(metrics)), [m.removeprefix("test/") for m in metrics], rotation=20, fontsize=8)
    ax_bars.set(ylabel="test metric", title="test split, one recipe")
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
