"""The bundled model YAMLs (cfg/models/): coverage, generation, building, weight transfer, lookup by bare name."""

from __future__ import annotations

import functools
import importlib.util
import re
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml

from yolo_dysample import DySample
from yolo_dysample.ultralytics_adapter import bundled_cfg_dir, bundled_yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MODELS_DIR = bundled_cfg_dir() / "models"
BUNDLED = sorted(MODELS_DIR.rglob("*.yaml"))
VARIANT_SUFFIXES = ("-dysample-s-plus", "-dysample-plus", "-dysample-s", "-dysample")  # longest first
# The issue's list: every stock v8/11/26 YAML with nn.Upsample (no ghost/world/rtdetr/yoloe).
STOCK_WITH_UPSAMPLE = {
    "v8": [
        "yolov8",
        "yolov8-p2",
        "yolov8-p6",
        "yolov8-seg",
        "yolov8-seg-p6",
        "yolov8-pose",
        "yolov8-pose-p6",
        "yolov8-obb",
    ],
    "11": ["yolo11", "yolo11-seg", "yolo11-pose", "yolo11-obb"],
    "26": ["yolo26", "yolo26-p2", "yolo26-p6", "yolo26-seg", "yolo26-pose", "yolo26-obb", "yolo26-sem", "yolo26-depth"],
}


def load_generator():
    spec = importlib.util.spec_from_file_location("generate_yamls", REPO_ROOT / "scripts" / "generate_yamls.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def stock_stem(bundled: Path) -> str:
    stem = bundled.stem
    for suffix in VARIANT_SUFFIXES:
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    raise AssertionError(f"{bundled.name} has no DySample variant suffix")


def scaled_name(name: str, scale: str) -> str:
    """``yolov8-seg-dysample.yaml`` -> ``yolov8n-seg-dysample.yaml``, the form users type."""
    return re.sub(r"^(yolov?\d+)", rf"\g<1>{scale}", name)


@functools.cache
def stock_model_text(stem: str) -> str:
    import ultralytics

    (path,) = (Path(ultralytics.__file__).parent / "cfg" / "models").rglob(f"{stem}.yaml")
    return path.read_text(encoding="utf-8")


def tensors_in(output):
    """Every tensor in a model output (heads return tensors, tuples, lists or dicts of them)."""
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, dict):
        for value in output.values():
            yield from tensors_in(value)
    elif isinstance(output, (list, tuple)):
        for value in output:
            yield from tensors_in(value)


def rows(model: dict) -> list:
    return model["backbone"] + model["head"]


# --------------------------------------------------------------------------------------------- coverage and text
def test_every_stock_upsample_yaml_has_a_twin_and_every_base_model_four_variants():
    expected = set()
    for family, stems in STOCK_WITH_UPSAMPLE.items():
        for stem in stems:
            base = not stem.endswith(("-p2", "-p6"))
            expected |= {f"{family}/{stem}{suffix}.yaml" for suffix in (VARIANT_SUFFIXES if base else ["-dysample"])}
    assert {p.relative_to(MODELS_DIR).as_posix() for p in BUNDLED} == expected
    assert len(expected) == 20 + 14 * 3


def test_generator_finds_exactly_the_stock_files_of_the_issue():
    found = {(p.parent.name, p.stem) for p in load_generator().stock_yamls()}
    assert found == {(family, stem) for family, stems in STOCK_WITH_UPSAMPLE.items() for stem in stems}


def test_bundled_yamls_equal_a_fresh_generation():
    generator = load_generator()
    assert generator.bundled(MODELS_DIR) == generator.generate()


@pytest.mark.parametrize("bundled", BUNDLED, ids=lambda p: p.stem)
def test_twin_text_is_the_stock_text_with_only_the_upsample_rows_replaced(bundled):
    text = bundled.read_text(encoding="utf-8")
    header, body = text.split("\n\n", 1)
    assert all(line.startswith("# ") for line in header.splitlines()) and "generate_yamls.py" in header
    stock = stock_model_text(stock_stem(bundled))
    stock_lines, twin_lines = stock.splitlines(), body.splitlines()
    assert len(stock_lines) == len(twin_lines)
    changed = [(a, b) for a, b in zip(stock_lines, twin_lines, strict=True) if a != b]
    assert changed and all("nn.Upsample" in a and "DySample" in b for a, b in changed)
    for a, b in changed:  # same from/repeats field and trailing comment
        assert a.split("nn.Upsample")[0] == b.split("DySample")[0]
        assert a.partition("]]")[2] == b.partition("]]")[2]
    style = "pl" if "-dysample-s" in bundled.stem else "lp"
    dyscope = bundled.stem.endswith("-plus")
    twin, original = yaml.safe_load(body), yaml.safe_load(stock)
    for index, (old, new) in enumerate(zip(rows(original), rows(twin), strict=True)):
        if old[2] == "nn.Upsample":
            assert new[:3] == [old[0], old[1], "DySample"]
            scale, new_style, groups, new_dyscope = new[3]
            assert (scale, new_style, new_dyscope) == (old[3][1], style, dyscope)
            assert groups == 4 or f"# Layer {index} uses groups={groups}:" in header  # the paper's 4, else documented
        else:
            assert new == old
    assert {k: v for k, v in twin.items() if k not in ("backbone", "head")} == {
        k: v for k, v in original.items() if k not in ("backbone", "head")
    }


