"""Tests of DySample's compiled CPU sampling kernel (yolo_dysample/cpu_sampling.py, csrc/dysample_sampling.cpp).

Eager float32 / float64 CPU calls sample with the kernel; everything else keeps ``F.grid_sample``. The
kernel must equal the independent numpy reference and the ``grid_sample`` path (values and gradients),
at every shape including one-pixel maps and points far outside the map, with any number of threads;
it must stay out of traced, compiled and exported graphs; and it must be optional (switched off by
``YOLO_DYSAMPLE_CPU_KERNEL=0``, skipped without a compiler).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dysample_reference import dysample_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dysample import VARIANTS, random_input, randomise, run_module, smallest_channels

import yolo_dysample.dysample as dysample_module
from yolo_dysample import DySample, cpu_sampling, sampling
from yolo_dysample.export_policy import set_sampler

GRID_SAMPLE = F.grid_sample


@pytest.fixture
def count_grid_sample(monkeypatch):
    """Count DySample's calls of ``F.grid_sample`` (the path the kernel replaces)."""
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return GRID_SAMPLE(*args, **kwargs)

    monkeypatch.setattr(dysample_module.F, "grid_sample", counting)
    return calls


def sample_like_module(module: DySample, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """The kernel's sampling of ``x`` at ``G + offsets`` with ``module``'s configuration."""
    return cpu_sampling.sample_with_kernel(x, offsets, module.init_pos, module.groups, module.scale)


def without_kernel(module: DySample, x: torch.Tensor) -> torch.Tensor:
    """The ``F.grid_sample`` path's output, for comparison."""
    with cpu_sampling.kernel_disabled():
        assert not cpu_sampling.kernel_applies(x)
        with torch.no_grad():
            return module(x)


@pytest.mark.parametrize("before", [None, "1"])
def test_kernel_disabled_switches_to_grid_sample_and_restores_the_setting(before, count_grid_sample, monkeypatch):
    if before is None:
        monkeypatch.delenv(cpu_sampling.KERNEL_ENVIRONMENT_VARIABLE, raising=False)
    else:
        monkeypatch.setenv(cpu_sampling.KERNEL_ENVIRONMENT_VARIABLE, before)
    module, x = DySample(16, groups=4), torch.randn(1, 16, 5, 6)
    with cpu_sampling.kernel_disabled(), torch.no_grad():
        module(x)
    assert len(count_grid_sample) == 1
    assert os.environ.get(cpu_sampling.KERNEL_ENVIRONMENT_VARIABLE) == before
    with torch.no_grad():
        module(x)
    assert len(count_grid_sample) == 1  # the kernel again


def test_kernel_builds_here_and_replaces_grid_sample_in_eager_cpu_forward(count_grid_sample):
    assert cpu_sampling.load_kernel() is not None, "no working C++ compiler: DySample falls back to F.grid_sample"
    module = DySample(16, groups=4)
    x = torch.randn(2, 16, 6, 7)
    assert cpu_sampling.kernel_applies(x)
    with torch.no_grad():
        module(x)
    assert count_grid_sample == []


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_kernel_matches_reference_and_grid_sample_with_offsets_of_several_pixels(
    style, dyscope, scale, groups, count_grid_sample
):
    channels = smallest_channels(scale, style, groups, multiple=2)
    module = DySample(channels, scale=scale, style=style, groups=groups, dyscope=dyscope).double()
    seed = 7000 + 100 * scale + 10 * groups + 2 * (style == "pl") + dyscope
    weights = randomise(module, seed, offset_pixels=3.0)  # many points leave the map: the border clamp is exercised
    x = random_input((2, channels, 5, 6), seed)
    out = run_module(module, x)
    assert count_grid_sample == []  # the kernel computed it
    np.testing.assert_allclose(out, dysample_reference(x.numpy(), weights, scale, style, groups), rtol=0, atol=1e-6)
    np.testing.assert_allclose(out, without_kernel(module, x).numpy(), rtol=0, atol=1e-6)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    scale=st.integers(2, 3),
    groups=st.integers(1, 3),
    style=st.sampled_from(["lp", "pl"]),
    dyscope=st.booleans(),
    offset_pixels=st.sampled_from([0.0, 0.4, 5.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_reference_for_any_shape_and_any_offset(
    batch, height, width, scale, groups, style, dyscope, offset_pixels, seed
):
    channels = smallest_channels(scale, style, groups)
    module = DySample(channels, scale=scale, style=style, groups=groups, dyscope=dyscope).double()
    weights = randomise(module, seed, offset_pixels=offset_pixels)
    x = random_input((batch, channels, height, width), seed + 1)
    assert cpu_sampling.kernel_applies(x)
    expected = dysample_reference(x.numpy(), weights, scale, style, groups)
    np.testing.assert_allclose(run_module(module, x), expected, rtol=0, atol=1e-6)


def test_float32_kernel_is_at_least_as_close_to_the_exact_value_as_grid_sample():
    # a realistic map: coordinates up to ~120 pixels, where grid_sample's [-1, 1] round trip loses digits
    module = DySample(32, groups=4, dyscope=True)
    weights = randomise(module, seed=5, offset_pixels=2.0)
    x = random_input((1, 32, 60, 120), seed=6)
    exact = dysample_reference(x.numpy(), weights, 2, "lp", 4)
    x32 = x.float()
    kernel_error = np.abs(run_module(module, x32) - exact).max()
    grid_sample_error = np.abs(without_kernel(module, x32).double().numpy() - exact).max()
    assert kernel_error < 1e-4
    assert kernel_error <= grid_sample_error


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_kernel_gradients_equal_grid_sample_gradients(style, dyscope, monkeypatch):
    module = DySample(8, scale=2, style=style, groups=2, dyscope=dyscope).double()
    randomise(module, seed=21, offset_pixels=1.5)
    x = random_input((2, 8, 4, 5), seed=22)
    upstream = random_input((2, 8, 8, 10), seed=23)

    def gradients(kernel: str) -> list[torch.Tensor]:
        monkeypatch.setenv(cpu_sampling.KERNEL_ENVIRONMENT_VARIABLE, kernel)
        module.zero_grad()
        leaf = x.clone().requires_grad_(True)
        assert cpu_sampling.kernel_applies(leaf) == (kernel == "1")
        (module(leaf) * upstream).sum().backward()
        return [leaf.grad] + [p.grad.clone() for p in module.parameters()]

    with_kernel, with_grid_sample = gradients("1"), gradients("0")
    assert len(with_kernel) == 1 + len(list(module.parameters()))
    for got, expected in zip(with_kernel, with_grid_sample, strict=True):
        assert expected.abs().max() > 0  # every gradient is really exercised
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_kernel_gradcheck_through_input_and_every_parameter(style, dyscope):
    module = DySample(4, scale=2, style=style, groups=1, dyscope=dyscope).double()
    randomise(module, seed=31, offset_pixels=0.7)
    names = [name for name, _ in module.named_parameters()]
    parameters = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    x = random_input((1, 4, 3, 4), seed=32).requires_grad_(True)
    assert cpu_sampling.kernel_applies(x)

    def forward(x, *parameter_values):
        return torch.func.functional_call(module, dict(zip(names, parameter_values, strict=True)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *parameters), eps=1e-6, atol=1e-5)


def test_threads_split_the_rows_without_changing_the_result(monkeypatch):
    module = DySample(64, groups=4, dyscope=True)
    randomise(module, seed=41, offset_pixels=2.0)
    x = torch.randn(3, 64, 17, 23)
    with torch.no_grad():
        offsets = module.offsets(x)  # fixed: the 1x1 conv itself may round differently per thread count
        one_thread = sample_like_module(module, x, offsets)
    torch.testing.assert_close(one_thread, without_kernel(module, x), rtol=0, atol=1e-4)
    monkeypatch.setattr(cpu_sampling, "VALUES_PER_THREAD", 1)  # even tiny maps are split
    previous = torch.get_num_threads()
    try:
        for threads in (2, 3, 7):
            torch.set_num_threads(threads)
            with torch.no_grad():
                assert torch.equal(sample_like_module(module, x, offsets), one_thread)
    finally:
        torch.set_num_threads(previous)


def test_non_finite_offsets_stay_inside_the_map():
    module = DySample(8, groups=2)
    with torch.no_grad():
        module.offset.bias.copy_(torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30] * 4))
        x = torch.randn(1, 8, 5, 5)
        out = module(x)
    # every value is some bilinear mix of the input: a read outside the map would give garbage or crash
    assert out.shape == (1, 8, 10, 10)
    assert torch.isfinite(out).all()
    assert out.abs().max() <= x.abs().max() + 1e-6


def test_traced_graph_keeps_grid_sample_and_no_kernel():
    module = DySample(16, groups=4).eval()
    traced = torch.jit.trace(module, torch.randn(1, 16, 6, 6))
    assert "aten::grid_sampler" in str(traced.inlined_graph)
    x = torch.randn(2, 16, 9, 7)  # another size: the traced graph recomputes with grid_sample
    with torch.no_grad():
        torch.testing.assert_close(traced(x), module(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "case",
    ["half", "switched off", "dispatch mode", "sampler gather"],
)
def test_kernel_steps_aside(case, count_grid_sample, monkeypatch):
    module = DySample(16, groups=4)
    x = torch.randn(1, 16, 5, 6)
    with torch.no_grad():
        if case == "half":
            module, x = module.bfloat16(), x.bfloat16()
            module(x)
        elif case == "switched off":
            monkeypatch.setenv(cpu_sampling.KERNEL_ENVIRONMENT_VARIABLE, "0")
            module(x)
        elif case == "dispatch mode":
            from torch.utils.flop_counter import FlopCounterMode

            with FlopCounterMode(display=False):
                module(x)
        else:
            set_sampler(module, "gather")
            module(x)
            assert count_grid_sample == []  # the gather sampler, not the kernel
            return
    assert len(count_grid_sample) == 1


BUILD_SCRIPT = """
import os, sys, warnings
warnings.simplefilter("error")  # a fallback must be silent when there is simply no compiler
import torch
from yolo_dysample import DySample, cpu_sampling, sampling
from yolo_dysample.export_policy import set_sampler
module = DySample(8, groups=2)
x = torch.randn(1, 8, 4, 4)
with torch.no_grad():
    out = module(x)
print("kernel", cpu_sampling.load_kernel() is not None)
cache = __import__("pathlib").Path(os.environ["YOLO_DYSAMPLE_CACHE_DIR"])
print("libraries", sorted(p.name for p in cache.glob("*.so")))
"""


def test_kernel_is_compiled_once_into_the_cache_and_optional_without_compiler(run_python, tmp_path):
    cache = tmp_path / "cache"
    first = run_python(BUILD_SCRIPT, cwd=tmp_path, env={"YOLO_DYSAMPLE_CACHE_DIR": str(cache)})
    assert "kernel True" in first.stdout
    (library,) = cache.glob("*.so")
    built_at = library.stat().st_mtime_ns
    second = run_python(BUILD_SCRIPT, cwd=tmp_path, env={"YOLO_DYSAMPLE_CACHE_DIR": str(cache)})
    assert "kernel True" in second.stdout
    assert library.stat().st_mtime_ns == built_at  # reused, not rebuilt
    # no compiler on PATH and none named: the grid_sample path, no warning, nothing built
    empty_cache = tmp_path / "empty"
    no_compiler = {"YOLO_DYSAMPLE_CACHE_DIR": str(empty_cache), "PATH": str(tmp_path / "no-bin"), "CXX": ""}
    fallback = run_python(BUILD_SCRIPT, cwd=tmp_path, env=no_compiler)
    assert "kernel False" in fallback.stdout
    assert not empty_cache.exists()


@pytest.mark.parametrize("shape", [(1, 8, 5, 6), (2, 8, 1, 4), (1, 8, 3, 1), (1, 8, 1, 1)])
def test_points_on_the_last_pixel_never_read_past_the_map(shape):
    # the input is the front of a buffer whose tail is NaN: any read past the last pixel (even with weight 0)
    # turns the output NaN
    buffer = torch.full((2 * torch.Size(shape).numel(),), float("nan"))
    buffer[: torch.Size(shape).numel()] = torch.randn(torch.Size(shape).numel())
    x = buffer[: torch.Size(shape).numel()].view(shape)
    assert x.is_contiguous() and cpu_sampling.kernel_applies(x)
    module = DySample(8, groups=2)
    with torch.no_grad():
        module.offset.weight.zero_()
        module.offset.bias.fill_(1e3)  # every point far past the bottom-right corner: clamped onto the last pixel
        out = module(x)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, x[:, :, -1:, -1:].expand_as(out), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Kernel arithmetic and autograd at the edges


def test_empty_batch_gives_an_empty_output_like_grid_sample():
    module = DySample(16, groups=4)
    x = torch.randn(0, 16, 5, 6)
    assert cpu_sampling.kernel_applies(x)
    with torch.no_grad():
        out = module(x)
    grid_sample_out = sampling.sample_groups(x, torch.zeros(0, 10, 12, 2), groups=4)
    assert out.shape == grid_sample_out.shape == (0, 16, 10, 12)


@pytest.mark.parametrize("neighbour", [1e8, float("inf"), -float("inf")])
@pytest.mark.parametrize("axis", ["x", "y"])
def test_huge_or_infinite_neighbour_of_the_border_pixel_changes_nothing(axis, neighbour):
    # every point clamps onto the last column (row); grid_sample skips the neighbour past it and never reads the
    # one before it: the output is the border pixel's value, 1.0, exactly
    x = torch.randn(1, 8, 5, 6)
    if axis == "x":
        x[..., -1], x[..., -2] = 1.0, neighbour
    else:
        x[..., -1, :], x[..., -2, :] = 1.0, neighbour
    offsets = torch.zeros(1, 2 * 2 * 4, 5, 6)  # (group, sub-pixel, axis)
    offsets[:, (0 if axis == "x" else 1) :: 2] = 1e3  # far past the last column (row)
    initial = sampling.bilinear_positions(2, 2)
    out = cpu_sampling.sample_with_kernel(x, offsets, initial, 2, 2)
    expected = sampling.sample_groups(x, sampling.sampling_grid(x, offsets, initial, 2, 2), 2)
    assert torch.isfinite(expected).all()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert (out == 1.0).all()


def test_nan_offsets_read_the_first_column_and_row_as_the_grid_sample_path_does():
    module = DySample(8, groups=2).double()
    randomise(module, seed=51, offset_pixels=1.0)
    x = random_input((1, 8, 5, 6), seed=52)
    offsets = module.offsets(x).detach()
    offsets[:, 0::2, 1:3] = float("nan")  # x of some points: NaN -> reads as -inf along x
    offsets[:, 1::2, :, 4] = float("nan")  # y of others
    x_kernel, offsets_kernel = x.clone().requires_grad_(True), offsets.clone().requires_grad_(True)
    out = sample_like_module(module, x_kernel, offsets_kernel)
    x_grid, offsets_grid = x.clone().requires_grad_(True), offsets.clone().requires_grad_(True)
    grid = sampling.sampling_grid(x_grid, offsets_grid, module.init_pos.double(), 2, 2)
    expected = sampling.sample_groups(x_grid, grid, 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert torch.isfinite(out).all()
    upstream = random_input(tuple(out.shape), seed=53)
    (out * upstream).sum().backward()
    (expected * upstream).sum().backward()
    torch.testing.assert_close(x_kernel.grad, x_grid.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(offsets_kernel.grad, offsets_grid.grad, rtol=1e-9, atol=1e-12)
    assert torch.isfinite(offsets_kernel.grad).all()


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_double_backward_through_the_kernel_equals_the_grid_sample_path(style, dyscope, monkeypatch):
    module = DySample(8, scale=2, style=style, groups=2, dyscope=dyscope).double()
    randomise(module, seed=61, offset_pixels=1.2)
    x = random_input((1, 8, 3, 4), seed=62)

    def second_order(kernel: str) -> list[torch.Tensor]:
        monkeypatch.setenv(cpu_sampling.KERNEL_ENVIRONMENT_VARIABLE, kernel)
        leaf = x.clone().requires_grad_(True)
        assert cpu_sampling.kernel_applies(leaf) == (kernel == "1")
        parameters = list(module.parameters())
        first = torch.autograd.grad(module(leaf).square().sum(), [leaf, *parameters], create_graph=True)
        penalty = sum(gradient.square().sum() for gradient in first)  # a gradient penalty, as in WGAN-GP
        return list(torch.autograd.grad(penalty, [leaf, *parameters]))

    for got, expected in zip(second_order("1"), second_order("0"), strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_kernel_gradgradcheck_in_input_and_offsets():
    module = DySample(4, scale=2, groups=2).double()
    x = random_input((1, 4, 3, 3), seed=71).requires_grad_(True)
    offsets = (0.3 * random_input((1, 16, 3, 3), seed=72)).requires_grad_(True)
    assert cpu_sampling.kernel_applies(x)

    def sample(x, offsets):
        return cpu_sampling.sample_with_kernel(x, offsets, module.init_pos.double(), 2, 2)

    assert torch.autograd.gradgradcheck(sample, (x, offsets), eps=1e-6, atol=1e-5)


def test_kernel_takes_tensors_and_integers_and_its_backward_builds_the_grid_with_sampling_grid(monkeypatch):
    module = DySample(8, groups=2).double()
    randomise(module, seed=81, offset_pixels=1.0)
    x = random_input((2, 8, 4, 5), seed=82).requires_grad_(True)
    offsets = module.offsets(x)
    out = cpu_sampling.sample_with_kernel(x, offsets, module.init_pos, 2, 2)
    with torch.no_grad():
        expected = sampling.sample_groups(x, sampling.sampling_grid(x, offsets, module.init_pos, 2, 2), 2)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    calls = []
    real_sampling_grid = sampling.sampling_grid

    def counting(*args):
        calls.append(args[3:])
        return real_sampling_grid(*args)

    monkeypatch.setattr(sampling, "sampling_grid", counting)
    out.sum().backward()
    assert calls == [(2, 2)]
    assert x.grad is not None and module.offset.weight.grad is not None


def test_kernel_build_info_names_compiler_flags_and_instruction_sets():
    info = cpu_sampling.kernel_build_info()
    assert info["status"] == "loaded"
    assert "-O3" in info["flags"] and Path(info["library"]).is_file()
    assert set(info["enabled"]) <= set(cpu_sampling.BUILD_FEATURES)
    assert ("-fopenmp" in info["flags"]) == ("openmp" in info["enabled"])
    assert isinstance(info["cpu_isa"], list) and info["torch"] == torch.__version__
    with cpu_sampling.kernel_disabled():
        assert cpu_sampling.kernel_build_info()["status"].startswith("disabled")


# --------------------------------------------------------------------------------------------
# The cache: another user's files, damaged files, failed and interrupted builds (each in a fresh interpreter)

OTHER_UID = 54321  # a second local user, simulated by file ownership
AS_ROOT = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
COMPILER = shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
NEEDS_COMPILER = pytest.mark.skipif(COMPILER is None, reason="no C++ compiler")

FORWARD_SCRIPT = """
import json, os, warnings
import torch
from yolo_dysample import DySample, cpu_sampling
torch.manual_seed(0)
module = DySample(8, groups=2)
x = torch.randn(1, 8, 5, 6)
with warnings.catch_warnings(record=True) as caught, torch.no_grad():
    warnings.simplefilter("always")
    out = module(x)
    used_kernel = cpu_sampling.kernel_applies(x)
with cpu_sampling.kernel_disabled(), torch.no_grad():
    expected = module(x)
info = cpu_sampling.kernel_build_info()
library = info.get("library")
print(json.dumps({
    "kernel": used_kernel,
    "error": (out - expected).abs().max().item(),
    "warnings": [str(w.message) for w in caught if "yolo_dysample" in str(w.message)],
    "library": library,
    "library_directory_mode": os.stat(os.path.dirname(library)).st_mode & 0o777 if library else None,
    "status": info["status"],
}))
"""

PLANTED_SOURCE = r"""
#include <cstdint>
#include <cstdio>
#include <cstdlib>
// Code that must never run: a constructor runs as soon as the library is loaded.
__attribute__((constructor)) static void planted() {
    if (const char* marker = std::getenv("PLANTED_MARKER")) {
        if (std::FILE* file = std::fopen(marker, "w")) {
            std::fputs("planted code ran", file);
            std::fclose(file);
        }
    }
}
extern "C" int dysample_abi_version() { return ABI_VERSION; }
extern "C" int64_t dysample_build_features() { return 0; }
extern "C" int dysample_sample(const void*, const void*, const void*, void*, int64_t, int64_t, int64_t, int64_t,
                               int64_t, int64_t, int64_t, int64_t, int64_t) { return 0; }
"""


def run_forward(cwd: Path, env: dict[str, str | None], check: bool = True) -> dict:
    """Run :data:`FORWARD_SCRIPT` in a fresh interpreter; ``None`` in ``env`` removes that variable."""
    environment = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    for key, value in env.items():
        if value is None:
            environment.pop(key, None)
        else:
            environment[key] = value
    result = subprocess.run(
        [sys.executable, "-c", FORWARD_SCRIPT], cwd=cwd, env=environment, capture_output=True, text=True, timeout=600
    )
    if not check:
        return {"returncode": result.returncode, "stderr": result.stderr}
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-4000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def built_kernel(tmp_path_factory) -> dict[str, bytes]:
    """The files of one real build (the library under the name the loader looks for, and whatever sits beside it)."""
    cache = tmp_path_factory.mktemp("built") / "cache"
    report = run_forward(cache.parent, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache)})
    assert report["error"] < 1e-5
    assert report["kernel"], report
    return {path.name: path.read_bytes() for path in cache.iterdir() if path.is_file()}


@pytest.fixture(scope="module")
def planted_library(tmp_path_factory) -> bytes:
    """A library exporting the kernel's symbols whose constructor writes ``$PLANTED_MARKER``."""
    if COMPILER is None:
        pytest.skip("no C++ compiler")
    directory = tmp_path_factory.mktemp("planted")
    (directory / "planted.cpp").write_text(PLANTED_SOURCE.replace("ABI_VERSION", str(cpu_sampling.ABI_VERSION)))
    subprocess.run(
        [COMPILER, "-shared", "-fPIC", str(directory / "planted.cpp"), "-o", str(directory / "planted.so")], check=True
    )
    return (directory / "planted.so").read_bytes()


def plant(directory: Path, built: dict[str, bytes], library: bytes, owner: int | None = None) -> Path:
    """Put ``library`` where the loader looks for its build, with a manifest that matches it; return the file.

    The manifest is forged as well, so that nothing but the ownership and permission checks stands in the way.
    """
    directory.mkdir(parents=True, exist_ok=True)
    (name,) = [name for name in built if name.endswith(".so")]
    target = directory / name
    target.write_bytes(library)
    for manifest_name in (name for name in built if name.endswith(".json")):
        manifest = json.loads(built[manifest_name])
        manifest.update(sha256=hashlib.sha256(library).hexdigest(), size=len(library))
        (directory / manifest_name).write_text(json.dumps(manifest))
    if owner is not None:
        for path in (directory, *directory.iterdir()):
            os.chown(path, owner, owner)
    return target


@NEEDS_COMPILER
@AS_ROOT
def test_library_owned_by_another_user_is_never_loaded(built_kernel, planted_library, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "planted-code-ran"
    planted = plant(cache, built_kernel, planted_library)
    os.chown(planted, OTHER_UID, OTHER_UID)  # our cache directory, another user's library in it
    report = run_forward(tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache), "PLANTED_MARKER": str(marker)})
    assert not marker.exists()  # the planted code never ran
    assert report["error"] < 1e-5
    assert report["kernel"] and report["library"] == str(planted)  # rebuilt in place, from our source
    assert planted.stat().st_uid == os.geteuid() and planted.read_bytes() != planted_library


@NEEDS_COMPILER
@AS_ROOT
def test_cache_directory_of_another_user_is_never_used(built_kernel, planted_library, tmp_path):
    cache, marker = tmp_path / "cache", tmp_path / "planted-code-ran"
    plant(cache, built_kernel, planted_library, owner=OTHER_UID)
    report = run_forward(tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache), "PLANTED_MARKER": str(marker)})
    assert not marker.exists()  # the planted code never ran
    assert report["error"] < 1e-5
    assert report["kernel"] and not report["library"].startswith(str(cache))
    assert report["library_directory_mode"] == 0o700
    assert any("belongs to uid 54321" in message for message in report["warnings"])


