"""Which form of DySample each export gets: the sampler per format and ONNX opset, and the user's override.

Every form computes the same values (``tests/test_sampling.py``); they differ in the operators the traced graph
holds. Which formats need which form is measured, not assumed: the export matrix
(``python -m yolo_dysample.tools.export_matrix``) exports with each sampler and writes ``docs/export_matrix.md``.

Precedence, highest first: ``YOLO_DYSAMPLE_SAMPLER`` naming a sampler (the process), a sampler chosen in code with
:func:`set_sampler` / :func:`use_sampler` (the layer), the automatic choice of :func:`sampler_for_export` (the
format). The Ultralytics adapter applies :func:`configure_for_export` to the exporter's copy of the model from its
``on_export_start`` callback, so the user's model is never changed by an export.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from torch import nn

from yolo_dysample.dysample import SAMPLERS, DySample

__all__ = [
    "FORMATS_NEEDING_FROZEN_PROJECTION",
    "FORMATS_NEEDING_GATHER",
    "FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP",
    "FORMATS_PREFERRING_DIFFERENCE_TABLES",
    "GATHER_MIN_ONNX_OPSET",
    "GRID_SAMPLE_MIN_ONNX_OPSET",
    "SAMPLERS",
    "SAMPLER_ENVIRONMENT_VARIABLE",
    "configure_for_export",
    "dysample_layers",
    "sampler_for_export",
    "set_sampler",
    "use_sampler",
]

SAMPLER_ENVIRONMENT_VARIABLE = "YOLO_DYSAMPLE_SAMPLER"  # one of SAMPLERS, or "auto" (default)
GRID_SAMPLE_MIN_ONNX_OPSET = 16  # ONNX GridSample first appears in opset 16
# The lowest opset whose exports match PyTorch (tests/test_export_formats.py checks it); below it torch has
# no ONNX Range for DySample's torch.arange, and ultralytics itself asks detection models for opset>=9.
GATHER_MIN_ONNX_OPSET = 9
# [onnx2tf] (every TensorFlow format) converts GridSample only with zeros padding and stops on DySample's border
# padding; [x2paddle] (format=paddle) has no aten::grid_sampler at all.
FORMATS_NEEDING_GATHER = frozenset({"saved_model", "pb", "edgetpu", "paddle"})
# [onnxruntime] its CPU GridSample costs about 20 ns per sampled value; the difference-table gathers run the whole
# YOLOv8n-dysample several times closer to the stock model's latency, and its file holds only standard operators
# (python -m yolo_dysample.tools.onnx_sampling_study, python -m yolo_dysample.tools.bench_deployment).
FORMATS_PREFERRING_DIFFERENCE_TABLES = frozenset({"onnx"})
# [ncnn] no batch axis. Measured: every other traced format (torchscript, onnx, openvino, mnn, coreml) takes the
# single call on a (B * groups) batch.
FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP = frozenset({"ncnn"})
# [x2paddle] converts a conv only when its weight and bias are constants, not computed in the graph.
FORMATS_NEEDING_FROZEN_PROJECTION = frozenset({"paddle"})


def _check_sampler(sampler: str) -> str:
    """Return ``sampler`` if it names a sampler, else raise ``ValueError`` listing the choices."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not one of {SAMPLERS}")
    return sampler


def dysample_layers(model: nn.Module) -> list[DySample]:
    """Every DySample inside ``model`` (``model`` itself included), in ``model.modules()`` order."""
    return [module for module in model.modules() if isinstance(module, DySample)]


def set_sampler(model: nn.Module, sampler: str) -> int:
    """Make every DySample in ``model`` sample with ``sampler``, also in every later export.

    The choice is recorded on each layer as the user's (``ExportForm.sampler_chosen_by_user``): the export hook
    keeps it instead of choosing per format; only ``YOLO_DYSAMPLE_SAMPLER`` overrides it.

    Args:
        model (nn.Module): A model holding DySample layers, or one DySample.
        sampler (str): ``"grid_sample"`` (one ``F.grid_sample`` call) or ``"gather"`` (index arithmetic and one
            gather, for runtimes without GridSample).

    Returns:
        (int): How many DySample layers were set.

    Examples:
        >>> from yolo_dysample import DySample
        >>> set_sampler(DySample(16), "gather")
        1
    """
    _check_sampler(sampler)
    layers = dysample_layers(model)
    for layer in layers:
        layer.export_form = layer.export_form._replace(sampler=sampler, sampler_chosen_by_user=True)
    return len(layers)


