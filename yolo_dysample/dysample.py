"""DySample: a dynamic, point-sampling upsampler.

Implements the upsampler of "Learning to Upsample by Learning to Sample" (Liu, Lu, Fu, Cao, ICCV 2023). A 1x1
convolution predicts, for every output pixel and every channel group, a small offset from the position bilinear
interpolation would sample; the output is the input sampled bilinearly (border padding) at those points. With
zero offsets DySample *is* bilinear interpolation (``align_corners=False``).

Parameter and buffer names follow the authors' reference (``offset.*``, ``scope.*``, ``init_pos``), so their
checkpoints load with ``strict=True``: both scope layouts, with a bias on the dynamic-scope conv (their releases
of 2023) and without (their code since 2024, and new modules here).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from yolo_dysample import cpu_sampling
from yolo_dysample.sampling import bilinear_positions, grid_sample_per_group, sample_groups, sampling_grid
from yolo_dysample.validation import as_whole_number, configuration_error

__all__ = ["MAX_SCALE", "SAMPLERS", "STYLES", "DySample", "ExportForm", "configuration_error"]

STYLES = ("lp", "pl")
SAMPLERS = ("grid_sample", "gather", "difference_tables")
STATIC_SCOPE = 0.25  # O = 0.25 * offset(X): keeps neighbouring sampling points from overlapping
DYNAMIC_SCOPE = 0.5  # O = 0.5 * sigmoid(scope(X)) * offset(X): the "+" variants
OFFSET_INIT_STD = 0.001  # offset conv weights ~ N(0, 0.001), bias 0 (paper, Sec. 3)
# Largest upsampling factor accepted, also from a checkpoint: PL's constant sub-pixel identity holds scale**4
# values (16: 256 KiB), so an unbounded scale in a crafted file would make unpickling allocate gigabytes.
MAX_SCALE = 16
_INIT_SEED_SALT = 0x5D15A3  # mixed into the seed of DySample's private generator (reset_parameters)


class ExportForm(NamedTuple):
    """How DySample spells its sampling for a toolchain; every form computes the same values.

    Set through :mod:`yolo_dysample.export_policy` (``set_sampler`` / ``use_sampler``, and the export hook on
    the exporter's copy); read once per forward. A ``NamedTuple``: immutable, and TorchScript can read it.

    Attributes:
        sampler (str): ``"grid_sample"`` (one ``F.grid_sample``), ``"gather"`` (index arithmetic and one
            gather, for runtimes without a usable ``GridSample``) or ``"difference_tables"`` (four row gathers from
            value and difference tables, the fastest form in ONNX Runtime on CPU).
        grid_sample_per_group (bool): One ``grid_sample`` per channel group on a batch of ``B`` instead of one
            call on a ``(B * groups)`` batch.
        frozen_projection (bool): The offset projection runs from constant buffers
            (:meth:`DySample.freeze_projection`) instead of being composed from ``offset.*`` / ``scope.*``.
        sampler_chosen_by_user (bool): ``sampler`` was chosen explicitly (``set_sampler`` / ``use_sampler``);
            the export hook then keeps it.
    """

    sampler: str = "grid_sample"
    grid_sample_per_group: bool = False
    frozen_projection: bool = False
    sampler_chosen_by_user: bool = False


def _conv_shape(style: str, in_channels: int, scale: int, groups: int) -> tuple[int, int]:
    """``(in, out)`` channels of the offset (and scope) conv: LP on X, PL on ``pixel_shuffle(X)``."""
    if style == "pl":
        return in_channels // (scale * scale), 2 * groups
    return in_channels, 2 * groups * scale * scale


def _identity_over_sub_pixels(scale: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """The ``scale**2`` identity shaped ``(1, s**2, 1, s**2)``: PL's weight selects sub-pixel ``k`` of ``X``."""
    sub_pixels = scale * scale
    identity = torch.eye(sub_pixels).reshape(1, sub_pixels, 1, sub_pixels)
    return identity if like is None else identity.to(like)


def _encoded_configuration(init_pos: torch.Tensor) -> str:
    """The ``scale=.., groups=..`` whose :func:`bilinear_positions` equal ``init_pos``, as text."""
    values = init_pos.detach().float().cpu().flatten()
    if values.numel() >= 2 and values.numel() % 2 == 0:
        scale = int(torch.unique(values[: values.numel() // 2].round(decimals=5)).numel())
        groups = values.numel() // (2 * scale * scale) if scale >= 2 else 0
        if groups >= 1 and 2 * groups * scale * scale == values.numel():
            if torch.allclose(values, bilinear_positions(scale, groups).flatten(), rtol=0, atol=1e-6):
                return f"scale={scale}, groups={groups}"
    return f"no scale and groups (shape {tuple(init_pos.shape)})"


class DySample(nn.Module):
    """Learned point-sampling upsampler (DySample, ICCV 2023).

    Channels are split into ``groups`` contiguous groups; each group gets its own sampling point for every
    output pixel. The sampling set is ``S = G + O``: ``G`` places each of the ``scale**2`` sub-pixels of an
    input pixel where bilinear interpolation samples (``init_pos``), ``O`` is the learned offset, and the
    output is ``grid_sample(X, S)`` with bilinear weights and border padding. :meth:`forward` is those three
    steps; on the CPU in eager mode a compiled kernel samples from ``O`` directly (``cpu_sampling.py``). Offsets
    that are not finite (a diverged model) never crash a path: a NaN coordinate samples as ``-inf`` (the first row
    or column), ``+-inf`` as the border, in forward and backward (``sampling.sampling_grid``).

    Portability constraints. The maths is the same in every form; how it is spelt follows what toolchains
    accept (measured with the export matrix, ``docs/export_matrix.md``). Lines that obey a constraint carry
    its tag.

    ======================  ===========================================================  ========================
    Tag                     Constraint (toolchain)                                       Where
    ======================  ===========================================================  ========================
    ``[x2paddle]``          no ``ones_like``, reciprocal, ``index_select``; ``floor``    ``sampling.py``;
                            only on Python numbers; a conv only with constant weight     ``frozen_projection``
                            and bias (``format=paddle``)
    ``[onnx<11]``           no ``CumSum`` (ONNX opset 9-10)                              ``sampling_grid``
    ``[onnx<12]``           ``Clip`` on floats only (ONNX opset 9-11)                    ``grid_sample_by_gather``
    ``[onnx<16]``           no ``GridSample`` (ONNX opset 9-15)                          ``export_policy``: gather
    ``[onnx2tf]``           ``GridSample`` only with zeros padding (TensorFlow formats)  ``export_policy``: gather
    ``[onnxruntime]``       its CPU ``GridSample`` is slow (about 20 ns per value)       ``export_policy``:
                                                                                         difference tables
    ``[ncnn]``              no batch axis: a ``(B * groups)``-batch ``GridSample``       ``grid_sample_per_group``
                            crashes it (``format=ncnn``)
    ``[pnnx]``              no ``narrow``; no ``gt`` / ``lt`` / ``where``, so ncnn       ``grid_sample_per_group``,
                            clamps +-inf but keeps NaN coordinates (``format=ncnn``)     ``forward``
    ``[litert]``            ``torch.eye``'s uint8 ``arange`` stays a ``STABLEHLO_IOTA``  ``sub_pixel_identity``
                            that ai-edge-litert cannot run (``format=litert``)
    ``[rank<=4]``           intermediates of rank <= 4 (converters with 4-D layouts)     ``_projection``,
                                                                                         ``sampling_grid``
    ``[torchscript]``       a conv's bias is ``Optional``; ``is_in_onnx_export`` cannot  ``_projection``,
                            be compiled (``torch.jit.script``)                           ``sampling.py``
    ``[half]``              coordinates in float32 for float16 / bfloat16 inputs         ``sampling.py``
    ======================  ===========================================================  ========================

    Args:
        in_channels (int): Channels of the input (and of the output).
        scale (int): Upsampling factor, a whole number in ``[2, MAX_SCALE]``.
        style (str): ``"lp"`` (linear then pixel-shuffle: offsets from a 1x1 conv on X with
            ``2 * groups * scale**2`` outputs) or ``"pl"`` (pixel-shuffle then linear: the conv runs on
            ``pixel_shuffle(X)`` with ``in_channels / scale**2`` inputs and ``2 * groups`` outputs; the "-S"
            variants of the paper, fewer parameters).
        groups (int): Channel groups with independent sampling points; must divide ``in_channels`` (for PL:
            ``in_channels / scale**2``).
        dyscope (bool): Dynamic scope (the "+" variants): ``O = 0.5 * sigmoid(scope(X)) * offset(X)`` instead
            of the static ``O = 0.25 * offset(X)``. The scope conv has no bias (the authors' current layout); a
            state dict that carries ``scope.bias`` (their 2023 layout) loads too and keeps its bias.
        device (torch.device | str | None): Where the parameters live.
        dtype (torch.dtype | None): Their floating-point type.

    Examples:
        >>> import torch
        >>> from yolo_dysample import DySample
        >>> up = DySample(64, scale=2, style="lp", groups=4, dyscope=True)
        >>> up(torch.randn(2, 64, 20, 30)).shape
        torch.Size([2, 64, 40, 60])
    """

    export_form: ExportForm  # TorchScript reads the attribute's type from here

    def __init__(
        self,
        in_channels: int,
        scale: int = 2,
        style: str = "lp",
        groups: int = 4,
        dyscope: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        in_channels, scale, style, groups, dyscope = self._checked_configuration(
            in_channels, scale, style, groups, dyscope
        )
        conv_in, conv_out = _conv_shape(style, in_channels, scale, groups)
        self.in_channels = in_channels
        self.scale = scale
        self.style = style
        self.groups = groups
        self.dyscope = dyscope
        self.pixel_shuffle_first = style == "pl"
        self.offset_scale = DYNAMIC_SCOPE if dyscope else STATIC_SCOPE
        self.export_form = ExportForm()
        # torch's default device when none is given (skip_init would otherwise leave the weights on "meta")
        factory = {"device": torch.empty(0).device if device is None else device, "dtype": dtype}
        # skip_init: no draw from torch's global RNG here, reset_parameters sets every value
        self.offset = nn.utils.skip_init(nn.Conv2d, conv_in, conv_out, 1, **factory)
        self.scope = nn.utils.skip_init(nn.Conv2d, conv_in, conv_out, 1, bias=False, **factory) if dyscope else None
        # Persistent: the authors' checkpoints carry it, so strict loading expects the key.
        self.register_buffer("init_pos", bilinear_positions(scale, groups).to(device), persistent=True)
        # [litert] a constant, not torch.eye in forward; not persistent: checkpoints keep the authors' keys
        identity = _identity_over_sub_pixels(scale).to(device=device, dtype=dtype)
        self.register_buffer("sub_pixel_identity", identity, persistent=False)
        self.reset_parameters()

    @staticmethod
    def _checked_configuration(
        in_channels: object, scale: object, style: object, groups: object, dyscope: object
    ) -> tuple[int, int, str, int, bool]:
        """The configuration as ``(in_channels, scale, style, groups, dyscope)``; ``ValueError`` names a bad one."""
        in_channels = as_whole_number("in_channels", in_channels, 1, whole_floats=True)
        scale = as_whole_number("scale", scale, 2, MAX_SCALE, whole_floats=True)
        groups = as_whole_number("groups", groups, 1, whole_floats=True)
        if not isinstance(style, str) or style.lower() not in STYLES:
            raise ValueError(f"style={style!r} is not one of {STYLES}")
        if not isinstance(dyscope, bool):
            raise ValueError(f"dyscope={dyscope!r} must be True or False")
        problem = configuration_error(style.lower(), in_channels, scale, groups)
        if problem is not None:
            raise ValueError(problem)
        return in_channels, scale, style.lower(), groups, dyscope

    def reset_parameters(self) -> None:
        """The paper's initialisation: offset conv weights ~ N(0, 0.001), its bias 0, the scope conv 0.

        A fresh DySample is therefore bilinear interpolation up to offsets of ~1e-3 pixels. The weights are
        drawn from a private generator seeded from a fork of torch's global CPU RNG: they follow
        ``torch.manual_seed`` (the same seed and build order give the same weights, on every device and dtype),
        and the global stream is left where it was, so every other layer of a model starts from the weights it
        would have without DySample. Two DySample layers of the same shape built with no draw in between start
        equal.
        """
        with torch.random.fork_rng(devices=[]):
            seed = int(torch.randint(0, 2**62, (1,), device="cpu").item()) ^ _INIT_SEED_SALT  # also under meta
        generator = torch.Generator().manual_seed(seed)
        weight = self.offset.weight
        with torch.no_grad():
            values = torch.randn(weight.shape, generator=generator) * OFFSET_INIT_STD
            weight.copy_(values)
            self.offset.bias.zero_()
            if self.scope is not None:
                self.scope.weight.zero_()
                if self.scope.bias is not None:
                    self.scope.bias.zero_()
        if self.export_form.frozen_projection:
            self.freeze_projection()

    # ------------------------------------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Upsample ``x`` of shape ``(B, in_channels, H, W)`` to ``(B, in_channels, s*H, s*W)``."""
        if not torch.jit.is_tracing() and (x.dim() != 4 or x.shape[1] != self.in_channels):
            raise ValueError(
                "DySample expects input of shape (B, " + str(self.in_channels) + ", H, W), got " + str(list(x.shape))
            )
        offsets = self.offsets(x)  # O, (group, sub-pixel, axis)
        if not torch.jit.is_scripting() and self._kernel_applies(x):
            return self._sample_with_kernel(x, offsets)  # eager CPU: samples at G + O without a grid
        nan_to_first = not self.export_form.grid_sample_per_group  # [pnnx]
        points = sampling_grid(x, offsets, self.init_pos, self.groups, self.scale, nan_to_first)  # S = G + O
        return self._sample(x, points)

    def offsets(self, x: torch.Tensor) -> torch.Tensor:
        """Learned offsets O in input pixels, ``(B, 2 * groups * s**2, H, W)``, channels ``(group, sub-pixel, axis)``.

        One 1x1 convolution on ``X`` (:meth:`_offset_projection`, or its constants after
        :meth:`freeze_projection`); this channel order is the one :func:`sampling.sampling_grid` takes.
        """
        rows = 2 * self.groups * self.scale * self.scale
        frozen_weight = getattr(self, "frozen_projection_weight", None)
        frozen_bias = getattr(self, "frozen_projection_bias", None)
        if self.export_form.frozen_projection and frozen_weight is not None and frozen_bias is not None:
            projected = F.conv2d(x, frozen_weight, frozen_bias)  # [x2paddle] no cast: the buffers themselves
        else:
            weight, bias = self._offset_projection()
            projected = F.conv2d(x, weight.to(x.dtype), bias.to(x.dtype))  # (B, rows or 2 * rows, H, W)
        if self.scope is None:
            return projected
        return projected[:, :rows] * projected[:, rows:].sigmoid()  # 0.5 * sigmoid(scope(X)) * offset(X)

    def _sample(self, x: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        """``x`` sampled at ``points`` in the :class:`ExportForm` the module holds (the one place it is read)."""
        form = self.export_form
        if form.sampler == "gather":
            return sample_groups(x, points, self.groups, by_gather=True)
        if form.sampler == "difference_tables":
            return sample_groups(x, points, self.groups, by_difference_tables=True)
        if form.grid_sample_per_group and self.groups > 1:  # [ncnn]
            return grid_sample_per_group(x, points, self.groups)
        return sample_groups(x, points, self.groups)

    # Not annotated: TorchScript compiles the stubs of unused methods and cannot resolve annotations there.
    @torch.jit.unused
    def _kernel_applies(self, x):
        """Eager float32/64 CPU calls with the ``grid_sample`` sampler take the compiled kernel."""
        return self.export_form.sampler == "grid_sample" and cpu_sampling.kernel_applies(x)

    @torch.jit.unused
    def _sample_with_kernel(self, x, offsets):
        """The compiled kernel's sampling at ``G + offsets``; its gradients are grid_sample's."""
        return cpu_sampling.sample_with_kernel(x, offsets, self.init_pos, self.groups, self.scale)

    # ------------------------------------------------------------------------------ offset projection
    def _projection(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One of the 1x1 convs as a ``(2 * groups * s**2, in_channels, 1, 1)`` conv weight on ``X`` and its bias.

        The channel-order conversion, in this one place: output channels go from the checkpoint's ``(axis,
        group, sub-pixel)`` to ``(group, sub-pixel, axis)``, the order from which two rank-4 copies build
        ``grid_sample``'s grid (the checkpoint order would need a slow ``pixel_shuffle`` per axis and a
        ``stack``). PL's conv on ``pixel_shuffle(X)`` becomes a block-structured weight on ``X`` (sub-pixel ``k``
        of output ``j`` reads channels ``c * s**2 + k`` with weight ``W[j, c]``): no pixel_shuffle /
        pixel_unshuffle round trip. Every intermediate has rank <= 4 ``[rank<=4]``.
        """
        groups, sub_pixels = self.groups, self.scale * self.scale
        if bias is None:  # [torchscript] Optional; the scope conv has none in the current layout
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

        The scope factor is folded into the offset rows: ``0.25 * (W X + b) = (0.25 W) X + 0.25 b`` (exact: a
        power of two); with dynamic scope the scope conv's rows follow.
        """
        weight, bias = self._projection(self.offset.weight, self.offset.bias)
        weight, bias = weight * self.offset_scale, bias * self.offset_scale
        if self.scope is not None:
            scope_weight, scope_bias = self._projection(self.scope.weight, self.scope.bias)
            weight, bias = torch.cat((weight, scope_weight)), torch.cat((bias, scope_bias))
        return weight, bias

    def freeze_projection(self) -> None:
        """Keep the composed 1x1 conv as constant buffers, so a traced graph holds a plain conv, not its algebra.

        For export only (``ExportForm.frozen_projection``, ``[x2paddle]``): the buffers do not follow later
        changes of ``offset.*`` / ``scope.*``, and checkpoints do not store them.
        """
        with torch.no_grad():
            weight, bias = self._offset_projection()
        self.register_buffer("frozen_projection_weight", weight.clone(), persistent=False)
        self.register_buffer("frozen_projection_bias", bias.clone(), persistent=False)
        self.export_form = self.export_form._replace(frozen_projection=True)

    # ---------------------------------------------------------------------------- loading and pickling
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        """Load both scope layouts, and refuse an ``init_pos`` of another ``(scale, groups)``.

        A state dict with ``scope.bias`` (the authors' 2023 layout, this package's before the current one)
        gives the scope conv a bias to load it into; one without leaves (or makes) it bias-free, which computes
        what a zero bias does.
        """
        if self.scope is not None:
            carries_bias = prefix + "scope.bias" in state_dict
            if carries_bias and self.scope.bias is None:
                weight = self.scope.weight
                self.scope.bias = nn.Parameter(torch.zeros(weight.shape[0], device=weight.device, dtype=weight.dtype))
            elif not carries_bias and self.scope.bias is not None and prefix + "scope.weight" in state_dict:
                self.scope.bias = None
        init_pos = state_dict.get(prefix + "init_pos")
        if isinstance(init_pos, torch.Tensor) and not self._encodes_own_configuration(init_pos):
            error_msgs.append(
                f"{prefix}init_pos encodes {_encoded_configuration(init_pos)}, but this DySample has "
                f"scale={self.scale}, groups={self.groups}"
            )
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _encodes_own_configuration(self, init_pos: torch.Tensor) -> bool:
        expected = bilinear_positions(self.scale, self.groups)
        if init_pos.numel() != expected.numel() or init_pos.is_meta:
            return init_pos.is_meta and init_pos.numel() == expected.numel()
        return torch.allclose(init_pos.detach().float().cpu().reshape(expected.shape), expected, rtol=0, atol=1e-6)

    def __getstate__(self) -> dict:
        """Pickle with the export form as a plain dict (``ULTRALYTICS_SAFE_LOAD``'s unpickler knows no ExportForm)."""
        state = self.__dict__.copy()
        state["export_form"] = dict(self.export_form._asdict())
        return state

    def __setstate__(self, state: dict) -> None:
        """Unpickle, checking the configuration against the tensors first; migrates earlier versions' modules.

        Earlier versions kept the export form as the attributes ``sampler`` and ``grid_sample_per_group`` and
        the presence of ``frozen_projection_*`` buffers, and some had no ``sub_pixel_identity``.

        Raises:
            ValueError: The configuration is invalid, exceeds :data:`MAX_SCALE`, or does not match the
                tensors the file holds (a crafted file could otherwise make unpickling allocate gigabytes).
        """
        state = dict(state)
        form = state.pop("export_form", None)
        sampler = state.pop("sampler", "grid_sample")
        per_group = state.pop("grid_sample_per_group", False)
        super().__setstate__(state)
        self._check_unpickled_configuration()
        if isinstance(form, dict):
            self.export_form = ExportForm(**form)
        elif isinstance(form, ExportForm):
            self.export_form = form
        else:
            frozen = "frozen_projection_weight" in self._buffers and "frozen_projection_bias" in self._buffers
            self.export_form = ExportForm(sampler, bool(per_group), frozen)
        if self.export_form.sampler not in SAMPLERS:
            raise ValueError(f"sampler={self.export_form.sampler!r} is not one of {SAMPLERS}")
        if "sub_pixel_identity" not in self._buffers:
            identity = _identity_over_sub_pixels(self.scale, like=self.init_pos)  # init_pos's device and dtype
            self.register_buffer("sub_pixel_identity", identity, persistent=False)

    def _check_unpickled_configuration(self) -> None:
        """The unpickled configuration is valid, bounded, and matches ``offset.weight`` and ``init_pos``."""
        configuration = tuple(getattr(self, name, None) for name in ("in_channels", "scale", "style", "groups"))
        self._checked_configuration(*configuration, getattr(self, "dyscope", None))
        in_channels, scale, style, groups = configuration
        conv_in, conv_out = _conv_shape(style, in_channels, scale, groups)
        offset, init_pos = self._modules.get("offset"), self._buffers.get("init_pos")
        shapes = {
            "offset.weight": (getattr(offset, "weight", None), (conv_out, conv_in, 1, 1)),
            "init_pos": (init_pos, (1, 2 * groups * scale * scale, 1, 1)),
        }
        if "sub_pixel_identity" in self._buffers:
            shapes["sub_pixel_identity"] = (self._buffers["sub_pixel_identity"], (1, scale * scale, 1, scale * scale))
        for name, (tensor, shape) in shapes.items():
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != shape:
                found = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
                raise ValueError(
                    f"DySample(in_channels={in_channels}, scale={scale}, style={style!r}, groups={groups}) "
                    f"needs {name} of shape {shape}, the file holds {found}"
                )

    def extra_repr(self) -> str:
        """Configuration shown by ``print(module)``."""
        return (
            f"in_channels={self.in_channels}, scale={self.scale}, style={self.style!r}, "
            f"groups={self.groups}, dyscope={self.dyscope}"
        )
