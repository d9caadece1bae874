"""What a comparison trains: defaults, presets, and the validation of every argument before anything is written."""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from yolo_dysample.validation import as_whole_number

__all__ = [
    "CONTROL_VARIANTS",
    "DYSAMPLE_VARIANTS",
    "PRESETS",
    "STOCK",
    "CompareError",
    "CompareSettings",
    "RunFailedError",
    "parse_seeds",
    "parse_train_args",
    "parse_variants",
    "resolve_settings",
    "variant_model_name",
]

STOCK = "stock"
CONTROL_VARIANTS = ("bilinear",)  # the stock YAML with bilinear nn.Upsample (align_corners=False): a fresh DySample
DYSAMPLE_VARIANTS = ("dysample", "dysample-plus", "dysample-s", "dysample-s-plus")  # suffix of the model YAML name
KNOWN_VARIANTS = (*CONTROL_VARIANTS, *DYSAMPLE_VARIANTS)
DEFAULT_VARIANTS = ("dysample", "dysample-plus")
DEFAULT_DATA = "dysample-shapes.yaml"
DEFAULT_MODEL = "yolov8n.yaml"
DEFAULT_NAME = "exp"
LATENCY_RUNS = 100  # interleaved rounds: every variant's checkpoint timed once per round, in one process
LATENCY_WARMUP = 5
MAX_SEED = 2**32 - 1  # numpy's and ultralytics' seeding take 32-bit seeds
PRIMARY_METRIC = "mAP50-95"  # fixed in advance: the paired statistics are computed for this metric only

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
    "split": None,
}
# Execution details: they do not change what a run learns, so a resumed comparison may change them.
EXECUTION_ARGS = ("device", "workers", "latency_runs")

# The shapes data as the benchmark presets generate it (yolo_dysample.datasets.generate_shapes_dataset arguments).
_SHAPES = {"seed": 0, "train_images": 192, "val_images": 48, "test_images": 400, "image_size": 256}
_SHAPES_PRETRAIN = {**_SHAPES, "seed": 1, "test_images": 0}  # a differently seeded copy: no image in common
_SHAPES_GPU = {"seed": 0, "train_images": 2000, "val_images": 200, "test_images": 1000, "image_size": 640}
_SHAPES_GPU_PRETRAIN = {**_SHAPES_GPU, "seed": 1, "test_images": 0}
_ALL_CONTROLS = ("bilinear", "dysample", "dysample-plus")
# Small-object training on CPU: one optimizer step per batch, no scale augmentation (it shrinks 3 px objects to
# 1.5 px), no mosaic (one input distribution throughout).
_CPU_SHAPES_ARGS = {"nbs": 8, "mosaic": 0.0, "scale": 0.0}
# Fine-tuning: a fixed optimizer at a low learning rate and no warm-up. optimizer=auto restarts AdamW at 1.4e-3 and
# the warm-up starts the biases at warmup_bias_lr=0.1: either knocks a trained model down for 1-3 epochs.
_FINETUNE_ARGS = {"optimizer": "AdamW", "lr0": 0.0002, "momentum": 0.9, "warmup_epochs": 0.0}
_PRETRAIN_ARGS = {"optimizer": "AdamW", "lr0": 0.0014, "momentum": 0.9, "warmup_epochs": 1.0}

