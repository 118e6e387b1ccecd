"""YAML recipes: bounded loading (``defaults`` includes, ``key=value`` overrides), a schema, and a closed
allow-list for ``_target_`` instantiation.

A recipe, a ``key=value`` override and the ``config.yaml`` of a run folder are files people download from
colleagues and papers, so they are treated as hostile until checked. The rules (all checked before
anything is built, by :func:`validate`):

- **Where a target may come from.** A ``_target_`` is a dotted public name (no part starting with ``_``)
  under one of :data:`NAME_PREFIXES`, and the object it resolves to must be *defined* in one of
  :data:`HOME_MODULES` (its own ``__module__``, not the module it was found in: a function that an allowed
  module merely imported, such as ``pathlib.Path`` or a file writer, is refused).
- **What it may be.** A class of an allowed kind (:data:`ALLOWED_KINDS`: ``nn.Module``, optimizer, LR
  scheduler, MONAI / albumentations / torchvision transform, MONAI metric or inferer), or one of the few
  functions in :data:`ALLOWED_FUNCTIONS`. Classes that call a callable they are given or that read or
  write files (``Lambda`` transforms, ``LambdaLR``, MONAI's image readers and writers, albumentations'
  reference-image transforms ...) are refused by name (:data:`REFUSED_CLASS_NAMES`), subclasses included.
- **What it may be asked.** A constructor argument that fetches or loads something (``pretrained``,
  ``download``, ``url``, ``checkpoint`` ..., :data:`FETCHING_ARGUMENTS`) may not be set, and is refused
  too when its *default* would fetch (MONAI's ``EfficientNetBN`` downloads unless told not to).
- **Syntax.** Only ``_target_``, ``_args_`` and ``_partial_`` are special keys (MONAI's ``_mode_``,
  ``_requires_`` ... are refused); MONAI ``$expressions`` are refused; the file is at most
  :data:`MAX_FILE_BYTES`, expands (YAML aliases counted at every use) to at most :data:`MAX_NODES` nodes
  and nests at most :data:`MAX_DEPTH` deep; ``defaults:`` includes are relative ``.yaml`` paths, at most
  :data:`MAX_INCLUDE_DEPTH` deep.
- **Schema.** The top level holds only :data:`TOP_LEVEL_KEYS`; a run folder's ``config.yaml``
  (:func:`load_run_config`) holds no includes and is checked by the same rules.

The values of the parameters that a recipe passes are plain YAML data, so the only callables a target can
receive are other allowed targets.
"""
from __future__ import annotations

import copy
import difflib
import functools
import importlib
import inspect
import os
import sys
import types
from pathlib import Path
from typing import Any

import yaml

from visionattn.errors import InvalidInputError, UserError

