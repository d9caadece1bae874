"""Every place where yolo-dysample touches Ultralytics, in one module.

:func:`register_with_ultralytics` lets stock Ultralytics build, find and load DySample models. It is idempotent,
never edits installed files, and patches only by adding names or wrapping functions at run time. The post-import
hook in :mod:`_yolo_dysample_autoload` calls it in every process that imports ``ultralytics.nn.tasks``.

Touch points. Checked against ultralytics 8.4.104, the oldest supported release (the first one with YOLO26 depth),
and 8.4.190. ``pyproject.toml`` declares ``ultralytics>=8.4.104,<8.5``.

1. **Model parser.** ``ultralytics.nn.tasks.parse_model`` resolves a YAML row's module name with
   ``globals()[name]`` in ``ultralytics.nn.tasks``. We add ``DySample`` to that namespace; the value is
   :class:`DySampleRow`, an ``nn.Module`` subclass, so the ``ULTRALYTICS_SAFE_LOAD`` layer check passes. parse_model
   sends the unknown class to its final ``else: c2 = ch[f]`` branch (output channels equal input channels) and calls
   ``DySampleRow(*args)``. ``DySampleRow.__new__`` reads ``ch``, ``f`` and ``i`` from the calling parse_model frame
   and returns a plain :class:`yolo_dysample.DySample` with ``in_channels = ch[f]``. That is the same inference
   parse_model uses for its own layers, so it holds at every width scale. Checkpoints therefore pickle only
   ``yolo_dysample.dysample.DySample``. We also wrap ``parse_model`` (in ``nn.tasks`` and the ``ultralytics.nn``
   re-export). The wrapper adds ``model YAML layer <i>`` to an error raised while parse_model itself handles a
   DySample row, e.g. ``ch[f]`` with a list ``from``; errors raised by DySampleRow already carry it.
   If this moves: registration checks that parse_model exists, calls ``globals()`` and has the locals ``ch``, ``f``,
   ``i``, ``m``, ``args``. If not, it raises :class:`UltralyticsIncompatibleError` naming the installed version. If
   ultralytics stops sending unknown modules to ``c2 = ch[f]``, model outputs get the wrong channel count and the
   YAML build tests fail.
2. **YAML lookup.** ``ultralytics.utils.checks.check_file`` finds a bare file name: it returns a local file first,
   then searches the ultralytics package tree. ``check_yaml`` calls it, and so do ``nn.tasks.yaml_model_load``
   (model YAMLs, after reducing ``yolov8n-x.yaml`` to ``yolov8-x.yaml``) and ``data.utils.check_det_dataset``
   (dataset YAMLs). We wrap ``check_file`` in ``checks`` and in every loaded ``ultralytics.*`` module that imported
   it by name (``nn.tasks``, ``data.utils``, ``data.build``, ``engine.trainer``, ...). A bare YAML name that exists
   under our ``cfg/models`` or ``cfg/datasets`` and is not a local file resolves to the bundled file. Everything
   else goes to ultralytics unchanged, so a local file of the same name still wins.
   If this moves: bare names such as ``yolov8n-dysample.yaml`` stop resolving (``FileNotFoundError``); explicit
   paths keep working. Registration raises if ``check_file`` is missing.
3. **Restricted loading** (``ULTRALYTICS_SAFE_LOAD=1``). ``nn.tasks.torch_safe_load`` loads with
   ``torch.load(weights_only=True)``. Its ``_SafeLoad`` allow-list reaches torch as ``torch.serialization`` safe
   globals: a ``safe_globals()`` scope in 8.4.104, ``add_safe_globals`` in 8.4.190. We add ``DySample`` with
   ``torch.serialization.add_safe_globals``, the store both versions read, instead of editing ``_SafeLoad``'s
   private and changing registry.
   If this moves: a DySample checkpoint under ``ULTRALYTICS_SAFE_LOAD=1`` fails with "references types outside the
   supported Ultralytics checkpoint format". The safe-load test catches this.
4. **Model-name conventions.** These are read, not patched. ``yaml_model_load`` reduces ``<stem><scale><rest>`` to
   ``<stem><rest>`` and ``guess_model_scale`` takes the scale letter after ``yolo``/``yolov`` plus digits. Our YAMLs
   are therefore named ``<stock stem>-dysample*.yaml`` (``yolo11s-seg-dysample.yaml`` -> ``yolo11-seg-dysample.yaml``
   at scale ``s``).
5. **Export sampler** (section owned with ``yolo_dysample/gather_sampling.py``). ``Exporter.__call__`` fires the
   ``on_export_start`` callbacks after it has deep-copied, fused and dry-run the model and before any converter
   traces it; ``Model.export`` hands the exporter its callbacks, copied from
   ``ultralytics.utils.callbacks.base.default_callbacks`` when the ``Model`` was made. We append
   :func:`yolo_dysample.gather_sampling.choose_sampler_for_export` to that default list, so every export switches
   the copy's DySample layers to the sampler its format needs (``gather`` where GridSample is missing or wrong,
   ``YOLO_DYSAMPLE_SAMPLER`` overrides) and refuses ONNX opsets too low for DySample with a clear error.
   If this moves: registration raises if ``default_callbacks`` has no ``on_export_start`` list; if the event fires
   later than the converters, formats without GridSample fail to export or mismatch, which the export tests catch.
6. **GFLOPs** (``model.info()``, the training log, ``yolo-dysample compare``).
   ``ultralytics.utils.torch_utils.get_flops`` counts with thop (``ultralytics-thop``), whose rules are forward
   hooks looked up by module type in the dict ``thop.profile.register_hooks``. DySample's forward runs its 1x1
   convs as one ``F.conv2d`` on composed weights and samples with ``F.grid_sample`` or the CPU kernel, so no child
   module's hook fires: without a rule of its own DySample counts as 0. We add
   :func:`count_dysample_multiply_adds` to that dict (thop counts multiply-adds; ultralytics doubles them into
   FLOPs).
   If this moves: nothing breaks, DySample's GFLOPs read low again (the GFLOPs test fails). Without thop
   ultralytics reports 0 GFLOPs for every model and we register nothing.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
from pathlib import Path

from torch import nn

from yolo_dysample.dysample import DySample

__all__ = [
    "BUNDLED_YAML_KINDS",
    "DySampleRow",
    "SUPPORTED_ULTRALYTICS",
    "TESTED_ULTRALYTICS_VERSIONS",
    "UltralyticsIncompatibleError",
    "bundled_cfg_dir",
    "bundled_yaml",
    "bundled_yamls",
    "count_dysample_multiply_adds",
    "dysample_multiply_adds",
    "register_with_ultralytics",
]

SUPPORTED_ULTRALYTICS = ">=8.4.104,<8.5"  # as declared in pyproject.toml
TESTED_ULTRALYTICS_VERSIONS = ("8.4.104", "8.4.190")  # oldest and newest release the test suite runs against
BUNDLED_YAML_KINDS = ("models", "datasets")  # sub-folders of cfg/ whose files resolve by bare name
PARSER_LOCALS = ("ch", "f", "i", "m", "args")  # parse_model locals we read: the row being built
_MAX_FRAMES_TO_PARSER = 8  # DySampleRow.__new__ <- (genexpr for n > 1 repeats) <- parse_model
_WRAPPED_MARK = "__yolo_dysample_wrapped__"


class UltralyticsIncompatibleError(RuntimeError):
    """The installed ultralytics lacks an internal hook that yolo-dysample relies on."""


def _ultralytics_version() -> str:
    try:
        import ultralytics

        return str(ultralytics.__version__)
    except Exception:  # noqa: BLE001 - only used inside error messages
        return "unknown"


def _incompatible(what: str) -> UltralyticsIncompatibleError:
    return UltralyticsIncompatibleError(
        f"yolo-dysample cannot hook into ultralytics {_ultralytics_version()}: {what}. "
        f"Supported: ultralytics{SUPPORTED_ULTRALYTICS} (tested {' and '.join(TESTED_ULTRALYTICS_VERSIONS)}); "
        f"install a supported release or update yolo-dysample."
    )


# --------------------------------------------------------------------------------------------------- model parser
def _parser_state() -> tuple[int, object, list]:
    """Return ``(i, f, ch)`` of the ``ultralytics.nn.tasks.parse_model`` call that is building the current row."""
    frame = sys._getframe(2)  # skip _parser_state and DySampleRow.__new__
    try:
        for _ in range(_MAX_FRAMES_TO_PARSER):
            if frame is None:
                break
            if frame.f_code.co_name == "parse_model" and frame.f_globals.get("__name__") == "ultralytics.nn.tasks":
                parser_locals = frame.f_locals
                try:
                    return parser_locals["i"], parser_locals["f"], parser_locals["ch"]
                except KeyError as missing:
                    raise _incompatible(f"parse_model has no local {missing} while building a DySample row") from None
            frame = frame.f_back
    finally:
        del frame
    raise _incompatible(
        "a 'DySample' YAML row was built outside ultralytics.nn.tasks.parse_model, so its input channels are unknown "
        "(to build the layer directly, use yolo_dysample.DySample(in_channels, ...))"
    )


class DySampleRow(nn.Module):
    """What the name ``DySample`` means in a model YAML: builds a :class:`yolo_dysample.DySample`.

    A row ``[from, repeats, DySample, [scale, style, groups, dyscope]]`` gives a DySample whose ``in_channels`` is
    the output channel count of the ``from`` layer at the model's width scale. All four arguments are optional
    (``[]`` gives ``scale=2, style="lp", groups=4, dyscope=False``). The object built is a plain ``DySample``,
    never a ``DySampleRow``.

    Examples:
        >>> from ultralytics import YOLO
        >>> model = YOLO("yolov8n-dysample.yaml")  # rows: [-1, 1, DySample, [2, "lp", 4, False]]

    """

    def __new__(cls, *args):
        """Return ``DySample(ch[f], *args)`` for the row parse_model is building, or raise naming the layer."""
        layer_index, from_index, channels = _parser_state()
        where = f"model YAML layer {layer_index} ([{from_index}, ..., DySample, {list(args)}])"
        if isinstance(from_index, bool) or not isinstance(from_index, int):
            raise ValueError(f"{where}: DySample takes exactly one input layer, got from={from_index!r}")
        try:
            in_channels = channels[from_index]
        except (IndexError, TypeError):
            raise ValueError(f"{where}: from={from_index} does not name an earlier layer") from None
        try:
            return DySample(in_channels, *args)
        except (TypeError, ValueError) as error:
            raise type(error)(
                f"{where}: {error} (args are [scale, style, groups, dyscope], in_channels={in_channels} inferred)"
            ) from error


def _failing_dysample_row(traceback) -> tuple[int, object, object] | None:
    """``(i, f, args)`` if ``traceback`` runs through parse_model while it was building a DySample row."""
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "parse_model" and frame.f_globals.get("__name__") == "ultralytics.nn.tasks":
            parser_locals = frame.f_locals
            if parser_locals.get("m") is DySampleRow:
                return parser_locals.get("i"), parser_locals.get("f"), parser_locals.get("args")
            return None
        traceback = traceback.tb_next
    return None


def _wrap_parse_model(parse_model):
    @functools.wraps(parse_model)
    def parse_model_naming_dysample_rows(*args, **kwargs):
        try:
            return parse_model(*args, **kwargs)
        except (TypeError, ValueError, IndexError, KeyError) as error:
            row = _failing_dysample_row(error.__traceback__)
            if row is None or "model YAML layer" in str(error):
                raise
            layer_index, from_index, row_args = row
            raise type(error)(
                f"model YAML layer {layer_index} ([{from_index}, ..., DySample, {row_args}]): {error}"
            ) from error

    setattr(parse_model_naming_dysample_rows, _WRAPPED_MARK, True)
    return parse_model_naming_dysample_rows


def _wrap_everywhere(home, name: str, make_wrapper) -> None:
    """Replace function ``name`` of module ``home`` by ``make_wrapper(it)``, once, wherever it is held.

    Every loaded ``ultralytics.*`` module that holds the original gets the wrapper: a module that did
    ``from ... import name`` has its own reference.
    """
    current = getattr(home, name, None)
    if not callable(current):
        raise _incompatible(f"{home.__name__}.{name} is missing")
    if getattr(current, _WRAPPED_MARK, False):
        wrapped, original = current, current.__wrapped__
    else:
        wrapped, original = make_wrapper(current), current
    for module_name, module in list(sys.modules.items()):
        if module_name == "ultralytics" or module_name.startswith("ultralytics."):
            if vars(module).get(name) is original:
                setattr(module, name, wrapped)


def _check_parser(tasks) -> None:
    parse_model = getattr(tasks, "parse_model", None)
    if not callable(parse_model):
        raise _incompatible("ultralytics.nn.tasks.parse_model is missing")
    code = getattr(inspect.unwrap(parse_model), "__code__", None)
    if code is None:
        raise _incompatible("ultralytics.nn.tasks.parse_model is not a Python function")
    names = set(code.co_varnames) | set(code.co_cellvars)
    missing = [name for name in PARSER_LOCALS if name not in names]
    if missing:
        raise _incompatible(f"ultralytics.nn.tasks.parse_model has no local variable(s) {missing}")
    if "globals" not in code.co_names:
        raise _incompatible("ultralytics.nn.tasks.parse_model no longer resolves module names with globals()")
    existing = vars(tasks).get("DySample")
    if existing is not None and existing is not DySampleRow:
        raise _incompatible(f"ultralytics.nn.tasks already defines its own 'DySample' ({existing!r})")


# ---------------------------------------------------------------------------------------------------- YAML lookup
def bundled_cfg_dir() -> Path:
    """Folder holding the bundled ``models/`` and ``datasets/`` YAMLs.

    In an installed wheel it is ``yolo_dysample/cfg``; in a source checkout it is the repository's ``cfg``.
    """
    package_dir = Path(__file__).resolve().parent
    for candidate in (package_dir / "cfg", package_dir.parent / "cfg"):
        if (candidate / "models").is_dir():
            return candidate
    raise FileNotFoundError(f"yolo-dysample's cfg/models folder is missing next to {package_dir}")


@functools.lru_cache(maxsize=1)
def bundled_yamls() -> dict[str, Path]:
    """Map each bundled YAML's file name to its path (model and dataset YAMLs; names are unique)."""
    cfg = bundled_cfg_dir()
    found: dict[str, Path] = {}
    for kind in BUNDLED_YAML_KINDS:
        for path in sorted((cfg / kind).rglob("*.y*ml")):
            if path.name in found:
                raise RuntimeError(f"two bundled YAMLs share the name {path.name}: {found[path.name]} and {path}")
            found[path.name] = path
    return found