@NEEDS_COMPILER
@pytest.mark.parametrize("mode", [0o770, 0o777, 0o1777])
def test_cache_directory_others_can_write_is_refused(built_kernel, planted_library, tmp_path, mode):
    cache, marker = tmp_path / "cache", tmp_path / "planted-code-ran"
    plant(cache, built_kernel, planted_library)
    cache.chmod(mode)
    report = run_forward(tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache), "PLANTED_MARKER": str(marker)})
    assert not marker.exists()  # the planted code never ran
    assert report["error"] < 1e-5
    assert report["kernel"] and not report["library"].startswith(str(cache))
    assert any("writable by group or others" in message for message in report["warnings"])


@NEEDS_COMPILER
def test_cache_below_a_directory_others_can_write_is_refused(built_kernel, planted_library, tmp_path):
    shared, marker = tmp_path / "shared", tmp_path / "planted-code-ran"
    plant(shared / "cache", built_kernel, planted_library)
    shared.chmod(0o777)  # another user could rename "cache" away and put their own in its place
    env = {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(shared / "cache"), "PLANTED_MARKER": str(marker)}
    report = run_forward(tmp_path, env)
    assert not marker.exists()  # the planted code never ran
    assert report["error"] < 1e-5
    assert report["kernel"] and not report["library"].startswith(str(shared))
    assert any("not sticky" in message for message in report["warnings"])


