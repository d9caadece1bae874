"""The difference-table sampler (ONNX's default) is grid_sample, and its export holds standard operators only."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from yolo_dysample import DySample
from yolo_dysample.export_policy import SAMPLER_ENVIRONMENT_VARIABLE, configure_for_export, sampler_for_export
from yolo_dysample.sampling import grid_sample_by_difference_tables
from yolo_dysample.tools import onnx_sampling_study


def border_grid_sample(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 6), (3, 2, 6, 1), (1, 1, 1, 1), (2, 8, 16, 9)])
def test_difference_tables_equal_grid_sample_with_points_past_every_border(shape):
    generator = torch.Generator().manual_seed(sum(shape))
    features = torch.randn(shape, dtype=torch.float64, generator=generator)
    grid = torch.rand(shape[0], 11, 13, 2, dtype=torch.float64, generator=generator) * 3.0 - 1.5
    grid[0, 0, :4] = torch.tensor([[-1.0, -1.0], [1.0, 1.0], [-2.0, 2.0], [1.0, -1.0]], dtype=torch.float64)
    expected = border_grid_sample(features, grid)
    torch.testing.assert_close(grid_sample_by_difference_tables(features, grid), expected, rtol=0, atol=1e-12)


def test_difference_tables_in_float32_and_float16_follow_grid_sample_to_rounding():
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(2, 16, 10, 12, generator=generator) * 10
    grid = torch.rand(2, 20, 24, 2, generator=generator) * 2.2 - 1.1
    expected = border_grid_sample(features.double(), grid.double()).float()
    torch.testing.assert_close(grid_sample_by_difference_tables(features, grid), expected, rtol=0, atol=1e-4)
    half = grid_sample_by_difference_tables(features.half(), grid.half())
    assert half.dtype == torch.float16
    reference = border_grid_sample(features.half().double(), grid.half().double())
    torch.testing.assert_close(half.double(), reference, rtol=2e-3, atol=2e-2)


def test_difference_tables_gradients_equal_grid_sample_gradients():
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(2, 3, 6, 7, dtype=torch.float64, generator=generator)
    grid = torch.rand(2, 5, 4, 2, dtype=torch.float64, generator=generator) * 2.6 - 1.3
    weights = torch.randn(2, 3, 5, 4, dtype=torch.float64, generator=generator)
    gradients = []
    for sampler in (border_grid_sample, grid_sample_by_difference_tables):
        leaves = features.clone().requires_grad_(), grid.clone().requires_grad_()
        (sampler(*leaves) * weights).sum().backward()
        gradients.append([leaf.grad for leaf in leaves])
    for mine, expected in zip(gradients[1], gradients[0], strict=True):
        torch.testing.assert_close(mine, expected, rtol=0, atol=1e-10)


def perturbed_layer(style: str) -> DySample:
    torch.manual_seed(0)
    layer = DySample(32, style=style, dyscope=True).eval()
    with torch.no_grad():
        for convolution in (layer.offset, layer.scope):
            convolution.weight.normal_(0, 0.5)  # points up to a few pixels away, past the border at the edges
            if convolution.bias is not None:
                convolution.bias.normal_(0, 1)
    return layer


@pytest.mark.parametrize("style", ["lp", "pl"])
def test_default_onnx_export_holds_only_standard_operators_and_matches_pytorch(monkeypatch, style):
    onnx = pytest.importorskip("onnx")
    onnxruntime = pytest.importorskip("onnxruntime")
    monkeypatch.delenv(SAMPLER_ENVIRONMENT_VARIABLE, raising=False)
    assert sampler_for_export("onnx") == "difference_tables"
    layer = perturbed_layer(style)
    exported_copy = perturbed_layer(style)
    configure_for_export(exported_copy, "onnx", 18)
    features = torch.randn(2, 32, 9, 13)
    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(
            exported_copy,
            (features,),
            buffer,
            opset_version=18,
            dynamo=False,
            input_names=["x"],
            dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}},
        )
    graph = onnx.load_from_string(buffer.getvalue()).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}  # no custom or contrib operator
    assert "GridSample" not in {node.op_type for node in graph.node}
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    for shape in ((2, 32, 9, 13), (1, 32, 5, 4)):  # the traced shape and another one: sizes come from the data
        x = torch.randn(shape)
        with torch.no_grad():
            expected = layer(x).numpy()
        np.testing.assert_allclose(session.run(None, {"x": x.numpy()})[0], expected, rtol=0, atol=1e-4)


def test_every_candidate_of_the_study_equals_grid_sample():
    differences = onnx_sampling_study.check_candidates()
    assert set(differences) == set(onnx_sampling_study.CANDIDATES)
    assert max(differences.values()) < 1e-12, differences


def test_a_quick_layer_study_gives_each_candidate_and_resize_per_shape():
    pytest.importorskip("onnxruntime")
    candidates = ["grid_sample", "difference_tables"]
    rows = onnx_sampling_study.layer_table(
        shapes=((16, 4), (8, 6)), threads=1, rounds=2, min_block_seconds=0.001, candidates=candidates
    )
    assert [row["shape"] for row in rows] == ["16x4x4->8x8", "8x6x6->12x12"]
    for row in rows:
        assert set(row) == {"shape", "threads", "resize", *candidates}
        assert all(row[name] > 0 for name in ("resize", *candidates))
    table = onnx_sampling_study.render(rows)
    assert table.splitlines()[0] == "| layer | threads | resize | grid_sample | difference_tables |"
    assert len(table.splitlines()) == 2 + len(rows)
