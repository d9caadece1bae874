"""Plan the runs of a comparison and train each in its own subprocess, safely under interruptions and faults.

What holds, and how (the design follows ultralytics' trainer and pip's cache lock where they have one):

- **One comparison per directory.** ``compare()`` holds an exclusive ``flock`` on ``<dir>/.compare.lock`` for its
  whole life; a second ``compare`` with the same ``--name`` is refused at once with the holder's pid (refusing, as
  git does with ``index.lock``, rather than waiting behind a training that may take hours).
- **One writer per run folder.** Each run's lock (``<dir>/.locks/<run>.lock``) is taken by the parent and passed to
  the training process, so it stays held as long as either lives. An unfinished run is restarted only once its lock
  is free, and its folder is emptied first: ``results.csv`` never holds rows of two trainings.
- **The training dies with its parent.** On Linux the child asks the kernel for SIGKILL when its parent exits
  (``prctl(PR_SET_PDEATHSIG)``); everywhere, a thread in the child watches the parent's pid and exits when it is gone.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from yolo_dysample.compare.settings import STOCK, CompareError, CompareSettings, RunFailedError

SETTINGS_FILE = "compare_settings.json"
RUN_REQUEST_FILE = "compare_request.json"
RUN_DONE_FILE = "compare_run.json"  # written last by a finished run: the resume marker
RUN_LOG_FILE = "train.log"
PROGRESS_LOG_FILE = "progress.log"
LOCK_FILE = ".compare.lock"
RUN_LOCK_DIRECTORY = ".locks"
MODELS_DIRECTORY = "models"  # derived model YAMLs (the bilinear control)
PRETRAIN_RUN = "pretrain"
ORPHAN_WAIT_SECONDS = 30.0  # how long a restart waits for a previous training of the run to exit
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass
class PlannedRun:
    """One training of a comparison: a variant and a seed, and where it trains."""

    variant: str
    seed: int
    model: str  # model YAML name or path, as reported
    directory: Path
    settings: dict  # identity of the run: a finished run with equal settings is reused
    model_file: str | None = None  # what the training loads when it is not ``model`` (a derived YAML)

    @property
    def name(self) -> str:
        """The run folder's name, ``<variant>-seed<k>``."""
        return self.directory.name


# --------------------------------------------------------------------------------------------------- locks
def _try_lock(handle: IO) -> bool:
    """Take an exclusive lock on the open file ``handle`` without waiting; whether it was taken."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _open_lock_file(path: Path) -> IO:
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a+", encoding="utf-8")  # noqa: SIM115  the caller closes it: closing releases the lock


@contextmanager
def comparison_lock(directory: Path) -> Iterator[None]:
    """Hold the comparison's lock; raise CompareError naming the holder when another process has it."""
    handle = _open_lock_file(directory / LOCK_FILE)
    try:
        if not _try_lock(handle):
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise CompareError(
                f"{directory} is in use by another compare process (pid {holder}); wait for it to finish "
                "or pass another --name"
            )
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()


def _take_run_lock(run: PlannedRun, wait_seconds: float) -> IO:
    """Lock ``run``'s folder for a new training, waiting up to ``wait_seconds`` for an earlier one to exit."""
    handle = _open_lock_file(run.directory.parent / RUN_LOCK_DIRECTORY / f"{run.name}.lock")
    deadline = time.monotonic() + wait_seconds
    while not _try_lock(handle):
        if time.monotonic() >= deadline:
            handle.close()
            raise RunFailedError(
                f"run {run.name}: another process is still training into {run.directory}; stop it and run the "
                "comparison again"
            )
        time.sleep(0.5)
    return handle


