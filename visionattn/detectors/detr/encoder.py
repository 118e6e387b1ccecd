"""RT-DETR's hybrid encoder shell: per-level projections, AIFI on the deepest level, then a top-down and a
bottom-up fusion pass (the CCFM topology) whose three operators each family supplies.

``features``: list of ``[B, in_channels[l], H_l, W_l]`` at strides 8/16/32 ->
list of ``[B, hidden_dim, H_l, W_l]`` (same order, finest first).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from visionattn.detectors.detr.blocks import ConvNormAct

__all__ = ["AIFI", "HybridEncoder", "sincos_position_embedding_2d"]


def sincos_position_embedding_2d(height: int, width: int, dim: int, temperature: float = 10000.0,
                                 device=None) -> torch.Tensor:
    """2-D sin-cos position embedding ``[1, height * width, dim]`` for row-major (y, x) flattened tokens:
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``dim / 4`` frequencies ``w = temperature^(-i / (dim/4))``."""
    if dim % 4:
        raise ValueError(f"the 2-D sin-cos embedding needs a dim divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=device),
                            torch.arange(width, dtype=torch.float32, device=device), indexing="ij")
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    x_angles = xs.reshape(-1, 1) * omega
    y_angles = ys.reshape(-1, 1) * omega
    return torch.cat([x_angles.sin(), x_angles.cos(), y_angles.sin(), y_angles.cos()], dim=1)[None]


class AIFI(nn.Module):
    """Attention-based intra-scale feature interaction: one post-LN transformer encoder layer (GELU FFN).

    ``tokens [B, N, C]``, ``pos [1, N, C]`` (added to queries and keys only) -> ``[B, N, C]``.
    """

    def __init__(self, dim: int = 256, num_heads: int = 8, ffn_dim: int = 1024):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm1 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Linear(ffn_dim, dim))
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        query_key = tokens + pos
        tokens = self.norm1(tokens + self.attn(query_key, query_key, tokens, need_weights=False)[0])
        return self.norm2(tokens + self.ffn(tokens))


class HybridEncoder(nn.Module):
    """Per-level 1x1 conv + BN projections to ``hidden_dim``, AIFI on the last (deepest) level, then CCFM's
    top-down and bottom-up fusion.

    The neck operators are factories, one module per use, so each family chooses its own (RT-DETR: nearest
    upsampling, a stride-2 conv and CSPRepLayer, in :mod:`visionattn.detectors.rtdetr`; DFIR-DETR: DFPN and
    FIRC3, in :mod:`visionattn.detectors.dfir_detr`):

    - ``upsample(channels)``: ``[B, C, H, W] -> [B, C, 2H, 2W]``;
    - ``downsample(channels)``: ``[B, C, H, W] -> [B, C, H/2, W/2]``;
    - ``fusion(in_channels, out_channels)``: the block after each concatenation,
      ``[B, 2 * hidden_dim, H, W] -> [B, hidden_dim, H, W]``.

    Top-down, from the deepest level: ``higher = lateral(higher)``, ``lower = fpn(cat[up(higher), lower])``.
    Bottom-up, from the finest: ``out = pan(cat[down(out_previous), higher])``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        hidden_dim: int = 256,
        num_heads: int = 8,
        ffn_dim: int = 1024,
        *,
        fusion: Callable[[int, int], nn.Module],
        upsample: Callable[[int], nn.Module],
        downsample: Callable[[int], nn.Module],
    ):
        super().__init__()
        num_levels = len(in_channels)
        self.hidden_dim = hidden_dim
        self.input_proj = nn.ModuleList(ConvNormAct(c, hidden_dim, 1, act=None) for c in in_channels)
        self.aifi = AIFI(hidden_dim, num_heads, ffn_dim)
        # top-down, from the deepest level
        self.lateral_convs = nn.ModuleList(ConvNormAct(hidden_dim, hidden_dim, 1) for _ in range(num_levels - 1))
        self.upsamples = nn.ModuleList(upsample(hidden_dim) for _ in range(num_levels - 1))
        self.fpn_blocks = nn.ModuleList(fusion(2 * hidden_dim, hidden_dim) for _ in range(num_levels - 1))
        # bottom-up, from the finest level
        self.downsamples = nn.ModuleList(downsample(hidden_dim) for _ in range(num_levels - 1))
        self.pan_blocks = nn.ModuleList(fusion(2 * hidden_dim, hidden_dim) for _ in range(num_levels - 1))

    def forward(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        projected = [proj(f) for proj, f in zip(self.input_proj, features)]
        deepest = projected[-1]
        B, C, H, W = deepest.shape
        pos = sincos_position_embedding_2d(H, W, C, device=deepest.device).to(deepest.dtype)
        tokens = self.aifi(deepest.flatten(2).transpose(1, 2), pos)  # [B, H * W, C]
        projected[-1] = tokens.transpose(1, 2).reshape(B, C, H, W)

        top_down = [projected[-1]]  # finest first once complete
        for step, lower in enumerate(reversed(projected[:-1])):
            higher = self.lateral_convs[step](top_down[0])
            top_down[0] = higher
            upsampled = self.upsamples[step](higher)
            top_down.insert(0, self.fpn_blocks[step](torch.cat([upsampled, lower], dim=1)))

        outputs = [top_down[0]]
        for step, higher in enumerate(top_down[1:]):
            downsampled = self.downsamples[step](outputs[-1])
            outputs.append(self.pan_blocks[step](torch.cat([downsampled, higher], dim=1)))
        return outputs
