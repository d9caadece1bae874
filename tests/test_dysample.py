"""Tests of the DySample module against an independent numpy reference and the paper's numbers.

The reference (``tests/dysample_reference.py``) is written from the equations in float64 with no
``torch``; the tiny cases below are worked out by hand in the comments. CUDA cases run only where
a CUDA device is available (they are skipped on CPU-only machines, which includes our CI).
"""

from __future__ import annotations

import copyreg
import inspect
import math
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dysample_reference import ReferenceWeights, authors_init_pos, clamped_fraction, dysample_reference
from hypothesis import given, settings
from hypothesis import strategies as st

from yolo_dysample import DySample
from yolo_dysample.dysample import ExportForm

VARIANTS = [  # (style, dyscope): the paper's DySample, DySample+, DySample-S, DySample-S+
    pytest.param("lp", False, id="lp"),
    pytest.param("lp", True, id="lp+"),
    pytest.param("pl", False, id="pl"),
    pytest.param("pl", True, id="pl+"),
]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA cases run only where a CUDA device is available")


def smallest_channels(scale: int, style: str, groups: int, multiple: int = 1) -> int:
    """A channel count valid for the configuration: groups divide it (PL: groups divide C / s^2)."""
    return groups * (scale * scale if style == "pl" else 1) * multiple


def randomise(module: DySample, seed: int, offset_pixels: float = 3.0) -> ReferenceWeights:
    """Give ``module`` random weights whose offsets are about ``offset_pixels`` input pixels.

    Returns the same weights in numpy for the reference. Inputs are expected to be ~N(0, 1).
    """
    rng = np.random.default_rng(seed)
    conv_out, conv_in = module.offset.weight.shape[:2]
    # O = 0.25 * conv(X) (static) or up to 0.5 * conv(X) (dynamic): conv std 4 * offset_pixels
    offset_std = 4.0 * offset_pixels
    weights = ReferenceWeights(
        offset_weight=rng.normal(0.0, offset_std / math.sqrt(conv_in), (conv_out, conv_in, 1, 1)),
        offset_bias=rng.normal(0.0, offset_std / 2, conv_out),
    )
    if module.dyscope:
        weights.scope_weight = rng.normal(0.0, 2.0 / math.sqrt(conv_in), (conv_out, conv_in, 1, 1))
        if module.scope.bias is not None:  # the 2023 layout
            weights.scope_bias = rng.normal(0.0, 1.0, conv_out)
    load_weights(module, weights)
    return weights


def load_weights(module: DySample, weights: ReferenceWeights) -> None:
    """Copy numpy weights into ``module`` (any dtype / device)."""
    with torch.no_grad():
        module.offset.weight.copy_(torch.from_numpy(weights.offset_weight))
        module.offset.bias.copy_(torch.from_numpy(weights.offset_bias))
        if weights.scope_weight is not None:
            module.scope.weight.copy_(torch.from_numpy(weights.scope_weight))
        if weights.scope_bias is not None:
            module.scope.bias.copy_(torch.from_numpy(weights.scope_bias))


def weights_of(module: DySample) -> ReferenceWeights:
    """The weights ``module`` holds now, as float64 numpy arrays."""

    def as_numpy(tensor: torch.Tensor) -> np.ndarray:
        return tensor.detach().double().cpu().numpy()

    weights = ReferenceWeights(as_numpy(module.offset.weight), as_numpy(module.offset.bias))
    if module.scope is not None:
        weights.scope_weight = as_numpy(module.scope.weight)
        weights.scope_bias = None if module.scope.bias is None else as_numpy(module.scope.bias)
    return weights


