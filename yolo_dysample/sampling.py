"""Bilinear, border-clamped point sampling as plain tensor functions.

DySample (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023) samples its input
bilinearly, with border padding, at ``S = G + O``: ``G`` where bilinear interpolation samples, ``O`` the
learned offsets. These functions take tensors and integers only; they know nothing of the module that uses
them or of any exporter. Which sampler an export uses is decided in :mod:`yolo_dysample.export_policy`.

Guarantees:

- every sampler returns ``F.grid_sample(x, grid, mode="bilinear", padding_mode="border",
  align_corners=False)`` to float rounding (``tests/test_sampling.py``);
- sizes are read from the tensors, never from Python integers, so one traced graph serves every batch
  size and resolution;
- non-finite coordinates: :func:`sampling_grid` treats a NaN coordinate as ``-inf`` along its axis (it
  reads the first row or column) and clamps ``+-inf`` to the border, in forward and backward. PyTorch's
  CPU ``grid_sampler_2d_backward`` with border padding crashes the process on a NaN coordinate, and the
  gather sampler would index with ``INT64_MIN``; after :func:`sampling_grid` neither sees one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "bilinear_positions",
    "grid_sample_border",
    "grid_sample_by_difference_tables",
    "grid_sample_by_gather",
    "grid_sample_per_group",
    "sample_groups",
    "sampling_grid",
]


def bilinear_positions(scale: int, groups: int) -> torch.Tensor:
    """Where bilinear interpolation samples each sub-pixel, relative to the input-pixel centre (``G``).

    Args:
        scale (int): Upsampling factor.
        groups (int): Channel groups (each gets a copy).

    Returns:
        (torch.Tensor): float32, shape ``(1, 2 * groups * scale**2, 1, 1)``, channels ordered
            ``(axis, group, sub-pixel row, sub-pixel column)`` (the checkpoint order of ``init_pos``);
            axis 0 is x, axis 1 is y.

    Examples:
        >>> bilinear_positions(2, 1).flatten().tolist()
        [-0.25, 0.25, -0.25, 0.25, -0.25, -0.25, 0.25, 0.25]
    """
    steps = (torch.arange(scale, dtype=torch.float32) - (scale - 1) / 2) / scale  # (k - (s-1)/2) / s
    row_offset, column_offset = torch.meshgrid(steps, steps, indexing="ij")  # (s, s) each
    positions = torch.stack((column_offset, row_offset))  # (2, s, s): x then y
    return positions.unsqueeze(1).expand(2, groups, scale, scale).reshape(1, -1, 1, 1).clone()


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, which TorchScript cannot compile; scripted code gets ``False``."""
    if not torch.jit.is_scripting():
        return torch.onnx.is_in_onnx_export()
    return False


