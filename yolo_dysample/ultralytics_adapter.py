"""Every place where yolo-dysample touches Ultralytics, in one module.

:func:`register_with_ultralytics` lets stock Ultralytics build, find and load DySample models. It is idempotent,
never edits installed files, and patches only by adding names or wrapping functions at run time. The post-import
hook in :mod:`_yolo_dysample_autoload` calls it in every process that imports ``ultralytics.nn.tasks``.

Touch points. Checked against every release in :data:`TESTED_ULTRALYTICS_VERSIONS` (8.2.103 to 8.4.190), the range
``pyproject.toml`` declares; registration refuses an older release, naming it and the range. An older release ships
fewer stock YAMLs, and gets exactly the twins of the ones it has.

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
   (model YAMLs, which tries ``yolov8n-x.yaml`` and then ``yolov8-x.yaml``) and ``data.utils.check_det_dataset``
   (dataset YAMLs). We wrap ``check_file`` in ``checks`` and in every loaded ``ultralytics.*`` module that imported
   it by name. A bare name that is not a local file resolves to our ``cfg/datasets`` file of that name, or, if it
   is ``<stock stem><variant suffix>.yaml``, to the twin of the installed stock ``<stock stem>.yaml``. Twins are
   derived from the installed stock file on first use and cached (:func:`twin_of_stock`), never shipped, so they
   cannot drift from the user's release: a stock checkpoint of that release transfers every tensor. A twin name
   whose stock file is missing raises ``FileNotFoundError`` naming the stock file. Everything else goes to
   ultralytics unchanged. If this moves: bare twin names stop resolving; explicit paths keep working.
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
5. **Export callbacks** (the policy is :mod:`yolo_dysample.export_policy`). ``Exporter.__call__`` fires the
   ``on_export_start`` callbacks after it has deep-copied, fused and dry-run the model and before any converter
   traces it. ``Model`` copies ``callbacks.base.default_callbacks`` when it is made, so a model made before
   registration (e.g. ``YOLO("x.pt")`` whose unpickling first imports yolo_dysample) would miss an entry added
   there. We append :func:`configure_dysample_for_export` and :func:`keep_mnn_from_installing_packages` to the
   default list and also wrap ``callbacks.add_integration_callbacks``, which every ``Exporter.__init__`` calls,
   to add them to that exporter's own list. If this moves: registration raises if ``default_callbacks`` has no
   ``on_export_start`` list; ONNX export at opset < 16 fails on ``grid_sampler`` (the export tests catch it).
6. **GFLOPs** (``model.info()``, the training log, ``yolo-dysample compare``).
   ``ultralytics.utils.torch_utils.get_flops`` counts with thop (``ultralytics-thop``), whose rules are forward
   hooks looked up by module type in the dict ``thop.profile.register_hooks``. DySample's forward runs its 1x1
   convs as one ``F.conv2d`` on composed weights and samples with ``F.grid_sample`` or the CPU kernel, so no child
   module's hook fires: without a rule of its own DySample counts as 0. We add
   :func:`count_dysample_multiply_adds` to that dict (thop counts multiply-adds; ultralytics doubles them into
   FLOPs).
   If this moves: nothing breaks, DySample's GFLOPs read low again (the GFLOPs test fails). Without thop
   ultralytics reports 0 GFLOPs for every model and we register nothing.
7. **MNN converter.** ``format=mnn`` imports MNN's converter, whose usage logger pip-installs a package and
   contacts the network at import; :func:`keep_mnn_from_installing_packages` (``on_export_start``, like 5) keeps
   that logger unimported. If this moves: the MNN export test sees a ``pip`` run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import glob
import hashlib
import inspect
import os
import re
import sys
import tempfile
from copy import deepcopy
from pathlib import Path

import yaml
from torch import nn

from yolo_dysample import twins
from yolo_dysample.dysample import DySample

__all__ = [
    "CACHE_ENVIRONMENT_VARIABLE",
    "CFG_DIR",
    "DySampleRow",
    "MINIMUM_ULTRALYTICS",
    "SUPPORTED_ULTRALYTICS",
    "TESTED_ULTRALYTICS_VERSIONS",
    "UltralyticsIncompatibleError",
    "bundled_cfg_dir",
    "bundled_yaml",
    "count_dysample_multiply_adds",
    "derive_twin",
    "dysample_input_channels",
    "dysample_multiply_adds",
    "update_examples",
    "families_table",
    "register_with_ultralytics",
    "resolve_bare_yaml",
    "stock_model_yaml",
    "stock_models_dir",
    "stock_upsampling_yamls",
    "twin_bare_name",
    "twin_of_stock",
    "update_families_table",
    "write_twin",
]

MINIMUM_ULTRALYTICS = "8.2.103"  # 8.2.0 builds the twins, but its torch.load fails under torch >= 2.6
SUPPORTED_ULTRALYTICS = f">={MINIMUM_ULTRALYTICS},<8.5"  # as declared in pyproject.toml
# The releases the test command runs the integration tests on: the oldest of each supported minor line, then the
# newest one tested. scripts/test.sh reads this tuple.
TESTED_ULTRALYTICS_VERSIONS = ("8.2.103", "8.3.0", "8.4.104", "8.4.190")
CFG_DIR = Path(__file__).resolve().parent / "cfg"  # datasets/ resolve by bare name; models/ holds examples
CACHE_ENVIRONMENT_VARIABLE = (
    "YOLO_DYSAMPLE_CACHE_DIR"  # derived twins go to <it>/twins (default ~/.cache/yolo_dysample)
)
ROW_ARGUMENTS = ("scale", "style", "groups", "dyscope")  # a DySample row's args, in order
PARSER_LOCALS = ("ch", "f", "i", "m", "args")  # parse_model locals we read: the row being built
_MAX_FRAMES_TO_PARSER = 8  # DySampleRow.__new__ <- (genexpr for n > 1 repeats) <- parse_model
_WRAPPED_MARK = "__yolo_dysample_wrapped__"


class UltralyticsIncompatibleError(RuntimeError):
    """The installed ultralytics lacks an internal hook that yolo-dysample relies on."""


def _ultralytics_version() -> str:
    try:
        import ultralytics

        return str(ultralytics.__version__)
    except Exception:  # noqa: BLE001 - only used inside error messages and cache keys
        return "unknown"


def _incompatible(what: str) -> UltralyticsIncompatibleError:
    return UltralyticsIncompatibleError(
        f"yolo-dysample cannot hook into ultralytics {_ultralytics_version()}: {what}. "
        f"Supported: ultralytics{SUPPORTED_ULTRALYTICS} (tested {', '.join(TESTED_ULTRALYTICS_VERSIONS)}); "
        f"install a supported release or update yolo-dysample."
    )


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _check_version() -> None:
    installed = _ultralytics_version()
    if installed != "unknown" and _release(installed) < _release(MINIMUM_ULTRALYTICS):
        raise _incompatible(f"releases before {MINIMUM_ULTRALYTICS} are not supported")


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


_measuring_channels = contextvars.ContextVar("yolo_dysample_measuring_channels", default=False)


class _ChannelProbe(nn.Identity):
    """What a DySample row builds while :func:`dysample_input_channels` measures: its input channels only."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.in_channels = in_channels


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
        if len(args) > len(ROW_ARGUMENTS):  # a fifth positional argument would reach DySample's device
            raise TypeError(
                f"{where}: DySample rows take at most {len(ROW_ARGUMENTS)} positional arguments "
                f"[{', '.join(ROW_ARGUMENTS)}], got {len(args)}"
            )
        if _measuring_channels.get():
            return _ChannelProbe(in_channels)
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
    """The package's ``cfg`` folder: ``datasets/`` (resolved by bare name) and ``models/`` (generated examples)."""
    return CFG_DIR


