"""Shared test setup: an isolated, offline Ultralytics environment and the expensive session fixtures.

What Ultralytics reaches the network for, and what this file does so the tests run quietly and fast without a network.
The settings below are environment variables, so the subprocesses that tests start inherit them. Read against
ultralytics 8.4.104 and 8.4.190.

- ``ultralytics.utils.ONLINE``: a DNS probe of one.one.one.one and dns.google at import. It gates the analytics
  events (the ``sync`` setting), the pip update check (``check_pip_update_available``, run by ``Model.train``), Hub
  and Platform calls, and the offline short-cut in ``safe_download``. ``YOLO_OFFLINE=1`` makes it False without
  probing.
- ``check_font("Arial.ttf")`` runs in every ``check_det_dataset`` (train, val) and in plotting. If the font is not in
  the config dir, it sends ``requests.head`` to GitHub with a 3 s timeout, ignoring ``YOLO_OFFLINE``. We copy
  matplotlib's DejaVuSans there under both names ultralytics asks for (Arial.ttf, Arial.Unicode.ttf).
- ``check_requirements`` runs ``pip install`` for a missing optional package (export formats). ``YOLO_AUTOINSTALL=0``
  turns that into a plain error.
- ``YOLO_CONFIG_DIR``: settings.json, the fonts and the DDP scratch files go to a temporary folder. The user's
  ~/.config/Ultralytics is never read or written. The settings there set ``sync=False`` and point datasets, weights
  and runs at the same temporary folder.
- The AMP check (``check_amp``) downloads yolo26n.pt, but only on CUDA; the tests run on CPU. Pretrained weights are
  never requested: models are built from YAMLs and checkpoints are made locally.
"""

from __future__ import annotations

import atexit
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_IMAGE_SIZE = 128  # image size of the tiny dataset and of the trained checkpoint
SUBPROCESS_TIMEOUT_S = 600

# ----------------------------------------------------------------- isolated, offline Ultralytics (before any import)
_ULTRALYTICS_HOME = Path(tempfile.mkdtemp(prefix="yolo-dysample-tests-"))
atexit.register(shutil.rmtree, _ULTRALYTICS_HOME, ignore_errors=True)
os.environ["YOLO_CONFIG_DIR"] = str(_ULTRALYTICS_HOME / "config")
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_AUTOINSTALL"] = "0"
os.environ.pop("YOLO_DYSAMPLE_AUTOLOAD", None)  # the tests that need it off set it per subprocess
os.environ.pop("ULTRALYTICS_SAFE_LOAD", None)
# DySample's CPU kernel is compiled once per test session into the session's own directory (never a stale build)
os.environ["YOLO_DYSAMPLE_CACHE_DIR"] = str(_ULTRALYTICS_HOME / "kernel-cache")
os.environ.pop("YOLO_DYSAMPLE_CPU_KERNEL", None)
# One intra-op thread, as ultralytics itself sets for its processes: on a small shared CI machine, torch's spinning
# thread pool otherwise burns 10x the CPU time for the same tiny models. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _provide_fonts(config_dir: Path) -> None:
    """Put a real TTF where check_font looks first, so it never tries to download Arial."""
    matplotlib = importlib.util.find_spec("matplotlib")
    if matplotlib is None or not matplotlib.submodule_search_locations:
        return  # ultralytics requires matplotlib; without it ultralytics fails on its own
    font = Path(next(iter(matplotlib.submodule_search_locations))) / "mpl-data" / "fonts" / "ttf" / "DejaVuSans.ttf"
    config_dir.mkdir(parents=True, exist_ok=True)
    for name in ("Arial.ttf", "Arial.Unicode.ttf"):
        shutil.copyfile(font, config_dir / name)


_provide_fonts(_ULTRALYTICS_HOME / "config" / "Ultralytics")  # ultralytics' USER_CONFIG_DIR under YOLO_CONFIG_DIR


@pytest.fixture(scope="session", autouse=True)
def offline_ultralytics_settings():
    """Ultralytics settings for the test session: no sync, datasets/weights/runs in the temporary home."""
    from ultralytics.utils import SETTINGS

    SETTINGS.update(
        sync=False,
        datasets_dir=str(_ULTRALYTICS_HOME / "datasets"),
        weights_dir=str(_ULTRALYTICS_HOME / "weights"),
        runs_dir=str(_ULTRALYTICS_HOME / "runs"),
    )
    return SETTINGS


# ------------------------------------------------------------------------------------------ the installed package
HOOK_FILES = ("_yolo_dysample_autoload.py", "yolo_dysample_autoload.pth")  # installed beside the package