def random_input(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A float64 ~N(0, 1) input, reproducible from ``seed``."""
    return torch.from_numpy(np.random.default_rng(seed).normal(size=shape))


def run_module(module: DySample, x: torch.Tensor) -> np.ndarray:
    """Forward without autograd, back to numpy float64."""
    with torch.no_grad():
        return module(x).double().cpu().numpy()


# --------------------------------------------------------------------------------------------
# Against the independent reference


@pytest.mark.parametrize("groups", [1, 2, 3, 4])
@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_module_matches_reference_with_offsets_of_several_pixels(style, dyscope, scale, groups):
    channels = smallest_channels(scale, style, groups, multiple=2)
    module = DySample(channels, scale=scale, style=style, groups=groups, dyscope=dyscope).double()
    seed = 1000 * scale + 10 * groups + 2 * (style == "pl") + dyscope
    weights = randomise(module, seed, offset_pixels=3.0)
    x = random_input((2, channels, 5, 6), seed)
    expected = dysample_reference(x.numpy(), weights, scale, style, groups)
    # the random offsets are large enough that many points leave the map and get clamped
    assert clamped_fraction(x.numpy(), weights, scale, style) > 0.1
    # ... and the output is far from plain bilinear interpolation, so real sampling is compared
    bilinear = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False).numpy()
    assert np.abs(expected - bilinear).max() > 0.5
    # float64 throughout, yet init_pos is a float32 buffer (the authors' checkpoint layout): at s=3
    # its thirds are rounded to ~1e-8 pixels, hence 1e-6 rather than 1e-12; any real error is >= 1e-2
    np.testing.assert_allclose(run_module(module, x), expected, rtol=0, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    batch=st.integers(1, 3),
    height=st.integers(1, 7),
    width=st.integers(1, 7),
    scale=st.integers(2, 4),
    groups=st.integers(1, 4),
    multiple=st.integers(1, 3),
    style=st.sampled_from(["lp", "pl"]),
    dyscope=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_module_matches_reference_for_any_shape_and_groups(
    batch, height, width, scale, groups, multiple, style, dyscope, seed
):
    channels = smallest_channels(scale, style, groups, multiple)
    module = DySample(channels, scale=scale, style=style, groups=groups, dyscope=dyscope).double()
    weights = randomise(module, seed, offset_pixels=1.5)
    x = random_input((batch, channels, height, width), seed + 1)
    out = run_module(module, x)
    assert out.shape == (batch, channels, scale * height, scale * width)
    np.testing.assert_allclose(out, dysample_reference(x.numpy(), weights, scale, style, groups), rtol=0, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Tiny cases worked out by hand


def test_lp_groups_shift_their_own_channels_by_hand():
    # LP, s=2, two groups of one channel, input 1x3 = [0, 10, 20] in both channels.
    # The conv weights are zero; the biases give constant offsets. LP channel (axis, group, sub-pixel):
    # x-offsets of group 0 are channels 0..3, of group 1 channels 4..7; y-offsets are 8..15.
    # bias 4 -> O = 0.25 * 4 = +1 pixel for group 0, bias -4 -> -1 pixel for group 1.
    module = DySample(2, scale=2, style="lp", groups=2).double()
    with torch.no_grad():
        module.offset.weight.zero_()
        module.offset.bias.copy_(torch.tensor([4.0] * 4 + [-4.0] * 4 + [0.0] * 8))
    x = torch.tensor([[[[0.0, 10.0, 20.0]], [[0.0, 10.0, 20.0]]]], dtype=torch.float64)
    # output column X samples input index u = (X + 0.5) / 2 - 0.5 + O, clamped to [0, 2]:
    # group 0 (O=+1): u = 0.75, 1.25, 1.75, 2.25->2, 2.75->2, 3.25->2 -> 7.5, 12.5, 17.5, 20, 20, 20
    # group 1 (O=-1): u = -1.25->0, -0.75->0, -0.25->0, 0.25, 0.75, 1.25 -> 0, 0, 0, 2.5, 7.5, 12.5
    # (one input row: both output rows are the same)
    group_0 = [7.5, 12.5, 17.5, 20.0, 20.0, 20.0]
    group_1 = [0.0, 0.0, 0.0, 2.5, 7.5, 12.5]
    expected = np.array([[[group_0, group_0], [group_1, group_1]]])
    np.testing.assert_allclose(run_module(module, x), expected, atol=1e-12)


def test_dynamic_scope_moves_points_along_y_by_hand():
    # LP+, s=2, one group, input 4x1 = column [0, 10, 20, 30]. y-offset channels are 4..7.
    # offset bias 4, scope bias ln 3 -> sigmoid = 3/4 -> O_y = 0.5 * 3/4 * 4 = 1.5 pixels down.
    # The scope bias comes in the authors' 2023 layout (new modules have none).
    module = DySample(1, scale=2, style="lp", groups=1, dyscope=True).double()
    state = module.state_dict()
    state["offset.weight"].zero_()
    state["offset.bias"] = torch.tensor([0.0] * 4 + [4.0] * 4, dtype=torch.float64)
    state["scope.bias"] = torch.full((8,), math.log(3.0), dtype=torch.float64)
    module.load_state_dict(state, strict=True)
    x = torch.tensor([0.0, 10.0, 20.0, 30.0], dtype=torch.float64).reshape(1, 1, 4, 1)
    # output row Y samples v = (Y + 0.5) / 2 - 0.5 + 1.5 = Y / 2 + 1.25, clamped to [0, 3]:
    # 1.25, 1.75, 2.25, 2.75, 3.25->3, ... -> 12.5, 17.5, 22.5, 27.5, 30, 30, 30, 30
    column = [12.5, 17.5, 22.5, 27.5, 30.0, 30.0, 30.0, 30.0]
    expected = np.array(column)[None, None, :, None].repeat(2, axis=3)
    np.testing.assert_allclose(run_module(module, x), expected, atol=1e-12)


def test_pl_offsets_come_from_the_pixel_shuffled_input_by_hand():
    # PL, s=2, C=4, one group, input 1x2. pixel_shuffle puts channel 2i+j of input pixel w at
    # output pixel (i, 2w+j). The conv (1 -> 2 channels) has x-weight 4, so O_x = 0.25 * 4 * value:
    # each output pixel moves right by the shuffled input value there; O_y = 0.
    #   channels (c: [w=0, w=1]): c0 = [0, 1], c1 = [1, 0], c2 = [0.5, 0], c3 = [0, 0]
    #   shuffled map (2 x 4):  row 0 = [c0[0], c1[0], c0[1], c1[1]] = [0, 1, 1, 0]
    #                          row 1 = [c2[0], c3[0], c2[1], c3[1]] = [0.5, 0, 0, 0]
    # bilinear base index u = (X + 0.5) / 2 - 0.5 = [-0.25, 0.25, 0.75, 1.25]; add O_x, clamp [0, 1]:
    #   row 0: [-0.25, 1.25, 1.75, 1.25] -> [0, 1, 1, 1];  row 1: [0.25, 0.25, 0.75, 1.25] -> [.25, .25, .75, 1]
    # with two columns, the value is c[0] * (1 - u) + c[1] * u:
    module = DySample(4, scale=2, style="pl", groups=1).double()
    with torch.no_grad():
        module.offset.weight.copy_(torch.tensor([4.0, 0.0], dtype=torch.float64).reshape(2, 1, 1, 1))
        module.offset.bias.zero_()
    x = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.0], [0.0, 0.0]], dtype=torch.float64).reshape(1, 4, 1, 2)
    u = np.array([[0.0, 1.0, 1.0, 1.0], [0.25, 0.25, 0.75, 1.0]])
    expected = np.stack([u, 1 - u, 0.5 * (1 - u), 0 * u])[None]  # c0 = u, c1 = 1-u, c2 = 0.5(1-u), c3 = 0
    np.testing.assert_allclose(run_module(module, x), expected, atol=1e-12)


def test_scale_three_samples_at_bilinear_positions_by_hand():
    # s=3, zero offsets, input 1x2 = [0, 30]: u = (X + 0.5) / 3 - 0.5 = -1/3, 0, 1/3, 2/3, 1, 4/3,
    # clamped to [0, 1] -> 0, 0, 10, 20, 30, 30 in each of the three output rows.
    module = DySample(1, scale=3, style="lp", groups=1).double()
    with torch.no_grad():
        module.offset.weight.zero_()
    x = torch.tensor([0.0, 30.0], dtype=torch.float64).reshape(1, 1, 1, 2)
    expected = np.array([[0.0, 0.0, 10.0, 20.0, 30.0, 30.0]] * 3)[None, None]
    np.testing.assert_allclose(run_module(module, x), expected, atol=1e-12)


# --------------------------------------------------------------------------------------------
# Initialisation: zero offsets are bilinear interpolation


@pytest.mark.parametrize("scale", [2, 3, 4])
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
@pytest.mark.parametrize("size", [(1, 1), (5, 3), (4, 9)], ids=lambda size: f"{size[0]}x{size[1]}")
def test_zero_offsets_equal_bilinear_interpolation(style, dyscope, scale, size):
    channels = smallest_channels(scale, style, groups=2, multiple=2)
    module = DySample(channels, scale=scale, style=style, groups=2, dyscope=dyscope)
    randomise(module, seed=scale)  # a random scope must not matter once the offsets are zero
    with torch.no_grad():
        module.offset.weight.zero_()
        module.offset.bias.zero_()
    x = torch.randn(3, channels, *size)
    expected = F.interpolate(x, scale_factor=scale, mode="bilinear", align_corners=False)
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_initialisation_follows_the_paper(style, dyscope):
    torch.manual_seed(0)
    module = DySample(256, scale=2, style=style, groups=4, dyscope=dyscope)
    # offset conv weights ~ N(0, 0.001), bias 0; scope conv all zeros, without a bias (the authors' current layout)
    assert module.offset.weight.std().item() == pytest.approx(0.001, rel=0.15)
    assert module.offset.weight.mean().abs().item() < 2e-4
    assert torch.count_nonzero(module.offset.bias) == 0
    if dyscope:
        assert torch.count_nonzero(module.scope.weight) == 0
        assert module.scope.bias is None
    else:
        assert module.scope is None
    # so a fresh DySample is bilinear interpolation up to offsets of ~1e-3 pixels
    x = torch.randn(2, 256, 6, 5)
    bilinear = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
    difference = (module(x) - bilinear).abs().max().item()
    assert 0 < difference < 0.1


# --------------------------------------------------------------------------------------------
# Checkpoints in the authors' layout and parameter counts


@pytest.mark.parametrize("scope_bias", [False, True], ids=["current-layout", "2023-layout"])
@pytest.mark.parametrize("scale", [2, 3])
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_authors_state_dict_loads_strictly_and_gives_the_same_output(style, dyscope, scale, scope_bias):
    # Both layouts of the authors' code: a bias on the dynamic-scope conv in their 2023 releases (and in this
    # package's earlier checkpoints), none since 2024 (and in new modules here).
    groups, channels = 2, smallest_channels(scale, style, 2, multiple=2)
    # the authors' layout, written out: LP conv C -> 2 g s^2, PL conv C / s^2 -> 2 g, 1x1 kernels
    conv_in, conv_out = (channels // scale**2, 2 * groups) if style == "pl" else (channels, 2 * groups * scale**2)
    rng = np.random.default_rng(7)
    checkpoint = {
        "offset.weight": rng.normal(0, 2.0 / math.sqrt(conv_in), (conv_out, conv_in, 1, 1)),
        "offset.bias": rng.normal(0, 1.0, conv_out),
        "init_pos": authors_init_pos(scale, groups),
    }
    if dyscope:
        checkpoint["scope.weight"] = rng.normal(0, 1.0 / math.sqrt(conv_in), (conv_out, conv_in, 1, 1))
        if scope_bias:
            checkpoint["scope.bias"] = rng.normal(0, 1.0, conv_out)
    module = DySample(channels, scale=scale, style=style, groups=groups, dyscope=dyscope)
    assert set(module.state_dict()) == set(checkpoint) - {"scope.bias"}  # new modules: the current layout
    # a fresh module already holds the authors' init_pos (so their layout is also our meaning of it)
    np.testing.assert_array_equal(module.init_pos.numpy(), checkpoint["init_pos"])

    module.load_state_dict({key: torch.from_numpy(value).float() for key, value in checkpoint.items()}, strict=True)
    assert set(module.state_dict()) == set(checkpoint)  # saved again in the layout it was loaded from
    x = random_input((2, channels, 4, 5), seed=3)
    weights = ReferenceWeights(
        checkpoint["offset.weight"],
        checkpoint["offset.bias"],
        checkpoint.get("scope.weight"),
        checkpoint.get("scope.bias"),
    )
    expected = dysample_reference(x.numpy(), weights, scale, style, groups)
    np.testing.assert_allclose(run_module(module, x.float()), expected, rtol=0, atol=1e-4)


def test_state_dict_of_the_other_scope_fails_strict_loading():
    static = DySample(16, dyscope=False).state_dict()
    with pytest.raises(RuntimeError, match="scope"):
        DySample(16, dyscope=True).load_state_dict(static, strict=True)


def test_parameter_counts_match_the_papers_table():
    # Authors' tables: on a 256-channel map with s=2, g=4, four upsamplers add 32.7K (DySample)
    # and 65.5K (DySample+) weights. LP conv: C x 2 g s^2 = 256 x 32 weights, + 32 biases; "+" doubles.
    channels, scale, groups, upsamplers = 256, 2, 4, 4
    offset_outputs = 2 * groups * scale**2
    static = DySample(channels, scale=scale, groups=groups, dyscope=False)
    dynamic = DySample(channels, scale=scale, groups=groups, dyscope=True)

    def weights_of(module: DySample) -> int:
        return sum(p.numel() for name, p in module.named_parameters() if name.endswith("weight"))

    assert weights_of(static) == channels * offset_outputs == 256 * 32
    assert weights_of(dynamic) == 2 * channels * offset_outputs
    assert sum(p.numel() for p in static.parameters()) == 256 * 32 + 32  # init_pos is a buffer, not a parameter
    assert sum(p.numel() for p in dynamic.parameters()) == 2 * 256 * 32 + 32  # the scope conv has no bias
    assert upsamplers * weights_of(static) == 32768
    assert upsamplers * weights_of(dynamic) == 65536
    # the paper prints these in thousands cut to one decimal: 32.768 -> 32.7K, 65.536 -> 65.5K
    assert math.floor(upsamplers * weights_of(static) / 100) / 10 == 32.7
    assert math.floor(upsamplers * weights_of(dynamic) / 100) / 10 == 65.5
    # PL ("-S") runs its conv on C / s^2 channels with 2 g outputs: s^4 = 16 times fewer weights
    pl = DySample(channels, scale=scale, style="pl", groups=groups)
    assert weights_of(pl) == (channels // scale**2) * 2 * groups == weights_of(static) // 16


# --------------------------------------------------------------------------------------------
# Configuration and input errors


@pytest.mark.parametrize(
    ("kwargs", "message_parts"),
    [
        (dict(in_channels=64, groups=3), ["groups=3", "in_channels=64"]),
        (dict(in_channels=6, groups=4), ["groups=4", "in_channels=6"]),
        (dict(in_channels=18, style="pl", groups=2), ["in_channels=18", "scale**2=4"]),
        (dict(in_channels=30, scale=3, style="pl", groups=2), ["in_channels=30", "scale**2=9"]),
        (dict(in_channels=16, style="pl", groups=8), ["groups=8", "in_channels / scale**2 = 4"]),
        (dict(in_channels=64, style="lpp"), ["style='lpp'", "'lp'", "'pl'"]),
        (dict(in_channels=64, style=None), ["style=None"]),
        (dict(in_channels=64, scale=1), ["scale=1", "in [2, 16]"]),
        (dict(in_channels=64, scale=0), ["scale=0", "in [2, 16]"]),
        (dict(in_channels=64, scale=-2), ["scale=-2", "in [2, 16]"]),
        (dict(in_channels=64, scale=17), ["scale=17", "in [2, 16]"]),
        (dict(in_channels=64, scale=2.5), ["scale=2.5", "whole number"]),
        (dict(in_channels=64, scale="2"), ["scale='2'", "whole number"]),
        (dict(in_channels=64, scale=True), ["scale=True", "whole number"]),
        (dict(in_channels=64, scale=float("inf")), ["scale=inf", "whole number"]),
        (dict(in_channels=64, scale=float("nan")), ["scale=nan", "whole number"]),
        (dict(in_channels=0), ["in_channels=0"]),
        (dict(in_channels=64.5), ["in_channels=64.5"]),
        (dict(in_channels=64, groups=0), ["groups=0"]),
        (dict(in_channels=64, dyscope="yes"), ["dyscope='yes'"]),
    ],
    ids=lambda value: "-".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict) else None,
)
def test_invalid_configuration_raises_value_error_naming_the_argument(kwargs, message_parts):
    with pytest.raises(ValueError) as error:
        DySample(**kwargs)
    for part in message_parts:
        assert part in str(error.value)


def test_whole_number_floats_and_upper_case_style_are_accepted():
    module = DySample(16.0, scale=2.0, style="PL", groups=np.int64(2))
    assert (module.in_channels, module.scale, module.style, module.groups) == (16, 2, "pl", 2)
    assert isinstance(module.scale, int)


@pytest.mark.parametrize(
    "shape",
    [(16, 5, 5), (1, 1, 16, 5, 5), (2, 8, 5, 5), (2, 32, 5, 5), (16,)],
    ids=["3d", "5d", "too-few-channels", "too-many-channels", "1d"],
)
def test_wrong_input_raises_a_clear_error(shape):
    module = DySample(16)
    with pytest.raises(
        ValueError, match=r"expects input of shape \(B, 16, H, W\), got \[" + ", ".join(map(str, shape))
    ):
        module(torch.randn(shape))


# --------------------------------------------------------------------------------------------
# Dtypes, layouts, autocast, devices


@pytest.mark.parametrize(
    ("dtype", "tolerance"),
    # half types also build the sampling grid in their own precision (as the authors' code does):
    # bfloat16 places points on a ~1/16-pixel lattice at these sizes, errors ~0.1 on N(0, 1) data
    [(torch.float64, 1e-9), (torch.float32, 2e-5), (torch.float16, 3e-2), (torch.bfloat16, 0.25)],
    ids=["float64", "float32", "float16", "bfloat16"],
)
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_every_float_dtype_matches_the_reference(style, dyscope, dtype, tolerance):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).to(dtype)
    randomise(module, seed=11, offset_pixels=1.0)
    x = random_input((2, 16, 6, 7), seed=12).to(dtype)
    out = module(x)
    assert out.dtype == dtype
    # the reference gets the weights and input as rounded to ``dtype``: what is left is the arithmetic
    expected = dysample_reference(x.double().numpy(), weights_of(module), 2, style, 2)
    error = np.abs(out.detach().double().numpy() - expected).max()
    assert error < tolerance, f"max error {error} for {dtype}"


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_autocast_matches_the_reference(style, dyscope):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope)
    weights = randomise(module, seed=21, offset_pixels=1.0)
    x = random_input((2, 16, 6, 7), seed=22).float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x)
    assert out.dtype in (torch.float32, torch.bfloat16)
    expected = dysample_reference(x.double().numpy(), weights, 2, style, 2)
    assert np.abs(out.detach().double().numpy() - expected).max() < 0.15


def non_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as ``x`` in a strided view (every other column of a wider tensor)."""
    wide = torch.zeros(*x.shape[:3], 2 * x.shape[3], dtype=x.dtype)
    wide[..., ::2] = x
    view = wide[..., ::2]
    assert not view.is_contiguous()
    return view


@pytest.mark.parametrize(
    "layout",
    ["channels_last", "non_contiguous", "transposed", "module_channels_last"],
)
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_memory_layouts_give_the_contiguous_result(style, dyscope, layout):
    module = DySample(16, scale=2, style=style, groups=4, dyscope=dyscope)
    randomise(module, seed=31, offset_pixels=2.0)
    x = torch.randn(2, 16, 5, 7)
    expected = module(x)
    if layout == "channels_last":
        other = x.contiguous(memory_format=torch.channels_last)
    elif layout == "non_contiguous":
        other = non_contiguous(x)
    elif layout == "transposed":  # H and W swapped in memory
        other = x.transpose(2, 3).contiguous().transpose(2, 3)
    else:
        module = module.to(memory_format=torch.channels_last)
        other = x.contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(module(other), expected, rtol=0, atol=1e-5)


def test_forward_builds_nothing_on_the_host():
    # on the meta device any CPU tensor built in forward (a grid, a normaliser) would fail to combine
    module = DySample(18, scale=3, style="pl", groups=2, dyscope=True).to("meta")
    assert module(torch.empty(2, 18, 7, 5, device="meta")).shape == (2, 18, 21, 15)


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_cuda_matches_the_reference(style, dyscope, dtype):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).to("cuda", dtype)
    randomise(module, seed=41, offset_pixels=1.0)
    x = random_input((2, 16, 6, 7), seed=42).to(dtype)
    out = module(x.cuda().contiguous(memory_format=torch.channels_last))
    assert out.device.type == "cuda" and out.dtype == dtype
    expected = dysample_reference(x.double().numpy(), weights_of(module), 2, style, 2)
    tolerance = {torch.float32: 2e-5, torch.float16: 3e-2, torch.bfloat16: 0.25}[dtype]
    assert np.abs(out.double().cpu().detach().numpy() - expected).max() < tolerance


