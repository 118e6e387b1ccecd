"""A timm model as a DETR backbone: its ``features_only`` maps at strides 8/16/32."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

__all__ = ["TimmBackbone"]


class TimmBackbone(nn.Module):
    """``timm.create_model(model_name, features_only=True, out_indices=out_indices)`` under ``self.body``.

    ``[B, in_chans, H, W]`` -> list of ``[B, out_channels[l], H / s_l, W / s_l]`` (``s_l`` = 8, 16, 32 with the default
    ``out_indices`` of a ResNet-like model). ``pretrained`` downloads timm's weights.
    """

    def __init__(self, model_name: str = "resnet18d", pretrained: bool = False, out_indices: Sequence[int] = (2, 3, 4),
                 in_chans: int = 3):
        super().__init__()
        import timm

        self.body = timm.create_model(model_name, pretrained=pretrained, features_only=True,
                                      out_indices=tuple(out_indices), in_chans=in_chans)
        self.out_channels = list(self.body.feature_info.channels())

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.body(x)
