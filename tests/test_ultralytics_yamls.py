"""DySample twins of the installed ultralytics' stock YAMLs: coverage, text, building, weight transfer, lookup."""

from __future__ import annotations

import functools
import re
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml

from yolo_dysample import DySample, twins
from yolo_dysample.ultralytics_adapter import (
    TESTED_ULTRALYTICS_VERSIONS,
    bundled_cfg_dir,
    families_table,
    resolve_bare_yaml,
    stock_model_yaml,
    stock_models_dir,
    stock_upsampling_yamls,
    twin_bare_name,
    update_examples,
    update_families_table,
    write_twin,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
STOCK = stock_upsampling_yamls()
# Every stock YAML with one variant (the variants in turn) by default; the other three of each under -m slow.
TWINS = [
    pytest.param(stock, variant, marks=() if k == n % len(twins.VARIANTS) else pytest.mark.slow)
    for n, stock in enumerate(STOCK)
    for k, variant in enumerate(twins.VARIANTS)
]


def installed_release() -> str:
    import ultralytics

    return ultralytics.__version__


def skip_unless_stock(*names: str) -> None:
    """Skip a test about stock files the installed (older) release does not ship."""
    missing = [name for name in names if stock_model_yaml(name) is None]
    if missing:
        pytest.skip(f"ultralytics {installed_release()} has no {', '.join(missing)}")


def rows(model: dict) -> list:
    return model["backbone"] + model["head"]


def layers_on_meta(model: dict) -> torch.nn.Sequential:
    from ultralytics.nn.tasks import parse_model

    with torch.device("meta"):  # shapes only, no weights
        layers, _ = parse_model(deepcopy(model), model.get("channels", 3), verbose=False)
    return layers


# ------------------------------------------------------------------------------------------------------- coverage
def test_every_stock_yaml_with_an_upsample_row_is_found():
    # an independent reading: every stock YAML one of whose layer rows names nn.Upsample
    expected = []
    for path in stock_models_dir().rglob("*.yaml"):
        model = yaml.safe_load(path.read_text(encoding="utf-8"))
        if any(row[2] == "nn.Upsample" for row in rows(model)):
            expected.append(path)
    assert sorted(STOCK) == sorted(expected)
    if (
        installed_release() == "8.4.190"
    ):  # v3, v5, v8 (ghost, p2, p6, world, rtdetr), v9, v10, 11, 12, 26, RT-DETR, YOLOE
        assert len(STOCK) == 58


@pytest.mark.parametrize(("stock", "variant"), TWINS, ids=lambda x: getattr(x, "stem", getattr(x, "suffix", x)))
def test_twin_builds_by_bare_name_and_takes_every_stock_tensor(stock, variant, tmp_path, monkeypatch):
    from ultralytics.nn.tasks import yaml_model_load

    monkeypatch.chdir(tmp_path)
    bare = twin_bare_name(stock, variant)
    twin = yaml_model_load(bare)  # ultralytics' own name reduction and scale guess
    original = yaml_model_load(re.sub(rf"{variant.suffix}\.yaml$", ".yaml", bare))
    assert twin["scale"] == original["scale"]
    if original.get("scales") and len(original["scales"]) > 1:
        assert twin["scale"] == next(iter(original["scales"]))  # the first scale
    twin_rows, stock_rows = rows(twin), rows(original)
    assert len(twin_rows) == len(stock_rows)
    for old, new in zip(stock_rows, twin_rows, strict=True):
        if old[2] == "nn.Upsample":
            assert new[:2] == old[:2] and new[2] == "DySample"
            assert (new[3][0], new[3][1], new[3][3]) == (old[3][1], variant.style, variant.dyscope)
        else:
            assert new == old
    built, reference = layers_on_meta(twin), layers_on_meta(original)
    assert [i for i, layer in enumerate(built) if isinstance(layer, DySample)] == [
        i for i, row in enumerate(stock_rows) if row[2] == "nn.Upsample"
    ]
    assert not any(isinstance(layer, torch.nn.Upsample) for layer in built)
    twin_shapes = {key: tuple(value.shape) for key, value in built.state_dict().items()}
    stock_shapes = {key: tuple(value.shape) for key, value in reference.state_dict().items()}
    assert {key: twin_shapes.get(key) for key in stock_shapes} == stock_shapes  # 100 % by name and shape
    extra = set(twin_shapes) - set(stock_shapes)
    assert extra and all(".offset." in k or ".scope." in k or k.endswith("init_pos") for k in extra)


def test_twin_text_is_the_stock_text_with_only_the_upsample_rows_replaced():
    stock = next(p for p in STOCK if p.name == "yolov8-p2.yaml")
    for variant in twins.VARIANTS:
        text = resolve_bare_yaml(f"yolov8-p2{variant.suffix}.yaml").read_text(encoding="utf-8")
        header, body = text.split("\n\n", 1)
        assert all(line.startswith("# ") for line in header.splitlines())
        assert "ultralytics/cfg/models/v8/yolov8-p2.yaml" in header and variant.paper_name in header
        changed = [(a, b) for a, b in zip(stock.read_text().splitlines(), body.splitlines(), strict=True) if a != b]
        assert len(changed) == 3
        for a, b in changed:  # same from/repeats field and trailing comment
            assert a.split("nn.Upsample")[0] == b.split("DySample")[0]
            assert a.partition("]]")[2] == b.partition("]]")[2]


def test_groups_are_reduced_only_where_channels_forbid_four_and_the_header_says_so():
    skip_unless_stock("yolov9m.yaml")
    text = resolve_bare_yaml("yolov9m-dysample-s.yaml").read_text(encoding="utf-8")  # PL at 360 channels: 4*2*2 no
    header, body = text.split("\n\n", 1)
    groups = {i: row[3][2] for i, row in enumerate(rows(yaml.safe_load(body))) if row[2] == "DySample"}
    reduced = {i: g for i, g in groups.items() if g != 4}
    assert reduced == {13: 2}
    assert "# Layer 13 uses groups=2: groups=4 does not divide its channels at every scale." in header
    lp = yaml.safe_load(resolve_bare_yaml("yolov9m-dysample.yaml").read_text(encoding="utf-8"))
    assert {row[3][2] for row in rows(lp) if row[2] == "DySample"} == {4}


def test_twins_follow_the_installed_stock_file_not_a_copy(tmp_path, monkeypatch):
    from yolo_dysample import ultralytics_adapter

    fake = tmp_path / "models" / "v8"
    fake.mkdir(parents=True)
    stock = (stock_models_dir() / "v8" / "yolov8.yaml").read_text(encoding="utf-8")
    (fake / "yolov8.yaml").write_text(stock.replace("nc: 80", "nc: 5"), encoding="utf-8")
    monkeypatch.setattr(ultralytics_adapter, "stock_models_dir", lambda: tmp_path / "models")
    twin = yaml.safe_load(resolve_bare_yaml("yolov8-dysample.yaml").read_text(encoding="utf-8"))
    assert twin["nc"] == 5  # another release's stock file gives another twin


def test_a_corrupted_cached_twin_is_derived_again():
    path = resolve_bare_yaml("yolov8-seg-dysample-plus.yaml")
    good = path.read_text(encoding="utf-8")
    path.write_text(good.replace("nc: 80", "nc: 3"), encoding="utf-8")
    from yolo_dysample import ultralytics_adapter

    ultralytics_adapter._twin_paths.clear()  # a new process
    assert resolve_bare_yaml("yolov8-seg-dysample-plus.yaml").read_text(encoding="utf-8") == good


# ------------------------------------------------------------------------------------------ lookup by bare name
@pytest.mark.parametrize(
    ("name", "stock", "scale"),
    [
        ("yolov5n-dysample.yaml", "yolov5.yaml", "n"),
        ("yolov9t-dysample.yaml", "yolov9t.yaml", ""),  # no scale letter: yolov9t.yaml is one model
        ("yolov10s-dysample-plus.yaml", "yolov10s.yaml", "s"),
        ("yolo12n-seg-dysample.yaml", "yolo12-seg.yaml", "n"),
        ("yolov8s-worldv2-dysample.yaml", "yolov8-worldv2.yaml", "s"),
        ("yoloe-11s-seg-dysample.yaml", "yoloe-11-seg.yaml", "s"),
        ("rtdetr-l-dysample.yaml", "rtdetr-l.yaml", ""),
        ("yolov8n-ghost-p2-dysample-s.yaml", "yolov8-ghost-p2.yaml", "n"),
        ("yolov3-tiny-dysample.yaml", "yolov3-tiny.yaml", ""),
        ("yolo26m-sem-dysample.yaml", "yolo26-sem.yaml", "m"),
    ],
)
def test_bare_twin_names_resolve_from_any_directory_like_stock_names(name, stock, scale, tmp_path, monkeypatch):
    from ultralytics.nn.tasks import guess_model_scale, yaml_model_load

    skip_unless_stock(stock)
    monkeypatch.chdir(tmp_path)
    model = yaml_model_load(name)
    assert model["scale"] == guess_model_scale(name) == scale
    assert any(row[2] == "DySample" for row in rows(model))


def test_a_name_that_cannot_be_derived_names_the_stock_file_it_looked_for(tmp_path, monkeypatch):
    from ultralytics import YOLO

    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"'yolov8n?-nosuch\.yaml'.*ultralytics \d"):  # releases try both
        YOLO("yolov8n-nosuch-dysample.yaml")
    with pytest.raises(FileNotFoundError, match=r"yolov8-cls\.yaml, which has no nn\.Upsample row"):
        YOLO("yolov8n-cls-dysample.yaml")


