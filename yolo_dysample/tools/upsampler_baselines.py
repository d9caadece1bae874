"""The upsamplers DySample is benchmarked against, and how their cost is counted.

Every upsampler here maps ``(B, C, H, W)`` to ``(B, C, s*H, s*W)`` with the same ``C``, so each is a
drop-in for the ``nn.Upsample`` rows of a YOLO neck:

- ``nearest`` and ``bilinear``: ``F.interpolate`` (no parameters);
- ``deconv``: ``nn.ConvTranspose2d(C, C, kernel_size=s, stride=s)``;
- ``pixelshuffle``: a 1x1 conv ``C -> C * s**2`` followed by ``F.pixel_shuffle``;
- ``carafe``: CARAFE (Wang et al., "CARAFE: Content-Aware ReAssembly of FEatures", ICCV 2019), written
  here in plain PyTorch from the paper's equations (the authors ship a CUDA kernel in mmcv);
- ``dysample-lp``, ``dysample-lp+``, ``dysample-pl``, ``dysample-pl+``: the four DySample variants.

:func:`forward_flops` counts forward FLOPs the way this project reports them: convolutions and matrix
products as ``torch.utils.flop_counter`` counts what actually runs (2 FLOPs per multiply-add), plus 8
FLOPs (4 multiply-adds) per output value for every bilinear interpolation or bilinear ``grid_sample``,
which no FLOP counter includes. Nearest-neighbour copies, softmax, sigmoid and the sampling-coordinate
arithmetic (per sampling point, shared by ``C / groups`` channels) are not counted.

``python yolo_dysample.tools.upsampler_baselines`` checks the CARAFE implementation against a direct
per-pixel evaluation of the paper's reassembly sum and prints the FLOP rule applied to each upsampler.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from yolo_dysample import DySample

__all__ = [
    "CARAFE",
    "UPSAMPLERS",
    "BILINEAR_MACS_PER_OUTPUT",
    "Interpolation",
    "PixelShuffleUpsampler",
    "TransposedConvUpsampler",
    "build_upsampler",
    "forward_flops",
    "parameter_count",
]

BILINEAR_MACS_PER_OUTPUT = 4  # four neighbours, one weight each: the counting rule for interpolation/sampling
CARAFE_COMPRESSED_CHANNELS = 64  # C_m in the CARAFE paper
CARAFE_ENCODER_KERNEL = 3  # k_encoder
CARAFE_REASSEMBLY_KERNEL = 5  # k_up


class Interpolation(nn.Module):
    """``F.interpolate`` as a module (``nearest`` or ``bilinear``, ``align_corners=False``)."""

    def __init__(self, scale: int = 2, mode: str = "bilinear") -> None:
        super().__init__()
        self.scale, self.mode = scale, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x``."""
        if self.mode == "nearest":
            return F.interpolate(x, scale_factor=self.scale, mode="nearest")
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode, align_corners=False)


class TransposedConvUpsampler(nn.ConvTranspose2d):
    """``ConvTranspose2d(C, C, kernel_size=s, stride=s)``: every input pixel paints an ``s x s`` block."""

    def __init__(self, channels: int, scale: int = 2) -> None:
        super().__init__(channels, channels, kernel_size=scale, stride=scale)