@NEEDS_COMPILER
def test_relative_cache_directory_never_loads_from_the_working_directory(built_kernel, planted_library, tmp_path):
    work, marker = tmp_path / "work", tmp_path / "planted-code-ran"
    plant(work, built_kernel, planted_library)
    before = sorted(path.name for path in work.iterdir())
    report = run_forward(work, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: ".", "PLANTED_MARKER": str(marker)})
    assert not marker.exists()  # the planted code never ran
    assert report["error"] < 1e-5
    assert report["kernel"] and not report["library"].startswith(str(work))
    assert sorted(path.name for path in work.iterdir()) == before  # nothing built or written into the cwd
    assert any("not an absolute path" in message for message in report["warnings"])


@NEEDS_COMPILER
def test_unusable_home_builds_in_a_fresh_private_directory_not_a_fixed_shared_one(
    built_kernel, planted_library, tmp_path
):
    temporary, marker = tmp_path / "tmp", tmp_path / "planted-code-ran"
    temporary.mkdir()
    temporary.chmod(0o1777)  # like /tmp
    # the fallback of earlier versions: a predictable name in $TMPDIR that anyone can create first
    owner = OTHER_UID if os.geteuid() == 0 else None
    plant(temporary / f"yolo_dysample-{os.geteuid()}", built_kernel, planted_library, owner=owner)
    (tmp_path / "not-a-directory").write_text("")
    env = {
        "HOME": str(tmp_path / "not-a-directory" / "home"),  # cannot be created, not even by root
        "XDG_CACHE_HOME": None,
        cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: None,
        "TMPDIR": str(temporary),
        "PLANTED_MARKER": str(marker),
    }
    report = run_forward(tmp_path, env)
    assert not marker.exists()  # the planted code never ran
    assert report["error"] < 1e-5
    assert report["kernel"] and report["library"].startswith(str(temporary))
    assert report["library_directory_mode"] == 0o700
    assert f"yolo_dysample-{os.geteuid()}" not in report["library"]
    assert [path.name for path in temporary.iterdir()] == [f"yolo_dysample-{os.geteuid()}"]  # ours removed at exit


