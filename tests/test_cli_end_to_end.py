"""End to end: the stock ``yolo`` command and the ``YOLO`` Python API on DySample models, offline.

Each ``yolo`` call is a subprocess run from a temporary directory, with nothing imported by hand: the installed
package's autoload hook is what makes ``model=yolov8n-dysample.yaml`` work. The expensive pieces (a tiny dataset, a
checkpoint trained for one epoch by ``yolo train``) are session fixtures in ``conftest.py``, which gives those commands
an isolated, offline ultralytics configuration. ``test_everyday_commands_with_ultralytics_default_settings`` runs the
commands as a new user does instead: a fresh home folder with ultralytics' default settings (relative ``runs_dir``),
none of the test session's environment variables.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.slow

IMAGE_SIZE = 128  # the tiny dataset's image size; every command below uses it


def _dysample_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from yolo_dysample import DySample

    return [module for module in model.modules() if isinstance(module, DySample)]


def _asset_as_input(name: str) -> np.ndarray:
    """A real image shipped with ultralytics, resized to (1, 3, IMAGE_SIZE, IMAGE_SIZE) float32 RGB in [0, 1]."""
    import cv2
    from ultralytics.utils import ASSETS

    image = cv2.imread(str(ASSETS / name))[..., ::-1]  # BGR -> RGB
    image = cv2.resize(image, (IMAGE_SIZE, IMAGE_SIZE), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image.transpose(2, 0, 1)[None], dtype=np.float32) / 255.0


def test_yolo_train_writes_a_checkpoint_with_dysample_layers(trained_checkpoint):
    from ultralytics import YOLO

    model = YOLO(str(trained_checkpoint))
    layers = _dysample_layers(model.model)
    assert len(layers) == 2  # both nn.Upsample rows of yolov8n are DySample
    assert [layer.in_channels for layer in layers] == [256, 128]  # yolov8n widths, inferred by the parser
    assert model.names == {0: "circle", 1: "triangle", 2: "square"}
    with open(trained_checkpoint.parent.parent / "results.csv") as file:
        rows = list(csv.DictReader(file))
    assert len(rows) == 1  # one epoch
    assert all(float(rows[0][key]) > 0 for key in rows[0] if "loss" in key)  # losses were computed


def test_yolo_val_reports_metrics(run_yolo, trained_checkpoint, tiny_shapes_dataset, tmp_path):
    result = run_yolo(
        "val",
        f"model={trained_checkpoint}",
        f"data={tiny_shapes_dataset}",
        f"imgsz={IMAGE_SIZE}",
        "batch=8",
        "workers=0",
        "plots=False",
        "save_json=False",
        f"project={tmp_path / 'runs'}",
        "name=val",
        cwd=tmp_path,
    )
    summary = [line.split() for line in result.stdout.splitlines() + result.stderr.splitlines()]
    all_row = next(row for row in summary if row[:1] == ["all"])
    images, instances = int(all_row[1]), int(all_row[2])
    assert images == 8  # the tiny val split
    assert instances >= 3 * 8  # at least 3 small objects per image
    assert all(0.0 <= float(value) <= 1.0 for value in all_row[3:7])  # P, R, mAP50, mAP50-95


def test_yolo_predict_on_the_images_ultralytics_ships(run_yolo, trained_checkpoint, tmp_path):
    from ultralytics.utils import ASSETS

    run_yolo(
        "predict",
        f"model={trained_checkpoint}",
        f"source={ASSETS}",
        f"imgsz={IMAGE_SIZE}",
        "conf=0.001",
        "save=True",
        "save_txt=True",
        f"project={tmp_path / 'runs'}",
        "name=predict",
        cwd=tmp_path,
    )
    saved = sorted(path.name for path in (tmp_path / "runs" / "predict").glob("*.jpg"))
    assert saved == ["bus.jpg", "zidane.jpg"]


def _make_dysample_matter(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Turn a barely trained model into one whose outputs depend on where DySample samples.

    After one epoch from scratch, features shrink layer by layer (the BatchNorm statistics still are their
    initial ones), so DySample's input is ~0.01 and its offsets ~0.001 px: any upsampler would give the same
    outputs and a broken export would go unnoticed. Re-estimating the BatchNorm statistics on real images brings
    the features to unit scale, as in a trained model; offset weights drawn for that scale move the sampling
    points by about half a pixel (and the bias adds a fixed shift of the same size).
    """
    norms = [module for module in model.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the calibration batch
    model.train()
    with torch.no_grad():
        model(images)
    for norm in norms:
        norm.momentum = 0.03
    model.eval()

    inputs = {}
    layers = _dysample_layers(model)
    hooks = [layer.register_forward_hook(lambda module, args, _: inputs.update({module: args[0]})) for layer in layers]
    with torch.no_grad():
        model(images)
    for hook in hooks:
        hook.remove()
    generator = torch.Generator().manual_seed(0)
    for layer in layers:
        feature_scale = inputs[layer].pow(2).mean().sqrt() * layer.in_channels**0.5  # rms of (w . x) per unit w
        target = 0.5 / layer.offset_scale  # offsets O = offset_scale * (W x + b) of about 0.5 px
        weight, bias = layer.offset.weight, layer.offset.bias
        weight.data = torch.randn(weight.shape, generator=generator) * (target / feature_scale)
        bias.data = torch.randn(bias.shape, generator=generator) * target


@pytest.fixture(scope="module")
def exported_onnx(run_yolo, trained_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    """``yolo export format=onnx`` of a copy of the trained checkpoint in which DySample's offsets matter."""
    work = tmp_path_factory.mktemp("onnx-export")
    checkpoint = torch.load(trained_checkpoint, map_location="cpu", weights_only=False)
    model = (checkpoint.get("ema") or checkpoint["model"]).float()
    images = torch.from_numpy(np.concatenate([_asset_as_input(name) for name in ("bus.jpg", "zidane.jpg")]))
    _make_dysample_matter(model, images)
    checkpoint.update(model=model, ema=None)
    strong_offsets = work / "strong-offsets.pt"
    torch.save(checkpoint, strong_offsets)
    run_yolo("export", f"model={strong_offsets}", "format=onnx", f"imgsz={IMAGE_SIZE}", cwd=work)
    onnx_file = strong_offsets.with_suffix(".onnx")
    assert onnx_file.is_file()
    return strong_offsets, onnx_file


def _onnx_and_pytorch_outputs(checkpoint: Path, onnx_file: Path, asset: str, zero_offsets: bool = False):
    import onnxruntime
    from ultralytics import YOLO

    pytorch_model = YOLO(str(checkpoint)).model.float().eval()
    if zero_offsets:
        for layer in _dysample_layers(pytorch_model):
            torch.nn.init.zeros_(layer.offset.weight)
            torch.nn.init.zeros_(layer.offset.bias)
    session = onnxruntime.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    image = _asset_as_input(asset)
    (onnx_output,) = session.run(None, {session.get_inputs()[0].name: image})
    with torch.no_grad():
        pytorch_output = pytorch_model(torch.from_numpy(image))[0].numpy()
    return onnx_output, pytorch_output


def test_yolo_export_onnx_matches_pytorch(exported_onnx):
    import onnx
    from ultralytics import YOLO

    checkpoint, onnx_file = exported_onnx
    graph = onnx.load(str(onnx_file)).graph
    # ONNX's default sampler: standard gathers from difference tables, no GridSample (slow in ONNX Runtime); one
    # Floor per axis and DySample layer, all channel groups in one batch.
    groups = [layer.groups for layer in _dysample_layers(YOLO(str(checkpoint)).model)]
    assert len(groups) == 2 and min(groups) > 1
    assert not any(node.op_type == "GridSample" for node in graph.node)
    assert sum(node.op_type == "Floor" for node in graph.node) == 2 * len(groups)
    for asset in ("bus.jpg", "zidane.jpg"):
        onnx_output, pytorch_output = _onnx_and_pytorch_outputs(checkpoint, onnx_file, asset)
        anchors = sum((IMAGE_SIZE // stride) ** 2 for stride in (8, 16, 32))
        assert onnx_output.shape == pytorch_output.shape == (1, 4 + 3, anchors)  # xywh + 3 class scores
        np.testing.assert_allclose(onnx_output[:, :4], pytorch_output[:, :4], rtol=1e-4, atol=1e-3)  # pixels
        np.testing.assert_allclose(onnx_output[:, 4:], pytorch_output[:, 4:], rtol=1e-4, atol=1e-5)  # scores


def test_the_onnx_comparison_notices_where_dysample_samples(exported_onnx):
    """The comparison above can fail: the same model sampling at the bilinear points misses its tolerance."""
    checkpoint, onnx_file = exported_onnx
    onnx_output, bilinear_output = _onnx_and_pytorch_outputs(checkpoint, onnx_file, "bus.jpg", zero_offsets=True)
    assert np.abs(onnx_output[:, :4] - bilinear_output[:, :4]).max() > 100 * 1e-3
    assert np.abs(onnx_output[:, 4:] - bilinear_output[:, 4:]).max() > 100 * 1e-5


def test_yolo_predict_runs_the_onnx_file(run_yolo, exported_onnx, tmp_path):
    from ultralytics.utils import ASSETS

    _, onnx_file = exported_onnx
    run_yolo(
        "predict",
        f"model={onnx_file}",
        f"source={ASSETS / 'bus.jpg'}",
        f"imgsz={IMAGE_SIZE}",
        "save=True",
        f"project={tmp_path / 'runs'}",
        "name=predict-onnx",
        cwd=tmp_path,
    )
    assert (tmp_path / "runs" / "predict-onnx" / "bus.jpg").is_file()


def test_python_api_trains_validates_and_predicts(tiny_shapes_dataset, tmp_path, monkeypatch):
    from ultralytics import YOLO
    from ultralytics.utils import ASSETS

    monkeypatch.chdir(tmp_path)
    model = YOLO("yolov8n-dysample.yaml")
    assert len(_dysample_layers(model.model)) == 2
    model.train(
        data=str(tiny_shapes_dataset),
        epochs=1,
        imgsz=IMAGE_SIZE,
        batch=8,
        workers=0,
        device="cpu",
        plots=False,
        project=str(tmp_path / "runs"),
        name="api",
    )
    best = tmp_path / "runs" / "api" / "weights" / "best.pt"
    assert best.is_file()

    metrics = model.val(data=str(tiny_shapes_dataset), imgsz=IMAGE_SIZE, batch=8, workers=0, plots=False)
    assert 0.0 <= metrics.box.map50 <= 1.0
    assert len(metrics.box.ap_class_index) >= 1  # classes with ground truth were scored

    results = model.predict(str(ASSETS / "bus.jpg"), imgsz=IMAGE_SIZE, conf=0.001, verbose=False)
    assert len(results) == 1
    assert results[0].orig_shape == (1080, 810)
    assert results[0].boxes.data.shape[1] == 6  # x1, y1, x2, y2, confidence, class
    assert len(_dysample_layers(YOLO(str(best)).model)) == 2


def user_environment(home: Path) -> dict[str, str]:
    """The test process's environment as a new user's shell would have it: a fresh ``HOME``, none of the variables
    the test session sets (``YOLO_CONFIG_DIR`` with its prepared settings, ``YOLO_OFFLINE``, ``YOLO_AUTOINSTALL``,
    ``YOLO_DYSAMPLE_*``, ``OMP_NUM_THREADS``), no ``PYTHONPATH``, and none of the variables by which ultralytics
    detects a test run (``PYTEST_CURRENT_TEST``, GitHub Actions': it then writes runs inside its own package)."""
    dropped = ("YOLO_", "ULTRALYTICS_", "XDG_", "PYTHONPATH", "PYTEST_", "OMP_NUM_THREADS", "GITHUB_", "RUNNER_")
    environment = {key: value for key, value in os.environ.items() if not key.startswith(dropped)}
    home.mkdir(parents=True, exist_ok=True)
    environment["HOME"] = str(home)
    return environment


def test_everyday_commands_with_ultralytics_default_settings(installed_yolo_dysample, tmp_path):
    """train -> val -> export onnx -> predict with the onnx file, from an empty folder, as a user types them."""
    from ultralytics.utils import ASSETS

    script = shutil.which("yolo", path=str(Path(sys.executable).parent))  # the `yolo` of this environment
    yolo = [script] if script else [sys.executable, "-c", "from ultralytics.cfg import entrypoint; entrypoint()"]
    work = tmp_path / "work"
    work.mkdir()
    environment = user_environment(tmp_path / "home")

    def run(*arguments: str) -> str:
        finished = subprocess.run(
            [*yolo, *arguments], cwd=work, env=environment, capture_output=True, text=True, timeout=1200
        )
        output = finished.stdout + finished.stderr
        assert finished.returncode == 0, f"yolo {' '.join(arguments)} exited {finished.returncode}\n{output[-4000:]}"
        return output

    run("train", "model=yolov8n-dysample.yaml", "data=dysample-shapes.yaml", "epochs=1", "imgsz=64")
    train = work / "runs" / "detect" / "train"  # ultralytics' default runs_dir is relative to the working directory
    best = train / "weights" / "best.pt"
    assert best.is_file() and (train / "results.csv").is_file()
    with open(train / "results.csv") as file:
        assert len(list(csv.DictReader(file))) == 1
    assert (tmp_path / "home" / ".config" / "Ultralytics" / "settings.json").is_file()  # a fresh settings file

    output = run("val", "model=runs/detect/train/weights/best.pt", "data=dysample-shapes.yaml", "imgsz=64")
    assert any(line.split()[:2] == ["all", "48"] for line in output.splitlines()), output[-2000:]  # 48 val images
    assert (work / "runs" / "detect" / "val").is_dir()

    run("export", "model=runs/detect/train/weights/best.pt", "format=onnx", "imgsz=64")
    assert (train / "weights" / "best.onnx").is_file()

    # save=True is the `yolo predict` default; spelt out for the `python -c` stand-in of environments without `yolo`
    run("predict", "model=runs/detect/train/weights/best.onnx", f"source={ASSETS / 'bus.jpg'}", "imgsz=64", "save=True")
    runs = sorted(str(path.relative_to(work)) for path in (work / "runs").rglob("*") if path.is_dir())
    assert (work / "runs" / "detect" / "predict" / "bus.jpg").is_file(), runs
    assert sorted(path.name for path in work.iterdir()) == ["datasets", "runs"]  # everything below the folder
    assert (work / "datasets" / "dysample-shapes").is_dir()  # the default datasets_dir: beside the runs
