"""`yolo-dysample compare`: does DySample help on *my* data? Train the variants side by side and measure.

Trains the stock Ultralytics YOLO model, the controls and the chosen DySample variants with identical settings
(data, epochs, image size, batch, seeds, optionally the same starting checkpoint through ultralytics' name-and-shape
weight transfer), evaluates each and summarises them under the usual ``runs/`` layout::

    runs/compare/<name>/
        compare_settings.json     the settings every run shares (resuming checks them)
        progress.log              one timestamped line per run started, finished or skipped
        models/                   derived model YAMLs (the bilinear control)
        pretrain/                 the fine-tuning presets' stock model, pretrained on other data
        stock-seed0/              an ordinary ultralytics training run (weights/, results.csv, args.yaml)
            compare_run.json      written last: the run is finished; its measurements
            train.log             the training subprocess's console output
        dysample-seed0/ ...
        summary.md, summary.csv   one row per variant: metrics as mean +- std over seeds, the paired difference
                                  from stock with its 95 % CI, parameters, GFLOPs, latency, time, memory
        runs.csv                  one row per training run
        latency.json              the interleaved latency measurement
        curves.png                per-epoch validation curves (from each run's results.csv), overlaid
        final_metrics.png         the final metrics as a bar chart
        paired_ci.png             the paired differences from stock with their confidence intervals

Every run trains in its own Python subprocess, so its peak memory (``ru_maxrss``) is its own and an interruption
leaves the finished runs intact. A run counts as finished once its ``compare_run.json`` exists; running the same
comparison again skips finished runs and restarts unfinished ones from scratch in an emptied folder (their partial
epochs are not reused, so every reported run is one uninterrupted training). With the same seed every variant starts
from the stock model's weights in all layers it shares with it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_dysample.compare.latency import measure_latency
from yolo_dysample.compare.plots import plot_confidence_intervals, plot_curves, plot_final_metrics
from yolo_dysample.compare.report import headline, metric_label, summarise, write_csv, write_markdown
from yolo_dysample.compare.runner import (
    RUN_DONE_FILE,
    SETTINGS_FILE,
    PlannedRun,
    choose_directory,
    comparison_lock,
    finished_record,
    plan_pretraining,
    plan_runs,
    progress_logger,
    train_in_subprocess,
    write_derived_models,
)
from yolo_dysample.compare.settings import (
    CONTROL_VARIANTS,
    DEFAULT_DATA,
    DEFAULT_MODEL,
    DEFAULT_VARIANTS,
    DYSAMPLE_VARIANTS,
    LATENCY_RUNS,
    PRESETS,
    STOCK,
    CompareError,
    CompareSettings,
    RunFailedError,
    parse_seeds,
    parse_train_args,
    parse_variants,
    resolve_settings,
    variant_model_name,
)
from yolo_dysample.compare.training import run_single_training

__all__ = [
    "CONTROL_VARIANTS",
    "DEFAULT_DATA",
    "DEFAULT_MODEL",
    "DEFAULT_VARIANTS",
    "DYSAMPLE_VARIANTS",
    "LATENCY_RUNS",
    "PRESETS",
    "RUN_DONE_FILE",
    "STOCK",
    "CompareError",
    "ComparisonResult",
    "RunFailedError",
    "compare",
    "parse_seeds",
    "parse_train_args",
    "parse_variants",
    "run_single_training",
    "variant_model_name",
]


@dataclass
class ComparisonResult:
    """What :func:`compare` wrote.

    Attributes:
        directory (Path): The comparison directory, ``<project>/<name>``.
        summary (list[dict]): One row per variant (the rows of ``summary.csv``).
        runs (list[dict]): One row per training run (the rows of ``runs.csv``).
        trained (list[str]): Runs trained by this call.
        skipped (list[str]): Runs found finished and not trained again.
        files (dict[str, Path]): ``summary_md``, ``summary_csv``, ``runs_csv``, ``curves_png``, ``final_metrics_png``,
            ``paired_ci_png``.

    """

    directory: Path
    summary: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


def compare(
    data: str | None = None,
    model: str | None = None,
    variants: str | Sequence[str] | None = None,
    seeds: str | int | Sequence[int] | None = None,
    epochs: int | None = None,
    imgsz: int | None = None,
    batch: int | float | None = None,
    device: str | None = None,
    weights: str | None = None,
    project: str | Path | None = None,
    name: str | None = None,
    preset: str | None = None,
    latency_runs: int = LATENCY_RUNS,
    progress: Callable[[str], Any] | None = print,
    **train_args: Any,
) -> ComparisonResult:
    """Train the stock model and the chosen variants with identical settings and compare them.

    Arguments left ``None`` take the preset's value (with ``preset``), else the defaults: the embedded
    ``dysample-shapes.yaml`` dataset, ``yolov8n.yaml``, variants ``dysample`` and ``dysample-plus``, seed 0, and
    ultralytics' own defaults for epochs, imgsz and batch.

    Args:
        data (str, optional): Any ultralytics dataset YAML (path or bundled name).
        model (str, optional): The stock model YAML, any family, scale and task (``yolo11s-seg.yaml``);
            the variants' YAMLs are derived by name (:func:`variant_model_name`).
        variants (str | Sequence[str], optional): e.g. ``"bilinear,dysample,dysample-plus"`` or ``"all"`` (the four
            DySample variants). ``bilinear`` is the stock YAML with bilinear upsampling.
        seeds (str | int | Sequence[int], optional): One run per seed and variant, all with ``deterministic=True``.
        epochs (int, optional): Training epochs of every run.
        imgsz (int, optional): Train / validation / latency image size, rounded up to the model's stride.
        batch (int | float, optional): Batch size (ultralytics forms: n, -1, or a GPU-memory fraction).
        device (str, optional): Ultralytics device string (``cpu``, ``0``); default: ultralytics' choice.
        weights (str, optional): A stock checkpoint every run starts from (name-and-shape weight transfer:
            everything but the DySample layers transfers into the variants).
        project (str | Path, optional): Parent directory; default ``<ultralytics runs_dir>/compare``.
        name (str, optional): Comparison directory name; default ``exp`` (the preset's name with a preset), or
            ``exp2``, ... when that holds a comparison with other settings. The same name and settings resume.
        preset (str, optional): A key of :data:`PRESETS`, e.g. ``"finetune"``.
        latency_runs (int): Interleaved latency rounds (each times every variant once); the median is reported.
        progress (Callable, optional): Receives one line per progress event; ``None`` for silence.
        **train_args (Any): Further ultralytics train arguments, identical for every run (``lr0=0.01``).
            Defaults added here: ``plots=False``, ``deterministic=True`` and, on CPU, ``workers=0``.

    Returns:
        (ComparisonResult): The directory, the summary rows and the files written.

    Raises:
        CompareError: Bad arguments (before anything trains), settings that clash with an existing comparison of
            the same name, another compare process working in it, or a run that failed (its log is named).

    Examples:
        >>> from yolo_dysample.compare import compare
        >>> result = compare(preset="scratch")  # doctest: +SKIP
        >>> print(result.files["summary_md"].read_text())  # doctest: +SKIP

    """
    settings = resolve_settings(
        data, model, variants, seeds, epochs, imgsz, batch, device, weights, project, name, preset, latency_runs,
        train_args,
    )  # fmt: skip
    directory, _ = choose_directory(settings.project, settings.name, settings.shared, settings.base_name)
    directory.mkdir(parents=True, exist_ok=True)
    with comparison_lock(directory):
        directory, resuming = choose_directory(settings.project, directory.name, settings.shared, settings.base_name)
        (directory / SETTINGS_FILE).write_text(json.dumps(settings.shared, indent=2) + "\n")
        report = progress_logger(directory, progress)
        planned = plan_runs(directory, settings, write_derived_models(directory, settings))
        _announce(directory, settings, planned, resuming, report)
        result = ComparisonResult(directory=directory)
        starting_weights = _pretrain(directory, settings, report) if settings.pretrain else settings.weights
        records = {}
        for index, run in enumerate(planned, start=1):
            records[(run.variant, run.seed)] = _train_or_skip(
                run, settings, starting_weights, f"[{index}/{len(planned)}] {run.name}", report, result
            )
        _write_outputs(result, settings, planned, records)
        report(f"summary: {result.files['summary_md']}")
    return result


def _announce(
    directory: Path, settings: CompareSettings, planned: Sequence[PlannedRun], resuming: bool, report: Callable
) -> None:
    for note in settings.notes:
        report(f"note: {note}")
    finished = sum(finished_record(run) is not None for run in planned)
    report(
        f"comparison {directory} ({'resuming, ' if resuming else ''}{finished} of {len(planned)} runs finished): "
        f"{settings.model} vs {', '.join(settings.variants)}; data {settings.data}, epochs {settings.epochs}, "
        f"imgsz {settings.imgsz}, batch {settings.batch}, seeds {','.join(map(str, settings.seeds))}"
    )


def _request(run: PlannedRun, settings: CompareSettings, weights: str | None, **overrides: Any) -> dict:
    """What the training subprocess of ``run`` reads (``overrides``: data, epochs, test_split, train_args)."""
    train_args = {
        **overrides.pop("train_args", settings.train_args),
        "epochs": overrides.pop("epochs", settings.epochs),
        "imgsz": settings.imgsz,
        "batch": settings.batch,
        "device": settings.device,
        "seed": run.seed,
        "project": str(run.directory.parent),
        "name": run.name,
        "exist_ok": True,
    }
    return {
        "settings": run.settings,
        "variant": run.variant,
        "seed": run.seed,
        "model": run.model,
        "model_file": run.model_file,
        "data": settings.data,
        "weights": weights,
        "test_split": settings.has_test_split,
        "train_args": train_args,
        **overrides,
    }


def _train_or_skip(
    run: PlannedRun,
    settings: CompareSettings,
    weights: str | None,
    prefix: str,
    report: Callable[[str], None],
    result: ComparisonResult | None = None,
    **overrides: Any,
) -> dict:
    """The run's record: found finished, or trained now (reporting each epoch)."""
    record = finished_record(run)
    if record is not None:
        report(f"{prefix}: skipped, finished earlier")
        if result is not None:
            result.skipped.append(run.name)
        return record
    epochs = overrides.get("epochs", settings.epochs)
    report(f"{prefix}: training {run.model} (epochs {epochs}, imgsz {settings.imgsz}, seed {run.seed})")
    started = time.perf_counter()

    def on_epoch(row: dict) -> None:
        metrics = ", ".join(f"{metric_label(key)} {value:.4f}" for key, value in headline(row).items())
        report(f"{prefix}: epoch {int(row.get('epoch', 0))}/{epochs} {metrics}")

    record = train_in_subprocess(run, _request(run, settings, weights, **overrides), on_epoch)
    if result is not None:
        result.trained.append(run.name)
    measured = {**record["metrics"], **record.get("test_metrics", {})}
    report(
        f"{prefix}: finished in {time.perf_counter() - started:.0f} s; "
        + ", ".join(f"{metric_label(key)} {value:.4f}" for key, value in headline(measured).items())
    )
    return record


def _pretrain(directory: Path, settings: CompareSettings, report: Callable[[str], None]) -> str:
    """Train (or find) the stock model the fine-tuning runs start from; its checkpoint."""
    run = plan_pretraining(directory, settings)
    pretrain = settings.pretrain
    train_args = {
        key: settings.train_args[key] for key in ("workers", "plots", "deterministic") if key in settings.train_args
    }
    record = _train_or_skip(
        run, settings, settings.weights, f"[pretrain] {run.name}", report,
        data=pretrain["data"], epochs=pretrain["epochs"], test_split=False,
        train_args={**train_args, **pretrain["train_args"]},
    )  # fmt: skip
    return record["checkpoint"]


def _write_outputs(
    result: ComparisonResult,
    settings: CompareSettings,
    planned: Sequence[PlannedRun],
    records: dict[tuple[str, int], dict],
) -> None:
    """Measure latency (interleaved, one process), then write the tables and plots."""
    variants = (STOCK, *settings.variants)
    directory = result.directory
    checkpoints = {}
    for run in planned:  # the first seed's checkpoint of each variant: latency depends on the architecture
        checkpoints.setdefault(run.variant, records[(run.variant, run.seed)]["checkpoint"])
    trained_size = records[(planned[0].variant, planned[0].seed)].get("imgsz", settings.imgsz)
    latency = measure_latency(directory, checkpoints, trained_size, settings.device, settings.latency_runs)
    result.runs, result.summary, headline_keys, primary = summarise(planned, records, variants, latency["variants"])
    result.files["runs_csv"] = write_csv(directory / "runs.csv", result.runs)
    result.files["summary_csv"] = write_csv(directory / "summary.csv", result.summary)
    result.files["summary_md"] = write_markdown(
        directory / "summary.md", directory.name, settings.shared, result.summary, records, headline_keys, primary,
        latency,
    )  # fmt: skip
    result.files["curves_png"] = plot_curves(directory / "curves.png", planned, variants, headline_keys)
    result.files["final_metrics_png"] = plot_final_metrics(
        directory / "final_metrics.png", result.runs, variants, headline_keys
    )
    if primary:
        result.files["paired_ci_png"] = plot_confidence_intervals(directory / "paired_ci.png", result.summary, primary)
