"""An independent, slow DySample written from the paper's equations in numpy float64.

Used by ``tests/test_dysample.py`` to check :class:`yolo_dysample.DySample`. Nothing here calls
``torch`` or the module's helpers: the 1x1 convolutions are ``einsum``, pixel shuffling is index
arithmetic, and the border-clamped bilinear sampling is spelt out by hand.

The equations (Liu, Lu, Fu, Cao, "Learning to Upsample by Learning to Sample", ICCV 2023):

* offsets ``O``: LP runs a 1x1 conv on ``X`` (``C -> 2 g s^2``) and pixel-shuffles the result;
  PL pixel-shuffles ``X`` first and runs a 1x1 conv on that (``C / s^2 -> 2 g``). Either way we get
  one (x, y) offset per channel group and per *output* pixel. Static scope: ``O = 0.25 * conv``;
  dynamic scope: ``O = 0.5 * sigmoid(scope_conv) * conv`` (the scope conv's bias, present in the authors'
  2023 layout only, is 0 when absent).
* positions ``S = G + O`` in input-pixel units, where ``G`` is where bilinear interpolation
  samples output pixel ``(Y, X)``: ``((X + 0.5) / s, (Y + 0.5) / s)`` (pixel ``k`` spans ``[k, k+1]``).
* output: each channel group sampled at its own points, bilinearly, with the sample index
  ``S - 0.5`` clamped to ``[0, size - 1]`` (border padding, ``align_corners=False``).

Channel layout (the authors' checkpoint layout): the LP conv's output channel
``(axis * groups + group) * s^2 + row * s + column`` is the offset along ``axis`` (0 = x, 1 = y)
of sub-pixel ``(row, column)`` for channel group ``group``; the PL conv's output channel
``axis * groups + group`` is that offset at every output pixel directly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STATIC_SCOPE = 0.25
DYNAMIC_SCOPE = 0.5


@dataclass
class ReferenceWeights:
    """Weights of one DySample in numpy: conv weights ``(out, in, 1, 1)``, biases ``(out,)``."""

    offset_weight: np.ndarray
    offset_bias: np.ndarray
    scope_weight: np.ndarray | None = None
    scope_bias: np.ndarray | None = None


def conv1x1(features: np.ndarray, weight: np.ndarray, bias: np.ndarray | None) -> np.ndarray:
    """1x1 convolution: ``out[b, o, h, w] = sum_c weight[o, c] * features[b, c, h, w] + bias[o]`` (no bias: 0)."""
    out = np.einsum("oc,bchw->bohw", weight[:, :, 0, 0], features)
    return out if bias is None else out + bias[None, :, None, None]


def pixel_shuffle(x: np.ndarray, scale: int) -> np.ndarray:
    """``(B, C s^2, H, W) -> (B, C, H s, W s)`` with ``out[b, c, h s + i, w s + j] = x[b, c s^2 + i s + j, h, w]``."""
    batch, channels, height, width = x.shape
    out = np.empty((batch, channels // (scale * scale), height * scale, width * scale), dtype=x.dtype)
    for row in range(scale):
        for column in range(scale):
            out[:, :, row::scale, column::scale] = x[:, row * scale + column :: scale * scale]
    return out


def sigmoid(x: np.ndarray) -> np.ndarray:
    """Logistic function."""
    return 1.0 / (1.0 + np.exp(-x))


def offset_field(x: np.ndarray, weights: ReferenceWeights, scale: int, style: str) -> np.ndarray:
    """Offsets ``O`` in input pixels, shape ``(B, 2, groups, H s, W s)``: axis (x, y), group, output pixel."""
    features = pixel_shuffle(x, scale) if style == "pl" else x
    raw = conv1x1(features, weights.offset_weight, weights.offset_bias)
    if weights.scope_weight is not None:
        raw = raw * DYNAMIC_SCOPE * sigmoid(conv1x1(features, weights.scope_weight, weights.scope_bias))
    else:
        raw = raw * STATIC_SCOPE
    if style == "lp":  # one channel per (axis, group, sub-pixel) on the input grid -> per output pixel
        raw = pixel_shuffle(raw, scale)
    batch, _, out_height, out_width = raw.shape
    return raw.reshape(batch, 2, -1, out_height, out_width)


def sample_positions(x: np.ndarray, weights: ReferenceWeights, scale: int, style: str) -> np.ndarray:
    """Sampling points ``S = G + O`` in input-pixel units, shape ``(B, 2, groups, H s, W s)``."""
    offsets = offset_field(x, weights, scale, style)
    out_height, out_width = offsets.shape[-2:]
    bilinear_x = (np.arange(out_width) + 0.5) / scale  # G: where bilinear interpolation samples
    bilinear_y = (np.arange(out_height) + 0.5) / scale
    positions = offsets.copy()
    positions[:, 0] += bilinear_x[None, None, None, :]
    positions[:, 1] += bilinear_y[None, None, :, None]
    return positions


def bilinear_sample_border(image: np.ndarray, sample_x: np.ndarray, sample_y: np.ndarray) -> np.ndarray:
    """Sample ``image`` (C, H, W) at points (pixel units) with bilinear weights and border clamping.

    ``sample_x``/``sample_y`` have any shape ``P``; returns ``(C, *P)``.
    """
    _, height, width = image.shape
    u = np.clip(sample_x - 0.5, 0.0, width - 1)  # continuous column index of the point, clamped
    v = np.clip(sample_y - 0.5, 0.0, height - 1)
    left = np.floor(u).astype(np.int64)
    top = np.floor(v).astype(np.int64)
    right = np.minimum(left + 1, width - 1)
    bottom = np.minimum(top + 1, height - 1)
    weight_right = u - left
    weight_bottom = v - top
    return (
        image[:, top, left] * (1 - weight_right) * (1 - weight_bottom)
        + image[:, top, right] * weight_right * (1 - weight_bottom)
        + image[:, bottom, left] * (1 - weight_right) * weight_bottom
        + image[:, bottom, right] * weight_right * weight_bottom
    )


def dysample_reference(x: np.ndarray, weights: ReferenceWeights, scale: int, style: str, groups: int) -> np.ndarray:
    """DySample forward in float64: ``(B, C, H, W) -> (B, C, H s, W s)``."""
    x = np.asarray(x, dtype=np.float64)
    batch, channels, height, width = x.shape
    positions = sample_positions(x, weights, scale, style)
    group_channels = channels // groups
    out = np.empty((batch, channels, height * scale, width * scale))
    for b in range(batch):
        for group in range(groups):
            channel_slice = slice(group * group_channels, (group + 1) * group_channels)
            out[b, channel_slice] = bilinear_sample_border(
                x[b, channel_slice], positions[b, 0, group], positions[b, 1, group]
            )
    return out


def clamped_fraction(x: np.ndarray, weights: ReferenceWeights, scale: int, style: str) -> float:
    """Share of sampling points that fall outside the input and get clamped to its border."""
    positions = sample_positions(np.asarray(x, dtype=np.float64), weights, scale, style)
    height, width = x.shape[-2:]
    u = positions[:, 0] - 0.5
    v = positions[:, 1] - 0.5
    outside = (u < 0) | (u > width - 1) | (v < 0) | (v > height - 1)
    return float(outside.mean())


def authors_init_pos(scale: int, groups: int) -> np.ndarray:
    """The authors' ``init_pos`` buffer ``(1, 2 g s^2, 1, 1)``: channel ``(axis, group, row, column)``
    holds ``(column - (s-1)/2) / s`` for axis x and ``(row - (s-1)/2) / s`` for axis y."""
    values = [
        ((column if axis == 0 else row) - (scale - 1) / 2) / scale
        for axis in range(2)
        for _group in range(groups)
        for row in range(scale)
        for column in range(scale)
    ]
    return np.asarray(values, dtype=np.float32).reshape(1, -1, 1, 1)
