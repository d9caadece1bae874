"""Ultralytics integration: parser registration, the autoload hook, checkpoints and the wheel.

The DySample twins and their resolution by bare name are tested in ``test_ultralytics_yamls.py``; each head family
training and exporting in ``test_ultralytics_families.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import zipfile
from copy import deepcopy
from pathlib import Path

import pytest
import torch
import yaml

from yolo_dysample import DySample
from yolo_dysample.ultralytics_adapter import (
    MINIMUM_ULTRALYTICS,
    SUPPORTED_ULTRALYTICS,
    TESTED_ULTRALYTICS_VERSIONS,
    DySampleRow,
    UltralyticsIncompatibleError,
    bundled_cfg_dir,
    register_with_ultralytics,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SCALES = ("n", "s", "m", "l", "x")
DYSAMPLE_CLASS = "yolo_dysample.dysample.DySample"


def stock_yaml(name: str) -> dict:
    from ultralytics.nn.tasks import yaml_model_load

    return yaml_model_load(name)


def with_rows_replaced(model: dict, module: str, args: list) -> dict:
    """A copy of a model dict whose nn.Upsample rows name ``module`` with ``args`` (from and repeats kept)."""
    model = deepcopy(model)
    for row in model["backbone"] + model["head"]:
        if row[2] == "nn.Upsample":
            row[2], row[3] = module, deepcopy(args)
    return model


def upsample_row_indices(model: dict) -> list[int]:
    return [i for i, row in enumerate(model["backbone"] + model["head"]) if row[2] == "nn.Upsample"]


def build_layers(model: dict, scale: str) -> torch.nn.Sequential:
    """parse_model on the meta device (no weights allocated): the layers of ``model`` at ``scale``."""
    from ultralytics.nn.tasks import parse_model

    model = deepcopy(model)
    model["scale"] = scale
    with torch.device("meta"):
        layers, _ = parse_model(model, ch=3, verbose=False)
    return layers


# ---------------------------------------------------------------------------------------------- parser registration
@pytest.mark.parametrize("scale", SCALES)
def test_dysample_in_channels_are_inferred_like_ultralytics_infers_them(scale):
    # nn.BatchNorm2d is a layer whose input channels parse_model itself infers (args = [ch[f]]): the oracle.
    stock = stock_yaml("yolov8-p2.yaml")
    oracle = build_layers(with_rows_replaced(stock, "nn.BatchNorm2d", []), scale)
    ours = build_layers(with_rows_replaced(stock, "DySample", [2, "pl", 4, True]), scale)
    rows = upsample_row_indices(stock)
    expected = [oracle[i].num_features for i in rows]
    assert [ours[i].in_channels for i in rows] == expected
    assert len(set(expected)) > 1  # rows of different widths: a constant would not pass
    assert all(type(ours[i]) is DySample for i in rows)  # a plain DySample, not the parser stand-in
    assert (ours[rows[0]].style, ours[rows[0]].groups, ours[rows[0]].dyscope) == ("pl", 4, True)


def test_empty_dysample_args_give_the_paper_defaults():
    layers = build_layers(with_rows_replaced(stock_yaml("yolov8.yaml"), "DySample", []), "n")
    first = layers[upsample_row_indices(stock_yaml("yolov8.yaml"))[0]]
    assert (first.scale, first.style, first.groups, first.dyscope) == (2, "lp", 4, False)


def test_repeated_dysample_row_builds_a_chain_of_plain_dysample():
    model = stock_yaml("yolov8.yaml")
    row = upsample_row_indices(model)[0]
    model = with_rows_replaced(model, "DySample", [2, "lp", 4, False])
    (model["backbone"] + model["head"])[row][1] = 2  # repeats: 2x then 2x upsampling of the same channels
    layers = build_layers(model, "l")  # depth 1.0: parse_model keeps the 2 repeats (depth 0.33 at n would not)
    assert [type(block) for block in layers[row]] == [DySample, DySample]
    assert layers[row][0].in_channels == layers[row][1].in_channels


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([2, "pl", 3], r"groups=3"),  # 3 does not divide the channels
        ([2, "diagonal"], r"style='diagonal'"),
        ([2, "lp", 4, False, "extra"], r"positional argument"),
    ],
)
def test_bad_dysample_row_names_the_layer_index(tmp_path, args, message):
    from ultralytics import YOLO

    model = with_rows_replaced(stock_yaml("yolov8.yaml"), "DySample", [2, "lp", 4, False])
    bad_row = [i for i, row in enumerate(model["backbone"] + model["head"]) if row[2] == "DySample"][-1]
    (model["backbone"] + model["head"])[bad_row][3] = args
    model.pop("yaml_file", None)
    model.pop("scale", None)
    path = tmp_path / "yolov8n-bad-row.yaml"
    path.write_text(yaml.safe_dump(model, sort_keys=False))
    with pytest.raises((ValueError, TypeError), match=rf"model YAML layer {bad_row} \(.*{message}"):
        YOLO(str(path))


def test_dysample_row_with_two_inputs_names_the_layer_index():
    model = with_rows_replaced(stock_yaml("yolov8.yaml"), "DySample", [])
    row = upsample_row_indices(stock_yaml("yolov8.yaml"))[0]
    (model["backbone"] + model["head"])[row][0] = [-1, 6]
    with pytest.raises((TypeError, ValueError), match=rf"model YAML layer {row} \(\[\[-1, 6\], "):
        build_layers(model, "n")  # ultralytics' own ch[f] fails first; the parse_model wrapper names the layer


def test_dysample_row_outside_parse_model_raises_a_clear_error():
    import ultralytics

    with pytest.raises(UltralyticsIncompatibleError, match=rf"ultralytics {re.escape(ultralytics.__version__)}"):
        DySampleRow(2, "lp")


def test_missing_parser_internals_raise_an_error_naming_the_ultralytics_version(monkeypatch):
    import ultralytics
    from ultralytics.nn import tasks

    def parse_model(d, input_channels, verbose=True):  # a future parser without the locals we read
        return d, input_channels, verbose

    monkeypatch.setattr(tasks, "parse_model", parse_model)
    with pytest.raises(UltralyticsIncompatibleError, match=rf"ultralytics {re.escape(ultralytics.__version__)}.*"):
        register_with_ultralytics()


def test_supported_range_matches_pyproject_and_the_tested_releases():
    pyproject = (REPO_ROOT / "pyproject.toml").read_text()
    assert f'"ultralytics{SUPPORTED_ULTRALYTICS}"' in pyproject
    assert SUPPORTED_ULTRALYTICS.startswith(f">={MINIMUM_ULTRALYTICS},")
    releases = [tuple(map(int, v.split("."))) for v in TESTED_ULTRALYTICS_VERSIONS]
    assert TESTED_ULTRALYTICS_VERSIONS[0] == MINIMUM_ULTRALYTICS and releases == sorted(releases)
    assert len({r[:2] for r in releases}) >= 3  # the oldest of each supported minor line, then the newest


def test_registration_below_the_supported_range_names_the_installed_release_and_the_range(monkeypatch):
    import ultralytics

    monkeypatch.setattr(ultralytics, "__version__", "8.1.47")
    expected = rf"ultralytics 8\.1\.47: .*before {re.escape(MINIMUM_ULTRALYTICS)}.*{re.escape(SUPPORTED_ULTRALYTICS)}"
    with pytest.raises(UltralyticsIncompatibleError, match=expected):
        register_with_ultralytics()


SAVE_CHECKPOINT = """
import sys
import torch
from ultralytics import YOLO
# the checkpoint layout ultralytics' loader reads (Model.save needs a loaded checkpoint before 8.4)
torch.save({"model": YOLO("yolov8n-dysample.yaml").model, "train_args": {}}, sys.argv[1])
"""
EXPORT_AT_OPSET_12 = """
import json, sys
from ultralytics import YOLO
model = YOLO(sys.argv[1])  # unpickling imports yolo_dysample: the first registration may happen only now
report = {"callbacks": [f.__name__ for f in model.callbacks["on_export_start"]]}
try:
    report["exported"] = model.export(format="onnx", opset=12, imgsz=64)