# the names a recipe may write: `visionattn.create_model`, `monai.losses.DiceCELoss`, ...
NAME_PREFIXES = (
    "visionattn", "torch.nn", "torch.optim", "timm", "monai.transforms", "monai.losses", "monai.networks",
    "monai.metrics", "monai.inferers", "albumentations", "torchvision.transforms",
)
# where the object a name resolves to must be defined (its __module__)
HOME_MODULES = (
    "visionattn.backbones", "visionattn.decoders", "visionattn.detectors", "visionattn.layers",
    "torch.nn.modules", "torch.optim",
    "timm.models", "timm.layers", "timm.loss", "timm.optim", "timm.scheduler",
    "monai.transforms", "monai.losses", "monai.networks", "monai.metrics", "monai.inferers",
    "albumentations", "torchvision.transforms",
)
# defined there but refused: they read or write files
REFUSED_HOME_MODULES = ("monai.transforms.io",)
# (module, class) of the base classes a target class may derive from; a module of None-class means
# "any class defined in that module" (torchvision's v1 transforms share no base class)
ALLOWED_KINDS = (
    ("torch.nn.modules.module", "Module"),
    ("torch.optim.optimizer", "Optimizer"),
    ("torch.optim.lr_scheduler", "LRScheduler"),
    ("torch.optim.lr_scheduler", "ReduceLROnPlateau"),
    ("timm.scheduler.scheduler", "Scheduler"),
    ("monai.transforms.transform", "Transform"),
    ("monai.metrics.metric", "Metric"),
    ("monai.inferers.inferer", "Inferer"),
    ("albumentations.core.transforms_interface", "BasicTransform"),
    ("albumentations.core.composition", "BaseCompose"),
    ("torchvision.transforms.transforms", None),
)
# the only functions a recipe may call, as (defining module, name)
ALLOWED_FUNCTIONS = {("visionattn.registry", "create_model")}
# classes refused wherever they are defined in the allowed packages, with their subclasses: they call a
# callable they are given, resolve further names, read or write files, fetch weights or just stall
REFUSED_CLASS_NAMES = {
    "Lambda", "Lambdad", "RandLambda", "RandLambdad",  # MONAI, torchvision, albumentations: call `func`
    "LambdaLR", "MultiplicativeLR",  # torch: call `lr_lambda`
    "TorchVision", "TorchVisiond", "RandTorchVision", "RandTorchVisiond", "TorchIO", "TorchIOd",
    "RandTorchIO", "RandTorchIOd", "CuCIM", "CuCIMd", "RandCuCIM", "RandCuCIMd",  # MONAI: look up a name
    "SimulateDelay", "SimulateDelayd",  # MONAI: sleeps
    "FDA", "HistogramMatching", "PixelDistributionAdaptation", "TextImage",  # albumentations: read files
    "TorchVisionFCModel", "MILModel", "NetAdapter", "Transchex",  # MONAI: look up or download models
}
# constructor arguments that fetch or load something; a recipe may not set them, nor rely on a default
# that does. Keyed by argument name; the value says which targets may still take it (local loaders that
# never unpickle code).
FETCHING_ARGUMENTS = {
    "pretrained": (), "download": (), "url": (), "pretrained_url": (), "model_url": (), "hf_hub_id": (),
    "pretrained_cfg": (), "pretrained_cfg_overlay": (), "pretrained_path": (), "pretrained_weights": (),
    "checkpoint": (), "ckpt": (), "ckpt_path": (), "weights_path": (), "cache_dir": (), "model_dir": (),
    "font_path": (), "reference_images": (), "read_fn": (),
    "checkpoint_path": (("visionattn.registry", "create_model"),),  # safetensors / weights_only
}
SPECIAL_KEYS = ("_target_", "_args_", "_partial_")
TOP_LEVEL_KEYS = ("task", "seed", "device", "output_dir", "data", "model", "loss", "train", "inference", "classes")
TASKS = ("classification", "segmentation", "detection")
# the keys of a recipe's data section that each task's loaders read: any other key (a typo, or a key of another
# task's loader) would otherwise be ignored without a word
DATA_KEYS = {
    "classification": ("kind", "root", "val_root", "val_per_class", "path", "train_split", "val_split", "img_size",
                       "mean", "std", "grayscale_to_rgb", "augment", "max_image_pixels"),
    "segmentation": ("kind", "root", "images", "masks", "labels", "label_values", "in_channels", "channels",
                     "grayscale", "clahe", "spatial_dims", "roi_size", "spacing", "orientation", "intensity", "zoom",
                     "augment", "val_fraction", "split_seed", "folds", "fold", "max_train_cases", "max_voxels",
                     "max_image_pixels"),
    "detection": ("kind", "root", "images", "annotations", "classes", "img_size", "augment", "val_fraction",
                  "split_seed", "max_image_pixels"),
}

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 40
MAX_INCLUDE_DEPTH = 8


class ConfigError(InvalidInputError):
    """A recipe that cannot be loaded or that names something it may not build."""


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


# ---------------------------------------------------------------------------------------------------
# resolving one target


