"""Deployment benchmark: YOLOv8n-dysample against stock YOLOv8n in every CPU runtime, side by side in one run.

Each runtime gets both models as the plain default ``YOLO(...).export(format=...)`` writes them (the export hook
picks DySample's sampler per format), loaded with the runtime's own API and called on one fixed image, batch 1.
Stock and DySample are timed interleaved in rounds in this one process (:mod:`yolo_dysample.tools.timing`), so
load from other processes hits both alike; a row gives the median ms of each, the median of the per-round ratios
and the spread (half the inter-quartile range, relative). ``--samplers`` adds DySample exported with a forced
sampler as extra rows (for before/after comparisons). Eager PyTorch rows time one DySample layer (LP and PL, the
compiled CPU kernel where it applies) against bilinear and nearest ``F.interpolate`` on the same shape: the floor
a sampling layer is measured against.

    python -m yolo_dysample.tools.bench_deployment --quick             # a few minutes, prints the tables
    python -m yolo_dysample.tools.bench_deployment --write             # docs/performance.md, between the markers

A runtime that is not installed is a row saying so; nothing is installed at run time.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from yolo_dysample.tools.bench_common import load_average, machine_summary
from yolo_dysample.tools.doc_sections import replace_section
from yolo_dysample.tools.timing import against_reference, interleaved_samples

__all__ = ["BEGIN_MARKER", "END_MARKER", "RUNTIMES", "main", "measure", "render", "write_section"]

REPOSITORY = Path(__file__).resolve().parents[2]
DOC = REPOSITORY / "docs" / "performance.md"
BEGIN_MARKER = "<!-- BEGIN deployment (python -m yolo_dysample.tools.bench_deployment --write) -->"
END_MARKER = "<!-- END deployment -->"
RUNTIMES = {  # runtime -> (export format, distribution that provides it)
    "onnxruntime": ("onnx", "onnxruntime"),
    "openvino": ("openvino", "openvino"),
    "torchscript": ("torchscript", "torch"),
    "mnn": ("mnn", "MNN"),
    "ncnn": ("ncnn", "ncnn"),
}
MODELS = {"stock": "yolov8n.yaml", "dysample": "yolov8n-dysample.yaml"}
LAYER_SHAPE = (1, 256, 120, 120)  # the paper's setting: 256 x 120 x 120, x2
QUICK_LAYER_SHAPE = (1, 128, 40, 40)  # YOLOv8n's second neck upsampling at 640
TARGET = 1.05  # DySample / stock in every runtime


def _versions() -> dict[str, str]:
    found = {}
    for distribution in ("torch", "ultralytics", "onnxruntime", "onnx", "openvino", "MNN", "ncnn", "pnnx"):
        try:
            found[distribution] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[distribution] = "-"
    return found


def _kernel_summary() -> str:
    from yolo_dysample import cpu_sampling

    build_info = getattr(cpu_sampling, "kernel_build_info", None)
    if build_info is None:
        return "unknown"
    info = build_info()
    enabled = ", ".join(info.get("enabled", [])) or "-"
    flags = " ".join(info.get("flags", [])) if isinstance(info.get("flags"), list) else info.get("flags", "")
    cpu_isa = ", ".join(info.get("cpu_isa", []))
    return f"{info.get('status', '?')}; kernel uses: {enabled}; flags: {flags or '-'}; CPU SIMD: {cpu_isa}"


def build_checkpoints(directory: Path) -> dict[str, Path]:
    """Stock YOLOv8n and YOLOv8n-dysample with the same random weights where they coincide (seed 0)."""
    from ultralytics import YOLO

    from yolo_dysample import register_with_ultralytics

    register_with_ultralytics()
    paths = {}
    for variant, yaml_name in MODELS.items():
        path = directory / variant / f"{Path(yaml_name).stem}.pt"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.manual_seed(0)
            YOLO(yaml_name).save(path)
        paths[variant] = path
    return paths


def export(checkpoint: Path, export_format: str, imgsz: int, sampler: str | None = None) -> str:
    """The default ``export(format=...)`` of ``checkpoint`` in a child interpreter; the exported path.

    A child process: one converter's imports (protobuf versions, MNN's start-up) cannot disturb the others.
    ``sampler`` forces DySample's sampler through ``YOLO_DYSAMPLE_SAMPLER``; a copy per sampler keeps the files apart.
    """
    directory = checkpoint.parent / f"{export_format}-{sampler or 'auto'}"
    directory.mkdir(exist_ok=True)
    local = directory / checkpoint.name
    if not local.exists():
        local.write_bytes(checkpoint.read_bytes())
    record = directory / "exported.txt"
    if record.exists() and Path(record.read_text().strip()).exists():
        return record.read_text().strip()
    environment = {**os.environ, "YOLO_AUTOINSTALL": "false", "YOLO_OFFLINE": "true"}
    environment.pop("YOLO_DYSAMPLE_SAMPLER", None)
    if sampler:
        environment["YOLO_DYSAMPLE_SAMPLER"] = sampler
    code = (
        "import sys; from ultralytics import YOLO; import yolo_dysample; yolo_dysample.register_with_ultralytics(); "
        f"print('EXPORTED', YOLO(sys.argv[1]).export(format={export_format!r}, imgsz={imgsz}, device='cpu'))"
    )
    finished = subprocess.run(
        [sys.executable, "-c", code, str(local)], cwd=directory, env=environment, capture_output=True, text=True
    )
    lines = [line for line in finished.stdout.splitlines() if line.startswith("EXPORTED ")]
    if finished.returncode or not lines:
        tail = (finished.stderr or finished.stdout).strip().splitlines()[-1:] or [""]
        raise RuntimeError(f"export failed: {tail[0][:300]}")
    exported = lines[-1].split(" ", 1)[1].strip()
    record.write_text(exported)
    return exported


def _runner(runtime: str, exported: str, threads: int, image: np.ndarray) -> Callable[[], object]:
    """One inference call of ``exported`` in ``runtime`` with ``threads`` threads, on ``image``."""
    if runtime == "onnxruntime":
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = onnxruntime.InferenceSession(exported, options, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: image}
        return lambda: session.run(None, feed)
    if runtime == "openvino":
        import openvino

        core = openvino.Core()
        model_file = next(Path(exported).glob("*.xml"))
        config = {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
        compiled = core.compile_model(core.read_model(model_file), "CPU", config)
        request = compiled.create_infer_request()
        return lambda: request.infer([image])
    if runtime == "torchscript":
        module = torch.jit.load(exported, map_location="cpu").eval()
        tensor = torch.from_numpy(image)

        def call() -> object:
            torch.set_num_threads(threads)
            with torch.no_grad():
                return module(tensor)

        return call
    if runtime == "mnn":
        import MNN

        config = {"precision": "high", "backend": "CPU", "numThread": threads}
        manager = MNN.nn.create_runtime_manager((config,))
        net = MNN.nn.load_module_from_file(exported, [], [], runtime_manager=manager, rearrange=True)
        tensor = torch.from_numpy(image)
        return lambda: [output.read() for output in net.onForward([MNN.expr.const(tensor.data_ptr(), tensor.shape)])]
    if runtime == "ncnn":
        import ncnn

        net = ncnn.Net()
        net.opt.num_threads = threads
        if net.load_param(str(next(Path(exported).glob("*.param")))) or not net.output_names():
            raise RuntimeError(f"ncnn cannot load {Path(exported).name} (a layer it does not know, see its log)")
        net.load_model(str(next(Path(exported).glob("*.bin"))))
        sample = np.ascontiguousarray(image[0])

        def call() -> object:
            with net.create_extractor() as extractor:
                extractor.input(net.input_names()[0], ncnn.Mat(sample))
                return [np.array(extractor.extract(name)[1]) for name in sorted(net.output_names())]

        return call
    raise ValueError(f"runtime={runtime!r} is not one of {tuple(RUNTIMES)}")


def _row(name: str, threads: int, samples: dict[str, list[float]], reference: str, candidate: str) -> dict:
    summary = against_reference(samples[candidate], samples[reference])
    return {
        "name": name,
        "threads": threads,
        "reference": reference,
        "candidate": candidate,
        "reference_ms": summary["reference_ms"],
        "candidate_ms": summary["ms"],
        "ratio": summary["ratio"],
        "spread": summary["spread"],
    }


def _label(runtime: str, sampler: str | None) -> str:
    """A row's name: the runtime for the default export, ``"<runtime>, <sampler> forced"`` otherwise."""
    return runtime if sampler is None else f"{runtime}, {sampler} forced"


