"""Measurement helpers shared by ``bench_upsamplers`` and ``bench_models``.

Timing: :mod:`yolo_dysample.tools.timing` (candidates in interleaved rounds, so load from other
processes hits all candidates alike; a latency is the median over rounds, a ratio the median of the
per-round ratios).

Allocator: on Linux the timing process runs with glibc malloc told to keep freed memory
(``MALLOC_MMAP_MAX_=0``, ``MALLOC_TRIM_THRESHOLD_`` 16 GiB), as a caching allocator (PyTorch's CUDA
allocator, jemalloc, tcmalloc) would. With glibc's defaults every block above 32 MiB is a fresh
``mmap`` that is page-faulted in on first touch: on the development VM that costs more than a
bilinear upsampling of the paper's 1 x 256 x 120 x 120 map itself, the same for every upsampler,
and it swamps what the benchmark is after. ``--system-allocator`` measures with the defaults.

Peak memory on CPU is the peak resident set size (``VmHWM``) above the resident size just before the
measured call, read in a child process started with ``MALLOC_MMAP_THRESHOLD_`` fixed at 64 KiB so
that glibc returns every large tensor to the OS when it is freed (otherwise freed blocks stay in the
heap and later peaks read low). On CUDA it is ``torch.cuda.max_memory_allocated`` above the
allocation before the call.

Kernel: :func:`without_cpu_kernel` runs a call under ``yolo_dysample.cpu_sampling.kernel_disabled``
(``YOLO_DYSAMPLE_CPU_KERNEL=0``), so DySample samples with ``F.grid_sample`` instead of its compiled CPU
kernel; the benchmarks time both paths side by side.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable

import torch

from yolo_dysample.cpu_sampling import kernel_disabled
from yolo_dysample.tools.timing import interleaved_samples, median_ratio

__all__ = [
    "MEMORY_CHILD_ENVIRONMENT",
    "format_ratio",
    "interleaved_latency",
    "load_average",
    "machine_summary",
    "mebibytes",
    "median_ms",
    "median_ratio",
    "peak_memory_bytes",
    "run_memory_child",
    "use_reusing_allocator",
    "without_cpu_kernel",
]

MEMORY_CHILD_ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": "65536"}  # large allocations: mmap'd, unmapped on free
TIMING_ALLOCATOR_ENVIRONMENT = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(16 << 30)}  # keep freed memory
MEBIBYTE = 1 << 20


def interleaved_latency(
    candidates: dict[str, Callable[[], object]],
    device: torch.device,
    rounds: int = 7,
    min_block_seconds: float = 0.1,
    warmup: int = 2,
) -> dict[str, list[float]]:
    """Seconds per call of every candidate, one sample per round (:func:`timing.interleaved_samples` on ``device``)."""
    synchronize = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return interleaved_samples(candidates, rounds, min_block_seconds, warmup, synchronize)


def without_cpu_kernel(function: Callable[[], object]) -> Callable[[], object]:
    """``function`` run under :func:`kernel_disabled`: the same call on DySample's ``grid_sample`` path."""

    def call() -> object:
        with kernel_disabled():
            return function()

    return call


def format_ratio(ratio: float) -> str:
    """``1.23x``."""
    return f"{ratio:.2f}x"


def _resident_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak_resident() -> None:
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # 5: reset the peak resident set size (VmHWM) to the current size


def peak_memory_bytes(function: Callable[[], object], device: torch.device) -> int:
    """Peak memory that ``function()`` adds on top of what is allocated before it runs.

    Call once before measuring (lazy initialisation); on CPU only meaningful in a process started
    with :data:`MEMORY_CHILD_ENVIRONMENT`.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    before = _resident_bytes("VmRSS:")
    _reset_peak_resident()
    function()
    return max(0, _resident_bytes("VmHWM:") - before)


def use_reusing_allocator() -> bool:
    """Re-run this process with :data:`TIMING_ALLOCATOR_ENVIRONMENT` (Linux); True if it is in effect.

    Call first thing in ``main``: ``os.execve`` replaces the process, so nothing before it survives.
    """
    if not sys.platform.startswith("linux"):
        return False
    if all(os.environ.get(key) == value for key, value in TIMING_ALLOCATOR_ENVIRONMENT.items()):
        return True
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **TIMING_ALLOCATOR_ENVIRONMENT})
    return True  # not reached


def run_memory_child(module: str, arguments: list[str], timeout: float = 900) -> dict:
    """Run ``python -m module --memory-child ...`` in a fresh process and return the JSON it prints last."""
    environment = {key: value for key, value in os.environ.items() if key not in TIMING_ALLOCATOR_ENVIRONMENT}
    environment.update(MEMORY_CHILD_ENVIRONMENT)
    completed = subprocess.run(
        [sys.executable, "-m", module, "--memory-child", *arguments],
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if completed.returncode:
        raise RuntimeError(f"memory child failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_total() -> str:
    try:
        with open("/proc/meminfo") as meminfo:
            kibibytes = int(meminfo.readline().split()[1])
        return f"{kibibytes / (1 << 20):.0f} GiB"
    except (OSError, ValueError, IndexError):
        return "unknown"


def machine_summary(device: torch.device, threads: int) -> dict[str, str]:
    """The machine and the versions that produced a measurement."""
    summary = {
        "cpu": f"{_cpu_model()} ({os.cpu_count()} logical cores, {_memory_total()} RAM)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch threads": str(threads),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for package in ("ultralytics", "onnxruntime", "onnx", "numpy"):
        try:
            summary[package] = __import__(package).__version__
        except ImportError:
            summary[package] = "not installed"
    if hasattr(os, "getloadavg"):
        summary["load average at start (1/5/15 min)"] = " / ".join(f"{value:.2f}" for value in os.getloadavg())
    return summary


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, ``a / b / c``."""
    return " / ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def median_ms(samples: list[float]) -> float:
    """Median of samples in seconds, in milliseconds."""
    return 1e3 * statistics.median(samples)


def mebibytes(value: int) -> float:
    """Bytes in MiB."""
    return value / MEBIBYTE
