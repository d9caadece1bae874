"""The embedded offline dataset: small shapes on textured backgrounds, generated on first use.

DySample pays off where upsampling matters: objects a few pixels wide, whose evidence survives
only in the fine feature maps the neck upsamples into. ``dysample-shapes`` is a tiny detection /
segmentation dataset of exactly that: circles, triangles and squares, most of them 3-12 px across
on a 256 px image, plus a few large ones, drawn anti-aliased on multi-scale noise. Nothing is
downloaded: the bundled ``cfg/datasets/dysample-shapes.yaml`` names this module in its
``download:`` field, which ``ultralytics.data.utils.check_det_dataset`` runs as Python (with the
parsed YAML in scope as ``yaml``) when the images are missing, so
``yolo train data=dysample-shapes.yaml`` generates the dataset under the ultralytics
``datasets_dir`` setting the first time, in a few seconds (about 3 s of CPU time per 240 images).

Labels are YOLO-seg polygons (``class x1 y1 x2 y2 ...``, normalised to [0, 1]); the rendered
shape *is* that polygon, so the polygon is the exact outline. Ultralytics derives detection boxes
from polygons (``segments2boxes`` in ``verify_image_label``), so the same files train ``detect``
and ``segment`` models.

Generation is deterministic: every image has its own random stream seeded by
``(seed, split, index)``, so the same arguments give the same bytes, and changing the number of
images does not change the images they have in common. The three splits draw from disjoint streams
(split codes 0, 1, 2), so the held-out ``test`` split shares no image with ``train`` or ``val``;
the bundled YAML asks for 400 test images, evaluated once at the end of a run, while the 48
validation images keep the per-epoch validation cheap.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from yolo_dysample.validation import as_whole_number

__all__ = [
    "CLASS_NAMES",
    "DATASET_NAME",
    "LARGE_OBJECT_SIZES",
    "SMALL_OBJECT_SIZES",
    "generate_from_dataset_yaml",
    "generate_shapes_dataset",
    "render_shapes_image",
    "write_dataset_yaml",
]

DATASET_NAME = "dysample-shapes"
CLASS_NAMES = ("circle", "triangle", "square")
GENERATOR_VERSION = 1  # bump when the images change for the same arguments (a test split added none)
MANIFEST_NAME = "dysample-shapes.json"  # written last: its presence means "generation finished"

SMALL_OBJECT_SIZES = (3.0, 12.0)  # px, the longer side of the object's box
LARGE_OBJECT_SIZES = (18.0, 48.0)  # px, a few per image so the coarse levels have work too
SMALL_OBJECTS_PER_IMAGE = (3, 10)  # inclusive range
LARGE_OBJECTS_PER_IMAGE = (0, 2)  # inclusive range
CIRCLE_VERTICES = 16  # a "circle" is this regular polygon (drawn and labelled alike): within 0.12 px of round at 12 px
OBJECT_GAP = 2.0  # px of background kept between any two objects' boxes
MIN_LUMINANCE_CONTRAST = 50.0  # |object - local background| in 0..255 luminance units
SENSOR_NOISE_STD = (3.0, 9.0)  # px-wise Gaussian noise added after drawing, 0..255 units
SUPERSAMPLING = 8  # anti-aliasing: polygons are filled on a grid this many times finer, then averaged
SUBPIXEL_BITS = 4  # cv2.fillPoly fixed-point fraction bits on that grid: vertices placed to 1/128 px
PNG_COMPRESSION = 1  # lossless, so a 3 px object keeps its edges; fastest zlib level (noise hardly compresses)
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}  # part of each image's seed: disjoint streams per split


def _unit_polygon(class_index: int) -> np.ndarray:
    """Vertices (K, 2) of the class's shape, centred on the origin, circumscribed radius 1."""
    if CLASS_NAMES[class_index] == "circle":
        vertex_count = CIRCLE_VERTICES
    elif CLASS_NAMES[class_index] == "triangle":
        vertex_count = 3
    else:
        vertex_count = 4
    angles = 2 * np.pi * np.arange(vertex_count) / vertex_count + np.pi / 2  # first vertex points up
    return np.stack((np.cos(angles), -np.sin(angles)), axis=1)


def _shape_polygon(rng: np.random.Generator, class_index: int, size: float) -> np.ndarray:
    """A randomly rotated shape whose box has ``size`` px as its longer side, centred on the origin."""
    polygon = _unit_polygon(class_index)
    if CLASS_NAMES[class_index] == "square":
        angle = np.pi / 4 + rng.uniform(-np.pi / 9, np.pi / 9)  # axis-aligned square +- 20 degrees
    else:
        angle = rng.uniform(0, 2 * np.pi)
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    polygon = polygon @ rotation.T
    polygon -= (polygon.min(0) + polygon.max(0)) / 2  # centre the box, not the centroid
    return polygon * (size / np.ptp(polygon, axis=0).max())