@CUDA
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_cuda_autocast_and_backward(style, dyscope):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope)
    weights = randomise(module, seed=51, offset_pixels=1.0)
    module = module.cuda()
    x = random_input((2, 16, 6, 7), seed=52).float()
    with torch.autocast("cuda", dtype=torch.float16):
        out = module(x.cuda())
    expected = dysample_reference(x.double().numpy(), weights, 2, style, 2)
    assert np.abs(out.double().cpu().detach().numpy() - expected).max() < 5e-2
    out.float().square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())


# --------------------------------------------------------------------------------------------
# Gradients


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_gradcheck_through_input_and_every_parameter(style, dyscope):
    module = DySample(4, scale=2, style=style, groups=1, dyscope=dyscope).double()
    randomise(module, seed=61, offset_pixels=0.7)
    names = [name for name, _ in module.named_parameters()]
    parameters = tuple(p.detach().clone().requires_grad_(True) for p in module.parameters())
    x = random_input((1, 4, 3, 2), seed=62).requires_grad_(True)

    def forward(x, *parameter_values):
        return torch.func.functional_call(module, dict(zip(names, parameter_values, strict=True)), (x,))

    assert torch.autograd.gradcheck(forward, (x, *parameters), eps=1e-6, atol=1e-5, fast_mode=True)


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_gradients_reach_every_parameter_from_the_paper_initialisation(style, dyscope):
    torch.manual_seed(0)
    module = DySample(16, scale=2, style=style, groups=4, dyscope=dyscope)
    module(torch.randn(2, 16, 5, 6)).square().sum().backward()
    expected = {"offset.weight", "offset.bias"} | ({"scope.weight"} if dyscope else set())
    assert {name for name, _ in module.named_parameters()} == expected
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.count_nonzero(parameter.grad) > 0, name
    assert not module.init_pos.requires_grad


