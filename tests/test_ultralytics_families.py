"""Each head family with DySample trains one epoch, and exports to ONNX with the same outputs in ONNX Runtime.

Tiny everything: 8 train / 4 val images of 96 px, imgsz 64, batch 4, on the CPU. Detect and segment labels come
from the embedded shapes dataset; pose and OBB labels are derived from its polygons here.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from yolo_dysample import DySample
from yolo_dysample.twins import split_twin_name
from yolo_dysample.ultralytics_adapter import stock_model_yaml

IMAGE_SIZE = 64  # training and export size
DATASET_IMAGE_SIZE = 96  # the smallest the shapes generator draws


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """Root of a tiny shapes dataset (YOLO-seg polygon labels)."""
    from yolo_dysample.datasets import generate_shapes_dataset

    return generate_shapes_dataset(
        tmp_path_factory.mktemp("families") / "shapes", train_images=8, val_images=4, image_size=DATASET_IMAGE_SIZE
    )


def _derived_labels(shapes: Path, target: Path, line_of) -> Path:
    """A copy of ``shapes`` whose label lines are ``line_of(class, polygon points)``."""
    for split in ("train", "val"):
        (target / "images" / split).mkdir(parents=True, exist_ok=True)
        (target / "labels" / split).mkdir(parents=True, exist_ok=True)
        for image in (shapes / "images" / split).iterdir():
            (target / "images" / split / image.name).write_bytes(image.read_bytes())
        for label in (shapes / "labels" / split).glob("*.txt"):
            lines = []
            for row in label.read_text().split("\n"):
                if row.strip():
                    values = row.split()
                    points = np.array(values[1:], dtype=float).reshape(-1, 2)
                    lines.append(line_of(int(values[0]), points))
            (target / "labels" / split / label.name).write_text("\n".join(lines) + "\n")
    return target


def _pose_line(cls: int, points: np.ndarray) -> str:
    low, high = points.min(0), points.max(0)
    centre, size = (low + high) / 2, high - low
    keypoints = [points[0], centre, points[-1]]  # 3 keypoints, visible
    values = [*centre, *size] + [v for point in keypoints for v in (*point, 2)]
    return f"{cls} " + " ".join(f"{v:.6f}" for v in values)


def _obb_line(cls: int, points: np.ndarray) -> str:
    low, high = points.min(0), points.max(0)
    corners = [(low[0], low[1]), (high[0], low[1]), (high[0], high[1]), (low[0], high[1])]
    return f"{cls} " + " ".join(f"{v:.6f}" for corner in corners for v in corner)


def _data_yaml(root: Path, **extra) -> str:
    data = {"path": str(root), "train": "images/train", "val": "images/val", "names": {0: "a", 1: "b", 2: "c"}}
    data.update(extra)
    path = root.parent / f"{root.name}.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return str(path)


def _depth_maps(shapes: Path, target: Path) -> Path:
    """A copy of ``shapes`` with a depth map (metres, ``.npy``) per image: a slope plus brighter-is-nearer."""
    import cv2

    for split in ("train", "val"):
        (target / "images" / split).mkdir(parents=True, exist_ok=True)
        (target / "depth" / split).mkdir(parents=True, exist_ok=True)
        for image in (shapes / "images" / split).iterdir():
            (target / "images" / split / image.name).write_bytes(image.read_bytes())
            grey = cv2.imread(str(image), cv2.IMREAD_GRAYSCALE).astype(np.float32) / 255
            slope = np.linspace(1.0, 5.0, grey.shape[0], dtype=np.float32)[:, None]
            np.save(target / "depth" / split / f"{image.stem}.npy", slope + 2 * (1 - grey))
    return target


@pytest.fixture(scope="module")
def datasets(shapes: Path) -> dict[str, str]:
    """Data YAMLs per task."""
    pose = _derived_labels(shapes, shapes.parent / "pose", _pose_line)
    obb = _derived_labels(shapes, shapes.parent / "obb", _obb_line)
    depth = _depth_maps(shapes, shapes.parent / "depth")
    return {
        "detect": _data_yaml(shapes),
        "segment": _data_yaml(shapes),
        "semantic": _data_yaml(shapes),  # polygon labels: ultralytics rasterises them and adds a background class
        "pose": _data_yaml(pose, kpt_shape=[3, 3], flip_idx=[0, 1, 2]),
        "obb": _data_yaml(obb),
        "depth": _data_yaml(depth, nc=1, names={0: "depth"}, depth_scale=1000),
    }


def _first_available(*names: str) -> str:
    """The first twin name whose stock YAML the installed release ships (older releases ship fewer)."""
    for name in names:
        unscaled = re.sub(r"^(yolo(?:e-)?v?\d+)[nsmlx](?=-)", r"\1", name)  # as ultralytics reduces it
        if stock_model_yaml(split_twin_name(name)[0]) or stock_model_yaml(split_twin_name(unscaled)[0]):
            return name
    pytest.skip(f"ultralytics ships none of the stock YAMLs of {names}")


TRAINED = [  # (model class, twin candidates, task): one representative per head family
    ("YOLO", ("yolov8n-dysample.yaml",), "detect"),
    ("YOLO", ("yolo11n-seg-dysample-s.yaml", "yolov8n-seg-dysample-s.yaml"), "segment"),
    ("YOLO", ("yolo26n-pose-dysample-plus.yaml", "yolov8n-pose-dysample-plus.yaml"), "pose"),
    ("YOLO", ("yolo11n-obb-dysample-s-plus.yaml", "yolov8n-obb-dysample-s-plus.yaml"), "obb"),
    ("YOLO", ("yolov10n-dysample.yaml",), "detect"),  # v10's end-to-end (one-to-one) head
    ("RTDETR", ("yolov8n-rtdetr-dysample.yaml",), "detect"),  # RT-DETR's decoder on a YOLOv8 backbone
    ("YOLO", ("yolo26n-sem-dysample.yaml",), "semantic"),
    ("YOLO", ("yolo26n-depth-dysample-s.yaml",), "depth"),
]


def image_size(model_class: str) -> int:
    """RT-DETR selects 300 queries among its anchors: at 64 px there are only 84 (128 px: 336)."""
    return 2 * IMAGE_SIZE if model_class == "RTDETR" else IMAGE_SIZE


def _break_score_ties(network: torch.nn.Module) -> None:
    """Give the class scores of an untrained head distinct biases, so top-k selections have no ties to break."""
    head = network.model[-1]
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in head.modules():
            width = getattr(module, "out_channels", getattr(module, "out_features", None))
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and width == head.nc and module.bias is not None:
                module.bias.add_(torch.randn(module.bias.shape, generator=generator))


def _model(model_class: str, name: str):
    import ultralytics

    return getattr(ultralytics, model_class)(name)


@pytest.mark.slow
@pytest.mark.parametrize(("model_class", "names", "task"), TRAINED, ids=[t[1][0] for t in TRAINED])
def test_head_family_trains_one_epoch_and_its_dysample_layers_learn(
    model_class, names, task, datasets, tmp_path, monkeypatch
):
    if not hasattr(np, "trapz"):  # numpy 2 removed it; older ultralytics releases still call it in their metrics
        monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    model = _model(model_class, _first_available(*names))
    before = {k: v.clone() for k, v in model.model.state_dict().items() if ".offset." in k}
    assert before
    model.train(
        data=datasets[task], epochs=1, imgsz=image_size(model_class), batch=4, workers=0, device="cpu", plots=False,
        val=False, amp=False, project=str(tmp_path), name="run", exist_ok=True, verbose=False,
    )  # fmt: skip
    (last,) = tmp_path.glob("run/weights/last.pt")
    trained = torch.load(last, map_location="cpu", weights_only=False)
    network = trained["ema"] or trained["model"]
    state = network.state_dict()
    assert any(not torch.equal(state[k].float(), v.float()) for k, v in before.items())  # DySample was trained
    assert 2 * sum(isinstance(m, DySample) for m in network.modules()) == len(before)  # offset weight, bias


EXPORTED = [  # one model per family: torch vs ONNX Runtime on the same input
    ("YOLO", "yolov8n-dysample.yaml"),
    ("YOLO", "yolo11n-seg-dysample-s.yaml"),
    ("YOLO", "yolov10n-dysample-plus.yaml"),
    ("RTDETR", "yolov8n-rtdetr-dysample.yaml"),  # RT-DETR's decoder (rtdetr-l takes a minute to export)
    ("YOLOWorld", "yolov8s-worldv2-dysample.yaml"),  # default text embeddings: set_classes needs CLIP weights
    ("YOLOE", "yoloe-11s-seg-dysample.yaml"),  # likewise: its text and visual prompt models are downloads
]


@pytest.mark.slow
@pytest.mark.parametrize(("model_class", "name"), EXPORTED, ids=[e[1] for e in EXPORTED])
def test_family_exports_to_onnx_with_the_outputs_of_torch(model_class, name, tmp_path, monkeypatch, onnx_export_works):
    import onnxruntime

    monkeypatch.chdir(tmp_path)  # a model built from a YAML exports into the working directory, not the checkout
    model = _model(model_class, _first_available(name))
    _break_score_ties(model.model)
    imgsz = image_size(model_class)
    raw = {}
    if model_class == "YOLO" and hasattr(model.model, "end2end"):  # 8.4: compare raw predictions, before any top-k
        raw = {"end2end": False}
        model.model.end2end = False
    exported = model.export(format="onnx", imgsz=imgsz, opset=17, project=str(tmp_path), **raw)
    image = torch.rand(1, 3, imgsz, imgsz)
    network = model.model.float().eval()
    with torch.no_grad():
        expected = network(image)
    while isinstance(expected, (list, tuple)):  # the first output: boxes (and mask coefficients)
        expected = expected[0]
    session = onnxruntime.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    (actual, *_) = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    expected = expected.numpy()
    assert actual.shape == expected.shape
    tolerance = 1e-3 * float(np.abs(expected).max())
    if model_class == "RTDETR":  # its top-k of near-equal untrained query scores: torch and ORT pick a few apart
        rows, reference = actual.reshape(-1, actual.shape[-1]), expected.reshape(-1, expected.shape[-1])
        distance = np.abs(rows[:, None, :] - reference[None, :, :]).max(-1).min(-1)  # to the nearest torch query
        assert np.mean(distance <= tolerance) > 0.9
    else:
        np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=tolerance)