def resolve_target(target: Any, where: str = "config") -> Any:
    """The class or function that ``target`` ('package.module.Name') names, if the rules above allow it;
    else :class:`ConfigError` saying which rule refused it."""
    if not isinstance(target, str) or not target or any(not part.isidentifier() for part in target.split(".")):
        raise ConfigError(f"{where}: _target_ must be a dotted name, got {target!r}")
    if any(part.startswith("_") for part in target.split(".")):
        raise ConfigError(f"{where}: _target_ {target!r} names a private or dunder attribute; "
                          "recipes may only use public names")
    if not _under(target, NAME_PREFIXES):
        raise ConfigError(f"{where}: _target_ {target!r} is outside the allowed packages "
                          f"({', '.join(NAME_PREFIXES)}); recipes may only build classes and functions from these")
    obj = _import_public(target, where)
    if not isinstance(obj, (type, types.FunctionType, types.BuiltinFunctionType)):
        raise ConfigError(f"{where}: _target_ {target!r} is a {type(obj).__name__} object, not a class or function; "
                          "it is refused")
    home = getattr(obj, "__module__", None) or ""
    label = f"{home}.{getattr(obj, '__qualname__', getattr(obj, '__name__', type(obj).__name__))}"
    if isinstance(obj, type):
        if not _under(home, HOME_MODULES) or _under(home, REFUSED_HOME_MODULES):
            raise ConfigError(f"{where}: _target_ {target!r} is {label}, defined outside the allowed modules "
                              "(or in one that reads and writes files); it is refused")
        refused = next((c for c in obj.__mro__ if c.__name__ in REFUSED_CLASS_NAMES
                        and _under(c.__module__, NAME_PREFIXES + HOME_MODULES)), None)
        if refused is not None:
            raise ConfigError(f"{where}: _target_ {target!r} ({label}) is refused: {refused.__name__} calls code it is "
                              "given, reads or writes files, or fetches weights")
        if not _allowed_kind(obj):
            raise ConfigError(f"{where}: _target_ {target!r} ({label}) is refused: only modules, optimizers, LR "
                              "schedulers, transforms, losses, metrics and inferers may be built from a recipe")
        return obj
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)) and \
            (home, getattr(obj, "__name__", "")) in ALLOWED_FUNCTIONS:
        return obj
    raise ConfigError(f"{where}: _target_ {target!r} resolves to {label}, which is refused: recipes may call only "
                      f"{', '.join(sorted(f'{m}.{n}' for m, n in ALLOWED_FUNCTIONS))} and build allowed classes")


def _import_public(target: str, where: str) -> Any:
    """Import the longest module prefix of ``target`` and walk the rest as attributes; every module met on
    the way must itself be under :data:`NAME_PREFIXES` (so ``timm.models.resnet.torch.load`` is refused)."""
    parts = target.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        if not _under(module_name, NAME_PREFIXES):
            continue
        try:
            obj = importlib.import_module(module_name)
        except ImportError:
            continue
        rest = parts[i:]
        break
    else:
        raise ConfigError(f"{where}: cannot import any module of {target!r}")
    path = obj.__name__
    for part in rest:
        try:
            obj = inspect.getattr_static(obj, part) if not isinstance(obj, types.ModuleType) else getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"{where}: {path!r} has no attribute {part!r} (from _target_ {target!r})") from None
        except Exception as e:  # lazy placeholders of optional dependencies raise their own errors
            raise ConfigError(f"{where}: _target_ {target!r} cannot be resolved: {type(e).__name__}") from None
        if isinstance(obj, types.ModuleType) and not _under(obj.__name__, NAME_PREFIXES):
            raise ConfigError(f"{where}: _target_ {target!r} reaches module {obj.__name__!r}, outside the allowed "
                              "packages; it is refused")
        path = f"{path}.{part}"
    if isinstance(obj, types.ModuleType):
        raise ConfigError(f"{where}: _target_ {target!r} is a module, not a class or function")
    return obj


def _allowed_kind(cls: type) -> bool:
    for module_name, class_name in ALLOWED_KINDS:
        module = sys.modules.get(module_name)  # a class can only derive from a base that is imported
        if module is None:
            continue
        if class_name is None:
            if cls.__module__ == module_name:
                return True
            continue
        base = getattr(module, class_name, None)
        if isinstance(base, type) and issubclass(cls, base):
            return True
    return False


def _check_arguments(obj: Any, node: dict, target: str, where: str) -> None:
    """Refuse arguments that would make ``obj`` fetch or load something (:data:`FETCHING_ARGUMENTS`), set
    in ``node`` or left at a default that does."""
    home = (getattr(obj, "__module__", ""), getattr(obj, "__name__", ""))
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        params = {}
    # every argument named pretrained* counts too (EMCADNet's pretrained_encoder fetches timm weights)
    names = dict(FETCHING_ARGUMENTS, **{p: () for p in list(params) + list(node)
                                        if isinstance(p, str) and p.startswith("pretrained") and p not in FETCHING_ARGUMENTS})
    for name, exempt in names.items():
        if home in exempt:
            continue
        if name in node:
            value, source = node[name], "set to"
        elif name in params and params[name].default is not inspect.Parameter.empty:
            value, source = params[name].default, "left at its default"
        else:
            continue
        if not _is_unset(value):
            raise ConfigError(f"{where}: {target}: argument {name!r} is {source} {value!r}; recipes may not make a "
                              f"model fetch or load files (give `{name}: false`/null, or load weights with "
                              "--checkpoint / model.kwargs.checkpoint_path)")


def _is_unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, int, float, list, tuple, dict)) and not value)


