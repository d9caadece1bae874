"""`yolo-dysample compare`: does DySample help on *my* data? Train both and measure.

Trains the stock Ultralytics YOLO model and the chosen DySample variants with identical settings
(data, epochs, image size, batch, seeds, optionally the same stock checkpoint as the starting point
through ultralytics' name-and-shape weight transfer), validates each, and summarises them under
the usual ``runs/`` layout::

    runs/compare/<name>/
        compare_settings.json     the settings every run shares (resuming checks them)
        progress.log              one timestamped line per run started, finished or skipped
        stock-seed0/              an ordinary ultralytics training run (weights/, results.csv, args.yaml)
            compare_run.json      written last: the run is finished; its measurements
            train.log             the training subprocess's console output
        dysample-seed0/ ...
        summary.md, summary.csv   one row per variant: metrics as mean +- std over seeds, parameters,
                                  GFLOPs, latency, training time, peak memory
        runs.csv                  one row per training run
        curves.png                per-epoch validation curves (from each run's results.csv), overlaid
        final_metrics.png         the final metrics as a bar chart

Every run trains in its own Python subprocess, so its peak memory (``ru_maxrss``) is its own and an
interruption leaves the finished runs intact. A run counts as finished once its
``compare_run.json`` exists; running the same comparison again skips finished runs and restarts
unfinished ones from scratch (their partial epochs are not reused, so every reported run is one
uninterrupted training).

This file holds :func:`compare` (the Python API behind the command), the presets (:data:`PRESETS`,
the small-object benchmark), the per-run entry point of the subprocess
(:func:`run_single_training`), and the table and plot writers.
"""

from __future__ import annotations

import csv
import difflib
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

__all__ = [
    "DYSAMPLE_VARIANTS",
    "PRESETS",
    "STOCK",
    "ComparisonResult",
    "CompareError",
    "RunFailedError",
    "compare",
    "parse_seeds",
    "parse_variants",
    "run_single_training",
    "variant_model_name",
]

STOCK = "stock"
DYSAMPLE_VARIANTS = ("dysample", "dysample-plus", "dysample-s", "dysample-s-plus")  # suffix of the model YAML name
DEFAULT_VARIANTS = ("dysample", "dysample-plus")
DEFAULT_DATA = "dysample-shapes.yaml"
DEFAULT_MODEL = "yolov8n.yaml"
DEFAULT_NAME = "exp"
LATENCY_RUNS = 50  # timed forward passes per run (median reported)
LATENCY_WARMUP = 5

SETTINGS_FILE = "compare_settings.json"
RUN_REQUEST_FILE = "compare_request.json"
RUN_DONE_FILE = "compare_run.json"  # written last by a finished run: the resume marker
RUN_LOG_FILE = "train.log"
PROGRESS_LOG_FILE = "progress.log"
RUN_MEASUREMENTS = (
    "epochs_completed",
    "parameters",
    "gflops",
    "latency_ms",
    "train_seconds",
    "cpu_seconds",
    "peak_rss_mib",
    "peak_cuda_mib",
)

# Arguments compare() sets itself; as key=value train arguments they would make the runs differ.
RESERVED_TRAIN_ARGS = {
    "model": "--model",
    "data": "--data",
    "epochs": "--epochs",
    "imgsz": "--imgsz",
    "batch": "--batch",
    "seed": "--seeds",
    "device": "--device",
    "pretrained": "--weights",
    "project": "--project",
    "name": "--name",
    "exist_ok": None,
    "resume": None,
    "mode": None,
    "task": None,
    "cfg": None,
    "save_dir": None,
}
# Execution details: they do not change what a run learns, so a resumed comparison may change them.
EXECUTION_ARGS = ("device", "workers", "latency_runs")

PRESETS: dict[str, dict[str, Any]] = {
    # The small-object benchmark (docs/small_object_benchmark.md): the embedded dataset's 3-12 px shapes,
    # YOLOv8n from scratch at the images' native 256 px, stock nearest vs DySample vs DySample+, 3 seeds.
    # Scale augmentation is off: at its default (+-50 %) it shrinks 3 px objects to 1.5 px. Mosaic is off too: with
    # 15 epochs, ultralytics' close_mosaic=10 would leave it on for the first 5 only; one input distribution throughout.
    "small-objects": {
        "data": DEFAULT_DATA,
        "model": DEFAULT_MODEL,
        "variants": ("dysample", "dysample-plus"),
        "seeds": (0, 1, 2),
        "epochs": 15,
        "imgsz": 256,
        "batch": 8,
        # nbs=8: an optimizer step every batch. Ultralytics' default nbs=64 accumulates 8 batches: 3 steps per
        # epoch on 192 images. In a trial with it, nothing was detected after 8 epochs; with this preset, mAP50
        # was 0.30 by then.
        "train_args": {"nbs": 8, "mosaic": 0.0, "scale": 0.0, "warmup_epochs": 1.0},
    },
}


class CompareError(Exception):
    """A comparison cannot start: bad arguments, or settings that clash with an existing comparison."""


class RunFailedError(CompareError):
    """A training run failed; the message names its log and quotes its last lines."""


