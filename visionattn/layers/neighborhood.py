"""Neighborhood-attention modules wrapping :mod:`visionattn.kernels` (qkv projection, heads, optional
relative positional bias, output projection). Channels-last input ``[B, *spatial, dim]``, as NATTEN.

``NeighborhoodAttention2d(dim, num_heads, kernel_size, *, stride=1, dilation=1, is_causal=False, ...,
attention_backend='auto')``: NATTEN's order, keyword-only after ``kernel_size``; ``attention_backend`` takes
the kernels' vocabulary (``'auto'``, ``'reference'``, ``'torch'``, ``'triton'``)."""
from __future__ import annotations

from typing import Sequence

import torch
from timm.layers import trunc_normal_
from torch import nn

from visionattn.kernels import check_backend, neighborhood_attention


class _NeighborhoodAttention(nn.Module):
    n_dims = 0

    def __init__(
        self,
        dim: int,
        num_heads: int,
        kernel_size: int | Sequence[int],
        *,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        is_causal: bool | Sequence[bool] = False,
        rel_pos_bias: bool = False,
        qkv_bias: bool = True,
        qk_scale: float | None = None,
        proj_drop: float = 0.0,
        score: str = "softmax",
        attention_backend: str = "auto",
    ):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        n = self.n_dims
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kernel_size = tuple(kernel_size) if isinstance(kernel_size, (list, tuple)) else (kernel_size,) * n
        if len(self.kernel_size) != n or any(k < 1 for k in self.kernel_size):
            raise ValueError(f"kernel_size must be a positive int or a tuple of {n}, got {kernel_size!r}")
        self.stride, self.dilation, self.is_causal = stride, dilation, is_causal
        self.scale = qk_scale if qk_scale is not None else self.head_dim ** -0.5
        self.score = score
        self.attention_backend = check_backend(type(self).__name__, attention_backend)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.zeros(num_heads, *(2 * k - 1 for k in self.kernel_size)))
            trunc_normal_(self.rpb, std=0.02)
        else:
            self.register_parameter("rpb", None)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, *spatial, dim] -> [B, *spatial, dim]``."""
        if x.dim() != self.n_dims + 2:
            raise ValueError(
                f"{type(self).__name__} expects [B, {', '.join('X%d' % a for a in range(self.n_dims))}, dim], "
                f"got shape {tuple(x.shape)}"
            )
        *lead, C = x.shape
        q, k, v = self.qkv(x).reshape(*lead, 3, self.num_heads, self.head_dim).unbind(-3)
        out = neighborhood_attention(
            q, k, v, self.kernel_size, stride=self.stride, dilation=self.dilation, is_causal=self.is_causal,
            rpb=self.rpb, scale=self.scale, score=self.score, backend=self.attention_backend,
        )
        return self.proj_drop(self.proj(out.reshape(*lead, C)))


class NeighborhoodAttention1d(_NeighborhoodAttention):
    """1-D neighborhood attention module: ``[B, L, dim] -> [B, L, dim]``."""

    n_dims = 1


class NeighborhoodAttention2d(_NeighborhoodAttention):
    """2-D neighborhood attention module: ``[B, H, W, dim] -> [B, H, W, dim]``."""

    n_dims = 2


class NeighborhoodAttention3d(_NeighborhoodAttention):
    """3-D neighborhood attention module: ``[B, D, H, W, dim] -> [B, D, H, W, dim]``."""

    n_dims = 3