def test_cache_directories_are_created_private(tmp_path):
    cache = tmp_path / "a" / "b" / "cache"
    report = run_forward(tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache)})
    assert report["error"] < 1e-5
    assert report["kernel"] and report["library"].startswith(str(cache))
    for directory in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert directory.stat().st_mode & 0o777 == 0o700
    for path in cache.iterdir():
        assert path.stat().st_uid == os.geteuid() and not path.stat().st_mode & 0o022


def test_truncated_cached_library_is_rebuilt_not_loaded(built_kernel, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for name, data in built_kernel.items():
        (cache / name).write_bytes(data[: len(data) // 3] if name.endswith(".so") else data)  # a full disk, a crash
    report = run_forward(tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache)})  # no SIGBUS
    assert report["error"] < 1e-5
    assert report["kernel"]
    (library,) = cache.glob("*.so")
    assert len(library.read_bytes()) == len(next(data for name, data in built_kernel.items() if name.endswith(".so")))


@NEEDS_COMPILER
def test_library_without_the_kernel_symbol_is_rebuilt(built_kernel, tmp_path):
    (tmp_path / "empty.cpp").write_text('extern "C" int unrelated() { return 1; }\n')
    subprocess.run(
        [COMPILER, "-shared", "-fPIC", str(tmp_path / "empty.cpp"), "-o", str(tmp_path / "empty.so")], check=True
    )
    cache = tmp_path / "cache"
    plant(cache, built_kernel, (tmp_path / "empty.so").read_bytes())
    cache.chmod(0o700)
    report = run_forward(tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache)})
    assert report["error"] < 1e-5
    assert report["kernel"] and report["warnings"] == []


