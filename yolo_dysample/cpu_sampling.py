"""DySample's sampling step on the CPU through a small compiled kernel: the fast eager path.

DySample (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023) samples its input
bilinearly, with border padding, at ``S = G + O``. ``csrc/dysample_sampling.cpp`` does that from the offsets
directly (no grid), computes each point's neighbours and weights once for all channels of its group and, for
float inputs with many channels per group, reads them from a channels-last copy with vector loads instead of
gathers (the .cpp says why). The result equals ``F.grid_sample`` on :func:`sampling.sampling_grid` to float
rounding, including its border arithmetic and the NaN rule (a NaN coordinate reads as ``-inf``); gradients are
``grid_sample``'s own (backward rebuilds the grid), double backward included.

The compiled library runs inside the process, so where it is kept and what is loaded follows the rules of the
tools that load code from a user cache: pip's cache (used only when the current user owns it, otherwise switched
off with a warning), OpenSSH's ``StrictModes`` for the path (every directory from ``/`` down owned by the user
or root and not writable by others unless sticky, like ``/tmp``) and PyTorch's ``cpp_extension`` / Triton caches
for the build itself (a private temporary name in the same directory, a lock, then ``os.replace``). In detail:

- the cache is ``YOLO_DYSAMPLE_CACHE_DIR`` (absolute paths only), else ``$XDG_CACHE_HOME/yolo_dysample`` or
  ``~/.cache/yolo_dysample``; directories we create are 0700;
- a library is loaded only from a directory owned by the current user that group and others cannot write,
  below a trusted path as above, and only if it is a regular file owned by the user, not writable by others,
  whose size and SHA-256 match the manifest written after its build, and which exports the expected symbols
  and interface version. Anything else is rebuilt (a truncated file is never mapped);
- if that cache cannot be used (missing, read-only, full or ``noexec`` home, ``HOME=/``, a relative or
  untrusted ``YOLO_DYSAMPLE_CACHE_DIR``), the kernel is built in a fresh ``tempfile.mkdtemp`` directory that
  belongs to this process alone and is removed at exit: never a fixed shared name;
- a build that fails leaves a marker keyed by the build inputs, so it is reported once and not retried until
  the source, the compiler or the machine changes. Without any C++ compiler DySample silently uses
  ``F.grid_sample``; every other fallback to it warns once per process.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

from _yolo_dysample_autoload import env_flag_off
from yolo_dysample import sampling

__all__ = [
    "CACHE_ENVIRONMENT_VARIABLE",
    "KERNEL_ENVIRONMENT_VARIABLE",
    "KERNEL_SOURCE",
    "kernel_applies",
    "kernel_build_info",
    "kernel_disabled",
    "load_kernel",
    "sample_with_kernel",
]

KERNEL_ENVIRONMENT_VARIABLE = "YOLO_DYSAMPLE_CPU_KERNEL"  # "0" / "false" / "no" / "off": always F.grid_sample
CACHE_ENVIRONMENT_VARIABLE = "YOLO_DYSAMPLE_CACHE_DIR"  # where the compiled kernel is kept (absolute path)
KERNEL_SOURCE = Path(__file__).with_name("csrc") / "dysample_sampling.cpp"
ABI_VERSION = 3  # dysample_abi_version() of the library this file can call
LIBRARY_STEM = "dysample_sampling"
COMPILE_FLAGS = ("-std=c++17", "-O3", "-fPIC", "-shared", "-pthread")
# Tried in this order until one compiles: -march=native (the kernel is built on the machine that runs it) and
# -fopenmp (its threads are then torch's own OpenMP threads, see the .cpp; without it, std::thread).
OPTIONAL_FLAGS = (("-march=native", "-fopenmp"), ("-fopenmp",), ("-march=native",), ())
BUILD_FEATURES = ("openmp", "sse4_2", "avx", "avx2", "fma", "avx512f", "neon")  # bits of dysample_build_features()
KERNEL_DTYPES = (torch.float32, torch.float64)
MAX_PLANE = 2**31 - 1  # the kernel indexes an input plane with int32
# Below this many output values a second thread costs more than it saves (thread start ~20-50 us).
VALUES_PER_THREAD = 1 << 18
# From this many channels per group float inputs are sampled from a channels-last copy (where the library has
# AVX2): four contiguous vector loads per point instead of four gathers per value; same values.
CHANNELS_LAST_MIN_CHANNELS = 8
STALE_PARTIAL_SECONDS = 600  # a partial build this old was left by a killed process
COMPILE_TIMEOUT_SECONDS = 300

_lock = threading.Lock()
_kernel: ctypes.CDLL | None = None
_kernel_loaded = False  # True once a load was attempted, successful or not
_build_info: dict[str, object] = {"status": "not loaded yet"}


class _CompileError(RuntimeError):
    """The compiler rejected the kernel with every flag set."""


class _RememberedFailure(RuntimeError):
    """An earlier run could not build this kernel (its marker is in the cache)."""


def _kernel_enabled() -> bool:
    return not env_flag_off(KERNEL_ENVIRONMENT_VARIABLE)


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


# ----------------------------------------------------------------------------------------- trusted directories
def _untrusted_reason(path: Path) -> str | None:
    """Why ``path`` (an existing directory) must not hold code we load; ``None`` when it may.

    The directory itself: owned by the current user, not writable by group or others. Every directory above it
    (after resolving symbolic links): owned by the user or root, and not writable by group or others unless it
    is sticky (there nobody can rename or replace another user's entries).
    """
    uid = os.geteuid()
    real = Path(os.path.realpath(path))
    try:
        info = os.stat(real)
    except OSError as error:
        return f"{path}: {error.strerror}"
    if not stat.S_ISDIR(info.st_mode):
        return f"{real} is not a directory"
    if info.st_uid != uid:
        return f"{real} belongs to uid {info.st_uid}, not to the current user (uid {uid})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{real} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o})"
    for parent in real.parents:
        try:
            parent_info = os.stat(parent)
        except OSError as error:
            return f"{parent}: {error.strerror}"
        if parent_info.st_uid not in (0, uid):
            return f"{parent} (above {real}) belongs to uid {parent_info.st_uid}"
        writable = parent_info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not parent_info.st_mode & stat.S_ISVTX:
            return f"{parent} (above {real}) is writable by others and not sticky"
    return None


def _make_private_directory(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700 (kept 0700 whatever the umask)."""
    missing = []
    for candidate in (path, *path.parents):
        if os.path.lexists(candidate):
            break
        missing.append(candidate)
    for directory in reversed(missing):
        try:
            os.mkdir(directory, 0o700)
        except FileExistsError:
            continue
        os.chmod(directory, 0o700)


def _configured_cache_directory() -> tuple[Path | None, str | None]:
    """The persistent cache directory and, when it cannot be used, why not (then the path is ``None``)."""
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    if configured:
        if not os.path.isabs(configured):
            return None, f"{CACHE_ENVIRONMENT_VARIABLE}={configured!r} is not an absolute path"
        return Path(configured), None
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):
        home = os.path.expanduser("~")
        if not os.path.isabs(home):
            return None, "no home directory"
        base = os.path.join(home, ".cache")
    return Path(base) / "yolo_dysample", None


