"""Top-K sparse attention: each query attends to the ``K`` keys with the largest scores only.

For every query row the scaled scores ``q . k / sqrt(D)`` are ranked, all but the ``K`` largest are dropped
and the softmax runs over the ``K`` kept scores; the output is their weighted sum of values. This is the
aggregation of DFIR-DETR's dynamic K-sparse attention (DKSA, ``visionattn.detectors.dfir_detr``).

``topk_attention(query, key, value, top_k, *, mix=None, scale=None, chunk_size=None, backend='auto')``
has three implementations with the same semantics, chosen by ``backend`` (the vocabulary of
:mod:`visionattn.kernels.backends`):

- ``'torch'`` processes the queries in chunks. Per chunk it forms the ``[chunk, Nk]`` scores,
  finds each row's ``K``-th largest score with a partial sort, drops the scores below it, takes the
  softmax over the ``K`` kept scores (zero elsewhere) and multiplies ``V``. A custom autograd function
  saves only its inputs and recomputes each chunk's weights in the backward pass, so forward *and*
  backward memory is bounded by the chunk, never ``N x N``. Several ``K`` may share one ranking
  (``top_k`` a sequence): their weight maps are mixed per batch element (``mix``) before one product with
  ``V``, so a mixture of ``R`` sparsity levels costs one attention, not ``R`` (DKSA's input-adaptive
  choice of ``K``).
- ``'triton'`` (:mod:`.triton_topk`) does the same per block of queries in one kernel, forward and
  backward, finding each ``K``-th largest score by an exact radix select on the scores' bits; up to
  ``TRITON_MAX_KEYS`` keys.
- ``'reference'`` (and :func:`topk_attention_reference`, for one ``K``) forms the full score matrix, masks
  all but the top ``K`` to ``-inf`` and lets autograd differentiate it: the test oracle, small inputs only.

Aggregating with masked dense weights (a ``[chunk, Nk] @ [Nk, Dv]`` product whose dropped entries are
zero) rather than gathering the ``K`` value rows is a deliberate choice: DKSA keeps 1/2 to 4/5 of the keys,
and a gathered ``[chunk, K, Dv]`` copy of ``V`` would be ``Dv`` times larger than the weights.

Ties: when several keys share the ``K``-th largest score, the keys with the **lower index** are kept, so
exactly ``K`` keys are always kept and the result is deterministic (in ``'torch'`` and ``'triton'``, a
threshold plus a running count of the tied keys; in the reference, a stable descending sort).
Layout is heads-last, as the other kernels: ``query [B, Nq, heads, D]``, ``key [B, Nk, heads, D]``,
``value [B, Nk, heads, Dv]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from visionattn.kernels.backends import check_backend, resolve_backend

__all__ = ["topk_attention", "topk_attention_reference", "topk_keep_mask"]

# per chunk, at most this many scores (batch x heads x chunk x Nk) are held at once
DEFAULT_CHUNK_SCORES = 1 << 22
# the Triton kernel keeps a query block's whole score row in registers: at most this many keys
TRITON_MAX_KEYS = 4096


def _check_args(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, top_ks: Sequence[int],
                scale: float | None = None, fn: str = "topk_attention") -> None:
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"{fn}: query, key and value must be [B, N, heads, D], got shapes "
            f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    if query.shape[0] != key.shape[0] or query.shape[2] != key.shape[2] or query.shape[3] != key.shape[3]:
        raise ValueError(
            f"{fn}: query {tuple(query.shape)} and key {tuple(key.shape)} must agree in batch, heads and head dim"
        )
    if key.shape[:3] != value.shape[:3]:
        raise ValueError(
            f"{fn}: key {tuple(key.shape)} and value {tuple(value.shape)} must agree in batch, length and heads"
        )
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty (shape {tuple(t.shape)})")
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"{fn}: query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    if not query.is_floating_point():
        raise ValueError(f"{fn}: query must be a floating-point tensor, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"{fn}: query, key and value are on different devices")
    num_keys = key.shape[1]
    if not top_ks:
        raise ValueError(f"{fn}: top_k must be an int or a non-empty sequence of ints")
    for k in top_ks:
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_keys:
            raise ValueError(f"{fn}: top_k must be integers in [1, {num_keys}] (the key count), got {k!r}")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"{fn}: scale must be a finite number or None, got {scale!r}")


def _threshold_keep_mask(scores: torch.Tensor, threshold: torch.Tensor, runner_up: torch.Tensor | None,
                         top_k: int) -> torch.Tensor:
    """The ``top_k`` largest entries along the last axis of ``scores [..., Nk]``, given per row the
    ``top_k``-th largest value ``threshold`` and the next one, ``runner_up`` (both ``[..., 1]``; None when
    ``top_k == Nk``). Where the two are equal (a tie across the cut), the tied entries are kept in index
    order until ``top_k`` are kept; only those rows pay for the running count."""
    keep = scores >= threshold
    if runner_up is None:
        return keep
    ambiguous = (runner_up == threshold).flatten()
    if bool(ambiguous.any()):
        num_keys = scores.shape[-1]
        rows, row_threshold = scores.reshape(-1, num_keys)[ambiguous], threshold.reshape(-1, 1)[ambiguous]
        above, tied = rows > row_threshold, rows == row_threshold
        places_left = top_k - above.sum(-1, keepdim=True)
        keep.view(-1, num_keys)[ambiguous] = above | (tied & (tied.cumsum(-1) <= places_left))
    return keep


def _chunk_terms(q_chunk: torch.Tensor, key: torch.Tensor, top_ks: Sequence[int], scale: float):
    """One query chunk's softmax terms: ``exp(s - max s)`` ``[B, H, chunk, Nk]`` and, per ``K``, the kept
    mask (bool, same shape) and the normaliser ``[B, H, chunk, 1]``, so that the top-``K`` weights are
    ``where(mask, exp_scores, 0) / normaliser``. ``q_chunk [B, H, chunk, D]``, ``key [B, H, Nk, D]``.

    The ``K``-th largest score is the ``(Nk - K + 1)``-th smallest: one partial sort of the smallest
    ``Nk - min(K) + 1`` scores gives every threshold and its runner-up (cheaper than sorting whole rows for
    large ``K``), and the row maximum, which every top-``K`` keeps, stabilises one shared exponential.
    """
    scores = torch.matmul(q_chunk, key.transpose(-1, -2)) * scale
    num_keys = scores.shape[-1]
    smallest = torch.topk(scores, num_keys - min(top_ks) + 1, dim=-1, largest=False, sorted=True).values
    exp_scores = torch.exp(scores - scores.amax(-1, keepdim=True))
    kept = []
    for k in top_ks:
        at = num_keys - k  # index of the K-th largest among the smallest values
        runner_up = smallest[..., at - 1:at] if at > 0 else None
        mask = _threshold_keep_mask(scores, smallest[..., at:at + 1], runner_up, k)
        kept.append((mask, torch.where(mask, exp_scores, 0).sum(-1, keepdim=True)))
    return exp_scores, kept


def _chunk_bounds(batch_heads: int, num_queries: int, num_keys: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_SCORES // max(1, batch_heads * num_keys))
    if chunk_size < 1:
        raise ValueError(f"topk_attention: chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, num_queries)) for s in range(0, num_queries, chunk_size)]


class _TopKAttention(torch.autograd.Function):
    """Chunked, mixed top-K attention over heads-first tensors: ``out = (sum_r mix[:, r] P_r) V`` with
    ``P_r`` the top-``K_r`` softmax weights. Backward recomputes each chunk's weights."""

    @staticmethod
    def forward(ctx, q, k, v, mix, top_ks: tuple[int, ...], scale: float, chunk_size: int | None):
        B, H, Nq, _ = q.shape
        mix_b = mix.view(B, 1, 1, 1, -1)
        out = q.new_empty(B, H, Nq, v.shape[-1])
        bounds = _chunk_bounds(B * H, Nq, k.shape[2], chunk_size)
        for start, end in bounds:
            exp_scores, kept = _chunk_terms(q[:, :, start:end], k, top_ks, scale)
            # sum_r mix_r P_r = exp_scores * sum_r (mix_r / Z_r) mask_r
            coeff = sum(torch.where(mask, mix_b[..., r] / norm, 0) for r, (mask, norm) in enumerate(kept))
            out[:, :, start:end] = torch.matmul(exp_scores * coeff, v)
        ctx.save_for_backward(q, k, v, mix)
        ctx.top_ks, ctx.scale, ctx.bounds = top_ks, scale, bounds
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mix = ctx.saved_tensors
        mix_b = mix.view(mix.shape[0], 1, 1, 1, -1)
        dq, dk, dv, dmix = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), torch.zeros_like(mix)
        for start, end in ctx.bounds:
            q_chunk, dout_chunk = q[:, :, start:end], dout[:, :, start:end]
            exp_scores, kept = _chunk_terms(q_chunk, k, ctx.top_ks, ctx.scale)
            d_weights = torch.matmul(dout_chunk, v.transpose(-1, -2))  # dL/d(mixed weights), [B, H, c, Nk]
            exp_d_weights = exp_scores * d_weights
            coeff = torch.zeros_like(exp_scores)
            correction = torch.zeros_like(exp_scores)
            for r, (mask, norm) in enumerate(kept):
                # softmax backward of P_r = exp * mask / Z_r: P_r * (dW - <P_r, dW>); zero off the mask
                row_dot = torch.where(mask, exp_d_weights, 0).sum(-1, keepdim=True) / norm  # <P_r, dW> per row
                dmix[:, r] += row_dot.sum((1, 2, 3))
                coeff += torch.where(mask, mix_b[..., r] / norm, 0)
                correction += torch.where(mask, mix_b[..., r] * row_dot / norm, 0)
            dv += torch.matmul((exp_scores * coeff).transpose(-1, -2), dout_chunk)
            d_scores = (exp_d_weights * coeff - exp_scores * correction) * ctx.scale
            dq[:, :, start:end] = torch.matmul(d_scores, k)
            dk += torch.matmul(d_scores.transpose(-1, -2), q_chunk)
        return dq, dk, dv, dmix, None, None, None


