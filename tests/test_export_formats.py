"""A DySample YOLO exports to the CPU formats and the exported model matches PyTorch.

The model is YOLOv8n with two DySample layers (LP + dynamic scope, PL + static scope) whose offsets
are perturbed far from zero, with BatchNorm calibrated on the sample photos so that its output depends
on its input and on where DySample samples; each export goes through the stock ``YOLO.export`` with the
sampler the export hook picks, loads through ultralytics' AutoBackend and is compared with the PyTorch
checkpoint on letterboxed ``bus.jpg`` / ``zidane.jpg`` (raw outputs, boxes as fractions of the image;
each case's metric and tolerance are in ``CASES``). The checks can fail: a sampler that ignores the
offsets, scales the grid by 1.02 or pads with zeros moves the output by at least 10x every tolerance
(``test_every_check_catches_a_broken_sampler_tenfold``). The helpers live in ``scripts/export_matrix.py``,
which writes the same checks for every format into ``docs/export_matrix.md``.

Toolchains: onnx / onnxruntime / onnxslim come with the ``test`` extra. OpenVINO, ncnn (+ pnnx) and
MNN are installed by the ``export_toolchains`` fixture, PaddlePaddle + X2Paddle by ``paddle_toolchain``,
from the pins of the ``export`` / ``paddle`` extras when missing (about 15 s and 7 s of pip). TensorFlow 2.19
would downgrade this environment's numpy, so the SavedModel, pb, onnx2tf ``.tflite`` and ExecuTorch cases
(``slow``) run in a scratch venv that ``tensorflow_executorch_python`` builds over this one from the
``tensorflow`` and ``executorch`` extras (about 75 s of pip, 2.6 GB, deleted after the session; the five
cases take about 140 s more). Core ML (Apple-only runtime) and LiteRT (litert-torch needs torch<2.15) are
only in the matrix script.
"""

from __future__ import annotations

import importlib.util
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

from yolo_dysample.gather_sampling import SAMPLER_ENVIRONMENT_VARIABLE

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("export_matrix", REPO / "scripts" / "export_matrix.py")
export_matrix = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("export_matrix", export_matrix)  # dataclasses look their module up while it executes
_spec.loader.exec_module(export_matrix)

CI_TOOLCHAINS = {"openvino": "openvino", "ncnn": "ncnn", "pnnx": "pnnx", "MNN": "MNN"}  # distribution -> module
PADDLE_TOOLCHAIN = {"paddlepaddle": "paddle", "x2paddle": "x2paddle"}  # ~7 s of pip, ~730 MB on disk
NO_DEPENDENCIES = {"ncnn", "pnnx"}  # as ultralytics installs them: ncnn would pull opencv-python
# Extras installed into a scratch venv, never here: tensorflow 2.19 needs numpy<2.2 (this environment has 2.4)
SCRATCH_VENV_EXTRAS = ("tensorflow", "executorch")
TOOLCHAIN_PYTHON_VARIABLE = "YOLO_DYSAMPLE_TOOLCHAIN_PYTHON"  # an interpreter that has them already: no venv
TENSORFLOW_CASES = ["saved_model", "pb", "tflite (onnx2tf, fp32)", "tflite (onnx2tf, fp16)"]


def export_extra(extras: tuple[str, ...] = ("export", "paddle")) -> dict[str, str]:
    """The named extras of pyproject.toml (default ``export``, ``paddle``): distribution -> requirement string."""
    text = (REPO / "pyproject.toml").read_text()
    pins = {}
    for extra in extras:
        block = re.search(rf"^{extra}\s*=\s*\[(.*?)^\]", text, re.S | re.M)
        assert block, f"pyproject.toml has no [project.optional-dependencies] {extra} list"
        requirements = re.findall(r'"([^"]+)"', block.group(1))
        pins |= {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0]: req for req in requirements}
    return pins


@pytest.fixture(scope="session")
def export_toolchains() -> float:
    """Install the CPU runtimes these tests use, pinned as in the ``export`` extra; returns the pip seconds."""
    return install_missing_toolchains(CI_TOOLCHAINS, "export_toolchains")


@pytest.fixture(scope="session")
def paddle_toolchain() -> float:
    """Install PaddlePaddle and X2Paddle (``format=paddle``), pinned as in the ``export`` extra; the pip seconds."""
    return install_missing_toolchains(PADDLE_TOOLCHAIN, "paddle_toolchain")


def install_missing_toolchains(distributions: dict[str, str], label: str) -> float:
    """pip install those of ``distributions`` that are missing, pinned as in the ``export`` extra; the seconds."""
    pins = export_extra()
    missing = [name for name in distributions if not _installed(name)]
    started = time.perf_counter()
    for group in (
        [n for n in missing if n not in NO_DEPENDENCIES],
        [n for n in missing if n in NO_DEPENDENCIES],
    ):
        if group:
            command = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"]
            command += (["--no-deps"] if group[0] in NO_DEPENDENCIES else []) + [pins[name] for name in group]
            subprocess.run(command, check=True, timeout=600)
    seconds = time.perf_counter() - started
    if missing:
        print(f"\n{label}: pip installed {missing} in {seconds:.1f} s")
    return seconds


