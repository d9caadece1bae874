"""Latency of the compared models, measured interleaved in one process so that load on the machine hits all alike.

Timing each variant in its own process, one after the other, swung the ratio 2x between identical comparisons on
a shared machine: whatever else ran at the time landed on one variant. Here every round times each model once, in
an order rotated from round to round, and the report gives the median with the interquartile range and, per
variant, the median of the per-round ratios to stock (a ratio taken within a round cancels slow drifts in load).
"""

from __future__ import annotations

import functools
import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from yolo_dysample.compare.runner import read_json
from yolo_dysample.compare.settings import LATENCY_WARMUP, STOCK
from yolo_dysample.tools.timing import interleaved_samples, median_ratio

__all__ = ["LATENCY_FILE", "interleaved_latency", "measure_latency"]

LATENCY_FILE = "latency.json"


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) == 1:
        return values[0], values[0], values[0]
    low, median, high = statistics.quantiles(values, n=4, method="inclusive")
    return low, median, high


def interleaved_latency(networks: Mapping[str, Any], image: Any, rounds: int, warmup: int) -> dict[str, dict]:
    """Time a forward pass of every network ``rounds`` times, interleaved; statistics per network in milliseconds.

    Args:
        networks (Mapping[str, Any]): Name -> callable model, all on ``image``'s device. ``stock`` (if present) is the
            reference of the ratios.
        image (torch.Tensor): The input of every pass.
        rounds (int): Timed passes per network.
        warmup (int): Untimed passes per network first.

    Returns:
        (dict): Name -> ``median_ms``, ``q1_ms``, ``q3_ms``, ``rounds`` and (with a stock network) ``ratio_to_stock``:
            the median over rounds of this network's time divided by stock's in the same round.

    """
    import torch

    synchronize = torch.cuda.synchronize if image.device.type == "cuda" else None
    calls = {name: functools.partial(network, image) for name, network in networks.items()}
    with torch.inference_mode():  # one pass per sample: min_block_seconds=0
        seconds = interleaved_samples(calls, rounds, min_block_seconds=0.0, warmup=warmup, synchronize=synchronize)
    timings = {name: [value * 1000 for value in samples] for name, samples in seconds.items()}
    result = {}
    for name, samples in timings.items():
        q1, median, q3 = _quartiles(samples)
        result[name] = {"median_ms": median, "q1_ms": q1, "q3_ms": q3, "rounds": rounds}
        if STOCK in timings:
            result[name]["ratio_to_stock"] = median_ratio(samples, timings[STOCK])
    return result


def measure_latency(
    directory: Path, checkpoints: Mapping[str, str], imgsz: int, device: str | None, rounds: int
) -> dict[str, Any]:
    """Batch-1 latency of each variant's checkpoint at the trained ``imgsz``, stored in ``latency.json``.

    A stored measurement of the same checkpoints (same files, same modification times) and options is reused.
    """
    key = {
        "checkpoints": {name: [path, Path(path).stat().st_mtime_ns] for name, path in checkpoints.items()},
        "imgsz": imgsz,
        "device": device,
        "rounds": rounds,
        "warmup": LATENCY_WARMUP,
    }
    stored = read_json(directory / LATENCY_FILE)
    if isinstance(stored, dict) and stored.get("key") == key:
        return stored
    import torch
    from ultralytics import YOLO
    from ultralytics.utils.torch_utils import select_device

    target = select_device("" if device is None else str(device), verbose=False)
    networks = {
        name: YOLO(path).model.float().fuse(verbose=False).eval().to(target) for name, path in checkpoints.items()
    }
    image = torch.zeros(1, 3, imgsz, imgsz, device=target)
    measured = {
        "key": key,
        "device": str(target),
        "threads": torch.get_num_threads(),
        "variants": interleaved_latency(networks, image, rounds, LATENCY_WARMUP),
    }
    temporary = directory / (LATENCY_FILE + ".tmp")
    temporary.write_text(json.dumps(measured, indent=2) + "\n")
    temporary.replace(directory / LATENCY_FILE)
    return measured
