"""Which standard-op formulation of DySample's sampling runs fastest in ONNX Runtime on CPU.

DySample samples its input bilinearly, with border padding, at learned points. ONNX Runtime's
``GridSample`` does that at about 20 ns per sampled value; the same layer's bilinear ``Resize`` reads
the input once and writes the output once. This study writes the sampling in several exact forms
built from standard ONNX operators, exports each as a whole DySample layer (offset convolution
included), and times them in ONNX Runtime, interleaved, against ``Resize`` on the same shape.

Every candidate takes the offsets in input pixels, ``(B, 2 * groups * s**2, H, W)`` ordered
``(group, sub-pixel, axis)``, and the checkpoint's initial positions, and returns ``(B, C, s*H, s*W)``;
:func:`check_candidates` compares each against ``F.grid_sample``.

    python -m yolo_dysample.tools.onnx_sampling_study --quick
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import roi_align

from yolo_dysample.sampling import sample_groups, sampling_grid
from yolo_dysample.tools.bench_common import load_average, machine_summary
from yolo_dysample.tools.doc_sections import replace_section
from yolo_dysample.tools.timing import interleaved_samples

__all__ = [
    "CANDIDATES",
    "NECK_SHAPES",
    "check_candidates",
    "layer_table",
    "main",
    "pixel_coordinates",
]

# (channels, input height = width): YOLOv8n's two necks, YOLOv8s's, and a large map

NECK_SHAPES = ((256, 20), (128, 40), (512, 20), (256, 40), (256, 80))

DOC = Path(__file__).resolve().parents[2] / "docs" / "performance.md"
BEGIN_MARKER = "<!-- BEGIN onnx-sampling (python -m yolo_dysample.tools.onnx_sampling_study --write) -->"
END_MARKER = "<!-- END onnx-sampling -->"
GROUPS = 4

SCALE = 2


def pixel_coordinates(
    offsets: torch.Tensor, initial_positions: torch.Tensor, groups: int, scale: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampling points in input-pixel indices, border-clamped, each ``(B * groups, s*H, s*W)``.

    ``grid_sample``'s normalised grid (``align_corners=False``) maps back to ``w + G_x + O_x``: the
    normalisation and its inverse cancel, so they are not computed. NaN reads the first row/column
    (as ``-inf``), ``+-inf`` the border.
    """
    batch, rows, height, width = offsets.shape
    dtype = torch.promote_types(offsets.dtype, torch.float32)
    points = offsets.to(dtype).reshape(batch, rows // 2, 2, height, width)
    initial = initial_positions.to(dtype).reshape(2, -1).t().reshape(1, -1, 2, 1, 1)  # (1, g s^2, 2, 1, 1)
    columns = torch.arange(width, dtype=dtype, device=offsets.device).reshape(1, 1, 1, width)
    rows_ = torch.arange(height, dtype=dtype, device=offsets.device).reshape(1, 1, height, 1)
    x = points[:, :, 0] + initial[:, :, 0] + columns  # (B, g s^2, H, W)
    y = points[:, :, 1] + initial[:, :, 1] + rows_
    x = torch.nan_to_num(x, nan=0.0).clamp(0, width - 1)  # NaN as -inf: the first column
    y = torch.nan_to_num(y, nan=0.0).clamp(0, height - 1)

    def to_output_layout(coordinate: torch.Tensor) -> torch.Tensor:  # (b, g, i, j, h, w) -> (b g, h i, w j)
        coordinate = coordinate.reshape(batch * groups, scale, scale, height, width).permute(0, 3, 1, 4, 2)
        return coordinate.reshape(batch * groups, scale * height, scale * width)

    return to_output_layout(x), to_output_layout(y)


def _corners(x: torch.Tensor, y: torch.Tensor, height: int, width: int):
    """Left/top neighbour index, right/bottom index and the weights past the left/top neighbour."""
    x_left, y_top = x.floor(), y.floor()
    weight_x, weight_y = x - x_left, y - y_top
    x_right = (x_left + 1).clamp(max=width - 1).long()
    y_bottom = (y_top + 1).clamp(max=height - 1).long()
    return x_left.long(), x_right, y_top.long(), y_bottom, weight_x, weight_y


def sample_grid_sample(x, offsets, initial_positions, groups, scale):
    """``F.grid_sample`` on the normalised grid: ONNX ``GridSample``."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    grid = torch.stack(((2 * px + 1) / width - 1, (2 * py + 1) / height - 1), -1).to(x.dtype)
    grouped = x.reshape(batch * groups, channels // groups, height, width)
    out = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(batch, channels, scale * height, scale * width)


def _channels_last_table(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, channels, height, width = x.shape
    grouped = x.reshape(batch * groups, channels // groups, height * width)
    return grouped.permute(0, 2, 1).reshape(batch * groups * height * width, channels // groups)


def _image_start(x: torch.Tensor, groups: int) -> torch.Tensor:
    batch, _, height, width = x.shape
    return (torch.arange(batch * groups, device=x.device) * (height * width)).reshape(-1, 1, 1)


def _to_nchw(sampled: torch.Tensor, batch: int, channels: int, out_height: int, out_width: int) -> torch.Tensor:
    groups_total = sampled.shape[0] // (out_height * out_width)
    sampled = sampled.reshape(groups_total, out_height * out_width, -1).permute(0, 2, 1)
    return sampled.reshape(batch, channels, out_height, out_width)


def sample_four_gathers(x, offsets, initial_positions, groups, scale):
    """Channels-last table, one Gather per neighbour, weighted sum."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    x_left, x_right, y_top, y_bottom, wx, wy = _corners(px, py, height, width)
    start = _image_start(x, groups)
    top, bottom = start + y_top * width, start + y_bottom * width
    table = _channels_last_table(x, groups).to(wx.dtype)
    wx, wy = wx.reshape(-1, 1), wy.reshape(-1, 1)
    sampled = (
        table[(top + x_left).reshape(-1)] * ((1 - wx) * (1 - wy))
        + table[(top + x_right).reshape(-1)] * (wx * (1 - wy))
        + table[(bottom + x_left).reshape(-1)] * ((1 - wx) * wy)
        + table[(bottom + x_right).reshape(-1)] * (wx * wy)
    )
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def sample_one_gather(x, offsets, initial_positions, groups, scale):
    """Channels-last table, one Gather for all four neighbours, Mul and ReduceSum."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    x_left, x_right, y_top, y_bottom, wx, wy = _corners(px, py, height, width)
    start = _image_start(x, groups)
    top, bottom = start + y_top * width, start + y_bottom * width
    rows = torch.stack((top + x_left, top + x_right, bottom + x_left, bottom + x_right), -1)  # (bg, oh, ow, 4)
    weights = torch.stack(((1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy), -1)
    table = _channels_last_table(x, groups).to(wx.dtype)
    corners = table[rows.reshape(-1)].reshape(-1, 4, channels // groups)
    sampled = (corners * weights.reshape(-1, 4, 1)).sum(1)
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def _patch_table(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Rows ``(n, y, x)`` holding the 2x2 neighbourhood ``[(y, x), (y, x+1), (y+1, x), (y+1, x+1)]`` x channels.

    Edge-replicated past the last row/column; where the replica is read, bilinear weights give it 0.
    """
    batch, channels, height, width = x.shape
    per_group = channels // groups
    cl = x.reshape(batch * groups, per_group, height, width).permute(0, 2, 3, 1)  # (bg, H, W, c)
    right = torch.cat((cl[:, :, 1:], cl[:, :, -1:]), 2)
    pairs = torch.cat((cl, right), 3)  # (bg, H, W, 2c)
    below = torch.cat((pairs[:, 1:], pairs[:, -1:]), 1)
    return torch.cat((pairs, below), 3).reshape(-1, 4 * per_group)  # (bg H W, 4c)


def _patch_rows_and_weights(x, offsets, initial_positions, groups, scale):
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    x_left, y_top = px.floor(), py.floor()
    wx, wy = px - x_left, py - y_top
    rows = _image_start(x, groups) + y_top.long() * width + x_left.long()
    return rows.reshape(-1), wx.reshape(-1, 1), wy.reshape(-1, 1)


def sample_patch_reduce(x, offsets, initial_positions, groups, scale):
    """2x2 patch table, one Gather of 4c-float rows, Mul and ReduceSum."""
    batch, channels, height, width = x.shape
    rows, wx, wy = _patch_rows_and_weights(x, offsets, initial_positions, groups, scale)
    weights = torch.cat(((1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy), 1).unsqueeze(-1)
    patches = _patch_table(x, groups).to(wx.dtype)[rows].reshape(-1, 4, channels // groups)
    sampled = (patches * weights).sum(1)
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def sample_patch_matmul(x, offsets, initial_positions, groups, scale):
    """2x2 patch table, one Gather, the weighting as a batched (1 x 4) @ (4 x c) MatMul."""
    batch, channels, height, width = x.shape
    rows, wx, wy = _patch_rows_and_weights(x, offsets, initial_positions, groups, scale)
    weights = torch.cat(((1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy), 1).unsqueeze(1)
    patches = _patch_table(x, groups).to(wx.dtype)[rows].reshape(-1, 4, channels // groups)
    sampled = torch.matmul(weights, patches).reshape(-1, channels // groups)
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def sample_patch_lerp(x, offsets, initial_positions, groups, scale):
    """2x2 patch table, one Gather, lerp along x on both rows, then along y."""
    batch, channels, height, width = x.shape
    per_group = channels // groups
    rows, wx, wy = _patch_rows_and_weights(x, offsets, initial_positions, groups, scale)
    patches = _patch_table(x, groups).to(wx.dtype)[rows].reshape(-1, 2, 2, per_group)
    wx = wx.reshape(-1, 1, 1)
    across = patches[:, :, 0] + wx * (patches[:, :, 1] - patches[:, :, 0])  # (P, 2, c)
    sampled = across[:, 0] + wy * (across[:, 1] - across[:, 0])
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def _corner_rows_and_weights(x, offsets, initial_positions, groups, scale):
    """Neighbour indices ``(4, B*g, P)`` inside each ``H*W`` image and their weights, same shape."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    x_left, x_right, y_top, y_bottom, wx, wy = _corners(px, py, height, width)
    top, bottom = y_top * width, y_bottom * width
    indices = torch.stack((top + x_left, top + x_right, bottom + x_left, bottom + x_right))
    weights = torch.stack(((1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy))
    return indices.reshape(4, batch * groups, -1), weights.reshape(4, batch * groups, -1)


def sample_gather_then_transpose(x, offsets, initial_positions, groups, scale):
    """Channels-last one Gather, one Transpose of the corners to channels-first, weights broadcast over rows."""
    batch, channels, height, width = x.shape
    indices, weights = _corner_rows_and_weights(x, offsets, initial_positions, groups, scale)
    indices = indices + _image_start(x, groups).reshape(1, -1, 1)
    table = _channels_last_table(x, groups).to(weights.dtype)
    corners = table[indices.reshape(-1)].reshape(4, batch * groups, -1, channels // groups).permute(0, 1, 3, 2)
    sampled = (corners * weights.unsqueeze(2)).sum(0)  # (B*g, c, P)
    return sampled.to(x.dtype).reshape(batch, channels, scale * height, scale * width)


def sample_channels_first_gather(x, offsets, initial_positions, groups, scale):
    """Channels-first table ``(c, g*H*W)``, one Gather of single values on axis 1, weights broadcast over c."""
    batch, channels, height, width = x.shape
    per_group = channels // groups
    indices, weights = _corner_rows_and_weights(x, offsets, initial_positions, groups, scale)
    indices = indices + _image_start(x, groups).reshape(1, -1, 1)
    table = x.reshape(batch * groups, per_group, height * width).permute(1, 0, 2).reshape(per_group, -1)
    corners = table[:, indices.reshape(-1)].reshape(per_group, 4, batch * groups, -1).to(weights.dtype)
    sampled = (corners * weights).sum(1)  # (c, B*g, P)
    sampled = sampled.permute(1, 0, 2)
    return sampled.to(x.dtype).reshape(batch, channels, scale * height, scale * width)


def sample_gather_elements(x, offsets, initial_positions, groups, scale):
    """GatherElements on the NCHW input with indices expanded over channels, weights broadcast over c."""
    batch, channels, height, width = x.shape
    per_group = channels // groups
    indices, weights = _corner_rows_and_weights(x, offsets, initial_positions, groups, scale)
    points = indices.shape[-1]
    indices = indices.permute(1, 0, 2).reshape(batch * groups, 1, 4 * points).expand(-1, per_group, -1)
    grouped = x.reshape(batch * groups, per_group, height * width).to(weights.dtype)
    corners = torch.gather(grouped, 2, indices).reshape(batch * groups, per_group, 4, points)
    sampled = (corners * weights.permute(1, 0, 2).unsqueeze(1)).sum(2)
    return sampled.to(x.dtype).reshape(batch, channels, scale * height, scale * width)


def sample_roi_align(x, offsets, initial_positions, groups, scale):
    """ONNX ``RoiAlign``: one zero-size box per point and group, one bilinear sample, read across all channels."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)  # (B*g, oh, ow)
    image = torch.arange(batch * groups, dtype=px.dtype, device=x.device).reshape(-1, 1, 1).expand_as(px)
    # half-pixel boxes: the sample sits at (x1 + x2) / 2 - 0.5 = px; zero size, one sample
    boxes = torch.stack((image, px + 0.5, py + 0.5, px + 0.5, py + 0.5), -1).reshape(-1, 5)
    grouped = x.reshape(batch * groups, channels // groups, height, width)
    sampled = roi_align(grouped.to(px.dtype), boxes, 1, 1.0, 1, True)  # (B*g*P, c, 1, 1)
    return _to_nchw(sampled.to(x.dtype).reshape(-1, channels // groups), batch, channels, scale * height, scale * width)


def _natural_pixel_coordinates(offsets, initial_positions, groups, scale):
    """Border-clamped sampling points ``(B*g, s, s, H, W)`` in the offsets' own order (no permute)."""
    batch, rows, height, width = offsets.shape
    dtype = torch.promote_types(offsets.dtype, torch.float32)
    points = offsets.to(dtype).reshape(batch * groups, scale * scale, 2, height, width)
    initial = initial_positions.to(dtype).reshape(2, groups, scale * scale).permute(1, 2, 0)
    initial = initial.reshape(1, groups, scale * scale, 2, 1, 1).expand(batch, -1, -1, -1, -1, -1)
    initial = initial.reshape(batch * groups, scale * scale, 2, 1, 1)
    columns = torch.arange(width, dtype=dtype, device=offsets.device).reshape(1, 1, 1, width)
    rows_ = torch.arange(height, dtype=dtype, device=offsets.device).reshape(1, 1, height, 1)
    x = torch.nan_to_num(points[:, :, 0] + initial[:, :, 0] + columns, nan=0.0).clamp(0, width - 1)
    y = torch.nan_to_num(points[:, :, 1] + initial[:, :, 1] + rows_, nan=0.0).clamp(0, height - 1)
    return x, y  # (B*g, s*s, H, W)


def _difference_tables(x: torch.Tensor, groups: int, dtype: torch.dtype):
    """Channels-last value, x-difference, y-difference and cross-difference tables, rows ``(n, y, x)``."""
    batch, channels, height, width = x.shape
    cl = x.reshape(batch * groups, channels // groups, height, width).permute(0, 2, 3, 1).to(dtype)
    dx = torch.cat((cl[:, :, 1:], cl[:, :, -1:]), 2) - cl  # 0 past the last column (border)
    dy = torch.cat((cl[:, 1:], cl[:, -1:]), 1) - cl
    dxy = torch.cat((dx[:, 1:], dx[:, -1:]), 1) - dx
    return [table.reshape(-1, channels // groups) for table in (cl, dx, dy, dxy)]


def _difference_sampling(x, px, py, groups):
    """``v + wx dx + wy dy + wx wy dxy`` at the top-left neighbours of ``(px, py)``, rows in their order."""
    batch, channels, height, width = x.shape
    x_left, y_top = px.floor(), py.floor()
    wx, wy = px - x_left, py - y_top
    wxy = wx * wy
    start = (torch.arange(batch * groups, device=x.device) * (height * width)).reshape(-1, *([1] * (px.dim() - 1)))
    rows = (start + y_top.long() * width + x_left.long()).reshape(-1)
    value, dx, dy, dxy = _difference_tables(x, groups, px.dtype)
    return value[rows] + wx.reshape(-1, 1) * dx[rows] + wy.reshape(-1, 1) * dy[rows] + wxy.reshape(-1, 1) * dxy[rows]


def sample_differences(x, offsets, initial_positions, groups, scale):
    """Value / difference tables, one index, four Gathers, three Muls; points permuted before sampling."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    sampled = _difference_sampling(x, px, py, groups)
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def sample_differences_folded(x, offsets, initial_positions, groups, scale):
    """As ``differences``, the sub-pixel permute folded into the one output Transpose."""
    batch, channels, height, width = x.shape
    px, py = _natural_pixel_coordinates(offsets, initial_positions, groups, scale)
    sampled = _difference_sampling(x, px, py, groups)  # rows (b g, i, j, h, w)
    sampled = sampled.reshape(batch * groups, scale, scale, height, width, channels // groups)
    sampled = sampled.permute(0, 5, 3, 1, 4, 2)  # (b g, c, h, i, w, j)
    return sampled.to(x.dtype).reshape(batch, channels, scale * height, scale * width)


def sample_four_gathers_flat_weights(x, offsets, initial_positions, groups, scale):
    """``four_gathers`` with the weights formed before the broadcast reshape."""
    batch, channels, height, width = x.shape
    px, py = pixel_coordinates(offsets, initial_positions, groups, scale)
    x_left, x_right, y_top, y_bottom, wx, wy = _corners(px, py, height, width)
    start = _image_start(x, groups)
    top, bottom = start + y_top * width, start + y_bottom * width
    table = _channels_last_table(x, groups).to(wx.dtype)
    weights = [w.reshape(-1, 1) for w in ((1 - wx) * (1 - wy), wx * (1 - wy), (1 - wx) * wy, wx * wy)]
    sampled = (
        table[(top + x_left).reshape(-1)] * weights[0]
        + table[(top + x_right).reshape(-1)] * weights[1]
        + table[(bottom + x_left).reshape(-1)] * weights[2]
        + table[(bottom + x_right).reshape(-1)] * weights[3]
    )
    return _to_nchw(sampled.to(x.dtype), batch, channels, scale * height, scale * width)


def sample_package_gather(x, offsets, initial_positions, groups, scale):
    """The package's earlier export-safe sampler: ``sampling_grid`` then ``grid_sample_by_gather``."""
    grid = sampling_grid(x, offsets, initial_positions, groups, scale)
    return sample_groups(x, grid, groups, by_gather=True)


def sample_difference_tables(x, offsets, initial_positions, groups, scale):
    """The package's ONNX sampler: ``sampling_grid`` then ``grid_sample_by_difference_tables``."""
    grid = sampling_grid(x, offsets, initial_positions, groups, scale)
    return sample_groups(x, grid, groups, by_difference_tables=True)


CANDIDATES: dict[str, Callable] = {  # name -> sampler(x, offsets, initial_positions, groups, scale)
    "grid_sample": sample_grid_sample,
    "gather": sample_package_gather,
    "four_gathers": sample_four_gathers,
    "four_gathers_flat": sample_four_gathers_flat_weights,
    "one_gather": sample_one_gather,
    "gather_transpose": sample_gather_then_transpose,
    "patch_reduce": sample_patch_reduce,
    "patch_matmul": sample_patch_matmul,
    "patch_lerp": sample_patch_lerp,
    "cf_gather": sample_channels_first_gather,
    "gather_elements": sample_gather_elements,
    "roi_align": sample_roi_align,
    "differences": sample_differences,
    "differences_folded": sample_differences_folded,
    "difference_tables": sample_difference_tables,
}


class _Layer(nn.Module):
    """A DySample-shaped layer: 1x1 offset conv (static scope) then one sampling candidate."""

    def __init__(self, channels: int, sampler: Callable, groups: int = GROUPS, scale: int = SCALE):
        super().__init__()
        from yolo_dysample import DySample

        reference = DySample(channels, scale=scale, groups=groups)
        self.offset = nn.Conv2d(channels, 2 * groups * scale * scale, 1)
        nn.init.normal_(self.offset.weight, std=0.3)  # far from zero: the sampling is real
        self.register_buffer("initial_positions", reference.init_pos.clone())
        self.sampler, self.groups, self.scale = sampler, groups, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sampler(x, self.offset(x), self.initial_positions, self.groups, self.scale)


class _Resize(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)


def check_candidates(shape=(2, 32, 7, 9), groups: int = GROUPS, scale: int = SCALE) -> dict[str, float]:
    """Max |difference| of every candidate from ``F.grid_sample`` in float64 (offsets reaching past the border)."""
    torch.manual_seed(0)
    batch, channels, height, width = shape
    x = torch.randn(shape, dtype=torch.float64)
    offsets = torch.randn(batch, 2 * groups * scale * scale, height, width, dtype=torch.float64) * 3
    from yolo_dysample import DySample

    initial = DySample(channels, scale=scale, groups=groups).init_pos.double()
    reference = sample_grid_sample(x, offsets, initial, groups, scale)
    return {
        name: float((fn(x, offsets, initial, groups, scale) - reference).abs().max()) for name, fn in CANDIDATES.items()
    }


def _onnx_session(module: nn.Module, example: torch.Tensor, threads: int, optimized_path: str | None = None):
    import onnxruntime

    buffer = io.BytesIO()
    with torch.no_grad():
        torch.onnx.export(module, (example,), buffer, opset_version=18, dynamo=False)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    if optimized_path:
        options.optimized_model_filepath = optimized_path
    return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])


def layer_table(
    shapes=NECK_SHAPES, threads: int = 1, rounds: int = 7, min_block_seconds: float = 0.1, candidates=None
) -> list[dict]:
    """Median ms per call of each candidate layer and of bilinear ``Resize``, and the ratio to ``Resize``."""
    names = list(candidates or CANDIDATES)
    rows = []
    for channels, size in shapes:
        torch.manual_seed(0)
        example = torch.randn(1, channels, size, size)
        calls = {"resize": _Resize()}
        calls.update({name: _Layer(channels, CANDIDATES[name]).eval() for name in names})
        runners = {}
        for name, module in calls.items():
            session = _onnx_session(module, example, threads)
            feed = {session.get_inputs()[0].name: example.numpy()}
            runners[name] = lambda session=session, feed=feed: session.run(None, feed)
        samples = interleaved_samples(runners, rounds=rounds, min_block_seconds=min_block_seconds)
        row = {"shape": f"{channels}x{size}x{size}->{2 * size}x{2 * size}", "threads": threads}
        for name, values in samples.items():
            row[name] = 1e3 * statistics.median(values)
        rows.append(row)
    return rows


def render(rows: list[dict]) -> str:
    """Markdown table: ms per layer and, in brackets, the ratio to ``Resize``."""
    names = [key for key in rows[0] if key not in ("shape", "threads")]
    lines = ["| layer | threads | " + " | ".join(names) + " |", "| --- | ---: |" + " ---: |" * len(names)]
    for row in rows:
        cells = [f"{row[name]:.2f} ({row[name] / row['resize']:.1f}x)" for name in names]
        lines.append(f"| {row['shape']} | {row['threads']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Check every candidate, print the per-layer table and optionally write it into the performance page."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of short blocks")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--candidates", nargs="+", choices=list(CANDIDATES))
    parser.add_argument("--write", action="store_true", help=f"write the table into {DOC.name} between the markers")
    args = parser.parse_args(argv)
    for name, difference in check_candidates().items():
        print(f"{name}: max |diff| from grid_sample {difference:.2e}")
    rounds, block = (3, 0.05) if args.quick else (9, 0.2)
    started = load_average()
    rows = [
        row
        for threads in args.threads
        for row in layer_table(threads=threads, rounds=rounds, min_block_seconds=block, candidates=args.candidates)
    ]
    import onnxruntime

    generated = (
        f"Measured on {machine_summary(torch.device('cpu'), max(args.threads))['cpu']}, "
        f"{time.strftime('%Y-%m-%d', time.gmtime())}, onnxruntime {onnxruntime.__version__}, "
        f"torch {torch.__version__}; "
        f"load average {started} at start, {load_average()} at the end; {rounds} interleaved rounds, medians. "
        "ms per layer (1x1 offset conv + sampling, groups 4, x2), in brackets the ratio to bilinear `Resize` on the "
        "same shape.\n\n" + render(rows) + "\n"
    )
    print(generated)
    if args.write:
        replace_section(DOC, BEGIN_MARKER, END_MARKER, generated, heading="## Sampling in ONNX Runtime")
        print(f"wrote {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