except Exception as error:
    report["error"] = f"{type(error).__name__}: {error}"
print("REPORT " + json.dumps(report))
"""


@pytest.mark.parametrize("autoload", ["1", "0"])
def test_export_callback_reaches_a_model_made_before_explicit_registration(
    run_python, tmp_path, autoload, onnx_export_works
):
    checkpoint = tmp_path / "dysample.pt"
    run_python(SAVE_CHECKPOINT, checkpoint, cwd=tmp_path)
    report = _report(run_python(EXPORT_AT_OPSET_12, checkpoint, cwd=tmp_path, env={"YOLO_DYSAMPLE_AUTOLOAD": autoload}))
    assert "error" not in report, report  # opset 12 has no GridSample: only our callback makes it exportable
    assert Path(report["exported"]).is_file()


def _ultralytics_sources_digest() -> str:
    import ultralytics

    digest = hashlib.sha256()
    for path in sorted(Path(ultralytics.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def test_registration_is_idempotent_and_edits_no_installed_file():
    import ultralytics.nn
    from ultralytics.data import utils as data_utils  # holds check_file by name (from ... import check_file)
    from ultralytics.nn import tasks
    from ultralytics.utils import checks

    before = _ultralytics_sources_digest()
    for _ in range(3):
        register_with_ultralytics()
    assert _ultralytics_sources_digest() == before
    assert tasks.DySample is DySampleRow
    wrapper = checks.check_file
    assert getattr(wrapper, "__yolo_dysample_wrapped__", False)
    assert not getattr(wrapper.__wrapped__, "__yolo_dysample_wrapped__", False)  # wrapped once, not three times
    holders = [m for n, m in sys.modules.items() if n.startswith("ultralytics") and "check_file" in vars(m)]
    assert {checks, data_utils} <= set(holders)  # (nn.tasks too, since 8.3)
    assert all(m.check_file is wrapper for m in holders)
    assert sum(g is DySample for g in torch.serialization.get_safe_globals()) == 1
    parser = tasks.parse_model
    assert getattr(parser, "__yolo_dysample_wrapped__", False)
    assert not getattr(parser.__wrapped__, "__yolo_dysample_wrapped__", False)
    assert ultralytics.nn.parse_model is parser  # the re-export in ultralytics.nn too


# --------------------------------------------------------------------------------------------- the autoload hook
BUILD_WITHOUT_IMPORTING_US = """
import json, sys
loaded_before = sorted(m for m in sys.modules if "dysample" in m)
hooked = [type(f).__name__ for f in sys.meta_path if getattr(f, "yolo_dysample_hook", False)]
from ultralytics import YOLO
import ultralytics.nn.tasks as tasks
report = {"loaded_before": loaded_before, "hooked": hooked, "registered": hasattr(tasks, "DySample")}
try:
    model = YOLO(sys.argv[1])
    report["layers"] = sorted({f"{type(m).__module__}.{type(m).__name__}" for m in model.model.modules()})
