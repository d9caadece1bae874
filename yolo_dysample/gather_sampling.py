"""Bilinear, border-clamped sampling from index arithmetic and one gather: the export-safe sampler.

DySample (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023) ends in
``F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)``. Most
runtimes carry that as one ``GridSample`` operator (ONNX opset 16+), but some converters and
runtimes lack it or compute it differently. This file holds

- :func:`grid_sample_by_gather`, the same sampling written with operators every runtime has
  (``Clip``, ``Cast``, arithmetic, one ``Gather`` on axis 0, ``Transpose``): it takes the
  same ``(input, grid)`` as ``F.grid_sample`` and returns the same values;
- the sampler choice: :data:`SAMPLERS`, :func:`set_sampler` / :func:`use_sampler` to switch every
  DySample in a model, :func:`sampler_for_export`, the automatic choice per export format and ONNX
  opset (``YOLO_DYSAMPLE_SAMPLER`` overrides it), and :func:`choose_sampler_for_export`, the
  ``on_export_start`` callback through which the Ultralytics adapter applies it to every export.

Which formats need which sampler is measured, not assumed: ``scripts/export_matrix.py`` exports
with each sampler and writes ``docs/export_matrix.md``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import nn

__all__ = [
    "FORMATS_NEEDING_FROZEN_PROJECTION",
    "FORMATS_NEEDING_GATHER",
    "FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP",
    "GATHER_MIN_ONNX_OPSET",
    "GRID_SAMPLE_MIN_ONNX_OPSET",
    "SAMPLERS",
    "SAMPLER_ENVIRONMENT_VARIABLE",
    "choose_sampler_for_export",
    "grid_sample_by_gather",
    "sampler_for_export",
    "set_sampler",
    "use_sampler",
]

SAMPLERS = ("grid_sample", "gather")
SAMPLER_ENVIRONMENT_VARIABLE = "YOLO_DYSAMPLE_SAMPLER"  # "grid_sample" | "gather" | "auto" (default)
GRID_SAMPLE_MIN_ONNX_OPSET = 16  # ONNX GridSample first appears in opset 16
# The lowest opset whose exports match PyTorch (tests/test_export_formats.py checks it); below it torch has
# no ONNX Range for DySample's torch.arange, and ultralytics itself asks detection models for opset>=9.
GATHER_MIN_ONNX_OPSET = 9
# Export formats whose converter or runtime has no GridSample, or one that disagrees with PyTorch
# (measured by scripts/export_matrix.py, see docs/export_matrix.md): onnx2tf, behind every TensorFlow
# format, converts GridSample only with zeros padding and stops on DySample's border padding; x2paddle
# (format=paddle) has no aten::grid_sampler at all.
FORMATS_NEEDING_GATHER = frozenset({"saved_model", "pb", "edgetpu", "paddle"})
# Export formats that need one GridSample per channel group instead of one on a (B * groups) batch: ncnn has no
# batch axis. Measured: every other traced format (torchscript, onnx, openvino, mnn, coreml) takes the single call.
FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP = frozenset({"ncnn"})
# Export formats that need the offset projection as constants (DySample.freeze_projection): x2paddle converts a
# conv only when its weight and bias are constants, not computed in the graph from offset.* / scope.*.
FORMATS_NEEDING_FROZEN_PROJECTION = frozenset({"paddle"})


def grid_sample_by_gather(features: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Bilinear sampling with border padding from index arithmetic and a single gather.

    Numerically the twin of ``F.grid_sample(features, grid, mode="bilinear", padding_mode="border",
    align_corners=False)``; every size is read from the tensors, so a traced graph keeps dynamic
    batch and resolution.

    Args:
        features (torch.Tensor): Values to sample, shape ``(N, C, H, W)``.
        grid (torch.Tensor): Sampling points, shape ``(N, H_out, W_out, 2)``, ``x`` then ``y``,
            normalised to ``[-1, 1]`` over the pixel edges (``align_corners=False``); points outside
            are clamped to the border.

    Returns:
        (torch.Tensor): Shape ``(N, C, H_out, W_out)``, dtype of ``features``.

    Examples:
        >>> import torch
        >>> import torch.nn.functional as F
        >>> features, grid = torch.randn(2, 3, 5, 7), torch.rand(2, 4, 6, 2) * 2.4 - 1.2
        >>> expected = F.grid_sample(features, grid, mode="bilinear", padding_mode="border", align_corners=False)
        >>> torch.allclose(grid_sample_by_gather(features, grid), expected, atol=1e-6)
        True
    """
    batch, channels, height, width = features.shape
    out_height, out_width = grid.shape[1], grid.shape[2]
    compute_dtype = torch.promote_types(features.dtype, torch.float32)  # half inputs: coordinates in float32
    grid = grid.to(compute_dtype)
    # ((g + 1) * size - 1) / 2: normalised [-1, 1] -> pixel coordinates, pixel centres at k + 0.5
    x = ((grid[..., 0] + 1.0) * width - 1.0) * 0.5
    y = ((grid[..., 1] + 1.0) * height - 1.0) * 0.5
    # border padding: clip the point into the image first, then interpolate inside it
    x = x.clamp(0, width - 1)
    y = y.clamp(0, height - 1)
    # floor as a truncating cast (x, y >= 0 here): x2paddle's floor handles only Python numbers
    x_left, y_top = x.long().to(compute_dtype), y.long().to(compute_dtype)
    weight_x, weight_y = x - x_left, y - y_top  # distance past the left / top neighbour
    # clamped as floats: ONNX Clip takes integers only from opset 12; on the last column the weight is 0
    x_right = (x_left + 1).clamp(0, width - 1).long()
    y_bottom = (y_top + 1).clamp(0, height - 1).long()
    x_left, y_top = x_left.long(), y_top.long()
    # rows of the (N * H * W, C) channels-last table: n * H * W + y * W + x
    image_start = (torch.arange(batch, device=features.device) * (height * width)).reshape(-1, 1, 1)
    top_row = image_start + y_top * width
    bottom_row = image_start + y_bottom * width
    corner_rows = torch.stack((top_row + x_left, top_row + x_right, bottom_row + x_left, bottom_row + x_right))
    table = features.permute(0, 2, 3, 1).reshape(-1, channels)  # (N * H * W, C)
    corners = table[corner_rows.reshape(-1)]  # one Gather for all four neighbours (x2paddle lacks index_select)
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


