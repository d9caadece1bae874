"""GPU check: DySample's speed and correctness on one CUDA device, in one run of a few minutes.

Measures and writes ``gpu_check.md`` / ``gpu_check.json`` into ``--out``:

- one upsampling layer on the paper's setting (1 x 256 x 120 x 120, x2): DySample LP / PL / LP+ / PL+ against
  bilinear ``F.interpolate``, forward and forward + backward (paper: 6.2 ms against 1.6 ms, 3.9x; goal <= 1.5x);
- YOLOv8n-dysample against stock YOLOv8n, fused inference at 640, batch 1 and 32, float32 and float16 autocast;
- one AMP training step of YOLOv8n-dysample (detection loss, GradScaler, SGD): finite loss and gradients;
- NaN and infinite offsets on CUDA: forward and backward finish and stay finite;
- TensorRT ``engine`` export, float32 / float16 / dynamic, raw outputs against PyTorch (skipped without tensorrt).

Every part is timed interleaved against its reference (:mod:`yolo_dysample.tools.timing`), runs on its own (a
failing part is a row with its error) and the whole check exits 0 without CUDA. ``--dry-run`` shrinks every shape
and round so the script itself can be tested on a CPU (``--device cpu``).

    python -m yolo_dysample.tools.gpu_check --out gpu-check
    python -m yolo_dysample.tools.gpu_check --out /tmp/check --dry-run --device cpu
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from yolo_dysample.tools.timing import against_reference, interleaved_samples

__all__ = ["PAPER", "Settings", "main", "render", "run_checks"]

PAPER = {"shape": (1, 256, 120, 120), "dysample_ms": 6.2, "bilinear_ms": 1.6, "goal_ratio": 1.5}
LAYER_VARIANTS = {"LP": ("lp", False), "PL": ("pl", False), "LP+": ("lp", True), "PL+": ("pl", True)}


@dataclass(frozen=True)
class Settings:
    """Shapes and repetitions of one run (full on a GPU, or tiny for ``--dry-run``)."""

    device: torch.device
    layer_shape: tuple[int, int, int, int]
    imgsz: int
    batches: tuple[int, ...]
    train_batch: int
    engine_imgsz: int
    rounds: int
    block_s: float

    @classmethod
    def for_run(cls, device: torch.device, dry_run: bool) -> Settings:
        """The settings of a full run, or of a dry run that finishes in seconds on a CPU."""
        if dry_run:
            return cls(device, (1, 16, 6, 6), 64, (1,), 2, 64, rounds=1, block_s=0.0)
        return cls(device, PAPER["shape"], 640, (1, 32), 8, 128, rounds=9, block_s=0.2)


def _synchronize(device: torch.device) -> Callable[[], None] | None:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None


def _timed_rows(
    part: str, calls: dict[str, Callable[[], object]], reference: str, settings: Settings, **extra
) -> list[dict]:
    samples = interleaved_samples(calls, settings.rounds, settings.block_s, synchronize=_synchronize(settings.device))
    rows = []
    for name in calls:
        if name == reference:
            continue
        rows.append(
            {
                "part": part,
                "case": name,
                "reference": reference,
                **against_reference(samples[name], samples[reference]),
                **extra,
            }
        )
    return rows


def layer_speed(settings: Settings) -> list[dict]:
    """DySample variants against bilinear interpolation, forward and forward + backward."""
    from yolo_dysample import DySample

    device, shape = settings.device, settings.layer_shape
    torch.manual_seed(0)
    x = torch.randn(shape, device=device)
    layers = {
        name: DySample(shape[1], style=style, dyscope=dyscope).to(device)
        for name, (style, dyscope) in LAYER_VARIANTS.items()
    }
    forward = {"bilinear": lambda: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)}
    with torch.no_grad():
        forward.update({f"DySample {name}": (lambda layer=layer: layer(x)) for name, layer in layers.items()})
    rows = []
    with torch.no_grad():
        rows += _timed_rows("layer forward", forward, "bilinear", settings, shape=list(shape))
    leaf = x.clone().requires_grad_()
    gradient = torch.randn(shape[0], shape[1], 2 * shape[2], 2 * shape[3], device=device)

    def backward(call: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        return lambda: call(leaf).backward(gradient)

    both = {"bilinear": backward(lambda t: F.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False))}
    both.update({f"DySample {name}": backward(layer) for name, layer in layers.items()})
    rows += _timed_rows("layer forward+backward", both, "bilinear", settings, shape=list(shape))
    return rows


def _detection_model(yaml_name: str, device: torch.device):
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel, yaml_model_load

    from yolo_dysample import register_with_ultralytics

    register_with_ultralytics()
    torch.manual_seed(0)
    model = DetectionModel(yaml_model_load(yaml_name), verbose=False)
    model.args = get_cfg()
    return model.to(device)


def model_speed(settings: Settings) -> list[dict]:
    """Fused YOLOv8n-dysample against stock YOLOv8n at each batch, float32 and float16 autocast."""
    device = settings.device
    models = {
        name: _detection_model(yaml_name, device).fuse(verbose=False).eval()
        for name, yaml_name in (("stock", "yolov8n.yaml"), ("DySample", "yolov8n-dysample.yaml"))
    }
    rows = []
    for batch in settings.batches:
        images = torch.rand(batch, 3, settings.imgsz, settings.imgsz, device=device)
        for precision in ("fp32", "fp16 autocast"):
            autocast = precision != "fp32"
            dtype = torch.float16 if device.type == "cuda" else torch.bfloat16

            def call(model, images=images, autocast=autocast, dtype=dtype) -> object:
                with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=autocast):
                    return model(images)

            calls = {name: (lambda model=model: call(model)) for name, model in models.items()}
            rows += _timed_rows(
                "YOLOv8n inference", calls, "stock", settings, batch=batch, precision=precision, imgsz=settings.imgsz
            )
    return rows


def amp_training_step(settings: Settings) -> list[dict]:
    """One forward, detection loss, scaled backward and SGD step of YOLOv8n-dysample under autocast."""
    from yolo_dysample.tools.bench_models import synthetic_batch

    device = settings.device
    model = _detection_model("yolov8n-dysample.yaml", device).train()
    batch = {key: value.to(device) for key, value in synthetic_batch(settings.train_batch, settings.imgsz).items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    scaler = torch.amp.GradScaler(device.type, enabled=device.type == "cuda")
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    started = time.perf_counter()
    with torch.autocast(device.type, dtype=dtype):
        loss, _ = model.loss(batch)
    scaler.scale(loss.sum()).backward()
    gradients = [parameter.grad for parameter in model.parameters() if parameter.grad is not None]
    finite_gradients = all(bool(torch.isfinite(gradient).all()) for gradient in gradients)
    scaler.step(optimizer)
    scaler.update()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    finite = bool(torch.isfinite(loss).all()) and finite_gradients
    return [
        {
            "part": "AMP training step",
            "case": f"batch {settings.train_batch}, imgsz {settings.imgsz}, {str(dtype).split('.')[-1]}",
            "status": "pass" if finite else "FAIL: non-finite loss or gradients",
            "loss": float(loss.detach().sum()),
            "seconds": round(time.perf_counter() - started, 2),
        }
    ]


def nan_offsets_backward(settings: Settings) -> list[dict]:
    """NaN and +-inf offsets on the device: every sampler's forward and backward finish and stay finite.

    The samplers get the offsets directly (a NaN coordinate reads the first row or column, +-inf the border);
    the LP and PL layers get them from a NaN / inf offset bias. With dynamic scope the offsets are a product
    with the scope, whose gradient is 0 * NaN: that is arithmetic, not the sampler, and is not checked.
    """
    from yolo_dysample import DySample
    from yolo_dysample.sampling import bilinear_positions, sample_groups, sampling_grid

    device, groups, scale = settings.device, 4, 2
    rows = []
    for value in (float("nan"), float("inf"), float("-inf")):
        torch.manual_seed(0)
        offsets = torch.randn(2, 2 * groups * scale * scale, 9, 11, device=device)
        offsets[:, ::3, ::2] = value
        for sampler in ("grid_sample", "gather", "difference_tables"):
            leaves = torch.randn(2, 32, 9, 11, device=device, requires_grad=True), offsets.clone().requires_grad_()

            def sample(leaves=leaves, sampler=sampler) -> torch.Tensor:
                x, points = leaves
                grid = sampling_grid(x, points, bilinear_positions(scale, groups).to(device), groups, scale)
                return sample_groups(
                    x, grid, groups, by_gather=sampler == "gather", by_difference_tables=sampler == "difference_tables"
                )

            rows.append(_finite_backward(f"sampler {sampler}, offsets {value}", sample, leaves, device))
        for style in ("lp", "pl"):
            layer = DySample(32, style=style).to(device)
            with torch.no_grad():
                layer.offset.bias[::3] = value
            x = torch.randn(2, 32, 9, 11, device=device, requires_grad=True)
            case = f"DySample {style.upper()}, offset bias {value}"
            rows.append(_finite_backward(case, lambda layer=layer, x=x: layer(x), (x,), device))
    return rows


def _finite_backward(case: str, forward: Callable[[], torch.Tensor], leaves, device: torch.device) -> dict:
    try:
        out = forward()
        out.square().sum().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        finite = bool(torch.isfinite(out).all()) and all(bool(torch.isfinite(leaf.grad).all()) for leaf in leaves)
        status = "pass" if finite else "FAIL: non-finite output or gradient"
    except Exception as error:  # noqa: BLE001 - the row says what failed
        status = f"FAIL: {type(error).__name__}: {error}"[:200]
    return {"part": "non-finite offsets, backward", "case": case, "status": status}


def tensorrt_parity(settings: Settings) -> list[dict]:
    """TensorRT engines (float32, float16, dynamic) of the export matrix's checkpoint against PyTorch."""
    if settings.device.type != "cuda":
        return [{"part": "TensorRT engine", "case": "-", "status": "skipped: needs a CUDA device"}]
    if importlib.util.find_spec("tensorrt") is None:
        return [{"part": "TensorRT engine", "case": "-", "status": "skipped: tensorrt is not installed"}]
    from ultralytics import YOLO
    from ultralytics.nn.autobackend import AutoBackend

    from yolo_dysample.tools import export_matrix

    cases = {  # case -> (export arguments, shapes, metric, tolerance)
        "fp32": (
            {},
            ((1, settings.engine_imgsz, settings.engine_imgsz),),
            "max",
            export_matrix.FULL_PRECISION_TOLERANCE,
        ),
        "fp16": ({"half": True}, ((1, settings.engine_imgsz, settings.engine_imgsz),), "mean", 1e-2),
        "dynamic": (
            {"dynamic": True, "batch": 2},
            ((1, 64, 64), (1, 96, 160), (2, 128, 128)),
            "max",
            export_matrix.FULL_PRECISION_TOLERANCE,
        ),
    }
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-check-engine-") as directory:
        checkpoint = export_matrix.build_dysample_checkpoint(Path(directory) / "dysample-yolov8n.pt")
        reference = AutoBackend(str(checkpoint), device=settings.device, verbose=False)
        for name, (arguments, shapes, metric, tolerance) in cases.items():
            local = Path(directory) / name / checkpoint.name
            local.parent.mkdir()
            local.write_bytes(checkpoint.read_bytes())
            started = time.perf_counter()
            try:
                engine = YOLO(str(local)).export(
                    format="engine", imgsz=settings.engine_imgsz, device=settings.device.index or 0, **arguments
                )
                backend = AutoBackend(engine, device=settings.device, fp16=bool(arguments.get("half")), verbose=False)
                worst = 0.0
                for shape in shapes:
                    images = export_matrix.letterboxed_images(shape).to(settings.device)
                    expected = export_matrix.raw_output(reference, images)
                    actual = export_matrix.raw_output(backend, images.half() if arguments.get("half") else images)
                    worst = max(worst, export_matrix.output_differences(expected, actual, shape)[metric])
                status = "pass" if worst <= tolerance else "MISMATCH"
                rows.append(
                    {
                        "part": "TensorRT engine",
                        "case": name,
                        "status": status,
                        f"{metric}_abs_diff": worst,
                        "tolerance": tolerance,
                        "seconds": round(time.perf_counter() - started, 1),
                    }
                )
            except Exception as error:  # noqa: BLE001
                message = f"FAIL: {type(error).__name__}: {error}".splitlines()[0][:300]
                rows.append({"part": "TensorRT engine", "case": name, "status": message})
    return rows


