"""The sampling ops: every sampler is F.grid_sample(bilinear, border, align_corners=False), and non-finite points
follow the documented rule (NaN reads the first row or column, +-inf the border) without a crash."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from yolo_dysample import DySample
from yolo_dysample.export_policy import use_sampler
from yolo_dysample.sampling import (
    bilinear_positions,
    grid_sample_border,
    grid_sample_by_gather,
    grid_sample_per_group,
    sample_groups,
    sampling_grid,
)

SETTINGS = settings(max_examples=40, deadline=None)


def torch_grid_sample(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """PyTorch's own call, spelt out here so that the op under test is not its own reference."""
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


@st.composite
def features_and_grid(draw, dtype=torch.float64):
    """Random features and a grid reaching 0.6 past every border, some points exactly on pixel centres."""
    batch, channels = draw(st.integers(1, 3)), draw(st.integers(1, 5))
    height, width = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    out_height, out_width = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    features = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64)
    grid = torch.rand(batch, out_height, out_width, 2, generator=generator, dtype=torch.float64) * 3.2 - 1.6
    if draw(st.booleans()):  # snap to pixel centres and edges: floor() and the clamps meet integers exactly
        sizes = torch.tensor([width, height], dtype=torch.float64)
        grid = (torch.round((grid + 1) * sizes) / sizes - 1).clamp(-1.6, 1.6)
    return features.to(dtype), grid.to(dtype)


@SETTINGS
@given(features_and_grid(torch.float64))
def test_gather_sampling_equals_grid_sample_in_float64(data):
    features, grid = data
    expected = torch_grid_sample(features, grid)
    torch.testing.assert_close(grid_sample_by_gather(features, grid), expected, atol=1e-12, rtol=0)


@SETTINGS
@given(features_and_grid(torch.float32))
def test_gather_sampling_equals_grid_sample_in_float32(data):
    features, grid = data
    expected = torch_grid_sample(features, grid)
    torch.testing.assert_close(grid_sample_by_gather(features, grid), expected, atol=2e-6, rtol=1e-6)


@SETTINGS
@given(features_and_grid(torch.float64), st.sampled_from([torch.float16, torch.bfloat16]))
def test_gather_sampling_in_half_precision_is_within_rounding_of_exact(data, dtype):
    """Low precision: compare with exact float64 sampling of the same (rounded) inputs.

    PyTorch's own CPU half grid_sample computes coordinates in half and is off by ~15 ulps; the
    gather sampler computes them in float32, so it must stay within a few ulps of the exact value.
    """
    features, grid = (tensor.to(dtype) for tensor in data)
    exact = torch_grid_sample(features.double(), grid.double())
    sampled = grid_sample_by_gather(features, grid)
    assert sampled.dtype == dtype
    ulp = torch.finfo(dtype).eps * exact.abs().clamp(min=1.0)
    assert ((sampled.double() - exact).abs() <= 2 * ulp).all()


def test_points_on_pixel_centres_borders_and_midpoints_give_known_values():
    """Independent of F.grid_sample: centres return the pixel, outside points the border, midpoints the mean."""
    features = torch.arange(12, dtype=torch.float64).reshape(1, 1, 3, 4)  # value = 4 * row + column
    width, height = 4, 3

    def normalised(column: float, row: float) -> list[float]:  # pixel coordinates -> [-1, 1]
        return [(2 * column + 1) / width - 1, (2 * row + 1) / height - 1]

    points = [normalised(1, 2), normalised(-5, 1), normalised(9, -3), normalised(0.5, 0), normalised(2, 1.5)]
    expected = torch.tensor([9.0, 4.0, 3.0, 0.5, 8.0], dtype=torch.float64)
    grid = torch.tensor(points, dtype=torch.float64).reshape(1, 1, len(points), 2)
    assert torch.equal(grid_sample_by_gather(features, grid).flatten(), expected)


def perturbed(layer: DySample, seed: int) -> DySample:
    generator = torch.Generator().manual_seed(seed)
    for convolution in [layer.offset] + ([layer.scope] if layer.scope is not None else []):
        with torch.no_grad():
            convolution.weight.copy_(torch.randn(convolution.weight.shape, generator=generator, dtype=torch.float64))
            if convolution.bias is not None:
                convolution.bias.copy_(torch.randn(convolution.bias.shape, generator=generator, dtype=torch.float64))
    return layer.eval()


