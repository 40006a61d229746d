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