PRESETS: dict[str, dict[str, Any]] = {
    # The quick small-object check (about 35 min on 2 CPU cores): 15 epochs from scratch, 3 seeds, no control.
    "small-objects": {
        "data": DEFAULT_DATA,
        "model": DEFAULT_MODEL,
        "variants": ("dysample", "dysample-plus"),
        "seeds": (0, 1, 2),
        "epochs": 15,
        "imgsz": 256,
        "batch": 8,
        "train_args": {**_CPU_SHAPES_ARGS, "warmup_epochs": 1.0},
    },
    # Longer from-scratch training with the controls, sized to about 90 min on 2 CPU cores (docs/small_object_
    # benchmark.md: 16 runs x (22 epochs x 14.3 s + 17 s for the test split and start-up)).
    "scratch": {
        "data": _SHAPES,
        "model": DEFAULT_MODEL,
        "variants": _ALL_CONTROLS,
        "seeds": (0, 1, 2, 3),
        "epochs": 22,
        "imgsz": 256,
        "batch": 8,
        "train_args": {**_CPU_SHAPES_ARGS, "warmup_epochs": 1.0},
    },
    # One stock model pretrained on a differently seeded copy of the data, every variant fine-tuned from it, sized to
    # about 90 min on 2 CPU cores (30 pretraining epochs x 14.3 s, then 32 runs x (10 epochs x 14.3 s + 17 s)).
    "finetune": {
        "data": _SHAPES,
        "model": DEFAULT_MODEL,
        "variants": _ALL_CONTROLS,
        "seeds": tuple(range(8)),
        "epochs": 10,
        "imgsz": 256,
        "batch": 8,
        "train_args": {**_CPU_SHAPES_ARGS, **_FINETUNE_ARGS},
        "pretrain": {
            "data": _SHAPES_PRETRAIN,
            "epochs": 30,
            "seed": 0,
            "train_args": {**_CPU_SHAPES_ARGS, **_PRETRAIN_ARGS},
        },
    },
    # The same two designs at GPU scale: 640 px images (the objects stay 3-12 px), more images, more epochs.
    "scratch-gpu": {
        "data": _SHAPES_GPU,
        "model": DEFAULT_MODEL,
        "variants": _ALL_CONTROLS,
        "seeds": tuple(range(8)),
        "epochs": 100,
        "imgsz": 640,
        "batch": 32,
        "train_args": {"mosaic": 0.0, "scale": 0.0, "workers": 8},
    },
    "finetune-gpu": {
        "data": _SHAPES_GPU,
        "model": DEFAULT_MODEL,
        "variants": _ALL_CONTROLS,
        "seeds": tuple(range(10)),
        "epochs": 30,
        "imgsz": 640,
        "batch": 32,
        "train_args": {"mosaic": 0.0, "scale": 0.0, "workers": 8, **_FINETUNE_ARGS},
        "pretrain": {
            "data": _SHAPES_GPU_PRETRAIN,
            "epochs": 100,
            "seed": 0,
            "train_args": {"mosaic": 0.0, "scale": 0.0, "workers": 8, **_PRETRAIN_ARGS},
        },
    },
}


class CompareError(Exception):
    """A comparison cannot start: bad arguments, or settings that clash with an existing comparison."""


class RunFailedError(CompareError):
    """A training run failed; the message names its log and quotes its last lines."""


@dataclass
class CompareSettings:
    """Everything a comparison needs, validated. :attr:`shared` is its identity: a resumed comparison must match it."""

    data: Any  # the argument; once resolved, what the runs train on: a dataset YAML path or bundled name
    model: str
    variants: tuple[str, ...]
    seeds: tuple[int, ...]
    epochs: int
    imgsz: int
    batch: int | float
    device: str | None
    weights: str | None
    project: Path  # absolute: ultralytics puts a relative project under <runs_dir>/<task>/
    name: str | None
    base_name: str
    latency_runs: int
    train_args: dict[str, Any]
    variant_models: dict[str, str] = field(default_factory=dict)  # variant -> model YAML name or path
    derived_yamls: dict[str, dict] = field(default_factory=dict)  # variant -> model dict to write (bilinear)
    task: str = ""
    data_identity: Any = None
    has_test_split: bool = False
    pretrain: dict[str, Any] | None = None  # {"data": yaml, "epochs": n, "seed": k, "train_args": {...}}
    pretrain_identity: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)  # adjustments to report (imgsz rounded to the stride)

    @property
    def shared(self) -> dict[str, Any]:
        """The settings every run shares, as stored in ``compare_settings.json`` (tuples as lists)."""
        shared = {
            "data": self.data_identity,
            "model": _identity_of_file_argument(self.model),
            "task": self.task,
            "epochs": self.epochs,
            "imgsz": self.imgsz,
            "batch": self.batch,
            "weights": self.weights,
            "test_split": self.has_test_split,
            "train_args": {key: value for key, value in sorted(self.train_args.items()) if key not in EXECUTION_ARGS},
        }
        if self.pretrain_identity:
            shared["pretrain"] = self.pretrain_identity
        return json.loads(json.dumps(shared))