def bundled_yaml(name: str | os.PathLike) -> Path | None:
    """Path of the bundled YAML called ``name`` (a bare file name such as ``yolov8-dysample.yaml``), else ``None``."""
    text = str(name).strip()
    if not text or os.sep in text or "/" in text or "://" in text:
        return None
    return bundled_yamls().get(text)


def _wrap_check_file(check_file):
    @functools.wraps(check_file)
    def check_file_with_bundled_yamls(file, *args, **kwargs):
        bundled = bundled_yaml(file)
        if bundled is not None and not os.path.exists(str(file).strip()):  # a local file of that name wins
            return str(bundled)
        return check_file(file, *args, **kwargs)

    setattr(check_file_with_bundled_yamls, _WRAPPED_MARK, True)
    return check_file_with_bundled_yamls


def _patch_yaml_lookup(checks) -> None:
    _wrap_everywhere(checks, "check_file", _wrap_check_file)  # check_yaml calls checks.check_file


# ------------------------------------------------------------------------------------------------ restricted load
def _allow_in_restricted_load() -> None:
    import torch

    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no restricted loading to allow us in
        add_safe_globals([DySample])


# ------------------------------------------------------------ export sampler (see yolo_dysample/gather_sampling.py)
def _choose_sampler_on_export() -> None:
    from ultralytics.utils.callbacks import base

    from yolo_dysample.gather_sampling import choose_sampler_for_export

    event = getattr(base, "default_callbacks", {}).get("on_export_start")
    if not isinstance(event, list):
        raise _incompatible("ultralytics.utils.callbacks.base.default_callbacks has no 'on_export_start' list")
    if choose_sampler_for_export not in event:
        event.append(choose_sampler_for_export)