# --------------------------------------------------------------------------------------------------- the directory
def read_json(path: Path) -> Any:
    """The JSON in ``path``; ``None`` if it is missing, empty, cut short or not JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _holds_anything(directory: Path) -> bool:
    """Whether ``directory`` holds anything but the lock files."""
    return any(path.name not in (LOCK_FILE, RUN_LOCK_DIRECTORY) for path in directory.iterdir())


def choose_directory(project: Path, name: str | None, shared: dict, base_name: str) -> tuple[Path, bool]:
    """Pick ``project/name``; with no name, the first ``exp``, ``exp2``, ... holding these settings or else free.

    Returns:
        (tuple): The directory and whether it already held a comparison with these settings.

    Raises:
        CompareError: An explicitly named directory holds a comparison with other settings, or an unreadable one.

    """
    candidates = [name] if name else [base_name] + [f"{base_name}{index}" for index in range(2, 10_000)]
    for candidate in candidates:
        directory = project / candidate
        settings_file = directory / SETTINGS_FILE
        if not directory.exists() or (directory.is_dir() and not _holds_anything(directory)):
            return directory, False
        if settings_file.is_file():
            stored = read_json(settings_file)
            if stored == shared:
                return directory, True
            if name and not isinstance(stored, dict):
                raise CompareError(
                    f"{settings_file} is empty or not valid JSON; delete it to start this comparison afresh "
                    "(finished runs with equal settings are kept), or pass another --name"
                )
            if name:
                changed = sorted(key for key in {*stored, *shared} if stored.get(key) != shared.get(key))
                details = "; ".join(f"{key}: {stored.get(key)!r} -> {shared.get(key)!r}" for key in changed)
                raise CompareError(
                    f"{directory} holds a comparison with other settings ({details}); "
                    "pass another --name (or delete that directory) to start a new one"
                )
        elif name:
            raise CompareError(f"{directory} exists and is not a comparison directory; pass another --name")
    raise CompareError(f"no free comparison directory under {project}")


def write_derived_models(directory: Path, settings: CompareSettings) -> dict[str, str]:
    """Write the derived model YAMLs (the bilinear control) into the comparison; variant -> file."""
    import yaml

    files = {}
    for variant, model_dict in settings.derived_yamls.items():
        path = directory / MODELS_DIRECTORY / Path(settings.variant_models[variant]).name
        path.parent.mkdir(parents=True, exist_ok=True)
        text = f"# {settings.model} with bilinear nn.Upsample (align_corners=False), derived by yolo-dysample compare\n"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(
            text + yaml.safe_dump(model_dict, sort_keys=False, default_flow_style=None), encoding="utf-8"
        )
        os.replace(temporary, path)
        files[variant] = str(path)
    return files


def plan_runs(directory: Path, settings: CompareSettings, model_files: Mapping[str, str]) -> list[PlannedRun]:
    """The runs, seed-major: an interrupted comparison still holds complete seeds."""
    planned = []
    for seed in settings.seeds:
        for variant in (STOCK, *settings.variants):
            model = settings.variant_models[variant]
            run_settings = {**settings.shared, "variant": variant, "seed": seed, "model": model}
            run_directory = directory / f"{variant}-seed{seed}"
            planned.append(PlannedRun(variant, seed, model, run_directory, run_settings, model_files.get(variant)))
    return planned


def plan_pretraining(directory: Path, settings: CompareSettings) -> PlannedRun:
    """The stock model's pretraining run of a fine-tuning comparison."""
    pretrain = settings.shared["pretrain"]
    run_settings = {"pretrain": pretrain, "model": settings.shared["model"], "task": settings.task}
    run_settings.update(imgsz=settings.imgsz, batch=settings.batch, variant=PRETRAIN_RUN, seed=pretrain["seed"])
    return PlannedRun(PRETRAIN_RUN, pretrain["seed"], settings.model, directory / PRETRAIN_RUN, run_settings)


def progress_logger(directory: Path, progress: Callable[[str], Any] | None) -> Callable[[str], None]:
    """A reporter that prints through ``progress`` and appends a timestamped line to ``progress.log``."""

    def report(message: str) -> None:
        if progress is not None:
            progress(message)
        with open(directory / PROGRESS_LOG_FILE, "a", encoding="utf-8") as log:
            log.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")

    return report


def finished_record(run: PlannedRun) -> dict | None:
    """The run's measurements if it finished with the same settings, else ``None``.

    A marker that is empty, cut short or not JSON counts as unfinished: the run trains again.

    Raises:
        CompareError: The run finished with other settings.

    """
    done_file = run.directory / RUN_DONE_FILE
    if not done_file.is_file():
        return None
    record = read_json(done_file)
    if not isinstance(record, dict) or "metrics" not in record:
        return None
    if record.get("settings") != run.settings:
        raise CompareError(
            f"{run.directory} was trained with other settings; pass another --name (or delete that run directory)"
        )
    return record