@contextlib.contextmanager
def use_sampler(model: nn.Module, sampler: str) -> Iterator[nn.Module]:
    """Context manager: every DySample in ``model`` uses ``sampler`` inside (exports too), its previous one after.

    Examples:
        >>> import torch
        >>> from yolo_dysample import DySample
        >>> up = DySample(16)
        >>> with use_sampler(up, "gather"):
        ...     traced = torch.jit.trace(up, torch.randn(1, 16, 4, 4))
        >>> up.export_form.sampler
        'grid_sample'
    """
    _check_sampler(sampler)
    layers = dysample_layers(model)
    previous = [layer.export_form for layer in layers]
    try:
        set_sampler(model, sampler)
        yield model
    finally:
        for layer, earlier in zip(layers, previous, strict=True):
            layer.export_form = layer.export_form._replace(
                sampler=earlier.sampler, sampler_chosen_by_user=earlier.sampler_chosen_by_user
            )


def sampler_for_export(export_format: str, opset: int | None = None, chosen: str | None = None) -> str:
    """The sampler an export to ``export_format`` gets.

    ``YOLO_DYSAMPLE_SAMPLER`` naming one of :data:`SAMPLERS` forces a choice; else ``chosen`` (a layer's sampler chosen
    in code) is kept; else, unset or ``auto``, ``"gather"`` for :data:`FORMATS_NEEDING_GATHER`,
    ``"difference_tables"`` for :data:`FORMATS_PREFERRING_DIFFERENCE_TABLES` (every opset DySample exports at),
    ``"gather"`` for other formats' ONNX below opset 16 (no GridSample there), ``"grid_sample"`` otherwise.

    Args:
        export_format (str): Ultralytics' ``format`` argument (``"onnx"``, ``"ncnn"``, ...).
        opset (int | None): The requested ONNX opset, if any (``None``: the exporter's default).
        chosen (str | None): The sampler the user chose for the layer, if any.

    Returns:
        (str): One of :data:`SAMPLERS`.

    Raises:
        ValueError: The environment variable names no sampler, or ``opset`` is below
            :data:`GATHER_MIN_ONNX_OPSET` (no sampler can be expressed there), or a forced or chosen
            ``grid_sample`` meets an opset below 16.
    """
    requested = os.environ.get(SAMPLER_ENVIRONMENT_VARIABLE, "auto").strip().lower() or "auto"
    if requested != "auto" and requested not in SAMPLERS:
        raise ValueError(f"{SAMPLER_ENVIRONMENT_VARIABLE}={requested!r} is not one of {('auto', *SAMPLERS)}")
    if opset is not None and opset < GATHER_MIN_ONNX_OPSET:
        raise ValueError(
            f"DySample cannot be exported at ONNX opset={opset}: it needs opset>={GATHER_MIN_ONNX_OPSET} "
            f"(gather sampler) or opset>={GRID_SAMPLE_MIN_ONNX_OPSET} (GridSample)"
        )
    source = f"{SAMPLER_ENVIRONMENT_VARIABLE}=grid_sample" if requested != "auto" else "set_sampler('grid_sample')"
    sampler = requested if requested != "auto" else chosen
    if sampler == "grid_sample" and opset is not None and opset < GRID_SAMPLE_MIN_ONNX_OPSET:
        raise ValueError(
            f"{source} needs ONNX opset>={GRID_SAMPLE_MIN_ONNX_OPSET} (GridSample), got opset={opset}; use the "
            f"gather sampler for opset {GATHER_MIN_ONNX_OPSET}-15"
        )
    if sampler is not None:
        return _check_sampler(sampler)
    if export_format.lower() in FORMATS_NEEDING_GATHER:
        return "gather"
    if export_format.lower() in FORMATS_PREFERRING_DIFFERENCE_TABLES:
        return "difference_tables"
    if opset is not None and opset < GRID_SAMPLE_MIN_ONNX_OPSET:  # [onnx<16]
        return "gather"
    return "grid_sample"


def configure_for_export(model: nn.Module, export_format: str, opset: int | None = None) -> int:
    """Give every DySample in ``model`` the form an export to ``export_format`` needs.

    The sampler from :func:`sampler_for_export` (a sampler the user chose on a layer is kept), one
    ``grid_sample`` per channel group for :data:`FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP`, and constant projection
    weights for :data:`FORMATS_NEEDING_FROZEN_PROJECTION`. Meant for the exporter's own copy of the model: the
    frozen projection does not follow later weight changes. A model without DySample is left alone.

    Args:
        model (nn.Module): The model about to be traced.
        export_format (str): Ultralytics' ``format`` argument.
        opset (int | None): The requested ONNX opset, if any.

    Returns:
        (int): How many DySample layers were configured.

    Raises:
        ValueError: From :func:`sampler_for_export`, e.g. an ONNX opset too low for DySample.
    """
    export_format = str(export_format or "").lower()
    layers = dysample_layers(model)
    for layer in layers:
        form = layer.export_form
        sampler = sampler_for_export(export_format, opset, form.sampler if form.sampler_chosen_by_user else None)
        layer.export_form = form._replace(
            sampler=sampler,
            grid_sample_per_group=export_format in FORMATS_NEEDING_GRID_SAMPLE_PER_GROUP,
            frozen_projection=False,
        )
        if export_format in FORMATS_NEEDING_FROZEN_PROJECTION:
            layer.freeze_projection()
    return len(layers)