@SETTINGS
@given(
    style=st.sampled_from(["lp", "pl"]),
    dyscope=st.booleans(),
    scale=st.sampled_from([2, 3]),
    groups=st.sampled_from([1, 2, 4]),
    batch=st.integers(1, 2),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    seed=st.integers(0, 2**31 - 1),
)
def test_dysample_gather_sampler_equals_grid_sample_for_every_variant(
    style, dyscope, scale, groups, batch, height, width, seed
):
    in_channels = groups * scale * scale * 2
    layer = perturbed(DySample(in_channels, scale=scale, style=style, groups=groups, dyscope=dyscope).double(), seed)
    features = torch.randn(
        batch, in_channels, height, width, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 1)
    )
    with torch.no_grad():
        expected = layer(features)
        if height * width > 1:  # a 1x1 input clamps every point to its one pixel
            assert not torch.allclose(expected, F.interpolate(features, scale_factor=scale, mode="bilinear"))
        with use_sampler(layer, "gather"):
            sampled = layer(features)
    torch.testing.assert_close(sampled, expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dysample_gather_sampler_keeps_the_input_dtype(dtype):
    layer = perturbed(DySample(32, style="lp", dyscope=True).double(), seed=3).to(dtype)
    features = torch.randn(2, 32, 5, 7).to(dtype)
    with torch.no_grad(), use_sampler(layer, "gather"):
        sampled = layer(features)
    exact = perturbed(DySample(32, style="lp", dyscope=True).double(), seed=3).to(dtype).double()(features.double())
    assert sampled.dtype == dtype
    tolerance = {torch.float32: 1e-5, torch.float16: 0.05, torch.bfloat16: 0.3}[dtype]
    assert (sampled.double() - exact).abs().max() < tolerance


def test_traced_gather_sampler_serves_other_batch_sizes_and_resolutions():
    layer = perturbed(DySample(16, style="pl", groups=2).double(), seed=5).float()
    with use_sampler(layer, "gather"), torch.no_grad():
        traced = torch.jit.trace(layer, torch.randn(1, 16, 4, 6), check_trace=False)
        for shape in [(2, 16, 7, 3), (3, 16, 10, 12)]:
            features = torch.randn(shape)
            torch.testing.assert_close(traced(features), layer(features), atol=1e-5, rtol=1e-5)


def test_bilinear_positions_are_the_authors_init_pos():
    from dysample_reference import authors_init_pos

    for scale, groups in [(2, 1), (2, 4), (3, 2), (4, 1)]:
        positions = bilinear_positions(scale, groups)
        assert positions.shape == (1, 2 * groups * scale * scale, 1, 1) and positions.dtype == torch.float32
        assert torch.equal(positions, torch.from_numpy(authors_init_pos(scale, groups)))


@pytest.mark.parametrize(("scale", "groups"), [(2, 1), (2, 4), (3, 2)])
def test_zero_offsets_sample_where_bilinear_interpolation_does(scale, groups):
    x = torch.randn(2, 4 * groups, 5, 3, dtype=torch.float64)
    offsets = torch.zeros(2, 2 * groups * scale * scale, 5, 3, dtype=torch.float64)
    grid = sampling_grid(x, offsets, bilinear_positions(scale, groups), groups, scale)
    assert grid.shape == (2 * groups, 5 * scale, 3 * scale, 2) and grid.dtype == torch.float64
    expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    for by_gather in (False, True):
        torch.testing.assert_close(sample_groups(x, grid, groups, by_gather=by_gather), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(grid_sample_per_group(x, grid, groups), expected, rtol=0, atol=1e-6)


def test_grid_sample_border_is_torchs_bilinear_border_call():
    features, grid = torch.randn(2, 3, 4, 5), torch.rand(2, 6, 7, 2) * 3 - 1.5
    assert torch.equal(grid_sample_border(features, grid), torch_grid_sample(features, grid))


def non_finite_offsets(value: float, groups: int = 2, scale: int = 2) -> torch.Tensor:
    """Offsets ``(1, 2 g s^2, 4, 5)``, zero except ``value`` on the x axis of group 0 and the y axis of group 1."""
    offsets = torch.zeros(1, 2 * groups * scale * scale, 4, 5, dtype=torch.float64)
    by_group = offsets.view(1, groups, scale * scale, 2, 4, 5)  # (group, sub-pixel, axis)
    by_group[:, 0, :, 0] = value
    by_group[:, 1, :, 1] = value
    return offsets


@pytest.mark.parametrize(("value", "same_as"), [(float("nan"), -1e9), (-float("inf"), -1e9), (float("inf"), 1e9)])
def test_non_finite_offsets_sample_like_points_far_outside(value, same_as):
    # NaN is -inf along its axis (the first column for x, the first row for y); +-inf is the border.
    groups, scale = 2, 2
    x = torch.randn(1, 4, 4, 5, dtype=torch.float64)
    initial = bilinear_positions(scale, groups)
    grid = sampling_grid(x, non_finite_offsets(value), initial, groups, scale)
    assert torch.isfinite(grid).all()
    far = sampling_grid(x, non_finite_offsets(same_as), initial, groups, scale)
    for by_gather in (False, True):
        torch.testing.assert_close(sample_groups(x, grid, groups, by_gather), sample_groups(x, far, groups, by_gather))
    torch.testing.assert_close(grid_sample_per_group(x, grid, groups), grid_sample_per_group(x, far, groups))
    if value != value:  # NaN x of group 0: every output column of group 0 is input column 0, rows interpolated
        column = sample_groups(x, grid, groups)[:, :2]
        torch.testing.assert_close(column, column[..., :1].expand_as(column))
        torch.testing.assert_close(
            column[..., 0], F.interpolate(x[:, :2, :, :1], size=(8, 1), mode="bilinear", align_corners=False)[..., 0]
        )


NAN_BACKWARD = """
import torch
from yolo_dysample.sampling import bilinear_positions, sample_groups, sampling_grid

x = torch.randn(1, 4, 4, 5, dtype=torch.float64, requires_grad=True)
offsets = torch.zeros(1, 16, 4, 5, dtype=torch.float64)
offsets[0, 3, 1, 2] = float("nan")
offsets[0, 8, 2, 2] = float("inf")
offsets.requires_grad_(True)
grid = sampling_grid(x, offsets, bilinear_positions(2, 2), 2, 2)
for by_gather in (False, True):
    x.grad = offsets.grad = None
    sample_groups(x, grid, 2, by_gather).sum().backward(retain_graph=True)
    assert torch.isfinite(x.grad).all() and torch.isfinite(offsets.grad).all()
    assert offsets.grad[0, 3, 1, 2] == 0 and offsets.grad[0, 8, 2, 2] == 0  # beyond the border: no gradient
print("ok")
"""


def test_backward_through_non_finite_points_is_finite_and_does_not_crash():
    # PyTorch's CPU grid_sampler_2d_backward with border padding dies (SIGSEGV) on a NaN coordinate: a subprocess.
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", NAN_BACKWARD], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-2000:])
    assert result.stdout.strip() == "ok"