def sampling_grid(
    x: torch.Tensor,
    offsets: torch.Tensor,
    initial_positions: torch.Tensor,
    groups: int,
    scale: int,
    nan_to_first: bool = True,
) -> torch.Tensor:
    """The sampling points ``S = G + O`` as ``grid_sample``'s normalised grid, one per channel group.

    Built from ``x``'s shape, device and dtype (a cumulative sum of ones, no ``arange`` and no division by a
    traced size), so a traced graph serves every resolution; rank <= 4 throughout. Coordinates are computed
    in float32 at least (half inputs) and returned in ``x``'s dtype. NaN coordinates become ``-inf``, ``+-inf``
    the border (module docstring).

    Args:
        x (torch.Tensor): The input to sample, ``(B, C, H, W)`` (only its shape, device and dtype are read).
        offsets (torch.Tensor): ``O`` in input pixels, ``(B, 2 * groups * scale**2, H, W)``, channels ordered
            ``(group, sub-pixel, axis)``.
        initial_positions (torch.Tensor): ``G`` as :func:`bilinear_positions` returns it (any shape holding
            ``2 * groups * scale**2`` values in that ``(axis, group, sub-pixel)`` order).
        groups (int): Channel groups.
        scale (int): Upsampling factor.
        nan_to_first (bool): Send NaN coordinates to the first row / column (two ``where``). ``False`` clamps
            with one ``clamp`` instead, which keeps ``+-inf`` on the border but lets NaN through, for converters
            without comparisons (``[pnnx]``).

    Returns:
        (torch.Tensor): ``(B * groups, scale * H, scale * W, 2)``, x then y in ``[-1, 1]`` over the pixel
            edges (``align_corners=False``); batch entry ``b * groups + g`` belongs to group ``g`` of image ``b``.
    """
    batch, _, height, width = x.shape
    coordinate_dtype = torch.promote_types(x.dtype, torch.float32)  # [half] pixel arithmetic in float32
    if not torch.jit.is_tracing() and batch == 0:  # an empty batch: the pixel centres below come from x[:1]
        return x.new_zeros((0, scale * height, scale * width, 2))
    points = offsets.to(coordinate_dtype).reshape(batch, groups * scale * scale, 2, height * width)
    initial = initial_positions.to(coordinate_dtype).reshape(2, -1).t().reshape(1, -1, 2, 1)  # (1, g s^2, 2, 1)
    if _in_onnx_export():  # [onnx<11] no CumSum below opset 11; Range (arange) exists from opset 9
        column_counts = (torch.arange(width, dtype=coordinate_dtype, device=x.device) + 1.0).reshape(1, 1, 1, -1)
        row_counts = (torch.arange(height, dtype=coordinate_dtype, device=x.device) + 1.0).reshape(1, 1, -1, 1)
    else:  # [x2paddle] full_like, not ones_like
        column_counts = torch.full_like(x[:1, :1, :1, :], 1.0, dtype=coordinate_dtype).cumsum(3)  # 1..W
        row_counts = torch.full_like(x[:1, :1, :, :1], 1.0, dtype=coordinate_dtype).cumsum(2)  # 1..H
    centres = torch.cat(  # pixel centres k + 0.5 = count - 0.5, x then y: (1, 1, 2, H*W)
        ((column_counts - 0.5).expand(1, 1, height, width), (row_counts - 0.5).expand(1, 1, height, width)), 1
    ).reshape(1, 1, 2, height * width)
    sizes = torch.cat((column_counts[:, :, :, -1:], row_counts[:, :, -1:, :]), 1).reshape(1, 1, 2, 1)  # W, H
    # 2 p / size - 1: pixel units -> [-1, 1] (align_corners=False)  [x2paddle] no 2 / size
    points = (points + initial + centres) * 2.0 / sizes - 1.0  # (B, g s^2, 2, H*W): (b, g, i, j, axis, h, w)
    # two rank-4 copies  [rank<=4]: (b g i, j axis, h, w) -> (b g i, h, w, j axis) -> (b g, h, i, w j axis)
    points = points.reshape(batch * groups * scale, scale * 2, height, width).permute(0, 2, 3, 1)
    points = points.reshape(batch * groups, scale, height, width * scale * 2).permute(0, 2, 1, 3)
    points = points.reshape(batch * groups, scale * height, scale * width, 2).to(x.dtype)
    # Past [-1, 1] every point clamps to the same border pixel, and grid_sample's gradient there is zero: moving
    # points beyond +-2 to +-2 changes no value and no gradient. NaN fails the first comparison, so it lands on
    # -2 (the first row or column); +-inf lands on the border. A local: TorchScript closes over no float global.
    outside = 2.0
    if not nan_to_first:  # [pnnx] no comparison or where
        return points.clamp(-outside, outside)
    points = torch.where(points > -outside, points, -outside)
    return torch.where(points < outside, points, outside)