def _failure(name: str, error: Exception) -> dict:
    """A row that gives the reason instead of a timing."""
    return {"name": name, "status": f"{type(error).__name__}: {error}"[:300]}


def measure_runtimes(arguments: argparse.Namespace, workdir: Path) -> list[dict]:
    """Rows ``DySample / stock`` for every runtime, thread count and forced sampler."""
    checkpoints = build_checkpoints(workdir)
    image = np.random.default_rng(0).random((1, 3, arguments.imgsz, arguments.imgsz), dtype=np.float32)
    rows = []
    for runtime in arguments.runtimes:
        export_format, distribution = RUNTIMES[runtime]
        if importlib.util.find_spec(distribution) is None and importlib.util.find_spec(distribution.lower()) is None:
            rows.append({"name": runtime, "status": f"{distribution} not installed"})
            continue
        labels = {"stock": runtime, "dysample": runtime}  # candidate -> row name (a failing stock file: the runtime)
        labels.update({f"dysample ({sampler})": _label(runtime, sampler) for sampler in arguments.samplers})
        try:  # candidate -> exported file; "stock" is the reference
            files = {"stock": export(checkpoints["stock"], export_format, arguments.imgsz)}
            files["dysample"] = export(checkpoints["dysample"], export_format, arguments.imgsz)
        except Exception as error:  # noqa: BLE001 - a failing runtime is a row with its reason
            rows.append(_failure(runtime, error))
            continue
        for sampler in arguments.samplers:
            try:
                files[f"dysample ({sampler})"] = export(
                    checkpoints["dysample"], export_format, arguments.imgsz, sampler
                )
            except Exception as error:  # noqa: BLE001 - a sampler this format cannot take is a row with its reason
                rows.append(_failure(_label(runtime, sampler), error))
        for threads in arguments.threads:
            runners = {}
            for name, path in files.items():
                try:
                    runners[name] = _runner(runtime, path, threads, image)
                except Exception as error:  # noqa: BLE001 - one file the runtime cannot load leaves the others
                    if threads == arguments.threads[0]:
                        rows.append(_failure(labels[name], error))
            if "stock" not in runners:
                continue
            samples = interleaved_samples(runners, arguments.rounds, arguments.block)
            rows += [_row(labels[name], threads, samples, "stock", name) for name in runners if name != "stock"]
            print(f"[{runtime}] threads {threads} (load {load_average()})", flush=True)
    return rows