def test_bare_dataset_name_resolves_where_ultralytics_looks_for_datasets(tmp_path, monkeypatch):
    from ultralytics.data import utils as data_utils
    from ultralytics.utils import checks

    monkeypatch.chdir(tmp_path)
    expected = str(bundled_cfg_dir() / "datasets" / "dysample-shapes.yaml")
    assert bundled_cfg_dir() == REPO_ROOT / "yolo_dysample" / "cfg"  # inside the package, like ultralytics/cfg
    assert data_utils.check_file("dysample-shapes.yaml") == expected  # check_det_dataset's own reference
    assert checks.check_yaml("dysample-shapes.yaml") == expected


def test_a_local_file_of_the_same_name_wins(tmp_path, monkeypatch):
    from ultralytics import YOLO
    from ultralytics.data import utils as data_utils

    monkeypatch.chdir(tmp_path)
    local = yaml.safe_load(resolve_bare_yaml("yolov8-dysample.yaml").read_text())
    local["nc"] = 7
    Path("yolov8-dysample.yaml").write_text(yaml.safe_dump(local, sort_keys=False))
    assert YOLO("yolov8n-dysample.yaml", verbose=False).model.yaml["nc"] == 7
    Path("dysample-shapes.yaml").write_text("path: here\n")
    assert data_utils.check_file("dysample-shapes.yaml") == "dysample-shapes.yaml"