# ---------------------------------------------------------------------------------------------------
# checking and building a whole recipe


def validate(node: Any, where: str = "config") -> None:
    """Check every ``_target_`` (and its arguments) and refuse ``$expressions`` and unknown special keys
    anywhere in ``node``, building nothing."""
    _count_nodes(node, where)
    _validate(node, where)


def _validate(node: Any, where: str) -> None:
    if isinstance(node, dict):
        special = [k for k in node if isinstance(k, str) and k.startswith("_") and k.endswith("_")]
        for key in special:
            if key not in SPECIAL_KEYS:
                raise ConfigError(f"{where}: key {key!r} is not supported (special keys: {', '.join(SPECIAL_KEYS)}); "
                                  "MONAI bundle directives such as _mode_ or _requires_ are refused")
        if "_target_" in node:
            obj = resolve_target(node["_target_"], where)
            _check_arguments(obj, node, node["_target_"], where)
            if node.get("_partial_", False) not in (True, False):
                raise ConfigError(f"{where}: _partial_ must be true or false")
            if "_args_" in node and not isinstance(node["_args_"], list):
                raise ConfigError(f"{where}: _args_ must be a list")
        elif any(k in node for k in ("_args_", "_partial_")):
            raise ConfigError(f"{where}: _args_ / _partial_ without a _target_")
        for k, v in node.items():
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                raise ConfigError(f"{where}: key {k!r} is not a plain scalar")
            _validate(v, f"{where}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _validate(v, f"{where}[{i}]")
    elif isinstance(node, str) and node.startswith("$"):
        raise ConfigError(f"{where}: {node!r} is a MONAI-style Python expression; recipes may not run code")
    elif not (node is None or isinstance(node, (str, int, float, bool))):
        raise ConfigError(f"{where}: value of type {type(node).__name__} is not plain YAML data")


def _count_nodes(node: Any, where: str) -> None:
    """Refuse structures larger than :data:`MAX_NODES` or deeper than :data:`MAX_DEPTH` (iteratively, so a
    hostile structure cannot exhaust the interpreter's stack)."""
    count, stack = 0, [(node, 0)]
    while stack:
        item, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise ConfigError(f"{where}: more than {MAX_NODES} entries; a recipe this large is refused")
        if depth > MAX_DEPTH:
            raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; refused")
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)