@pytest.fixture(scope="session")
def tensorflow_executorch_python():
    """Interpreter of a scratch venv with the ``tensorflow`` and ``executorch`` extras; deleted after the session.

    The venv sees this interpreter's packages (torch, ultralytics, yolo-dysample, onnx) and installs only the two
    extras over them, with torch held at its installed release as ultralytics installs ExecuTorch: about 75 s (venv
    and pip, no pip cache) and 2.6 GB. ``YOLO_DYSAMPLE_TOOLCHAIN_PYTHON`` names an interpreter that has them
    already instead.
    """
    existing = os.environ.get(TOOLCHAIN_PYTHON_VARIABLE)
    if existing:
        yield existing
        return
    scratch = Path(tempfile.mkdtemp(prefix="yolo-dysample-toolchains-"))
    try:
        started = time.perf_counter()
        venv = scratch / "venv"
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
        python = venv / ("Scripts" if os.name == "nt" else "bin") / "python"
        held_torch = f"torch=={metadata.version('torch').split('+')[0]}"
        requirements = [*export_extra(SCRATCH_VENV_EXTRAS).values(), held_torch]
        command = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-input"]
        subprocess.run(command + requirements, check=True, timeout=1200)
        seconds = time.perf_counter() - started
        print(f"\ntensorflow_executorch_python: venv + pip install {requirements} in {seconds:.1f} s")
        yield str(python)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


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
        offsets = layer.float().sample_offsets(features)
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


def test_onnx_export_keeps_one_grid_sample_per_layer_and_matches_pytorch(
    dysample_checkpoint, tmp_path, automatic_sampler
):
    import onnx

    row = export_and_compare("onnx", dysample_checkpoint, tmp_path)
    nodes = onnx.load(row["exported"]).graph.node
    assert sum(node.op_type == "GridSample" for node in nodes) == 2  # two DySample layers, groups in the batch


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


def test_onnx_opset_16_is_the_lowest_with_grid_sample(dysample_checkpoint, tmp_path, automatic_sampler):
    row = export_and_compare("onnx opset=16", dysample_checkpoint, tmp_path)
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


@pytest.mark.parametrize("case_name", ["openvino", "openvino dynamic", "openvino quantize=16"])
def test_openvino_export_matches_pytorch(
    case_name, dysample_checkpoint, tmp_path, export_toolchains, automatic_sampler
):
    export_and_compare(case_name, dysample_checkpoint, tmp_path)


def test_ncnn_export_matches_pytorch(dysample_checkpoint, tmp_path, export_toolchains, automatic_sampler):
    row = export_and_compare("ncnn", dysample_checkpoint, tmp_path)
    # ncnn has no batch axis: the export hook makes each of the 4 channel groups of both layers its own GridSample
    (param,) = Path(row["exported"]).glob("*.param")
    assert [line.split()[0] for line in param.read_text().splitlines()[2:]].count("GridSample") == 8


def test_paddle_export_matches_pytorch(dysample_checkpoint, tmp_path, paddle_toolchain, automatic_sampler):
    # x2paddle has no grid_sampler: the hook picks the gather sampler and freezes the offset projection
    export_and_compare("paddle", dysample_checkpoint, tmp_path)


@pytest.mark.parametrize("case_name", ["mnn", "mnn dynamic"])
def test_mnn_export_matches_pytorch(case_name, dysample_checkpoint, tmp_path, export_toolchains, automatic_sampler):
    export_and_compare(case_name, dysample_checkpoint, tmp_path)


def export_and_compare_with(python: str, case_name: str, checkpoint: Path, directory: Path) -> dict:
    """Run one matrix case with another interpreter (``run_case_in_subprocess``); assert it passed, return its row."""
    case = export_matrix.CASES_BY_NAME[case_name]
    row = export_matrix.run_case_in_subprocess(python, case, "auto", directory, checkpoint)
    logs = "".join(log.read_text()[-3000:] for log in directory.glob("*/log.txt"))
    assert row["status"] == "pass", f"{row}\n--- log (tail)\n{logs}"
    assert row[f"{case.metric}_abs_diff"] <= case.tolerance
    return row


@pytest.mark.slow
@pytest.mark.parametrize("case_name", TENSORFLOW_CASES)
def test_tensorflow_export_matches_pytorch(
    case_name, dysample_checkpoint, tmp_path, tensorflow_executorch_python, automatic_sampler
):
    # onnx2tf has no border-padded GridSample: the hook picks the gather sampler (the .tflite files come from the same
    # onnx2tf conversion as the SavedModel and run in LiteRT)
    export_and_compare_with(tensorflow_executorch_python, case_name, dysample_checkpoint, tmp_path)


@pytest.mark.slow
def test_executorch_export_matches_pytorch(
    dysample_checkpoint, tmp_path, tensorflow_executorch_python, automatic_sampler
):
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
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
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
