"""DySample: a dynamic, point-sampling upsampler.

Implements the upsampler of "Learning to Upsample by Learning to Sample" (Liu, Lu, Fu, Cao,
ICCV 2023). A 1x1 convolution predicts, for every output pixel and every channel group, a small
offset from the position bilinear interpolation would sample; the output is the input sampled
bilinearly (border padding) at those points. With zero offsets DySample *is* bilinear
interpolation (``align_corners=False``).

This file holds the :class:`DySample` module (all four variants of the paper: LP / PL offset
generation, static / dynamic scope) and its argument validation. The parameter and buffer names
follow the authors' reference (``offset.*``, ``scope.*``, ``init_pos``) so their checkpoints load
with ``strict=True``.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional
import torch
import torch.nn.functional as F
from torch import nn

from yolo_dysample.cpu_sampling import kernel_applies, sample_with_kernel
from yolo_dysample.gather_sampling import grid_sample_by_gather

__all__ = ["DySample", "STYLES"]

STYLES = ("lp", "pl")
STATIC_SCOPE = 0.25  # O = 0.25 * offset(X): keeps neighbouring sampling points from overlapping
DYNAMIC_SCOPE = 0.5  # O = 0.5 * sigmoid(scope(X)) * offset(X): the "+" variants
OFFSET_INIT_STD = 0.001  # offset conv weights ~ N(0, 0.001), bias 0 (paper, Sec. 3)


def _as_whole_number(name: str, value: object, minimum: int) -> int:
    """Return ``value`` as an ``int`` or raise ``ValueError`` naming the argument."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)  # int(inf) raises OverflowError, int(nan) a message without the name
        or float(value) != int(value)
    ):
        raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}")
    if int(value) < minimum:
        raise ValueError(f"{name}={value!r} must be a whole number >= {minimum}")
    return int(value)


def _in_onnx_export() -> bool:
    """``torch.onnx.is_in_onnx_export()``, which TorchScript cannot compile; scripted code gets ``False``."""
    if not torch.jit.is_scripting():
        return torch.onnx.is_in_onnx_export()
    return False