@dataclass
class ComparisonResult:
    """What :func:`compare` wrote.

    Attributes:
        directory (Path): The comparison directory, ``<project>/<name>``.
        summary (list[dict]): One row per variant (the rows of ``summary.csv``).
        runs (list[dict]): One row per training run (the rows of ``runs.csv``).
        trained (list[str]): Runs trained by this call.
        skipped (list[str]): Runs found finished and not trained again.
        files (dict[str, Path]): ``summary_md``, ``summary_csv``, ``runs_csv``, ``curves_png``, ``final_metrics_png``.

    """

    directory: Path
    summary: list[dict] = field(default_factory=list)
    runs: list[dict] = field(default_factory=list)
    trained: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)


@dataclass
class _PlannedRun:
    variant: str
    seed: int
    model: str  # model YAML name or path
    directory: Path
    settings: dict  # identity of the run: a finished run with equal settings is reused

    @property
    def name(self) -> str:
        return self.directory.name


# --------------------------------------------------------------------------------------------------- arguments
def parse_seeds(seeds: str | int | Iterable[int]) -> tuple[int, ...]:
    """Seeds as a tuple of distinct whole numbers >= 0, from ``"0,1,2"``, ``3`` (a single seed) or a sequence.

    Raises:
        CompareError: A seed is not a whole number >= 0, or a seed repeats, or there is none.

    """
    if isinstance(seeds, str):
        items: list[Any] = [item.strip() for item in seeds.split(",")]
    elif isinstance(seeds, Iterable):
        items = list(seeds)
    else:
        items = [seeds]
    parsed = []
    for item in items:
        if isinstance(item, str) and re.fullmatch(r"\d+", item):
            item = int(item)
        if isinstance(item, bool) or not isinstance(item, int) or item < 0:
            raise CompareError(f"seeds: {item!r} is not a whole number >= 0 (give seeds like 0,1,2)")
        parsed.append(item)
    if not parsed:
        raise CompareError("seeds: give at least one seed, e.g. 0 or 0,1,2")
    if len(set(parsed)) != len(parsed):
        raise CompareError(f"seeds: {','.join(map(str, parsed))} repeats a seed; the runs would be identical")
    return tuple(parsed)


def parse_variants(variants: str | Iterable[str]) -> tuple[str, ...]:
    """DySample variants to compare with the stock model, from ``"dysample,dysample-plus"``, ``"all"`` or a sequence.

    ``stock`` may be listed; it is always trained anyway, as the baseline, and always comes first.

    Raises:
        CompareError: An unknown variant (the message lists the known ones), a repeat, or none.

    """
    items = [item.strip() for item in variants.split(",")] if isinstance(variants, str) else list(variants)
    if items == ["all"]:
        return DYSAMPLE_VARIANTS
    parsed = []
    for item in items:
        if not isinstance(item, str) or item.lower() not in (STOCK, *DYSAMPLE_VARIANTS):
            known = ", ".join(DYSAMPLE_VARIANTS)
            hint = difflib.get_close_matches(str(item).lower(), DYSAMPLE_VARIANTS, n=1)
            hint_text = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CompareError(f"unknown variant {item!r}{hint_text}; known variants: {known}, or 'all'")
        if item.lower() != STOCK:
            parsed.append(item.lower())
    if len(set(parsed)) != len(parsed):
        raise CompareError(f"variants: {','.join(parsed)} lists a variant twice")
    if not parsed:
        raise CompareError(f"variants: give at least one DySample variant ({', '.join(DYSAMPLE_VARIANTS)})")
    return tuple(parsed)


def variant_model_name(model: str | Path, variant: str) -> str:
    """Derive the model YAML of ``variant`` from the stock model YAML by name.

    ``yolov8n.yaml`` -> ``yolov8n-dysample.yaml``; ``yolo11s-seg.yaml`` -> ``yolo11s-seg-dysample-plus.yaml``;
    a path keeps its directory. ``stock`` returns ``model`` unchanged.
    """
    model = str(model)
    if variant == STOCK:
        return model
    path = Path(model)
    return str(path.with_name(f"{path.stem}-{variant}{path.suffix}"))


