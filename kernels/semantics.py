"""Neighborhood-attention window rules (exactly NATTEN's), argument checking and :class:`NAParams`.

Per axis of length ``L`` with kernel size ``K``, dilation ``d``, stride ``s`` and a causal flag, a query at
index ``i`` attends to keys ``j`` with ``j % d == i % d`` (same dilation group) whose group coordinate
``j // d`` lies in ``[start, end)``, computed in the group's own coordinates (group length
``Lg = L // d + (i % d < L % d)``, query position ``p = i // d``):

- non-causal: leader ``l = min((p // s) * s + s // 2, Lg - 1)``; ``start = clamp(l - K // 2, 0, Lg - K)``;
  ``end = start + K``. Windows slide inward at borders (nothing is padded) and every query sees ``K`` keys.
- causal: leader ``l = min((p // s) * s + s - 1, Lg - 1)``; ``start = max(l - K + 1, 0)``; ``end = p + 1``.
  Windows are truncated at the left border and always end at the query.

A multi-dimensional window is the Cartesian product of the per-axis windows. The relative positional
bias index per axis is ``(j // d - i // d) + K - 1`` in ``[0, 2K - 2]``: the window always contains the
query (for ``s <= K``), so offsets stay within ``[-(K - 1), K - 1]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import torch

from visionattn.kernels.backends import resolve_backend


def group_length(L: int, d: int, g: int) -> int:
    """Length of dilation group ``g`` on an axis of length ``L``."""
    return L // d + (1 if g < L % d else 0)


def window_bounds(p: int, Lg: int, K: int, s: int, causal: bool) -> tuple[int, int]:
    """``[start, end)`` of the window of group position ``p`` (group coordinates)."""
    if causal:
        leader = min((p // s) * s + s - 1, Lg - 1)
        return max(leader - K + 1, 0), p + 1
    leader = min((p // s) * s + s // 2, Lg - 1)
    start = min(max(leader - K // 2, 0), Lg - K)
    return start, start + K


@lru_cache(maxsize=256)
def axis_window_table(L: int, K: int, d: int, s: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per true index ``i``: the window's ``[start, end)`` in group coordinates, as two int64 ``[L]`` tensors."""
    starts, ends = [], []
    for i in range(L):
        g, p = i % d, i // d
        a, b = window_bounds(p, group_length(L, d, g), K, s, causal)
        starts.append(a)
        ends.append(b)
    return torch.tensor(starts), torch.tensor(ends)


