"""Top-K sparse attention: each query attends to the ``K`` keys with the largest scores only.

For every query row the scaled scores ``q . k / sqrt(D)`` are ranked, all but the ``K`` largest are dropped
and the softmax runs over the ``K`` kept scores; the output is their weighted sum of values. This is the
aggregation of DFIR-DETR's dynamic K-sparse attention (DKSA, ``visionattn.detectors.dfir_detr``).

``topk_attention(query, key, value, top_k, *, mix=None, scale=None, chunk_size=None, backend='auto')``
has three implementations with the same semantics, chosen by ``backend`` (the vocabulary of
:mod:`visionattn.kernels.backends`):

- ``'torch'`` processes the queries in chunks. Per chunk it forms the ``[chunk, Nk]`` scores, finds each
  row's ``K``-th largest score by a selection (numpy's introselect on CPU), drops the scores below it, takes
  the softmax over the ``K`` kept scores (zero elsewhere) and multiplies ``V``. Several ``K`` may share one
  ranking (``top_k`` a sequence): their weight maps are mixed per batch element (``mix``) before one
  product with ``V``, so a mixture of ``R`` sparsity levels costs one attention, not ``R`` (DKSA's
  input-adaptive choice of ``K``). The top-``K`` sets of a row are nested, so a key's mixed weight is
  ``exp(s - max)`` times a coefficient that depends only on how many of the sets hold it: the kept sets,
  normalisers and weights take a few passes over the scores for any ``R`` (comparisons against the
  thresholds, one scatter-add and one gather; on CPU fused by ``torch.compile`` into one loop per row, see
  "fused CPU passes" below). A custom autograd function saves its inputs and, per query, the ``R``
  thresholds, tie flags and normalisers and the row maximum; the backward recomputes each chunk's scores
  and sets from them without sorting again, so forward *and* backward memory is bounded by the chunk, never
  ``N x N``.
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
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from visionattn.kernels.backends import check_backend, resolve_backend
from visionattn.kernels.compiled import run_compiled

__all__ = ["topk_attention", "topk_attention_reference", "topk_keep_mask"]

# per chunk, at most this many scores (batch x heads x chunk x Nk) are held at once
DEFAULT_CHUNK_SCORES = 1 << 20
LOG2E = 1.0 / math.log(2.0)
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


def _keep_mask(scores: torch.Tensor, threshold: torch.Tensor, ambiguous: torch.Tensor, top_k: int,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """The ``top_k`` largest entries along the last axis of ``scores [..., Nk]``, given per row the ``top_k``-th
    largest value ``threshold [..., 1]`` and whether the cut splits a run of equal values, ``ambiguous [...]``
    (the next value equals the threshold). Then the tied entries are kept in index order until ``top_k`` are
    kept; only those rows pay for the running count. ``out``: a bool tensor to write the mask into."""
    keep = torch.ge(scores, threshold, out=out)
    rows = ambiguous.reshape(-1)
    if bool(rows.any()):
        num_keys = scores.shape[-1]
        tied_rows, row_threshold = scores.reshape(-1, num_keys)[rows], threshold.reshape(-1, 1)[rows]
        above, tied = tied_rows > row_threshold, tied_rows == row_threshold
        places_left = top_k - above.sum(-1, keepdim=True)
        keep.view(-1, num_keys)[rows] = above | (tied & (tied.cumsum(-1) <= places_left))
    return keep


def _threshold_keep_mask(scores: torch.Tensor, threshold: torch.Tensor, runner_up: torch.Tensor | None,
                         top_k: int) -> torch.Tensor:
    """:func:`_keep_mask` given the ``top_k``-th largest value and the next one, ``runner_up`` (both ``[..., 1]``;
    None when ``top_k == Nk``): the cut is ambiguous where the two are equal."""
    if runner_up is None:
        return scores >= threshold
    return _keep_mask(scores, threshold, (runner_up == threshold)[..., 0], top_k)


def _thresholds(scores: torch.Tensor, top_ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of ``scores [..., Nk]`` and per ``K`` in ``top_ks``: the ``K``-th largest score ``[..., R]`` and
    whether the cut there is ambiguous (the ``K + 1``-th equals it) ``[..., R]``. On CPU (float32/64) by
    :func:`_select_on_cpu`; elsewhere one partial sort serves every ``K``: of the smallest ``Nk - min(K) + 1``
    scores when every ``K`` keeps at least half the keys (DKSA's), else of the largest ``max(K) + 1``."""
    num_keys = scores.shape[-1]
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        return _select_on_cpu(scores, top_ks)
    if 2 * min(top_ks) >= num_keys:
        values = torch.topk(scores, num_keys - min(top_ks) + 1, dim=-1, largest=False, sorted=True).values
        at = [num_keys - k for k in top_ks]  # the K-th largest is the (Nk - K + 1)-th smallest
        nxt = [a - 1 for a in at]
    else:
        values = torch.topk(scores, min(max(top_ks) + 1, num_keys), dim=-1, sorted=True).values
        at = [k - 1 for k in top_ks]
        nxt = [k for k in top_ks]
    threshold = values[..., at]
    ambiguous = torch.zeros_like(threshold, dtype=torch.bool)
    for r, (k, j) in enumerate(zip(top_ks, nxt)):
        if k < num_keys:
            ambiguous[..., r] = values[..., j] == threshold[..., r]
    return threshold, ambiguous