def stock_models_dir() -> Path:
    """The installed ultralytics' ``cfg/models`` folder, where the stock model YAMLs are."""
    import ultralytics

    return Path(ultralytics.__file__).resolve().parent / "cfg" / "models"


def stock_model_yaml(name: str) -> Path | None:
    """The installed ultralytics' stock model YAML called ``name`` (a bare file name), else ``None``."""
    found = sorted(stock_models_dir().rglob(glob.escape(name))) if _is_bare_name(name) else []
    return found[0] if found else None


def stock_upsampling_yamls() -> list[Path]:
    """Every stock model YAML of the installed ultralytics with an ``nn.Upsample`` row, in a stable order."""
    root = stock_models_dir()
    found = [p for p in root.rglob("*.yaml") if "nn.Upsample" in p.read_text(encoding="utf-8")]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _is_bare_name(name: str) -> bool:
    return bool(name) and os.sep not in name and "/" not in name and "://" not in name


def _stock_source_name(stock_yaml: Path) -> str:
    return "ultralytics/cfg/models/" + stock_yaml.relative_to(stock_models_dir()).as_posix()


def dysample_input_channels(text: str) -> dict[int, list[int]]:
    """For each ``nn.Upsample`` row of a model YAML text, its input channels at every width scale of the model.

    Builds :func:`yolo_dysample.twins.probe_text` with ultralytics' own parser on the meta device (shapes only,
    no weights), once per scale in ``scales`` (once if there is none): the channels are what parse_model infers.
    The DySample rows build a channel probe, not a DySample, while it measures.
    """
    import torch
    from ultralytics.nn import tasks

    register_with_ultralytics()
    probe = yaml.safe_load(twins.probe_text(text))
    rows = [row.layer for row in twins.upsample_rows(text)]
    channels: dict[int, list[int]] = {layer: [] for layer in rows}
    for scale in probe.get("scales") or [None]:
        model = deepcopy(probe)
        if scale is not None:
            model["scale"] = scale
        token = _measuring_channels.set(True)
        try:
            with torch.device("meta"):  # shapes only: every scale of the largest models in well under a second
                layers, _ = tasks.parse_model(model, model.get("channels", model.get("ch", 3)), verbose=False)
        finally:
            _measuring_channels.reset(token)
        for layer in rows:
            built = layers[layer]
            first = next(iter(built)) if isinstance(built, nn.Sequential) else built
            channels[layer].append(first.in_channels)
    return channels