@pytest.mark.parametrize("bundled", BUNDLED, ids=lambda p: p.stem)
def test_bundled_yaml_builds_at_every_scale(bundled):
    from ultralytics.nn.tasks import parse_model

    model = yaml.safe_load(bundled.read_text(encoding="utf-8"))
    assert set(model["scales"]) == {"n", "s", "m", "l", "x"}
    for scale in model["scales"]:
        scaled = deepcopy(model)
        scaled["scale"] = scale
        with torch.device("meta"):  # shapes only, no weights: all 5 scales of 62 files in seconds
            layers, _ = parse_model(scaled, ch=3, verbose=False)
        assert sum(isinstance(m, DySample) for m in layers.modules()) == sum(r[2] == "DySample" for r in rows(model))


# ------------------------------------------------------------------------------------- building at scale n, weights
@functools.cache
def stock_state_shapes(stem: str) -> dict[str, tuple]:
    """Shapes of the stock model's state_dict at scale n (built on the meta device: shapes only)."""
    from ultralytics.nn.tasks import parse_model

    model = yaml.safe_load(stock_model_text(stem))
    model["scale"] = "n"
    with torch.device("meta"):
        layers, _ = parse_model(model, ch=3, verbose=False)
    return {f"model.{key}": tuple(value.shape) for key, value in layers.state_dict().items()}


@pytest.mark.parametrize("bundled", BUNDLED, ids=lambda p: p.stem)
def test_bundled_yaml_builds_at_scale_n_and_runs_forward(bundled):
    from ultralytics import YOLO

    model = YOLO(scaled_name(bundled.name, "n"), verbose=False).model.eval()
    assert model.yaml["scale"] == "n"
    stock = yaml.safe_load(stock_model_text(stock_stem(bundled)))
    upsample_rows = [i for i, row in enumerate(rows(stock)) if row[2] == "nn.Upsample"]
    assert len(model.model) == len(rows(stock))  # same layer count and indices
    assert [i for i, layer in enumerate(model.model) if isinstance(layer, DySample)] == upsample_rows
    assert not any(isinstance(layer, torch.nn.Upsample) for layer in model.model)  # none left among the rows
    with torch.no_grad():
        output = model(torch.rand(1, 3, 64, 64))
    outputs = list(tensors_in(output))
    assert outputs and all(torch.isfinite(t).all() for t in outputs)
    # every stock weight has a place of the same shape in the twin: a stock checkpoint transfers 100%
    twin_shapes = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    stock_shapes = stock_state_shapes(stock_stem(bundled))
    assert {key: twin_shapes.get(key) for key in stock_shapes} == stock_shapes
    assert all(
        ".offset." in k or ".scope." in k or k.endswith(".init_pos") for k in set(twin_shapes) - set(stock_shapes)
    )