def _trusted_cache_directory() -> tuple[Path | None, str | None]:
    """The persistent cache, created private if missing; ``(None, reason)`` when it cannot be trusted or made."""
    directory, reason = _configured_cache_directory()
    if directory is None:
        return None, reason
    try:
        _make_private_directory(directory)
    except OSError as error:
        return None, f"cannot create {directory}: {error.strerror}"
    reason = _untrusted_reason(directory)
    return (None, reason) if reason else (directory, None)


def _private_temporary_directory() -> Path:
    """A fresh 0700 directory for this process alone (``mkdtemp``), removed at exit; raises if not trusted."""
    directory = Path(tempfile.mkdtemp(prefix="yolo_dysample-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    reason = _untrusted_reason(directory)
    if reason:
        raise OSError(errno.EPERM, reason)
    return directory


# ------------------------------------------------------------------------------------------- trusted files
def _read_trusted_file(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (no link) owned by us and not writable by others."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        return None
    with os.fdopen(descriptor, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
            return None
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return None
        return handle.read()


def _write_atomically(path: Path, data: bytes) -> None:
    """Write ``path`` through a private temporary file in the same directory and ``os.replace``."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


# ----------------------------------------------------------------------------------------------- building
def _compiler() -> list[str] | None:
    """The C++ compiler command: ``CXX`` split like a shell would (``CXX="ccache g++"``), else c++/g++/clang++."""
    configured = shlex.split(os.environ.get("CXX", ""))
    candidates = [configured] if configured else []
    candidates += [["c++"], ["g++"], ["clang++"]]
    for command in candidates:
        executable = shutil.which(command[0])
        if executable:
            return [executable, *command[1:]]
    return None


def _machine_fingerprint() -> str:
    """Describe what ``-march=native`` depends on: a library built on one CPU must not load on another."""
    return f"{platform.machine()} {platform.processor()} {' '.join(_cpu_flags())}"


def _cpu_flags() -> list[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (Linux; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            line = next((line for line in cpuinfo if line.startswith(("flags", "Features"))), "")
    except OSError:
        return []
    return line.partition(":")[2].split()


def _build_key(compiler: list[str]) -> tuple[str, str]:
    """A key for the build inputs (source, loader interface, compiler and its version, CPU) and the version text."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, text=True, timeout=60).stdout
    parts = (KERNEL_SOURCE.read_bytes(), str(ABI_VERSION), shlex.join(compiler), version, _machine_fingerprint())
    key = hashlib.sha256(b"\0".join(part if isinstance(part, bytes) else part.encode() for part in parts))
    return key.hexdigest()[:16], version.strip().splitlines()[0] if version.strip() else ""


def _paths(directory: Path, key: str) -> dict[str, Path]:
    stem = f"{LIBRARY_STEM}_{key}"
    return {
        "library": directory / f"{stem}.so",
        "manifest": directory / f"{stem}.json",
        "failed": directory / f"{stem}.failed",
        "lock": directory / f"{stem}.lock",
    }


def _open_library(path: Path) -> ctypes.CDLL | None:
    """``dlopen`` a library we built and check its interface; ``None`` if it lacks a symbol or the version."""
    try:
        library = ctypes.CDLL(str(path))
        library.dysample_abi_version.restype = ctypes.c_int
        if library.dysample_abi_version() != ABI_VERSION:
            return None
        library.dysample_build_features.restype = ctypes.c_int64
        library.dysample_sample.restype = ctypes.c_int
        library.dysample_sample.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9
    except (OSError, AttributeError):
        return None
    return library


def _load_cached(paths: dict[str, Path], remove_damaged: bool) -> tuple[ctypes.CDLL, dict] | None:
    """The cached library if it verifies against its manifest, else ``None`` (under the lock: damaged files removed)."""
    if not os.path.lexists(paths["library"]):
        return None
    manifest_bytes = _read_trusted_file(paths["manifest"])
    library_bytes = _read_trusted_file(paths["library"])
    try:
        manifest = json.loads(manifest_bytes) if manifest_bytes is not None else None
    except ValueError:
        manifest = None
    verified = (
        isinstance(manifest, dict)
        and library_bytes is not None
        and manifest.get("size") == len(library_bytes)
        and manifest.get("sha256") == hashlib.sha256(library_bytes).hexdigest()
    )
    library = _open_library(paths["library"]) if verified else None
    if library is None:  # truncated, foreign, without the symbol or of another interface: build it again
        for name in ("library", "manifest") if remove_damaged else ():
            with contextlib.suppress(OSError):
                os.unlink(paths[name])
        return None
    return library, manifest


@contextlib.contextmanager
def _build_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``: processes building at once (DDP workers) build once."""
    import fcntl

    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _remove_stale_partials(directory: Path) -> None:
    """Delete partial builds that a killed process left (a live build finishes in seconds)."""
    now = time.time()
    for partial in directory.glob(f".{LIBRARY_STEM}_*.tmp"):
        with contextlib.suppress(OSError):
            info = partial.lstat()
            if info.st_uid == os.geteuid() and now - info.st_mtime > STALE_PARTIAL_SECONDS:
                partial.unlink()


def _compile(compiler: list[str], directory: Path, key: str, version: str) -> tuple[ctypes.CDLL, dict]:
    """Compile into a private temporary file, load and check it, then install it and its manifest atomically."""
    paths = _paths(directory, key)
    errors = []
    for extra in OPTIONAL_FLAGS:
        handle, partial = tempfile.mkstemp(prefix=f".{LIBRARY_STEM}_{key}.", suffix=".tmp", dir=directory)
        os.close(handle)
        try:
            command = [*compiler, *COMPILE_FLAGS, *extra, str(KERNEL_SOURCE), "-o", partial]
            result = subprocess.run(command, capture_output=True, text=True, timeout=COMPILE_TIMEOUT_SECONDS)
            if result.returncode != 0:
                errors.append(f"{shlex.join(command)}: {result.stderr.strip()[-500:]}")
                continue
            os.chmod(partial, 0o700)  # the linker creates the file with the umask's mode
            library = _open_library(Path(partial))  # loaded under its temporary name: never a stale handle
            if library is None:
                errors.append(f"{shlex.join(command)}: the library does not export the kernel's interface")
                continue
            data = Path(partial).read_bytes()
            manifest = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "size": len(data),
                "compiler": shlex.join(compiler),
                "compiler_version": version,
                "flags": [*COMPILE_FLAGS, *extra],
            }
            _write_atomically(paths["manifest"], json.dumps(manifest, indent=1).encode())
            os.replace(partial, paths["library"])
            return library, manifest
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(partial)
    raise _CompileError("; ".join(errors))


def _load_or_build_in(directory: Path, compiler: list[str], key: str, version: str) -> tuple[ctypes.CDLL, dict]:
    """The verified cached library of ``directory``, else one built there (remembering a failed build)."""
    paths = _paths(directory, key)
    failure = _read_trusted_file(paths["failed"])
    if failure is not None:
        raise _RememberedFailure(f"{failure.decode(errors='replace')} (delete {paths['failed']} to retry)")
    cached = _load_cached(paths, remove_damaged=False)  # without the lock: another process may be installing it
    if cached is not None:
        return cached
    with _build_lock(paths["lock"]):
        cached = _load_cached(paths, remove_damaged=True)  # another process may have built it while we waited
        if cached is not None:
            return cached
        _remove_stale_partials(directory)
        return _compile(compiler, directory, key, version)


def _load_or_build(compiler: list[str]) -> tuple[ctypes.CDLL, dict, Path]:
    """The kernel, its manifest and its path: from the persistent cache if trustworthy, else built privately."""
    key, version = _build_key(compiler)
    directory, reason = _trusted_cache_directory()
    compile_error = None
    if directory is not None:
        try:
            library, manifest = _load_or_build_in(directory, compiler, key, version)
            return library, manifest, _paths(directory, key)["library"]
        except _CompileError as error:  # perhaps a full disk or a noexec home: try once more elsewhere
            compile_error = error
        except OSError as error:  # read-only or noexec cache, a lock we cannot take
            reason = f"{directory}: {error.strerror or error}"
    if reason and _untrusted(reason):
        warnings.warn(
            f"yolo_dysample: the kernel cache is not used ({reason}); the CPU kernel is built in a private "
            "temporary directory for this process",
            RuntimeWarning,
            stacklevel=4,
        )
    private = _private_temporary_directory()
    try:
        library, manifest = _compile(compiler, private, key, version)
    except _CompileError as error:
        if directory is not None and compile_error is not None:  # failed twice: remember it in the cache
            with contextlib.suppress(OSError):
                _write_atomically(_paths(directory, key)["failed"], str(error).encode())
        raise
    return library, manifest, _paths(private, key)["library"]


def _untrusted(reason: str) -> bool:
    """Whether a reason not to use the cache is about trust (warned about) rather than a missing directory."""
    return any(word in reason for word in ("belongs to", "writable", "not an absolute", "not a directory"))


def load_kernel() -> ctypes.CDLL | None:
    """Return the compiled CPU kernel, built on first call; ``None`` if disabled or it cannot be built.

    Set ``YOLO_DYSAMPLE_CPU_KERNEL=0`` to never build or use it; ``YOLO_DYSAMPLE_CACHE_DIR`` (an absolute
    path) to keep the library elsewhere than ``~/.cache/yolo_dysample``. Without a C++ compiler DySample uses
    ``F.grid_sample`` (same results, slower) silently; any other reason to fall back warns once.
    """
    global _kernel, _kernel_loaded
    if not _kernel_enabled():
        return None
    if _kernel_loaded:
        return _kernel
    with _lock:
        if _kernel_loaded:
            return _kernel
        _kernel_loaded = True
        compiler = _compiler() if os.name == "posix" else None  # Linux / macOS: a shared library via ctypes
        if compiler is None:
            _build_info.update(status="no C++ compiler (F.grid_sample)")
            return None
        try:
            library, manifest, path = _load_or_build(compiler)
        except _RememberedFailure as error:  # reported when it happened; silent now
            _build_info.update(status=f"build failed earlier (F.grid_sample): {error}")
            return None
        except (OSError, RuntimeError, subprocess.SubprocessError) as error:
            _build_info.update(status=f"unavailable (F.grid_sample): {error}")
            warnings.warn(
                f"yolo_dysample: no CPU sampling kernel, DySample uses F.grid_sample (same results, slower): {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        features = library.dysample_build_features()
        _build_info.clear()
        _build_info.update(
            status="loaded",
            library=str(path),
            compiler=manifest.get("compiler"),
            compiler_version=manifest.get("compiler_version"),
            flags=list(manifest.get("flags", [])),
            enabled=[name for bit, name in enumerate(BUILD_FEATURES) if features >> bit & 1],
        )
        _kernel = library
    return _kernel


def kernel_build_info() -> dict[str, object]:
    """How the CPU kernel was built, for benchmark reports; loads (or builds) it first.

    Returns:
        (dict): ``status`` ("loaded", "disabled" or why DySample uses ``F.grid_sample``); when loaded also
            ``compiler``, ``compiler_version``, ``flags`` (the compile flags actually used, e.g. ``-march=native``,
            ``-fopenmp``), ``enabled`` (what the compiler enabled: ``openmp``, ``avx2``, ``fma``, ``avx512f``,
            ...); always ``cpu_isa`` (the CPU's SIMD flags from ``/proc/cpuinfo``) and ``torch``.
    """
    if load_kernel() is None and not _kernel_enabled():
        info: dict[str, object] = {"status": f"disabled ({KERNEL_ENVIRONMENT_VARIABLE})"}
    else:
        info = dict(_build_info)
    simd = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "asimd", "neon", "sve")
    info["cpu_isa"] = [flag for flag in _cpu_flags() if flag in simd]
    info["torch"] = torch.__version__
    return info


# ------------------------------------------------------------------------------------------------ sampling
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
    """The kernel's output; ``initial`` is ``G`` in the kernel's ``(group, sub-pixel, axis)`` order."""
    batch, channels, height, width = x.shape
    output = torch.empty(batch, channels, scale * height, scale * width, dtype=x.dtype)
    if output.numel() == 0:  # an empty batch or map: nothing to sample (as F.grid_sample)
        return output
    kernel = load_kernel()
    x = x.contiguous()
    offsets = offsets.to(x.dtype).contiguous()
    initial = initial.to(x.dtype).contiguous()
    threads = max(1, min(torch.get_num_threads(), output.numel() // VALUES_PER_THREAD))
    channels_last = channels // groups >= CHANNELS_LAST_MIN_CHANNELS
    status = kernel.dysample_sample(
        x.data_ptr(), offsets.data_ptr(), initial.data_ptr(), output.data_ptr(), x.element_size(),
        batch, channels, height, width, groups, scale, threads, channels_last,
    )  # fmt: skip
    if status:
        raise RuntimeError(f"yolo_dysample CPU sampling kernel failed with status {status}")
    return output


def _kernel_order(initial_positions: torch.Tensor) -> torch.Tensor:
    """``G`` from the checkpoint's ``(axis, group, sub-pixel)`` order to the kernel's ``(group, sub-pixel, axis)``."""
    return initial_positions.reshape(2, -1).t()


class _KernelSampling(torch.autograd.Function):
    """Forward: the compiled kernel. Backward: ``grid_sample``'s backward on :func:`sampling.sampling_grid`."""

    @staticmethod
    def forward(ctx, x, offsets, initial_positions, groups, scale):
        ctx.groups, ctx.scale = groups, scale
        ctx.save_for_backward(x, offsets, initial_positions)
        return _run_kernel(x, offsets, _kernel_order(initial_positions), groups, scale)

    @staticmethod
    def backward(ctx, grad_output):
        x, offsets, initial_positions = ctx.saved_tensors
        groups, scale = ctx.groups, ctx.scale
        needs_input, needs_offsets = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (needs_input or needs_offsets):
            return None, None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True: the grid_sample path's own ops, so they differentiate
            # new graph nodes for x and O: the gradient must not also flow from O back into x (O = conv(x) outside)
            x, offsets = x.view_as(x), offsets.view_as(offsets)
            inputs = [tensor for tensor, needed in ((x, needs_input), (offsets, needs_offsets)) if needed]
            grid = sampling.sampling_grid(x, offsets, initial_positions, groups, scale)
            output = sampling.sample_groups(x, grid, groups)
            gradients = iter(torch.autograd.grad(output, inputs, grad_output, create_graph=True, allow_unused=True))
            grad_x = next(gradients) if needs_input else None
            grad_offsets = next(gradients) if needs_offsets else None
            return grad_x, grad_offsets, None, None, None
        batch, channels, height, width = x.shape
        with torch.enable_grad():
            offsets = offsets.detach().requires_grad_(needs_offsets)
            grid = sampling.sampling_grid(x, offsets, initial_positions, groups, scale)
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
        return grad_x, grad_offsets, None, None, None


def sample_with_kernel(
    x: torch.Tensor, offsets: torch.Tensor, initial_positions: torch.Tensor, groups: int, scale: int
) -> torch.Tensor:
    """DySample's output for ``x`` at ``S = G + O``, sampled by the compiled kernel.

    Takes what :func:`sampling.sampling_grid` takes and returns what ``sampling.sample_groups`` returns on that
    grid, to float rounding.

    Args:
        x (torch.Tensor): Input, ``(B, C, H, W)``, float32 or float64 on the CPU.
        offsets (torch.Tensor): ``O`` in input pixels, ``(B, 2 * groups * scale**2, H, W)``, channels ordered
            ``(group, sub-pixel, axis)``.
        initial_positions (torch.Tensor): ``G`` as :func:`sampling.bilinear_positions` returns it.
        groups (int): Channel groups.
        scale (int): Upsampling factor.

    Returns:
        (torch.Tensor): ``(B, C, scale * H, scale * W)``, differentiable (twice) in ``x`` and ``offsets``.
    """
    return _KernelSampling.apply(x, offsets, initial_positions, int(groups), int(scale))