def measure_layers(arguments: argparse.Namespace) -> list[dict]:
    """Eager PyTorch: one DySample layer (LP, PL) against bilinear and nearest interpolation, same shape."""
    from yolo_dysample import DySample

    shape = tuple(arguments.layer_shape)
    torch.manual_seed(0)
    x = torch.randn(shape)
    layers = {"lp": DySample(shape[1], style="lp").eval(), "pl": DySample(shape[1], style="pl").eval()}
    calls = {
        "bilinear": lambda: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False),
        "nearest": lambda: F.interpolate(x, scale_factor=2, mode="nearest"),
        **{f"DySample {style.upper()}": (lambda layer=layer: layer(x)) for style, layer in layers.items()},
    }
    rows = []
    for threads in arguments.threads:
        torch.set_num_threads(threads)
        with torch.no_grad():
            samples = interleaved_samples(calls, arguments.rounds, arguments.block)
        for name in ("nearest", "DySample LP", "DySample PL"):
            rows.append(_row(f"eager {name}, {'x'.join(map(str, shape))}", threads, samples, "bilinear", name))
    return rows


def measure(arguments: argparse.Namespace) -> dict:
    """Everything the tables show: machine, versions, runtime rows and eager layer rows."""
    started, load_at_start = time.time(), load_average()
    with tempfile.TemporaryDirectory(prefix="bench-deployment-") as temporary:
        workdir = Path(arguments.workdir or temporary)
        workdir.mkdir(parents=True, exist_ok=True)
        runtime_rows = measure_runtimes(arguments, workdir)
    layer_rows = [] if arguments.skip_layers else measure_layers(arguments)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started)),
        "machine": machine_summary(torch.device("cpu"), max(arguments.threads)),
        "kernel": _kernel_summary(),
        "versions": _versions(),
        "load": f"{load_at_start} at start, {load_average()} at the end",
        "seconds": round(time.time() - started),
        "settings": {"imgsz": arguments.imgsz, "rounds": arguments.rounds, "block_s": arguments.block},
        "rows": runtime_rows + layer_rows,
    }


