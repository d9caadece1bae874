"""The export policy: which sampler and form each export gets, and that a user's explicit choice wins."""

from __future__ import annotations

import pytest
import torch

from yolo_dysample import DySample
from yolo_dysample.export_policy import (
    FORMATS_NEEDING_GATHER,
    GATHER_MIN_ONNX_OPSET,
    GRID_SAMPLE_MIN_ONNX_OPSET,
    SAMPLER_ENVIRONMENT_VARIABLE,
    configure_for_export,
    dysample_layers,
    sampler_for_export,
    set_sampler,
    use_sampler,
)


def samplers(model: torch.nn.Module) -> list[str]:
    return [layer.export_form.sampler for layer in dysample_layers(model)]


def test_use_sampler_switches_every_layer_and_restores_them_after_an_error():
    model = torch.nn.Sequential(DySample(16), torch.nn.Identity(), DySample(16, style="pl"))
    set_sampler(model[2], "gather")
    with pytest.raises(RuntimeError, match="inside"):
        with use_sampler(model, "gather"):
            assert samplers(model) == ["gather", "gather"]
            assert all(layer.export_form.sampler_chosen_by_user for layer in dysample_layers(model))
            raise RuntimeError("inside")
    assert samplers(model) == ["grid_sample", "gather"]
    assert [layer.export_form.sampler_chosen_by_user for layer in dysample_layers(model)] == [False, True]
    assert set_sampler(model, "grid_sample") == 2
    assert samplers(model) == ["grid_sample", "grid_sample"]


def test_unknown_sampler_names_are_rejected():
    with pytest.raises(ValueError, match="not one of"):
        set_sampler(DySample(16), "nearest")
    with pytest.raises(ValueError, match="not one of"):
        with use_sampler(DySample(16), "Gather"):
            pass


@pytest.mark.parametrize(
    ("export_format", "opset", "expected"),
    [
        ("onnx", None, "difference_tables"),
        ("onnx", GRID_SAMPLE_MIN_ONNX_OPSET, "difference_tables"),
        ("onnx", GATHER_MIN_ONNX_OPSET, "difference_tables"),
        ("mnn", GRID_SAMPLE_MIN_ONNX_OPSET - 1, "gather"),
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


def test_configure_for_export_sets_the_format_sampler_and_leaves_stock_models_alone(monkeypatch):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16), DySample(16, style="pl"))
    configure_for_export(model, "mnn", 15)
    assert samplers(model) == ["gather", "gather"]
    configure_for_export(model, "onnx")
    assert samplers(model) == ["difference_tables", "difference_tables"]
    stock = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2))
    too_low = GATHER_MIN_ONNX_OPSET - 1
    assert configure_for_export(stock, "onnx", too_low) == 0  # no DySample: no opinion, no error
    with pytest.raises(ValueError, match="opset"):
        configure_for_export(model, "onnx", too_low)


def test_configure_for_export_splits_grid_sample_for_ncnn_only_and_freezes_the_projection_for_paddle(monkeypatch):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16), DySample(16, style="pl"))
    # a user's trace: one call per layer
    assert [layer.export_form.grid_sample_per_group for layer in model] == [False, False]
    configure_for_export(model, "ncnn")
    assert [layer.export_form.grid_sample_per_group for layer in model] == [True, True]
    for export_format in ("onnx", "torchscript", "openvino", "coreml", "mnn"):
        configure_for_export(model, export_format)
        assert [layer.export_form.grid_sample_per_group for layer in model] == [False, False], export_format
    assert not any(layer.export_form.frozen_projection for layer in model)
    configure_for_export(model, "paddle")
    assert all(layer.export_form.frozen_projection and hasattr(layer, "frozen_projection_weight") for layer in model)
    assert samplers(model) == ["gather", "gather"]