def derive_twin(source: str | os.PathLike, variant: str | twins.Variant = "dysample", groups: int | None = None) -> str:
    """Text of the DySample twin of the model YAML file ``source`` (see :func:`yolo_dysample.twins.twin_text`).

    Raises:
        ValueError: ``source`` has no ``nn.Upsample`` row, ``variant`` is unknown, or ``groups`` does not divide
            a row's input channels at every scale of the model.
    """
    path = Path(source)
    chosen = variant if isinstance(variant, twins.Variant) else twins.variant_named(variant)
    text = path.read_text(encoding="utf-8")
    try:
        name = _stock_source_name(path.resolve())
    except ValueError:  # not a stock file
        name = path.name
    rows = twins.upsample_rows(text)
    if not rows:
        raise ValueError(f"{name} has no nn.Upsample row to replace")
    return twins.twin_text(text, chosen, _input_channels_of(text), name, groups)


@functools.lru_cache(maxsize=256)
def _input_channels_of(text: str) -> dict[int, list[int]]:
    return dysample_input_channels(text)


def write_twin(
    source: str | os.PathLike,
    output: str | os.PathLike | None = None,
    variant: str = "dysample",
    groups: int | None = None,
) -> Path:
    """Write the DySample twin of a model YAML (a path, or the bare name of a stock YAML) and return its path.

    Layer indices, ``from`` fields and comments are kept; only the ``nn.Upsample`` rows change.

    Args:
        source: A model YAML file, or a stock name such as ``yolov8-p2.yaml``.
        output: Where to write; default ``<source stem>-<variant>.yaml`` in the current directory.
        variant: ``dysample``, ``dysample-plus``, ``dysample-s`` or ``dysample-s-plus``.
        groups: Offset groups of every DySample row; default: 4, or the largest of 2 and 1 that fits a row.

    Raises:
        FileNotFoundError: ``source`` is neither a file nor a stock model YAML.
        ValueError: As :func:`derive_twin`, or ``output`` is ``source`` itself.

    Examples:
        >>> from yolo_dysample.ultralytics_adapter import write_twin
        >>> write_twin("my-model.yaml", variant="dysample-s")  # writes my-model-dysample-s.yaml
    """
    path = Path(source)
    if not path.is_file():
        stock = stock_model_yaml(str(source))
        if stock is None:
            raise FileNotFoundError(f"{source} is neither a file nor a stock model YAML of ultralytics")
        path = stock
    chosen = twins.variant_named(variant)
    target = Path(output) if output is not None else Path(f"{path.stem}{chosen.suffix}.yaml")
    if target.exists() and target.resolve() == path.resolve():
        raise ValueError(f"the twin would overwrite its source {path}")
    _write_atomically(target, derive_twin(path, chosen, groups))
    return target


