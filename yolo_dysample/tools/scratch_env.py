"""Scratch virtual environments layered over the running interpreter's environment.

A scratch environment sees every package of the environment that creates it (system Python, a venv, conda): torch,
ultralytics, yolo-dysample itself, editable installs and their ``.pth`` hooks. Packages installed into the scratch
environment win, so the tests can try another ultralytics release or a toolchain that conflicts with the test
environment (TensorFlow pins an older numpy) without touching it. Deleting the folder undoes everything.

``python -m venv --system-site-packages`` cannot do this from inside a venv: it layers over the *base* interpreter's
site-packages, not the venv's, so the scratch environment would have neither torch nor ultralytics. Here the scratch
environment is a plain venv whose site-packages holds a small module, imported by a ``.pth`` line at start-up, that
appends the parent's site directories with :func:`site.addsitedir`. That call also runs the parent's ``.pth`` files
(yolo-dysample's autoload hook, editable installs), which a bare path entry would not. The parent's directories come
after the scratch environment's own site-packages, so its packages take precedence; pip never uninstalls the parent's
copies (they lie outside the scratch environment's prefix).

Command line: ``python -m yolo_dysample.tools.scratch_env DIR [REQUIREMENT ...]`` creates the environment, installs
the requirements (with pip's usual options, see ``--help``) and prints its interpreter's path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import site
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PARENT_MODULE", "create_scratch_env", "install", "interpreter", "parent_site_dirs", "parent_path_entries"]

PARENT_MODULE = "_scratch_env_parent"  # prefix of the module the scratch environment's .pth line imports
_PIP_OPTIONS = ("--disable-pip-version-check", "--no-input")


def parent_site_dirs() -> list[str]:
    """Site directories of the running interpreter, in its own order: site-packages, purelib/platlib, user site."""
    candidates = [*site.getsitepackages()]
    candidates += [sysconfig.get_path("purelib"), sysconfig.get_path("platlib")]
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    return _existing_unique(candidates)


def parent_path_entries() -> list[str]:
    """Entries of the running interpreter's ``sys.path`` other than its standard library and the script's folder.

    These include what ``.pth`` files and ``PYTHONPATH`` added; the scratch environment gets them after its own
    site-packages (its standard library is the same base interpreter's).
    """
    stdlib = {os.path.normcase(os.path.realpath(p)) for p in _stdlib_dirs()}
    entries = sys.path if getattr(sys.flags, "safe_path", False) else sys.path[1:]  # [0]: script folder or cwd
    return [entry for entry in _existing_unique(entries) if os.path.normcase(os.path.realpath(entry)) not in stdlib]


def create_scratch_env(directory: str | os.PathLike, with_pip: bool | None = None) -> Path:
    """Create a scratch venv in ``directory`` that sees the running interpreter's packages; return its interpreter.

    Args:
        directory: Where the venv goes (created; must not hold another environment).
        with_pip: Install pip into the venv (``ensurepip``, a few seconds). ``None`` (default) does so only if the
            running interpreter has no pip the scratch environment could use from the parent's site-packages.

    Returns:
        The scratch environment's ``python``.
    """
    directory = Path(directory).absolute()
    if with_pip is None:
        with_pip = importlib.util.find_spec("pip") is None
    venv.EnvBuilder(with_pip=with_pip, symlinks=os.name != "nt", clear=False).create(directory)
    python = interpreter(directory)
    purelib = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    _write_parent_hook(Path(purelib), parent_site_dirs(), parent_path_entries())
    return python


def interpreter(directory: str | os.PathLike) -> Path:
    """Return the ``python`` of the venv in ``directory``."""
    return Path(directory) / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def install(python: str | os.PathLike, requirements: Sequence[str], *options: str, timeout: float = 1800) -> None:
    """``pip install`` ``requirements`` into the environment of ``python`` (quiet; extra pip ``options`` first)."""
    if requirements:
        command = [str(python), "-m", "pip", "install", "--quiet", *_PIP_OPTIONS, *options, *requirements]
        subprocess.run(command, check=True, timeout=timeout)


def _write_parent_hook(purelib: Path, site_dirs: list[str], path_entries: list[str]) -> None:
    """Write the module that appends the parent's directories, and the ``.pth`` line that imports it at start-up."""
    purelib.mkdir(parents=True, exist_ok=True)
    # One name per environment: a scratch environment made from another one imports its parent's module as well,
    # which appends the grandparent's directories and runs their .pth files, to any depth.
    name = f"{PARENT_MODULE}_{hashlib.sha256(str(purelib).encode()).hexdigest()[:12]}"
    module = f'''"""Appends the parent environment's packages to this scratch environment (written by scratch_env)."""

import os
import site
import sys

SITE_DIRS = {site_dirs!r}
PATH_ENTRIES = {path_entries!r}

for _directory in SITE_DIRS:
    site.addsitedir(_directory)  # appends it and runs its .pth files
_known = {{os.path.normcase(entry) for entry in sys.path}}
sys.path.extend(entry for entry in PATH_ENTRIES if os.path.normcase(entry) not in _known)
'''
    (purelib / f"{name}.py").write_text(module, encoding="utf-8")
    (purelib / f"{name}.pth").write_text(f"import {name}\n", encoding="utf-8")


def _stdlib_dirs() -> list[str]:
    paths = [sysconfig.get_path(name) for name in ("stdlib", "platstdlib")]
    paths += [entry for entry in sys.path if entry.endswith((".zip", "lib-dynload"))]
    return [path for path in paths if path]


def _existing_unique(paths) -> list[str]:
    seen, kept = set(), []
    for path in paths:
        if not path or not os.path.isdir(path):
            continue
        key = os.path.normcase(os.path.realpath(path))
        if key not in seen:
            seen.add(key)
            kept.append(os.path.abspath(path))
    return kept


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point; see the module docstring."""
    parser = argparse.ArgumentParser(
        prog="python -m yolo_dysample.tools.scratch_env",
        description="Create a venv that sees this interpreter's packages; print its python.",
    )
    parser.add_argument("directory", help="where the scratch venv goes")
    parser.add_argument("requirements", nargs="*", help="pip requirements to install into it")
    parser.add_argument("--no-deps", action="store_true", help="pass --no-deps to pip")
    parser.add_argument("--with-pip", action="store_true", help="install pip into the venv (default: use the parent's)")
    args = parser.parse_intermixed_args(argv)  # options may follow the requirements
    python = create_scratch_env(args.directory, with_pip=True if args.with_pip else None)
    install(python, args.requirements, *(["--no-deps"] if args.no_deps else []))
    print(python)
    return 0


if __name__ == "__main__":
    sys.exit(main())