@pytest.mark.filterwarnings("ignore:`torch.jit.:FutureWarning")
@pytest.mark.parametrize("dyscope", [False, True])
def test_paddle_export_graph_has_none_of_the_ops_x2paddle_fails_on(monkeypatch, dyscope):
    # What x2paddle 1.6.0 (format=paddle) traces, after the export hook. Each op below stopped it (measured):
    # ones_like has no converter; index_select converts to a prim.index_select its code generator lacks;
    # floor becomes Python's math.floor on a tensor; a conv whose weight is computed in the graph needs its
    # bias as a constant (KeyError), and paddle's optimiser then mis-types the composed weight.
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16, dyscope=dyscope), DySample(16, style="pl", dyscope=dyscope)).eval()
    configure_for_export(model, "paddle")
    graph = torch.jit.trace(model, torch.randn(1, 16, 5, 6)).inlined_graph
    kinds = {node.kind() for node in graph.nodes()}
    assert kinds.isdisjoint({"aten::ones_like", "aten::index_select", "aten::floor", "aten::grid_sampler"})
    for node in graph.nodes():
        if node.kind() in {"aten::_convolution", "aten::conv2d"}:
            weight, bias = (list(node.inputs())[index].node() for index in (1, 2))
            assert weight.kind() == bias.kind() == "prim::GetAttr", node


def test_a_sampler_chosen_in_code_wins_over_the_format_and_the_environment_variable_over_both(monkeypatch):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16), DySample(16, style="pl"))
    set_sampler(model[0], "gather")  # the user's choice on one layer; the other is left to the format
    configure_for_export(model, "onnx")
    assert samplers(model) == ["gather", "difference_tables"]
    set_sampler(model, "grid_sample")
    configure_for_export(model, "paddle")  # a format that would get gather automatically
    assert samplers(model) == ["grid_sample", "grid_sample"]
    with pytest.raises(ValueError, match=r"set_sampler\('grid_sample'\) needs ONNX opset>=16"):
        configure_for_export(model, "onnx", GRID_SAMPLE_MIN_ONNX_OPSET - 1)
    monkeypatch.setenv(SAMPLER_ENVIRONMENT_VARIABLE, "gather")
    configure_for_export(model, "onnx")
    assert samplers(model) == ["gather", "gather"]


def test_automatic_choice_is_made_again_for_every_export(monkeypatch):
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    model = torch.nn.Sequential(DySample(16))
    configure_for_export(model, "paddle")
    configure_for_export(model, "onnx")  # an earlier automatic choice is no user choice
    assert samplers(model) == ["difference_tables"]
    assert not model[0].export_form.frozen_projection


def onnx_operators(path) -> list[str]:
    import onnx

    return [node.op_type for node in onnx.load(str(path)).graph.node]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_use_sampler_around_ultralytics_export_gives_a_gather_graph(monkeypatch, tmp_path):
    # The documented recipe: `with use_sampler(model.model, "gather"): model.export(format="onnx")`.
    pytest.importorskip("onnx")
    from ultralytics import YOLO

    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    checkpoint = tmp_path / "yolov8n-dysample.pt"
    YOLO("yolov8n-dysample.yaml").save(checkpoint)
    automatic = YOLO(checkpoint).export(format="onnx", imgsz=64, simplify=False)
    automatic_operators = onnx_operators(automatic)  # read now: the second export writes the same file
    assert automatic_operators.count("GridSample") == 0  # ONNX's default: the difference-table gathers
    model = YOLO(checkpoint)
    with use_sampler(model.model, "gather"):
        chosen = model.export(format="onnx", imgsz=64, simplify=False)
    operators = onnx_operators(chosen)
    assert operators.count("GridSample") == 0
    assert 2 <= operators.count("Gather") < automatic_operators.count("Gather")  # one per layer, not four
    assert samplers(model.model) == ["grid_sample", "grid_sample"]  # restored after the block
    with use_sampler(model.model, "grid_sample"):  # the other way round: GridSample where the default has none
        chosen = model.export(format="onnx", imgsz=64, simplify=False)
    assert onnx_operators(chosen).count("GridSample") == 2