def head_inputs(model: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The feature maps the head reads (the neck's outputs, which the upsampling feeds), flattened."""
    features = {}
    head = model.model[-1]
    hooks = [model.model[i].register_forward_hook(lambda m, a, out, i=i: features.__setitem__(i, out)) for i in head.f]
    try:
        with torch.no_grad():
            model(image)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.cat([features[i].flatten() for i in head.f])


@pytest.fixture(scope="module")
def bus_image() -> torch.Tensor:
    import cv2
    from ultralytics.utils import ASSETS

    image = cv2.resize(cv2.imread(str(ASSETS / "bus.jpg")), (128, 128), interpolation=cv2.INTER_AREA)[..., ::-1]
    return torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float() / 255


@pytest.mark.parametrize(
    ("stock_name", "twin_name"),
    [
        ("yolov8n.yaml", "yolov8n-dysample.yaml"),
        ("yolov8n-p2.yaml", "yolov8n-p2-dysample.yaml"),
        ("yolo11n-seg.yaml", "yolo11n-seg-dysample-s.yaml"),
        ("yolo26n-pose.yaml", "yolo26n-pose-dysample-plus.yaml"),
        ("yolo26n-sem.yaml", "yolo26n-sem-dysample-s-plus.yaml"),
        ("yolo26n-depth.yaml", "yolo26n-depth-dysample.yaml"),
    ],
)
def test_stock_checkpoint_transfers_fully_and_the_twin_predicts_like_bilinear_stock(
    stock_name, twin_name, tmp_path, bus_image
):
    from ultralytics import YOLO

    torch.manual_seed(0)
    YOLO(stock_name, verbose=False).save(tmp_path / "stock.pt")  # a locally built stock checkpoint
    stock = YOLO(tmp_path / "stock.pt", verbose=False).model.float().eval()
    twin = YOLO(twin_name, verbose=False).load(tmp_path / "stock.pt").model.float().eval()

    twin_state = twin.state_dict()
    for key, value in stock.state_dict().items():  # 100%: every stock tensor, bit for bit
        assert torch.equal(twin_state[key], value), key

    nearest = head_inputs(stock, bus_image)
    for module in stock.modules():
        if isinstance(module, torch.nn.Upsample):
            module.mode = "bilinear"  # what DySample computes before training (offsets ~ 0)
    bilinear = head_inputs(stock, bus_image)
    ours = head_inputs(twin, bus_image)
    upsampling_effect = (nearest - bilinear).norm()
    assert upsampling_effect > 0  # the comparison below sees upsampling changes
    assert (ours - bilinear).norm() < 0.01 * upsampling_effect
    assert torch.allclose(ours, nearest, rtol=1e-2, atol=1e-3 * nearest.abs().max().item())


# ------------------------------------------------------------------------------------------ lookup by bare name
def test_bare_model_names_resolve_from_any_directory_with_their_scale(tmp_path, monkeypatch):
    from ultralytics.nn.tasks import yaml_model_load

    monkeypatch.chdir(tmp_path)
    for name, scale in [
        ("yolov8n-dysample.yaml", "n"),
        ("yolo11s-seg-dysample.yaml", "s"),
        ("yolo26m-sem-dysample.yaml", "m"),
    ]:
        model = yaml_model_load(name)
        assert model["scale"] == scale
        unscaled = re.sub(r"^(yolov?\d+)[nsmlx]", r"\1", name)
        assert model["backbone"] == yaml.safe_load(bundled_yaml(unscaled).read_text())["backbone"]


def test_bare_dataset_name_resolves_where_ultralytics_looks_for_datasets(tmp_path, monkeypatch):
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import checks

    monkeypatch.chdir(tmp_path)
    expected = str(bundled_cfg_dir() / "datasets" / "dysample-shapes.yaml")
    assert data_utils.check_file("dysample-shapes.yaml") == expected  # check_det_dataset's own reference
    assert checks.check_yaml("dysample-shapes.yaml") == expected


def test_a_local_file_of_the_same_name_wins(tmp_path, monkeypatch):
    from ultralytics import YOLO
    from ultralytics.data import utils as data_utils

    monkeypatch.chdir(tmp_path)
    local = yaml.safe_load(bundled_yaml("yolov8-dysample.yaml").read_text())
    local["nc"] = 7
    Path("yolov8-dysample.yaml").write_text(yaml.safe_dump(local, sort_keys=False))
    assert YOLO("yolov8n-dysample.yaml", verbose=False).model.yaml["nc"] == 7
    Path("dysample-shapes.yaml").write_text("path: here\n")
    assert data_utils.check_file("dysample-shapes.yaml") == "dysample-shapes.yaml"


def test_names_that_are_not_bundled_go_to_ultralytics_unchanged(tmp_path, monkeypatch):
    from ultralytics.utils import checks

    monkeypatch.chdir(tmp_path)
    assert checks.check_yaml("yolov8.yaml").endswith("ultralytics/cfg/models/v8/yolov8.yaml")
    assert checks.check_yaml("coco8.yaml").endswith("ultralytics/cfg/datasets/coco8.yaml")
    assert bundled_yaml("cfg/models/v8/yolov8-dysample.yaml") is None  # only bare names
    with pytest.raises(FileNotFoundError):
        checks.check_yaml("yolov8-dysample-nonexistent.yaml")