def _write_atomically(target: Path, text: str) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, partial = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(partial, target)  # readers never see half a file
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _twin_cache_dirs() -> list[Path]:
    configured = os.environ.get(CACHE_ENVIRONMENT_VARIABLE)
    base = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    primary = base if configured else base / "yolo_dysample"
    fallback = Path(tempfile.gettempdir()) / f"yolo_dysample-{getattr(os, 'getuid', lambda: 'user')()}"
    return [primary / "twins", fallback / "twins"]


def twin_of_stock(stock_yaml: Path, variant: twins.Variant) -> Path:
    """Path of the twin of an installed stock YAML, derived on first use and kept in the twin cache.

    The cache key is the ultralytics version, the stock file's SHA-256 and :data:`yolo_dysample.twins.TWIN_FORMAT`,
    so a twin always equals a derivation from the installed stock file. A cached file is used only if it passes
    :func:`yolo_dysample.twins.is_twin_of`; an unwritable cache falls back to the temporary directory.
    """
    text = stock_yaml.read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    key = f"ultralytics-{_ultralytics_version()}/{digest}-f{twins.TWIN_FORMAT}/{stock_yaml.stem}{variant.suffix}.yaml"
    memo = _twin_paths.get(key)
    if memo is not None and memo.is_file():
        return memo
    derived = None
    errors = []
    for directory in _twin_cache_dirs():
        path = directory / key
        try:
            if path.is_file() and twins.is_twin_of(path.read_text(encoding="utf-8"), text, variant):
                _twin_paths[key] = path
                return path
            derived = derived or derive_twin(stock_yaml, variant)
            _write_atomically(path, derived)
            _twin_paths[key] = path
            return path
        except OSError as error:
            errors.append(f"{directory}: {error}")
    raise OSError(f"cannot write the DySample twin {Path(key).name}: {'; '.join(errors)}")


_twin_paths: dict[str, Path] = {}


def resolve_bare_yaml(name: str | os.PathLike) -> Path | None:
    """The file a bare YAML name resolves to: a bundled dataset YAML, or a stock model's DySample twin, else ``None``.

    ``<stock stem><variant suffix>.yaml`` (e.g. ``yolov8-seg-dysample-plus.yaml``) names the twin of the installed
    ultralytics' ``<stock stem>.yaml``; ultralytics has already removed the scale letter (``yolov8s-seg-...``).

    Raises:
        FileNotFoundError: ``name`` is a twin name whose stock YAML exists but has no ``nn.Upsample`` row.
    """
    text = str(name).strip()
    if not _is_bare_name(text):
        return None
    dataset = CFG_DIR / "datasets" / text
    if dataset.is_file():
        return dataset
    split = twins.split_twin_name(text)
    if split is None:
        return None
    stock_name, variant = split
    stock = stock_model_yaml(stock_name)
    if stock is None:
        return None
    if "nn.Upsample" not in stock.read_text(encoding="utf-8"):
        raise FileNotFoundError(
            f"{text!r} would be the DySample twin of {_stock_source_name(stock)}, which has no nn.Upsample row "
            f"(ultralytics {_ultralytics_version()})"
        )
    return twin_of_stock(stock, variant)