def fake_compiler(tmp_path: Path, body: str) -> tuple[Path, Path]:
    """A ``CXX`` script that logs its arguments to a file, then runs ``body`` (sh); returns (script, log)."""
    log = tmp_path / "compiler.log"
    script = tmp_path / "fake-c++"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{log}"\n{body}\n')
    script.chmod(0o755)
    return script, log


def test_failed_build_is_reported_once_and_not_retried(tmp_path):
    compiler, log = fake_compiler(
        tmp_path,
        'case "$1" in --version) echo "fake 1.0"; exit 0;; esac\n'
        'for last; do :; done\necho "half a library" > "$last"\necho "error: something" >&2\nexit 1',
    )
    cache = tmp_path / "cache"
    env = {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache), "CXX": str(compiler)}
    first = run_forward(tmp_path, env)
    assert not first["kernel"]
    assert len(first["warnings"]) == 1 and "error: something" in first["warnings"][0]
    compiles = [line for line in log.read_text().splitlines() if "--version" not in line]
    assert compiles  # it did try
    second = run_forward(tmp_path, env)
    assert not second["kernel"] and second["warnings"] == []
    assert "build failed earlier" in second["status"]
    assert [line for line in log.read_text().splitlines() if "--version" not in line] == compiles  # not again
    assert not [path.name for path in cache.iterdir() if path.name.startswith(".")]  # no partial files left


