"""Scratch environments see the environment that creates them, whichever it is, and their own packages win."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from yolo_dysample.tools.scratch_env import create_scratch_env, interpreter

PROBE = """
import importlib.util, json, sys
import torch, yolo_dysample
print(json.dumps({
    "torch": torch.__file__,
    "yolo_dysample": yolo_dysample.__file__,
    "hook": any(getattr(finder, "yolo_dysample_hook", False) for finder in sys.meta_path),
    "marker": importlib.util.find_spec("scratch_marker") and __import__("scratch_marker").WHERE,
    "marker_pth_ran": "scratch_marker_pth" in sys.modules,
    "prefix": sys.prefix,
}))
"""


def probe(python: Path) -> dict:
    env = {"PATH": "/usr/bin:/bin", "YOLO_DYSAMPLE_AUTOLOAD": "1"}  # nothing of the caller's PYTHONPATH
    finished = subprocess.run([str(python), "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return json.loads(finished.stdout.strip().splitlines()[-1])


def site_packages(python: Path) -> Path:
    command = [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
    return Path(subprocess.run(command, check=True, capture_output=True, text=True).stdout.strip())


def add_marker(python: Path, where: str) -> None:
    """A module ``scratch_marker`` and a ``.pth`` hook in the site-packages of ``python``'s environment."""
    packages = site_packages(python)
    (packages / "scratch_marker.py").write_text(f"WHERE = {where!r}\n")
    (packages / "scratch_marker_pth.py").write_text("")
    (packages / "scratch_marker.pth").write_text("import scratch_marker_pth\n")


@pytest.fixture(scope="module")
def venv_python(tmp_path_factory) -> Path:
    """A venv (made from the test interpreter, seeing its packages) with a module and a .pth hook of its own."""
    python = create_scratch_env(tmp_path_factory.mktemp("parent") / "venv")
    add_marker(python, "parent venv")
    return python


def test_scratch_env_sees_the_test_interpreters_packages_and_hook(tmp_path):
    import torch

    import yolo_dysample

    found = probe(create_scratch_env(tmp_path / "scratch"))
    assert found["prefix"] == str(tmp_path / "scratch")
    assert Path(found["torch"]) == Path(torch.__file__)
    assert Path(found["yolo_dysample"]) == Path(yolo_dysample.__file__)
    assert found["hook"], "the parent's yolo_dysample_autoload.pth did not run in the scratch environment"


def test_scratch_env_made_from_a_venv_sees_the_venvs_packages_and_runs_its_pth_files(venv_python, tmp_path):
    # `python -m venv --system-site-packages` run from a venv layers over the base interpreter and finds no marker
    command = [str(venv_python), "-m", "yolo_dysample.tools.scratch_env", str(tmp_path / "scratch")]
    created = subprocess.run(command, check=True, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    scratch_python = Path(created.stdout.strip().splitlines()[-1])
    assert scratch_python == interpreter(tmp_path / "scratch")
    found = probe(scratch_python)
    assert found["marker"] == "parent venv"
    assert found["marker_pth_ran"]
    assert found["hook"], "the .pth hook of the venv's own parent did not run"
    assert found["prefix"] == str(tmp_path / "scratch")


def make_scratch_with(python: Path, directory: Path) -> Path:
    """``python -m yolo_dysample.tools.scratch_env directory`` run by ``python``; the new interpreter."""
    command = [str(python), "-m", "yolo_dysample.tools.scratch_env", str(directory)]
    created = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    return Path(created.stdout.strip().splitlines()[-1])


def test_scratch_env_of_a_scratch_env_still_runs_the_grandparents_pth_files(venv_python, tmp_path):
    grandchild = make_scratch_with(make_scratch_with(venv_python, tmp_path / "child"), tmp_path / "grandchild")
    found = probe(grandchild)
    assert found["marker"] == "parent venv"
    assert found["marker_pth_ran"]
    assert found["hook"]


def test_packages_installed_in_the_scratch_env_win_over_the_parents(venv_python, tmp_path):
    scratch_python = create_scratch_env(tmp_path / "scratch")
    assert probe(scratch_python)["marker"] is None  # made from the test interpreter, which has no marker
    nested = subprocess.run(
        [str(venv_python), "-m", "yolo_dysample.tools.scratch_env", str(tmp_path / "nested")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    nested_python = Path(nested.stdout.strip().splitlines()[-1])
    (site_packages(nested_python) / "scratch_marker.py").write_text("WHERE = 'scratch'\n")
    assert probe(nested_python)["marker"] == "scratch"
    assert probe(venv_python)["marker"] == "parent venv"  # the parent is untouched


def write_wheel(directory: Path, version: str) -> Path:
    """A pure-Python wheel of distribution ``scratch-marker`` whose module says which ``version`` it is."""
    import zipfile

    info = f"scratch_marker-{version}.dist-info"
    files = {
        "scratch_marker.py": f"WHERE = 'wheel {version}'\n",
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: scratch-marker\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    wheel = directory / f"scratch_marker-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, text in files.items():
            archive.writestr(name, text)
    return wheel


def pip_install(python: Path, wheel: Path) -> None:
    command = [str(python), "-m", "pip", "install", "-q", "--no-index", "--disable-pip-version-check", str(wheel)]
    subprocess.run(command, check=True, timeout=300)


def test_pip_in_a_scratch_env_upgrades_there_and_leaves_the_parent_alone(tmp_path):
    parent = create_scratch_env(tmp_path / "parent")
    pip_install(parent, write_wheel(tmp_path, "1.0"))
    scratch = subprocess.run(
        [str(parent), "-m", "yolo_dysample.tools.scratch_env", str(tmp_path / "scratch")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout.strip()
    assert probe(Path(scratch))["marker"] == "wheel 1.0"  # the parent's copy, seen from the scratch env
    pip_install(Path(scratch), write_wheel(tmp_path, "2.0"))
    assert probe(Path(scratch))["marker"] == "wheel 2.0"
    assert probe(parent)["marker"] == "wheel 1.0"  # pip did not uninstall the parent's copy


def test_scratch_env_command_prints_only_the_interpreter(tmp_path):
    finished = subprocess.run(
        [sys.executable, "-m", "yolo_dysample.tools.scratch_env", str(tmp_path / "scratch")],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.stdout.strip() == str(interpreter(tmp_path / "scratch"))