def topk_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    top_k: int | Sequence[int],
    *,
    mix: torch.Tensor | None = None,
    scale: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Top-K sparse softmax attention, forward and backward without ``N x N`` memory.

    Positional: ``query, key, value, top_k``; everything else is keyword-only.

    Args:
        query: ``[B, Nq, heads, D]``; key: ``[B, Nk, heads, D]``; value: ``[B, Nk, heads, Dv]``.
        top_k: keys kept per query, ``1 <= K <= Nk``; or a sequence of ``R`` such ``K`` sharing one ranking,
            whose attention maps are mixed by ``mix`` before the single product with ``V``.
        mix: ``[B, R]`` weights of the ``R`` maps per batch element (differentiable); the mean when omitted.
            Only with a sequence ``top_k``.
        scale: score scale; ``D ** -0.5`` by default.
        chunk_size: queries per chunk of the ``'torch'`` backend; by default as many as keep a chunk's
            scores under ``DEFAULT_CHUNK_SCORES`` elements.
        backend: ``'auto'``, ``'reference'`` (dense masked scores, autograd), ``'torch'`` (chunked, the
            default off-GPU) or ``'triton'`` (fused kernel, up to ``TRITON_MAX_KEYS`` (4096)
            keys; ``'auto'`` uses it for CUDA tensors within that limit). See :mod:`visionattn.kernels.backends`.
    Returns:
        ``[B, Nq, heads, Dv]``: ``sum_r mix[:, r] * softmax_topK_r(q k^T * scale) V``. Ties at the ``K``-th
        score keep the lower key index (see the module docstring).
    """
    check_backend("topk_attention", backend)
    single = isinstance(top_k, int) or not isinstance(top_k, Sequence)
    top_ks = (top_k,) if single else tuple(top_k)
    _check_args(query, key, value, top_ks, scale)
    B = query.shape[0]
    if mix is None:
        mix = query.new_full((B, len(top_ks)), 1.0 / len(top_ks))
    elif single:
        raise ValueError("topk_attention: mix needs a sequence of top_k values")
    elif not isinstance(mix, torch.Tensor) or tuple(mix.shape) != (B, len(top_ks)):
        got = tuple(mix.shape) if isinstance(mix, torch.Tensor) else type(mix).__name__
        raise ValueError(f"topk_attention: mix must be [B, len(top_k)] = {(B, len(top_ks))}, got {got}")
    elif not mix.is_floating_point() or mix.device != query.device:
        raise ValueError(f"topk_attention: mix must be a floating-point tensor on {query.device}, "
                         f"got {mix.dtype} on {mix.device}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"topk_attention: chunk_size must be an int >= 1 or None, got {chunk_size!r}")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = _resolve_topk_backend(backend, query, key.shape[1])
    mix = mix.to(query.dtype)
    if backend == "reference":
        return sum(mix[:, r, None, None, None] * _dense_topk(query, key, value, k, scale) for r, k in enumerate(top_ks))
    q, k, v = (t.transpose(1, 2).contiguous() for t in (query, key, value))
    if backend == "triton":
        from visionattn.kernels.triton_topk import triton_topk_attention

        out = triton_topk_attention(q, k, v, mix.contiguous(), top_ks, scale)
    else:
        out = _TopKAttention.apply(q, k, v, mix.contiguous(), top_ks, scale, chunk_size)
    return out.transpose(1, 2)


def _resolve_topk_backend(backend: str, query: torch.Tensor, num_keys: int) -> str:
    """The vocabulary's resolution plus the Triton kernel's key limit (it holds each query's whole score
    row on chip): ``'auto'`` takes ``'torch'`` beyond ``TRITON_MAX_KEYS``, an explicit ``'triton'`` is refused."""
    if backend == "auto" and num_keys > TRITON_MAX_KEYS:
        return "torch"
    resolved = resolve_backend("topk_attention", backend, query)
    if resolved == "triton" and num_keys > TRITON_MAX_KEYS:
        raise ValueError(f"topk_attention: backend 'triton' handles up to {TRITON_MAX_KEYS} keys, got {num_keys}; "
                         "use 'torch' (chunked, any length) or 'auto'")
    return resolved


def topk_keep_mask(scores: torch.Tensor, top_k: int) -> torch.Tensor:
    """Boolean mask of the ``top_k`` largest entries along the last axis, ties won by the lower index: the
    first ``top_k`` positions of a stable descending sort (the reference's rule, written independently of
    the threshold rule :func:`topk_attention` uses)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order[..., :top_k], True)


def _dense_topk(query, key, value, top_k: int, scale: float) -> torch.Tensor:
    scores = torch.einsum("bqhd,bkhd->bhqk", query, key) * scale
    keep = topk_keep_mask(scores.detach(), top_k)
    weights = torch.softmax(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return torch.einsum("bhqk,bkhd->bqhd", weights, value)


def topk_attention_reference(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, top_k: int, *, scale: float | None = None
) -> torch.Tensor:
    """Dense top-K attention, the oracle for :func:`topk_attention`: full ``[Nq, Nk]`` scores per head,
    all but the top ``K`` per row set to ``-inf``, softmax, times ``V``. Same shapes and tie rule; one
    ``top_k`` (``topk_attention(..., backend='reference')`` mixes several)."""
    _check_args(query, key, value, (top_k,), scale, fn="topk_attention_reference")
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return _dense_topk(query, key, value, top_k, scale)