bundled_yaml = resolve_bare_yaml  # the name older code uses


def _not_derivable(name: str) -> FileNotFoundError | None:
    split = twins.split_twin_name(name) if _is_bare_name(name) else None
    if split is None:
        return None
    return FileNotFoundError(
        f"{name!r} names the DySample twin of the stock model YAML {split[0]!r}, which ultralytics "
        f"{_ultralytics_version()} does not have (looked in {stock_models_dir()}). For a model YAML of your own, "
        f"write its twin with `yolo-dysample twin <file>.yaml`"
    )


def _wrap_check_file(check_file):
    @functools.wraps(check_file)
    def check_file_with_twins(file, *args, **kwargs):
        text = str(file).strip()
        if not os.path.exists(text):  # a local file of that name wins
            resolved = resolve_bare_yaml(text)
            if resolved is not None:
                return str(resolved)
        try:
            return check_file(file, *args, **kwargs)
        except FileNotFoundError as error:
            clearer = _not_derivable(text)
            if clearer is None:
                raise
            raise clearer from error

    setattr(check_file_with_twins, _WRAPPED_MARK, True)
    return check_file_with_twins


def _patch_yaml_lookup(checks) -> None:
    _wrap_everywhere(checks, "check_file", _wrap_check_file)  # check_yaml calls checks.check_file


# ------------------------------------------------------------------------------------------ the families table
FAMILY_NAMES = {"v3": "YOLOv3", "v5": "YOLOv5", "v8": "YOLOv8", "v9": "YOLOv9", "v10": "YOLOv10", "11": "YOLO11",
                "12": "YOLO12", "26": "YOLO26", "rt-detr": "RT-DETR"}  # fmt: skip
TASK_ORDER = ("detect", "segment", "pose", "obb", "semantic", "depth")


def twin_bare_name(stock_yaml: Path, variant: twins.Variant) -> str:
    """The bare name that builds the twin of ``stock_yaml`` at its first scale, as stock names carry scales.

    ``yolov8.yaml`` -> ``yolov8n-dysample.yaml``; ``yoloe-11-seg.yaml`` -> ``yoloe-11n-seg-dysample.yaml``;
    names without a scale letter (``yolov9t.yaml``, ``rtdetr-l.yaml``, ``yolov3-tiny.yaml``) only get the suffix.
    """
    from ultralytics.nn.tasks import guess_model_scale

    stem = stock_yaml.stem
    scales = list((yaml.safe_load(stock_yaml.read_text(encoding="utf-8")) or {}).get("scales") or [])
    scaled = re.match(r"^(yolo(?:e-)?v?\d+)(-.*)?$", stem)  # digits then '-' or the end: no scale letter yet
    if scales and scaled and not guess_model_scale(f"{stem}.yaml"):
        stem = f"{scaled.group(1)}{scales[0]}{scaled.group(2) or ''}"
    return f"{stem}{variant.suffix}.yaml"


def _family(stock_yaml: Path) -> str:
    family = FAMILY_NAMES.get(stock_yaml.parent.name, stock_yaml.parent.name)
    stem = stock_yaml.stem
    if stem.startswith("yoloe-"):
        return f"YOLOE ({family})"
    for part, label in (("-worldv2", "World v2"), ("-world", "World"), ("-ghost", "Ghost"), ("-rtdetr", "RT-DETR")):
        if part in stem:
            return f"{family}-{label}"
    return family


