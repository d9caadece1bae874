"""Export one case, load it through ultralytics' AutoBackend and compare its raw output with PyTorch's.

Each case can run in its own interpreter (:func:`run_case_in_subprocess`), so a crashing converter fails
only its own row; :func:`broken_sampler_study` measures what a broken sampler would move the output by,
to show that every check can fail.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path

from yolo_dysample.tools.export_matrix.cases import CASE_TIMEOUT_S, CASES, IMAGE_SIZE, LATENCY_RUNS, REPO, Case
from yolo_dysample.tools.export_matrix.checkpoint import build_dysample_checkpoint, letterboxed_images
from yolo_dysample.tools.timing import time_block


def distribution_versions(packages: tuple[str, ...]) -> str:
    """``name version`` for each distribution, ``name -`` where it is not installed."""
    found = []
    for package in packages:
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} -")
    return ", ".join(found)


def output_differences(expected, actual, shape: tuple[int, int, int]) -> dict[str, float]:
    """Largest and mean |expected - actual| of two raw detection outputs, boxes as fractions of the image.

    ``expected`` / ``actual``: ``(batch, 4 + classes, anchors)`` arrays for input ``shape``
    ``(batch, height, width)``. Rows 0-3 are the boxes (x, y, w, h in pixels); dividing x, w by the
    width and y, h by the height puts box errors on the scale of the class scores (sigmoids in [0, 1]),
    so one tolerance covers both.
    """
    import numpy as np

    _, height, width = shape
    scale = np.ones((expected.shape[1], 1))
    scale[[0, 2]], scale[[1, 3]] = width, height
    difference = np.abs(np.asarray(expected) - np.asarray(actual)) / scale
    return {"max": float(difference.max()), "mean": float(difference.mean())}


def raw_output(backend, images):
    """The first (detection) output of an AutoBackend as a float64 numpy array."""
    import torch

    with torch.no_grad():
        output = backend(images)
    if isinstance(output, (list, tuple)):
        output = output[0]
    return output.detach().cpu().double().numpy()


def median_latency_ms(backend, images, runs: int = LATENCY_RUNS) -> float:
    """Median wall time of one AutoBackend forward, after three warm-up calls."""
    import torch

    with torch.no_grad():
        return statistics.median(wall_times_ms(lambda: backend(images), runs))


def wall_times_ms(call, runs: int, warmup: int = 3) -> list[float]:
    """Wall time of each of ``runs`` calls, in ms, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        call()
    return [1e3 * time_block(call, 1) for _ in range(runs)]


def coreml_program_ops(exported: Path) -> dict:
    """Op types and their counts in a converted Core ML program (no Core ML runtime needed)."""
    import coremltools as ct

    spec = ct.models.MLModel(str(exported), skip_model_load=True).get_spec()
    counts: dict[str, int] = {}

    def visit(block):
        for operation in block.operations:
            counts[operation.type] = counts.get(operation.type, 0) + 1
            for nested in operation.blocks:
                visit(nested)

    for function in spec.mlProgram.functions.values():
        for block in function.block_specializations.values():
            visit(block)
    return counts


def write_onnx2tf_calibration_placeholder(directory: Path) -> None:
    """Stand in for the onnx2tf sample images ultralytics downloads before every TensorFlow export.

    Only INT8 calibration reads them; this machine has no internet, so a local random array of the
    same name and shape keeps the FP32 conversion offline.
    """
    import numpy as np

    sample = directory / "calibration_image_sample_data_20x128x128x3_float32.npy"
    if not sample.exists():
        np.save(sample, np.random.default_rng(0).random((20, 128, 128, 3), dtype=np.float32))


class _Tee(io.TextIOBase):
    """Write to several streams: converters print their diagnostics, the matrix wants them too."""

    def __init__(self, *streams) -> None:
        self.streams = streams

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def converter_complaints(output: str) -> str:
    """The lines where a converter says what it could not convert (x2paddle's op list, onnx2tf's ERROR)."""
    output = re.sub(r"\x1b\[[0-9;]*m", "", output)  # colours
    unsupported_ops = re.findall(r"^=+ (aten::\w+) =+$", output, re.M)  # x2paddle
    if unsupported_ops:
        return f"; ops the converter does not support: {', '.join(unsupported_ops)}"
    for line in output.splitlines():
        if re.search(r"ERROR:.*(support|implement)", line):  # onnx2tf
            return "; " + line.split("ERROR:", 1)[1].strip()[:200]
    return ""