# --------------------------------------------------------------------------------------------------- one run
def _die_with_parent(parent_pid: int) -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process exits (Linux), else ``None``."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved before the fork
    except (OSError, AttributeError):
        return None

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl: nobody will send the signal
            os._exit(1)

    return preexec


def _clear_run_directory(directory: Path) -> None:
    """Move an unfinished run's folder aside and delete it, so the new training starts in an empty one."""
    if directory.exists():
        stale = directory.with_name(f".{directory.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
        os.replace(directory, stale)
        shutil.rmtree(stale, ignore_errors=True)
    directory.mkdir(parents=True)


def _child_command(request_file: Path) -> list[str]:
    code = (
        "import sys; from yolo_dysample.compare import run_single_training; sys.exit(run_single_training(sys.argv[1]))"
    )
    return [sys.executable, "-c", code, str(request_file)]


def _start_training(run: PlannedRun, request: dict, lock: IO, log: IO) -> subprocess.Popen:
    request_file = run.directory / RUN_REQUEST_FILE
    request_file.write_text(json.dumps(request, indent=2) + "\n")
    keep_lock = {"pass_fds": (lock.fileno(),)} if os.name == "posix" else {}  # the child holds the run lock too
    return subprocess.Popen(
        _child_command(request_file),
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        preexec_fn=_die_with_parent(os.getpid()),  # noqa: PLW1509  a prctl call only
        **keep_lock,
    )


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _follow(process: subprocess.Popen, results_csv: Path, on_epoch: Callable[[dict], None], poll: float) -> None:
    """Wait for ``process``, passing each new row of its results.csv to ``on_epoch``; stop it if interrupted."""
    reported = 0
    try:
        while True:
            try:
                process.wait(timeout=poll)
                finished = True
            except subprocess.TimeoutExpired:
                finished = False
            rows = read_results_csv(results_csv)
            for row in rows[reported:]:
                on_epoch(row)
            reported = max(reported, len(rows))
            if finished:
                return
    except BaseException:  # KeyboardInterrupt included: never leave a training process behind
        _stop(process)
        raise


def train_in_subprocess(
    run: PlannedRun,
    request: dict,
    on_epoch: Callable[[dict], None],
    poll_seconds: float = 2.0,
    orphan_wait_seconds: float = ORPHAN_WAIT_SECONDS,
) -> dict:
    """Train one run in a fresh Python process (``request`` as :func:`run_single_training` reads it).

    Returns:
        (dict): The run's record, as written to its ``compare_run.json``.

    Raises:
        RunFailedError: Its folder is still written by another process, or the training failed (log quoted).

    """
    lock = _take_run_lock(run, orphan_wait_seconds)
    try:
        _clear_run_directory(run.directory)
        log_file = run.directory / RUN_LOG_FILE
        request = {**request, "parent_pid": os.getpid()}
        with open(log_file, "w", encoding="utf-8") as log:
            process = _start_training(run, request, lock, log)
            _follow(process, run.directory / "results.csv", on_epoch, poll_seconds)
    finally:
        lock.close()  # the run lock is free once the child has exited too
    record = finished_record(run)
    if process.returncode != 0 or record is None:
        tail = "".join(last_lines(log_file, 25))
        raise RunFailedError(
            f"run {run.name} failed (exit code {process.returncode}); full log: {log_file}\n--- last lines ---\n{tail}"
        )
    return record


def last_lines(path: Path, count: int) -> list[str]:
    """The last ``count`` non-blank lines of a log (carriage-return progress bars split into lines)."""
    text = path.read_text(encoding="utf-8", errors="replace").replace("\r", "\n")
    return [line + "\n" for line in text.splitlines() if line.strip()][-count:]


def read_results_csv(path: Path) -> list[dict[str, float]]:
    """Rows of an ultralytics results.csv as floats (column names stripped); [] if missing or unreadable."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.DictReader(handle))
    except (OSError, csv.Error, UnicodeDecodeError):
        return []
    parsed = []
    for row in rows:
        try:
            parsed.append({key.strip(): float(value) for key, value in row.items() if key and value not in (None, "")})
        except (ValueError, TypeError):
            continue  # a row being written right now
    return parsed