# --------------------------------------------------------------------------------------------
# TorchScript, trace, compile, export: one graph for every resolution


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")  # torch >= 2.9 deprecates jit
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_traced_module_stays_correct_at_other_resolutions(style, dyscope):
    module = DySample(16, scale=2, style=style, groups=4, dyscope=dyscope).eval()
    randomise(module, seed=71, offset_pixels=2.0)
    traced = torch.jit.trace(module, torch.randn(1, 16, 6, 8))
    for shape in [(3, 16, 11, 5), (2, 16, 1, 1), (1, 16, 4, 13)]:
        x = torch.randn(shape)
        torch.testing.assert_close(traced(x), module(x), rtol=0, atol=1e-5)


def grid_sampler_calls(traced: torch.jit.ScriptModule) -> int:
    return [node.kind() for node in traced.inlined_graph.nodes()].count("aten::grid_sampler")


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
def test_a_users_trace_samples_every_group_with_one_grid_sample():
    # One call on a (B * groups) batch; the per-group split is for ncnn only, switched on by the export hook.
    module = DySample(16, scale=2, groups=4).eval()
    assert grid_sampler_calls(torch.jit.trace(module, torch.randn(1, 16, 6, 8))) == 1


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_grid_sample_per_group_gives_the_same_output_with_one_call_per_group(style, dyscope):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).double().eval()
    randomise(module, seed=75, offset_pixels=2.0)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    expected = module(x)
    module.export_form = module.export_form._replace(grid_sample_per_group=True)
    traced = torch.jit.trace(module, x)
    assert grid_sampler_calls(traced) == 2
    torch.testing.assert_close(traced(x), expected, rtol=0, atol=1e-12)
    other = torch.randn(1, 16, 3, 4, dtype=torch.float64)  # the traced split serves other sizes too
    torch.testing.assert_close(traced(other), module(other), rtol=0, atol=1e-12)


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_frozen_projection_gives_the_same_output_and_leaves_checkpoints_alone(style, dyscope):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).double().eval()
    randomise(module, seed=77, offset_pixels=2.0)
    x = torch.randn(2, 16, 5, 7, dtype=torch.float64)
    expected, keys = module(x), set(module.state_dict())
    module.freeze_projection()
    torch.testing.assert_close(module(x), expected, rtol=0, atol=1e-12)
    assert set(module.state_dict()) == keys
    # the traced conv reads the frozen buffers, not weights composed in the graph (what x2paddle needs)
    graph = torch.jit.trace(module, x).graph
    convolutions = [node for node in graph.nodes() if node.kind() in {"aten::_convolution", "aten::conv2d"}]
    assert len(convolutions) == 1
    weight_source = list(convolutions[0].inputs())[1].node()
    assert weight_source.kind() == "prim::GetAttr" and weight_source.s("name") == "frozen_projection_weight"


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_scripted_module_matches_eager(style, dyscope):
    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).eval()
    randomise(module, seed=81, offset_pixels=2.0)
    scripted = torch.jit.script(module)
    for shape in [(2, 16, 5, 7), (1, 16, 1, 3)]:
        x = torch.randn(shape)
        torch.testing.assert_close(scripted(x), module(x), rtol=0, atol=1e-5)
    with pytest.raises(Exception, match="expects input of shape"):
        scripted(torch.randn(1, 8, 4, 4))


