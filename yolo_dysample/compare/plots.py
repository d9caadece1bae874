"""The comparison's figures: per-epoch curves, final metrics, and the paired differences with their intervals."""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yolo_dysample.compare.report import metric_label
from yolo_dysample.compare.runner import PlannedRun, read_results_csv

__all__ = ["plot_confidence_intervals", "plot_curves", "plot_final_metrics"]


def _variant_colours(variants: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {variant: palette(index % 10) for index, variant in enumerate(variants)}


def _mean_band(curves: Sequence[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Per epoch: the epochs that have values, and the mean, min and max over the curves."""
    epochs, means, lows, highs = [], [], [], []
    for epoch_index in range(max((len(curve) for curve in curves), default=0)):
        values = [curve[epoch_index].get(key) for curve in curves if epoch_index < len(curve)]
        values = [value for value in values if value is not None]
        if values:
            epochs.append(epoch_index + 1)
            means.append(statistics.fmean(values))
            lows.append(min(values))
            highs.append(max(values))
    return epochs, means, lows, highs


def plot_curves(
    path: Path, planned: Sequence[PlannedRun], variants: Sequence[str], headline_keys: Sequence[str]
) -> Path:
    """Per-epoch validation curves of every variant (mean over seeds, min-max band), one panel per metric."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    histories = {run.name: read_results_csv(run.directory / "results.csv") for run in planned}
    loss_keys: list[str] = []
    for rows in histories.values():
        if rows:
            loss_keys += [key for key in rows[0] if key.startswith("val/") and key not in loss_keys]
    panels = [key for key in headline_keys if key.startswith("metrics/")] + loss_keys or ["epoch"]
    columns = min(3, len(panels))
    rows_count = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows_count), layout="constrained")
    axes = figure.subplots(rows_count, columns, squeeze=False).ravel()
    colours = _variant_colours(variants)
    for axis, key in zip(axes, panels, strict=False):  # axes may outnumber the panels
        for variant in variants:
            curves = [histories[run.name] for run in planned if run.variant == variant]
            epochs, means, lows, highs = _mean_band(curves, key)
            if not epochs:
                continue
            axis.plot(epochs, means, marker="o", markersize=3, color=colours[variant], label=variant)
            if len(curves) > 1:
                axis.fill_between(epochs, lows, highs, color=colours[variant], alpha=0.2, linewidth=0)
        axis.set_title(metric_label(key))
        axis.set_xlabel("epoch")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize="small")
    for axis in axes[len(panels) :]:
        axis.set_visible(False)
    figure.suptitle("Validation per epoch: mean over seeds (band: min to max over seeds)")
    figure.savefig(path, dpi=110)
    return path


def plot_final_metrics(path: Path, runs: Sequence[dict], variants: Sequence[str], headline_keys: Sequence[str]) -> Path:
    """Plot the final headline metrics as grouped bars: mean over seeds, std error bars, one dot per seed."""
    from matplotlib.figure import Figure

    keys = list(headline_keys) or ["epochs_completed"]
    figure = Figure(figsize=(max(6.5, 0.9 * len(keys) * len(variants) + 2), 4.5), layout="constrained")
    axis = figure.subplots()
    colours = _variant_colours(variants)
    width = 0.8 / len(variants)
    for variant_index, variant in enumerate(variants):
        variant_runs = [run for run in runs if run["variant"] == variant]
        for key_index, key in enumerate(keys):
            values = [run[key] for run in variant_runs if run.get(key) is not None]
            if not values:
                continue
            position = key_index + (variant_index - (len(variants) - 1) / 2) * width
            mean = statistics.fmean(values)
            std = statistics.stdev(values) if len(values) > 1 else None
            label = variant if key_index == 0 else None
            axis.bar(position, mean, width * 0.9, yerr=std, capsize=3, color=colours[variant], label=label)
            axis.scatter([position] * len(values), values, s=10, color="black", zorder=3)
    axis.set_xticks(range(len(keys)), [metric_label(key) for key in keys])
    axis.set_ylabel("final value")
    axis.grid(axis="y", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    axis.set_title("Final metrics: bar = mean over seeds, whisker = std, dot = one seed", fontsize="medium")
    figure.savefig(path, dpi=110)
    return path


def plot_confidence_intervals(path: Path, summary: Sequence[Mapping[str, Any]], primary: str) -> Path:
    """Each variant's paired difference from stock with its 95 % confidence interval, against the zero line."""
    from matplotlib.figure import Figure

    rows = list(summary[1:])
    figure = Figure(figsize=(6.5, 1.2 + 0.6 * len(rows)), layout="constrained")
    axis = figure.subplots()
    colours = _variant_colours([row["variant"] for row in summary])
    for position, row in enumerate(rows):
        mean, low, high = (row[f"{primary} delta {part}"] for part in ("vs stock", "ci95 low", "ci95 high"))
        if math.isnan(mean):
            continue
        error = None if math.isnan(low) else [[mean - low], [high - mean]]
        axis.errorbar(mean, position, xerr=error, fmt="o", capsize=4, color=colours[row["variant"]])
    axis.axvline(0.0, color="black", linewidth=0.8)
    axis.set_yticks(range(len(rows)), [row["variant"] for row in rows])
    axis.invert_yaxis()
    axis.set_xlabel(f"Δ {metric_label(primary)} vs stock (paired by seed)")
    axis.grid(axis="x", alpha=0.3)
    axis.set_title("Mean paired difference from stock, Student-t 95 % CI", fontsize="medium")
    figure.savefig(path, dpi=110)
    return path