PARTS: dict[str, Callable[[Settings], list[dict]]] = {
    "layer": layer_speed,
    "model": model_speed,
    "amp": amp_training_step,
    "nan": nan_offsets_backward,
    "tensorrt": tensorrt_parity,
}


def run_checks(settings: Settings, parts: list[str]) -> list[dict]:
    """Every requested part; a part that raises is one row with its error, and the rest still run."""
    rows = []
    for part in parts:
        started = time.perf_counter()
        try:
            rows += PARTS[part](settings)
        except Exception as error:  # noqa: BLE001
            rows.append({"part": part, "case": "-", "status": f"FAIL: {type(error).__name__}: {error}"[:300]})
            traceback.print_exc()
        print(f"[{part}] {time.perf_counter() - started:.0f} s", flush=True)
    return rows


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    return f"cpu ({platform.processor() or platform.machine()})"


def render(result: dict) -> str:
    """Markdown: the measured-on line, the timed rows, then the checks."""
    lines = [
        f"Measured on {result['device']}, {result['date']}; torch {result['torch']}; {result['seconds']} s"
        + ("; dry run (tiny shapes, not a measurement)" if result["dry_run"] else ""),
        f"Paper (1 x 256 x 120 x 120, x2): DySample {PAPER['dysample_ms']} ms, bilinear {PAPER['bilinear_ms']} ms "
        f"({PAPER['dysample_ms'] / PAPER['bilinear_ms']:.1f}x); goal <= {PAPER['goal_ratio']}x.",
        "",
        "| part | case | setting | reference | reference ms | ms | ratio | spread |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        if "ratio" not in row:
            continue
        setting = ", ".join(f"{key} {row[key]}" for key in ("shape", "batch", "precision", "imgsz") if key in row)
        lines.append(
            f"| {row['part']} | {row['case']} | {setting} | {row['reference']} | {row['reference_ms']:.3f} "
            f"| {row['ms']:.3f} | {row['ratio']:.2f}x | +-{100 * row['spread']:.0f} % |"
        )
    lines += ["", "| check | case | status | detail |", "| --- | --- | --- | --- |"]
    for row in result["rows"]:
        if "ratio" in row:
            continue
        detail = ", ".join(
            f"{key} {value:.2e}" if isinstance(value, float) else f"{key} {value}"
            for key, value in row.items()
            if key not in ("part", "case", "status")
        )
        lines.append(f"| {row['part']} | {row['case']} | {row['status']} | {detail or '-'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the check, write ``gpu_check.md`` and ``gpu_check.json`` into ``--out``; 0 also without CUDA."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--out", type=Path, required=True, help="directory for gpu_check.md / gpu_check.json")
    parser.add_argument("--device", default=None, help="cuda (default), cuda:1, or cpu (with --dry-run)")
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes and rounds: tests the script itself")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    arguments = parser.parse_args(argv)
    device = torch.device(arguments.device or ("cpu" if arguments.dry_run else "cuda"))
    arguments.out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if device.type == "cuda" and not torch.cuda.is_available():
        rows = [{"part": "all", "case": "-", "status": "skipped: no CUDA device (torch.cuda.is_available() is False)"}]
        print(rows[0]["status"])
    else:
        os.environ.setdefault("YOLO_AUTOINSTALL", "false")  # a missing toolchain is a skipped row, not a pip run
        rows = run_checks(Settings.for_run(device, arguments.dry_run), arguments.parts)
    result = {
        "device": _device_name(device) if device.type != "cuda" or torch.cuda.is_available() else "no CUDA device",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "torch": torch.__version__,
        "dry_run": arguments.dry_run,
        "seconds": round(time.time() - started),
        "rows": rows,
    }
    report = render(result)
    (arguments.out / "gpu_check.md").write_text(report)
    (arguments.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
