"""visionattn: attention-based vision and medical-imaging models sharing attention kernels and task heads.

    >>> import visionattn
    >>> model = visionattn.create_model("convit_tiny", num_classes=10)
    >>> visionattn.list_models("convit*")

Importing visionattn registers its 2-D classifiers in timm under the ``va_`` prefix, so
``timm.create_model("va_convit_tiny")`` works after ``import visionattn``.

How importing works (why ``visionattn --help`` and ``visionattn list`` start without torch):

The ``visionattn`` command is ``visionattn.cli:run``, so running it imports this package first. This file
therefore imports nothing heavy itself: the model families (and with them torch and timm) load on first
use, and registration in timm follows timm's import.

- The first use of the registry (``visionattn.create_model``, ``visionattn.list_models``, ...) imports the
  model families, which register every model in visionattn's registry and the 2-D classifiers in timm
  (:func:`visionattn.registry.load_families`, also called by the registry's own lookups, so
  ``from visionattn.registry import create_model`` sees every model too). Submodules import as usual.
- If timm is already imported when visionattn is (``import torch, timm, visionattn``), the families are
  imported right away, as before. Otherwise a one-shot import hook (:class:`_RegisterInTimm`) imports them
  as soon as timm is imported, so ``import visionattn`` then ``import timm`` also finds ``va_convit_tiny``
  in timm. Either way, once both are imported, timm knows visionattn's models.
- The hook waits until no import of a visionattn module is under way (the families import timm
  themselves, and so do ``visionattn.layers`` and some task modules: loading the families in the middle of
  such an import would meet half-initialised modules), then removes itself.

``visionattn list`` reads the static table :mod:`visionattn._model_index` (name, task, timm name; a test
checks it equals the live registry), and every other command imports what it needs when it runs.
"""
from __future__ import annotations

import importlib as _importlib
import importlib.machinery as _machinery
import sys as _sys

__version__ = "0.1.0"

__all__ = [
    "create_model",
    "get_entry",
    "list_models",
    "load_checkpoint",
    "load_state_dict_file",
    "model_info",
    "register_model",
    "__version__",
]
_REGISTRY_API = [name for name in __all__ if name != "__version__"]


def _load() -> None:
    """Import the model families (registering them here and in timm) and bind the registry's functions."""
    registry = _importlib.import_module(f"{__name__}.registry")  # not `from visionattn import`: that asks __getattr__
    registry.load_families()
    namespace = globals()
    for name in _REGISTRY_API:
        namespace[name] = getattr(registry, name)
    _RegisterInTimm.uninstall()


def __getattr__(name: str):
    """The registry's functions, loaded with the model families on first use, and submodules not imported
    yet (``visionattn.backbones``, ``visionattn.kernels``, ...), each imported on its own (PEP 562)."""
    if name in _REGISTRY_API:
        _load()
        return globals()[name]
    if not name.startswith("__"):  # probes for module metadata (__path__, __wrapped__, ...) find nothing
        try:  # `from visionattn import cli` asks here first: only that submodule is imported
            return _importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _RegisterInTimm:
    """A ``sys.meta_path`` finder that loads visionattn's model families once timm has been imported and no
    import of a visionattn module is under way (see the module docstring), then removes itself.

    It finds nothing itself: for ``timm`` and ``visionattn.*`` it asks the finders after it for the spec and
    wraps the loader's ``exec_module`` (plain source and extension files only, whose loaders are made per
    module) to count the imports under way and check, after each one completes, whether the time has come.
    """

    _depth = 0  # visionattn (or timm) modules being executed right now

    @classmethod
    def install(cls) -> None:
        if cls not in _sys.meta_path:
            _sys.meta_path.insert(0, cls)

    @classmethod
    def uninstall(cls) -> None:
        while cls in _sys.meta_path:
            _sys.meta_path.remove(cls)

    @classmethod
    def find_spec(cls, fullname: str, path=None, target=None):
        if fullname != "timm" and not fullname.startswith(__name__ + "."):
            return None
        for finder in _sys.meta_path:
            find = getattr(finder, "find_spec", None)
            if finder is cls or find is None:
                continue
            spec = find(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if isinstance(spec.loader, (_machinery.SourceFileLoader, _machinery.SourcelessFileLoader,
                                    _machinery.ExtensionFileLoader)):
            spec.loader.exec_module = cls._counting(spec.loader.exec_module)
        return spec

    @classmethod
    def _counting(cls, exec_module):
        def exec_and_check(module) -> None:
            cls._depth += 1
            try:
                exec_module(module)
            finally:
                cls._depth -= 1
            cls._check()

        return exec_and_check

    @classmethod
    def _check(cls) -> None:
        if cls._depth == 0 and "timm" in _sys.modules and cls in _sys.meta_path:
            cls.uninstall()
            _load()


if "timm" in _sys.modules:
    _load()
else:
    _RegisterInTimm.install()