def ncnn_unconverted_layers(model_directory: Path) -> str:
    """Layers pnnx wrote under their torch names (``torch.baddbmm``): the ops it could not map to ncnn."""
    layer_types = set()
    for param in model_directory.glob("*.param"):
        for line in param.read_text().splitlines()[2:]:
            if line.split() and "." in line.split()[0]:
                layer_types.add(line.split()[0])
    return f"; layers pnnx left unconverted: {', '.join(sorted(layer_types))}" if layer_types else ""


def export_with_sampler(checkpoint: Path, case: Case, sampler: str = "auto") -> str:
    """Export ``checkpoint`` as ``case`` asks.

    ``sampler="auto"`` leaves the choice to the export hook (what ``yolo export`` does);
    ``"grid_sample"`` / ``"gather"`` force one through ``YOLO_DYSAMPLE_SAMPLER``, which the hook
    honours, and :func:`use_sampler`, which covers a process where the hook is not installed.
    """
    import contextlib

    from ultralytics import YOLO

    from yolo_dysample.export_policy import SAMPLER_ENVIRONMENT_VARIABLE, use_sampler

    yolo = YOLO(str(checkpoint))
    arguments = {"imgsz": IMAGE_SIZE, "device": "cpu", "verbose": False, **case.export_args}
    if max(shape[0] for shape in case.shapes) > 1:
        arguments.setdefault("batch", max(shape[0] for shape in case.shapes))
    if sampler == "auto":
        os.environ.pop(SAMPLER_ENVIRONMENT_VARIABLE, None)
        forced = contextlib.nullcontext()
    else:
        os.environ[SAMPLER_ENVIRONMENT_VARIABLE] = sampler
        forced = use_sampler(yolo.model, sampler)
    try:
        with forced:
            exported = yolo.export(**arguments)
    finally:
        os.environ.pop(SAMPLER_ENVIRONMENT_VARIABLE, None)
    if not exported:
        raise RuntimeError("export returned no file")
    return str(exported)


def reference_backend(checkpoint: Path, fp16_weights: bool = False):
    """The PyTorch checkpoint through AutoBackend (Conv + BatchNorm fused, float32), what exports are compared with.

    ``fp16_weights``: every convolution's weight and bias rounded to float16 after fusing, as an export that
    stores its weights in float16 rounds the same fused weights; the computation stays float32.
    """
    import torch
    from ultralytics.nn.autobackend import AutoBackend

    reference = AutoBackend(str(checkpoint), device="cpu", verbose=False)
    if fp16_weights:
        with torch.no_grad():
            for module in reference.model.modules():  # AutoBackend does not register its model as a child
                if isinstance(module, torch.nn.Conv2d):
                    for parameter in (module.weight, module.bias):
                        if parameter is not None:
                            parameter.copy_(parameter.half().float())
    return reference


def compare_backends(reference, backend, case: Case) -> list[dict[str, float]]:
    """:func:`output_differences` of two AutoBackends on the letterboxed photos, one dict per shape of ``case``."""
    differences = []
    for shape in case.shapes:
        images = letterboxed_images(shape)
        expected, actual = raw_output(reference, images), raw_output(backend, images)
        if case.boxes_in_pixels:
            actual[:, [0, 2]] /= shape[2]
            actual[:, [1, 3]] /= shape[1]
        if expected.shape != actual.shape:
            raise ValueError(f"output shape {actual.shape} != PyTorch {expected.shape} for input {shape}")
        differences.append(output_differences(expected, actual, shape))
    return differences


def worst(differences: list[dict[str, float]]) -> dict[str, float]:
    """The largest max and the largest mean |diff| over the shapes."""
    return {metric: max(difference[metric] for difference in differences) for metric in ("max", "mean")}


@contextlib.contextmanager
def openvino_f32_inference():
    """Inside, OpenVINO compiles with ``INFERENCE_PRECISION_HINT=f32``.

    OpenVINO's CPU plugin runs float32 models in bfloat16 by default on CPUs that have it (AVX512_BF16, AMX);
    AutoBackend asks for f32 only on Windows and ARM Linux.
    """
    import openvino

    compile_model = openvino.Core.compile_model

    def compile_in_f32(core, *args, config=None, **kwargs):
        config = {**(config or {}), "INFERENCE_PRECISION_HINT": openvino.Type.f32}
        return compile_model(core, *args, config=config, **kwargs)

    openvino.Core.compile_model = compile_in_f32
    try:
        yield
    finally:
        openvino.Core.compile_model = compile_model


def openvino_default_precision() -> str:
    """The precision OpenVINO's CPU plugin computes float32 models in here, unless told otherwise: ``f32``, ``bf16``."""
    import openvino

    return openvino.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


BROKEN_SAMPLERS = ("offsets ignored", "sampling grid x1.02", "zeros padding")