def axis_mask_and_offsets(L: int, K: int, d: int, s: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense per-axis relation between all query and key indices.

    Returns ``mask [L, L]`` (bool, ``mask[i, j]``: key ``j`` is in query ``i``'s window) and
    ``rpb_index [L, L]`` (``(j // d - i // d) + K - 1`` where masked in, 0 elsewhere).
    """
    start, end = axis_window_table(L, K, d, s, causal)
    i = torch.arange(L)[:, None]
    j = torch.arange(L)[None, :]
    same_group = (i % d) == (j % d)
    jp = j // d
    mask = same_group & (jp >= start[:, None]) & (jp < end[:, None])
    offset = jp - i // d + K - 1
    return mask, torch.where(mask, offset, torch.zeros_like(offset))


# ---------------------------------------------------------------------------------------------------
# argument checking and the parameters object


SCORES = ("softmax", "sigmoid")


@dataclass(frozen=True)
class NAParams:
    """One neighborhood-attention call's settings, validated and normalised (per-axis tuples), built once
    by :func:`na_params` and handed down to the backends instead of positional chains. Frozen and
    hashable (it holds no tensors, only whether ``rpb``/``score_decay`` are present).

    ``backend`` is the concrete backend (``'reference'``, ``'torch'`` or ``'triton'``; ``'auto'`` is
    resolved when the parameters are built).
    """

    n_dims: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    is_causal: tuple[bool, ...]
    scale: float
    score: str = "softmax"
    has_rpb: bool = False
    has_score_decay: bool = False
    return_lse: bool = False
    backend: str = "torch"

    @property
    def sigmoid(self) -> bool:
        return self.score == "sigmoid"

    @property
    def name(self) -> str:
        return f"na{self.n_dims}d"

    def op_args(self) -> tuple:
        """The primitive arguments of the ``visionattn::na_forward`` / ``na_backward`` custom ops, in their
        order: ``(kernel_size, stride, dilation, is_causal, scale, sigmoid, backend)`` as lists and scalars
        (``torch.library`` schemas take no dataclasses). :meth:`from_op_args` inverts it."""
        return (list(self.kernel_size), list(self.stride), list(self.dilation), list(self.is_causal),
                float(self.scale), self.sigmoid, self.backend)

    @classmethod
    def from_op_args(cls, kernel_size, stride, dilation, is_causal, scale, sigmoid, backend, *,
                     has_rpb: bool, has_score_decay: bool) -> "NAParams":
        """Rebuild the parameters inside a custom op from :meth:`op_args` (already validated)."""
        return cls(n_dims=len(kernel_size), kernel_size=tuple(kernel_size), stride=tuple(stride),
                   dilation=tuple(dilation), is_causal=tuple(bool(c) for c in is_causal), scale=float(scale),
                   score="sigmoid" if sigmoid else "softmax", has_rpb=has_rpb, has_score_decay=has_score_decay,
                   backend=backend)


def _as_tuple(fn: str, name: str, value, n: int, kind: type) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{fn}: {name} must be a {kind.__name__} or a tuple of {n}, got {value!r}")
        values = tuple(value)
    else:
        values = (value,) * n
    for v in values:
        if kind is bool:
            if not isinstance(v, bool):
                raise ValueError(f"{fn}: {name} must be bool or a tuple of {n} bools, got {value!r}")
        elif isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{fn}: {name} must be a positive int or a tuple of {n} positive ints, got {value!r}")
    return values


def _check_table(fn: str, name: str, table, query: torch.Tensor, kernel_size: tuple[int, ...]) -> None:
    """``rpb`` / ``score_decay``: a ``[heads, 2K_0-1, ...]`` floating-point tensor on the query's device."""
    expected = (query.shape[-2], *(2 * k - 1 for k in kernel_size))
    if not isinstance(table, torch.Tensor) or tuple(table.shape) != expected:
        got = tuple(table.shape) if isinstance(table, torch.Tensor) else type(table).__name__
        raise ValueError(f"{fn}: {name} must have shape [heads, 2*K-1 per axis] = {expected}, got {got}")
    if not table.is_floating_point():
        raise ValueError(f"{fn}: {name} must be a floating-point tensor, got {table.dtype}")
    if table.device != query.device:
        raise ValueError(f"{fn}: {name} is on {table.device} but query is on {query.device}")


def na_params(
    n_dims: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size,
    *,
    stride=1,
    dilation=1,
    is_causal=False,
    scale: float | None = None,
    rpb: torch.Tensor | None = None,
    attn_bias_fn=None,
    score: str = "softmax",
    score_decay: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
) -> NAParams:
    """Validate a neighborhood-attention call (NATTEN-style: every argument, with the allowed range in the
    message) and return its :class:`NAParams`. Raises ``ValueError``."""
    fn = f"na{n_dims}d"
    layout = "[batch, " + ", ".join(f"X{a}" for a in range(n_dims)) + ", heads, head_dim]"
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != n_dims + 3:
            raise ValueError(f"{fn}: {name} must be {n_dims + 3}-D {layout}, got shape {tuple(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty (shape {tuple(t.shape)})")
    if key.shape != query.shape:
        raise ValueError(f"{fn}: key shape {tuple(key.shape)} must equal query shape {tuple(query.shape)}")
    if value.shape[:-1] != query.shape[:-1]:
        raise ValueError(
            f"{fn}: value shape {tuple(value.shape)} must match query shape {tuple(query.shape)} except the last dim"
        )
    if not (query.dtype == key.dtype == value.dtype):
        raise ValueError(f"{fn}: query, key and value dtypes differ ({query.dtype}, {key.dtype}, {value.dtype})")
    if not query.is_floating_point():
        raise ValueError(f"{fn}: query must be a floating-point tensor, got {query.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"{fn}: query, key and value are on different devices")
    if score not in SCORES:
        raise ValueError(f"{fn}: score must be 'softmax' or 'sigmoid', got {score!r}")
    if not isinstance(return_lse, bool):
        raise ValueError(f"{fn}: return_lse must be bool, got {return_lse!r}")
    if return_lse and score != "softmax":
        raise ValueError(f"{fn}: return_lse is only defined for score='softmax'")
    if scale is not None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"{fn}: scale must be a finite number or None, got {scale!r}")
    if attn_bias_fn is not None and not callable(attn_bias_fn):
        raise ValueError(f"{fn}: attn_bias_fn must be callable, got {type(attn_bias_fn).__name__}")

    spatial = tuple(query.shape[1:-2])
    ks = _as_tuple(fn, "kernel_size", kernel_size, n_dims, int)
    st = _as_tuple(fn, "stride", stride, n_dims, int)
    dil = _as_tuple(fn, "dilation", dilation, n_dims, int)
    causal = _as_tuple(fn, "is_causal", is_causal, n_dims, bool)
    for a in range(n_dims):
        if ks[a] < 1:
            raise ValueError(f"{fn}: kernel_size must be >= 1 on every axis, got {ks}")
        if dil[a] < 1:
            raise ValueError(f"{fn}: dilation must be >= 1 on every axis, got {dil}")
        if not 1 <= st[a] <= ks[a]:
            raise ValueError(f"{fn}: stride must be in [1, kernel_size] on every axis, got stride {st} for kernel_size {ks}")
        if ks[a] * dil[a] > spatial[a]:
            raise ValueError(
                f"{fn}: kernel_size * dilation must be <= the input extent on every axis; axis {a} has extent "
                f"{spatial[a]} but kernel_size {ks[a]} * dilation {dil[a]} = {ks[a] * dil[a]}. Use a smaller "
                f"kernel_size or dilation, or pad the input"
            )
    if rpb is not None:
        _check_table(fn, "rpb", rpb, query, ks)
    if score_decay is not None:
        if score != "sigmoid":
            raise ValueError(f"{fn}: score_decay multiplies sigmoid weights; it needs score='sigmoid'")
        _check_table(fn, "score_decay", score_decay, query, ks)
    return NAParams(
        n_dims=n_dims, kernel_size=ks, stride=st, dilation=dil, is_causal=causal,
        scale=query.shape[-1] ** -0.5 if scale is None else float(scale), score=score,
        has_rpb=rpb is not None or attn_bias_fn is not None, has_score_decay=score_decay is not None,
        return_lse=return_lse, backend=resolve_backend(fn, backend, query),
    )


def offset_grids(kernel_size: Sequence[int], dilation: Sequence[int], device=None) -> list[torch.Tensor]:
    """Per-axis key-minus-query offsets in pixels, ``(m - K + 1) * d`` for ``m in [0, 2K - 1)``, shaped to
    broadcast against each other: axis ``a`` gets shape ``[1, .., 2K_a - 1, .., 1]``."""
    n = len(kernel_size)
    grids = []
    for a, (k, d) in enumerate(zip(kernel_size, dilation)):
        shape = [1] * n
        shape[a] = 2 * k - 1
        grids.append(((torch.arange(2 * k - 1, device=device) - (k - 1)) * d).view(shape))
    return grids