def _textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 (H, W, 3) image in 0..255: smooth colour gradients plus mid-frequency texture."""
    base_colour = rng.uniform(40, 215, size=3)
    background = np.full((height, width, 3), base_colour, dtype=np.float32)
    for cells, amplitude in ((3, 60.0), (12, 25.0), (40, 12.0)):  # coarse to fine octaves
        octave = rng.normal(0.0, amplitude, size=(cells, cells, 3)).astype(np.float32)
        background += cv2.resize(octave, (width, height), interpolation=cv2.INTER_CUBIC)
    return np.clip(background, 0, 255)


def _luminance(colour: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of RGB values in 0..255 (last axis)."""
    return colour @ np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _contrasting_colour(rng: np.random.Generator, background_colour: np.ndarray) -> np.ndarray:
    """A random RGB colour whose luminance differs from ``background_colour``'s by >= the contrast floor."""
    background_luminance = float(_luminance(background_colour))
    room_above, room_below = 255.0 - background_luminance, background_luminance
    brighter = room_above >= MIN_LUMINANCE_CONTRAST and (
        room_below < MIN_LUMINANCE_CONTRAST or rng.random() < room_above / (room_above + room_below)
    )
    if brighter:
        target = rng.uniform(background_luminance + MIN_LUMINANCE_CONTRAST, 255.0)
    else:
        target = rng.uniform(0.0, background_luminance - MIN_LUMINANCE_CONTRAST)
    tint = rng.normal(0.0, 45.0, size=3).astype(np.float32)
    tint -= _luminance(tint)  # chroma only: keeps the luminance at the target
    colour = np.clip(target + tint, 0, 255)
    colour += target - _luminance(colour)  # undo what clipping moved, then clip again gently
    return np.clip(colour, 0, 255).astype(np.float32)


def _draw_polygon(image: np.ndarray, polygon: np.ndarray, colour: np.ndarray) -> None:
    """Alpha-blend a filled ``polygon`` (pixel coordinates, float) into ``image`` in place, anti-aliased.

    Coverage is the exact-area kind: the polygon is filled on a grid ``SUPERSAMPLING`` times finer
    and averaged back, so a pixel half inside the polygon gets alpha 0.5 and the drawn shape has
    the polygon's area and centre (cv2's ``LINE_AA`` fill grows shapes by about half a pixel).
    """
    height, width = image.shape[:2]
    left, top = np.floor(polygon.min(0)).astype(int)
    right, bottom = np.ceil(polygon.max(0)).astype(int)
    left, top, right, bottom = max(left, 0), max(top, 0), min(right, width), min(bottom, height)
    fine = np.zeros(((bottom - top) * SUPERSAMPLING, (right - left) * SUPERSAMPLING), dtype=np.uint8)
    # fine pixel j spans [j, j + 1) and cv2 fills it when its centre j + 0.5 is inside: shift by -0.5
    fine_polygon = (polygon - (left, top)) * SUPERSAMPLING - 0.5
    fixed_point = np.round(fine_polygon * (1 << SUBPIXEL_BITS)).astype(np.int32)
    cv2.fillPoly(fine, [fixed_point], 255, lineType=cv2.LINE_8, shift=SUBPIXEL_BITS)
    coverage = cv2.resize(fine, (right - left, bottom - top), interpolation=cv2.INTER_AREA)
    alpha = coverage[..., None].astype(np.float32) / 255.0
    patch = image[top:bottom, left:right]
    patch *= 1.0 - alpha
    patch += alpha * colour


def _boxes_overlap(box: np.ndarray, boxes: list[np.ndarray]) -> bool:
    """Whether ``box`` (x1, y1, x2, y2) comes within OBJECT_GAP px of any of ``boxes``."""
    return any(
        box[0] < other[2] + OBJECT_GAP
        and other[0] < box[2] + OBJECT_GAP
        and box[1] < other[3] + OBJECT_GAP
        and other[1] < box[3] + OBJECT_GAP
        for other in boxes
    )


