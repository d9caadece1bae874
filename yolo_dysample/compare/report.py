"""The comparison's tables: runs.csv (one row per run), summary.csv and summary.md (one row per variant).

The summary gives every metric as mean ± sample standard deviation over seeds and, for the primary metric fixed in
advance (mAP50-95 on the test split when the data has one, else on the validation split), the paired difference of
each variant from stock with its t-based 95 % confidence interval and p-value.
"""

from __future__ import annotations

import csv
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from yolo_dysample.compare.runner import PlannedRun
from yolo_dysample.compare.settings import LATENCY_WARMUP, PRIMARY_METRIC, STOCK
from yolo_dysample.compare.stats import paired_difference

__all__ = ["headline", "metric_label", "primary_metric", "summarise", "write_csv", "write_markdown"]

HEADLINE_MARKERS = ("mAP", "accuracy", "mIoU", "delta1")
RUN_MEASUREMENTS = ("epochs_completed", "parameters", "gflops", "train_seconds", "cpu_seconds", "peak_rss_mib")
MEASURED = ("train_seconds", "cpu_seconds", "peak_rss_mib", "peak_cuda_mib")


def headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """The task's headline metrics (mAP50 and mAP50-95 per output, top-1/top-5 accuracy), validation then test."""
    keys = [
        key
        for key in metrics
        if key.startswith(("metrics/", "test/")) and any(marker in key for marker in HEADLINE_MARKERS)
    ]
    return {key: metrics[key] for key in keys}


def primary_metric(keys: Sequence[str]) -> str | None:
    """The metric of the paired statistics: the first mAP50-95 on the test split, else on validation."""
    for prefix in ("test/", "metrics/"):
        for key in keys:
            if key.startswith(prefix) and PRIMARY_METRIC in key:
                return key
    return keys[0] if keys else None


def metric_label(key: str) -> str:
    """``metrics/mAP50(B)`` -> ``mAP50(B)``; ``test/mAP50(B)`` -> ``test mAP50(B)``."""
    return key.removeprefix("metrics/").replace("test/", "test ", 1)


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    present = [value for value in values if value is not None]
    if not present:
        return math.nan, math.nan
    return statistics.fmean(present), (statistics.stdev(present) if len(present) > 1 else math.nan)


def _run_rows(planned: Sequence[PlannedRun], records: Mapping[tuple[str, int], dict], keys: Sequence[str]) -> list:
    rows = []
    for run in planned:
        record = records[(run.variant, run.seed)]
        metrics = {**record["metrics"], **record.get("test_metrics", {})}
        row = {"variant": run.variant, "seed": run.seed, "model": run.model, "run": str(run.directory)}
        row.update({key: metrics.get(key) for key in keys})
        row.update({key: record.get(key) for key in RUN_MEASUREMENTS})
        rows.append(row)
    return rows


def _variant_row(variant: str, runs: Sequence[dict], keys: Sequence[str], latency: Mapping[str, Any]) -> dict:
    row = {
        "variant": variant,
        "model": runs[0]["model"],
        "runs": len(runs),
        "seeds": " ".join(str(run["seed"]) for run in runs),
        "parameters": runs[0]["parameters"],
        "gflops": runs[0]["gflops"],
    }
    for key in (*keys, *MEASURED):
        row[f"{key} mean"], row[f"{key} std"] = _mean_std([run.get(key) for run in runs])
    timing = latency.get(variant, {})
    row["latency_ms median"] = timing.get("median_ms", math.nan)
    row["latency_ms q1"], row["latency_ms q3"] = timing.get("q1_ms", math.nan), timing.get("q3_ms", math.nan)
    row["latency ratio to stock"] = timing.get("ratio_to_stock", math.nan)
    return row