@contextlib.contextmanager
def broken_sampling(model, breakage: str):
    """Inside, the DySample layers of ``model`` sample wrongly, in one of the ways a faulty conversion could.

    ``"offsets ignored"``: the offset convolution zeroed, so DySample is bilinear interpolation;
    ``"sampling grid x1.02"``: every sampling point 2 % further from the centre (a normalisation slip);
    ``"zeros padding"``: ``grid_sample`` pads with zeros, not the border (the only padding onnx2tf converts).
    The compiled CPU kernel is switched off meanwhile, so ``F.grid_sample`` does the sampling.
    """
    import torch
    import torch.nn.functional as F

    from yolo_dysample.cpu_sampling import kernel_disabled
    from yolo_dysample.export_policy import dysample_layers

    if breakage not in BROKEN_SAMPLERS:
        raise ValueError(f"breakage={breakage!r} is not one of {BROKEN_SAMPLERS}")
    layers = dysample_layers(model)
    saved = [{name: value.clone() for name, value in layer.offset.state_dict().items()} for layer in layers]
    grid_sample = F.grid_sample

    def broken_grid_sample(features, grid, mode="bilinear", padding_mode="zeros", align_corners=None):
        grid = grid * 1.02 if breakage == "sampling grid x1.02" else grid
        padding_mode = "zeros" if breakage == "zeros padding" else padding_mode
        return grid_sample(features, grid, mode=mode, padding_mode=padding_mode, align_corners=align_corners)

    if breakage == "offsets ignored":
        with torch.no_grad():
            for layer in layers:
                layer.offset.weight.zero_()
                layer.offset.bias.zero_()
    F.grid_sample = broken_grid_sample
    try:
        with kernel_disabled():
            yield model
    finally:
        F.grid_sample = grid_sample
        for layer, state in zip(layers, saved, strict=True):
            layer.offset.load_state_dict(state)


def broken_sampler_study(checkpoint: Path, cases: list[Case] = CASES) -> list[dict]:
    """How far each of :data:`BROKEN_SAMPLERS` moves the checkpoint's raw output, in PyTorch (no export).

    One row per breakage: ``max`` / ``mean`` |diff| over the shapes the cases use (float32 weights), and
    ``cases``: for every case that is compared here, its own metric of that move on its own shapes and
    reference, and its tolerance. A check can catch the breakage where the metric is far above the tolerance.
    """
    checked = [case for case in cases if case.runs_here and not case.expect_error and not case.unverified]
    rows = [{"breakage": breakage, "cases": {}} for breakage in BROKEN_SAMPLERS]
    for fp16_weights in sorted({case.fp16_weights for case in checked}):
        reference = reference_backend(checkpoint, fp16_weights)
        mine = [case for case in checked if case.fp16_weights == fp16_weights]
        shapes = list(dict.fromkeys(shape for case in mine for shape in case.shapes))
        expected = {shape: raw_output(reference, letterboxed_images(shape)) for shape in shapes}
        for row in rows:
            with broken_sampling(reference.model, row["breakage"]):
                moved = {
                    shape: output_differences(expected[shape], raw_output(reference, letterboxed_images(shape)), shape)
                    for shape in shapes
                }
            if not fp16_weights:
                row.update(worst(list(moved.values())))
            for case in mine:
                value = worst([moved[shape] for shape in case.shapes])[case.metric]
                row["cases"][case.name] = {"metric": case.metric, "value": value, "tolerance": case.tolerance}
    return rows