def _whole_number(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise CompareError(f"{name}={value!r} must be a whole number >= {minimum}")
    return value


def _batch_size(value: Any) -> int | float:
    """Ultralytics' batch forms: a whole number >= 1, -1 (AutoBatch) or a fraction in (0, 1) of GPU memory."""
    if isinstance(value, str):
        from ultralytics.cfg import smart_value

        value = smart_value(value.strip())
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompareError(f"batch={value!r} must be a whole number >= 1, -1 (AutoBatch) or a fraction in (0, 1)")
    if value == -1 or (isinstance(value, int) and value >= 1) or 0 < value < 1:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    raise CompareError(f"batch={value!r} must be a whole number >= 1, -1 (AutoBatch) or a fraction in (0, 1)")


def parse_train_args(pairs: Iterable[str]) -> dict[str, Any]:
    """Parse ``key=value`` ultralytics train arguments (values typed the way the ``yolo`` CLI types them)."""
    from ultralytics.cfg import smart_value

    parsed = {}
    for pair in pairs:
        key, separator, value = pair.partition("=")
        if not separator or not key.strip():
            raise CompareError(f"{pair!r} is not a key=value train argument (e.g. lr0=0.01)")
        parsed[key.strip()] = smart_value(value.strip())
    _check_not_reserved(parsed)
    return parsed


def _check_not_reserved(train_args: Iterable[str]) -> None:
    for key in train_args:
        if key in RESERVED_TRAIN_ARGS:
            option = RESERVED_TRAIN_ARGS[key]
            advice = f"use {option}" if option else "compare sets it for every run"
            raise CompareError(f"train argument {key!r} cannot be passed through: {advice}")


def _check_train_args(train_args: Mapping[str, Any]) -> dict[str, Any]:
    """Reject unknown, reserved or ill-typed ultralytics train arguments with a clear message."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    _check_not_reserved(train_args)
    for key in train_args:
        if key not in DEFAULT_CFG_DICT:
            hint = difflib.get_close_matches(key, DEFAULT_CFG_DICT, n=1)
            hint_text = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CompareError(f"unknown ultralytics train argument {key!r}{hint_text}")
    checked = dict(train_args)
    try:
        check_cfg(checked)
    except (TypeError, ValueError) as error:
        raise CompareError(f"train argument: {error}") from None
    return checked


def _identity_of_file_argument(value: str) -> str:
    """Identify a local file by its absolute path, a bare name (resolved by ultralytics) by itself."""
    path = Path(value).expanduser()
    return str(path.resolve()) if path.is_file() else value


# --------------------------------------------------------------------------------------------------- resolution
def _import_ultralytics_integration() -> None:
    """Register DySample with ultralytics (the adapter also makes bundled YAML names resolvable)."""
    from yolo_dysample import register_with_ultralytics

    register_with_ultralytics()  # idempotent; the import alone registers too (yolo_dysample._autoload)


def _load_model_yaml(model: str, role: str) -> dict:
    """Parse a model YAML, or raise a CompareError that names ``role`` (what the YAML is for)."""
    from ultralytics.nn.tasks import yaml_model_load

    if not str(model).endswith((".yaml", ".yml")):
        raise CompareError(
            f"{role} {model!r} must be a model YAML (e.g. yolov8n.yaml); to start from a trained checkpoint "
            "pass it with --weights, e.g. --model yolov8n.yaml --weights yolov8n.pt"
        )
    try:
        return yaml_model_load(model)
    except (FileNotFoundError, OSError) as error:
        raise CompareError(f"{role} {model!r} not found ({error})") from None


def _check_dataset(data: str, task: str) -> None:
    """Resolve the dataset (generating or downloading it now, not inside the first timed run)."""
    from ultralytics.data.utils import check_cls_dataset, check_det_dataset

    if str(data).endswith((".yaml", ".yml")) and "://" not in str(data):
        from ultralytics.utils.checks import check_file

        if not check_file(data, hard=False):
            raise CompareError(f"data file {data!r} not found (give a dataset YAML path or a bundled name)")
    try:
        if task == "classify":
            check_cls_dataset(data)
        else:
            check_det_dataset(data)
    except Exception as error:  # ultralytics raises FileNotFoundError, RuntimeError, SyntaxError, ...
        raise CompareError(f"data {data!r} cannot be used: {error}") from None


# --------------------------------------------------------------------------------------------------- the comparison
def _progress_logger(directory: Path, progress: Callable[[str], Any] | None) -> Callable[[str], None]:
    def report(message: str) -> None:
        if progress is not None:
            progress(message)
        with open(directory / PROGRESS_LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")

    return report


def _comparison_directory(
    project: Path, name: str | None, shared_settings: dict, base_name: str = DEFAULT_NAME
) -> tuple[Path, bool]:
    """Pick ``project/name``; with no name, the first ``exp``, ``exp2``, ... holding these settings or else free.

    Returns:
        (tuple): The directory and whether it already held a comparison with these settings.

    Raises:
        CompareError: An explicitly named directory holds a comparison with other settings.

    """
    candidates = [name] if name else [base_name] + [f"{base_name}{index}" for index in range(2, 10_000)]
    for candidate in candidates:
        directory = project / candidate
        settings_file = directory / SETTINGS_FILE
        if not directory.exists() or (directory.is_dir() and not any(directory.iterdir())):
            return directory, False
        if settings_file.is_file():
            stored = json.loads(settings_file.read_text())
            if stored == shared_settings:
                return directory, True
            if name:
                keys = {*stored, *shared_settings}
                changed = sorted(key for key in keys if stored.get(key) != shared_settings.get(key))
                details = "; ".join(f"{key}: {stored.get(key)!r} -> {shared_settings.get(key)!r}" for key in changed)
                raise CompareError(
                    f"{directory} holds a comparison with other settings ({details}); "
                    "pass another --name (or delete that directory) to start a new one"
                )
        elif name:
            raise CompareError(f"{directory} exists and is not a comparison directory; pass another --name")
    raise CompareError(f"no free comparison directory under {project}")


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
    """Train the stock model and DySample variants with identical settings and compare them.

    Arguments left ``None`` take the preset's value (with ``preset``), else the defaults: the
    embedded ``dysample-shapes.yaml`` dataset, ``yolov8n.yaml``, variants ``dysample`` and
    ``dysample-plus``, seed 0, and ultralytics' own defaults for epochs, imgsz and batch.

    Args:
        data (str, optional): Any ultralytics dataset YAML (path or bundled name).
        model (str, optional): The stock model YAML, any family, scale and task (``yolo11s-seg.yaml``);
            the variants' YAMLs are derived by name (:func:`variant_model_name`).
        variants (str | Sequence[str], optional): DySample variants, e.g. ``"dysample,dysample-plus"`` or ``"all"``.
        seeds (str | int | Sequence[int], optional): One run per seed and variant, all with ``deterministic=True``.
        epochs (int, optional): Training epochs of every run.
        imgsz (int, optional): Train / validation / latency image size.
        batch (int | float, optional): Batch size (ultralytics forms: n, -1, or a GPU-memory fraction).
        device (str, optional): Ultralytics device string (``cpu``, ``0``); default: ultralytics' choice.
        weights (str, optional): A stock checkpoint every run starts from (name-and-shape weight transfer:
            everything but the DySample layers transfers into the variants).
        project (str | Path, optional): Parent directory; default ``<ultralytics runs_dir>/compare``.
        name (str, optional): Comparison directory name; default ``exp`` (the preset's name with a preset), or
            ``exp2``, ... when that holds a comparison with other settings. The same name and settings resume.
        preset (str, optional): A key of :data:`PRESETS`, e.g. ``"small-objects"``.
        latency_runs (int): Timed batch-1 forward passes per run; the median is reported.
        progress (Callable, optional): Receives one line per progress event; ``None`` for silence.
        **train_args (Any): Further ultralytics train arguments, identical for every run (``lr0=0.01``).
            Defaults added here: ``plots=False`` and, on CPU, ``workers=0``.

    Returns:
        (ComparisonResult): The directory, the summary rows and the files written.

    Raises:
        CompareError: Bad arguments (before anything trains), settings that clash with an existing
            comparison of the same name, or a run that failed (its log is named).

    Examples:
        >>> from yolo_dysample.compare import compare
        >>> result = compare(preset="small-objects")  # doctest: +SKIP
        >>> print(result.files["summary_md"].read_text())  # doctest: +SKIP

    """
    # ---- arguments: preset, defaults, validation (nothing is written before they all pass)
    preset_values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise CompareError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
        preset_values = PRESETS[preset]
    from ultralytics.cfg import DEFAULT_CFG_DICT

    def chosen(value: Any, key: str, default: Any) -> Any:
        """Return the explicit value, else the preset's, else the default."""
        return value if value is not None else preset_values.get(key, default)

    data = str(chosen(data, "data", DEFAULT_DATA))
    model = str(chosen(model, "model", DEFAULT_MODEL))
    chosen_variants = parse_variants(chosen(variants, "variants", DEFAULT_VARIANTS))
    chosen_seeds = parse_seeds(chosen(seeds, "seeds", (0,)))
    epochs = _whole_number("epochs", chosen(epochs, "epochs", DEFAULT_CFG_DICT["epochs"]), 1)
    imgsz = _whole_number("imgsz", chosen(imgsz, "imgsz", DEFAULT_CFG_DICT["imgsz"]), 32)
    batch = _batch_size(chosen(batch, "batch", DEFAULT_CFG_DICT["batch"]))
    latency_runs = _whole_number("latency_runs", latency_runs, 1)
    extra_args = {**preset_values.get("train_args", {}), **_check_train_args(train_args)}
    extra_args = _check_train_args(extra_args)
    if weights is not None:
        weights_path = Path(weights).expanduser()
        if not weights_path.is_file():
            raise CompareError(f"weights file {weights!r} not found (give a stock checkpoint, e.g. yolov8n.pt)")
        weights = str(weights_path.resolve())
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise CompareError(f"name={name!r} must be a plain directory name")

    _import_ultralytics_integration()
    stock_yaml = _load_model_yaml(model, "model")
    variant_models = {STOCK: model}
    for variant in chosen_variants:
        variant_models[variant] = variant_model_name(model, variant)
        _load_model_yaml(variant_models[variant], f"variant {variant!r}: model YAML")

    from ultralytics.nn.tasks import guess_model_task

    task = guess_model_task(stock_yaml)
    _check_dataset(data, task)

    from ultralytics.utils.torch_utils import select_device

    visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")  # select_device sets it; the runs must see the original
    try:
        selected_device = select_device("" if device is None else str(device), verbose=False)
    except Exception as error:  # ultralytics explains what is missing (no CUDA, bad index, ...)
        raise CompareError(f"device={device!r}: {str(error).strip().splitlines()[0]}") from None
    finally:
        if visible_devices is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    uses_cuda = selected_device.type == "cuda"
    if device is None and not uses_cuda:
        device = "cpu"
    if not uses_cuda:
        extra_args.setdefault("workers", 0)  # tiny CPU datasets: worker processes cost more than they save
    extra_args.setdefault("plots", False)
    extra_args.setdefault("deterministic", True)

    # ---- the comparison directory and its runs
    from ultralytics.utils import SETTINGS

    if project is None:
        project_dir = Path(SETTINGS["runs_dir"]) / "compare"
    else:
        project_dir = Path(project).expanduser().resolve()
    shared_settings = {
        "data": _identity_of_file_argument(data),
        "model": _identity_of_file_argument(model),
        "task": task,
        "epochs": epochs,
        "imgsz": imgsz,
        "batch": batch,
        "weights": weights,
        "train_args": {key: value for key, value in sorted(extra_args.items()) if key not in EXECUTION_ARGS},
    }
    shared_settings = json.loads(json.dumps(shared_settings))  # as stored: tuples become lists
    directory, resuming = _comparison_directory(project_dir, name, shared_settings, preset or DEFAULT_NAME)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / SETTINGS_FILE).write_text(json.dumps(shared_settings, indent=2) + "\n")
    report = _progress_logger(directory, progress)

    planned = []
    for seed in chosen_seeds:  # seed-major: an interrupted comparison still holds complete seeds
        for variant in (STOCK, *chosen_variants):
            run_settings = {**shared_settings, "variant": variant, "seed": seed, "model": variant_models[variant]}
            run_directory = directory / f"{variant}-seed{seed}"
            planned.append(_PlannedRun(variant, seed, variant_models[variant], run_directory, run_settings))

    finished_earlier = [run for run in planned if _finished_record(run) is not None]
    report(
        f"comparison {directory} ({'resuming, ' if resuming else ''}{len(finished_earlier)} of {len(planned)} runs "
        f"finished): {model} vs {', '.join(chosen_variants)}; data {data}, epochs {epochs}, imgsz {imgsz}, "
        f"batch {batch}, seeds {','.join(map(str, chosen_seeds))}"
    )
    result = ComparisonResult(directory=directory)
    for index, run in enumerate(planned, start=1):
        prefix = f"[{index}/{len(planned)}] {run.name}"
        if _finished_record(run) is not None:
            report(f"{prefix}: skipped, finished earlier")
            result.skipped.append(run.name)
            continue
        report(f"{prefix}: training {run.model} (epochs {epochs}, imgsz {imgsz}, seed {run.seed})")
        started = time.perf_counter()
        record = _train_in_subprocess(
            run,
            train_args={**extra_args, "epochs": epochs, "imgsz": imgsz, "batch": batch, "device": device},
            data=data,
            weights=weights,
            latency_runs=latency_runs,
            report=lambda message, prefix=prefix: report(f"{prefix}: {message}"),
        )
        result.trained.append(run.name)
        report(
            f"{prefix}: finished in {time.perf_counter() - started:.0f} s; "
            + ", ".join(f"{_metric_label(key)} {value:.4f}" for key, value in _headline(record["metrics"]).items())
        )

    records = {(run.variant, run.seed): _finished_record(run) for run in planned}
    vanished = [run.name for run in planned if records[(run.variant, run.seed)] is None]
    if vanished:  # deleted while this comparison ran
        raise RunFailedError(f"runs {', '.join(vanished)} lost their {RUN_DONE_FILE}; run the comparison again")
    _write_summary(result, planned, records, (STOCK, *chosen_variants), shared_settings, latency_runs)
    report(f"summary: {result.files['summary_md']}")
    return result


def _finished_record(run: _PlannedRun) -> dict | None:
    """Return the run's measurements if it finished with the same settings; raise if with other settings."""
    done_file = run.directory / RUN_DONE_FILE
    if not done_file.is_file():
        return None
    record = json.loads(done_file.read_text())
    if record.get("settings") != run.settings:
        raise CompareError(
            f"{run.directory} was trained with other settings; pass another --name (or delete that run directory)"
        )
    return record


def _train_in_subprocess(
    run: _PlannedRun,
    train_args: dict,
    data: str,
    weights: str | None,
    latency_runs: int,
    report: Callable[[str], None],
    poll_seconds: float = 2.0,
) -> dict:
    """Train, validate and measure one run in a fresh Python process; report each finished epoch."""
    run.directory.mkdir(parents=True, exist_ok=True)
    for stale in (RUN_DONE_FILE, "results.csv"):
        (run.directory / stale).unlink(missing_ok=True)
    request = {
        "settings": run.settings,
        "variant": run.variant,
        "seed": run.seed,
        "model": run.model,
        "data": data,
        "weights": weights,
        "train_args": {
            **train_args,
            "seed": run.seed,
            "project": str(run.directory.parent),
            "name": run.directory.name,
            "exist_ok": True,
        },
        "latency_runs": latency_runs,
        "latency_warmup": LATENCY_WARMUP,
    }
    request_file = run.directory / RUN_REQUEST_FILE
    request_file.write_text(json.dumps(request, indent=2) + "\n")
    command = [
        sys.executable,
        "-c",
        "import sys; from yolo_dysample.compare import run_single_training; sys.exit(run_single_training(sys.argv[1]))",
        str(request_file),
    ]
    log_file = run.directory / RUN_LOG_FILE
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    results_csv = run.directory / "results.csv"
    epochs = train_args["epochs"]
    reported_epochs = 0
    with open(log_file, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment)
        try:
            while True:
                try:
                    process.wait(timeout=poll_seconds)
                    finished = True
                except subprocess.TimeoutExpired:
                    finished = False
                rows = _read_results_csv(results_csv)
                for row in rows[reported_epochs:]:
                    metrics = ", ".join(f"{_metric_label(key)} {value:.4f}" for key, value in _headline(row).items())
                    report(f"epoch {int(row.get('epoch', reported_epochs + 1))}/{epochs} {metrics}")
                reported_epochs = max(reported_epochs, len(rows))
                if finished:
                    break
        except BaseException:  # KeyboardInterrupt included: never leave a training process behind
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
            raise
    done_file = run.directory / RUN_DONE_FILE
    if process.returncode != 0 or not done_file.is_file():
        tail = "".join(_last_lines(log_file, 25))
        raise RunFailedError(
            f"run {run.name} failed (exit code {process.returncode}); full log: {log_file}\n--- last lines ---\n{tail}"
        )
    return json.loads(done_file.read_text())


def _last_lines(path: Path, count: int) -> list[str]:
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return [line + "\n" for line in text.splitlines() if line.strip()][-count:]


def _read_results_csv(path: Path) -> list[dict[str, float]]:
    """Rows of an ultralytics results.csv as floats (column names stripped); [] if missing or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except OSError:
        return []
    parsed = []
    for row in rows:
        try:
            parsed.append({key.strip(): float(value) for key, value in row.items() if key and value not in (None, "")})
        except ValueError:
            continue  # a row being written right now
    return parsed


# --------------------------------------------------------------------------------------------------- one run (child)
def run_single_training(request_file: str | Path) -> int:
    """Train, validate and measure one run described by ``request_file``; the subprocess entry point.

    Writes ``compare_run.json`` beside the request when, and only when, everything succeeded.

    Returns:
        (int): The process exit code, 0 on success.

    """
    request = json.loads(Path(request_file).read_text())
    run_directory = Path(request_file).parent
    _import_ultralytics_integration()
    import torch
    from ultralytics import YOLO
    from ultralytics import __version__ as ultralytics_version
    from ultralytics.nn.tasks import load_checkpoint

    import yolo_dysample

    model = YOLO(request["model"])
    transferred: dict[str, int] = {}
    if request["weights"]:
        source_model = load_checkpoint(request["weights"])[0]
        source_state = {key: value.float() for key, value in source_model.state_dict().items()}
        # pretrained=<path>, not model.load(): the trainer then transfers straight into the model built for the
        # dataset's classes. model.load() would go through the YAML's 80-class model first and lose the class head.
        request["train_args"]["pretrained"] = request["weights"]

        def count_transferred_tensors(trainer: Any) -> None:
            """Tensors of the model about to train that equal the checkpoint's (the weight transfer, verified)."""
            from ultralytics.utils.torch_utils import unwrap_model

            target_state = unwrap_model(trainer.model).state_dict()
            transferred["from_weights"] = sum(
                1
                for key, value in target_state.items()
                if key in source_state
                and value.shape == source_state[key].shape
                and torch.equal(value.detach().float().cpu(), source_state[key])
            )
            transferred["total"] = len(target_state)

        model.add_callback("on_pretrain_routine_end", count_transferred_tensors)

    train_start = time.perf_counter()
    metrics = model.train(data=request["data"], **request["train_args"])
    train_wall_seconds = time.perf_counter() - train_start
    trainer = model.trainer
    rows = _read_results_csv(Path(trainer.save_dir) / "results.csv")
    checkpoint = trainer.best if Path(trainer.best).exists() else trainer.last

    imgsz = int(request["train_args"]["imgsz"])
    network = YOLO(checkpoint).model.float().fuse().eval()
    _layers, parameters, _gradients, gflops = network.info(verbose=True, imgsz=imgsz)
    device = trainer.device
    network.to(device)
    latency_ms = _median_latency_ms(network, imgsz, device, request["latency_runs"], request["latency_warmup"])

    peak_rss_mib, cpu_seconds = _process_usage()
    peak_cuda_mib = torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None

    record = {
        "settings": request["settings"],
        "variant": request["variant"],
        "seed": request["seed"],
        "model": request["model"],
        "metrics": {key: float(value) for key, value in metrics.results_dict.items() if key != "fitness"},
        "epochs_completed": len(rows),
        "train_seconds": rows[-1]["time"] if rows and "time" in rows[-1] else train_wall_seconds,
        "train_call_seconds": train_wall_seconds,  # model.train() as a whole: setup and final validation too
        "cpu_seconds": cpu_seconds,  # the whole process, all threads: the load-independent twin of wall time
        "parameters": int(parameters),
        "gflops": float(gflops),
        "latency_ms": latency_ms,
        "latency_device": str(device),
        "peak_rss_mib": peak_rss_mib,
        "peak_cuda_mib": peak_cuda_mib,
        "weights_transferred": transferred or None,  # {"from_weights": n, "total": m} state-dict tensors
        "checkpoint": str(checkpoint),
        "ultralytics": ultralytics_version,
        "yolo_dysample": yolo_dysample.__version__,
        "torch": torch.__version__,
        "finished": datetime.now().isoformat(timespec="seconds"),
    }
    temporary = run_directory / (RUN_DONE_FILE + ".tmp")
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(temporary, run_directory / RUN_DONE_FILE)  # atomic: the marker exists only when complete
    return 0


def _process_usage() -> tuple[float | None, float]:
    """Peak resident memory of this process in MiB (``None`` where unknown) and its CPU seconds, all threads."""
    try:
        import resource
    except ImportError:  # Windows
        times = os.times()
        return None, times.user + times.system
    usage = resource.getrusage(resource.RUSAGE_SELF)
    peak_rss_mib = usage.ru_maxrss / 2**20 if sys.platform == "darwin" else usage.ru_maxrss / 2**10  # bytes / KiB
    return peak_rss_mib, usage.ru_utime + usage.ru_stime


def _median_latency_ms(network: Any, imgsz: int, device: Any, runs: int, warmup: int) -> float:
    """Median wall time of a batch-1 forward pass at ``imgsz``, in milliseconds."""
    import torch

    image = torch.zeros(1, 3, imgsz, imgsz, device=device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    timings = []
    with torch.inference_mode():
        for _ in range(warmup):
            network(image)
        synchronize()
        for _ in range(runs):
            started = time.perf_counter()
            network(image)
            synchronize()
            timings.append(time.perf_counter() - started)
    return statistics.median(timings) * 1000


# --------------------------------------------------------------------------------------------------- the summary
HEADLINE_MARKERS = ("mAP", "accuracy", "mIoU", "delta1")


def _headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """Pick the task's headline metrics (mAP50 and mAP50-95 per output, or top-1/top-5 accuracy), in order."""
    keys = [key for key in metrics if key.startswith("metrics/") and any(marker in key for marker in HEADLINE_MARKERS)]
    return {key: metrics[key] for key in keys}


def _primary_metric(keys: Sequence[str]) -> str | None:
    for key in keys:
        if "mAP50-95" in key:
            return key
    return keys[0] if keys else None


def _metric_label(key: str) -> str:
    return key.removeprefix("metrics/")


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [value for value in values if value is not None]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def _format_mean_std(mean: float, std: float, digits: int, thousands: bool = False) -> str:
    if math.isnan(mean):
        return "n/a"
    number_format = f",.{digits}f" if thousands else f".{digits}f"
    text = format(mean, number_format)
    return text if math.isnan(std) else f"{text} ± {format(std, number_format)}"


def _format_seconds(mean: float, std: float) -> str:
    return _format_mean_std(mean, std, 1 if not math.isnan(mean) and mean < 100 else 0, thousands=True)


def _write_summary(
    result: ComparisonResult,
    planned: Sequence[_PlannedRun],
    records: Mapping[tuple[str, int], dict],
    variants: Sequence[str],
    shared_settings: dict,
    latency_runs: int,
) -> None:
    directory = result.directory
    metric_keys: list[str] = []
    for record in records.values():
        metric_keys += [key for key in record["metrics"] if key not in metric_keys]
    headline_keys = list(_headline(dict.fromkeys(metric_keys, 0.0)))
    primary = _primary_metric(headline_keys)

    # one row per run
    for run in planned:
        record = records[(run.variant, run.seed)]
        row = {"variant": run.variant, "seed": run.seed, "model": run.model, "run": str(run.directory)}
        row.update({key: record["metrics"].get(key) for key in metric_keys})
        for key in RUN_MEASUREMENTS:
            row[key] = record.get(key)
        result.runs.append(row)

    # one row per variant: mean and std over seeds
    measured = ("latency_ms", "train_seconds", "cpu_seconds", "peak_rss_mib", "peak_cuda_mib")
    for variant in variants:
        variant_runs = [row for row in result.runs if row["variant"] == variant]
        row = {
            "variant": variant,
            "model": variant_runs[0]["model"],
            "runs": len(variant_runs),
            "seeds": " ".join(str(run["seed"]) for run in variant_runs),
            "parameters": variant_runs[0]["parameters"],
            "gflops": variant_runs[0]["gflops"],
        }
        for key in (*metric_keys, *measured):
            mean, std = _mean_std([run[key] for run in variant_runs])
            row[f"{key} mean"], row[f"{key} std"] = mean, std
        result.summary.append(row)
    if primary:
        stock_mean = result.summary[0][f"{primary} mean"]
        for row in result.summary:
            row[f"{primary} delta vs stock"] = row[f"{primary} mean"] - stock_mean

    result.files["runs_csv"] = _write_csv(directory / "runs.csv", result.runs)
    result.files["summary_csv"] = _write_csv(directory / "summary.csv", result.summary)
    result.files["summary_md"] = directory / "summary.md"
    result.files["summary_md"].write_text(
        _markdown_table(result.summary, headline_keys, primary, shared_settings, records, latency_runs, directory.name)
    )
    result.files["curves_png"] = _plot_curves(directory / "curves.png", planned, variants, headline_keys)
    result.files["final_metrics_png"] = _plot_final_metrics(
        directory / "final_metrics.png", result.runs, variants, headline_keys
    )


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _write_csv(path: Path, rows: Sequence[dict]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: "" if _is_missing(value) else value for key, value in row.items()})
    return path


def _markdown_table(
    summary: Sequence[dict],
    headline_keys: Sequence[str],
    primary: str | None,
    shared_settings: dict,
    records: Mapping[tuple[str, int], dict],
    latency_runs: int,
    name: str,
) -> str:
    any_record = next(iter(records.values()))
    devices = sorted({record["latency_device"] for record in records.values()})
    has_cuda_memory = any(record.get("peak_cuda_mib") is not None for record in records.values())
    seeds = summary[0]["seeds"].replace(" ", ", ")
    weights = shared_settings["weights"] or "none (every run starts from scratch)"
    extra = ", ".join(f"{key}={value}" for key, value in shared_settings["train_args"].items())
    header = [
        f"# DySample comparison `{name}`",
        "",
        f"- data: `{shared_settings['data']}`; task: {shared_settings['task']}",
        f"- epochs {shared_settings['epochs']}, imgsz {shared_settings['imgsz']}, batch {shared_settings['batch']}, "
        f"seeds {seeds}",
        f"- starting weights: {weights}",
        f"- other train arguments: {extra or 'none'}",
        f"- ultralytics {any_record['ultralytics']}, yolo-dysample {any_record['yolo_dysample']}, "
        f"torch {any_record['torch']}; device {', '.join(devices)}",
        "",
    ]
    columns = ["Variant", "Model", "Runs", *(_metric_label(key) for key in headline_keys)]
    if primary:
        columns.append(f"Δ {_metric_label(primary)} vs stock")
    columns += ["Parameters", "GFLOPs¹", "Latency (ms)²", "Train time (s)³", "CPU time (s)⁴", "Peak RAM (MiB)⁵"]
    if has_cuda_memory:
        columns.append("Peak GPU memory (MiB)")
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(["---"] * 3 + ["---:"] * (len(columns) - 3)) + "|"]
    for row in summary:
        cells = [row["variant"], f"`{row['model']}`", str(row["runs"])]
        cells += [_format_mean_std(row[f"{key} mean"], row[f"{key} std"], 3) for key in headline_keys]
        if primary:
            delta = row[f"{primary} delta vs stock"]
            cells.append("—" if row is summary[0] else f"{delta:+.3f}")
        cells += [
            f"{row['parameters']:,}",
            f"{row['gflops']:.3g}",
            _format_mean_std(row["latency_ms mean"], row["latency_ms std"], 1),
            _format_seconds(row["train_seconds mean"], row["train_seconds std"]),
            _format_seconds(row["cpu_seconds mean"], row["cpu_seconds std"]),
            _format_mean_std(row["peak_rss_mib mean"], row["peak_rss_mib std"], 0, thousands=True),
        ]
        if has_cuda_memory:
            cells.append(_format_mean_std(row["peak_cuda_mib mean"], row["peak_cuda_mib std"], 0, thousands=True))
        lines.append("| " + " | ".join(cells) + " |")
    footnotes = [
        "",
        "Metrics are those of the final validation of each run's best.pt, as mean ± sample standard deviation "
        "over the seeds (no ± with a single seed); Δ is the difference of the means.",
        "",
        "¹ Ultralytics `model.info()` (thop) of the fused model at imgsz "
        f"{shared_settings['imgsz']}. DySample is counted by yolo_dysample's thop rule: its offset (and scope) "
        "projection as it runs plus 4 multiply-adds per sampled output value (`grid_sample` or the CPU kernel); "
        f"the variants add {_gflops_added_text(summary)} GFLOPs to the stock model.",
        f"² Median of {latency_runs} batch-1 forward passes of the fused fp32 model at imgsz "
        f"{shared_settings['imgsz']} (no pre/post-processing) on {', '.join(devices)}, after {LATENCY_WARMUP} "
        "warm-up passes; on a shared machine it varies with the load.",
        "³ Wall time of the training epochs including the per-epoch validation (the `time` column of results.csv).",
        "⁴ CPU time of the run's whole process, all threads (`getrusage`): unlike wall time, hardly changed by other "
        "load on a shared machine.",
        "⁵ Peak resident memory (`ru_maxrss`) of the run's own training process, Python and torch included.",
        "",
    ]
    return "\n".join(header + lines + footnotes)