def summarise(
    planned: Sequence[PlannedRun],
    records: Mapping[tuple[str, int], dict],
    variants: Sequence[str],
    latency: Mapping[str, Any],
) -> tuple[list[dict], list[dict], list[str], str | None]:
    """Rows per run and per variant, the headline metric keys and the primary metric.

    Args:
        planned (Sequence[PlannedRun]): The runs, in order.
        records (Mapping): ``(variant, seed)`` -> the run's ``compare_run.json`` record.
        variants (Sequence[str]): Variant order, stock first.
        latency (Mapping): Variant -> latency statistics (``median_ms``, ``q1_ms``, ``q3_ms``, ``ratio_to_stock``).

    Returns:
        (tuple): ``runs``, ``summary``, ``headline_keys``, ``primary``.

    """
    metric_keys: list[str] = []
    for record in records.values():
        for key in (*record["metrics"], *record.get("test_metrics", {})):
            if key not in metric_keys:
                metric_keys.append(key)
    headline_keys = list(headline(dict.fromkeys(metric_keys, 0.0)))
    primary = primary_metric(headline_keys)
    runs = _run_rows(planned, records, metric_keys)
    summary = [_variant_row(v, [r for r in runs if r["variant"] == v], metric_keys, latency) for v in variants]
    if primary:
        stock = {run["seed"]: run[primary] for run in runs if run["variant"] == STOCK and run[primary] is not None}
        for row in summary:
            mine = {run["seed"]: run[primary] for run in runs if run["variant"] == row["variant"]}
            paired = paired_difference({seed: value for seed, value in mine.items() if value is not None}, stock)
            row[f"{primary} delta vs stock"] = paired.mean
            row[f"{primary} delta ci95 low"], row[f"{primary} delta ci95 high"] = paired.ci_low, paired.ci_high
            row[f"{primary} delta p"] = paired.p_value
            row[f"{primary} delta pairs"] = paired.pairs
    return runs, summary, headline_keys, primary


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def write_csv(path: Path, rows: Sequence[dict]) -> Path:
    """Write ``rows`` with the union of their keys as columns; missing values as empty cells."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if _is_missing(value) else value for key, value in row.items()})
    return path


def _format_mean_std(mean: float, std: float, digits: int, thousands: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    number_format = f",.{digits}f" if thousands else f".{digits}f"
    text = format(mean, number_format)
    return text if math.isnan(std) else f"{text} ± {format(std, number_format)}"


def _format_seconds(mean: float, std: float) -> str:
    return _format_mean_std(mean, std, 1 if not math.isnan(mean) and mean < 100 else 0, thousands=True)


def _format_latency(row: Mapping[str, Any]) -> str:
    median, q1, q3 = row["latency_ms median"], row["latency_ms q1"], row["latency_ms q3"]
    return "n/a" if math.isnan(median) else f"{median:.1f} ({q1:.1f}-{q3:.1f})"


def _format_ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _header(name: str, shared: Mapping[str, Any], records: Mapping[tuple[str, int], dict], seeds: str) -> list[str]:
    any_record = next(iter(records.values()))
    devices = sorted({record.get("device", "?") for record in records.values()})
    weights = shared["weights"] or "none (every run starts from scratch)"
    if shared.get("pretrain"):
        pretrain = shared["pretrain"]
        weights = f"the stock model pretrained {pretrain['epochs']} epochs on {pretrain['data']} (run `pretrain`)"
    extra = ", ".join(f"{key}={value}" for key, value in shared["train_args"].items())
    test_split = "yes" if shared.get("test_split") else "no"
    return [
        f"# DySample comparison `{name}`",
        "",
        f"- data: `{shared['data']}`; task: {shared['task']}; held-out test split: {test_split}",
        f"- epochs {shared['epochs']}, imgsz {shared['imgsz']}, batch {shared['batch']}, seeds {seeds}",
        f"- starting weights: {weights}",
        f"- other train arguments: {extra or 'none'}",
        f"- ultralytics {any_record['ultralytics']}, yolo-dysample {any_record['yolo_dysample']}, "
        f"torch {any_record['torch']}; device {', '.join(devices)}",
        "",
    ]


def _metrics_table(summary: Sequence[dict], headline_keys: Sequence[str], has_cuda_memory: bool) -> list[str]:
    columns = ["Variant", "Model", "Runs", *(metric_label(key) for key in headline_keys)]
    columns += ["Parameters", "GFLOPs¹", "Latency (ms)²", "vs stock²", "Train time (s)³", "CPU time (s)⁴"]
    columns.append("Peak RAM (MiB)⁵")
    if has_cuda_memory:
        columns.append("Peak GPU memory (MiB)")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(columns) - 3)) + "|"]
    for row in summary:
        cells = [row["variant"], f"`{row['model']}`", str(row["runs"])]
        cells += [_format_mean_std(row[f"{key} mean"], row[f"{key} std"], 3) for key in headline_keys]
        cells += [
            f"{row['parameters']:,}",
            f"{row['gflops']:.3g}",
            _format_latency(row),
            _format_ratio(row["latency ratio to stock"]),
            _format_seconds(row["train_seconds mean"], row["train_seconds std"]),
            _format_seconds(row["cpu_seconds mean"], row["cpu_seconds std"]),
            _format_mean_std(row["peak_rss_mib mean"], row["peak_rss_mib std"], 0, thousands=True),
        ]
        if has_cuda_memory:
            cells.append(_format_mean_std(row["peak_cuda_mib mean"], row["peak_cuda_mib std"], 0, thousands=True))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _paired_table(summary: Sequence[dict], primary: str) -> list[str]:
    label = metric_label(primary)
    lines = [
        "",
        f"Paired by seed, primary metric {label} (fixed in advance): variant − stock, mean over seeds with its "
        "Student-t 95 % confidence interval and two-sided p-value.",
        "",
        f"| Variant | Pairs | Δ {label} | 95 % CI | CI half-width | p |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in summary[1:]:
        mean, low, high = (row[f"{primary} delta {part}"] for part in ("vs stock", "ci95 low", "ci95 high"))
        p_value, pairs = row[f"{primary} delta p"], row[f"{primary} delta pairs"]
        interval = "n/a" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
        half = "n/a" if math.isnan(low) else f"{(high - low) / 2:.4f}"
        shown_mean = "n/a" if math.isnan(mean) else f"{mean:+.4f}"
        shown_p = "n/a" if math.isnan(p_value) else f"{p_value:.3f}"
        lines.append(f"| {row['variant']} | {pairs} | {shown_mean} | {interval} | {half} | {shown_p} |")
    return lines


def _footnotes(shared: Mapping[str, Any], summary: Sequence[dict], latency_info: Mapping[str, Any]) -> list[str]:
    rounds = next((timing.get("rounds") for timing in latency_info.get("variants", {}).values()), "?")
    return [
        "",
        "Metrics are those of each run's best.pt (`test` columns: evaluated once on the held-out test split at the end "
        "of the run; the others: the final validation), as mean ± sample standard deviation over the seeds (no ± "
        "with a single seed).",
        "",
        "¹ Ultralytics `model.info()` (thop) of the fused model at imgsz "
        f"{shared['imgsz']}. DySample is counted by yolo_dysample's thop rule: its offset (and scope) "
        "projection as it runs plus 4 multiply-adds per sampled output value (`grid_sample` or the CPU kernel); "
        f"the variants add {_gflops_added_text(summary)} GFLOPs to the stock model.",
        f"² Batch-1 forward pass of the fused fp32 model at imgsz {shared['imgsz']} (no pre/post-processing) on "
        f"{latency_info.get('device', '?')}, {latency_info.get('threads', '?')} threads: median (interquartile "
        f"range) of {rounds} rounds that time every variant once, interleaved in one process, after {LATENCY_WARMUP} "
        "warm-up passes each; 'vs stock' is the median of the per-round ratios.",
        "³ Wall time of the training epochs including the per-epoch validation (the `time` column of results.csv).",
        "⁴ CPU time of the run's whole process, all threads (`getrusage`): unlike wall time, hardly changed by other "
        "load on a shared machine.",
        "⁵ Peak resident memory (`ru_maxrss`) of the run's own training process, Python and torch included.",
        "",
    ]


def write_markdown(
    path: Path,
    name: str,
    shared: Mapping[str, Any],
    summary: Sequence[dict],
    records: Mapping[tuple[str, int], dict],
    headline_keys: Sequence[str],
    primary: str | None,
    latency_info: Mapping[str, Any],
) -> Path:
    """Write summary.md: the settings, one row per variant, the paired differences and the footnotes."""
    has_cuda_memory = any(record.get("peak_cuda_mib") is not None for record in records.values())
    lines = _header(name, shared, records, summary[0]["seeds"].replace(" ", ", "))
    lines += _metrics_table(summary, headline_keys, has_cuda_memory)
    if primary:
        lines += _paired_table(summary, primary)
    path.write_text("\n".join(lines + _footnotes(shared, summary, latency_info)), encoding="utf-8")
    return path


def _gflops_added_text(summary: Sequence[dict]) -> str:
    """``"0.0012"`` or ``"0.0012 to 0.0024"``: the GFLOPs the other rows add to the stock row, as thop counts."""
    added = [f"{value:.4f}" for value in sorted(row["gflops"] - summary[0]["gflops"] for row in summary[1:])]
    if not added:
        return "0"
    return added[0] if added[0] == added[-1] else f"{added[0]} to {added[-1]}"