# --------------------------------------------------------------------------------------------------- parsing
def parse_seeds(seeds: str | int | Iterable[int]) -> tuple[int, ...]:
    """Seeds as a tuple of distinct whole numbers in [0, 2**32 - 1], from ``"0,1,2"``, ``3`` or a sequence.

    Raises:
        CompareError: A seed is not a whole number in range, or a seed repeats, or there is none.

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
        if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item <= MAX_SEED:
            raise CompareError(f"seeds: {item!r} is not a whole number in [0, {MAX_SEED}] (give seeds like 0,1,2)")
        parsed.append(item)
    if not parsed:
        raise CompareError("seeds: give at least one seed, e.g. 0 or 0,1,2")
    if len(set(parsed)) != len(parsed):
        raise CompareError(f"seeds: {','.join(map(str, parsed))} repeats a seed; the runs would be identical")
    return tuple(parsed)


def parse_variants(variants: str | Iterable[str]) -> tuple[str, ...]:
    """Variants to compare with the stock model, from ``"bilinear,dysample"``, ``"all"`` or a sequence.

    ``all`` means the four DySample variants. ``stock`` may be listed; it is always trained anyway, as the baseline,
    and always comes first.

    Raises:
        CompareError: An unknown variant (the message lists the known ones), a repeat, or none.

    """
    items = [item.strip() for item in variants.split(",")] if isinstance(variants, str) else list(variants)
    if items == ["all"]:
        return DYSAMPLE_VARIANTS
    parsed = []
    for item in items:
        if not isinstance(item, str) or item.lower() not in (STOCK, *KNOWN_VARIANTS):
            hint = difflib.get_close_matches(str(item).lower(), KNOWN_VARIANTS, n=1)
            hint_text = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise CompareError(
                f"unknown variant {item!r}{hint_text}; known variants: {', '.join(KNOWN_VARIANTS)}, or 'all'"
            )
        if item.lower() != STOCK:
            parsed.append(item.lower())
    if len(set(parsed)) != len(parsed):
        raise CompareError(f"variants: {','.join(parsed)} lists a variant twice")
    if not parsed:
        raise CompareError(f"variants: give at least one variant besides stock ({', '.join(KNOWN_VARIANTS)})")
    return tuple(parsed)


def variant_model_name(model: str | Path, variant: str) -> str:
    """Derive the model YAML of ``variant`` from the stock model YAML by name.

    ``yolov8n.yaml`` -> ``yolov8n-dysample.yaml``; ``yolo11s-seg.yaml`` -> ``yolo11s-seg-dysample-plus.yaml``;
    a path keeps its directory. ``stock`` returns ``model`` unchanged. The ``bilinear`` control gets its name the
    same way; its YAML is derived from the stock one (:func:`bilinear_model_dict`) and written by the comparison.
    """
    model = str(model)
    if variant == STOCK:
        return model
    path = Path(model)
    return str(path.with_name(f"{path.stem}-{variant}{path.suffix}"))


def whole_number(name: str, value: Any, minimum: int) -> int:
    """A whole number >= ``minimum`` from an int or its decimal text, or a CompareError naming ``name``."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    try:
        return as_whole_number(name, value, minimum)
    except ValueError as error:
        raise CompareError(str(error)) from None


def batch_size(value: Any) -> int | float:
    """Ultralytics' batch forms: a whole number >= 1, -1 (AutoBatch) or a fraction in (0, 1) of GPU memory."""
    if isinstance(value, str):
        from ultralytics.cfg import smart_value

        value = smart_value(value.strip())
    message = f"batch={value!r} must be a whole number >= 1, -1 (AutoBatch) or a fraction in (0, 1)"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CompareError(message)
    if value == -1 or (isinstance(value, int) and value >= 1) or 0 < value < 1:
        return value
    if isinstance(value, float) and value.is_integer() and value >= 1:
        return int(value)
    raise CompareError(message)


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


def check_train_args(train_args: Mapping[str, Any]) -> dict[str, Any]:
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


# --------------------------------------------------------------------------------------------------- models
def load_model_yaml(model: str, role: str) -> dict:
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


def bilinear_model_dict(stock: Mapping[str, Any], model: str) -> dict:
    """The stock model dict with every nearest ``nn.Upsample`` made bilinear with ``align_corners=False``.

    Only the upsampling mode changes: the rows, indices and every other argument are the stock model's, and
    ``nn.Upsample`` has no parameters, so a bilinear model starts from the stock model's weights for any seed.

    Raises:
        CompareError: The model has no nearest ``nn.Upsample`` layer to replace.

    """
    derived = json.loads(json.dumps({key: value for key, value in stock.items() if key not in ("scale", "yaml_file")}))
    replaced = 0
    for section in ("backbone", "head"):
        for row in derived.get(section, []):
            module, arguments = row[2], row[3] if len(row) > 3 else []
            if str(module).split(".")[-1] == "Upsample" and len(arguments) >= 3 and arguments[2] == "nearest":
                row[3] = [arguments[0], arguments[1], "bilinear", False]
                replaced += 1
    if not replaced:
        raise CompareError(f"model {model!r} has no nearest nn.Upsample layer: the bilinear control needs one")
    return derived