@NEEDS_COMPILER
def test_compiler_command_with_arguments_is_used(tmp_path):
    # like CXX="ccache g++": a wrapper first, then the compiler
    wrapper, log = fake_compiler(tmp_path, 'exec "$@"')
    cache = tmp_path / "cache"
    report = run_forward(
        tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache), "CXX": f"{wrapper} {COMPILER}"}
    )
    assert report["error"] < 1e-5
    assert report["kernel"]
    assert any(cpu_sampling.KERNEL_SOURCE.name in line for line in log.read_text().splitlines())  # the compile ran


def test_interrupted_build_leaves_no_partial_files(tmp_path):
    # the compiler writes half its output, then the user presses Ctrl-C (SIGINT to the Python process)
    compiler, _ = fake_compiler(
        tmp_path,
        'case "$1" in --version) echo "fake 1.0"; exit 0;; esac\n'
        'for last; do :; done\necho "half a library" > "$last"\nkill -INT $PPID\nsleep 30',
    )
    cache = tmp_path / "cache"
    result = run_forward(
        tmp_path, {cpu_sampling.CACHE_ENVIRONMENT_VARIABLE: str(cache), "CXX": str(compiler)}, check=False
    )
    assert result["returncode"] != 0 and "KeyboardInterrupt" in result["stderr"]
    leftovers = [path.name for path in cache.iterdir() if not path.name.endswith(".lock")]
    assert leftovers == []