# ------------------------------------------------------------------------------------------- GFLOPs through thop
BILINEAR_MULTIPLY_ADDS = 4  # per sampled output value: four neighbours, one weight each


def dysample_multiply_adds(module: DySample, input_shape: tuple[int, int, int, int]) -> int:
    """Count the multiply-adds ``module``'s forward runs on an input of ``input_shape`` ``(B, C, H, W)``.

    The offset (and scope) projection as it runs, one ``(2 * groups * scale**2) x in_channels`` product per
    input pixel and per conv (PL's conv on the pixel-shuffled map runs as that block-structured product on X),
    plus :data:`BILINEAR_MULTIPLY_ADDS` per output value for the bilinear sampling.
    """
    batch, channels, height, width = input_shape
    convs = 2 if module.scope is not None else 1
    projection = convs * 2 * module.groups * module.scale**2 * channels * batch * height * width
    return projection + BILINEAR_MULTIPLY_ADDS * batch * channels * module.scale**2 * height * width


def count_dysample_multiply_adds(module: DySample, inputs: tuple, output) -> None:
    """Count DySample for thop: :func:`dysample_multiply_adds`, added to ``module.total_ops``."""
    module.total_ops += dysample_multiply_adds(module, tuple(inputs[0].shape))


def _count_flops_with_thop() -> None:
    try:
        import importlib

        rules = getattr(importlib.import_module("thop.profile"), "register_hooks", None)
    except ImportError:  # ultralytics then reports 0 GFLOPs for every model
        return
    if isinstance(rules, dict):
        rules[DySample] = count_dysample_multiply_adds