def render_shapes_image(rng: np.random.Generator, image_size: int = 256) -> tuple[np.ndarray, list]:
    """Draw one image of small and large shapes on a textured background.

    Args:
        rng (np.random.Generator): The random stream; the image is a pure function of its state.
        image_size (int): Height and width in pixels.

    Returns:
        (tuple): ``image`` as uint8 (H, W, 3) **RGB**, and ``objects``: a list of
            ``(class_index, polygon)`` with ``polygon`` a float (K, 2) array of pixel coordinates
            (x right, y down, image edges at 0 and ``image_size``).

    Examples:
        >>> import numpy as np
        >>> image, objects = render_shapes_image(np.random.default_rng(0), image_size=160)
        >>> image.shape, image.dtype
        ((160, 160, 3), dtype('uint8'))
    """
    image = _textured_background(rng, image_size, image_size)
    large_count = rng.integers(LARGE_OBJECTS_PER_IMAGE[0], LARGE_OBJECTS_PER_IMAGE[1] + 1)
    small_count = rng.integers(SMALL_OBJECTS_PER_IMAGE[0], SMALL_OBJECTS_PER_IMAGE[1] + 1)
    sizes = [rng.uniform(*LARGE_OBJECT_SIZES) for _ in range(large_count)]  # large first: they need room
    sizes += [rng.uniform(*SMALL_OBJECT_SIZES) for _ in range(small_count)]

    objects, boxes = [], []
    for size in sizes:
        class_index = int(rng.integers(len(CLASS_NAMES)))
        polygon = _shape_polygon(rng, class_index, size)
        for _attempt in range(20):  # give up on this object if the image is too crowded
            low = -polygon.min(0) + OBJECT_GAP
            high = image_size - polygon.max(0) - OBJECT_GAP
            placed = polygon + rng.uniform(low, high)
            box = np.concatenate((placed.min(0), placed.max(0)))
            if not _boxes_overlap(box, boxes):
                break
        else:
            continue
        centre = np.round((box[:2] + box[2:]) / 2).astype(int).clip(0, image_size - 1)
        _draw_polygon(image, placed, _contrasting_colour(rng, image[centre[1], centre[0]]))
        objects.append((class_index, placed))
        boxes.append(box)

    noise_std = rng.uniform(*SENSOR_NOISE_STD)
    image += noise_std * rng.standard_normal(size=image.shape, dtype=np.float32)
    return np.clip(np.round(image), 0, 255).astype(np.uint8), objects


def _label_lines(objects: list, image_size: int) -> str:
    """YOLO-seg label text: one ``class x1 y1 x2 y2 ...`` line per object, coordinates in [0, 1]."""
    lines = []
    for class_index, polygon in objects:
        normalised = np.clip(polygon / image_size, 0.0, 1.0).reshape(-1)
        lines.append(" ".join([str(class_index)] + [f"{value:.6f}" for value in normalised]))
    return "\n".join(lines) + ("\n" if lines else "")


def _manifest(train_images: int, val_images: int, image_size: int, seed: int, test_images: int) -> dict:
    return {
        "name": DATASET_NAME,
        "generator_version": GENERATOR_VERSION,
        "train_images": train_images,
        "val_images": val_images,
        "test_images": test_images,
        "image_size": image_size,
        "seed": seed,
        "names": list(CLASS_NAMES),
    }


def _read_manifest(manifest_file: Path) -> dict | None:
    """The manifest of a finished dataset (``test_images`` 0 when it predates the test split), else ``None``."""
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict):
        return None
    manifest.setdefault("test_images", 0)
    return manifest


def _write_split(root: Path, split: str, count: int, image_size: int, seed: int) -> None:
    """Render ``count`` images of ``split`` with their labels into ``root/images/<split>``, ``root/labels/<split>``."""
    image_dir, label_dir = root / "images" / split, root / "labels" / split
    image_dir.mkdir(parents=True)
    label_dir.mkdir(parents=True)
    for index in range(count):
        rng = np.random.default_rng((seed, SPLIT_CODES[split], index))
        image, objects = render_shapes_image(rng, image_size)
        stem = f"{split}_{index:04d}"
        ok, encoded = cv2.imencode(
            ".png", image[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION]
        )  # cv2 wants BGR
        if not ok:
            raise RuntimeError(f"PNG encoding failed for {stem}")
        (image_dir / f"{stem}.png").write_bytes(encoded.tobytes())
        (label_dir / f"{stem}.txt").write_text(_label_lines(objects, image_size))


