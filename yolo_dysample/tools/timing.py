"""The one timing loop of the benchmarks: variants interleaved in rounds, so load hits them alike.

Each round times every variant for a block of at least ``min_block_seconds`` (the iteration count is
fixed per variant after a calibration call), and the starting variant rotates from round to round.
A variant's latency is the median over rounds; a ratio is the median of the per-round ratios.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable

__all__ = ["against_reference", "interleaved_samples", "median_ratio", "spread", "time_block"]


def time_block(
    function: Callable[[], object], iterations: int, synchronize: Callable[[], object] | None = None
) -> float:
    """Seconds per call of ``function`` over ``iterations`` back-to-back calls."""
    if synchronize is not None:
        synchronize()
    start = time.perf_counter()
    for _ in range(iterations):
        function()
    if synchronize is not None:
        synchronize()
    return (time.perf_counter() - start) / iterations


def interleaved_samples(
    candidates: dict[str, Callable[[], object]],
    rounds: int = 7,
    min_block_seconds: float = 0.1,
    warmup: int = 2,
    synchronize: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every candidate, one sample per round.

    Args:
        candidates (dict[str, Callable[[], object]]): Name -> a call to time.
        rounds (int): Samples per candidate.
        min_block_seconds (float): Each sample times at least this long (many calls of a fast candidate).
        warmup (int): Untimed calls per candidate before calibration.
        synchronize (Callable | None): Called before and after each block (e.g. ``torch.cuda.synchronize``).

    Returns:
        (dict[str, list[float]]): ``rounds`` samples per candidate, in the candidates' order.
    """
    if rounds < 1:
        raise ValueError(f"rounds={rounds!r} must be >= 1")
    iterations = {}
    for name, function in candidates.items():
        for _ in range(warmup):
            function()
        iterations[name] = max(1, round(min_block_seconds / max(time_block(function, 1, synchronize), 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(rounds):
        gc.collect()
        start = round_index % len(names)
        for name in names[start:] + names[:start]:
            samples[name].append(time_block(candidates[name], iterations[name], synchronize))
    return samples


def median_ratio(samples: list[float], reference: list[float]) -> float:
    """Median over rounds of ``sample / reference`` (the two measured in the same round)."""
    return statistics.median(value / base for value, base in zip(samples, reference, strict=True))


def spread(samples: list[float]) -> float:
    """Half the distance between the quartiles, relative to the median (0.02: +-2 %)."""
    if len(samples) < 2:
        return 0.0
    quartiles = statistics.quantiles(samples, n=4, method="inclusive")
    return (quartiles[2] - quartiles[0]) / 2 / statistics.median(samples)


def against_reference(samples: list[float], reference: list[float]) -> dict[str, float]:
    """Medians in milliseconds, the median per-round ratio and that ratio's spread, for samples in seconds."""
    ratios = [value / base for value, base in zip(samples, reference, strict=True)]
    return {
        "reference_ms": 1e3 * statistics.median(reference),
        "ms": 1e3 * statistics.median(samples),
        "ratio": statistics.median(ratios),
        "spread": spread(ratios),
    }