def render(result: dict) -> str:
    """Markdown: the measured-on lines and one table of every ratio."""
    versions = ", ".join(f"{name} {version}" for name, version in result["versions"].items())
    settings = result["settings"]
    lines = [
        f"Measured on {result['machine']['cpu']}, {result['date']}; {versions}; Python {platform.python_version()}.",
        f"CPU kernel: {result['kernel']}. Load average {result['load']} ({result['seconds']} s).",
        f"Batch 1, imgsz {settings['imgsz']}, default `export(format=...)` of YOLOv8n and YOLOv8n-dysample "
        f"(random weights); {settings['rounds']} interleaved rounds of >= {settings['block_s']} s per variant; "
        "ratio: median of the per-round ratios, spread: half their inter-quartile range.",
        "",
        "| runtime / layer | threads | reference | reference ms | DySample ms | ratio | spread |",
        "| --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for row in result["rows"]:
        if "status" in row:
            lines.append(f"| {row['name']} | - | - | - | - | {row['status']} | - |")
            continue
        lines.append(
            f"| {row['name']} | {row['threads']} | {row['reference']} | {row['reference_ms']:.2f} "
            f"| {row['candidate_ms']:.2f} | {row['ratio']:.3f}x | +-{100 * row['spread']:.1f} % |"
        )
    return "\n".join(lines) + "\n"


def write_section(generated: str, doc: Path = DOC) -> None:
    """Replace the deployment section of ``doc`` (between :data:`BEGIN_MARKER` and :data:`END_MARKER`)."""
    replace_section(doc, BEGIN_MARKER, END_MARKER, generated, heading="## Deployment")


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; ``--quick`` shortens the rounds and the layer shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.2 s blocks, the smaller layer shape")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--samplers", nargs="*", default=[], help="also DySample exported with these samplers forced")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 11; quick 3)")
    parser.add_argument("--block", type=float, default=None, help="seconds per timed block (default 0.5; quick 0.2)")
    parser.add_argument("--layer-shape", nargs=4, type=int, default=None, metavar=("B", "C", "H", "W"))
    parser.add_argument("--skip-layers", action="store_true", help="no eager layer rows")
    parser.add_argument("--workdir", help="keep the exports here (reused by a later run)")
    parser.add_argument("--json", type=Path, help="also write the result as JSON")
    parser.add_argument("--write", action="store_true", help=f"write the table into {DOC.name} between the markers")
    arguments = parser.parse_args(argv)
    if arguments.rounds is None:
        arguments.rounds = 3 if arguments.quick else 11
    if arguments.block is None:
        arguments.block = 0.2 if arguments.quick else 0.5
    if arguments.layer_shape is None:
        arguments.layer_shape = QUICK_LAYER_SHAPE if arguments.quick else LAYER_SHAPE
    return arguments


def main(argv: list[str] | None = None) -> int:
    """Measure, print the table, optionally write it into the docs and a JSON file."""
    arguments = parse_arguments(argv)
    result = measure(arguments)
    generated = render(result)
    print(generated)
    if arguments.json:
        arguments.json.write_text(json.dumps(result, indent=1))
    if arguments.write:
        write_section(generated)
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
