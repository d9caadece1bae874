"""The embedded offline dataset (yolo_dysample.datasets, cfg/datasets/dysample-shapes.yaml)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from yolo_dysample import datasets
from yolo_dysample.datasets import (
    CLASS_NAMES,
    LARGE_OBJECT_SIZES,
    SMALL_OBJECT_SIZES,
    generate_shapes_dataset,
    render_shapes_image,
    write_dataset_yaml,
)

SMALL_COUNTS = {"train_images": 12, "val_images": 6}


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _read_labels(label_file: Path) -> list[tuple[int, np.ndarray]]:
    rows = []
    for line in label_file.read_text().splitlines():
        values = line.split()
        rows.append((int(values[0]), np.array(values[1:], dtype=np.float64).reshape(-1, 2)))
    return rows


def _polygon_area(polygon: np.ndarray) -> float:
    x, y = polygon[:, 0], polygon[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y)))


def _polygon_centroid(polygon: np.ndarray) -> np.ndarray:
    x, y = polygon[:, 0], polygon[:, 1]
    cross = x * np.roll(y, -1) - np.roll(x, -1) * y
    return np.array([((x + np.roll(x, -1)) * cross).sum(), ((y + np.roll(y, -1)) * cross).sum()]) / (3 * cross.sum())


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> Path:
    return generate_shapes_dataset(tmp_path_factory.mktemp("shapes") / "dysample-shapes", **SMALL_COUNTS)


def test_generation_gives_the_same_bytes_twice(small_dataset, tmp_path):
    again = generate_shapes_dataset(tmp_path / "again", **SMALL_COUNTS)
    first, second = _files(small_dataset), _files(again)
    assert len(first) == 2 * (12 + 6) + 1  # image + label per sample, one manifest
    assert first == second


def test_a_different_seed_gives_different_images(small_dataset, tmp_path):
    other = generate_shapes_dataset(tmp_path / "other", seed=1, **SMALL_COUNTS)
    first, second = _files(small_dataset), _files(other)
    assert first.keys() == second.keys()
    changed = [name for name in first if name.endswith(".png") and first[name] != second[name]]
    assert len(changed) == 12 + 6


def test_images_do_not_depend_on_how_many_are_generated(small_dataset, tmp_path):
    fewer = generate_shapes_dataset(tmp_path / "fewer", train_images=5, val_images=2)
    for name, content in _files(fewer).items():
        if not name.endswith(".json"):
            assert content == (small_dataset / name).read_bytes(), name


def test_layout_is_what_ultralytics_expects(small_dataset):
    for split, count in (("train", 12), ("val", 6)):
        images = sorted((small_dataset / "images" / split).glob("*.png"))
        labels = sorted((small_dataset / "labels" / split).glob("*.txt"))
        assert len(images) == count
        assert [p.stem for p in images] == [p.stem for p in labels]
        image = cv2.imread(str(images[0]))
        assert image.shape == (256, 256, 3)


def test_labels_are_valid_polygons_with_classes_in_range(small_dataset):
    label_files = sorted((small_dataset / "labels").rglob("*.txt"))
    rows = [row for label_file in label_files for row in _read_labels(label_file)]
    assert len(rows) >= 3 * len(label_files)  # every image has objects (3..10 small ones alone)
    for class_index, polygon in rows:
        assert 0 <= class_index < len(CLASS_NAMES)
        assert len(polygon) >= 3
        assert polygon.min() >= 0.0 and polygon.max() <= 1.0
        assert _polygon_area(polygon) > 0
    assert {class_index for class_index, _ in rows} == set(range(len(CLASS_NAMES)))


def test_most_objects_are_small_and_some_are_large(small_dataset):
    box_sides = []
    for label_file in sorted((small_dataset / "labels").rglob("*.txt")):
        for _, polygon in _read_labels(label_file):
            box_sides.append(np.ptp(polygon * 256, axis=0).max())  # longer box side in pixels
    box_sides = np.array(box_sides)
    small = (box_sides >= SMALL_OBJECT_SIZES[0] - 0.01) & (box_sides <= SMALL_OBJECT_SIZES[1] + 0.01)
    large = (box_sides >= LARGE_OBJECT_SIZES[0] - 0.01) & (box_sides <= LARGE_OBJECT_SIZES[1] + 0.01)
    assert (small | large).all()
    assert small.mean() >= 0.7
    assert (box_sides <= 6).sum() >= 10  # really tiny ones, where upsampling matters most
    assert large.sum() >= 3


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), image_size=st.sampled_from([96, 128, 160, 256, 320]))
def test_objects_lie_inside_the_image_and_do_not_touch(seed, image_size):
    image, objects = render_shapes_image(np.random.default_rng(seed), image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    boxes = []
    for class_index, polygon in objects:
        assert 0 <= class_index < len(CLASS_NAMES)
        assert polygon.min() >= 0 and polygon.max() <= image_size
        boxes.append(np.concatenate((polygon.min(0), polygon.max(0))))
    for first in range(len(boxes)):
        for second in range(first + 1, len(boxes)):
            a, b = boxes[first], boxes[second]
            separated = a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1]
            assert separated, (a, b)


@pytest.mark.parametrize("seed", [0, 7, 12345])
def test_drawn_pixels_are_where_the_polygons_say(seed):
    # The background is the first thing drawn from the stream, so a copy of the stream redraws it alone.
    background = datasets._textured_background(np.random.default_rng(seed), 256, 256)
    image, objects = render_shapes_image(np.random.default_rng(seed), 256)
    change = np.abs(datasets._luminance(image.astype(np.float32)) - datasets._luminance(background))

    inside_boxes = np.zeros((256, 256), dtype=bool)
    for _, polygon in objects:
        left, top = np.floor(polygon.min(0)).astype(int)
        right, bottom = np.ceil(polygon.max(0)).astype(int)
        inside_boxes[top:bottom, left:right] = True
        # every object stands out: its most covered pixel differs by most of the contrast floor
        assert change[top:bottom, left:right].max() >= 0.5 * datasets.MIN_LUMINANCE_CONTRAST
        # and is where its polygon is: the luminance change is centred on the polygon's centroid (up to the
        # background's own variation under large objects)
        weights = np.maximum(change[top:bottom, left:right] - 20, 0)  # above the noise
        rows, columns = np.mgrid[top:bottom, left:right] + 0.5
        centre = np.array([(weights * columns).sum(), (weights * rows).sum()]) / weights.sum()
        tolerance = 0.5 + 0.05 * np.ptp(polygon, axis=0).max()
        assert np.abs(centre - _polygon_centroid(polygon)).max() < tolerance
    # outside the labelled boxes only sensor noise (std <= 9 per channel, about 6 in luminance) changed pixels
    assert change[~inside_boxes].max() < 40


def test_ultralytics_derives_boxes_from_the_polygons(small_dataset):
    from ultralytics.data.utils import verify_image_label

    image_file = small_dataset / "images" / "train" / "train_0000.png"
    label_file = small_dataset / "labels" / "train" / "train_0000.txt"
    rows = _read_labels(label_file)
    args = (str(image_file), str(label_file), "", False, len(CLASS_NAMES), 0, 0, False)
    _, boxes, shape, segments, _, missing, found, empty, corrupt, message = verify_image_label(args)
    assert (missing, found, empty, corrupt) == (0, 1, 0, 0), message
    assert tuple(shape) == (256, 256)
    assert len(boxes) == len(segments) == len(rows)
    for (class_index, polygon), box, segment in zip(rows, boxes, segments, strict=True):
        low, high = polygon.min(0), polygon.max(0)
        expected = [class_index, *((low + high) / 2), *(high - low)]  # class, x centre, y centre, width, height
        np.testing.assert_allclose(box, expected, atol=1e-5)
        np.testing.assert_allclose(segment, polygon, atol=1e-6)


def test_ultralytics_builds_segmentation_masks_from_the_same_labels(tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset

    root = generate_shapes_dataset(tmp_path / "shapes", train_images=1, val_images=3)
    cfg = get_cfg(overrides={"task": "segment", "imgsz": 256, "mask_ratio": 1, "overlap_mask": False})
    data = {"names": dict(enumerate(CLASS_NAMES)), "nc": len(CLASS_NAMES), "channels": 3}
    dataset = build_yolo_dataset(cfg, str(root / "images" / "val"), batch=1, data=data, mode="val")
    for index in range(3):
        sample = dataset[index]
        rows = _read_labels(root / "labels" / "val" / f"val_{index:04d}.txt")
        assert sample["masks"].shape == (len(rows), 256, 256)  # one full-resolution mask per polygon
        for (class_index, polygon), mask, sample_class in zip(
            rows, sample["masks"].numpy(), sample["cls"], strict=True
        ):
            assert int(sample_class) == class_index
            polygon = polygon * 256
            area = _polygon_area(polygon)
            perimeter = np.linalg.norm(polygon - np.roll(polygon, 1, axis=0), axis=1).sum()
            assert 0.9 * area <= mask.sum() <= area + perimeter + 4  # the rasterised outline, boundary pixels in
            rows_in_mask, columns_in_mask = np.nonzero(mask)
            left, top = np.floor(polygon.min(0)) - 1
            right, bottom = np.ceil(polygon.max(0)) + 1
            assert left <= columns_in_mask.min() and columns_in_mask.max() < right
            assert top <= rows_in_mask.min() and rows_in_mask.max() < bottom


def test_generating_again_reuses_a_finished_dataset(small_dataset):
    manifest = small_dataset / datasets.MANIFEST_NAME
    before = manifest.stat().st_mtime_ns
    assert generate_shapes_dataset(small_dataset, **SMALL_COUNTS) == small_dataset
    assert manifest.stat().st_mtime_ns == before


def test_generation_refuses_to_write_into_a_foreign_directory(small_dataset, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not an"):
        generate_shapes_dataset(tmp_path / "mine", **SMALL_COUNTS)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(FileExistsError, match="other arguments"):
        generate_shapes_dataset(small_dataset, seed=3, **SMALL_COUNTS)
    assert not list(tmp_path.glob(".mine-*"))  # no staging directory left behind


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"train_images": 0}, "train_images=0"),
        ({"val_images": 2.5}, "val_images=2.5"),
        ({"image_size": 64}, "image_size=64"),
        ({"test_images": -1}, "test_images=-1"),
        ({"seed": True}, "seed=True"),
    ],
)
def test_bad_arguments_are_rejected_by_name(tmp_path, arguments, message):
    with pytest.raises(ValueError, match=message):
        generate_shapes_dataset(tmp_path / "shapes", **arguments)
    assert not (tmp_path / "shapes").exists()


def test_written_yaml_loads_in_ultralytics(small_dataset, tmp_path):
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(str(write_dataset_yaml(tmp_path / "shapes.yaml", small_dataset)))
    assert data["nc"] == len(CLASS_NAMES)
    assert data["names"] == dict(enumerate(CLASS_NAMES))
    assert Path(data["train"]) == small_dataset / "images" / "train"


def test_bundled_yaml_generates_the_dataset_on_first_use_by_bare_name(tmp_path, monkeypatch):
    import ultralytics.data.utils as data_utils

    import yolo_dysample

    yolo_dysample.register_with_ultralytics()  # bare-name lookup of bundled YAMLs
    monkeypatch.setattr(data_utils, "DATASETS_DIR", tmp_path / "datasets")  # the ultralytics datasets_dir setting
    started = time.perf_counter()
    data = data_utils.check_det_dataset("dysample-shapes.yaml")
    seconds = time.perf_counter() - started
    size_mb = sum(path.stat().st_size for path in (tmp_path / "datasets").rglob("*") if path.is_file()) / 1e6
    print(f"\ndysample-shapes: first use generated 640 images ({size_mb:.0f} MB) in {seconds:.1f} s")
    root = tmp_path / "datasets" / "dysample-shapes"
    assert Path(data["path"]) == root
    assert len(list((root / "images" / "train").glob("*.png"))) == 192
    assert len(list((root / "images" / "val").glob("*.png"))) == 48
    assert len(list((root / "images" / "test").glob("*.png"))) == 400  # the held-out split
    assert Path(data["test"]) == root / "images" / "test"
    assert data["names"] == dict(enumerate(CLASS_NAMES))
    # the bundled YAML generates the same bytes as a direct call with the defaults
    assert (root / "images" / "val" / "val_0000.png").read_bytes() == cv2.imencode(
        ".png",
        render_shapes_image(np.random.default_rng((0, 1, 0)), 256)[0][..., ::-1],
        [cv2.IMWRITE_PNG_COMPRESSION, datasets.PNG_COMPRESSION],
    )[1].tobytes()


def test_the_test_split_has_its_own_streams_and_the_same_bytes_twice(small_dataset, tmp_path):
    first = generate_shapes_dataset(tmp_path / "first", test_images=4, **SMALL_COUNTS)
    second = generate_shapes_dataset(tmp_path / "second", test_images=4, **SMALL_COUNTS)
    assert _files(first) == _files(second)
    tests = sorted((first / "images" / "test").glob("*.png"))
    assert [path.name for path in tests] == [f"test_{index:04d}.png" for index in range(4)]
    assert len(list((first / "labels" / "test").glob("*.txt"))) == 4
    held_out = {path.read_bytes() for path in tests}
    seen = {path.read_bytes() for split in ("train", "val") for path in (small_dataset / "images" / split).iterdir()}
    assert not held_out & seen  # no test image is a train or val image
    for name, content in _files(small_dataset).items():  # adding a test split changes no other image
        if name.endswith((".png", ".txt")):
            assert (first / name).read_bytes() == content, name


def test_a_test_split_is_added_to_a_dataset_generated_without_one(tmp_path):
    root = generate_shapes_dataset(tmp_path / "shapes", train_images=3, val_images=2)
    manifest_file = root / datasets.MANIFEST_NAME
    manifest = json.loads(manifest_file.read_text())
    del manifest["test_images"]  # as written before the test split existed
    manifest_file.write_text(json.dumps(manifest))
    before = {name: content for name, content in _files(root).items() if not name.endswith(".json")}
    assert generate_shapes_dataset(root, train_images=3, val_images=2, test_images=2) == root
    after = _files(root)
    assert all(after[name] == content for name, content in before.items())
    assert len(list((root / "images" / "test").glob("*.png"))) == 2
    assert json.loads(manifest_file.read_text())["test_images"] == 2
    assert not list(root.glob(".test-split-*"))
    with pytest.raises(FileExistsError, match="other arguments"):  # a different test split is not swapped in
        generate_shapes_dataset(root, train_images=3, val_images=2, test_images=5)


def test_written_yaml_names_the_test_split_when_there_is_one(tmp_path):
    from ultralytics.data.utils import check_det_dataset

    with_test = generate_shapes_dataset(tmp_path / "with", train_images=1, val_images=1, test_images=1)
    without = generate_shapes_dataset(tmp_path / "without", train_images=1, val_images=1)
    data = check_det_dataset(str(write_dataset_yaml(tmp_path / "with.yaml", with_test)))
    assert Path(data["test"]) == with_test / "images" / "test"
    assert "test:" not in write_dataset_yaml(tmp_path / "without.yaml", without).read_text()