def _select_on_cpu(scores: torch.Tensor, top_ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_thresholds` by numpy's introselect (:func:`_select_rows`), about four times faster than
    ``torch.topk``, which sorts what it selects. numpy is single-threaded: with several torch threads the rows
    are split among as many worker threads (the selection releases the GIL)."""
    num_keys = scores.shape[-1]
    rows = scores.detach().reshape(-1, num_keys).numpy()
    workers = min(torch.get_num_threads(), len(rows) // 64)
    if workers > 1:
        parts = _selection_pool(workers).map(lambda part: _select_rows(part, top_ks), np.array_split(rows, workers))
        threshold, ambiguous = (np.concatenate(x) for x in zip(*parts))
    else:
        threshold, ambiguous = _select_rows(rows, top_ks)
    shape = (*scores.shape[:-1], len(top_ks))
    return torch.from_numpy(threshold).view(shape), torch.from_numpy(ambiguous).view(shape)


def _select_rows(rows: np.ndarray, top_ks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """``rows [n, Nk]`` -> the ``K``-th largest value ``[n, R]`` and the tie flag ``[n, R]``. In ascending
    order the ``K``-th largest sits at index ``Nk - K``: one partition per distinct ``K``, largest index first,
    each of the part left of the previous cut only; the runner-up is the maximum left of the cut. (One
    ``np.partition`` call with all the indices is twice as slow.)"""
    num_keys = rows.shape[-1]
    kth, runner_up = {}, {}
    work, end = None, num_keys
    for at in sorted({num_keys - k for k in top_ks}, reverse=True):
        if work is None:
            work = np.partition(rows, at, axis=-1)
        else:
            work[:, :end].partition(at, axis=-1)  # in place; columns at and right of the earlier cuts stay
        kth[at] = work[:, at].copy()
        if at > 0:
            runner_up[at] = work[:, :at].max(axis=-1)
        end = at
    at_of = [num_keys - k for k in top_ks]
    threshold = np.stack([kth[a] for a in at_of], axis=-1)
    ambiguous = np.stack([runner_up[a] == kth[a] if a > 0 else np.zeros(len(rows), dtype=bool) for a in at_of],
                         axis=-1)
    return threshold, ambiguous


_POOL: tuple[int, int, ThreadPoolExecutor] | None = None  # (process id, workers, pool)


def _selection_pool(workers: int) -> ThreadPoolExecutor:
    """A thread pool of ``workers`` threads, rebuilt after a fork (a forked child has none of the threads)."""
    global _POOL
    if _POOL is None or _POOL[0] != os.getpid() or _POOL[1] != workers:
        if _POOL is not None and _POOL[0] == os.getpid():
            _POOL[2].shutdown(wait=False)
        _POOL = (os.getpid(), workers, ThreadPoolExecutor(workers, thread_name_prefix="topk-select"))
    return _POOL[2]


def _buckets(scores: torch.Tensor, threshold: torch.Tensor, ambiguous: torch.Tensor,
             top_ks: Sequence[int]) -> torch.Tensor:
    """How many of the top-``K`` sets each key is in, ``[..., Nk]`` (int64): the sets are nested, so a key in
    ``b`` of them is in those of the ``b`` largest ``K``."""
    count = torch.zeros(scores.shape, dtype=torch.uint8, device=scores.device)  # (R < 256)
    keep = torch.empty(scores.shape, dtype=torch.bool, device=scores.device)
    for r, k in enumerate(top_ks):
        count += _keep_mask(scores, threshold[..., r:r + 1], ambiguous[..., r], k, out=keep)
    return count.long()  # the index type of gather and scatter_add


def _per_set(per_bucket: torch.Tensor) -> torch.Tensor:
    """Sums per bucket ``[..., R + 1]`` (keys in exactly ``b`` of the nested sets) -> sums per set ``[..., R]``
    (``K`` ascending; set ``i`` holds the keys in at least ``R - i`` sets)."""
    return per_bucket.flip(-1).cumsum(-1)[..., :-1]


def _log2_scores(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The scores in base 2, ``(q k^T) * (scale * log2(e))`` ``[..., Nq, Nk]``: one pass over the product for
    both factors, and ``exp2(s2 - max s2) = exp(s - max s)`` needs no pass to change base (``exp2`` is also
    several times faster than ``exp`` on CPU, with no slow path below the normal range). The factor is applied
    to the product, not to ``q``: equal scores stay exactly equal, so ties are those of ``q k^T``."""
    return torch.matmul(q, k.transpose(-1, -2)).mul_(scale * LOG2E)


def _suffix_sums(x: torch.Tensor) -> torch.Tensor:
    """``x [..., R]`` (per set, ``K`` ascending) -> ``[..., R + 1]``: entry ``b`` sums the last ``b`` sets, the
    sets a key in ``b`` of them belongs to (entry 0 is 0)."""
    return torch.cat([torch.zeros_like(x[..., :1]), x.flip(-1).cumsum(-1)], -1)


# ---------------------------------------------------------------------------------------------------------
# fused CPU passes
#
# Given a chunk's scores and its R thresholds, everything up to the product with V is elementwise work plus a
# few row reductions: in eager PyTorch that is about ten passes over the [rows, Nk] scores (comparisons, a
# uint8 count, a scatter-add, exp2, a gather and a multiply). torch.compile's C++ backend fuses each group of
# them into one loop over a row; measured on one [648, 1600] chunk, one thread: 1.0 ms against 4.3 ms. The
# passes are compiled on first use, for a dynamic number of rows (one compilation per key count and R). A
# chunk's rows all go through them; the few rows whose cut splits tied scores (and, in the backward, rows
# whose recomputed scores no longer cut K keys) are then redone by the eager passes, which resolve ties and
# rank afresh (297 of about 63,000 rows in three forwards of DFIR-DETR at 640, random init). Without a working C++
# compiler, or with VISIONATTN_TOPK_COMPILE=0 in the environment, the eager passes run instead; both give
# the same sets, normalisers and weights (up to float summation order).


def _set_sums(s2: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``s2 [rows, Nk]`` base-2 scores, ``t [rows, R]`` thresholds -> the row maximum ``[rows, 1]`` and
    ``Z [rows, R]``: ``exp2(s2 - max)`` summed over each set (the keys scoring at least its threshold)."""
    m = s2.amax(-1, keepdim=True)
    e = torch.exp2(s2 - m)
    return m, torch.stack([(e * (s2 >= t[:, r:r + 1])).sum(-1) for r in range(t.shape[1])], -1)


def _mixed_weights(s2: torch.Tensor, t: torch.Tensor, m: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The mixed weights ``exp2(s2 - m) * sum_r [s2 >= t_r] c_r`` ``[rows, Nk]``, ``c [rows, R]`` the sets'
    coefficients (``mix_r / Z_r``)."""
    coeff = (s2 >= t[:, :1]) * c[:, :1]
    for r in range(1, t.shape[1]):
        coeff = coeff + (s2 >= t[:, r:r + 1]) * c[:, r:r + 1]
    return torch.exp2(s2 - m) * coeff


def _backward_sums(s2: torch.Tensor, t: torch.Tensor, m: torch.Tensor, dw: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per set: ``e * dW`` summed over its keys, and how many keys it holds (both ``[rows, R]``), with
    ``e = exp2(s2 - m)`` and ``dW [rows, Nk]`` the gradient of the mixed weights."""
    e_dw = torch.exp2(s2 - m) * dw
    inside = [s2 >= t[:, r:r + 1] for r in range(t.shape[1])]
    return (torch.stack([(e_dw * x).sum(-1) for x in inside], -1),
            torch.stack([x.sum(-1) for x in inside], -1))


def _backward_grads(s2: torch.Tensor, t: torch.Tensor, m: torch.Tensor, dw: torch.Tensor, c: torch.Tensor,
                    cc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dS, P)`` ``[rows, Nk]``: the score gradient before the score scale, ``e (dW coeff - correction)``, and
    the mixed weights ``P = e coeff``, where ``coeff = sum_r [in set r] c_r`` and ``correction`` likewise with
    ``cc``. (The scale is applied to the small ``dS K`` and ``dS^T Q`` products instead: a float argument
    would be compiled in as a constant.)"""
    e = torch.exp2(s2 - m)
    coeff = (s2 >= t[:, :1]) * c[:, :1]
    correction = (s2 >= t[:, :1]) * cc[:, :1]
    for r in range(1, t.shape[1]):
        inside = s2 >= t[:, r:r + 1]
        coeff = coeff + inside * c[:, r:r + 1]
        correction = correction + inside * cc[:, r:r + 1]
    return e * (dw * coeff - correction), e * coeff


FUSED_PASSES = ("set_sums", "mixed_weights", "backward_sums", "backward_grads")
_FUSED: dict = {}  # name -> compiled function, or None: switched off, or a compilation failed (then all are)


def _run_fused(name: str, fn, *args):
    """``fn(*args)`` through its compiled version (rows dynamic) when there is one; None when it is
    unavailable: switched off, or the first failure to compile (e.g. no C++ compiler) is reported once and
    the eager passes are used from then on (:func:`visionattn.kernels.compiled.run_compiled`)."""
    for x in args:
        if isinstance(x, torch.Tensor) and x.dim() == 2:
            torch._dynamo.mark_dynamic(x, 0)
    return run_compiled(_FUSED, FUSED_PASSES, name, fn, args, env_var="VISIONATTN_TOPK_COMPILE",
                        what="topk_attention: the fused CPU passes", dynamic=False)


def _fusable(scores: torch.Tensor) -> bool:
    """Whether a chunk may take the fused passes: float32/64 scores on CPU (the compiled passes run under the
    autograd function, so no graph is recorded through them)."""
    return scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64)


def _set_totals(b: torch.Tensor, values: torch.Tensor, R: int) -> torch.Tensor:
    """``values [n, Nk]`` summed over each of the ``R`` nested sets ``[n, R]``, given each key's bucket ``b``."""
    return _per_set(values.new_zeros(values.shape[0], R + 1).scatter_add_(-1, b, values))


def _eager_weights(s2: torch.Tensor, t: torch.Tensor, amb: torch.Tensor, mix_rows: torch.Tensor,
                   ks: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager forward passes over rows ``s2 [n, Nk]`` (consumed) with thresholds and tie flags ``[n, R]``
    and the rows' mix ``[n, R]``: the row maximum ``[n, 1]``, the normalisers ``Z [n, R]`` and the mixed
    weights ``[n, Nk]``. Ties at a cut are resolved here (lower key index first)."""
    b = _buckets(s2, t, amb, ks)
    m = s2.amax(-1, keepdim=True)
    e = s2.sub_(m).exp2_()  # exp(s - max)
    z = _set_totals(b, e, len(ks))  # Z_i: e summed over set i
    return m, z, e.mul_(_suffix_sums(mix_rows / z).gather(-1, b))


def _eager_backward(s2: torch.Tensor, t: torch.Tensor, amb: torch.Tensor, m: torch.Tensor, z: torch.Tensor,
                    mix_rows: torch.Tensor, dw: torch.Tensor, ks: Sequence[int]
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The eager backward passes over rows ``s2 [n, Nk]`` (consumed), given the forward's thresholds, tie
    flags, row maximum and normalisers, the rows' mix and ``dW [n, Nk]``, the gradient of the mixed weights:
    ``(dS, P, <P_i, dW>)``, the score gradient before the scale ``[n, Nk]``, the mixed weights ``[n, Nk]`` and
    the per-set products ``[n, R]``. If the recomputed scores no longer cut ``K`` keys per set (a matmul that
    is not bitwise reproducible), the rows are ranked afresh, as the forward would have, and renormalised."""
    R = len(ks)
    b = _buckets(s2, t, amb, ks)
    kept = _set_totals(b, torch.ones_like(b), R)  # keys per set
    reranked = not bool((kept == torch.tensor(ks, device=kept.device)).all())
    if reranked:
        t, amb = _thresholds(s2, ks)
        b = _buckets(s2, t, amb, ks)
    e = s2.sub_(m).exp2_()
    if reranked:
        z = _set_totals(b, e, R)
    e_dw = e * dw
    row_dot = _set_totals(b, e_dw, R) / z
    coeff = _suffix_sums(mix_rows / z).gather(-1, b)
    correction = _suffix_sums(mix_rows * row_dot / z).gather(-1, b)
    # softmax backward of each P_i = e * [set i] / Z_i, mixed: e (coeff dW - sum_i mix_i <P_i, dW> / Z_i)
    return e_dw.mul_(coeff).sub_(correction.mul_(e)), e.mul_(coeff), row_dot


def _chunk_bounds(batch_heads: int, num_queries: int, num_keys: int, chunk_size: int | None) -> list[tuple[int, int]]:
    if chunk_size is None:
        chunk_size = max(1, DEFAULT_CHUNK_SCORES // max(1, batch_heads * num_keys))
    if chunk_size < 1:
        raise ValueError(f"topk_attention: chunk_size must be >= 1, got {chunk_size}")
    return [(s, min(s + chunk_size, num_queries)) for s in range(0, num_queries, chunk_size)]


class _TopKAttention(torch.autograd.Function):
    """Chunked, mixed top-K attention over heads-first tensors: ``out = (sum_r mix[:, r] P_r) V`` with ``P_r``
    the top-``K_r`` softmax weights.

    The top-``K`` sets of one row are nested, so a key's weight is ``e * coeff[b]``, with ``e = exp(s - max)``,
    ``b`` the number of sets the key is in and ``coeff[b] = sum of mix_r / Z_r`` over those sets: per chunk one
    partial sort (for the thresholds) and a handful of passes over the scores, then one dense product with
    ``V`` (DKSA keeps 1/2 to 4/5 of the keys: a gathered ``[chunk, K, Dv]`` copy of ``V`` would be ``Dv``
    times the size of the weights). The forward saves, per query, only the thresholds, the tie flags, the
    row maximum and the normalisers ``Z_r`` (``R`` numbers each); the backward recomputes the scores and the
    sets from them, without sorting again.

    On CPU a chunk's rows go through the fused passes, except the rows whose cut splits a run of tied scores
    (and, in the backward, rows whose recomputed scores no longer cut ``K`` keys): those few rows take the
    eager passes, which resolve ties and rank afresh."""

    @staticmethod
    def forward(ctx, q, k, v, mix, top_ks: tuple[int, ...], scale: float, chunk_size: int | None):
        B, H, Nq, _ = q.shape
        order = sorted(range(len(top_ks)), key=lambda r: top_ks[r])  # the sets' nesting order, K ascending
        ks = tuple(top_ks[r] for r in order)
        R, nk = len(ks), k.shape[2]
        mix_sorted = mix[:, order].view(B, 1, 1, -1)
        out = q.new_empty(B, H, Nq, v.shape[-1])
        threshold = q.new_empty(B, H, Nq, R)
        ambiguous = torch.empty(B, H, Nq, R, dtype=torch.bool, device=q.device)
        row_max = q.new_empty(B, H, Nq, 1)
        norm = q.new_empty(B, H, Nq, R)
        bounds = _chunk_bounds(B * H, Nq, nk, chunk_size)
        for start, end in bounds:
            scores = _log2_scores(q[:, :, start:end], k, scale)
            t, amb = _thresholds(scores, ks)
            threshold[:, :, start:end], ambiguous[:, :, start:end] = t, amb
            rows = scores.shape[:-1]  # the chunk's rows, flattened below to [n, Nk] / [n, R]
            s2, t2, amb2 = scores.view(-1, nk), t.reshape(-1, R), amb.reshape(-1, R)
            mix_rows = mix_sorted.expand(*rows, R).reshape(-1, R)
            fused = None
            if _fusable(scores):
                sums = _run_fused("set_sums", _set_sums, s2, t2)
                if sums is not None:
                    m, z = sums
                    weights = _run_fused("mixed_weights", _mixed_weights, s2, t2, m, mix_rows / z)
                    fused = None if weights is None else (m, z, weights)
            if fused is None:
                m, z, weights = _eager_weights(s2, t2, amb2, mix_rows, ks)
            else:
                m, z, weights = fused
                tied = amb2.any(-1).nonzero().squeeze(1)
                if len(tied):
                    m[tied], z[tied], weights[tied] = _eager_weights(s2[tied], t2[tied], amb2[tied],
                                                                     mix_rows[tied], ks)
            out[:, :, start:end] = torch.matmul(weights.view_as(scores), v)
            row_max[:, :, start:end], norm[:, :, start:end] = m.view(*rows, 1), z.view(*rows, R)
        ctx.save_for_backward(q, k, v, mix, threshold, ambiguous, row_max, norm)
        ctx.ks, ctx.order, ctx.scale, ctx.bounds = ks, order, scale, bounds
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, mix, threshold, ambiguous, row_max, norm = ctx.saved_tensors
        ks, order = ctx.ks, ctx.order
        B, R, nk = mix.shape[0], len(ks), k.shape[2]
        mix_sorted = mix[:, order].view(B, 1, 1, -1)
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dmix_sorted = mix.new_zeros(B, R)
        for start, end in ctx.bounds:
            q_chunk, dout_chunk = q[:, :, start:end], dout[:, :, start:end]
            scores = _log2_scores(q_chunk, k, ctx.scale)
            rows = scores.shape[:-1]
            s2 = scores.view(-1, nk)
            t2, amb2 = threshold[:, :, start:end].reshape(-1, R), ambiguous[:, :, start:end].reshape(-1, R)
            m2, z2 = row_max[:, :, start:end].reshape(-1, 1), norm[:, :, start:end].reshape(-1, R)
            mix_rows = mix_sorted.expand(*rows, R).reshape(-1, R)
            dw = torch.matmul(dout_chunk, v.transpose(-1, -2)).view(-1, nk)  # dL/d(mixed weights)
            fused = None
            if _fusable(scores):
                sums = _run_fused("backward_sums", _backward_sums, s2, t2, m2, dw)
                if sums is not None:
                    e_dw, kept = sums
                    row_dot = e_dw / z2  # <P_i, dW> per set
                    grads = _run_fused("backward_grads", _backward_grads, s2, t2, m2, dw, mix_rows / z2,
                                       mix_rows * row_dot / z2)
                    fused = None if grads is None else (*grads, row_dot, kept)
            if fused is None:
                d_scores, weights, row_dot = _eager_backward(s2, t2, amb2, m2, z2, mix_rows, dw, ks)
            else:
                d_scores, weights, row_dot, kept = fused
                redo = (amb2.any(-1) | (kept != torch.tensor(ks)).any(-1)).nonzero().squeeze(1)
                if len(redo):
                    d_scores[redo], weights[redo], row_dot[redo] = _eager_backward(
                        s2[redo], t2[redo], amb2[redo], m2[redo], z2[redo], mix_rows[redo], dw[redo], ks)
            d_scores, weights = d_scores.view_as(scores), weights.view_as(scores)
            dmix_sorted += row_dot.view(*rows, R).sum((1, 2))
            dv += torch.matmul(weights.transpose(-1, -2), dout_chunk)
            dq[:, :, start:end] = torch.matmul(d_scores, k).mul_(ctx.scale)
            dk += torch.matmul(d_scores.transpose(-1, -2), q_chunk).mul_(ctx.scale)
        dmix = torch.empty_like(dmix_sorted)
        dmix[:, order] = dmix_sorted
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
