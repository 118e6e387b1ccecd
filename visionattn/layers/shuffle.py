"""Channel shuffle (ShuffleNet), used by EMCAD's multi-scale convolution block and DFIR-DETR's dual-path
shuffle convolution."""
from __future__ import annotations

import torch

__all__ = ["channel_shuffle"]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[B, C, H, W]`` with the channels of the ``groups`` groups interleaved: channel ``g * (C / groups) + i``
    moves to ``i * groups + g``. ``C`` must be divisible by ``groups``."""
    B, C, H, W = x.shape
    return x.view(B, groups, C // groups, H, W).transpose(1, 2).reshape(B, C, H, W)