NO_THREADS_SCRIPT = """
import ctypes, sys
library = ctypes.CDLL(sys.argv[1])
library.dysample_sample.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9
batch, channels, height, width, groups, scale = 1, 2, 8, 8, 1, 2
values = (ctypes.c_float * (channels * height * width))(*[float(i % 7) for i in range(channels * height * width)])
offsets = (ctypes.c_float * (2 * scale * scale * height * width))()
initial = (ctypes.c_float * 8)(-0.25, -0.25, 0.25, -0.25, -0.25, 0.25, 0.25, 0.25)
outputs = []
for threads in (1, 4):
    output = (ctypes.c_float * (channels * 4 * height * width))()
    status = library.dysample_sample(values, offsets, initial, output, 4, batch, channels, height, width, groups,
                                     scale, threads, 0)
    outputs.append((status, list(output)))
print(outputs[0][0], outputs[1][0], outputs[0][1] == outputs[1][1], sum(outputs[1][1]) > 0)
"""

REFUSING_PTHREAD_CREATE = r"""
#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
// The first thread starts, every later one fails (a process or cgroup thread limit).
extern "C" int pthread_create(pthread_t* thread, const pthread_attr_t* attr, void* (*start)(void*), void* arg) {
    static int started = 0;
    if (started++ > 0) return EAGAIN;
    using Create = int (*)(pthread_t*, const pthread_attr_t*, void* (*)(void*), void*);
    static Create real = reinterpret_cast<Create>(dlsym(RTLD_NEXT, "pthread_create"));
    return real(thread, attr, start, arg);
}
"""


