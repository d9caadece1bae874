"""Register DySample with Ultralytics as soon as ``ultralytics.nn.tasks`` is imported, with no import in user code.

yolo-dysample's wheel installs this top-level module and ``yolo_dysample_autoload.pth`` into site-packages. Python
runs the ``.pth`` line at every interpreter start, so the stock ``yolo`` command, the script Ultralytics writes for
multi-GPU DDP and spawned workers all get the hook without importing ``yolo_dysample``. Set
``YOLO_DYSAMPLE_AUTOLOAD=0`` (or false/no/off) to turn it off; ``import yolo_dysample`` still registers explicitly.

The hook is an entry at the front of ``sys.meta_path``. It ignores every import except ``ultralytics.nn.tasks``. For
that module it lets the real loader run, removes itself, and then calls
:func:`yolo_dysample.ultralytics_adapter.register_with_ultralytics`. A process that never imports Ultralytics pays
for this one small module, which imports only ``os`` and ``sys``. The module is top-level, not part of the
``yolo_dysample`` package, because importing that package imports torch.
"""

import os
import sys

__all__ = ["ENV_VAR", "TARGET_MODULE", "autoload_enabled", "env_flag_off", "install", "install_if_enabled"]

ENV_VAR = "YOLO_DYSAMPLE_AUTOLOAD"
TARGET_MODULE = "ultralytics.nn.tasks"  # its globals() are where parse_model looks up module names
_OFF_VALUES = frozenset({"0", "false", "no", "off"})


def env_flag_off(name: str) -> bool:
    """Return True when the environment variable ``name`` is 0, false, no or off (any case, spaces ignored)."""
    return os.environ.get(name, "1").strip().lower() in _OFF_VALUES


def autoload_enabled() -> bool:
    """Return False when ``YOLO_DYSAMPLE_AUTOLOAD`` is 0, false, no or off (any case)."""
    return not env_flag_off(ENV_VAR)


def install_if_enabled() -> None:
    """Entry point of the ``.pth`` line: :func:`install` unless ``YOLO_DYSAMPLE_AUTOLOAD`` turns it off."""
    if autoload_enabled():
        install()


def install() -> None:
    """Register DySample with Ultralytics now if ``ultralytics.nn.tasks`` is loaded, else right after its import.

    Idempotent: calling it again adds no second hook.
    """
    tasks = sys.modules.get(TARGET_MODULE)
    if tasks is None:
        if not any(getattr(finder, "yolo_dysample_hook", False) for finder in sys.meta_path):
            sys.meta_path.insert(0, _RegisterAfterImport())
    elif not getattr(getattr(tasks, "__spec__", None), "_initializing", False):
        _register()
    # else: ultralytics.nn.tasks is executing right now, i.e. our hook is importing yolo_dysample to register;
    # the hook finishes the registration itself.


def _register() -> None:
    """Call the adapter; a failure becomes a warning, never a broken ``import ultralytics``."""
    try:
        from yolo_dysample.ultralytics_adapter import register_with_ultralytics

        register_with_ultralytics()
    except Exception as error:  # noqa: BLE001 - reported, and Ultralytics keeps working without DySample
        import warnings

        warnings.warn(f"yolo-dysample: DySample is not registered with Ultralytics: {error}", stacklevel=2)


def _remove_hooks() -> None:
    sys.meta_path[:] = [finder for finder in sys.meta_path if not getattr(finder, "yolo_dysample_hook", False)]


class _RegisterAfterImport:
    """``sys.meta_path`` finder that wraps the loader of :data:`TARGET_MODULE` and passes on every other name."""

    yolo_dysample_hook = True

    def find_spec(self, fullname, path=None, target=None):
        """Find the real spec with the other finders and wrap its loader; ``None`` for every other module."""
        if fullname != TARGET_MODULE:
            return None
        for finder in sys.meta_path:
            find_spec = getattr(finder, "find_spec", None)
            if getattr(finder, "yolo_dysample_hook", False) or find_spec is None:
                continue
            spec = find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader)
                return spec
        return None


class _RegisteringLoader:
    """Runs the real loader, then registers DySample; every other attribute is the real loader's."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __getattr__(self, name):
        if name == "loader":  # not set yet (e.g. during copy): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def create_module(self, spec):
        """Let the real loader create the module."""
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        """Execute ``ultralytics.nn.tasks``, then register (once)."""
        self.loader.exec_module(module)
        _remove_hooks()
        _register()
