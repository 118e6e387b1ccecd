"""timm's classifier API, shared by every image-classifier family.

A model using :class:`ClassifierMixin` sets ``head``, ``num_classes``, ``global_pool``, ``head_hidden_size``
(the classifier's input width), ``in_chans`` and ``grad_checkpointing``, and lists its pooling modes in
``GLOBAL_POOLS``.
"""
from __future__ import annotations

import torch
from timm.layers import trunc_normal_
from timm.models._features import feature_take_indices
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
        """Run ``self._stage(i, x)`` for a hierarchical model, keeping the outputs ``indices`` selects
        (timm's ``feature_take_indices`` rules). Returns the last output, the kept ones and their indices."""
        take, max_index = feature_take_indices(num_stages, indices)
        last = max_index if (stop_early or intermediates_only) else num_stages - 1
        intermediates = []
        for i in range(last + 1):
            x = self._stage(i, x)
            if i in take:
                intermediates.append(x)
        return x, intermediates, take

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new ``head`` for ``num_classes`` (0: none, ``forward`` returns pooled features); optionally a new
        pooling mode (``''``: no pooling)."""
        self.num_classes = num_classes
        if global_pool is not None:
            self._check_pool(global_pool)
            self.global_pool = global_pool
        self.head = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def check_image_input(self, x: torch.Tensor, fixed_size: tuple[int, int] | None = None,
                          why_fixed: str = "", min_size: int | None = None) -> None:
        """Raise ``ValueError`` saying what was expected for a wrong rank, channel count or size."""
        name = type(self).__name__
        if x.ndim != 4:
            raise ValueError(f"{name} expects images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
        if x.shape[1] != self.in_chans:
            raise ValueError(
                f"{name} was built for in_chans={self.in_chans}, got {x.shape[1]} channels; "
                f"create the model with in_chans={x.shape[1]} or convert the images"
            )
        if fixed_size is not None and tuple(x.shape[-2:]) != tuple(fixed_size):
            raise ValueError(
                f"{name} was built for {fixed_size[0]}x{fixed_size[1]} inputs ({why_fixed}), got "
                f"{x.shape[-2]}x{x.shape[-1]}; resize the images or create the model with "
                f"img_size=({x.shape[-2]}, {x.shape[-1]})"
            )
        if min_size is not None and min(x.shape[-2:]) < min_size:
            raise ValueError(f"{name} needs inputs of at least {min_size}x{min_size}, got {x.shape[-2]}x{x.shape[-1]}")