except Exception as error:
    report["error"] = f"{type(error).__name__}: {error}"
print("REPORT " + json.dumps(report))
"""


def _report(result: subprocess.CompletedProcess) -> dict:
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT ") :])


def test_fresh_process_that_only_imports_ultralytics_builds_dysample_models(run_python, tmp_path):
    report = _report(run_python(BUILD_WITHOUT_IMPORTING_US, "yolov8s-seg-dysample-s-plus.yaml", cwd=tmp_path))
    assert report["loaded_before"] == ["_yolo_dysample_autoload"]  # only the tiny hook module at startup
    assert report["hooked"] == ["_RegisterAfterImport"]
    assert report["registered"]
    assert "error" not in report
    assert DYSAMPLE_CLASS in report["layers"]
    assert "torch.nn.modules.upsampling.Upsample" not in report["layers"]


def test_autoload_env_var_turns_the_hook_off(run_python, tmp_path):
    report = _report(
        run_python(
            BUILD_WITHOUT_IMPORTING_US, "yolov8n-dysample.yaml", cwd=tmp_path, env={"YOLO_DYSAMPLE_AUTOLOAD": "0"}
        )
    )
    assert report["hooked"] == []
    assert not report["registered"]
    assert re.fullmatch(r"FileNotFoundError: 'yolov8n?-dysample\.yaml' does not exist", report["error"])  # unknown name


def test_explicit_import_registers_when_autoload_is_off(run_python, tmp_path):
    script = "import yolo_dysample\n" + BUILD_WITHOUT_IMPORTING_US.replace('if "dysample" in m', "if False")
    report = _report(run_python(script, "yolov8n-dysample.yaml", cwd=tmp_path, env={"YOLO_DYSAMPLE_AUTOLOAD": "0"}))
    assert report["registered"] and "error" not in report
    assert DYSAMPLE_CLASS in report["layers"]


WRITE_DDP_SCRIPT = """
import sys
from ultralytics.models.yolo.detect import DetectionTrainer
from ultralytics.utils.dist import generate_ddp_file

