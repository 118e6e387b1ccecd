"""Blocked neighborhood attention (``stride == kernel_size``, dilation 1, not causal) as dense window batches.

With the stride equal to the kernel on every axis, the neighborhoods of :mod:`.semantics` stop overlapping:
per axis of length ``L`` and kernel ``K``, the queries ``[w K, w K + K)`` of block ``w`` all attend to the
keys of that same block. The only exception is a last, partial block (``L % K = r != 0``): its ``r``
queries have the leader ``min(wK + K//2, L - 1)`` and so the window ``[L - K, L)`` (the last ``K`` keys,
which overlap the block before). So each axis splits into ``ceil(L / K)`` query blocks of ``K`` (the last
padded with zero queries whose results are dropped) and as many key blocks of ``K``, the last one gathered
from ``[L - K, L)``; a multi-dimensional window is the product of the per-axis blocks.

Attention inside a window is then a dense ``[Kq, Kk]`` score block (``Kq = Kk = prod(K)``): one batched
matmul for the scores (kept as ``[Kk, Kq]``), the bias / decay tables read at each pair's key-minus-query
offset (the same index as the reference, ``(j - i) + K - 1``, which depends only on the position in the
block, plus a shift in a last partial block), softmax or sigmoid, one batched matmul with the values.
Nothing is computed for keys outside a window, where the generic tiled path scores a halo of ``T + K - 1``
keys per axis for a tile of ``T`` queries (for a ``(1, 7)`` row window: 7 of 112 scored keys used). Forward and backward are those
dense ops under autograd, which differentiates them exactly; the score block is kept for backward, so a
window of more than :data:`MAX_WINDOW` tokens goes to the tiled path, which keeps only the log-sum-exp.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from visionattn.kernels.semantics import NAParams

__all__ = ["MAX_WINDOW", "windowed_applies", "windowed_forward"]

# tokens per window (prod(kernel_size)) up to which the blocked path is used: its backward keeps the
# [windows, Kq, Kk] probabilities, which beyond this grows past what the tiled path's recomputation costs
MAX_WINDOW = 1024


def windowed_applies(params: NAParams) -> bool:
    """True when every neighborhood is a block: ``stride == kernel_size`` and dilation 1 on every axis, no
    causal axis, and a window of at most :data:`MAX_WINDOW` tokens."""
    return (
        tuple(params.stride) == tuple(params.kernel_size)
        and all([d == 1 for d in params.dilation])  # noqa: C419 (a list: torch.compile traces it)
        and not any(params.is_causal)
        and math.prod(params.kernel_size) <= MAX_WINDOW
    )


_tables: dict = {}


def _axis_key_index(L: int, K: int) -> torch.Tensor | None:
    """Key indices of the ``ceil(L / K)`` key blocks laid end to end, or None when ``K`` divides ``L``."""
    if L % K == 0:
        return None
    full = (L // K) * K
    return torch.cat([torch.arange(full), torch.arange(L - K, L)])


def _axis_offsets(L: int, K: int) -> torch.Tensor:
    """``[blocks, K, K]`` (``[1, K, K]`` when ``K`` divides ``L``): the bias index ``key - query + K - 1`` of
    query ``i`` and key ``j`` of each block; padded queries of a last partial block are clamped into range
    (their results are dropped)."""
    blocks = -(-L // K)
    local = torch.arange(K)
    rel = local[None, :] - local[:, None] + K - 1  # [K(query), K(key)]
    if L % K == 0:
        return rel[None]
    shift = torch.zeros(blocks, dtype=torch.long)
    shift[-1] = (L - K) - (blocks - 1) * K  # the last key block starts at L - K, not at its queries
    return (rel[None] + shift[:, None, None]).clamp(0, 2 * K - 2)


def _build_tables(spatial: tuple[int, ...], kernel_size: tuple[int, ...], device) -> tuple:
    n = len(spatial)
    index = None
    for a in range(n):
        rel = _axis_offsets(spatial[a], kernel_size[a])
        shape = [1] * (3 * n)
        shape[a], shape[n + a], shape[2 * n + a] = rel.shape
        table_stride = math.prod([2 * k - 1 for k in kernel_size[a + 1:]])
        term = rel.view(shape) * table_stride
        index = term if index is None else index + term
    window = math.prod(kernel_size)
    index = index.reshape(*index.shape[:n], window, window).to(device)
    key_index = []
    for L, K in zip(spatial, kernel_size):
        idx = _axis_key_index(L, K)
        key_index.append(None if idx is None else idx.to(device))
    return key_index, index


def _tables_for(spatial: tuple[int, ...], kernel_size: tuple[int, ...], device) -> tuple:
    """Per problem shape (cached per device): the per-axis key gather indices (None where ``K`` divides
    ``L``) and the flat bias index ``[W'_0, .., W'_{n-1}, Kq, Kk]`` into ``table.reshape(heads, -1)``
    (``W'_a`` is the number of blocks on axes with a partial block, 1 elsewhere). Under ``torch.compile``
    they are built in the graph (constants there) and not cached."""
    if torch.compiler.is_compiling():
        return _build_tables(spatial, kernel_size, device)
    key = (spatial, kernel_size, str(device))
    hit = _tables.get(key)
    if hit is None:
        if len(_tables) > 256:
            _tables.clear()
        hit = _tables[key] = _build_tables(spatial, kernel_size, device)
    return hit


def _to_blocks(x: torch.Tensor, kernel_size: tuple[int, ...]) -> torch.Tensor:
    """``[B, nw_0 K_0, .., heads, D] -> [B, nw_0, .., nw_{n-1}, heads, prod(K), D]``."""
    B, *padded, h, D = x.shape
    n = len(kernel_size)
    blocks = [L // K for L, K in zip(padded, kernel_size)]
    split = [B]
    for nw, K in zip(blocks, kernel_size):
        split += [nw, K]
    x = x.reshape(*split, h, D)
    perm = [0, *(1 + 2 * a for a in range(n)), 1 + 2 * n, *(2 + 2 * a for a in range(n)), 2 + 2 * n]
    return x.permute(perm).reshape(B, *blocks, h, math.prod(kernel_size), D)


def _from_blocks(x: torch.Tensor, kernel_size: tuple[int, ...], spatial: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`_to_blocks` for ``[B, nw.., heads, prod(K), *rest]`` (rest: ``D`` or nothing), cut
    back to ``spatial``: ``[B, *spatial, heads, *rest]``."""
    n = len(kernel_size)
    B, *blocks = x.shape[:1 + n]
    h = x.shape[1 + n]
    rest = list(x.shape[3 + n:])
    x = x.reshape(B, *blocks, h, *kernel_size, *rest)
    perm = [0]
    for a in range(n):
        perm += [1 + a, 2 + n + a]
    perm += [1 + n, *range(2 + 2 * n, x.dim())]
    x = x.permute(perm).reshape(B, *(nw * K for nw, K in zip(blocks, kernel_size)), h, *rest)
    if any([nw * K != L for nw, K, L in zip(blocks, kernel_size, spatial)]):  # noqa: C419 (as above)
        x = x[(slice(None), *(slice(0, L) for L in spatial))].contiguous()
    return x


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: the two backward products of the value
    matmul take it, and ``bmm`` on CPU falls back to one small product per window for operands with other
    strides (an expanded gradient such as that of ``out.sum()`` is 20 times slower)."""

    @staticmethod
    def forward(x):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def _read_table(table: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """``table [heads, 2K_0-1, ..]`` at ``index [W'.., Kq, Kk]`` -> ``[W'.., heads, Kq, Kk]``."""
    return table.reshape(table.shape[0], -1)[:, index].movedim(0, n)


def windowed_forward(q, k, v, rpb, decay, params: NAParams, return_lse: bool = False):
    """Blocked neighborhood attention (:func:`windowed_applies` must hold) by dense window batches;
    differentiable by autograd in ``q``, ``k``, ``v`` and ``rpb`` (``decay`` is a constant).

    Returns ``(out [B, *spatial, heads, Dv], lse [B, *spatial, heads] or None)``: ``lse`` (softmax only,
    when ``return_lse``) in fp32, or fp64 for fp64 inputs, as the other backends return it.
    """
    spatial = tuple(q.shape[1:-2])
    n = len(spatial)
    ks = tuple(params.kernel_size)
    key_index, bias_index = _tables_for(spatial, ks, q.device)
    pad = []  # F.pad order: last spatial axis first, after (heads, D)
    for L, K in zip(reversed(spatial), reversed(ks)):
        pad += [0, -L % K]
    if any(pad):
        q = F.pad(q, [0, 0, 0, 0, *pad])
    for a, idx in enumerate(key_index):
        if idx is not None:
            k = k.index_select(1 + a, idx)
            v = v.index_select(1 + a, idx)
    qb, kb, vb = _to_blocks(q, ks), _to_blocks(k, ks), _to_blocks(v, ks)

    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    # scores transposed, [B, nw.., heads, Kk, Kq]: the window's keys on the second-last axis, so that the
    # softmax reduces across rows with the queries contiguous (a softmax along a short last axis is several
    # times slower on CPU); the value product reads the transpose as it is
    blocks_shape = kb.shape[:-1] + (kb.shape[-2],)  # [B, nw.., heads, Kk, Kq]
    qb, kb, vb = qb.flatten(0, -3), kb.flatten(0, -3), vb.flatten(0, -3)  # [windows * heads, K, D]: 3-D bmm
    scores = torch.bmm(kb, qb.transpose(1, 2)).view(blocks_shape).to(compute) * params.scale
    index_t = bias_index.transpose(-1, -2)
    if rpb is not None:
        scores = scores + _read_table(rpb, index_t, n).to(compute)
    lse = None
    if params.score == "softmax":
        if return_lse:
            lse = torch.logsumexp(scores, dim=-2)
        weights = torch.softmax(scores, dim=-2)
    else:
        weights = torch.sigmoid(scores)
        if decay is not None:
            weights = weights * _read_table(decay, index_t, n).to(compute)
    out = _contiguous_grad(torch.bmm(weights.to(vb.dtype).flatten(0, -3).transpose(1, 2), vb))
    out = out.view(*blocks_shape[:-1], vb.shape[-1])  # [B, nw.., heads, Kq, Dv]
    out = _from_blocks(out, ks, spatial)
    if lse is not None:
        lse = _from_blocks(lse, ks, spatial)
    return out, lse