class PixelShuffleUpsampler(nn.Module):
    """A 1x1 conv to ``C * s**2`` channels, then ``pixel_shuffle`` (sub-pixel convolution)."""

    def __init__(self, channels: int, scale: int = 2) -> None:
        super().__init__()
        self.scale = scale
        self.expand = nn.Conv2d(channels, channels * scale * scale, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x``."""
        return F.pixel_shuffle(self.expand(x), self.scale)


class CARAFE(nn.Module):
    """CARAFE, the content-aware reassembly upsampler, in plain PyTorch.

    Kernel prediction: a 1x1 conv compresses ``C`` to ``C_m = 64`` channels, a ``3 x 3`` content
    encoder predicts ``s**2 * k_up**2`` channels, ``pixel_shuffle`` spreads them over the ``s x s``
    sub-pixels and a softmax over the ``k_up**2`` values normalises each output pixel's kernel.
    Reassembly: output pixel ``(i, j)`` is the kernel-weighted sum of the ``k_up x k_up`` input
    neighbourhood (zero padded) around its source pixel ``(i // s, j // s)``.

    The sum runs, per sub-pixel, as ``k_up**2`` multiply-adds of shifted views of the padded input: no
    unfolded copy of ``X`` is made, but every tap still reads and writes a whole output plane, which the
    fused CUDA kernel of mmcv avoids; the benchmark reports this plain-PyTorch form as it is.
    """

    def __init__(
        self,
        channels: int,
        scale: int = 2,
        compressed_channels: int = CARAFE_COMPRESSED_CHANNELS,
        encoder_kernel: int = CARAFE_ENCODER_KERNEL,
        reassembly_kernel: int = CARAFE_REASSEMBLY_KERNEL,
    ) -> None:
        super().__init__()
        self.scale, self.reassembly_kernel = scale, reassembly_kernel
        self.compress = nn.Conv2d(channels, compressed_channels, kernel_size=1)
        self.encoder = nn.Conv2d(
            compressed_channels,
            scale * scale * reassembly_kernel * reassembly_kernel,
            kernel_size=encoder_kernel,
            padding=encoder_kernel // 2,
        )

    def reassembly_kernels(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax-normalised kernels, shape ``(B, k_up**2, s*H, s*W)``."""
        kernels = F.pixel_shuffle(self.encoder(self.compress(x)), self.scale)
        return kernels.softmax(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x``."""
        batch, channels, height, width = x.shape
        scale, size = self.scale, self.reassembly_kernel
        kernels = self.reassembly_kernels(x).reshape(batch, size * size, height, scale, width, scale)
        kernels = kernels.permute(0, 3, 5, 1, 2, 4).contiguous()  # (B, s, s, k_up**2, H, W)
        padded = F.pad(x, (size // 2,) * 4)  # zeros outside the map
        # X shifted by (row - r, column - r) for every tap, row-major over the window like F.unfold: views
        neighbours = [
            padded[:, :, row : row + height, column : column + width] for row in range(size) for column in range(size)
        ]
        sub_pixel_outputs = []
        for sub_row in range(scale):
            for sub_column in range(scale):
                out = x.new_zeros(batch, channels, height, width)
                for tap, neighbour in enumerate(neighbours):
                    out.addcmul_(neighbour, kernels[:, sub_row, sub_column, tap].unsqueeze(1))
                sub_pixel_outputs.append(out)
        out = torch.stack(sub_pixel_outputs, dim=-1).reshape(batch, channels, height, width, scale, scale)
        return out.permute(0, 1, 2, 4, 3, 5).reshape(batch, channels, scale * height, scale * width)


def _dysample(style: str, dyscope: bool) -> Callable[[int, int], nn.Module]:
    return lambda channels, scale: DySample(channels, scale=scale, style=style, groups=4, dyscope=dyscope)


# name -> constructor(channels, scale); the order is the order of every table and plot
UPSAMPLERS: dict[str, Callable[[int, int], nn.Module]] = {
    "nearest": lambda channels, scale: Interpolation(scale, "nearest"),
    "bilinear": lambda channels, scale: Interpolation(scale, "bilinear"),
    "deconv": TransposedConvUpsampler,
    "pixelshuffle": PixelShuffleUpsampler,
    "carafe": CARAFE,
    "dysample-lp": _dysample("lp", False),
    "dysample-lp+": _dysample("lp", True),
    "dysample-pl": _dysample("pl", False),
    "dysample-pl+": _dysample("pl", True),
}


def build_upsampler(name: str, channels: int, scale: int = 2) -> nn.Module:
    """The upsampler ``name`` (a key of :data:`UPSAMPLERS`) for ``channels`` channels."""
    if name not in UPSAMPLERS:
        raise ValueError(f"upsampler={name!r} is not one of {tuple(UPSAMPLERS)}")
    return UPSAMPLERS[name](channels, scale)


def parameter_count(module: nn.Module) -> int:
    """Learnable parameters (buffers such as DySample's ``init_pos`` are not counted)."""
    return sum(parameter.numel() for parameter in module.parameters())


def _sampling_flops(*args, out_shape=None, **kwargs) -> int:
    """8 FLOPs (4 multiply-adds) per output value of a bilinear interpolation or bilinear grid sample."""
    return 2 * BILINEAR_MACS_PER_OUTPUT * torch.Size(out_shape).numel()


def _grid_sample_flops(input_shape, grid_shape, interpolation_mode, *args, out_shape=None, **kwargs) -> int:
    if interpolation_mode != 0:  # 0: bilinear; nearest sampling is a copy
        return 0
    return _sampling_flops(out_shape=out_shape)


def _multiply_add_flops(*args, out_shape=None, **kwargs) -> int:
    """2 FLOPs per output value: CARAFE's reassembly, one ``addcmul_`` per tap."""
    return 2 * torch.Size(out_shape).numel()


SAMPLING_FLOP_RULES = {  # FlopCounterMode looks operators up by overload packet
    torch.ops.aten.upsample_bilinear2d: _sampling_flops,
    torch.ops.aten.grid_sampler_2d: _grid_sample_flops,
    torch.ops.aten.addcmul_: _multiply_add_flops,
}


def forward_flops(module: nn.Module, x: torch.Tensor) -> int:
    """Forward FLOPs of ``module(x)``: counted matmuls and convs plus the bilinear sampling rule."""
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SAMPLING_FLOP_RULES) as counter:
        module(x)
    return counter.get_total_flops()


def _carafe_by_definition(module: CARAFE, x: torch.Tensor) -> torch.Tensor:
    """CARAFE's reassembly written as the paper's per-pixel sum (slow; tiny inputs only)."""
    batch, channels, height, width = x.shape
    scale, size = module.scale, module.reassembly_kernel
    radius = size // 2
    kernels = module.reassembly_kernels(x)  # (B, size*size, s*H, s*W)
    out = torch.zeros(batch, channels, scale * height, scale * width, dtype=x.dtype)
    for row in range(scale * height):
        for column in range(scale * width):
            source_row, source_column = row // scale, column // scale
            for tap in range(size * size):
                dy, dx = tap // size - radius, tap % size - radius
                y, x_index = source_row + dy, source_column + dx
                if 0 <= y < height and 0 <= x_index < width:
                    out[:, :, row, column] += kernels[:, tap, row, column, None] * x[:, :, y, x_index]
    return out


def self_check() -> None:
    """CARAFE equals its definition; print the FLOP count of every upsampler at a small shape."""
    torch.manual_seed(0)
    carafe = CARAFE(8).double()
    for parameter in carafe.parameters():
        nn.init.normal_(parameter, std=0.5)  # far from uniform kernels, so the softmax weights matter
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64)
    with torch.no_grad():
        error = (carafe(x) - _carafe_by_definition(carafe, x)).abs().max().item()
    print(f"CARAFE vs its per-pixel definition: max |difference| = {error:.2e}")
    if error > 1e-10:
        raise SystemExit("CARAFE implementation disagrees with its definition")
    x = torch.randn(1, 64, 10, 10)
    for name in UPSAMPLERS:
        module = build_upsampler(name, 64).eval()
        print(f"{name:>14s}: {parameter_count(module):>7d} parameters, {forward_flops(module, x) / 1e6:8.3f} MFLOPs")


if __name__ == "__main__":
    self_check()
