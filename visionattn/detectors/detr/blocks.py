"""Small layers shared by the DETR toolkit and the detector families built on it."""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ConvNormAct", "MLP", "RepVGGBlock"]


class ConvNormAct(nn.Sequential):
    """Conv (no bias, 'same' padding for odd kernels) -> BatchNorm -> activation (SiLU by default;
    ``act=None`` for none). ``[B, in_channels, H, W] -> [B, out_channels, H / stride, W / stride]``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 1, stride: int = 1,
                 groups: int = 1, act: type[nn.Module] | None = nn.SiLU):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_channels),
            act() if act is not None else nn.Identity(),
        )


class RepVGGBlock(nn.Module):
    """``SiLU(BN(conv3x3(x)) + BN(conv1x1(x)))``, the training-time form of a RepVGG block.
    ``[B, channels, H, W]`` in and out."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = ConvNormAct(channels, channels, 3, act=None)
        self.conv1 = ConvNormAct(channels, channels, 1, act=None)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


class MLP(nn.Sequential):
    """``num_layers`` linear layers with ReLU between them: ``[..., in_dim] -> [..., out_dim]``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.ReLU())
        super().__init__(*layers)
