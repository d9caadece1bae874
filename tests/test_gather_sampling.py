"""The gather sampler is F.grid_sample(bilinear, border, align_corners=False), and the sampler choice works."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from yolo_dysample import DySample
from yolo_dysample.gather_sampling import (
    FORMATS_NEEDING_GATHER,
    GATHER_MIN_ONNX_OPSET,
    GRID_SAMPLE_MIN_ONNX_OPSET,
    SAMPLER_ENVIRONMENT_VARIABLE,
    choose_sampler_for_export,
    grid_sample_by_gather,
    sampler_for_export,
    set_sampler,
    use_sampler,
)

SETTINGS = settings(max_examples=40, deadline=None)


def grid_sample_border(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
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
    expected = grid_sample_border(features, grid)
    torch.testing.assert_close(grid_sample_by_gather(features, grid), expected, atol=1e-12, rtol=0)


@SETTINGS
@given(features_and_grid(torch.float32))
def test_gather_sampling_equals_grid_sample_in_float32(data):
    features, grid = data
    expected = grid_sample_border(features, grid)
    torch.testing.assert_close(grid_sample_by_gather(features, grid), expected, atol=2e-6, rtol=1e-6)


@SETTINGS
@given(features_and_grid(torch.float64), st.sampled_from([torch.float16, torch.bfloat16]))
def test_gather_sampling_in_half_precision_is_within_rounding_of_exact(data, dtype):
    """Low precision: compare with exact float64 sampling of the same (rounded) inputs.

    PyTorch's own CPU half grid_sample computes coordinates in half and is off by ~15 ulps; the
    gather sampler computes them in float32, so it must stay within a few ulps of the exact value.
    """
    features, grid = (tensor.to(dtype) for tensor in data)
    exact = grid_sample_border(features.double(), grid.double())
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
    features = torch.randn(batch, in_channels, height, width, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(seed + 1))
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


def test_use_sampler_switches_every_layer_and_restores_them_after_an_error():
    model = torch.nn.Sequential(DySample(16), torch.nn.Identity(), DySample(16, style="pl"))
    model[2].sampler = "gather"
    with pytest.raises(RuntimeError, match="inside"):
        with use_sampler(model, "gather"):
            assert [model[0].sampler, model[2].sampler] == ["gather", "gather"]
            raise RuntimeError("inside")
    assert [model[0].sampler, model[2].sampler] == ["grid_sample", "gather"]
    assert set_sampler(model, "grid_sample") == 2
    assert [model[0].sampler, model[2].sampler] == ["grid_sample", "grid_sample"]


def test_unknown_sampler_names_are_rejected():
    with pytest.raises(ValueError, match="not one of"):
        set_sampler(DySample(16), "nearest")
    with pytest.raises(ValueError, match="not one of"):
        with use_sampler(DySample(16), "Gather"):
            pass


def test_a_module_pickled_before_the_sampler_attribute_still_runs():
    layer = perturbed(DySample(16).double(), seed=1)
    features = torch.randn(1, 16, 3, 3, dtype=torch.float64)
    expected = layer(features)
    del layer.sampler  # what unpickling an older checkpoint gives
    torch.testing.assert_close(layer(features), expected)


@pytest.mark.parametrize(
    ("export_format", "opset", "expected"),
    [
        ("onnx", None, "grid_sample"),
        ("onnx", GRID_SAMPLE_MIN_ONNX_OPSET, "grid_sample"),
        ("onnx", GRID_SAMPLE_MIN_ONNX_OPSET - 1, "gather"),
        ("onnx", GATHER_MIN_ONNX_OPSET, "gather"),
        ("torchscript", None, "grid_sample"),
        ("openvino", None, "grid_sample"),
        *[(name, None, "gather") for name in sorted(FORMATS_NEEDING_GATHER)],
        *[(name.upper(), None, "gather") for name in sorted(FORMATS_NEEDING_GATHER)],
    ],
)
def test_automatic_sampler_per_export_format(monkeypatch, export_format, opset, expected):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    assert sampler_for_export(export_format, opset) == expected


def test_environment_variable_forces_a_sampler(monkeypatch):
    monkeypatch.setenv(SAMPLER_ENVIRONMENT_VARIABLE, "gather")
    assert sampler_for_export("onnx") == "gather"
    monkeypatch.setenv(SAMPLER_ENVIRONMENT_VARIABLE, "grid_sample")
    assert sampler_for_export(sorted(FORMATS_NEEDING_GATHER)[0]) == "grid_sample"
    with pytest.raises(ValueError, match="opset>=16"):
        sampler_for_export("onnx", GRID_SAMPLE_MIN_ONNX_OPSET - 1)
    monkeypatch.setenv(SAMPLER_ENVIRONMENT_VARIABLE, "bilinear")
    with pytest.raises(ValueError, match=SAMPLER_ENVIRONMENT_VARIABLE):
        sampler_for_export("onnx")


@pytest.mark.parametrize("opset", [7, GATHER_MIN_ONNX_OPSET - 1])
def test_onnx_opsets_below_the_lowest_that_carries_dysample_are_refused(monkeypatch, opset):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    with pytest.raises(ValueError, match=f"opset={opset}.*opset>={GATHER_MIN_ONNX_OPSET}"):
        sampler_for_export("onnx", opset)


class FakeExporter:
    def __init__(self, model, export_format, opset=None):
        self.model = model
        self.args = type("Args", (), {"format": export_format, "opset": opset})()


def test_export_callback_sets_the_format_sampler_and_leaves_stock_models_alone(monkeypatch):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16), DySample(16, style="pl"))
    choose_sampler_for_export(FakeExporter(model, "onnx", opset=15))
    assert [layer.sampler for layer in model] == ["gather", "gather"]
    choose_sampler_for_export(FakeExporter(model, "onnx"))
    assert [layer.sampler for layer in model] == ["grid_sample", "grid_sample"]
    stock = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2))
    too_low = GATHER_MIN_ONNX_OPSET - 1
    choose_sampler_for_export(FakeExporter(stock, "onnx", opset=too_low))  # no DySample: no opinion, no error
    with pytest.raises(ValueError, match="opset"):
        choose_sampler_for_export(FakeExporter(model, "onnx", opset=too_low))


def test_export_callback_splits_grid_sample_for_ncnn_only_and_freezes_the_projection_for_paddle(monkeypatch):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16), DySample(16, style="pl"))
    assert [layer.grid_sample_per_group for layer in model] == [False, False]  # a user's trace: one call per layer
    choose_sampler_for_export(FakeExporter(model, "ncnn"))
    assert [layer.grid_sample_per_group for layer in model] == [True, True]
    for export_format in ("onnx", "torchscript", "openvino", "coreml", "mnn"):
        choose_sampler_for_export(FakeExporter(model, export_format))
        assert [layer.grid_sample_per_group for layer in model] == [False, False], export_format
    assert not any(hasattr(layer, "frozen_projection_weight") for layer in model)
    choose_sampler_for_export(FakeExporter(model, "paddle"))
    assert all(hasattr(layer, "frozen_projection_weight") for layer in model)
    assert [layer.sampler for layer in model] == ["gather", "gather"]


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize("dyscope", [False, True])
def test_paddle_export_graph_has_none_of_the_ops_x2paddle_fails_on(monkeypatch, dyscope):
    # What x2paddle 1.6.0 (format=paddle) traces, after the export hook. Each op below stopped it (measured):
    # ones_like has no converter; index_select converts to a prim.index_select its code generator lacks;
    # floor becomes Python's math.floor on a tensor; a conv whose weight is computed in the graph needs its
    # bias as a constant (KeyError), and paddle's optimiser then mis-types the composed weight.
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16, dyscope=dyscope), DySample(16, style="pl", dyscope=dyscope)).eval()
    choose_sampler_for_export(FakeExporter(model, "paddle"))
    graph = torch.jit.trace(model, torch.randn(1, 16, 5, 6)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert kinds.isdisjoint({"aten::ones_like", "aten::index_select", "aten::floor", "aten::grid_sampler"})
    for node in graph.nodes():
        if node.kind() in {"aten::_convolution", "aten::conv2d"}:
            weight, bias = (list(node.inputs())[index].node() for index in (1, 2))
            assert weight.kind() == bias.kind() == "prim::GetAttr", node