def test_torch_export_with_dynamic_batch_and_resolution():
    from torch.export import Dim, export

    for style in ("lp", "pl"):
        module = DySample(16, scale=2, style=style, groups=2, dyscope=True).eval()
        randomise(module, seed=91, offset_pixels=2.0)
        dynamic_shapes = {"x": {0: Dim("batch", max=64), 2: Dim("height", max=2048), 3: Dim("width", max=2048)}}
        exported = export(module, (torch.randn(2, 16, 6, 8),), dynamic_shapes=dynamic_shapes).module()
        for shape in [(1, 16, 9, 5), (4, 16, 3, 12), (2, 16, 6, 8)]:
            x = torch.randn(shape)
            torch.testing.assert_close(exported(x), module(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize("sampler", ["grid_sample", "gather"])
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_litert_graph_builds_no_uint8_range(style, dyscope, sampler):
    # format=litert: litert-torch takes the torch.export program (static shapes), decomposes it and lowers
    # each aten.arange to stablehlo.iota. The converter folds iotas of int / float types into constants but
    # keeps a uint8 one as a STABLEHLO_IOTA op, which ai-edge-litert 2.3.0 cannot run (measured). torch
    # decomposes torch.eye into exactly that: arange(dtype=uint8) compared with itself.
    from yolo_dysample.export_policy import set_sampler

    module = DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).eval()
    set_sampler(module, sampler)
    program = torch.export.export(module, (torch.randn(1, 16, 6, 8),)).run_decompositions()
    ranges = [node for node in program.graph.nodes if node.op == "call_function" and "arange" in str(node.target)]
    assert [node.format_node() for node in ranges if node.kwargs.get("dtype") == torch.uint8] == []


def test_module_pickled_before_the_identity_buffer_still_runs():
    import pickle

    module = DySample(16, scale=2, style="pl", groups=2).double().eval()
    randomise(module, seed=95, offset_pixels=2.0)
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64)
    expected = module(x)
    del module.sub_pixel_identity  # what an older pickled checkpoint holds
    restored = pickle.loads(pickle.dumps(module))
    assert restored.sub_pixel_identity.dtype == torch.float64
    assert "sub_pixel_identity" not in restored.state_dict()
    torch.testing.assert_close(restored(x), expected, rtol=0, atol=0)


