"""YAML recipes: loading (``defaults`` includes, ``key=value`` overrides) and safe ``_target_`` instantiation.

A recipe may name classes and functions to build with ``_target_`` entries, the syntax Hydra and MONAI
bundles share. A downloaded recipe must not be able to run arbitrary code, so targets are resolved only
inside an allow-list of modules, and the entry points that load or run code are refused even there
(``torch.hub``, ``torch.load``, MONAI's bundle runners, ``eval``/``exec``/``importlib``/``os``/
``subprocess`` ...). MONAI's ``$expression`` strings, which MONAI evaluates as Python, are refused too.
Every target of a recipe is checked before anything is built (:func:`validate`).
"""
from __future__ import annotations

import builtins
import copy
import functools
import importlib
import os
import types
from pathlib import Path
from typing import Any

import yaml

ALLOWED_PREFIXES = (
    "visionattn",
    "torch.nn",
    "torch.optim",
    "timm",
    "monai.transforms",
    "monai.losses",
    "monai.networks",
    "monai.metrics",
    "monai.inferers",
    "albumentations",
    "torchvision.transforms",
)
# refused even inside the allowed packages: they load pickles, fetch or run code
DENIED_PREFIXES = (
    "torch.hub", "torch.load", "torch.package", "torch.jit.load", "torch.utils.cpp_extension", "monai.bundle",
    "monai.apps", "builtins", "importlib", "os", "subprocess", "sys", "shutil", "pickle", "runpy", "code",
    "ctypes", "socket", "urllib", "requests", "timm.models.load_checkpoint", "timm.models._helpers",
    "timm.models._hub", "timm.models._builder", "huggingface_hub", "visionattn.tasks.config",
)
_DENIED_NAMES = {"eval", "exec", "compile", "__import__", "open", "getattr", "setattr", "delattr", "globals",
                 "locals", "vars", "input", "breakpoint", "load", "loads", "load_url", "load_state_dict_from_url",
                 "system", "popen", "import_module"}


class ConfigError(ValueError):
    """A recipe that cannot be loaded or that names something it may not build."""


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_name(target: str, where: str) -> None:
    if _matches(target, DENIED_PREFIXES):
        raise ConfigError(f"{where}: _target_ {target!r} is refused: it loads or runs code")
    if not _matches(target, ALLOWED_PREFIXES):
        raise ConfigError(
            f"{where}: _target_ {target!r} is outside the allowed modules ({', '.join(ALLOWED_PREFIXES)}); "
            "recipes may only build classes and functions from these"
        )


def resolve_target(target: str, where: str = "config") -> Any:
    """Import ``target`` ('package.module.Name') if, and only if, the allow-list permits it."""
    if not isinstance(target, str) or not target or any(not part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"{where}: _target_ must be a dotted name, got {target!r}")
    if any(part.startswith("__") for part in target.split(".")):
        raise ConfigError(f"{where}: _target_ {target!r} names a dunder attribute")
    _check_name(target, where)
    parts = target.split(".")
    obj = None
    for i in range(len(parts), 0, -1):  # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            rest = parts[i:]
            break
        except ImportError:
            continue
    if obj is None:
        raise ConfigError(f"{where}: cannot import any module of {target!r}")
    path = obj.__name__
    for part in rest:
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {path!r} has no attribute {part!r} (from _target_ {target!r})")
        obj = getattr(obj, part)
        path = obj.__name__ if isinstance(obj, types.ModuleType) else f"{path}.{part}"
        if isinstance(obj, types.ModuleType):
            _check_name(obj.__name__, where)  # a module reached through an attribute must be allowed too
    if isinstance(obj, types.ModuleType) or not callable(obj):
        raise ConfigError(f"{where}: _target_ {target!r} is not a class or function")
    home = getattr(obj, "__module__", None) or ""
    if getattr(obj, "__name__", "") in _DENIED_NAMES or obj in vars(builtins).values() or (home and _matches(home, DENIED_PREFIXES)):
        raise ConfigError(f"{where}: _target_ {target!r} resolves to {home}.{getattr(obj, '__name__', obj)}, which is refused")
    return obj


def validate(node: Any, where: str = "config") -> None:
    """Check every ``_target_`` and refuse ``$expressions`` anywhere in ``node``, building nothing."""
    if isinstance(node, dict):
        if "_target_" in node:
            resolve_target(node["_target_"], where)
        for k, v in node.items():
            validate(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            validate(v, f"{where}[{i}]")
    elif isinstance(node, str) and node.startswith("$"):
        raise ConfigError(f"{where}: {node!r} is a MONAI-style Python expression; recipes may not run code")


def instantiate(node: Any, *args: Any, where: str = "config", **extra: Any) -> Any:
    """Build ``node``: dicts with ``_target_`` are called with their other keys (built recursively);
    ``_args_`` gives positional arguments, ``_partial_: true`` returns a ``functools.partial``."""
    validate(node, where)
    return _build(node, args, extra, where)


def _build(node: Any, args: tuple = (), extra: dict | None = None, where: str = "config") -> Any:
    if isinstance(node, list):
        return [_build(v, where=f"{where}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if "_target_" not in node:
        return {k: _build(v, where=f"{where}.{k}") for k, v in node.items()}
    fn = resolve_target(node["_target_"], where)
    kwargs = {k: _build(v, where=f"{where}.{k}") for k, v in node.items() if k not in ("_target_", "_args_", "_partial_")}
    kwargs.update(extra or {})
    pos = list(args) + [_build(v, where=f"{where}._args_") for v in node.get("_args_", [])]
    if node.get("_partial_", False):
        return functools.partial(fn, *pos, **kwargs)
    try:
        return fn(*pos, **kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: building {node['_target_']} failed: {e}") from e


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "_target_" not in v:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a recipe: files in its ``defaults`` list (paths relative to it) first, then the file itself, then
    ``key.sub=value`` overrides (values parsed as YAML). The result is validated."""
    cfg = _load_file(Path(path), seen=())
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        set_by_path(cfg, key.lstrip("+"), yaml.safe_load(value) if value else None)
    validate(cfg, str(path))
    return cfg


def _load_file(path: Path, seen: tuple) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    merged: dict = {}
    for inc in data.pop("defaults", []) or []:
        merged = deep_merge(merged, _load_file(path.parent / inc, seen + (path,)))
    return deep_merge(merged, data)


def set_by_path(cfg: dict, dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a mapping")
    node[parts[-1]] = value


def get_by_path(cfg: dict, dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
