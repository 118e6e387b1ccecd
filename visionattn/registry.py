"""Model registry: ``create_model``, ``list_models``, ``model_info`` and the timm bridge.

Every model family registers its constructors with :func:`register_model`. visionattn's own names are
unprefixed (``convit_tiny``). 2-D image classifiers are also registered in timm under the ``va_`` prefix
(``va_convit_tiny``) so that ``timm.create_model('va_convit_tiny', features_only=True, ...)`` works;
a name timm already has is never overwritten (registration fails loudly instead).
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable, Union

import torch
from torch import nn

from visionattn.errors import InvalidInputError, ModelArgumentError, UnknownModelError

TIMM_PREFIX = "va_"
TASKS = ("classification", "segmentation", "detection")


COMPUTE_UNITS = ("GMACs", "GFLOPs", "G")


@dataclass(frozen=True)
class ReportedFigures:
    """Figures someone else published for a model (its paper, or the released code), with their source.

    Our own parameter and FLOP counts are never written here: they are counted from the built model
    (:func:`model_info`; the README's model table is generated from them). What goes here is what we
    compare against, typed so that tables are generated from it rather than copied from free text.

    Args:
        source: where the figures come from: ``"paper"``, ``"paper v4"``, ``"official code"``, ...
        params_m: parameters in millions, or a ``(low, high)`` range when the source gives one.
        compute: operations per forward pass, in ``compute_unit``.
        compute_unit: ``"GMACs"`` (multiply-adds, what most vision papers call FLOPs), ``"GFLOPs"`` (two per
            multiply-add) or ``"G"`` (the source does not say which).
        metric, value, dataset: a result, e.g. ``metric="top-1", value=81.4, dataset="ImageNet-1k"``.
        setting: the conditions, in words, when they differ from the registered model's defaults (input
            size, number of classes, which variant).
    """

    source: str = "paper"
    params_m: Union[float, tuple[float, float], None] = None
    compute: float | None = None
    compute_unit: str = "GMACs"
    metric: str | None = None
    value: float | None = None
    dataset: str | None = None
    setting: str = ""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("ReportedFigures: source must name where the figures come from")
        if self.compute_unit not in COMPUTE_UNITS:
            raise ValueError(f"ReportedFigures: compute_unit must be one of {COMPUTE_UNITS}, got {self.compute_unit!r}")
        if (self.metric is None) != (self.value is None):
            raise ValueError("ReportedFigures: give metric and value together")
        if self.params_m is None and self.compute is None and self.value is None:
            raise ValueError("ReportedFigures: give at least one of params_m, compute, value")

    def params_text(self) -> str | None:
        """``"5.7M"``, ``"77-79M"`` or None."""
        if self.params_m is None:
            return None
        if isinstance(self.params_m, tuple):
            low, high = self.params_m
            return f"{low:g}-{high:g}M"
        return f"{self.params_m:g}M"

    def compute_text(self) -> str | None:
        """``"2.2 GMACs"``, ``"9.39 G"`` or None."""
        return None if self.compute is None else f"{self.compute:g} {self.compute_unit}"

    def result_text(self) -> str | None:
        """``"81.4 top-1, ImageNet-1k"`` or None."""
        if self.value is None:
            return None
        return f"{self.value:g} {self.metric}" + (f", {self.dataset}" if self.dataset else "")

    def describe(self) -> str:
        """One line: ``"paper: 5.7M params, 1 GMACs, 73.1 top-1, ImageNet-1k"``."""
        parts = [t for t in (self.params_text(), self.compute_text(), self.result_text()) if t]
        if self.params_m is not None:
            parts[0] += " params"
        where = f" ({self.setting})" if self.setting else ""
        return f"{self.source}{where}: " + ", ".join(parts)


@dataclass(frozen=True)
class ModelEntry:
    """What the registry knows about one registered constructor."""

    name: str
    fn: Callable[..., nn.Module]
    task: str
    paper: str
    model_cls: type | None
    default_input_size: tuple[int, ...]
    timm_name: str | None
    notes: str = ""
    reported: tuple[ReportedFigures, ...] = ()


_REGISTRY: dict[str, ModelEntry] = {}

# the modules whose import registers visionattn's models (each family registers its constructors on import)
FAMILY_MODULES = ("visionattn.backbones", "visionattn.decoders", "visionattn.detectors")
_families_loaded = _families_loading = False


def load_families() -> None:
    """Import every model family, so that the registry (and timm) holds all of visionattn's models.

    ``import visionattn`` is light (see :mod:`visionattn`), so the lookups below call this first: a caller
    that imports ``visionattn.registry`` directly (a recipe's ``_target_: visionattn.registry.create_model``)
    sees every model too. A call made while the families are being imported (a family looking names up as it
    registers) returns at once: the registry then holds what has been registered so far."""
    global _families_loaded, _families_loading
    if _families_loaded or _families_loading:
        return
    import importlib

    _families_loading = True
    try:
        for module in FAMILY_MODULES:
            importlib.import_module(module)
        _families_loaded = True
    finally:
        _families_loading = False


def register_model(
    *,
    task: str,
    paper: str,
    model_cls: type | None = None,
    input_size: tuple[int, ...] = (3, 224, 224),
    timm: bool | None = None,
    notes: str = "",
    reported: ReportedFigures | tuple[ReportedFigures, ...] = (),
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model constructor ``fn(pretrained=False, **kwargs) -> nn.Module``.

    Args:
        task: one of ``classification``, ``segmentation``, ``detection``.
        paper: a short citation (title, venue, arXiv id) shown by ``model_info``.
        model_cls: the class the constructor builds; its ``__init__`` signature is used to report
            bad keyword arguments clearly.
        input_size: default input ``(C, H, W)`` or ``(C, D, H, W)`` used for FLOPs and examples.
        timm: register in timm as ``va_<name>``. Defaults to True for 2-D classifiers.
        notes: a short description in words. Parameter and FLOP counts do not belong here (they are
            counted from the model), nor do published figures (``reported``).
        reported: the figures the paper or the released code gives for this model, one
            :class:`ReportedFigures` per source.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if isinstance(reported, ReportedFigures):
        reported = (reported,)
    if not all(isinstance(r, ReportedFigures) for r in reported):
        raise TypeError("reported must be a ReportedFigures or a tuple of them")

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"visionattn model {name!r} is registered twice")
        to_timm = timm if timm is not None else (task == "classification" and len(input_size) == 3)
        timm_name = _register_in_timm(fn) if to_timm else None
        _REGISTRY[name] = ModelEntry(
            name=name, fn=fn, task=task, paper=paper, model_cls=model_cls,
            default_input_size=tuple(input_size), timm_name=timm_name, notes=notes, reported=tuple(reported),
        )
        return fn

    return decorate


def _register_in_timm(fn: Callable[..., nn.Module]) -> str:
    """Register ``fn`` in timm as ``va_<name>``; the family module must hold ``default_cfgs``
    (built with ``timm.models.generate_default_cfgs``) keyed by the prefixed name, above the
    decorated constructors, because timm reads it at registration time."""
    import timm.models

    timm_name = TIMM_PREFIX + fn.__name__
    if timm.models.is_model(timm_name):
        raise RuntimeError(
            f"timm already has a model named {timm_name!r}; visionattn never overwrites timm's registry. "
            "Rename the visionattn constructor."
        )

    def timm_entrypoint(pretrained: bool = False, **kwargs: Any) -> nn.Module:
        entry = _REGISTRY[fn.__name__]
        kwargs = translate_vocabulary(entry, kwargs)
        if pretrained:
            from timm.models._builder import resolve_pretrained_cfg

            cfg = resolve_pretrained_cfg(timm_name, kwargs.get("pretrained_cfg"), kwargs.get("pretrained_cfg_overlay"))
            check_pretrained_reachable(entry.name, cfg.to_dict())
        return fn(pretrained=pretrained, **kwargs)

    timm_entrypoint.__name__ = timm_entrypoint.__qualname__ = timm_name
    timm_entrypoint.__module__ = fn.__module__
    timm_entrypoint.__doc__ = fn.__doc__
    # timm appends the name to the module's __all__, so the module must really hold it
    setattr(sys.modules[fn.__module__], timm_name, timm_entrypoint)
    timm.models.register_model(timm_entrypoint)
    return timm_name


def _canonical_name(name: str) -> tuple[str, str]:
    """Split ``name[.tag]`` and strip the ``va_`` prefix. Returns ``(arch, tag)``."""
    if not isinstance(name, str) or not name:
        raise ModelArgumentError(f"model name must be a non-empty string, got {name!r}")
    arch, _, tag = name.partition(".")
    if arch.startswith(TIMM_PREFIX) and arch[len(TIMM_PREFIX):] in _REGISTRY:
        arch = arch[len(TIMM_PREFIX):]
    return arch, tag


def get_entry(name: str) -> ModelEntry:
    """Return the registry entry for ``name`` (``va_`` prefix and ``.tag`` accepted)."""
    load_families()
    arch, _ = _canonical_name(name)
    if arch not in _REGISTRY:
        candidates = list(_REGISTRY) + [TIMM_PREFIX + n for n in _REGISTRY if _REGISTRY[n].timm_name]
        close = difflib.get_close_matches(name, candidates, n=5, cutoff=0.5)
        hint = f" Closest names: {', '.join(close)}." if close else ""
        raise UnknownModelError(
            f"Unknown visionattn model {name!r}.{hint} `visionattn list` or "
            "`visionattn.list_models()` shows all names."
        )
    return _REGISTRY[arch]


def list_models(pattern: str = "*", task: str | None = None) -> list[str]:
    """Names of registered models matching a shell-style ``pattern``, sorted.

    ``pattern`` may also be written with the ``va_`` prefix (``va_convit*``).
    """
    load_families()
    if pattern.startswith(TIMM_PREFIX):
        pattern = pattern[len(TIMM_PREFIX):]
    names = [n for n, e in _REGISTRY.items() if fnmatch.fnmatchcase(n, pattern) and (task is None or e.task == task)]
    return sorted(names, key=_natural_key)


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


# The two vocabularies: timm's (classifiers, detectors) and MONAI's (segmentation networks). Each model takes
# its own; create_model (and timm.create_model for va_* models) also accepts the other's name for the same thing.
VOCABULARY_PAIRS = (("in_chans", "in_channels"), ("num_classes", "out_channels"))


def _accepted_arguments(entry: ModelEntry) -> set[str] | None:
    """Keyword arguments of the model class (``None``: unknown, or it takes ``**kwargs``)."""
    if entry.model_cls is None:
        return None
    params = inspect.signature(entry.model_cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    return {p for p in params if p != "self"}


def translate_vocabulary(entry: ModelEntry, kwargs: dict) -> dict:
    """``kwargs`` with timm's names turned into MONAI's or back, whichever the model takes
    (``in_chans`` <-> ``in_channels``, ``num_classes`` <-> ``out_channels``). Both names given with
    different values is an error."""
    accepted = _accepted_arguments(entry)
    if accepted is None:
        return kwargs
    kwargs = dict(kwargs)
    for a, b in VOCABULARY_PAIRS:
        for given, own in ((a, b), (b, a)):
            if given in kwargs and given not in accepted and own in accepted:
                value = kwargs.pop(given)
                if own in kwargs and kwargs[own] != value:
                    raise ModelArgumentError(f"{entry.name}: {given}={value!r} and {own}={kwargs[own]!r} name the "
                                             f"same argument with different values; give one ({own})")
                kwargs[own] = value
    return kwargs


def _class_count_argument(entry: ModelEntry) -> str | None:
    accepted = _accepted_arguments(entry) or set()
    return next((name for name in ("num_classes", "out_channels") if name in accepted), None)


HUB_HOST = ("huggingface.co", 443)


def check_pretrained_reachable(name: str, cfg: dict, timeout: float = 3.0) -> None:
    """Fail at once, saying what to do, when ``pretrained=True`` would have to download weights that are
    neither a local file nor in the Hugging Face cache, and the hub cannot be reached (timm would otherwise
    retry for about a minute before failing). ``cfg``: the resolved pretrained config (overlay applied)."""
    if cfg.get("file") or cfg.get("state_dict") is not None:
        return  # a local file (timm checks that it exists) or weights in memory
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    fix = ("pass a local file: create_model(..., checkpoint_path='weights.safetensors') or "
           "pretrained_cfg_overlay=dict(file='weights.pth')")
    if not hub_id and not url:
        raise InvalidInputError(f"{name} has no pretrained weights to download; {fix}")
    if hub_id:
        from huggingface_hub import try_to_load_from_cache

        for filename in (cfg.get("hf_hub_filename"), "model.safetensors", "open_clip_pytorch_model.bin",
                         "pytorch_model.bin"):
            if filename and isinstance(try_to_load_from_cache(hub_id.split("@")[0], filename), str):
                return  # cached: timm finds it without the network
    import os
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            socket.create_connection(HUB_HOST, timeout=timeout).close()
            return
        except OSError as e:
            reason = f"{HUB_HOST[0]} cannot be reached ({e})"
    where = f"the Hugging Face hub ({hub_id})" if hub_id else url
    raise InvalidInputError(f"pretrained weights for {name} come from {where}, which is not in the local cache, "
                            f"and {reason}; {fix}")


def _check_kwargs(entry: ModelEntry, kwargs: dict) -> None:
    """Reject keyword arguments the model class does not accept, naming the accepted ones."""
    accepted = _accepted_arguments(entry)
    if accepted is None:
        return
    # keywords consumed by timm's builder rather than the model class
    builder_keys = {
        "features_only", "out_indices", "feature_cls", "feature_cfg", "output_stride", "pretrained_cfg",
        "pretrained_cfg_overlay", "pretrained_strict", "cache_dir", "scriptable", "exportable", "no_jit",
        "flatten_sequential",
    }
    bad = sorted(k for k in kwargs if k not in accepted and k not in builder_keys)
    if bad:
        raise ModelArgumentError(
            f"{entry.name}: unknown keyword argument(s) {bad}. "
            f"Accepted model arguments: {', '.join(sorted(accepted))}."
        )


def create_model(
    name: str,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    Args:
        name: a registered name (``convit_tiny``), optionally ``va_``-prefixed and/or with a pretrained
            tag (``convit_tiny.fb_in1k``).
        pretrained: load the pretrained weights named by the model's pretrained config. With
            ``pretrained_cfg_overlay=dict(file='weights.safetensors')`` they come from a local file.
        checkpoint_path: a local checkpoint (``.safetensors`` or a ``torch.save``'d state dict) loaded
            after construction with ``weights_only=True``; never unpickles code.
        **kwargs: model arguments (``num_classes``, ``in_chans``, ``img_size``, ...). ``None`` values are
            dropped, as in timm, so command lines can pass unset options through.
    """
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    entry = get_entry(name)
    kwargs = translate_vocabulary(entry, kwargs)
    _check_kwargs(entry, kwargs)
    _, tag = _canonical_name(name)
    if entry.timm_name is not None:
        import timm

        full = entry.timm_name + (f".{tag}" if tag else "")
        model = timm.create_model(full, pretrained=pretrained, **kwargs)
    else:
        if tag:
            raise InvalidInputError(f"{entry.name} has no pretrained tags; got {name!r}")
        if pretrained:
            raise InvalidInputError(f"{entry.name} has no pretrained weights to download; pass a local file: "
                                    "create_model(..., checkpoint_path='weights.safetensors')")
        model = entry.fn(pretrained=False, **kwargs)
    if checkpoint_path is not None:
        head = class_dependent_keys(entry, kwargs) if _class_count_argument(entry) else set()
        load_checkpoint(model, checkpoint_path, resettable=head)
    return model


def class_dependent_keys(entry: ModelEntry, kwargs: dict) -> set[str]:
    """State-dict keys whose shape depends on the class count: the classifier head(s), found by building the
    model twice on the meta device (no memory, no time) with two class counts and comparing shapes. timm
    names its heads in ``pretrained_cfg['classifier']``; this also finds deep-supervision heads and a
    detector's per-layer class heads and denoising embeddings."""
    arg = _class_count_argument(entry)
    shapes = []
    for count in (2, 3):
        with torch.device("meta"):
            model = entry.fn(pretrained=False, **{**kwargs, arg: count})
        shapes.append({k: tuple(v.shape) for k, v in model.state_dict().items()})
    return {k for k in shapes[0] if shapes[0][k] != shapes[1].get(k)}


def load_state_dict_file(path: str) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    Checkpoints saved as ``{'model': sd}``, ``{'state_dict': sd}`` or ``{'state_dict_ema': sd}`` are
    unwrapped. Raises ``FileNotFoundError``/``ValueError`` with the path on a missing or unreadable file.
    """
    import os

    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as e:  # SafetensorError: truncated or not a safetensors file
            raise InvalidInputError(f"cannot read checkpoint {path} ({type(e).__name__}: {e}); is the file complete?") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError carries the offending global
        raise InvalidInputError(
            f"cannot read checkpoint {path} with weights_only=True ({type(e).__name__}: {e}). visionattn "
            "never unpickles code; re-save the weights as a plain state dict or as .safetensors."
        ) from e
    if isinstance(obj, dict):
        for key in ("state_dict_ema", "model", "state_dict", "model_state"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InvalidInputError(f"{path} does not hold a state dict of tensors")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}


def load_checkpoint(model: nn.Module, path: str, strict: bool = True, resettable: set[str] = frozenset()) -> None:
    """Load weights from a local file into ``model``, through the family's checkpoint filter if any.

    ``resettable``: keys that may differ in shape from the file's (the classifier head, when fine-tuning with
    another class count, see :func:`class_dependent_keys`); those keep the model's fresh initialisation, as
    timm resets a pretrained head for another ``num_classes``, and a log line says so. A shape mismatch
    anywhere else is an error naming the keys and shapes.

    The checksum a visionattn trainer checkpoint or ``.safetensors`` file carries is verified (files from
    other tools have none and load as before). An unreadable or truncated file, pickled code (refused by
    ``weights_only=True``) or a checksum mismatch raises a one-line ``ValueError`` naming the file.
    """
    from visionattn.checkpoints import read_checkpoint, verify_safetensors_digest

    if str(path).endswith(".safetensors"):
        state_dict = load_state_dict_file(path)
        verify_safetensors_digest(path, state_dict)
    else:
        read_checkpoint(path)  # one-line errors and the checksum; the file is then read again to unwrap it
        state_dict = load_state_dict_file(path)
    filter_fn = getattr(type(model), "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state_dict = filter_fn(state_dict, model)
    own = model.state_dict()
    mismatched = {k: (tuple(v.shape), tuple(own[k].shape)) for k, v in state_dict.items()
                  if k in own and tuple(v.shape) != tuple(own[k].shape)}
    if mismatched:
        not_head = {k: v for k, v in mismatched.items() if k not in resettable}
        if not_head:
            shown = ", ".join(f"{k}: file {a} vs model {b}" for k, (a, b) in list(not_head.items())[:6])
            raise InvalidInputError(f"checkpoint {path} does not match {type(model).__name__}: shapes differ ({shown}"
                                    f"{', ...' if len(not_head) > 6 else ''})")
        import logging

        logging.getLogger("visionattn").warning(
            "checkpoint %s has another class count than the model: its classifier head (%d tensors, e.g. %s) is "
            "not loaded and keeps its fresh initialisation", path, len(mismatched), next(iter(mismatched)))
        state_dict = {k: v for k, v in state_dict.items() if k not in mismatched}
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    missing = [k for k in missing if k not in mismatched]
    if strict and (missing or unexpected):
        raise InvalidInputError(
            f"checkpoint {path} does not match {type(model).__name__}: "
            f"missing keys {missing[:8]}{'...' if len(missing) > 8 else ''}, "
            f"unexpected keys {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}"
        )


def _register_cpu_sdpa_flops() -> None:
    """torch's FLOP counter knows the CUDA SDPA kernels but not the CPU one; count it the same way."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op in flop_counter.flop_registry or op.default in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(op)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: nn.Module, input_size: tuple[int, ...]) -> int:
    """Forward FLOPs (multiply-add = 2 FLOPs) for one input of ``input_size`` via ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_sdpa_flops()
    was_training = model.training
    model.eval()
    x = torch.zeros(1, *input_size)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was_training)
    return counter.get_total_flops()


def model_info(name: str, **kwargs: Any) -> dict[str, Any]:
    """Task, parameter count, FLOPs at the default input size, default input size, paper reference and the
    figures the paper (or released code) reports (``reported``, one line per source)."""
    entry = get_entry(name)
    model = create_model(name, **kwargs)
    input_size = _model_input_size(model, entry)
    params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, input_size)
    return {
        "name": entry.name,
        "timm_name": entry.timm_name,
        "task": entry.task,
        "params": params,
        "params_m": params / 1e6,
        "flops": flops,
        "gflops": flops / 1e9,
        "gmacs": flops / 2e9,
        "input_size": input_size,
        "paper": entry.paper,
        "notes": entry.notes,
        "reported": [r.describe() for r in entry.reported],
    }


def _model_input_size(model: nn.Module, entry: ModelEntry) -> tuple[int, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size") if isinstance(cfg, dict) else None
    in_chans = getattr(model, "in_chans", getattr(model, "in_channels", None))  # timm's name, MONAI's name
    if not isinstance(in_chans, int):
        in_chans = None
    if size is None:
        size = entry.default_input_size
    if in_chans is not None:
        size = (in_chans, *size[1:])
    img_size = getattr(model, "img_size", None)
    if img_size is not None:
        size = (size[0], *img_size)
    return tuple(size)
