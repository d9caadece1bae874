"""What each sampler costs: one DySample layer in PyTorch and in ONNX Runtime, and the whole model in ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

from yolo_dysample.export_policy import SAMPLERS
from yolo_dysample.tools.export_matrix.cases import LATENCY_RUNS, ONNX_PACKAGES, Case
from yolo_dysample.tools.export_matrix.checkpoint import letterboxed_images, perturb_offsets
from yolo_dysample.tools.export_matrix.checks import export_with_sampler, wall_times_ms


def onnx_layer_cost(repeats: int = 30) -> list[dict]:
    """Best-of-``repeats`` ONNX Runtime CPU latency of one exported DySample layer with each sampler."""
    import io as bytes_io

    import onnxruntime
    import torch

    from yolo_dysample.export_policy import use_sampler

    rows = []
    for layer, features, row in _cost_layers():
        for sampler in SAMPLERS:
            graph = bytes_io.BytesIO()
            with use_sampler(layer, sampler), torch.no_grad():
                torch.onnx.export(layer, (features,), graph, opset_version=17, dynamo=False)
            session = onnxruntime.InferenceSession(graph.getvalue(), providers=["CPUExecutionProvider"])
            feed = {session.get_inputs()[0].name: features.numpy()}
            row[sampler] = min(wall_times_ms(lambda session=session, feed=feed: session.run(None, feed), repeats))
        rows.append(row)
    return rows


def _cost_layers():
    """The layers the cost tables time: (DySample LP+ with perturbed offsets, its input, the table row to fill)."""
    import torch

    from yolo_dysample import DySample

    for channels, size in ((64, 20), (128, 40), (256, 80)):
        layer = DySample(channels, style="lp", dyscope=True).eval()
        perturb_offsets(layer)
        yield layer, torch.randn(1, channels, size, size), {"input": f"(1, {channels}, {size}, {size})"}


def sampler_cost(repeats: int = 30) -> list[dict]:
    """Best-of-``repeats`` PyTorch CPU latency of one DySample layer with each sampler, at a few sizes.

    The minimum, not the median: on a machine shared with other jobs the minimum is the stable number.
    """
    import torch

    from yolo_dysample.export_policy import use_sampler

    rows = []
    for layer, features, row in _cost_layers():
        for sampler in SAMPLERS:
            with use_sampler(layer, sampler), torch.no_grad():
                row[sampler] = min(wall_times_ms(lambda layer=layer, features=features: layer(features), repeats))
        rows.append(row)
    return rows


def onnx_sampler_cost(workdir: Path, checkpoint: Path) -> list[dict]:
    """Whole-model ONNX Runtime latency and node counts with each sampler (imgsz 320)."""
    import onnx
    import onnxruntime

    rows = []
    for sampler in SAMPLERS:
        case = Case(f"onnx {sampler}", {"format": "onnx", "imgsz": 320}, ONNX_PACKAGES)
        directory = workdir / f"cost-{sampler}"
        directory.mkdir(parents=True, exist_ok=True)
        local = directory / checkpoint.name
        local.write_bytes(checkpoint.read_bytes())
        exported = export_with_sampler(local, case, sampler)
        graph = onnx.load(exported).graph
        session = onnxruntime.InferenceSession(exported, providers=["CPUExecutionProvider"])
        feed = {session.get_inputs()[0].name: letterboxed_images((1, 320, 320)).numpy()}
        times = wall_times_ms(lambda session=session, feed=feed: session.run(None, feed), LATENCY_RUNS)
        rows.append({"sampler": sampler, "nodes": len(graph.node), "latency_ms": min(times)})
    return rows