def run_case(
    case: Case, sampler: str, directory: str | Path, checkpoint: Path | None = None, measure_latency: bool = True
) -> dict:
    """Export, load through AutoBackend, compare with PyTorch; a dict row for the table."""
    from ultralytics.nn.autobackend import AutoBackend

    directory = Path(directory)
    result = {
        "case": case.name,
        "format": case.format,
        "sampler": sampler,
        "versions": distribution_versions(case.packages),
        "metric": case.metric,
        "tolerance": case.tolerance,
        "notes": case.notes,
    }
    if case.unverified:
        return {**result, "status": "unverified", "reason": case.unverified}
    checkpoint = checkpoint or build_dysample_checkpoint(directory / "dysample-yolov8n.pt")
    if case.format in {"saved_model", "pb", "edgetpu"}:
        write_onnx2tf_calibration_placeholder(Path.cwd())
    started = time.perf_counter()
    converter_output = io.StringIO()
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, converter_output)):
            exported = export_with_sampler(checkpoint, case, sampler)
    except BaseException as error:  # noqa: BLE001 - the matrix lists every failure with its reason
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
        if case.expect_error and case.expect_error in str(error):
            return {**result, "status": "clear error (expected)", "reason": message}
        message += converter_complaints(converter_output.getvalue())
        return {**result, "status": "export failed", "reason": message, "trace": traceback.format_exc()[-2000:]}
    result["export_s"] = round(time.perf_counter() - started, 1)
    if case.artifact:
        found = sorted(Path(exported).glob(case.artifact))
        if not found:
            return {**result, "status": "export failed", "reason": f"no {case.artifact} in {exported}"}
        exported = str(found[0])
    result["exported"] = exported
    if case.expect_error:
        return {**result, "status": "FAIL: exported where an error was expected"}
    if not case.runs_here:
        try:
            ops = coreml_program_ops(Path(exported)) if case.format == "coreml" else {}
        except Exception as error:  # noqa: BLE001
            return {**result, "status": "converted, program unreadable", "reason": f"{type(error).__name__}: {error}"}
        sampling_op_types = {"resample", "gather", "gather_nd", "gather_along_axis"}
        sampling_ops = {op: n for op, n in ops.items() if op in sampling_op_types}
        return {**result, "status": "converted (not run here)", "program_ops": sampling_ops}
    try:
        reference = reference_backend(checkpoint, case.fp16_weights)
        with openvino_f32_inference() if case.openvino_f32 else contextlib.nullcontext():
            backend = AutoBackend(exported, device="cpu", verbose=False)
        differences = compare_backends(reference, backend, case)
        if case.fp16_weights:  # what storing the weights in fp16 costs: the same file against the unrounded model
            result["vs_unrounded_weights"] = worst(compare_backends(reference_backend(checkpoint), backend, case))
        precision = openvino_default_precision() if case.openvino_f32 else "f32"
        if precision != "f32":  # what AutoBackend gives by default on this CPU
            default = AutoBackend(exported, device="cpu", verbose=False)
            measured = worst(compare_backends(reference, default, case))
            result["autobackend_default"] = {"precision": precision, **measured}
        if measure_latency:
            latency = median_latency_ms(backend, letterboxed_images(case.shapes[0]))
            reference_latency = median_latency_ms(reference, letterboxed_images(case.shapes[0]))
    except BaseException as error:  # noqa: BLE001
        message = f"{type(error).__name__}: {error}".strip().splitlines()[0][:300]
        if case.format == "ncnn":
            message += ncnn_unconverted_layers(Path(exported))
        return {**result, "status": "load/run failed", "reason": message, "trace": traceback.format_exc()[-2000:]}
    result.update({f"{metric}_abs_diff": value for metric, value in worst(differences).items()})
    result["status"] = "pass" if result[f"{case.metric}_abs_diff"] <= case.tolerance else "MISMATCH"
    result["diff_per_shape"] = dict(zip([str(shape) for shape in case.shapes], differences, strict=True))
    if measure_latency:
        result.update(latency_ms=round(latency, 2), pytorch_latency_ms=round(reference_latency, 2))
    return result


def run_case_in_subprocess(python: str, case: Case, sampler: str, workdir: Path, checkpoint: Path) -> dict:
    """:func:`run_case` in a fresh interpreter, so a crashing converter fails only its own row."""
    directory = workdir / f"{case.name.replace(' ', '_').replace('=', '')}-{sampler}"
    directory.mkdir(parents=True, exist_ok=True)
    result_file = directory / "result.json"
    command = [python, "-m", "yolo_dysample.tools.export_matrix", "--run-case", case.name, "--sampler", sampler]
    command += ["--directory", str(directory), "--checkpoint", str(checkpoint), "--result", str(result_file)]
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    environment.setdefault("YOLO_AUTOINSTALL", "false")  # a missing toolchain is a row with its reason, not a pip run
    try:
        finished = subprocess.run(
            command, cwd=directory, capture_output=True, text=True, timeout=CASE_TIMEOUT_S, env=environment
        )
    except subprocess.TimeoutExpired:
        return {
            "case": case.name,
            "format": case.format,
            "sampler": sampler,
            "status": "timed out",
            "reason": f"over {CASE_TIMEOUT_S} s",
            "versions": "",
            "notes": case.notes,
        }
    (directory / "log.txt").write_text(finished.stdout + finished.stderr)
    if result_file.exists():
        return json.loads(result_file.read_text())
    tail = (finished.stdout + finished.stderr).strip().splitlines()[-1:] or [""]
    return {
        "case": case.name,
        "format": case.format,
        "sampler": sampler,
        "status": "crashed",
        "reason": f"exit {finished.returncode}: {tail[0][:300]}",
        "versions": "",
        "notes": case.notes,
    }