class DySample(nn.Module):
    """Learned point-sampling upsampler (DySample, ICCV 2023).

    Channels are split into ``groups`` contiguous groups; each group gets its own sampling point
    for every output pixel. The sampling set is ``S = G + O``: ``G`` places each of the
    ``scale**2`` sub-pixels of an input pixel where bilinear interpolation samples, ``O`` is the
    learned offset, and the output is ``grid_sample(X, S)`` with bilinear weights and border
    padding.

    Args:
        in_channels (int): Channels of the input (and of the output).
        scale (int): Upsampling factor, a whole number >= 2.
        style (str): ``"lp"`` (linear then pixel-shuffle: offsets from a 1x1 conv on X with
            ``2 * groups * scale**2`` outputs) or ``"pl"`` (pixel-shuffle then linear: the conv runs
            on ``pixel_shuffle(X)`` with ``in_channels / scale**2`` inputs and ``2 * groups``
            outputs; the "-S" variants of the paper, fewer parameters).
        groups (int): Channel groups with independent sampling points; must divide
            ``in_channels`` (for PL: ``in_channels / scale**2``).
        dyscope (bool): Dynamic scope (the "+" variants): ``O = 0.5 * sigmoid(scope(X)) * offset(X)``
            instead of the static ``O = 0.25 * offset(X)``.

    Examples:
        >>> import torch
        >>> from yolo_dysample import DySample
        >>> up = DySample(64, scale=2, style="lp", groups=4, dyscope=True)
        >>> up(torch.randn(2, 64, 20, 30)).shape
        torch.Size([2, 64, 40, 60])
    """

    def __init__(
        self,
        in_channels: int,
        scale: int = 2,
        style: str = "lp",
        groups: int = 4,
        dyscope: bool = False,
    ) -> None:
        super().__init__()
        in_channels = _as_whole_number("in_channels", in_channels, 1)
        scale = _as_whole_number("scale", scale, 2)
        groups = _as_whole_number("groups", groups, 1)
        if not isinstance(style, str) or style.lower() not in STYLES:
            raise ValueError(f"style={style!r} is not one of {STYLES}")
        style = style.lower()
        if not isinstance(dyscope, bool):
            raise ValueError(f"dyscope={dyscope!r} must be True or False")
        if in_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
        sub_pixels = scale * scale
        if style == "pl":
            if in_channels % sub_pixels:
                raise ValueError(
                    f"style='pl' needs in_channels={in_channels} divisible by scale**2={sub_pixels}"
                )
            if (in_channels // sub_pixels) % groups:
                raise ValueError(
                    f"style='pl' needs groups={groups} to divide in_channels / scale**2 = "
                    f"{in_channels // sub_pixels}"
                )
            conv_in, conv_out = in_channels // sub_pixels, 2 * groups
        else:
            conv_in, conv_out = in_channels, 2 * groups * sub_pixels

        self.in_channels = in_channels
        self.scale = scale
        self.style = style
        self.groups = groups
        self.dyscope = dyscope
        self.sampler = "grid_sample"  # or "gather" (export-safe twin); see gather_sampling.set_sampler
        # One grid_sample per channel group instead of one on a (B * groups) batch: ncnn has no batch axis. The
        # export hook sets it on the exporter's copy for ncnn only (gather_sampling.choose_sampler_for_export).
        self.grid_sample_per_group = False
        self.pixel_shuffle_first = style == "pl"
        self.offset_scale = DYNAMIC_SCOPE if dyscope else STATIC_SCOPE

        self.offset = nn.Conv2d(conv_in, conv_out, kernel_size=1)
        nn.init.normal_(self.offset.weight, mean=0.0, std=OFFSET_INIT_STD)
        nn.init.zeros_(self.offset.bias)
        self.scope = None
        if dyscope:
            self.scope = nn.Conv2d(conv_in, conv_out, kernel_size=1)
            nn.init.zeros_(self.scope.weight)
            nn.init.zeros_(self.scope.bias)
        # Persistent: the authors' checkpoints carry it, so strict loading expects the key.
        self.register_buffer("init_pos", self.bilinear_positions(scale, groups), persistent=True)
        # Not persistent: checkpoints keep the authors' keys. A constant rather than torch.eye in forward:
        # torch decomposes eye into a uint8 arange, which LiteRT lowers to STABLEHLO_IOTA and cannot run.
        self.register_buffer("sub_pixel_identity", self._identity_over_sub_pixels(scale), persistent=False)

    @staticmethod
    def bilinear_positions(scale: int, groups: int) -> torch.Tensor:
        """Where bilinear interpolation samples each sub-pixel, relative to the input-pixel centre.

        Returns:
            (torch.Tensor): Shape ``(1, 2 * groups * scale**2, 1, 1)``, channels ordered
                ``(axis, group, sub-pixel row, sub-pixel column)``; axis 0 is x, axis 1 is y.
        """
        steps = (torch.arange(scale, dtype=torch.float32) - (scale - 1) / 2) / scale  # (k - (s-1)/2) / s
        row_offset, column_offset = torch.meshgrid(steps, steps, indexing="ij")  # (s, s) each
        positions = torch.stack((column_offset, row_offset))  # (2, s, s): x then y
        return positions.unsqueeze(1).expand(2, groups, scale, scale).reshape(1, -1, 1, 1).clone()

    @staticmethod
    def _identity_over_sub_pixels(scale: int) -> torch.Tensor:
        """The ``scale**2`` identity shaped ``(1, s**2, 1, s**2)``: PL's weight selects sub-pixel ``k`` of ``X``."""
        sub_pixels = scale * scale
        return torch.eye(sub_pixels).reshape(1, sub_pixels, 1, sub_pixels)

    def __setstate__(self, state: dict) -> None:
        """Unpickle; a module pickled before ``sub_pixel_identity`` existed gets it (no checkpoint holds it)."""
        super().__setstate__(state)
        if "sub_pixel_identity" not in self._buffers:
            identity = self._identity_over_sub_pixels(self.scale).to(self.init_pos)  # init_pos's device and dtype
            self.register_buffer("sub_pixel_identity", identity, persistent=False)

    def extra_repr(self) -> str:
        """Configuration shown by ``print(module)``."""
        return (
            f"in_channels={self.in_channels}, scale={self.scale}, style={self.style!r}, "
            f"groups={self.groups}, dyscope={self.dyscope}"
        )

    def _projection(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """One of the 1x1 convs as a ``(2 * groups * s**2, in_channels, 1, 1)`` conv weight on ``X`` and its bias.

        Output channels are ordered ``(group, sub-pixel, axis)``, the order from which two rank-4
        copies build ``grid_sample``'s grid (the checkpoint's ``(axis, group, sub-pixel)`` needs a slow
        ``pixel_shuffle`` per axis and a ``stack``). PL's conv on ``pixel_shuffle(X)`` becomes a
        block-structured weight on ``X`` (sub-pixel ``k`` of output ``j`` reads channels ``c * s**2 + k``
        with weight ``W[j, c]``): no pixel_shuffle / pixel_unshuffle round trip. Every intermediate has
        rank <= 4.
        """
        groups, sub_pixels = self.groups, self.scale * self.scale
        if bias is None:  # TorchScript types a conv's bias as optional; ours always have one
            bias = torch.zeros_like(weight[:, 0, 0, 0])
        if self.pixel_shuffle_first:
            rows = weight.shape[0]  # 2 * groups
            weight = weight.reshape(rows, 1, -1, 1) * self.sub_pixel_identity  # (2g, s^2, C/s^2, s^2)
            bias = bias.reshape(rows, 1).expand(rows, sub_pixels)
        weight = weight.reshape(2, groups, sub_pixels, self.in_channels).permute(1, 2, 0, 3)  # (g, s^2, axis, C)
        bias = bias.reshape(2, groups, sub_pixels).permute(1, 2, 0)
        return weight.reshape(-1, self.in_channels, 1, 1), bias.reshape(-1)

    def _offset_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both convs as one 1x1 conv on ``X``: weight ``(rows or 2 * rows, in_channels, 1, 1)`` and bias.

        The scope factor is folded into the offset rows: ``0.25 * (W X + b) = (0.25 W) X + 0.25 b`` (exact:
        a power of two); with dynamic scope the scope conv's rows follow.
        """
        weight, bias = self._projection(self.offset.weight, self.offset.bias)
        weight, bias = weight * self.offset_scale, bias * self.offset_scale
        if self.scope is not None:
            scope_weight, scope_bias = self._projection(self.scope.weight, self.scope.bias)
            weight, bias = torch.cat((weight, scope_weight)), torch.cat((bias, scope_bias))
        return weight, bias

    def freeze_projection(self) -> None:
        """Keep the composed 1x1 conv as constant buffers, so a traced graph holds a plain conv, not its algebra.

        For export only (the export hook calls it on the exporter's copy for x2paddle, which converts a
        conv only when its weight and bias are constants): the buffers do not follow later changes of
        ``offset.*`` / ``scope.*``, and checkpoints do not store them.
        """
        with torch.no_grad():
            weight, bias = self._offset_projection()
        self.register_buffer("frozen_projection_weight", weight.clone(), persistent=False)
        self.register_buffer("frozen_projection_bias", bias.clone(), persistent=False)

    def _grouped_offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Offsets O in input pixels, shape ``(B, 2 * groups * s**2, H, W)``, channels ``(group, sub-pixel, axis)``.

        One 1x1 convolution on ``X`` (:meth:`_offset_projection`, or its constants after
        :meth:`freeze_projection`).
        """
        rows = 2 * self.groups * self.scale * self.scale
        frozen_weight = getattr(self, "frozen_projection_weight", None)
        frozen_bias = getattr(self, "frozen_projection_bias", None)
        if frozen_weight is not None and frozen_bias is not None:  # no cast: x2paddle needs the buffers themselves
            projected = F.conv2d(x, frozen_weight, frozen_bias)
        else:
            weight, bias = self._offset_projection()
            projected = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))  # (B, rows or 2 * rows, H, W)
        if self.scope is None:
            return projected
        return projected[:, :rows] * projected[:, rows:].sigmoid()  # 0.5 * sigmoid(scope(X)) * offset(X)

    def _grouped_sampling_grid(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """``grid_sample`` points, ``(B * groups, s*H, s*W, 2)``, from offsets ordered ``(group, sub-pixel, axis)``.

        Sizes come from the data (a cumulative sum of ones), not from Python integers: no ``arange``,
        no division by a traced size, and a traced graph serves every resolution. Rank <= 4 throughout.
        """
        batch, _, height, width = x.shape
        groups, scale = self.groups, self.scale
        coordinate_dtype = torch.promote_types(x.dtype, torch.float32)  # half inputs: pixel arithmetic in float32
        points = offsets.to(coordinate_dtype).reshape(batch, groups * scale * scale, 2, height * width)
        initial = self.init_pos.to(coordinate_dtype).reshape(2, -1).t().reshape(1, -1, 2, 1)  # G, (1, g s^2, 2, 1)
        if _in_onnx_export():  # ONNX has CumSum from opset 11 only, Range (arange) from opset 9
            column_counts = (torch.arange(width, dtype=coordinate_dtype, device=x.device) + 1.0).reshape(1, 1, 1, -1)
            row_counts = (torch.arange(height, dtype=coordinate_dtype, device=x.device) + 1.0).reshape(1, 1, -1, 1)
        else:  # full_like, not ones_like: x2paddle has no ones_like. (LiteRT folds a float arange, measured: only
            # torch.eye's uint8 one stays an IOTA it cannot run, see sub_pixel_identity)
            column_counts = torch.full_like(x[:1, :1, :1, :], 1.0, dtype=coordinate_dtype).cumsum(3)  # 1..W
            row_counts = torch.full_like(x[:1, :1, :, :1], 1.0, dtype=coordinate_dtype).cumsum(2)  # 1..H
        centres = torch.cat(  # pixel centres k + 0.5 = count - 0.5, x then y: (1, 1, 2, H*W)
            ((column_counts - 0.5).expand(1, 1, height, width), (row_counts - 0.5).expand(1, 1, height, width)), 1
        ).reshape(1, 1, 2, height * width)
        sizes = torch.cat((column_counts[:, :, :, -1:], row_counts[:, :, -1:, :]), 1).reshape(1, 1, 2, 1)  # W, H
        # 2 p / size - 1: pixel units -> grid_sample's [-1, 1] (align_corners=False); no 2 / size (x2paddle
        # has no reciprocal)
        points = (points + initial + centres) * 2.0 / sizes - 1.0  # (B, g s^2, 2, H*W): (b, g, i, j, axis, h, w)
        # two rank-4 copies: (b g i, j axis, h, w) -> (b g i, h, w, j axis) -> (b g, h, i, w j axis)
        points = points.reshape(batch * groups * scale, scale * 2, height, width).permute(0, 2, 3, 1)
        points = points.reshape(batch * groups, scale, height, width * scale * 2).permute(0, 2, 1, 3)
        return points.reshape(batch * groups, scale * height, scale * width, 2).to(x.dtype)

    def sample_offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Learned offsets O in input pixels, shape ``(B, 2 * groups * scale**2, H, W)``.

        Channels are ordered ``(axis, group, sub-pixel)`` like :attr:`init_pos`.
        """
        batch, _, height, width = x.shape
        rows = 2 * self.groups * self.scale * self.scale
        offsets = self._grouped_offsets(x).reshape(batch, rows // 2, 2, height * width).permute(0, 2, 1, 3)
        return offsets.reshape(batch, rows, height, width)  # (axis, group, sub-pixel)

    def sampling_grid(self, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """Normalised sampling points for ``grid_sample``, shape ``(B * groups, s*H, s*W, 2)``.

        ``offsets`` as :meth:`sample_offsets` returns them. Built from ``x``'s own shape, device and
        dtype, so a traced graph serves every resolution.
        """
        batch, rows, height, width = offsets.shape
        by_group = offsets.reshape(batch, 2, rows // 2, height * width).permute(0, 2, 1, 3)
        return self._grouped_sampling_grid(x, by_group.reshape(batch, rows, height, width))

    # Not annotated: TorchScript compiles the stubs of unused methods and cannot resolve string annotations there.
    @torch.jit.unused
    def _cpu_kernel_applies(self, x):
        """Eager float32/64 CPU calls with the ``grid_sample`` sampler take the compiled kernel (cpu_sampling.py)."""
        return getattr(self, "sampler", "grid_sample") == "grid_sample" and kernel_applies(x)

    @torch.jit.unused
    def _sample_with_cpu_kernel(self, x, offsets):
        """Sample with the compiled kernel from the offsets directly; gradients from grid_sample's backward."""
        return sample_with_kernel(self, x, offsets)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` of shape ``(B, in_channels, H, W)`` to ``(B, in_channels, s*H, s*W)``."""
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                "DySample expects input of shape (B, "
                + str(self.in_channels)
                + ", H, W), got "
                + str(list(x.shape))
            )
        batch, channels, height, width = x.shape
        offsets = self._grouped_offsets(x)
        if not torch.jit.is_scripting() and self._cpu_kernel_applies(x):
            return self._sample_with_cpu_kernel(x, offsets)  # eager CPU: the compiled kernel, no grid
        grid = self._grouped_sampling_grid(x, offsets)
        grouped = x.reshape(batch * self.groups, channels // self.groups, height, width)
        if getattr(self, "sampler", "grid_sample") == "gather":  # getattr: modules pickled before the attribute
            out = grid_sample_by_gather(grouped, grid)
        elif getattr(self, "grid_sample_per_group", False) and self.groups > 1:
            # ncnn (pnnx) export: one grid_sample per group on a batch of B; ncnn has no batch axis, a
            # (B * groups)-batch GridSample crashes it. Everywhere else one call: the concatenation copies the output.
            out_height, out_width = self.scale * height, self.scale * width
            grids = grid.reshape(batch, self.groups, out_height, out_width * 2)
            features, group_grids = x.chunk(self.groups, 1), grids.chunk(self.groups, 1)  # pnnx has no narrow
            parts = []
            for group in range(self.groups):
                group_grid = group_grids[group].reshape(batch, out_height, out_width, 2)
                parts.append(
                    F.grid_sample(features[group], group_grid, mode="bilinear", padding_mode="border", align_corners=False)
                )
            out = torch.cat(parts, 1)
        else:
            out = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="border", align_corners=False)
        return out.reshape(batch, channels, self.scale * height, self.scale * width)
