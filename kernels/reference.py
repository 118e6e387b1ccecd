"""Brute-force neighborhood attention over a dense ``[N, N]`` mask: the test oracle.

Builds the full mask and bias from the per-axis rules in :mod:`visionattn.kernels.semantics`, computes
every query-key score and lets autograd differentiate it. Memory is ``O(heads * N^2)``: small inputs only.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from visionattn.kernels.semantics import NAParams, axis_mask_and_offsets, na_params


def dense_mask_and_bias_index(
    spatial: Sequence[int], kernel_size, dilation, stride, is_causal, device=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask [N, N]`` (bool) and ``rpb_index [N, N]`` (flat index into ``rpb[h].flatten()``)."""
    n = len(spatial)
    mask = None
    index = None
    for a in range(n):
        m, off = axis_mask_and_offsets(spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a])
        shape = [1] * (2 * n)
        shape[a] = spatial[a]
        shape[n + a] = spatial[a]
        m, off = m.view(shape), off.view(shape)
        rpb_stride = math.prod(2 * k - 1 for k in kernel_size[a + 1:])
        mask = m if mask is None else mask & m
        index = off * rpb_stride if index is None else index + off * rpb_stride
    N = math.prod(spatial)
    return mask.reshape(N, N).to(device), index.expand(mask.shape).reshape(N, N).to(device)


def reference_forward(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    rpb: torch.Tensor | None,
    score_decay: torch.Tensor | None,
    params: NAParams,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Neighborhood attention by brute force, for validated ``params`` (:class:`NAParams`).

    Args:
        query, key: ``[B, *spatial, heads, D]``; value ``[B, *spatial, heads, Dv]``.
        rpb: ``[heads, 2K_0-1, ...]`` additive bias indexed by the key-minus-query offset.
        score_decay: ``[heads, 2K_0-1, ...]`` factors multiplying the sigmoid weights, indexed like ``rpb``.
    Returns:
        ``out [B, *spatial, heads, Dv]`` in the input dtype (computed in at least fp32) and, for softmax,
        ``lse [B, *spatial, heads]`` (fp32; fp64 for fp64 inputs) of the scaled, biased logits over each window.
    """
    B, *spatial, heads, D = query.shape
    N = math.prod(spatial)
    compute = torch.float64 if query.dtype == torch.float64 else torch.float32
    q = query.reshape(B, N, heads, D).to(compute)
    k = key.reshape(B, N, heads, D).to(compute)
    v = value.reshape(B, N, heads, value.shape[-1]).to(compute)
    mask, index = dense_mask_and_bias_index(spatial, params.kernel_size, params.dilation, params.stride,
                                            params.is_causal, query.device)
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) * params.scale
    if rpb is not None:
        logits = logits + rpb.to(compute).reshape(heads, -1)[:, index]
    if params.score == "softmax":
        logits = logits.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(logits, dim=-1)  # [B, heads, N]
        weights = torch.softmax(logits, dim=-1)
    else:
        lse = None
        weights = torch.sigmoid(logits) * mask
        if score_decay is not None:
            weights = weights * score_decay.to(compute).reshape(heads, -1)[:, index]
    out = torch.einsum("bhnm,bmhd->bnhd", weights, v)
    out = out.reshape(B, *spatial, heads, v.shape[-1]).to(query.dtype)
    if lse is not None:
        lse = lse.transpose(1, 2).reshape(B, *spatial, heads)
    return out, lse


def na_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int | Sequence[int],
    *,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    score: str = "softmax",
    score_decay: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The brute-force oracle on its own, over ``query.dim() - 3`` spatial axes: the arguments (checked)
    and semantics of :func:`visionattn.kernels.na2d`; returns ``(out, lse)`` (``lse`` None for sigmoid
    scores). Equivalent to ``na*d(..., backend='reference', return_lse=...)`` without autograd plumbing."""
    n_dims = query.dim() - 3 if isinstance(query, torch.Tensor) else 0
    if not 1 <= n_dims <= 3:
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(f"na_reference: query must be [batch, *spatial (1 to 3 axes), heads, head_dim], got {shape}")
    params = na_params(n_dims, query, key, value, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                       scale=scale, rpb=rpb, score=score, score_decay=score_decay, backend="reference")
    return reference_forward(query, key, value, rpb, score_decay, params)