def grid_sample_border(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample`` with bilinear weights, border padding and ``align_corners=False``: DySample's sampling.

    Args:
        features (torch.Tensor): Values to sample, ``(N, C, H, W)``.
        grid (torch.Tensor): Points, ``(N, H_out, W_out, 2)``, x then y in ``[-1, 1]`` over the pixel edges.

    Returns:
        (torch.Tensor): ``(N, C, H_out, W_out)``.
    """
    return F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)


def grid_sample_by_gather(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """:func:`grid_sample_border` from index arithmetic and a single gather: the export-safe twin.

    Written with operators every runtime has (``Clip``, ``Cast``, arithmetic, one ``Gather`` on axis 0,
    ``Transpose``); every size is read from the tensors, so a traced graph keeps dynamic batch and
    resolution. Coordinates are computed in float32 at least.

    Args:
        features (torch.Tensor): Values to sample, shape ``(N, C, H, W)``.
        grid (torch.Tensor): Sampling points, shape ``(N, H_out, W_out, 2)``, ``x`` then ``y``,
            normalised to ``[-1, 1]`` over the pixel edges (``align_corners=False``); points outside
            are clamped to the border.

    Returns:
        (torch.Tensor): Shape ``(N, C, H_out, W_out)``, dtype of ``features``.

    Examples:
        >>> import torch
        >>> features, grid = torch.randn(2, 3, 5, 7), torch.rand(2, 4, 6, 2) * 2.4 - 1.2
        >>> torch.allclose(grid_sample_by_gather(features, grid), grid_sample_border(features, grid), atol=1e-6)
        True
    """
    batch, channels, height, width = features.shape
    out_height, out_width = grid.shape[1], grid.shape[2]
    compute_dtype = torch.promote_types(features.dtype, torch.float32)  # [half] coordinates in float32
    grid = grid.to(compute_dtype)
    # ((g + 1) * size - 1) / 2: normalised [-1, 1] -> pixel coordinates, pixel centres at k + 0.5
    x = ((grid[..., 0] + 1.0) * width - 1.0) * 0.5
    y = ((grid[..., 1] + 1.0) * height - 1.0) * 0.5
    # border padding: clip the point into the image first, then interpolate inside it
    x = x.clamp(0, width - 1)
    y = y.clamp(0, height - 1)
    # floor as a truncating cast (x, y >= 0 here)  [x2paddle] floor handles only Python numbers
    x_left, y_top = x.long().to(compute_dtype), y.long().to(compute_dtype)
    weight_x, weight_y = x - x_left, y - y_top  # distance past the left / top neighbour
    # clamped as floats  [onnx<12] Clip takes integers only from opset 12; on the last column the weight is 0
    x_right = (x_left + 1).clamp(0, width - 1).long()
    y_bottom = (y_top + 1).clamp(0, height - 1).long()
    x_left, y_top = x_left.long(), y_top.long()
    # rows of the (N * H * W, C) channels-last table: n * H * W + y * W + x
    image_start = (torch.arange(batch, device=features.device) * (height * width)).reshape(-1, 1, 1)
    top_row = image_start + y_top * width
    bottom_row = image_start + y_bottom * width
    corner_rows = torch.stack((top_row + x_left, top_row + x_right, bottom_row + x_left, bottom_row + x_right))
    table = features.permute(0, 2, 3, 1).reshape(-1, channels)  # (N * H * W, C)
    corners = table[corner_rows.reshape(-1)]  # one Gather for all four neighbours  [x2paddle] no index_select
    corners = corners.reshape(4, batch, out_height, out_width, channels).to(compute_dtype)
    corner_weights = torch.stack(
        (
            (1.0 - weight_x) * (1.0 - weight_y),  # top-left
            weight_x * (1.0 - weight_y),  # top-right
            (1.0 - weight_x) * weight_y,  # bottom-left
            weight_x * weight_y,  # bottom-right
        )
    ).unsqueeze(-1)  # (4, N, H_out, W_out, 1)
    sampled = (corners * corner_weights).sum(0)  # (N, H_out, W_out, C)
    return sampled.permute(0, 3, 1, 2).to(features.dtype)


def sample_groups(
    x: torch.Tensor, grid: torch.Tensor, groups: int, by_gather: bool = False, by_difference_tables: bool = False
) -> torch.Tensor:
    """Each channel group of ``x`` sampled at its own points, in one call on a ``(B * groups)`` batch.

    Args:
        x (torch.Tensor): ``(B, C, H, W)``; group ``g`` holds channels ``g * C / groups`` onwards.
        grid (torch.Tensor): ``(B * groups, H_out, W_out, 2)`` as :func:`sampling_grid` returns it.
        groups (int): Channel groups; must divide ``C``.
        by_gather (bool): Sample with :func:`grid_sample_by_gather` instead of :func:`grid_sample_border`.
        by_difference_tables (bool): Sample with :func:`grid_sample_by_difference_tables`.

    Returns:
        (torch.Tensor): ``(B, C, H_out, W_out)``.
    """
    batch, channels, height, width = x.shape
    grouped = x.reshape(batch * groups, channels // groups, height, width)
    if by_difference_tables:
        out = grid_sample_by_difference_tables(grouped, grid)
    else:
        out = grid_sample_by_gather(grouped, grid) if by_gather else grid_sample_border(grouped, grid)
    return out.reshape(batch, channels, grid.shape[1], grid.shape[2])


def grid_sample_per_group(x: torch.Tensor, grid: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`sample_groups` as one :func:`grid_sample_border` per channel group on a batch of ``B``.

    The same values; for runtimes without a batch axis (a ``(B * groups)``-batch ``GridSample`` crashes
    ncnn). Everywhere else the single call is cheaper: the concatenation copies the output.

    Args:
        x (torch.Tensor): ``(B, C, H, W)``.
        grid (torch.Tensor): ``(B * groups, H_out, W_out, 2)`` as :func:`sampling_grid` returns it.
        groups (int): Channel groups; must divide ``C``.

    Returns:
        (torch.Tensor): ``(B, C, H_out, W_out)``.
    """
    batch = x.shape[0]
    out_height, out_width = grid.shape[1], grid.shape[2]
    grids = grid.reshape(batch, groups, out_height, out_width * 2)
    features, group_grids = x.chunk(groups, 1), grids.chunk(groups, 1)  # [pnnx] no narrow
    parts = []
    for group in range(groups):
        parts.append(grid_sample_border(features[group], group_grids[group].reshape(batch, out_height, out_width, 2)))
    return torch.cat(parts, 1)


def grid_sample_by_difference_tables(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """:func:`grid_sample_border` as four row gathers from channels-last value and difference tables.

    Bilinear interpolation at ``(x, y)`` with top-left neighbour ``(x0, y0)`` and ``a = x - x0``, ``b = y - y0``
    is ``v + a dx + b dy + a b dxy``, where ``v`` is the neighbour's value, ``dx`` / ``dy`` its forward
    differences to the right / below and ``dxy`` the cross difference. The three difference tables are built
    once at input resolution (a quarter of the output for 2x upsampling), so all four gathers share one row
    index and only three weights multiply output-sized rows; border padding is the clamp of the point plus
    zero differences past the last row and column. Every operator is standard ONNX (``Gather`` on axis 0,
    ``Concat``, ``Slice``, ``Floor``, ``Cast``, arithmetic, one ``Transpose`` of the output); ONNX Runtime on
    CPU runs it several times faster than its ``GridSample`` (``python -m yolo_dysample.tools.onnx_sampling_study``).

    Args:
        features (torch.Tensor): Values to sample, ``(N, C, H, W)``.
        grid (torch.Tensor): Points, ``(N, H_out, W_out, 2)``, x then y in ``[-1, 1]`` over the pixel edges
            (``align_corners=False``); points outside are clamped to the border. Finite (as
            :func:`sampling_grid` returns it).

    Returns:
        (torch.Tensor): ``(N, C, H_out, W_out)``, dtype of ``features``; equal to :func:`grid_sample_border` to
            float rounding.

    Examples:
        >>> import torch
        >>> features, grid = torch.randn(2, 3, 5, 7), torch.rand(2, 4, 6, 2) * 2.4 - 1.2
        >>> expected = grid_sample_border(features, grid)
        >>> torch.allclose(grid_sample_by_difference_tables(features, grid), expected, atol=1e-5)
        True
    """
    batch, channels, height, width = features.shape
    out_height, out_width = grid.shape[1], grid.shape[2]
    compute_dtype = torch.promote_types(features.dtype, torch.float32)  # [half] coordinates in float32
    grid = grid.to(compute_dtype)
    x = (((grid[..., 0] + 1.0) * width - 1.0) * 0.5).clamp(0, width - 1)  # pixel indices, border-clamped
    y = (((grid[..., 1] + 1.0) * height - 1.0) * 0.5).clamp(0, height - 1)
    x_left, y_top = x.floor(), y.floor()
    weight_x, weight_y = x - x_left, y - y_top  # distance past the top-left neighbour
    image_start = (torch.arange(batch, device=features.device) * (height * width)).reshape(-1, 1, 1)
    rows = (image_start + y_top.long() * width + x_left.long()).reshape(-1)  # rows of the (N * H * W, C) tables
    value = features.permute(0, 2, 3, 1).to(compute_dtype)  # (N, H, W, C)
    # forward differences; past the last column / row the border repeats, so they are 0 there
    right = torch.cat((value[:, :, 1:], value[:, :, -1:]), 2) - value
    below = torch.cat((value[:, 1:], value[:, -1:]), 1) - value
    cross = torch.cat((right[:, 1:], right[:, -1:]), 1) - right
    value, right, below, cross = (table.reshape(-1, channels) for table in (value, right, below, cross))
    weight_xy = weight_x * weight_y  # before the (P, 1) reshapes: ONNX Runtime is slow on size-1 inner axes
    weight_x, weight_y, weight_xy = weight_x.reshape(-1, 1), weight_y.reshape(-1, 1), weight_xy.reshape(-1, 1)
    sampled = value[rows] + weight_x * right[rows] + weight_y * below[rows] + weight_xy * cross[rows]
    sampled = sampled.reshape(batch, out_height * out_width, channels).permute(0, 2, 1)
    return sampled.reshape(batch, channels, out_height, out_width).to(features.dtype)