def instantiate(node: Any, *args: Any, where: str = "config", **extra: Any) -> Any:
    """Build ``node``: dicts with ``_target_`` are called with their other keys (built recursively);
    ``_args_`` gives positional arguments, ``_partial_: true`` returns a ``functools.partial``. ``args`` and
    ``extra`` come from the calling code (e.g. a model's parameters for an optimizer), not from the file."""
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
    kwargs = {k: _build(v, where=f"{where}.{k}") for k, v in node.items() if k not in SPECIAL_KEYS}
    kwargs.update(extra or {})
    pos = list(args) + [_build(v, where=f"{where}._args_") for v in node.get("_args_", [])]
    if node.get("_partial_", False):
        return functools.partial(fn, *pos, **kwargs)
    try:
        return fn(*pos, **kwargs)
    except UserError:
        raise
    except (TypeError, ValueError) as e:  # the target refused the recipe's arguments
        raise ConfigError(f"{where}: building {node['_target_']} failed: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------------
# reading files


def parse_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with bounds: at most :data:`MAX_FILE_BYTES`, at most :data:`MAX_NODES` nodes
    counting every use of an alias, at most :data:`MAX_DEPTH` levels. The tokens are scanned first (depth
    and count), then the node graph is checked before any Python object is constructed, so an alias bomb
    or a deeply nested file is refused in milliseconds."""
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FILE_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_FILE_BYTES // 1024} KiB; a recipe this large is refused")
    _scan_tokens(text, where)
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except RecursionError:
            raise ConfigError(f"{where}: nested too deeply to parse; refused") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from None
        if root is None:
            return None
        _check_node_graph(root, where)
        try:
            return loader.construct_document(root)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: invalid YAML: {e}") from None
    finally:
        loader.dispose()


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when present: fast, and bounds nesting itself
_OPENING_TOKENS = (yaml.BlockMappingStartToken, yaml.BlockSequenceStartToken, yaml.FlowMappingStartToken,
                   yaml.FlowSequenceStartToken)
_CLOSING_TOKENS = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _scan_tokens(text: str, where: str) -> None:
    """Refuse a file nested deeper than :data:`MAX_DEPTH` or holding far more tokens than a recipe of
    :data:`MAX_NODES` entries could, from the scanner's token stream (iterative, no node built)."""
    scanner = _Loader(text)
    depth = count = 0
    try:
        while (token := scanner.get_token()) is not None:
            count += 1
            if count > 4 * MAX_NODES:
                raise ConfigError(f"{where}: more than {MAX_NODES} entries; a recipe this large is refused")
            if isinstance(token, _OPENING_TOKENS):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; refused")
            elif isinstance(token, _CLOSING_TOKENS):
                depth -= 1
    except yaml.YAMLError as e:
        if "nesting depth" in str(e):  # libyaml's own bound (1000 levels), met before ours in flow style
            raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; refused") from None
        raise ConfigError(f"{where}: invalid YAML: {' '.join(str(e).split())}") from None
    finally:
        scanner.dispose()


def _check_node_graph(root: yaml.Node, where: str) -> None:
    """Expanded size and depth of a composed YAML graph, where an alias is the same node object reused.
    Sizes are memoised per node, so the check itself is linear in the file; a recursive alias is refused."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    # iterative post-order walk: (node, children visited?)
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        key = id(node)
        if expanded:
            on_path.discard(key)
            children = _children(node)
            size[key] = 1 + sum(size[id(c)] for c in children)
            depth[key] = 1 + max((depth[id(c)] for c in children), default=0)
            if size[key] > MAX_NODES:
                raise ConfigError(f"{where}: expands to more than {MAX_NODES} entries (YAML aliases counted at every "
                                  "use); refused")
            if depth[key] > MAX_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_DEPTH} levels deep; refused")
            continue
        if key in size:
            continue
        if key in on_path:
            raise ConfigError(f"{where}: a YAML alias refers to itself (line {node.start_mark.line + 1}); refused")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((c, False) for c in _children(node) if id(c) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def read_yaml_file(path: Path) -> Any:
    """A YAML file through :func:`parse_yaml`, with the file named in every error."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ConfigError(f"{path}: {size} bytes, larger than {MAX_FILE_BYTES // 1024} KiB; refused")
        with path.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text; a recipe must be a YAML text file") from None
    return parse_yaml(text, str(path))


def deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and "_target_" not in v:
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def check_schema(cfg: dict, where: str) -> None:
    """The top-level keys of a recipe or run config, the task name and the model section's shape."""
    unknown = [k for k in cfg if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; a recipe holds only "
                          f"{', '.join(TOP_LEVEL_KEYS)}")
    if cfg.get("task", "classification") not in TASKS:
        raise ConfigError(f"{where}: task must be one of {', '.join(TASKS)}, got {cfg.get('task')!r}")
    for key in ("data", "train", "inference"):
        if cfg.get(key) is not None and not isinstance(cfg[key], dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {type(cfg[key]).__name__}")
    classes = cfg.get("classes")
    if classes is not None and (not isinstance(classes, list) or not all(isinstance(c, (str, int)) for c in classes)):
        raise ConfigError(f"{where}: classes must be a list of class names")
    for key in ("output_dir", "device"):
        if cfg.get(key) is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"{where}: {key} must be a string, got {cfg[key]!r}")
    model = cfg.get("model")
    if model is None:
        return
    if not isinstance(model, dict):
        raise ConfigError(f"{where}: model must be a mapping ({{name, kwargs}} or a _target_ entry)")
    if "_target_" not in model:
        extra = [k for k in model if k not in ("name", "kwargs")]
        if extra or not isinstance(model.get("name"), str):
            raise ConfigError(f"{where}: model must be {{name: REGISTERED_NAME, kwargs: {{...}}}} or a _target_ entry"
                              + (f"; unknown key(s) {', '.join(map(repr, extra))}" if extra else ""))
        kwargs = model.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise ConfigError(f"{where}: model.kwargs must be a mapping")
        # model.name goes to visionattn.create_model: the same argument rules as a _target_ of it
        from visionattn.registry import create_model

        _check_arguments(create_model, kwargs, "visionattn.create_model", f"{where}.model.kwargs")


def _with_hints(unknown: list, known) -> str:
    """``'lr_min' (did you mean 'min_lr'?), 'x'``: each unknown key with the nearest known one, if any."""
    return ", ".join(f"{k!r} (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(str(k), known, 1))
                     else repr(k) for k in unknown)


# the train section's options and their defaults (the trainer reads them; a recipe may set any of these only)
TRAIN_DEFAULTS = dict(
    epochs=10, batch_size=64, accumulate=1, opt="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=1.0,
    min_lr=1e-5, clip_grad=None, amp="none", ema_decay=0.0, ema_warmup=True, label_smoothing=0.0, deterministic=True,
    checkpoint_every=0, max_steps=None, max_minutes=None, schedule_by_time=False, eval_batch_size=256, eval_every=1,
    num_workers=0, log_every=10, threads=None, channels_last=False, budget_clock="wall",
)


def check_train_keys(cfg: dict, where: str) -> None:
    """The train section holds only the trainer's options (:data:`TRAIN_DEFAULTS`): a misspelt one is named
    when the recipe is read, with the nearest known name, not ignored or found only when training starts."""
    unknown = [k for k in (cfg.get("train") or {}) if k not in TRAIN_DEFAULTS]
    if unknown:
        raise ConfigError(f"{where}: unknown train option(s) {_with_hints(unknown, TRAIN_DEFAULTS)}; the train section reads "
                          f"{', '.join(TRAIN_DEFAULTS)}")


def check_data_keys(cfg: dict, where: str) -> None:
    """The data section holds only keys its task reads (:data:`DATA_KEYS`); checked after :func:`validate`, so
    that a refused ``_target_`` is named as such wherever it sits."""
    task = cfg.get("task", "classification")
    unknown = [k for k in (cfg.get("data") or {}) if k not in DATA_KEYS[task]]
    if unknown:
        raise ConfigError(f"{where}: unknown data key(s) {_with_hints(unknown, DATA_KEYS[task])} for task {task}; its data section reads "
                          f"{', '.join(DATA_KEYS[task])}")


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> dict:
    """Read a recipe: files in its ``defaults`` list (relative ``.yaml`` paths) first, then the file
    itself, then ``key.sub=value`` overrides (values parsed as YAML, with the same bounds). The result is
    checked (:func:`check_schema`, :func:`validate`, :func:`check_data_keys`) before it is returned."""
    cfg = _load_file(Path(path), seen=())
    return apply_overrides(cfg, overrides, str(path))


def apply_overrides(cfg: dict, overrides: list[str] | None, where: str) -> dict:
    """``key.sub=value`` overrides (values parsed as bounded YAML) applied to ``cfg`` in place, then the
    whole config checked (:func:`check_schema`, :func:`validate`, :func:`check_data_keys`); returns ``cfg``."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, value = item.split("=", 1)
        set_by_path(cfg, key.lstrip("+"), parse_yaml(value, f"override {key}") if value else None)
    check_schema(cfg, where)
    validate(cfg, where)
    check_data_keys(cfg, where)
    check_train_keys(cfg, where)
    return cfg


def load_run_config(path: str | os.PathLike) -> dict:
    """The ``config.yaml`` of a run folder (what ``segment``, ``detect`` and ``evaluate`` read): data, not
    code. The same bounds, schema and target rules as a recipe; includes are refused."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} not found; a model needs the config.yaml its training run wrote")
    data = read_yaml_file(path)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config must be a mapping at the top level")
    if "defaults" in data:
        raise ConfigError(f"{path}: a run folder's config.yaml may not include other files (defaults:)")
    check_schema(data, str(path))
    validate(data, str(path))
    check_data_keys(data, str(path))
    return data


def _load_file(path: Path, seen: tuple) -> dict:
    path = path.resolve()
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    if path in seen:
        raise ConfigError(f"config include cycle: {' -> '.join(map(str, seen + (path,)))}")
    if len(seen) >= MAX_INCLUDE_DEPTH:
        raise ConfigError(f"{path}: includes nested more than {MAX_INCLUDE_DEPTH} deep ({seen[0]} -> ...); refused")
    data = read_yaml_file(path) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a mapping at the top level")
    includes = data.pop("defaults", []) or []
    if not isinstance(includes, list):
        raise ConfigError(f"{path}: defaults must be a list of relative .yaml paths")
    merged: dict = {}
    for inc in includes:
        if not isinstance(inc, str) or os.path.isabs(inc) or not inc.endswith((".yaml", ".yml")):
            raise ConfigError(f"{path}: defaults entry {inc!r} must be a relative path to a .yaml file")
        merged = deep_merge(merged, _load_file(path.parent / inc, seen + (path,)))
    return deep_merge(merged, data)


def set_by_path(cfg: dict, dotted: str, value: Any) -> None:
    node = cfg
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"override key {dotted!r} has an empty part")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a mapping")
    node[parts[-1]] = value