def test_torch_compile_captures_one_full_graph_for_every_resolution_and_trains():
    # Dynamo must capture forward in one graph (fullgraph) that serves every resolution (dynamic),
    # and AOTAutograd must derive its backward. The graphs then run through the "aot_eager"
    # backend: inductor's code generation is torch's own and costs ~1 minute cold on CPU, too
    # slow for this file's budget.
    import torch._dynamo

    captured_graphs = []

    def recording_backend(graph_module, example_inputs):
        captured_graphs.append(graph_module)
        return torch._dynamo.lookup_backend("aot_eager")(graph_module, example_inputs)

    torch._dynamo.reset()
    module = DySample(16, scale=2, style="pl", groups=2, dyscope=True)
    randomise(module, seed=101, offset_pixels=2.0)
    compiled = torch.compile(module, backend=recording_backend, fullgraph=True, dynamic=True)
    # batch >= 2: torch specialises sizes 0 and 1, so a batch of 1 would be a (torch's) recompile
    for shape in [(2, 16, 5, 7), (3, 16, 9, 4), (2, 16, 6, 6)]:
        x = torch.randn(shape)
        module.zero_grad()
        expected = module(x)
        expected.square().sum().backward()
        expected_gradients = [p.grad.clone() for p in module.parameters()]
        module.zero_grad()
        out = compiled(x)
        out.square().sum().backward()
        torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        for parameter, expected_gradient in zip(module.parameters(), expected_gradients, strict=True):
            torch.testing.assert_close(parameter.grad, expected_gradient, rtol=1e-4, atol=1e-4)
    assert len(captured_graphs) == 1, "a new resolution must not recompile"
    torch._dynamo.reset()


# --------------------------------------------------------------------------------------------
# API surface


def test_constructor_signature_and_repr():
    parameters = inspect.signature(DySample).parameters
    assert list(parameters) == ["in_channels", "scale", "style", "groups", "dyscope", "device", "dtype"]
    defaults = [parameters[name].default for name in ("scale", "style", "groups", "dyscope", "device", "dtype")]
    assert defaults == [2, "lp", 4, False, None, None]
    assert all(parameter.annotation is not inspect.Parameter.empty for parameter in parameters.values())
    text = repr(DySample(36, scale=3, style="pl", groups=2, dyscope=True))
    assert "in_channels=36, scale=3, style='pl', groups=2, dyscope=True" in text
    assert DySample.__doc__ and DySample.forward.__doc__


# --------------------------------------------------------------------------------------------
# Modules pickled by earlier versions, foreign state dicts, crafted checkpoints