def _variant_models(model: str, variants: Iterable[str]) -> tuple[dict[str, str], dict[str, dict], dict]:
    stock_yaml = load_model_yaml(model, "model")
    variant_models, derived = {STOCK: model}, {}
    for variant in variants:
        variant_models[variant] = variant_model_name(model, variant)
        if variant == "bilinear":
            derived[variant] = bilinear_model_dict(stock_yaml, model)
        else:
            load_model_yaml(variant_models[variant], f"variant {variant!r}: model YAML")
    return variant_models, derived, stock_yaml


def rounded_image_size(model: str, imgsz: int, notes: list[str]) -> int:
    """Round ``imgsz`` up to a multiple of the model's largest stride, as the ultralytics trainer does (and warns)."""
    from ultralytics import YOLO
    from ultralytics.utils.checks import check_imgsz

    network = YOLO(model).model
    stride = max(int(network.stride.max()) if hasattr(network, "stride") else 32, 32)
    rounded = int(check_imgsz(imgsz, stride=stride, floor=stride, max_dim=1))
    if rounded != imgsz:
        notes.append(f"imgsz {imgsz} is not a multiple of the model's stride {stride}: every run uses {rounded}")
    return rounded


# --------------------------------------------------------------------------------------------------- data
def shapes_dataset_yaml(spec: Mapping[str, Any]) -> str:
    """Generate the shapes dataset that ``spec`` describes under the ultralytics ``datasets_dir``; its YAML path."""
    from ultralytics.utils import SETTINGS

    from yolo_dysample.datasets import DATASET_NAME, generate_shapes_dataset, write_dataset_yaml

    tag = "-".join(f"{key.split('_')[0]}{spec[key]}" for key in sorted(spec))
    root = Path(SETTINGS["datasets_dir"]).expanduser().resolve() / f"{DATASET_NAME}-{tag}"
    try:
        generate_shapes_dataset(root, **spec)
    except (TypeError, ValueError, FileExistsError) as error:
        raise CompareError(f"shapes dataset {dict(spec)}: {error}") from None
    return str(write_dataset_yaml(root.with_suffix(".yaml"), root))


def check_dataset(data: str, task: str) -> bool:
    """Resolve the dataset now, not inside the first timed run; return whether it has a test split.

    A generated shapes dataset from before the test split existed gets its test split added here.
    """
    from ultralytics.data.utils import check_cls_dataset, check_det_dataset

    if str(data).endswith((".yaml", ".yml")) and "://" not in str(data):
        from ultralytics.utils.checks import check_file

        if not check_file(data, hard=False):
            raise CompareError(f"data file {data!r} not found (give a dataset YAML path or a bundled name)")
    try:
        if task == "classify":
            return bool(check_cls_dataset(data).get("test"))
        resolved = check_det_dataset(data)
        test = resolved.get("test")
        if test and not Path(test).exists() and "test_images" in resolved:
            from yolo_dysample.datasets import generate_from_dataset_yaml

            generate_from_dataset_yaml(resolved)
        return bool(test) and Path(test).exists()
    except Exception as error:  # ultralytics raises FileNotFoundError, RuntimeError, SyntaxError, ...
        raise CompareError(f"data {data!r} cannot be used: {error}") from None


def _select_device(device: str | None) -> tuple[str | None, bool]:
    """Check the device with ultralytics; return the device the runs get and whether it is CUDA."""
    from ultralytics.utils.torch_utils import select_device

    visible_devices = os.environ.get("CUDA_VISIBLE_DEVICES")  # select_device sets it; the runs must see the original
    try:
        selected = select_device("" if device is None else str(device), verbose=False)
    except Exception as error:  # ultralytics explains what is missing (no CUDA, bad index, ...)
        raise CompareError(f"device={device!r}: {str(error).strip().splitlines()[0]}") from None
    finally:
        if visible_devices is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    uses_cuda = selected.type == "cuda"
    return ("cpu" if device is None and not uses_cuda else device), uses_cuda