@NEEDS_COMPILER
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD")
def test_without_openmp_a_thread_that_cannot_start_leaves_its_share_to_the_caller(tmp_path):
    kernel = tmp_path / "kernel.so"
    flags = [flag for flag in cpu_sampling.COMPILE_FLAGS]
    subprocess.run([COMPILER, *flags, str(cpu_sampling.KERNEL_SOURCE), "-o", str(kernel)], check=True)  # no OpenMP
    (tmp_path / "refuse.cpp").write_text(REFUSING_PTHREAD_CREATE)
    shim = tmp_path / "refuse.so"
    subprocess.run([COMPILER, "-shared", "-fPIC", str(tmp_path / "refuse.cpp"), "-o", str(shim), "-ldl"], check=True)
    result = subprocess.run(
        [sys.executable, "-c", NO_THREADS_SCRIPT, str(kernel)],
        env={**os.environ, "LD_PRELOAD": str(shim)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]  # not std::terminate / abort
    assert result.stdout.split() == ["0", "0", "True", "True"]  # success, and the same values as one thread


@pytest.fixture(params=["planar", "channels-last"])
def layout(request, monkeypatch):
    """Run a test with the kernel's planar layout and with its channels-last one (float32 with AVX2)."""
    minimum = 10**9 if request.param == "planar" else 1
    monkeypatch.setattr(cpu_sampling, "CHANNELS_LAST_MIN_CHANNELS", minimum)
    return request.param


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 2),
    group_channels=st.sampled_from([1, 3, 8, 13, 16, 24]),
    groups=st.integers(1, 3),
    height=st.integers(1, 9),
    width=st.integers(1, 21),
    scale=st.integers(2, 3),
    offset_pixels=st.sampled_from([0.0, 0.6, 4.0, 1e4]),
    seed=st.integers(0, 2**16),
)
def test_both_layouts_equal_grid_sample_for_any_shape(
    batch, group_channels, groups, height, width, scale, offset_pixels, seed
):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, groups * group_channels, height, width, generator=generator)
    offsets = offset_pixels * torch.randn(batch, 2 * groups * scale * scale, height, width, generator=generator)
    offsets[:, :, ::4, ::3] = float("nan")  # NaN reads as -inf
    initial = sampling.bilinear_positions(scale, groups)
    expected = sampling.sample_groups(x, sampling.sampling_grid(x, offsets, initial, groups, scale), groups)
    results = {}
    for minimum in (10**9, 1):  # planar, channels-last
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(cpu_sampling, "CHANNELS_LAST_MIN_CHANNELS", minimum)
            results[minimum] = cpu_sampling.sample_with_kernel(x, offsets, initial, groups, scale)
    for out in results.values():
        torch.testing.assert_close(out, expected, rtol=0, atol=2e-5)
    torch.testing.assert_close(results[1], results[10**9], rtol=0, atol=1e-6)


@pytest.mark.parametrize("neighbour", [1e8, float("inf")])
def test_huge_neighbour_at_the_border_changes_nothing_in_either_layout(layout, neighbour):
    x = torch.randn(1, 32, 6, 10)
    x[..., -1], x[..., -2] = 1.0, neighbour
    x[..., -1, :], x[..., -2, :] = 1.0, neighbour
    offsets = torch.full((1, 2 * 2 * 4, 6, 10), 1e3)  # every point past the bottom-right corner
    out = cpu_sampling.sample_with_kernel(x, offsets, sampling.bilinear_positions(2, 2), 2, 2)
    assert (out == 1.0).all()


def test_threads_split_the_channels_last_rows_without_changing_the_result(layout, monkeypatch):
    module = DySample(64, groups=2, dyscope=True)
    randomise(module, seed=91, offset_pixels=2.0)
    x = torch.randn(2, 64, 13, 19)
    with torch.no_grad():
        offsets = module.offsets(x)
        one_thread = sample_like_module(module, x, offsets)
    torch.testing.assert_close(one_thread, without_kernel(module, x), rtol=0, atol=1e-4)
    monkeypatch.setattr(cpu_sampling, "VALUES_PER_THREAD", 1)
    previous = torch.get_num_threads()
    try:
        for threads in (2, 5):
            torch.set_num_threads(threads)
            with torch.no_grad():
                assert torch.equal(sample_like_module(module, x, offsets), one_thread)
    finally:
        torch.set_num_threads(previous)