def _add_test_split(root: Path, manifest: dict) -> Path:
    """Add the test split to a finished dataset that has none, leaving its train and val files untouched."""
    staging = Path(tempfile.mkdtemp(prefix=".test-split-", dir=root))
    try:
        _write_split(staging, "test", manifest["test_images"], manifest["image_size"], manifest["seed"])
        for kind in ("images", "labels"):
            shutil.rmtree(root / kind / "test", ignore_errors=True)  # an earlier, interrupted attempt
            os.replace(staging / kind / "test", root / kind / "test")
        temporary = root / (MANIFEST_NAME + ".tmp")
        temporary.write_text(json.dumps(manifest, indent=2) + "\n")
        os.replace(temporary, root / MANIFEST_NAME)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def generate_shapes_dataset(
    root: str | Path,
    train_images: int = 192,
    val_images: int = 48,
    image_size: int = 256,
    seed: int = 0,
    test_images: int = 0,
) -> Path:
    """Write the dataset (``images/{train,val,test}/*.png``, ``labels/{train,val,test}/*.txt``) under ``root``.

    The files are written to a temporary sibling directory and moved into place at the end, so an
    interrupted run leaves no half dataset and concurrent runs do not mix files. A finished
    dataset carries a manifest; calling again with the same arguments returns at once. A finished
    dataset without a test split gets one added when ``test_images`` asks for it (its other files stay).

    Args:
        root (str | Path): Dataset directory to create.
        train_images (int): Images in the ``train`` split.
        val_images (int): Images in the ``val`` split.
        image_size (int): Height and width of every image, pixels (objects stay 3-12 px / 18-48 px).
        seed (int): Seed of the whole dataset.
        test_images (int): Images in the held-out ``test`` split; 0 writes none.

    Returns:
        (Path): ``root``, resolved.

    Raises:
        FileExistsError: ``root`` exists, is not empty and is not this dataset with these arguments.

    Examples:
        >>> root = generate_shapes_dataset("/tmp/shapes", train_images=8, val_images=4, image_size=160)
        >>> sorted(p.name for p in (root / "images").iterdir())
        ['train', 'val']
    """
    train_images = as_whole_number("train_images", train_images, 1)
    val_images = as_whole_number("val_images", val_images, 1)
    test_images = as_whole_number("test_images", test_images, 0)
    image_size = as_whole_number("image_size", image_size, 2 * int(LARGE_OBJECT_SIZES[1]))
    seed = as_whole_number("seed", seed, 0)
    root = Path(root).resolve()
    manifest = _manifest(train_images, val_images, image_size, seed, test_images)
    manifest_file = root / MANIFEST_NAME
    if manifest_file.is_file():
        stored = _read_manifest(manifest_file)
        if stored == manifest:
            return root
        if stored is not None and stored["test_images"] == 0 and {**stored, "test_images": test_images} == manifest:
            return _add_test_split(root, manifest)
        raise FileExistsError(f"{root} holds a {DATASET_NAME} dataset generated with other arguments; delete it first")
    if root.exists() and any(root.iterdir()):
        raise FileExistsError(f"{root} exists and is not an (unfinished) {DATASET_NAME} dataset; delete it first")

    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}-", dir=root.parent))
    try:
        for split, count in (("train", train_images), ("val", val_images), ("test", test_images)):
            if count:
                _write_split(staging, split, count, image_size, seed)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        try:
            if root.exists():
                root.rmdir()  # empty (checked above); a directory cannot replace a directory everywhere
            os.replace(staging, root)
        except OSError:  # another process got there first: fine if it wrote this very dataset
            if _read_manifest(manifest_file) != manifest:
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful os.replace
    return root


def write_dataset_yaml(yaml_file: str | Path, root: str | Path) -> Path:
    """Write an ultralytics dataset YAML for a dataset generated at ``root`` (an absolute path).

    The YAML names the ``test`` split when the dataset has one.

    Args:
        yaml_file (str | Path): Where to write the YAML.
        root (str | Path): The dataset directory, as returned by :func:`generate_shapes_dataset`.

    Returns:
        (Path): ``yaml_file``.
    """
    yaml_file = Path(yaml_file)
    names = "\n".join(f"  {index}: {name}" for index, name in enumerate(CLASS_NAMES))
    root = Path(root).resolve()
    test = "test: images/test\n" if (root / "images" / "test").is_dir() else ""
    yaml_file.write_text(
        f"# {DATASET_NAME}, generated by yolo_dysample.datasets.generate_shapes_dataset\n"
        f"path: {root.as_posix()}\ntrain: images/train\nval: images/val\n{test}\nnames:\n{names}\n"
    )
    return yaml_file


def generate_from_dataset_yaml(dataset: Mapping) -> Path:
    """Generate the dataset a parsed dataset YAML points to; the YAML's ``download:`` calls this.

    ``check_det_dataset`` has already resolved ``dataset["path"]`` (relative paths land under the
    ultralytics ``datasets_dir`` setting). Optional keys ``train_images``, ``val_images``,
    ``test_images``, ``image_size`` and ``seed`` override the defaults.

    Args:
        dataset (Mapping): The parsed YAML, as ``check_det_dataset`` passes it (``yaml`` in scope).

    Returns:
        (Path): The dataset root.
    """
    keys = ("train_images", "val_images", "test_images", "image_size", "seed")
    options = {key: dataset[key] for key in keys if key in dataset}
    return generate_shapes_dataset(Path(dataset["path"]), **options)
