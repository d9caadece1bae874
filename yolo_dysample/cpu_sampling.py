"""DySample's sampling step on the CPU through a small compiled kernel: the fast eager path.

DySample (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023) samples its
input bilinearly, with border padding, at ``S = G + O``. ``F.grid_sample`` does that from a normalised
grid; on the CPU it is about as slow as bilinear interpolation itself, so DySample could not be
cheaper than the ``nn.Upsample`` it replaces. ``csrc/dysample_sampling.cpp`` does the same sampling
from the offsets directly (no grid), computes each point's neighbours and weights once for all
channels of its group and writes each output row in one pass.

This file holds

- :func:`load_kernel`: compiles that file on first use with the system's C++ compiler (about 1 s,
  plain C++17, no torch headers) into a cache directory and loads it with ``ctypes``; ``None`` when
  no compiler works or ``YOLO_DYSAMPLE_CPU_KERNEL=0``;
- :func:`kernel_applies`: whether a call may take this path (eager, CPU, float32 / float64, no
  tracing, scripting, compiling, export, fake or wrapped tensors, no dispatch modes): everything
  else, including every export, keeps ``F.grid_sample``;
- :func:`sample_with_kernel`: the sampling as an autograd function. Forward runs the kernel;
  backward rebuilds DySample's grid and runs PyTorch's own ``grid_sampler_2d_backward``, so gradients
  are the ones of the ``grid_sample`` path.

The result equals the ``grid_sample`` path to float rounding; point coordinates are computed in
double precision, so it is closer to the exact value (``tests/test_cpu_sampling.py``).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

__all__ = [
    "CACHE_ENVIRONMENT_VARIABLE",
    "KERNEL_ENVIRONMENT_VARIABLE",
    "KERNEL_SOURCE",
    "kernel_applies",
    "kernel_disabled",
    "load_kernel",
    "sample_with_kernel",
]

KERNEL_ENVIRONMENT_VARIABLE = "YOLO_DYSAMPLE_CPU_KERNEL"  # "0" / "false": always F.grid_sample
CACHE_ENVIRONMENT_VARIABLE = "YOLO_DYSAMPLE_CACHE_DIR"  # where the compiled kernel is kept
KERNEL_SOURCE = Path(__file__).with_name("csrc") / "dysample_sampling.cpp"
COMPILE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-pthread")
# Tried in this order until one compiles: -march=native (the kernel is built on the machine that runs it) and
# -fopenmp (its threads are then torch's own OpenMP threads, see the .cpp; without it, std::thread).
OPTIONAL_FLAGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
KERNEL_DTYPES = (torch.float32, torch.float64)
MAX_PLANE = 2**31 - 1  # the kernel indexes an input plane with int32
# Below this many output values a second thread costs more than it saves (thread start ~20-50 us).
VALUES_PER_THREAD = 1 << 18

_lock = threading.Lock()
_kernel: ctypes.CDLL | None = None
_kernel_loaded = False  # True once a load was attempted, successful or not


def _kernel_enabled() -> bool:
    return os.environ.get(KERNEL_ENVIRONMENT_VARIABLE, "1").strip().lower() not in ("0", "false", "no", "off")


@contextlib.contextmanager
def kernel_disabled() -> Iterator[None]:
    """Inside, ``YOLO_DYSAMPLE_CPU_KERNEL=0``: DySample samples with ``F.grid_sample`` (read on every call).

    Examples:
        >>> import torch
        >>> from yolo_dysample import DySample
        >>> with kernel_disabled():
        ...     out = DySample(16)(torch.randn(1, 16, 4, 4))  # the grid_sample path
    """
    previous = os.environ.get(KERNEL_ENVIRONMENT_VARIABLE)
    os.environ[KERNEL_ENVIRONMENT_VARIABLE] = "0"
    try:
        yield
    finally:
        if previous is None:
            del os.environ[KERNEL_ENVIRONMENT_VARIABLE]
        else:
            os.environ[KERNEL_ENVIRONMENT_VARIABLE] = previous


def _cache_directory() -> Path:
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    if configured:
        return Path(configured)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "yolo_dysample"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def _machine_fingerprint() -> str:
    """Describe what ``-march=native`` depends on: a library built on one CPU must not load on another."""
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            flags = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {flags}"


def _build(compiler: str, directory: Path) -> Path:
    """Compile the kernel into ``directory`` (once per source, compiler and CPU) and return the library."""
    source = KERNEL_SOURCE.read_bytes()
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join((source, version.encode(), _machine_fingerprint().encode()))).hexdigest()[:16]
    library = directory / f"dysample_sampling_{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    errors = []
    for extra in OPTIONAL_FLAGS:
        # a private name, then an atomic rename: processes compiling at once (DDP workers) never see half a file
        handle, partial = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(handle)
        command = [compiler, *COMPILE_FLAGS, *extra, str(KERNEL_SOURCE), "-o", partial]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
        if result.returncode == 0:
            os.replace(partial, library)
            return library
        os.unlink(partial)
        errors.append(f"{' '.join(command)}: {result.stderr.strip()[-500:]}")
    raise RuntimeError("; ".join(errors))


def load_kernel() -> ctypes.CDLL | None:
    """Return the compiled CPU kernel, built on first call; ``None`` if disabled or it cannot be built.

    Set ``YOLO_DYSAMPLE_CPU_KERNEL=0`` to never build or use it; ``YOLO_DYSAMPLE_CACHE_DIR`` to keep
    the library elsewhere than ``~/.cache/yolo_dysample``. Without a working C++ compiler DySample
    uses ``F.grid_sample`` (same results, slower); a compiler that fails gives one warning.
    """
    global _kernel, _kernel_loaded
    if _kernel_loaded or not _kernel_enabled():
        return _kernel if _kernel_enabled() else None
    with _lock:
        if _kernel_loaded:
            return _kernel
        compiler = _compiler() if os.name == "posix" else None  # Linux / macOS: a shared library via ctypes
        if compiler is not None:
            directories = [_cache_directory(), Path(tempfile.gettempdir()) / f"yolo_dysample-{os.getuid()}"]
            failures = []
            for directory in directories:  # an unwritable home falls back to the temporary directory
                try:
                    library = ctypes.CDLL(str(_build(compiler, directory)))
                    break
                except (OSError, RuntimeError, subprocess.SubprocessError) as error:
                    failures.append(f"{directory}: {error}")
            else:
                library = None
                warnings.warn(
                    "yolo_dysample: could not build the CPU sampling kernel, DySample uses F.grid_sample "
                    f"(same results, slower): {' | '.join(failures)}",
                    RuntimeWarning,
                    stacklevel=2,
                )
            if library is not None:
                library.dysample_sample.restype = ctypes.c_int
                library.dysample_sample.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 8
                _kernel = library
        _kernel_loaded = True
    return _kernel


def _plain_eager_tensor(tensor: torch.Tensor) -> bool:
    """Tell whether ``tensor`` is a real CPU tensor with memory behind it (not fake, meta, wrapped, a subclass)."""
    if type(tensor) is not torch.Tensor or tensor.device.type != "cpu":
        return False
    is_wrapped = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return not (is_wrapped is not None and is_wrapped(tensor))


def kernel_applies(x: torch.Tensor) -> bool:
    """Whether DySample may sample ``x`` with the compiled kernel instead of ``F.grid_sample``.

    Only plain eager CPU calls in float32 / float64: under ``torch.jit`` tracing or scripting,
    ONNX export, ``torch.compile`` / ``torch.export``, a ``TorchDispatchMode`` (e.g. FLOP counters) or
    functorch transforms DySample keeps ``F.grid_sample``, which every exporter knows.
    """
    # first: torch.compile's tracer folds is_compiling() to True and never reaches what it cannot trace
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        return False
    if x.dtype not in KERNEL_DTYPES or not _plain_eager_tensor(x) or x.shape[-2] * x.shape[-1] > MAX_PLANE:
        return False
    if _get_current_dispatch_mode_stack():  # FlopCounterMode, make_fx, ...: they must see the aten ops
        return False
    return load_kernel() is not None


def _run_kernel(x: torch.Tensor, offsets: torch.Tensor, initial: torch.Tensor, groups: int, scale: int) -> torch.Tensor:
    kernel = load_kernel()
    batch, channels, height, width = x.shape
    x = x.contiguous()
    offsets = offsets.to(x.dtype).contiguous()
    initial = initial.to(x.dtype).contiguous()
    output = torch.empty(batch, channels, scale * height, scale * width, dtype=x.dtype)
    threads = max(1, min(torch.get_num_threads(), output.numel() // VALUES_PER_THREAD))
    status = kernel.dysample_sample(
        x.data_ptr(), offsets.data_ptr(), initial.data_ptr(), output.data_ptr(), x.element_size(),
        batch, channels, height, width, groups, scale, threads,
    )  # fmt: skip
    if status:
        raise RuntimeError(f"yolo_dysample CPU sampling kernel failed with status {status}")
    return output


class _KernelSampling(torch.autograd.Function):
    """Forward: the compiled kernel. Backward: PyTorch's grid_sample backward on DySample's own grid."""

    @staticmethod
    def forward(ctx, x, offsets, upsampler):
        ctx.upsampler = upsampler
        ctx.save_for_backward(x, offsets)
        initial = upsampler.init_pos.reshape(2, -1).t()  # (axis, group, sub-pixel) -> (group, sub-pixel, axis)
        return _run_kernel(x, offsets, initial, upsampler.groups, upsampler.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        x, offsets = ctx.saved_tensors
        upsampler = ctx.upsampler
        needs_input, needs_offsets = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        batch, channels, height, width = x.shape
        groups = upsampler.groups
        with torch.enable_grad():
            offsets = offsets.detach().requires_grad_(needs_offsets)
            grid = upsampler._grouped_sampling_grid(x, offsets)
        grouped_gradient = grad_output.reshape(batch * groups, channels // groups, *grad_output.shape[2:])
        grad_input, grad_grid = torch.ops.aten.grid_sampler_2d_backward(
            grouped_gradient,
            x.reshape(batch * groups, channels // groups, height, width),
            grid.detach(),
            0,  # interpolation: bilinear
            1,  # padding: border
            False,  # align_corners
            [needs_input, needs_offsets],
        )
        grad_offsets = torch.autograd.grad(grid, offsets, grad_grid)[0] if needs_offsets else None
        grad_x = grad_input.reshape(batch, channels, height, width) if needs_input else None
        return grad_x, grad_offsets, None


def sample_with_kernel(upsampler: torch.nn.Module, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """DySample's output for ``x`` at ``offsets``, sampled by the compiled kernel.

    Args:
        upsampler (DySample): The layer (its ``groups``, ``scale``, ``init_pos`` and grid builder).
        x (torch.Tensor): Input, ``(B, C, H, W)``, float32 or float64 on the CPU.
        offsets (torch.Tensor): O in input pixels, ``(B, 2 * groups * scale**2, H, W)``, channels
            ordered ``(group, sub-pixel, axis)`` (``DySample._grouped_offsets``).

    Returns:
        (torch.Tensor): ``(B, C, scale * H, scale * W)``, differentiable in ``x`` and ``offsets``.
    """
    return _KernelSampling.apply(x, offsets, upsampler)