# -------------------------------------------------------------------------------------------------------- entry
def register_with_ultralytics() -> None:
    """Let stock Ultralytics build, find and load DySample models in this process.

    Adds ``DySample`` to the model parser, makes the bundled model and dataset YAMLs resolvable by bare name (a
    local file of the same name wins), and allows ``DySample`` in ``ULTRALYTICS_SAFE_LOAD`` restricted loading.
    Calling it again does nothing new. Runs automatically in every Python process that imports Ultralytics
    (see :mod:`_yolo_dysample_autoload`).

    Raises:
        UltralyticsIncompatibleError: The installed ultralytics lacks a hook listed in this module's docstring.

    Examples:
        >>> from yolo_dysample import register_with_ultralytics
        >>> register_with_ultralytics()
        >>> from ultralytics import YOLO
        >>> model = YOLO("yolo11s-seg-dysample.yaml")

    """
    from ultralytics.nn import tasks
    from ultralytics.utils import checks

    _check_parser(tasks)
    _patch_yaml_lookup(checks)
    _allow_in_restricted_load()
    _wrap_everywhere(tasks, "parse_model", _wrap_parse_model)  # errors in a DySample row name the layer
    _choose_sampler_on_export()  # export sampler section
    _count_flops_with_thop()  # GFLOPs section
    tasks.DySample = DySampleRow  # parse_model: globals()["DySample"]