def _gflops_added_text(summary: Sequence[dict]) -> str:
    """``"0.0012"`` or ``"0.0012 to 0.0024"``: the GFLOPs the DySample rows add to the stock row, as thop counts."""
    added = sorted(row["gflops"] - summary[0]["gflops"] for row in summary[1:])
    if not added:
        return "0"
    return f"{added[0]:.4f}" if math.isclose(added[0], added[-1]) else f"{added[0]:.4f} to {added[-1]:.4f}"


def _variant_colours(variants: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    palette = colormaps["tab10"]
    return {variant: palette(index % 10) for index, variant in enumerate(variants)}


def _plot_curves(
    path: Path, planned: Sequence[_PlannedRun], variants: Sequence[str], headline_keys: Sequence[str]
) -> Path:
    """Per-epoch validation curves of every variant (mean over seeds, min-max band), one panel per metric."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    histories = {run.name: _read_results_csv(run.directory / "results.csv") for run in planned}
    loss_keys: list[str] = []
    for rows in histories.values():
        if rows:
            loss_keys += [key for key in rows[0] if key.startswith("val/") and key not in loss_keys]
    panels = [*headline_keys, *loss_keys] or ["epoch"]
    columns = min(3, len(panels))
    rows_count = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(5 * columns, 3.6 * rows_count), layout="constrained")
    axes = figure.subplots(rows_count, columns, squeeze=False).ravel()
    colours = _variant_colours(variants)
    for axis, key in zip(axes, panels, strict=False):  # axes may outnumber the panels
        for variant in variants:
            curves = [histories[run.name] for run in planned if run.variant == variant]
            length = max((len(curve) for curve in curves), default=0)
            epochs, means, lows, highs = [], [], [], []
            for epoch_index in range(length):
                values = [curve[epoch_index].get(key) for curve in curves if epoch_index < len(curve)]
                values = [value for value in values if value is not None]
                if values:
                    epochs.append(epoch_index + 1)
                    means.append(statistics.fmean(values))
                    lows.append(min(values))
                    highs.append(max(values))
            if not epochs:
                continue
            axis.plot(epochs, means, marker="o", markersize=3, color=colours[variant], label=variant)
            if len(curves) > 1:
                axis.fill_between(epochs, lows, highs, color=colours[variant], alpha=0.2, linewidth=0)
        axis.set_title(_metric_label(key))
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


def _plot_final_metrics(
    path: Path, runs: Sequence[dict], variants: Sequence[str], headline_keys: Sequence[str]
) -> Path:
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
            mean, std = _mean_std(values)
            axis.bar(
                position,
                mean,
                width * 0.9,
                yerr=None if math.isnan(std) else std,
                capsize=3,
                color=colours[variant],
                label=variant if key_index == 0 else None,
            )
            axis.scatter([position] * len(values), values, s=10, color="black", zorder=3)
    axis.set_xticks(range(len(keys)), [_metric_label(key) for key in keys])
    axis.set_ylabel("final validation value")
    axis.grid(axis="y", alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize="small")
    axis.set_title("Final validation: bar = mean over seeds, whisker = std, dot = one seed", fontsize="medium")
    figure.savefig(path, dpi=110)
    return path