def test_names_that_are_not_twins_go_to_ultralytics_unchanged(tmp_path, monkeypatch):
    from ultralytics.utils import checks

    monkeypatch.chdir(tmp_path)
    assert checks.check_yaml("yolov8.yaml").endswith("ultralytics/cfg/models/v8/yolov8.yaml")
    assert checks.check_yaml("coco8.yaml").endswith("ultralytics/cfg/datasets/coco8.yaml")
    assert resolve_bare_yaml("some/dir/yolov8-dysample.yaml") is None  # only bare names


# -------------------------------------------------------------------------------------- the user's own YAMLs
CUSTOM = """\
# my model: a custom head (comment kept)
nc: 3
backbone:
  - [-1, 1, Conv, [16, 3, 2]] # 0
  - [-1, 1, Conv, [32, 3, 2]] # 1
  - [-1, 1, Conv, [64, 3, 2]] # 2
head:
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]] # 3 up
  - [[-1, 1], 1, Concat, [1]] # 4
  - [-1, 1, Conv, [24, 3, 1]] # 5
  - [-1, 1, nn.Upsample, [None, 2, "nearest"]] # 6 up
  - [[-1, 0], 1, Concat, [1]] # 7
  - [[7], 1, Detect, [nc]] # 8
"""


@pytest.mark.parametrize("variant", ["dysample", "dysample-plus", "dysample-s", "dysample-s-plus"])
def test_cli_writes_the_twin_of_a_users_yaml_with_indices_and_comments_kept(variant, tmp_path):
    from ultralytics.nn.tasks import DetectionModel

    from yolo_dysample.cli import main

    source = tmp_path / "mine.yaml"
    source.write_text(CUSTOM)
    assert main(["twin", str(source), "--variant", variant, "-o", str(tmp_path / "out.yaml")]) == 0
    text = (tmp_path / "out.yaml").read_text()
    body = text.split("\n\n", 1)[1]
    changed = [(a, b) for a, b in zip(CUSTOM.splitlines(), body.splitlines(), strict=True) if a != b]
    assert [b.rsplit("#", 1)[1] for _, b in changed] == [" 3 up", " 6 up"]
    model = DetectionModel(str(tmp_path / "out.yaml"), verbose=False)
    dysample = [m for m in model.model if isinstance(m, DySample)]
    assert [m.i for m in dysample] == [3, 6]
    # 24 channels at layer 6: PL needs groups * 4 | 24, so groups 2 there (and the header says so)
    assert [m.groups for m in dysample] == ([4, 2] if "-s" in variant else [4, 4])


def test_python_function_takes_explicit_groups_and_refuses_ones_that_do_not_divide(tmp_path):
    source = tmp_path / "mine.yaml"
    source.write_text(CUSTOM)
    out = write_twin(source, tmp_path / "g1.yaml", variant="dysample-s", groups=1)
    assert [row[3][2] for row in rows(yaml.safe_load(out.read_text())) if row[2] == "DySample"] == [1, 1]
    with pytest.raises(ValueError, match=r"layer 6: no groups=4 works"):
        write_twin(source, tmp_path / "g4.yaml", variant="dysample-s", groups=4)


# ------------------------------------------------------------------------------------------- generated files
@functools.cache
def newest_tested_release() -> bool:
    return installed_release() == TESTED_ULTRALYTICS_VERSIONS[-1]


@pytest.mark.skipif(not newest_tested_release(), reason="the generated files describe the newest tested release")
def test_example_twins_equal_a_fresh_derivation():
    assert update_examples(check=True) == []


@pytest.mark.skipif(not newest_tested_release(), reason="the README table describes the newest tested release")
def test_readme_families_table_is_current(tmp_path):
    assert update_families_table(REPO_ROOT / "README.md", check=True)
    stale = tmp_path / "README.md"
    stale.write_text(f"x\n{twins.MARKER_BEGIN}\nold\n{twins.MARKER_END}\ny\n")
    assert not update_families_table(stale, check=True)
    update_families_table(stale)
    assert families_table().strip() in stale.read_text() and stale.read_text().endswith(f"{twins.MARKER_END}\ny\n")