class EarlierPickle:
    """Pickles as an earlier version's DySample did: the class by reference and its ``__dict__`` as it was then."""

    def __init__(self, state: dict) -> None:
        self.state = state

    @property
    def __class__(self):  # what pickle records as the object's class
        return DySample

    def __reduce_ex__(self, protocol):
        return copyreg.__newobj__, (DySample,), self.state


def earlier_state(module: DySample, **attributes) -> dict:
    """``module``'s ``__dict__`` in an earlier version's layout: export state in plain attributes, scope with a bias."""
    state = {key: value for key, value in vars(module).items() if key != "export_form"}
    state.update(sampler="grid_sample", grid_sample_per_group=False)
    state.update(attributes)
    return state


def with_scope_bias(module: DySample, seed: int) -> DySample:
    """``module`` with a random bias on its scope conv (the 2023 layout, which earlier versions pickled)."""
    if module.scope is not None:
        generator = torch.Generator().manual_seed(seed)
        bias = torch.randn(module.scope.weight.shape[0], generator=generator, dtype=module.scope.weight.dtype)
        module.scope.bias = torch.nn.Parameter(bias)
    return module


@pytest.mark.parametrize(
    ("attributes", "expected_form"),
    [
        ({}, ExportForm()),
        ({"sampler": "gather"}, ExportForm(sampler="gather")),
        ({"grid_sample_per_group": True}, ExportForm(grid_sample_per_group=True)),
        ({"drop": ("sampler", "grid_sample_per_group")}, ExportForm()),  # before either attribute existed
    ],
    ids=["grid_sample", "gather", "per-group", "no-attributes"],
)
@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_module_pickled_by_an_earlier_version_loads_and_computes_the_same(style, dyscope, attributes, expected_form):
    module = with_scope_bias(DySample(16, scale=2, style=style, groups=2, dyscope=dyscope).double().eval(), seed=5)
    weights = randomise(module, seed=96, offset_pixels=2.0)
    if dyscope:
        weights.scope_bias = module.scope.bias.detach().numpy()
    attributes = dict(attributes)
    state = earlier_state(module, **{k: v for k, v in attributes.items() if k != "drop"})
    for name in attributes.get("drop", ()):
        del state[name]
    restored = pickle.loads(pickle.dumps(EarlierPickle(state)))
    assert restored.export_form == expected_form
    assert not hasattr(restored, "sampler")
    x = random_input((2, 16, 4, 5), seed=97)
    np.testing.assert_allclose(run_module(restored, x), dysample_reference(x.numpy(), weights, 2, style, 2), atol=1e-6)
    again = pickle.loads(pickle.dumps(restored))  # and pickles again, in the current layout
    assert again.export_form == expected_form
    torch.testing.assert_close(again(x), restored(x), rtol=0, atol=0)


def test_module_pickled_with_frozen_projection_buffers_keeps_them():
    module = DySample(16, style="pl", groups=2, dyscope=True).double().eval()
    randomise(module, seed=98, offset_pixels=2.0)
    module.freeze_projection()
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64)
    state = earlier_state(module)  # the buffers' presence was the switch then
    restored = pickle.loads(pickle.dumps(EarlierPickle(state)))
    assert restored.export_form == ExportForm(frozen_projection=True)
    torch.testing.assert_close(restored(x), module(x), rtol=0, atol=0)


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_deepcopy_and_pickle_keep_the_export_form(style, dyscope):
    import copy

    module = DySample(16, style=style, groups=2, dyscope=dyscope)
    form = ExportForm(sampler="gather", grid_sample_per_group=True, sampler_chosen_by_user=True)
    module.export_form = form
    assert copy.deepcopy(module).export_form == form
    assert pickle.loads(pickle.dumps(module)).export_form == form
    assert isinstance(module.__getstate__()["export_form"], dict)  # restricted unpickling knows no ExportForm


def test_state_dict_of_another_scale_and_groups_is_refused_naming_both():
    # scale=2, groups=4 and scale=4, groups=1 give the same shapes (32 offset channels): only init_pos tells
    source = DySample(16, scale=2, groups=4).state_dict()
    target = DySample(16, scale=4, groups=1)
    assert {key: value.shape for key, value in source.items()} == {k: v.shape for k, v in target.state_dict().items()}
    with pytest.raises(RuntimeError, match=r"encodes scale=2, groups=4, but this DySample has scale=4, groups=1"):
        target.load_state_dict(source)
    with pytest.raises(RuntimeError, match=r"encodes scale=2, groups=4"):
        target.load_state_dict(source, strict=False)
    target.load_state_dict(DySample(16, scale=4, groups=1).state_dict())  # its own configuration loads


def test_state_dict_without_scope_bias_loads_into_a_module_that_has_one():
    # a module unpickled from an earlier version (scope with bias) takes a current-layout state dict strictly
    module = with_scope_bias(DySample(16, groups=2, dyscope=True).double(), seed=9)
    current = DySample(16, groups=2, dyscope=True).double()
    randomise(current, seed=10, offset_pixels=2.0)
    module.load_state_dict(current.state_dict(), strict=True)
    assert module.scope.bias is None
    x = torch.randn(1, 16, 3, 4, dtype=torch.float64)
    torch.testing.assert_close(module(x), current(x), rtol=0, atol=0)


def crafted_checkpoint(path, **attributes):
    """A normal-sized checkpoint whose DySample claims ``attributes`` (its tensors stay those of scale 2)."""
    module = DySample(16, scale=2, style="pl", groups=1)
    state = earlier_state(module, **attributes)
    state["_buffers"] = {key: value for key, value in state["_buffers"].items() if key != "sub_pixel_identity"}
    torch.save({"model": EarlierPickle(state)}, path)
    assert path.stat().st_size < 100_000
    return path