overrides = dict(
    model="yolov8n-dysample.yaml", data="dysample-shapes.yaml", epochs=1, imgsz=64, batch=8, fraction=0.1,
    workers=0, device="cpu", plots=False, val=False, project=sys.argv[1], name="ddp",
)
trainer = DetectionTrainer(overrides=overrides)
assert isinstance(trainer.model, str), "the DDP worker must build the model from the YAML name itself"
print("DDP_FILE " + generate_ddp_file(trainer))
"""


@pytest.mark.slow
def test_script_ultralytics_writes_for_ddp_workers_trains_a_dysample_model(run_python, tmp_path):
    # The file ultralytics runs in every multi-GPU worker imports only ultralytics and builds the model from its
    # YAML name: DySample must be registered there. Run on CPU, in one process, it trains like a worker.
    written = run_python(WRITE_DDP_SCRIPT, tmp_path / "runs", cwd=tmp_path)
    ddp_file = next(line for line in written.stdout.splitlines() if line.startswith("DDP_FILE "))[len("DDP_FILE ") :]
    assert not re.search(r"(import|from) yolo_dysample", Path(ddp_file).read_text())  # the worker never imports us

    # (On 8.4.190 the worker also imports yolo_dysample while unpickling the trainer's callbacks, which include
    # our export callback, so the hook is not the only way in; on older releases it is.)
    worker = subprocess.run(
        [sys.executable, ddp_file], cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_clean_environment()
    )
    assert worker.returncode == 0, worker.stderr[-3000:]
    (last,) = (tmp_path / "runs").glob("ddp*/weights/last.pt")
    trained = torch.load(last, map_location="cpu", weights_only=False)["model"]
    assert sum(isinstance(m, DySample) for m in trained.modules()) == 2


def _clean_environment() -> dict[str, str]:
    import os

    return {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTEST_ADDOPTS")}


def test_process_that_never_imports_ultralytics_loads_nothing_heavy(run_python, tmp_path):
    roots = ("torch", "ultralytics", "yolo_dysample", "numpy", "_yolo_dysample_autoload")
    script = f"import sys; print(sorted(m for m in sys.modules if m.split('.')[0] in {roots}))"
    assert run_python(script, cwd=tmp_path).stdout.strip() == "['_yolo_dysample_autoload']"


@pytest.mark.slow
def test_stock_yolo_command_builds_a_bundled_model_from_another_directory(run_yolo, tmp_path):
    from ultralytics.utils import ASSETS

    result = run_yolo(
        "predict", "model=yolov8n-dysample.yaml", f"source={ASSETS / 'bus.jpg'}", "imgsz=64", "save=False", cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert "bus.jpg: 64x64" in output  # the prediction ran
    assert "Traceback" not in output and "WARNING" not in output  # offline and quiet


# ---------------------------------------------------------------------------------------------------- checkpoints
LOAD_AND_PREDICT = """
import json, sys
import ultralytics.utils
from ultralytics import YOLO
from ultralytics.utils import ASSETS
model = YOLO(sys.argv[1])
results = model.predict(ASSETS / "bus.jpg", imgsz=128, conf=0.0, max_det=5, verbose=False)
print("REPORT " + json.dumps({
    "safe_load": bool(getattr(ultralytics.utils, "SAFE_LOAD", False)),
    "dysample_layers": sum(type(m).__name__ == "DySample" for m in model.model.modules()),
    "boxes": len(results[0].boxes),
}))
"""


@pytest.mark.slow
def test_trained_checkpoint_loads_and_predicts_in_a_fresh_process(run_python, trained_checkpoint, tmp_path):
    report = _report(run_python(LOAD_AND_PREDICT, trained_checkpoint, cwd=tmp_path))
    assert report == {"safe_load": False, "dysample_layers": 2, "boxes": 5}


def _has_safe_load() -> bool:
    import ultralytics.utils

    return hasattr(ultralytics.utils, "SAFE_LOAD")  # ULTRALYTICS_SAFE_LOAD: ultralytics 8.4 and later


needs_safe_load = pytest.mark.skipif(not _has_safe_load(), reason="this ultralytics has no ULTRALYTICS_SAFE_LOAD")


@pytest.mark.slow
@needs_safe_load
def test_trained_checkpoint_loads_under_ultralytics_safe_load(run_python, trained_checkpoint, tmp_path):
    report = _report(run_python(LOAD_AND_PREDICT, trained_checkpoint, cwd=tmp_path, env={"ULTRALYTICS_SAFE_LOAD": "1"}))
    assert report == {"safe_load": True, "dysample_layers": 2, "boxes": 5}


@pytest.mark.slow
@needs_safe_load
def test_safe_load_refuses_the_checkpoint_without_our_registration(run_python, trained_checkpoint, tmp_path):
    env = {"ULTRALYTICS_SAFE_LOAD": "1", "YOLO_DYSAMPLE_AUTOLOAD": "0"}
    result = run_python(LOAD_AND_PREDICT, trained_checkpoint, cwd=tmp_path, env=env, check=False)
    assert result.returncode != 0
    assert "outside the supported Ultralytics checkpoint format" in result.stderr


@pytest.fixture(scope="module")
def interrupted_training(tiny_shapes_dataset, tmp_path_factory) -> Path:
    """last.pt of a 2-epoch run that crashed right after saving its first epoch: a real resumable checkpoint."""
    from ultralytics import YOLO

    class Crash(Exception):
        pass

    def crash(trainer):
        raise Crash(f"simulated crash after epoch {trainer.epoch + 1}")

    work = tmp_path_factory.mktemp("interrupted")
    model = YOLO("yolov8n-dysample-plus.yaml")
    model.add_callback("on_fit_epoch_end", crash)
    with pytest.raises(Crash):
        model.train(
            data=str(tiny_shapes_dataset), epochs=2, imgsz=64, batch=8, workers=0, device="cpu", plots=False,
            project=str(work), name="run",
        )  # fmt: skip
    last = work / "run" / "weights" / "last.pt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 0
    return last


@pytest.mark.slow
def test_interrupted_dysample_training_resumes_with_the_stock_command(run_yolo, interrupted_training):
    run_dir = interrupted_training.parent.parent
    result = run_yolo("train", "resume", f"model={interrupted_training}", "workers=0", cwd=run_dir)
    assert "Resuming training" in result.stdout + result.stderr
    rows = (run_dir / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 2  # header, the epoch before the crash, the resumed epoch
    resumed = torch.load(run_dir / "weights" / "last.pt", map_location="cpu", weights_only=False)
    dysample = [m for m in resumed["model"].modules() if isinstance(m, DySample)]
    assert len(dysample) == 2 and all(m.dyscope for m in dysample)


# ----------------------------------------------------------------------------------------------------------- wheel
@pytest.fixture(scope="module")
def built_wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(out), str(REPO_ROOT)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (wheel,) = out.glob("yolo_dysample-*.whl")
    return wheel


@pytest.mark.slow
def test_wheel_ships_the_yamls_and_the_autoload_hook(built_wheel):
    names = set(zipfile.ZipFile(built_wheel).namelist())
    cfg = bundled_cfg_dir()
    expected_yamls = {f"yolo_dysample/cfg/{p.relative_to(cfg).as_posix()}" for p in cfg.rglob("*.yaml")}
    assert len([n for n in expected_yamls if "/models/" in n]) == 4  # generated examples; twins are derived
    assert expected_yamls <= names
    assert {"yolo_dysample_autoload.pth", "_yolo_dysample_autoload.py", "yolo_dysample/ultralytics_adapter.py"} <= names
    pth = zipfile.ZipFile(built_wheel).read("yolo_dysample_autoload.pth").decode()
    assert pth.count("\n") == 1 and pth.startswith("import _yolo_dysample_autoload;")  # one line, one tiny import


# ---------------------------------------------------------------------------------------------------- GFLOPs (thop)
@pytest.mark.parametrize(
    ("yaml_name", "convs"),
    [("yolov8n-dysample.yaml", 1), ("yolov8n-dysample-plus.yaml", 2), ("yolov8n-dysample-s.yaml", 1)],
)
def test_model_gflops_count_dysample_projection_and_sampling(yaml_name, convs):
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import get_flops

    register_with_ultralytics()
    stock = DetectionModel("yolov8n.yaml", verbose=False)
    twin = DetectionModel(yaml_name, verbose=False)
    layers = [m for m in twin.modules() if isinstance(m, DySample)]
    assert len(layers) == 2
    # by hand, at 640: the layers see stride-32 and stride-16 maps; per layer the projection as run
    # (convs x 32 rows x C per input pixel) plus 4 multiply-adds per output value; 2 FLOPs per multiply-add
    multiply_adds = 0
    for layer, size in zip(layers, (640 // 32, 640 // 16), strict=True):
        pixels = size * size
        multiply_adds += convs * 32 * layer.in_channels * pixels + 4 * layer.in_channels * 4 * pixels
    added = get_flops(twin, 640) - get_flops(stock, 640)
    assert added == pytest.approx(2 * multiply_adds / 1e9, rel=1e-6)
    assert added > 0.02  # thop alone (no rule) counts 0 for DySample
