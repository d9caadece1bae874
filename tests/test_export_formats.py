"""A DySample YOLO exports to the CPU formats and the exported model matches PyTorch.

The model is YOLOv8n with two DySample layers (LP + dynamic scope, PL + static scope) whose offsets
are perturbed far from zero, with BatchNorm calibrated on the sample photos so that its output depends
on its input and on where DySample samples; each export goes through the stock ``YOLO.export`` with the
sampler the export hook picks, loads through ultralytics' AutoBackend and is compared with the PyTorch
checkpoint on letterboxed ``bus.jpg`` / ``zidane.jpg`` (raw outputs, boxes as fractions of the image;
each case's metric and tolerance are in ``CASES``). The checks can fail: a sampler that ignores the
offsets, scales the grid by 1.02 or pads with zeros moves the output by at least 10x every tolerance
(``test_every_check_catches_a_broken_sampler_tenfold``). The helpers live in ``yolo_dysample.tools.export_matrix``,
which writes the same checks for every format into ``docs/export_matrix.md``.

Toolchains: onnx / onnxruntime / onnxslim come with the ``test`` extra and run here. Every other toolchain is
installed into a scratch environment that sees this one (``yolo_dysample.tools.scratch_env``), never into the
environment running the tests, and is deleted after the session: OpenVINO, ncnn + pnnx, MNN, PaddlePaddle + X2Paddle
from the ``export`` and ``paddle`` extras (``export_toolchains_python``), TensorFlow, onnx2tf, LiteRT and ExecuTorch
from the ``tensorflow`` and ``executorch`` extras (``tensorflow_executorch_python``; TensorFlow 2.19 would downgrade
numpy). Both are built from the extras alone, so a dependency an extra forgets fails its format's test. Those cases run
in a subprocess with a ``pip`` on ``PATH`` that records any call: no export may install packages. Core ML
(Apple-only runtime) and LiteRT from litert-torch (needs torch<2.15) are only in the matrix script.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import pytest

from yolo_dysample.export_policy import SAMPLER_ENVIRONMENT_VARIABLE
from yolo_dysample.tools import export_matrix
from yolo_dysample.tools.scratch_env import create_scratch_env, install

REPO = Path(__file__).resolve().parents[1]

EXPORT_EXTRAS = ("export", "paddle")  # installed into one scratch environment
SCRATCH_VENV_EXTRAS = ("tensorflow", "executorch")  # another one: tensorflow 2.19 needs numpy<2.2
EXPORT_PYTHON_VARIABLE = "YOLO_DYSAMPLE_EXPORT_PYTHON"  # an interpreter that has the export extras already
TOOLCHAIN_PYTHON_VARIABLE = "YOLO_DYSAMPLE_TOOLCHAIN_PYTHON"  # one that has the tensorflow/executorch extras
TENSORFLOW_CASES = ["saved_model", "pb", "tflite (onnx2tf, fp32)", "tflite (onnx2tf, fp16)"]


def export_extra(extras: tuple[str, ...] = ("export", "paddle")) -> dict[str, str]:
    """The named extras of pyproject.toml, ``yolo-dysample[...]`` references expanded: distribution -> requirement."""
    text = (REPO / "pyproject.toml").read_text()
    pins = {}
    for extra in extras:
        block = re.search(rf"^{extra}\s*=\s*\[(.*?)^\]", text, re.S | re.M)
        assert block, f"pyproject.toml has no [project.optional-dependencies] {extra} list"
        for requirement in re.findall(r'"([^"]+)"', block.group(1)):
            included = re.fullmatch(r"yolo-dysample\[([\w,-]+)\]", requirement)
            if included:
                pins |= export_extra(tuple(included.group(1).split(",")))
            else:
                pins[re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0]] = requirement
    return pins


def scratch_toolchain_python(extras: tuple[str, ...], label: str, variable: str):
    """Yield the interpreter of a scratch venv over this environment with ``extras`` installed; delete it after.

    torch is held at its installed release (as ultralytics installs ExecuTorch), so no extra can replace it. The
    environment variable ``variable`` names an interpreter that has the extras already instead.
    """
    existing = os.environ.get(variable)
    if existing:
        yield existing
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"yolo-dysample-{label}-"))
    try:
        started = time.perf_counter()
        python = create_scratch_env(scratch / "venv")
        requirements = [*export_extra(extras).values(), f"torch=={metadata.version('torch').split('+')[0]}"]
        install(python, requirements)
        seconds = time.perf_counter() - started
        print(f"\n{label}: scratch venv + pip install {requirements} in {seconds:.1f} s")
        yield str(python)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@pytest.fixture(scope="session")
def export_toolchains_python():
    """Interpreter of a scratch venv with the ``export`` and ``paddle`` extras."""
    yield from scratch_toolchain_python(EXPORT_EXTRAS, "export-toolchains", EXPORT_PYTHON_VARIABLE)


@pytest.fixture(scope="session")
def tensorflow_executorch_python():
    """Interpreter of a scratch venv with the ``tensorflow`` and ``executorch`` extras."""
    yield from scratch_toolchain_python(SCRATCH_VENV_EXTRAS, "tensorflow-executorch", TOOLCHAIN_PYTHON_VARIABLE)


@pytest.fixture(scope="session")
def dysample_checkpoint(tmp_path_factory) -> Path:
    return export_matrix.build_dysample_checkpoint(tmp_path_factory.mktemp("checkpoint") / "dysample-yolov8n.pt")


@pytest.fixture
def automatic_sampler(monkeypatch):
    """No forced sampler: the export hook chooses, as in a plain ``yolo export``."""
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)


def export_and_compare(case_name: str, checkpoint: Path, directory: Path, sampler: str = "auto") -> dict:
    """Run one matrix case in ``directory`` and return its row; assert it passed."""
    local = directory / checkpoint.name
    shutil.copyfile(checkpoint, local)  # exports land beside the checkpoint
    case = export_matrix.CASES_BY_NAME[case_name]
    row = export_matrix.run_case(case, sampler, directory, local, measure_latency=False)
    assert row["status"] == "pass", row
    return row


def onnx_op_types(path: str) -> set[str]:
    import onnx

    return {node.op_type for node in onnx.load(path).graph.node}


def test_checkpoint_offsets_are_far_from_bilinear_interpolation(dysample_checkpoint):
    """The fixture model really samples off the bilinear grid, so a broken sampler cannot hide."""
    import torch
    import torch.nn.functional as F
    from ultralytics.nn.tasks import load_checkpoint

    from yolo_dysample import DySample

    model, _ = load_checkpoint(str(dysample_checkpoint))
    layers = [layer for layer in model.modules() if isinstance(layer, DySample)]
    assert {(layer.style, layer.dyscope) for layer in layers} == {("lp", True), ("pl", False)}
    for layer in layers:
        features = torch.randn(1, layer.in_channels, 6, 6)
        offsets = layer.float().offsets(features)
        assert offsets.abs().mean() > 0.2  # input pixels
        difference = layer(features) - F.interpolate(features, scale_factor=2, mode="bilinear")
        assert difference.abs().mean() > 0.05


def test_checkpoint_is_the_same_for_the_same_seed(dysample_checkpoint, tmp_path):
    import torch

    again = export_matrix.build_dysample_checkpoint(tmp_path / "again.pt")
    first, second = (
        torch.load(path, weights_only=False)["model"].state_dict() for path in (dysample_checkpoint, again)
    )
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)


@pytest.fixture(scope="session")
def broken_sampler_rows(dysample_checkpoint) -> list[dict]:
    return export_matrix.broken_sampler_study(dysample_checkpoint)


@pytest.mark.parametrize("breakage", export_matrix.BROKEN_SAMPLERS)
def test_every_check_catches_a_broken_sampler_tenfold(breakage, broken_sampler_rows):
    """On the checkpoint, in PyTorch, a broken sampler moves every case's metric to >= 10x its tolerance.

    So no export that samples that way could pass. One exception, measured and documented: the mean check
    of onnxruntime's float16 graph (``onnx quantize=16``) cannot see a grid 2 % too large, which moves the
    mean about as much as that graph's own float16 rounding does; it does catch the other two.
    """
    (row,) = [row for row in broken_sampler_rows if row["breakage"] == breakage]
    compared = [case for case in export_matrix.CASES if case.runs_here and not (case.expect_error or case.unverified)]
    assert set(row["cases"]) == {case.name for case in compared}
    exempt = breakage == "sampling grid x1.02"
    missed = {
        name: check
        for name, check in row["cases"].items()
        if check["value"] < 10 * check["tolerance"] and not (exempt and check["metric"] == "mean")
    }
    assert not missed, missed


def test_broken_sampling_leaves_the_model_as_it_was(dysample_checkpoint):
    import numpy as np

    reference = export_matrix.reference_backend(dysample_checkpoint)
    images = export_matrix.letterboxed_images((1, 64, 64))
    before = export_matrix.raw_output(reference, images)
    for breakage in export_matrix.BROKEN_SAMPLERS:
        with export_matrix.broken_sampling(reference.model, breakage):
            assert np.abs(export_matrix.raw_output(reference, images) - before).max() > 1e-2
    np.testing.assert_array_equal(export_matrix.raw_output(reference, images), before)


@pytest.mark.parametrize("case_name", ["torchscript", "torchscript dynamic"])
def test_torchscript_export_matches_pytorch(case_name, dysample_checkpoint, tmp_path, automatic_sampler):
    export_and_compare(case_name, dysample_checkpoint, tmp_path)


def test_onnx_export_samples_with_standard_gathers_and_matches_pytorch(
    dysample_checkpoint, tmp_path, automatic_sampler
):
    import onnx

    row = export_and_compare("onnx", dysample_checkpoint, tmp_path)
    nodes = onnx.load(row["exported"]).graph.node
    assert not any(node.op_type == "GridSample" for node in nodes)  # ONNX's default: the difference-table gathers
    assert sum(node.op_type == "Floor" for node in nodes) == 4  # x and y of two DySample layers
    assert {node.domain for node in nodes} <= {"", "ai.onnx"}  # standard operators only


def test_onnx_without_simplify_matches_pytorch(dysample_checkpoint, tmp_path, automatic_sampler):
    export_and_compare("onnx simplify=False", dysample_checkpoint, tmp_path)


def test_dynamic_onnx_matches_pytorch_at_three_resolutions_and_batch_two(
    dysample_checkpoint, tmp_path, automatic_sampler
):
    row = export_and_compare("onnx dynamic", dysample_checkpoint, tmp_path)
    assert len(row["diff_per_shape"]) == 3 and "(2, 128, 128)" in row["diff_per_shape"]


def test_fp16_onnx_matches_pytorch_within_half_precision(dysample_checkpoint, tmp_path, automatic_sampler):
    import onnx

    row = export_and_compare("onnx quantize=16", dysample_checkpoint, tmp_path)
    initializer_types = {tensor.data_type for tensor in onnx.load(row["exported"]).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in initializer_types


def test_onnx_opset_16_is_the_lowest_with_grid_sample(dysample_checkpoint, tmp_path):
    row = export_and_compare("onnx opset=16", dysample_checkpoint, tmp_path, sampler="grid_sample")
    assert "GridSample" in onnx_op_types(row["exported"])


@pytest.mark.parametrize("case_name", ["onnx opset=15", "onnx opset=9"])
def test_onnx_below_opset_16_exports_the_gather_sampler_automatically(
    case_name, dysample_checkpoint, tmp_path, automatic_sampler
):
    row = export_and_compare(case_name, dysample_checkpoint, tmp_path)
    op_types = onnx_op_types(row["exported"])
    assert "GridSample" not in op_types and "Gather" in op_types


def test_onnx_below_opset_9_is_a_clear_error_not_a_wrong_graph(dysample_checkpoint, tmp_path, automatic_sampler):
    from ultralytics import YOLO

    local = tmp_path / dysample_checkpoint.name
    shutil.copyfile(dysample_checkpoint, local)
    with pytest.raises(ValueError, match=r"DySample cannot be exported at ONNX opset=8: it needs opset>=9"):
        YOLO(str(local)).export(format="onnx", opset=8, imgsz=export_matrix.IMAGE_SIZE, device="cpu")
    assert not list(tmp_path.glob("*.onnx"))


def test_forced_gather_sampler_onnx_matches_pytorch(dysample_checkpoint, tmp_path):
    row = export_and_compare("onnx", dysample_checkpoint, tmp_path, sampler="gather")
    assert "GridSample" not in onnx_op_types(row["exported"])


def write_pip_recorder(directory: Path) -> Path:
    """``pip`` and ``pip3`` commands in ``directory`` that append their arguments to ``directory/calls`` and fail."""
    directory.mkdir(parents=True, exist_ok=True)
    calls = directory / "calls"
    for name in ("pip", "pip3"):
        recorder = directory / name
        recorder.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\nexit 1\n')
        recorder.chmod(0o755)
    return calls


def export_and_compare_with(python: str, case_name: str, checkpoint: Path, directory: Path) -> dict:
    """Run one matrix case with another interpreter (``run_case_in_subprocess``); assert it passed, return its row.

    A ``pip`` on ``PATH`` records every call (and fails it): the export must not have started one.
    """
    case = export_matrix.CASES_BY_NAME[case_name]
    calls = write_pip_recorder(directory / "pip-recorder")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PATH", os.pathsep.join([str(calls.parent), os.environ.get("PATH", "")]))
        patch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)  # the export hook chooses
        row = export_matrix.run_case_in_subprocess(python, case, "auto", directory, checkpoint)
    logs = "".join(log.read_text()[-3000:] for log in directory.glob("*/log.txt"))
    assert row["status"] == "pass", f"{row}\n--- log (tail)\n{logs}"
    assert row[f"{case.metric}_abs_diff"] <= case.tolerance
    assert not calls.exists(), f"the {case_name} export ran pip: {calls.read_text()}"
    return row


@pytest.mark.toolchains
@pytest.mark.parametrize("case_name", ["openvino", "openvino dynamic", "openvino quantize=16"])
def test_openvino_export_matches_pytorch(case_name, dysample_checkpoint, tmp_path, export_toolchains_python):
    export_and_compare_with(export_toolchains_python, case_name, dysample_checkpoint, tmp_path)


@pytest.mark.toolchains
def test_ncnn_export_matches_pytorch(dysample_checkpoint, tmp_path, export_toolchains_python):
    row = export_and_compare_with(export_toolchains_python, "ncnn", dysample_checkpoint, tmp_path)
    # ncnn has no batch axis: the export hook makes each of the 4 channel groups of both layers its own GridSample
    (param,) = Path(row["exported"]).glob("*.param")
    assert [line.split()[0] for line in param.read_text().splitlines()[2:]].count("GridSample") == 8


@pytest.mark.toolchains
def test_paddle_export_matches_pytorch(dysample_checkpoint, tmp_path, export_toolchains_python):
    # x2paddle has no grid_sampler: the hook picks the gather sampler and freezes the offset projection. x2paddle
    # imports six without declaring it, so the paddle extra lists it.
    export_and_compare_with(export_toolchains_python, "paddle", dysample_checkpoint, tmp_path)


@pytest.mark.toolchains
@pytest.mark.parametrize("case_name", ["mnn", "mnn dynamic"])
def test_mnn_export_matches_pytorch_and_installs_nothing(
    case_name, dysample_checkpoint, tmp_path, export_toolchains_python
):
    """MNN's converter imports a usage logger that runs ``pip install -U aliyun-log-python-sdk`` when that module is
    missing (it downgraded protobuf, and ``import onnx`` failed after). The export must run no pip and leave the
    environment consistent."""

    def run(*arguments: str) -> subprocess.CompletedProcess:
        command = [export_toolchains_python, *arguments]
        return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)

    before = run("-m", "pip", "list", "--format=freeze").stdout
    export_and_compare_with(export_toolchains_python, case_name, dysample_checkpoint, tmp_path)
    assert run("-m", "pip", "list", "--format=freeze").stdout == before
    checked = run("-m", "pip", "check")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    imported = run("-c", "import onnx, onnxruntime")
    assert imported.returncode == 0, imported.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.toolchains
@pytest.mark.parametrize("case_name", TENSORFLOW_CASES)
def test_tensorflow_export_matches_pytorch(case_name, dysample_checkpoint, tmp_path, tensorflow_executorch_python):
    # onnx2tf has no border-padded GridSample: the hook picks the gather sampler (the .tflite files come from the same
    # onnx2tf conversion as the SavedModel and run in LiteRT)
    export_and_compare_with(tensorflow_executorch_python, case_name, dysample_checkpoint, tmp_path)


@pytest.mark.slow
@pytest.mark.toolchains
def test_executorch_export_matches_pytorch(dysample_checkpoint, tmp_path, tensorflow_executorch_python):
    export_and_compare_with(tensorflow_executorch_python, "executorch", dysample_checkpoint, tmp_path)


def yolo_command() -> str:
    beside_python = Path(sys.executable).with_name("yolo")
    return str(beside_python) if beside_python.exists() else shutil.which("yolo")


def write_tiny_dataset(root: Path) -> Path:
    """Two ultralytics sample photos with one box each, as a YOLO detection dataset with 80 classes."""
    from ultralytics.utils import ASSETS

    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    for name, box in (("bus", "5 0.5 0.5 0.8 0.6"), ("zidane", "0 0.3 0.5 0.2 0.8")):
        shutil.copyfile(ASSETS / f"{name}.jpg", root / "images" / "val" / f"{name}.jpg")
        (root / "labels" / "val" / f"{name}.txt").write_text(box + "\n")
    names = "\n".join(f"  {index}: class{index}" for index in range(80))
    data = root / "tiny.yaml"
    data.write_text(f"path: {root}\ntrain: images/val\nval: images/val\nnames:\n{names}\n")
    return data


@pytest.mark.slow
def test_yolo_cli_exports_onnx_then_predicts_and_validates_it(dysample_checkpoint, tmp_path):
    """The real ``yolo`` command: export (opset 15 -> gather sampler), predict and val on the exported file."""
    import onnx

    local = tmp_path / dysample_checkpoint.name
    shutil.copyfile(dysample_checkpoint, local)
    environment = {k: v for k, v in os.environ.items() if k != SAMPLER_ENVIRONMENT_VARIABLE}
    environment["YOLO_AUTOINSTALL"] = "false"

    def yolo(*arguments: str) -> str:
        finished = subprocess.run(
            [yolo_command(), *arguments], cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=600
        )
        assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
        return finished.stdout + finished.stderr

    yolo("export", f"model={local}", "format=onnx", "opset=15", "imgsz=128", "device=cpu")
    exported = local.with_suffix(".onnx")
    op_types = {node.op_type for node in onnx.load(str(exported)).graph.node}
    assert "GridSample" not in op_types and "Gather" in op_types  # the hook chose the gather sampler

    from ultralytics.utils import ASSETS

    yolo("predict", f"model={exported}", f"source={ASSETS / 'bus.jpg'}", "imgsz=128", "device=cpu", "save_txt=True")
    data = write_tiny_dataset(tmp_path / "tiny")
    output = yolo("val", f"model={exported}", f"data={data}", "imgsz=128", "batch=1", "device=cpu", "plots=False")
    assert re.search(r"\ball\s+2\s+2\s", output), output[-2000:]  # metrics row: 2 images, 2 instances