@pytest.mark.parametrize(
    ("attributes", "message"),
    [
        ({"scale": 120}, r"scale=120 must be a whole number in \[2, 16\]"),
        ({"scale": 300}, r"scale=300 must be a whole number in \[2, 16\]"),
        ({"scale": 4}, r"needs offset.weight of shape \(2, 1, 1, 1\), the file holds \(2, 4, 1, 1\)"),
        ({"groups": 4000}, r"groups=4000 must divide in_channels=16"),
        ({"style": "xx"}, r"style='xx'"),
    ],
)
def test_crafted_checkpoint_cannot_make_restricted_loading_allocate(tmp_path, attributes, message):
    # ULTRALYTICS_SAFE_LOAD=1 loads with weights_only=True and DySample allowed (the adapter adds it); unpickling
    # then runs DySample.__setstate__, which used to build a scale**4 identity from the claimed scale.
    from ultralytics.nn.tasks import torch_safe_load

    import yolo_dysample.ultralytics_adapter  # noqa: F401  (registration: DySample is a safe global)

    path = crafted_checkpoint(tmp_path / "crafted.pt", **attributes)
    with pytest.raises(Exception) as error:
        torch_safe_load(str(path), safe_only=True)
    assert re.search(message, str(error.value)), str(error.value)


# --------------------------------------------------------------------------------------------
# Initialisation and torch's global RNG


def test_dysample_initialisation_leaves_the_global_rng_stream_alone():
    torch.manual_seed(3)
    before = torch.get_rng_state()
    first = DySample(64, groups=4, dyscope=True)
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(3)
    again = DySample(64, groups=4, dyscope=True)
    assert torch.equal(first.offset.weight, again.offset.weight)  # follows the seed
    torch.manual_seed(4)
    assert not torch.equal(DySample(64, groups=4, dyscope=True).offset.weight, first.offset.weight)
    on_float64 = (torch.manual_seed(3), DySample(64, groups=4, dyscope=True, dtype=torch.float64))[1]
    torch.testing.assert_close(on_float64.offset.weight.float(), first.offset.weight, rtol=0, atol=0)


def test_same_seed_gives_the_stock_models_weights_in_every_shared_layer():
    from ultralytics.nn.tasks import DetectionModel

    import yolo_dysample.ultralytics_adapter as adapter

    adapter.register_with_ultralytics()
    torch.manual_seed(0)
    stock = DetectionModel("yolov8n.yaml", verbose=False).state_dict()
    torch.manual_seed(0)
    twin = DetectionModel("yolov8n-dysample.yaml", verbose=False).state_dict()
    assert set(stock) <= set(twin)  # nn.Upsample has no tensors: the twin only adds DySample's
    assert {".".join(key.split(".")[:2]) for key in set(twin) - set(stock)} == {"model.10", "model.13"}  # DySample
    unequal = [key for key in stock if not torch.equal(stock[key], twin[key])]
    assert unequal == []


# --------------------------------------------------------------------------------------------
# Non-finite values: NaN offsets read the first row / column, +-inf the border; nothing crashes

NAN_WEIGHTS_BACKWARD = """
import sys

import torch

from yolo_dysample import DySample, cpu_sampling

style, dyscope = sys.argv[1], sys.argv[2] == "1"
torch.manual_seed(0)
module = DySample(16, style=style, groups=2, dyscope=dyscope)
with torch.no_grad():
    module.offset.weight.fill_(float("nan"))  # a diverged offset conv: every offset is NaN
x = torch.randn(2, 16, 5, 6, requires_grad=True)
outputs = {}
for kernel in ("1", "0"):  # the compiled kernel where it builds, then the grid_sample path
    with cpu_sampling.kernel_disabled() if kernel == "0" else torch.enable_grad():
        module.zero_grad()
        out = module(x)
        out.square().sum().backward()
    outputs[kernel] = out.detach()
    assert torch.isfinite(out).all()
    # NaN offsets read the first row and column: every output value of a channel is its input's top-left pixel
    torch.testing.assert_close(out, x.detach()[:, :, :1, :1].expand_as(out), rtol=0, atol=0)
    assert torch.count_nonzero(module.offset.weight.grad) == 0  # no gradient reaches a point clamped to the border
torch.testing.assert_close(outputs["1"], outputs["0"], rtol=0, atol=0)  # kernel and grid_sample agree
print("ok")
"""


@pytest.mark.parametrize(("style", "dyscope"), VARIANTS)
def test_backward_through_nan_offset_weights_runs_and_reads_the_first_pixel(style, dyscope):
    # PyTorch's CPU grid_sampler_2d_backward (border padding) dies with SIGSEGV on a NaN point: run it apart.
    import subprocess
    import sys

    command = [sys.executable, "-c", NAN_WEIGHTS_BACKWARD, style, "1" if dyscope else "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, (result.returncode, result.stderr[-3000:])
    assert result.stdout.strip() == "ok"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize(("sampler", "opset"), [("grid_sample", 17), ("gather", 17), ("gather", 11)])
def test_exported_onnx_graph_runs_on_nan_and_inf_input(tmp_path, sampler, opset):
    onnxruntime = pytest.importorskip("onnxruntime")
    from yolo_dysample.export_policy import set_sampler

    module = DySample(16, groups=2, dyscope=True).eval()
    randomise(module, seed=111, offset_pixels=2.0)
    set_sampler(module, sampler)
    path = tmp_path / "dysample.onnx"
    torch.onnx.export(
        module, (torch.randn(1, 16, 6, 7),), str(path), opset_version=opset, dynamo=False,
        input_names=["x"], dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
    )  # fmt: skip
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 16, 6, 7)
    x[0, :, 2, 3] = float("nan")  # one NaN pixel: its offsets are NaN, and so are the sampling points there
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        expected = module(x).numpy()
    assert out.shape == (2, 16, 12, 14)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4, equal_nan=True)
    assert np.isfinite(out[1]).all()  # the other image is untouched
    x[1, :, 4, 1] = float("inf")  # +-inf features give infinite offsets; runtimes differ in how a 0 * inf weight
    x[1, 3, 0, 0] = -float("inf")  # mixes in, so only: the graph runs
    (out,) = session.run(None, {"x": x.numpy()})
    assert out.shape == (2, 16, 12, 14)