# --------------------------------------------------------------------------------------------------- all together
def _preset_values(preset: str | None) -> dict[str, Any]:
    if preset is None:
        return {}
    if preset not in PRESETS:
        raise CompareError(f"unknown preset {preset!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[preset]


def _data_argument(value: Any) -> tuple[str, Any]:
    """The dataset YAML to train on and its identity: a dict is a shapes dataset to generate, else a YAML."""
    if isinstance(value, Mapping):
        return shapes_dataset_yaml(value), {"shapes": dict(value)}
    return str(value), _identity_of_file_argument(str(value))


def _weights_argument(weights: str | None) -> str | None:
    if weights is None:
        return None
    weights_path = Path(weights).expanduser()
    if not weights_path.is_file():
        raise CompareError(f"weights file {weights!r} not found (give a stock checkpoint, e.g. yolov8n.pt)")
    return str(weights_path.resolve())


def _pretrain_settings(spec: Mapping[str, Any] | None, task: str) -> tuple[dict | None, dict | None]:
    """The pretraining stage of a preset, ready to run, and its identity."""
    if not spec:
        return None, None
    data, data_identity = _data_argument(spec["data"])
    check_dataset(data, task)
    train_args = check_train_args(spec.get("train_args", {}))
    pretrain = {"data": data, "epochs": spec["epochs"], "seed": spec["seed"], "train_args": train_args}
    return pretrain, {**pretrain, "data": data_identity}


def _parse_arguments(preset: str | None, arguments: Mapping[str, Any]) -> CompareSettings:
    """Merge explicit arguments, the preset's values and the defaults, and check each (no ultralytics lookups)."""
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.utils import SETTINGS

    preset_values = _preset_values(preset)

    def chosen(key: str, default: Any) -> Any:
        """Return the explicit value, else the preset's, else the default."""
        return arguments[key] if arguments.get(key) is not None else preset_values.get(key, default)

    name = arguments.get("name")
    if name is not None and (not name or Path(name).name != name or name in (".", "..")):
        raise CompareError(f"name={name!r} must be a plain directory name")
    train_args = check_train_args(arguments.get("train_args") or {})
    project = arguments.get("project")
    return CompareSettings(
        data=chosen("data", DEFAULT_DATA),
        model=str(chosen("model", DEFAULT_MODEL)),
        variants=parse_variants(chosen("variants", DEFAULT_VARIANTS)),
        seeds=parse_seeds(chosen("seeds", (0,))),
        epochs=whole_number("epochs", chosen("epochs", DEFAULT_CFG_DICT["epochs"]), 1),
        imgsz=whole_number("imgsz", chosen("imgsz", DEFAULT_CFG_DICT["imgsz"]), 32),
        batch=batch_size(chosen("batch", DEFAULT_CFG_DICT["batch"])),
        device=arguments.get("device"),
        weights=_weights_argument(arguments.get("weights")),
        project=Path(project if project is not None else Path(SETTINGS["runs_dir"]) / "compare").expanduser().resolve(),
        name=name,
        base_name=preset or DEFAULT_NAME,
        latency_runs=whole_number("latency_runs", arguments.get("latency_runs", LATENCY_RUNS), 1),
        train_args=check_train_args({**preset_values.get("train_args", {}), **train_args}),
        pretrain=preset_values.get("pretrain"),
    )


def resolve_settings(
    data: Any = None,
    model: str | None = None,
    variants: str | Iterable[str] | None = None,
    seeds: str | int | Iterable[int] | None = None,
    epochs: Any = None,
    imgsz: Any = None,
    batch: Any = None,
    device: str | None = None,
    weights: str | None = None,
    project: str | Path | None = None,
    name: str | None = None,
    preset: str | None = None,
    latency_runs: Any = LATENCY_RUNS,
    train_args: Mapping[str, Any] | None = None,
) -> CompareSettings:
    """Validate the arguments of :func:`yolo_dysample.compare.compare`; nothing is written but generated data."""
    from ultralytics.nn.tasks import guess_model_task

    from yolo_dysample import register_with_ultralytics

    arguments = dict(data=data, model=model, variants=variants, seeds=seeds, epochs=epochs, imgsz=imgsz, batch=batch)
    arguments.update(device=device, weights=weights, project=project, name=name, latency_runs=latency_runs)
    settings = _parse_arguments(preset, {**arguments, "train_args": train_args})

    register_with_ultralytics()  # idempotent; makes the bundled YAML names resolvable
    settings.variant_models, settings.derived_yamls, stock_yaml = _variant_models(settings.model, settings.variants)
    settings.task = guess_model_task(stock_yaml)
    settings.data, settings.data_identity = _data_argument(settings.data)
    settings.has_test_split = check_dataset(settings.data, settings.task)
    settings.device, uses_cuda = _select_device(settings.device)
    settings.imgsz = rounded_image_size(settings.model, settings.imgsz, settings.notes)
    settings.pretrain, settings.pretrain_identity = _pretrain_settings(settings.pretrain, settings.task)
    if not uses_cuda:
        settings.train_args.setdefault("workers", 0)  # tiny CPU datasets: worker processes cost more than they save
    settings.train_args.setdefault("plots", False)
    settings.train_args.setdefault("deterministic", True)
    return settings