def _shipped_files() -> set[str]:
    """The files of this checkout that a wheel installs: the package tree (code, kernel source, YAMLs) and the hook."""
    package = {
        path.relative_to(REPO_ROOT).as_posix()
        for path in (REPO_ROOT / "yolo_dysample").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    return package | set(HOOK_FILES)


def _is_editable_install_of_this_checkout(distribution: importlib.metadata.Distribution) -> bool:
    """True for ``pip install -e <this checkout>``: the package is this source tree, only the hook files are copies."""
    try:
        direct_url = json.loads(distribution.read_text("direct_url.json") or "{}")
    except json.JSONDecodeError:
        return False
    url = direct_url.get("url", "")
    editable = direct_url.get("dir_info", {}).get("editable", False)
    return editable and url.startswith("file://") and Path(url[len("file://") :]).resolve() == REPO_ROOT


@pytest.fixture(scope="session")
def installed_yolo_dysample() -> importlib.metadata.Distribution:
    """The yolo-dysample installed in this interpreter, checked to be exactly this checkout.

    Tests that start fresh processes rely on the installed ``.pth`` hook and package, not on this source tree; an
    outdated install would make them test old code. ``bash scripts/test.sh`` installs the checkout first.
    """
    reinstall = f"reinstall it: python -m pip install --no-deps {REPO_ROOT}  (scripts/test.sh does)"
    try:
        distribution = importlib.metadata.distribution("yolo-dysample")
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"yolo-dysample is not installed in {sys.prefix}; {reinstall}")
    installed = {
        str(file).replace(os.sep, "/")
        for file in distribution.files or []
        if str(file).replace(os.sep, "/").startswith(("yolo_dysample/", *HOOK_FILES)) and "__pycache__" not in str(file)
    }
    shipped = set(HOOK_FILES) if _is_editable_install_of_this_checkout(distribution) else _shipped_files()
    assert installed == shipped, (
        f"installed files differ from this checkout: {sorted(installed ^ shipped)}; {reinstall}"
    )
    for name in sorted(installed):
        on_disk = Path(distribution.locate_file(name)).read_bytes()
        assert on_disk == (REPO_ROOT / name).read_bytes(), f"installed {name} is outdated; {reinstall}"
    return distribution


def _clean_env(extra: dict[str, str] | None) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTEST_ADDOPTS")}
    env.update(extra or {})
    return env


def _checked(result: subprocess.CompletedProcess, check: bool) -> subprocess.CompletedProcess:
    if check and result.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, result.args))} exited with {result.returncode}\n"
            f"--- stdout (tail)\n{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-4000:]}"
        )
    return result


@pytest.fixture(scope="session")
def run_python(installed_yolo_dysample):
    """Run ``python -c script *args`` in a fresh interpreter with the installed package (no PYTHONPATH).

    Returns a function ``(script, *args, cwd, env=None, check=True) -> CompletedProcess`` (text output).
    """

    def run(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True):
        command = [sys.executable, "-c", script, *map(str, args)]
        result = subprocess.run(
            command, cwd=cwd, env=_clean_env(env), capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S
        )
        return _checked(result, check)

    return run


@pytest.fixture(scope="session")
def run_yolo(installed_yolo_dysample):
    """Run the stock ``yolo`` command (``yolo *args``) in a fresh process; nothing is imported by hand.

    Returns a function ``(*args, cwd, env=None, check=True) -> CompletedProcess`` (text output).
    """
    script = shutil.which("yolo", path=str(Path(sys.executable).parent))
    prefix = [script] if script else [sys.executable, "-c", "from ultralytics.cfg import entrypoint; entrypoint()"]

    def run(*args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True):
        result = subprocess.run(
            [*prefix, *map(str, args)],
            cwd=cwd,
            env=_clean_env(env),
            capture_output=True,
            text=True,
            timeout=SUBPROCESS_TIMEOUT_S,
        )
        return _checked(result, check)

    return run


# --------------------------------------------------------------------------------------- data and a trained model
def _exporter_turns_dynamo_off() -> bool:
    """Whether this ultralytics passes ``dynamo=False`` to ``torch.onnx.export`` (older releases do not)."""
    import ultralytics

    root = Path(ultralytics.__file__).parent
    sources = [*(root / "engine").glob("export*.py"), *(root / "utils" / "export").glob("*.py")]
    return any("dynamo" in path.read_text(encoding="utf-8") for path in sources)


@pytest.fixture(scope="session")
def onnx_export_works() -> None:
    """Skip where this ultralytics cannot export ONNX with this torch at all (stock models neither)."""
    if importlib.util.find_spec("onnxscript") is None and not _exporter_turns_dynamo_off():
        pytest.skip("this ultralytics calls torch.onnx.export without dynamo=False: this torch then needs onnxscript")


@pytest.fixture(scope="session")
def tiny_shapes_dataset(tmp_path_factory) -> Path:
    """Data YAML of a tiny dysample-shapes dataset: 16 train and 8 val images of TINY_IMAGE_SIZE px, 3 classes."""
    from yolo_dysample.datasets import generate_shapes_dataset, write_dataset_yaml

    work = tmp_path_factory.mktemp("tiny-shapes")
    root = generate_shapes_dataset(work / "tiny-shapes", train_images=16, val_images=8, image_size=TINY_IMAGE_SIZE)
    return write_dataset_yaml(work / "tiny-shapes.yaml", root)


@pytest.fixture(scope="session")
def trained_checkpoint(run_yolo, tiny_shapes_dataset, tmp_path_factory) -> Path:
    """best.pt of ``yolo train model=yolov8n-dysample.yaml`` for 1 epoch on the tiny dataset (the run's results.csv
    is at ``best.pt.parent.parent``)."""
    work = tmp_path_factory.mktemp("trained")
    run_yolo(
        "train",
        "model=yolov8n-dysample.yaml",
        f"data={tiny_shapes_dataset}",
        "epochs=1",
        f"imgsz={TINY_IMAGE_SIZE}",
        "batch=8",
        "workers=0",
        "device=cpu",
        "plots=False",
        f"project={work / 'runs'}",
        "name=train",
        cwd=work,
    )
    best = work / "runs" / "train" / "weights" / "best.pt"
    assert best.is_file(), f"yolo train wrote no {best}"
    return best
