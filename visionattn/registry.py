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
from typing import Any, Callable

import torch
from torch import nn

from visionattn.errors import InvalidInputError, ModelArgumentError, UnknownModelError

TIMM_PREFIX = "va_"
TASKS = ("classification", "segmentation", "detection")


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
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model constructor ``fn(pretrained=False, **kwargs) -> nn.Module``.

    Args:
        task: one of ``classification``, ``segmentation``, ``detection``.
        paper: a short citation (title, venue, arXiv id) shown by ``model_info``.
        model_cls: the class the constructor builds; its ``__init__`` signature is used to report
            bad keyword arguments clearly.
        input_size: default input ``(C, H, W)`` or ``(C, D, H, W)`` used for FLOPs and examples.
        timm: register in timm as ``va_<name>``. Defaults to True for 2-D classifiers.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")

    def decorate(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        name = fn.__name__
        if name in _REGISTRY:
            raise RuntimeError(f"visionattn model {name!r} is registered twice")
        to_timm = timm if timm is not None else (task == "classification" and len(input_size) == 3)
        timm_name = _register_in_timm(fn) if to_timm else None
        _REGISTRY[name] = ModelEntry(
            name=name, fn=fn, task=task, paper=paper, model_cls=model_cls,
            default_input_size=tuple(input_size), timm_name=timm_name, notes=notes,
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


def _check_kwargs(entry: ModelEntry, kwargs: dict) -> None:
    """Reject keyword arguments the model class does not accept, naming the accepted ones."""
    if entry.model_cls is None:
        return
    # keywords consumed by timm's builder rather than the model class
    builder_keys = {
        "features_only", "out_indices", "feature_cls", "feature_cfg", "output_stride", "pretrained_cfg",
        "pretrained_cfg_overlay", "pretrained_strict", "cache_dir", "scriptable", "exportable", "no_jit",
        "flatten_sequential",
    }
    params = inspect.signature(entry.model_cls.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = {p for p in params if p != "self"}
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
    _check_kwargs(entry, kwargs)
    _, tag = _canonical_name(name)
    if entry.timm_name is not None:
        import timm

        full = entry.timm_name + (f".{tag}" if tag else "")
        model = timm.create_model(full, pretrained=pretrained, **kwargs)
    else:
        if tag:
            raise InvalidInputError(f"{entry.name} has no pretrained tags; got {name!r}")
        model = entry.fn(pretrained=pretrained, **kwargs)
    if checkpoint_path is not None:
        load_checkpoint(model, checkpoint_path)
    return model


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


def load_checkpoint(model: nn.Module, path: str, strict: bool = True) -> None:
    """Load weights from a local file into ``model``, through the family's checkpoint filter if any.

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
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
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
    """Task, parameter count, FLOPs at the default input size, default input size and paper reference."""
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