def families_table() -> str:
    """Markdown table of the installed ultralytics' upsampling stock YAMLs, one row per family.

    Each row gives the family's tasks and, for each variant, the offset groups its twins use (the paper's 4
    unless a row's channels forbid it).
    """
    from ultralytics.nn.tasks import guess_model_task

    folders = list(FAMILY_NAMES)
    families: dict[str, dict] = {}
    for stock in stock_upsampling_yamls():
        task = guess_model_task(yaml.safe_load(stock.read_text(encoding="utf-8"))) or "detect"
        family = families.setdefault(
            _family(stock),
            {"order": folders.index(stock.parent.name) if stock.parent.name in folders else len(folders),
             "tasks": set(), "stocks": [], "groups": {v.suffix: set() for v in twins.VARIANTS}},
        )  # fmt: skip
        family["tasks"].add(task)
        family["stocks"].append(stock)
        for variant in twins.VARIANTS:
            twin = yaml.safe_load(twin_of_stock(stock, variant).read_text(encoding="utf-8"))
            family["groups"][variant.suffix] |= {
                row[3][2] for row in twin["backbone"] + twin["head"] if row[2] == "DySample"
            }
    variants = [twins.variant_named(name) for name in ("dysample", "dysample-plus", "dysample-s", "dysample-s-plus")]
    total = sum(len(family["stocks"]) for family in families.values())
    lines = [
        f"ultralytics {_ultralytics_version()}: {total} stock model YAMLs with `nn.Upsample`, {len(variants) * total} "
        "twins. Variant columns: the offset groups the twins use.",
        "",
        "| Family | Tasks | Stock YAMLs | Example | " + " | ".join(f"`{v.suffix}`" for v in variants) + " |",
        "|---|---|---:|---|" + "---|" * len(variants),
    ]
    for name, family in sorted(families.items(), key=lambda item: (item[1]["order"], item[0])):
        tasks = ", ".join(sorted(family["tasks"], key=lambda t: TASK_ORDER.index(t) if t in TASK_ORDER else 99))
        base = min(family["stocks"], key=lambda stock: (len(stock.stem), stock.stem))
        cells = [", ".join(str(g) for g in sorted(family["groups"][v.suffix], reverse=True)) for v in variants]
        lines.append(
            f"| {name} | {tasks} | {len(family['stocks'])} | `{twin_bare_name(base, variants[0])}` | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def update_families_table(document: str | os.PathLike, check: bool = False) -> bool:
    """Write :func:`families_table` between the families markers of ``document`` (e.g. README.md).

    Returns:
        Whether the document was already current. With ``check=True`` nothing is written.
    """
    path = Path(document)
    current = path.read_text(encoding="utf-8")
    fresh = twins.replace_marked_block(current, families_table())
    if fresh != current and not check:
        _write_atomically(path, fresh)
    return fresh == current


EXAMPLE_STOCK_YAMLS = ("yolov8.yaml",)  # their twins are written to cfg/models/ for reading; lookup never uses them


def update_examples(check: bool = False) -> list[str]:
    """Write the example twins (every variant of :data:`EXAMPLE_STOCK_YAMLS`) to ``cfg/models/``.

    Returns:
        The file names that were stale (with ``check=True`` nothing is written).
    """
    directory = CFG_DIR / "models"
    fresh = {}
    for name in EXAMPLE_STOCK_YAMLS:
        stock = stock_model_yaml(name)
        if stock is None:
            raise FileNotFoundError(f"ultralytics {_ultralytics_version()} has no stock {name}")
        for variant in twins.VARIANTS:
            fresh[f"{stock.stem}{variant.suffix}.yaml"] = derive_twin(stock, variant)
    current = {path.name: path.read_text(encoding="utf-8") for path in directory.glob("*.yaml")}
    stale = sorted(set(current) ^ set(fresh)) + sorted(n for n in fresh if n in current and current[n] != fresh[n])
    if not check:
        for name in set(current) - set(fresh):
            (directory / name).unlink()
        for name, text in fresh.items():
            if current.get(name) != text:
                _write_atomically(directory / name, text)
    return stale


# ------------------------------------------------------------------------------------------------ restricted load
def _allow_in_restricted_load() -> None:
    import torch

    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is not None:  # torch < 2.4 has no restricted loading to allow us in
        add_safe_globals([DySample])


# ----------------------------------------------------------------- export sampler (policy: yolo_dysample.export_policy)
def configure_dysample_for_export(exporter) -> None:
    """``on_export_start`` callback: the exported copy's DySample layers take what the format and opset need.

    ``Exporter.__call__`` fires it after it has deep-copied, fused and dry-run the model (``exporter.model``) and
    before any converter traces it, so it changes only what is exported. The choice itself is the export policy's.
    """
    model = getattr(exporter, "model", None)
    if not isinstance(model, nn.Module):
        return
    args = getattr(exporter, "args", None)
    export_format = str(getattr(args, "format", "") or "").lower()
    opset = getattr(args, "opset", None)
    from yolo_dysample.export_policy import configure_for_export

    configure_for_export(model, export_format, opset)


def _export_start_callbacks() -> tuple:
    return (configure_dysample_for_export, keep_mnn_from_installing_packages)


def _wrap_add_integration_callbacks(add_integration_callbacks):
    @functools.wraps(add_integration_callbacks)
    def add_integration_and_export_callbacks(instance, *args, **kwargs):
        result = add_integration_callbacks(instance, *args, **kwargs)
        event = getattr(instance, "callbacks", {}).get("on_export_start")
        if type(instance).__name__ == "Exporter" and isinstance(event, list):
            event.extend(callback for callback in _export_start_callbacks() if callback not in event)
        return result

    setattr(add_integration_and_export_callbacks, _WRAPPED_MARK, True)
    return add_integration_and_export_callbacks


def _add_export_callbacks() -> None:
    """Every export runs :func:`_export_start_callbacks`, also from a ``Model`` made before registration."""
    from ultralytics.utils.callbacks import base

    event = getattr(base, "default_callbacks", {}).get("on_export_start")
    if not isinstance(event, list):
        raise _incompatible("ultralytics.utils.callbacks.base.default_callbacks has no 'on_export_start' list")
    event.extend(callback for callback in _export_start_callbacks() if callback not in event)
    _wrap_everywhere(base, "add_integration_callbacks", _wrap_add_integration_callbacks)


# ------------------------------------------------------------------------ MNN converter: no pip run, no telemetry
MNN_USAGE_LOGGER = "MNN.tools.utils.log"  # imported by MNN.tools.mnnconvert inside try/except


def keep_mnn_from_installing_packages(exporter) -> None:
    """``on_export_start`` callback: for ``format=mnn``, keep MNN's usage logger from being imported.

    ultralytics' MNN export imports ``MNN.tools.mnnconvert``, which imports ``MNN.tools.utils.log`` inside a bare
    ``try/except``. That module runs ``os.system("pip install -U aliyun-log-python-sdk")`` when ``aliyun.log`` is
    missing (measured with MNN 3.6.1: it downgraded protobuf, after which ``import onnx`` failed) and contacts an
    Alibaba Cloud endpoint at import. A ``None`` entry in ``sys.modules`` makes that import fail; MNN then runs with
    ``mnn_logger = None`` and converts exactly as before. A logger the process imported earlier is left alone.
    """
    if str(getattr(getattr(exporter, "args", None), "format", "")).lower() == "mnn":
        sys.modules.setdefault(MNN_USAGE_LOGGER, None)


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

    _check_version()
    _check_parser(tasks)
    _patch_yaml_lookup(checks)
    _allow_in_restricted_load()
    _wrap_everywhere(tasks, "parse_model", _wrap_parse_model)  # errors in a DySample row name the layer
    _add_export_callbacks()  # export sampler and MNN converter sections
    _count_flops_with_thop()  # GFLOPs section
    tasks.DySample = DySampleRow  # parse_model: globals()["DySample"]