def _check_sampler(sampler: str) -> str:
    """Return ``sampler`` if it names a sampler, else raise ``ValueError`` listing the choices."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    return sampler


def _dysample_modules(model: nn.Module) -> list[nn.Module]:
    """Every DySample inside ``model`` (``model`` itself included)."""
    from yolo_dysample.dysample import DySample  # deferred: dysample.py imports this module

    return [module for module in model.modules() if isinstance(module, DySample)]


def set_sampler(model: nn.Module, sampler: str) -> int:
    """Make every DySample in ``model`` sample with ``sampler``.

    Args:
        model (nn.Module): A model holding DySample layers, or one DySample.
        sampler (str): ``"grid_sample"`` (one ``F.grid_sample`` call) or ``"gather"``
            (:func:`grid_sample_by_gather`, for runtimes without GridSample).

    Returns:
        (int): How many DySample layers were set.

    Examples:
        >>> from yolo_dysample import DySample
        >>> set_sampler(DySample(16), "gather")
        1
    """
    _check_sampler(sampler)
    layers = _dysample_modules(model)
    for layer in layers:
        layer.sampler = sampler
    return len(layers)


@contextlib.contextmanager
def use_sampler(model: nn.Module, sampler: str) -> Iterator[nn.Module]:
    """Context manager: every DySample in ``model`` uses ``sampler`` inside, its previous one after.

    Examples:
        >>> import torch
        >>> from yolo_dysample import DySample
        >>> up = DySample(16)
        >>> with use_sampler(up, "gather"):
        ...     traced = torch.jit.trace(up, torch.randn(1, 16, 4, 4))
        >>> up.sampler
        'grid_sample'
    """
    _check_sampler(sampler)
    layers = _dysample_modules(model)
    previous = [getattr(layer, "sampler", "grid_sample") for layer in layers]
    try:
        for layer in layers:
            layer.sampler = sampler
        yield model
    finally:
        for layer, earlier in zip(layers, previous):
            layer.sampler = earlier


def sampler_for_export(export_format: str, opset: int | None = None) -> str:
    """The sampler an export to ``export_format`` needs.

    ``YOLO_DYSAMPLE_SAMPLER=grid_sample`` or ``=gather`` forces a choice; unset or ``auto`` picks
    ``"gather"`` for :data:`FORMATS_NEEDING_GATHER` and for ONNX below opset 16 (no GridSample there),
    else ``"grid_sample"``.

    Args:
        export_format (str): Ultralytics' ``format`` argument (``"onnx"``, ``"ncnn"``, ...).
        opset (int | None): The requested ONNX opset, if any (``None``: the exporter's default).

    Returns:
        (str): ``"grid_sample"`` or ``"gather"``.

    Raises:
        ValueError: The environment variable names no sampler, or ``opset`` is below
            :data:`GATHER_MIN_ONNX_OPSET` (no sampler can be expressed there), or the forced
            ``grid_sample`` sampler meets an opset below 16.
    """
    requested = os.environ.get(SAMPLER_ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if requested != "auto":
        if requested not in SAMPLERS:
            raise ValueError(
                f"{SAMPLER_ENVIRONMENT_VARIABLE}={requested!r} is not one of {('auto', *SAMPLERS)}"
            )
    if opset is not None and opset < GATHER_MIN_ONNX_OPSET:
        raise ValueError(
            f"DySample cannot be exported at ONNX opset={opset}: it needs opset>={GATHER_MIN_ONNX_OPSET} "
            f"(gather sampler) or opset>={GRID_SAMPLE_MIN_ONNX_OPSET} (GridSample)"
        )
    if requested == "grid_sample":
        if opset is not None and opset < GRID_SAMPLE_MIN_ONNX_OPSET:
            raise ValueError(
                f"{SAMPLER_ENVIRONMENT_VARIABLE}=grid_sample needs ONNX opset>={GRID_SAMPLE_MIN_ONNX_OPSET} "
                f"(GridSample), got opset={opset}; use the gather sampler for opset {GATHER_MIN_ONNX_OPSET}-15"
            )
        return "grid_sample"
    if requested == "gather":
        return "gather"
    if export_format.lower() in FORMATS_NEEDING_GATHER:
        return "gather"
    if opset is not None and opset < GRID_SAMPLE_MIN_ONNX_OPSET:
        return "gather"
    return "grid_sample"



def choose_sampler_for_export(exporter) -> None:
    """``on_export_start`` callback: the exported copy's DySample layers take the format's sampler and form.

    Ultralytics' ``Exporter`` fires ``on_export_start`` after it has deep-copied, fused and dry-run
    the model (``exporter.model``) and before any format's converter traces it, so what is set here
    changes only what is exported: the sampler (:func:`sampler_for_export`), one ``grid_sample`` per
    channel group for :data:`FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP`, and constant projection weights
    for :data:`FORMATS_NEEDING_FROZEN_PROJECTION`. The Ultralytics adapter appends this function to
    ultralytics' default callbacks. Models without DySample are left alone.

    Args:
        exporter (ultralytics.engine.exporter.Exporter): The running exporter (``args.format``, ``args.opset``).

    Raises:
        ValueError: From :func:`sampler_for_export`, e.g. an ONNX opset too low for DySample.
    """
    model = getattr(exporter, "model", None)
    if not isinstance(model, nn.Module) or not _dysample_modules(model):
        return
    export_format = str(getattr(exporter.args, "format", "") or "").lower()
    set_sampler(model, sampler_for_export(export_format, getattr(exporter.args, "opset", None)))
    for layer in _dysample_modules(model):
        layer.grid_sample_per_group = export_format in FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP
        if export_format in FORMATS_NEEDING_FROZEN_PROJECTION:
            layer.freeze_projection()
