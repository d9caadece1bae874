"""Tests of DySample's compiled CPU sampling kernel (yolo_dysample/cpu_sampling.py, csrc/dysample_sampling.cpp).

Eager float32 / float64 CPU calls sample with the kernel; everything else keeps ``F.grid_sample``. The
kernel must equal the independent numpy reference and the ``grid_sample`` path (values and gradients),
at every shape including one-pixel maps and points far outside the map, with any number of threads;
it must stay out of traced, compiled and exported graphs; and it must be optional (switched off by
``YOLO_DYSAMPLE_CPU_KERNEL=0``, skipped without a compiler).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dysample_reference import dysample_reference
from hypothesis import given, settings
from hypothesis import strategies as st
from test_dysample import VARIANTS, random_input, randomise, run_module, smallest_channels

import yolo_dysample.dysample as dysample_module
from yolo_dysample import DySample, cpu_sampling

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
        offsets = module._grouped_offsets(x)  # fixed: the 1x1 conv itself may round differently per thread count
        one_thread = cpu_sampling.sample_with_kernel(module, x, offsets)
    torch.testing.assert_close(one_thread, without_kernel(module, x), rtol=0, atol=1e-4)
    monkeypatch.setattr(cpu_sampling, "VALUES_PER_THREAD", 1)  # even tiny maps are split
    previous = torch.get_num_threads()
    try:
        for threads in (2, 3, 7):
            torch.set_num_threads(threads)
            with torch.no_grad():
                assert torch.equal(cpu_sampling.sample_with_kernel(module, x, offsets), one_thread)
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
            module.sampler = "gather"
            module(x)
            assert count_grid_sample == []  # the gather sampler, not the kernel
            return
    assert len(count_grid_sample) == 1


BUILD_SCRIPT = """
import os, sys, warnings
warnings.simplefilter("error")  # a fallback must be silent when there is simply no compiler
import torch
from yolo_dysample import DySample, cpu_sampling
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
