"""timm's classifier API, shared by every image-classifier family.

A model using :class:`ClassifierMixin` sets ``head``, ``num_classes``, ``global_pool``, ``head_hidden_size``
(the classifier's input width), ``in_chans`` and ``grad_checkpointing``, and lists its pooling modes in
``GLOBAL_POOLS``. Hierarchical models also define ``_forward_stages`` (see :meth:`ClassifierMixin.run_stages`).

Graph capture: the models script with ``torch.jit.script`` and trace with ``torch.fx`` (timm's tracer
settings). Input checks go through :func:`check_image_input`, which FX records as one opaque call
(``register_notrace_function``) and scripted models skip; modules whose control flow depends on input
shapes are registered as FX leaves in their family files.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import ContextManager, List, Optional, Tuple

import torch
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._features_fx import register_notrace_function
from torch import nn


def init_vit_weights(m: nn.Module) -> None:
    """ViT-style init used by the families: Linear trunc-normal(0.02) with zero bias, LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def factory_device(device: torch.device | str | None) -> ContextManager:
    """Context in which a model builds its parameters and buffers: ``torch.device(device)`` (so ``'meta'``
    allocates nothing), or nothing when ``device`` is None. The models take ``device=`` / ``dtype=`` as timm's
    do; ``dtype`` is applied with :func:`apply_factory_dtype` once everything is built."""
    return torch.device(device) if device is not None else nullcontext()


def apply_factory_dtype(module: nn.Module, dtype: torch.dtype | None) -> None:
    """Cast the floating-point parameters and buffers of a freshly built ``module`` to ``dtype`` (if given)."""
    if dtype is not None:
        module.to(dtype=dtype)


def module_device_dtype(module: nn.Module) -> dict:
    """``device`` / ``dtype`` of ``module``'s first parameter (empty when it has none), for new submodules."""
    p = next(module.parameters(), None)
    return {} if p is None else {"device": p.device, "dtype": p.dtype}


def _shape_str(shape: List[int]) -> str:
    """``(2, 3)`` as Python prints a tuple of sizes (``(3,)`` for one)."""
    inner = ", ".join([str(s) for s in shape])
    return "(" + inner + ("," if len(shape) == 1 else "") + ")"


@register_notrace_function  # FX: one opaque call on the traced input, run when the graph runs
def check_image_input(
    x: torch.Tensor,
    name: str,
    in_chans: int,
    fixed_size: Optional[Tuple[int, int]] = None,
    why_fixed: str = "",
    min_size: Optional[int] = None,
) -> torch.Tensor:
    """Return ``x`` if it is a ``[B, in_chans, H, W]`` batch fitting the model, else raise ``ValueError`` saying
    what was expected (``name``: the model's class name, for the message)."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects images [B, C, H, W], got a tensor of shape {_shape_str(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"{name} was built for in_chans={in_chans}, got {x.shape[1]} channels; "
            f"create the model with in_chans={x.shape[1]} or convert the images"
        )
    if fixed_size is not None:
        if x.shape[2] != fixed_size[0] or x.shape[3] != fixed_size[1]:
            raise ValueError(
                f"{name} was built for {fixed_size[0]}x{fixed_size[1]} inputs ({why_fixed}), got "
                f"{x.shape[2]}x{x.shape[3]}; resize the images or create the model with "
                f"img_size=({x.shape[2]}, {x.shape[3]})"
            )
    if min_size is not None:
        if min(x.shape[2], x.shape[3]) < min_size:
            raise ValueError(f"{name} needs inputs of at least {min_size}x{min_size}, got {x.shape[2]}x{x.shape[3]}")
    return x


class ClassifierMixin:
    GLOBAL_POOLS: tuple[str, ...] = ("", "avg")

    def _check_pool(self, global_pool: str) -> None:
        if global_pool not in self.GLOBAL_POOLS:
            raise ValueError(f"global_pool must be one of {self.GLOBAL_POOLS}, got {global_pool!r}")

    init_vit_weights = staticmethod(init_vit_weights)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return set()

    def run_stages(self, x: torch.Tensor, num_stages: int, indices=None, stop_early: bool = False,
                   intermediates_only: bool = False) -> tuple[torch.Tensor, list[torch.Tensor], list[int]]:
        """Run the stages of a hierarchical model through its ``_forward_stages(x, take, last)``, keeping the
        outputs ``indices`` selects (timm's ``feature_take_indices`` rules; ``num_stages`` is the number of
        stages the model holds now, fewer after pruning). Returns the last output, the kept ones and their
        indices."""
        take, max_index = feature_take_indices(num_stages, indices)
        last = max_index if (stop_early or intermediates_only) else num_stages - 1
        x, intermediates = self._forward_stages(x, list(take), last)
        return x, intermediates, take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def new_module(self, module: nn.Module) -> nn.Module:
        """``module`` (built on the default device) moved to this model's device and dtype and set to its
        train/eval mode: what replaces a head or a norm after construction."""
        return module.to(**module_device_dtype(self)).train(self.training)

    def make_head(self, in_features: int, num_classes: int) -> nn.Module:
        """A ``Linear`` classifier on this model's device, dtype and mode (``Identity`` for 0 classes)."""
        dd = module_device_dtype(self)
        head = nn.Linear(in_features, num_classes, **dd) if num_classes > 0 else nn.Identity()
        return head.train(self.training)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``head`` for ``num_classes`` (0: none, ``forward`` returns pooled features); optionally a new
        pooling mode (``''``: no pooling). The new head follows the model's device, dtype and train/eval mode."""
        if global_pool is not None:
            self._check_pool(global_pool)
        self.num_classes = num_classes
        if global_pool is not None:
            self.global_pool = global_pool
        self.head = self.make_head(self.head_hidden_size, num_classes)

    @torch.jit.unused
    def check_image_input(self, x: torch.Tensor, fixed_size: tuple[int, int] | None = None,
                          why_fixed: str = "", min_size: int | None = None) -> None:
        """Raise ``ValueError`` saying what was expected for a wrong rank, channel count or size."""
        check_image_input(x, type(self).__name__, self.in_chans, fixed_size, why_fixed, min_size)
