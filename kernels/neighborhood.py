"""Neighborhood attention: ``na1d``, ``na2d``, ``na3d`` (NATTEN's semantics, heads-last layout).

Signature (NATTEN >= 0.20's order): ``na2d(query, key, value, kernel_size, *, stride=1, dilation=1,
is_causal=False, scale=None, rpb=None, attn_bias_fn=None, score='softmax', score_decay=None,
return_lse=False, backend='auto')``. Only the tensors and ``kernel_size`` are positional; a positional
``stride`` or ``dilation`` is a ``TypeError``, so the two can never be swapped silently.

Backends (the vocabulary of :mod:`visionattn.kernels.backends`, shared by every kernel):

- ``"reference"``: brute force over a dense mask (:mod:`.reference`), small inputs only; the test oracle.
- ``"torch"``: tiled PyTorch (:mod:`.tiled`), forward and backward, any device; blocked calls (``stride ==
  kernel_size``, dilation 1, not causal: non-overlapping windows) take :mod:`.windowed` instead, dense
  window batches differentiated by autograd; on CPU, softmax windows of at most 27 keys take
  :mod:`.small_window` (per-offset passes compiled by ``torch.compile``).
- ``"triton"``: fused Triton kernels (:mod:`.triton_na`), forward and backward.
- ``"auto"``: ``"triton"`` for CUDA tensors when Triton is usable, else ``"torch"``.

A call is checked once (:func:`.semantics.na_params`) into a frozen :class:`.semantics.NAParams` that the
backends receive. The fast backends run behind the ``visionattn::na_forward`` / ``visionattn::na_backward``
custom ops (``torch.library``), whose primitive arguments come from :meth:`NAParams.op_args`, with fake
implementations and a registered autograd formula, so ``torch.compile`` captures them without graph breaks.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from visionattn.kernels import windowed
from visionattn.kernels.backends import BACKENDS, triton_available
from visionattn.kernels.reference import reference_forward
from visionattn.kernels.semantics import NAParams, na_params, offset_grids
from visionattn.kernels.small_window import small_window_applies, small_window_backward, small_window_forward
from visionattn.kernels.tiled import tiled_backward, tiled_forward

__all__ = ["BACKENDS", "NAParams", "na1d", "na2d", "na3d", "neighborhood_attention", "triton_available"]


def _run_forward(q, k, v, rpb, decay, params: NAParams):
    if params.backend == "triton":
        from visionattn.kernels.triton_na import triton_forward

        return triton_forward(q, k, v, rpb, decay, params)
    if small_window_applies(params, q):
        res = small_window_forward(q, k, v, rpb, params)
        if res is not None:  # None: no usable compiler (warned once); the tiled path from then on
            return res
    return tiled_forward(q, k, v, rpb, decay, params)


def _run_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params: NAParams):
    if params.backend == "triton":
        from visionattn.kernels.triton_na import triton_backward

        return triton_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params)
    if small_window_applies(params, q):
        res = small_window_backward(dout, dlse, q, k, v, rpb, out, lse, params)
        if res is not None:
            return res
    return tiled_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params)


# The custom ops' primitive arguments after the tensors are NAParams.op_args():
# (kernel_size, stride, dilation, is_causal, scale, sigmoid, backend).


@torch.library.custom_op("visionattn::na_forward", mutates_args=())
def _na_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, decay: torch.Tensor | None,
    kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
    scale: float, sigmoid: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    params = NAParams.from_op_args(kernel_size, stride, dilation, is_causal, scale, sigmoid, backend,
                                   has_rpb=rpb is not None, has_score_decay=decay is not None)
    return _run_forward(q, k, v, rpb, decay, params)


@_na_forward_op.register_fake
def _(q, k, v, rpb, decay, *op_args):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("visionattn::na_backward", mutates_args=())
def _na_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    rpb: torch.Tensor | None, decay: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor,
    kernel_size: list[int], stride: list[int], dilation: list[int], is_causal: list[bool],
    scale: float, sigmoid: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    params = NAParams.from_op_args(kernel_size, stride, dilation, is_causal, scale, sigmoid, backend,
                                   has_rpb=rpb is not None, has_score_decay=decay is not None)
    dq, dk, dv, drpb = _run_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params)
    if drpb is None:
        drpb = q.new_empty(0)
    return dq, dk, dv, drpb


@_na_backward_op.register_fake
def _(dout, dlse, q, k, v, rpb, decay, out, lse, *op_args):
    drpb = torch.empty_like(rpb) if rpb is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


_N_OP_TENSORS = 5  # q, k, v, rpb, decay lead the forward op's arguments; NAParams.op_args() follow


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, decay = inputs[:_N_OP_TENSORS]
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, decay, out, lse)
    ctx.op_args = inputs[_N_OP_TENSORS:]
    ctx.has_rpb = rpb is not None


def _backward(ctx, dout, dlse):
    q, k, v, rpb, decay, out, lse = ctx.saved_tensors
    dlse = dlse.contiguous() if dlse is not None else None
    dq, dk, dv, drpb = _na_backward_op(dout.contiguous(), dlse, q, k, v, rpb, decay, out, lse, *ctx.op_args)
    return (dq, dk, dv, drpb if ctx.has_rpb else None, None) + (None,) * len(ctx.op_args)


_na_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter`` (and so ``visionattn info``) count the op: the QK and AV products,
    ``2 * B * heads * N * prod(K) * (D + Dv)``, as NATTEN counts them (causal windows counted in full)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.visionattn.na_forward)
    def _na_flops(q_shape, k_shape, v_shape, rpb_shape, decay_shape, kernel_size, *args, out_shape=None,
                  **kwargs) -> int:
        B, *spatial, heads, D = q_shape
        return 2 * B * heads * math.prod(spatial) * math.prod(kernel_size) * (D + v_shape[-1])


_register_flop_formula()


def _attention(params: NAParams, query, key, value, rpb, attn_bias_fn, score_decay):
    """Run one checked call (``params`` from :func:`na_params`)."""
    if attn_bias_fn is not None:
        bias = attn_bias_fn(offset_grids(params.kernel_size, params.dilation, device=query.device))
        expected = (query.shape[-2], *(2 * k - 1 for k in params.kernel_size))
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != expected:
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"{params.name}: attn_bias_fn must return a tensor of shape {expected}, got {got}")
        rpb = bias if rpb is None else rpb + bias
    if rpb is not None:
        rpb = rpb.to(query.dtype)
    if score_decay is not None:
        score_decay = score_decay.detach().to(query.dtype)  # a fixed prior: no gradient flows to it
    if params.backend == "reference":
        out, lse = reference_forward(query, key, value, rpb, score_decay, params)
    elif params.backend == "torch" and windowed.windowed_applies(params):
        # blocked windows (stride == kernel_size): dense window batches, no halo (:mod:`.windowed`)
        out, lse = windowed.windowed_forward(query, key, value, rpb, score_decay, params,
                                             return_lse=params.return_lse)
    else:
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        rpb = rpb.contiguous() if rpb is not None else None
        score_decay = score_decay.contiguous() if score_decay is not None else None
        out, lse = _na_forward_op(q, k, v, rpb, score_decay, *params.op_args())
    return (out, lse) if params.return_lse else out


def neighborhood_attention(
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
    attn_bias_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    score: str = "softmax",
    score_decay: torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
):
    """Neighborhood attention over ``query.dim() - 3`` spatial axes (1 to 3): :func:`na1d`, :func:`na2d`
    or :func:`na3d` chosen by the rank of ``query``; see :func:`na2d` for the arguments."""
    n_dims = query.dim() - 3 if isinstance(query, torch.Tensor) else 0
    if not 1 <= n_dims <= 3:
        shape = tuple(query.shape) if isinstance(query, torch.Tensor) else type(query).__name__
        raise ValueError(
            f"neighborhood_attention: query must be [batch, *spatial (1 to 3 axes), heads, head_dim], got {shape}"
        )
    return _NA_FNS[n_dims](query, key, value, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                           scale=scale, rpb=rpb, attn_bias_fn=attn_bias_fn, score=score, score_decay=score_decay,
                           return_lse=return_lse, backend=backend)


def na1d(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         attn_bias_fn=None, score="softmax", score_decay=None, return_lse=False, backend="auto"):
    """1-D neighborhood attention. ``query, key [B, L, heads, D]``, ``value [B, L, heads, Dv]``;
    ``rpb [heads, 2K-1]``. See :func:`na2d`."""
    params = na_params(1, query, key, value, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                       scale=scale, rpb=rpb, attn_bias_fn=attn_bias_fn, score=score, score_decay=score_decay,
                       return_lse=return_lse, backend=backend)
    return _attention(params, query, key, value, rpb, attn_bias_fn, score_decay)


def na2d(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         attn_bias_fn=None, score="softmax", score_decay=None, return_lse=False, backend="auto"):
    """2-D neighborhood attention (NATTEN semantics and argument order).

    Positional: ``query, key, value, kernel_size``; everything else is keyword-only.

    Args:
        query, key: ``[B, H, W, heads, D]``; value: ``[B, H, W, heads, Dv]`` (heads-last, as NATTEN).
        kernel_size, stride, dilation: int or per-axis tuple; ``1 <= stride <= kernel_size`` and
            ``kernel_size * dilation <= extent`` per axis.
        is_causal: bool or per-axis tuple.
        scale: logit scale, default ``D ** -0.5`` (``0.0`` is honoured, unlike NATTEN).
        rpb: optional relative positional bias ``[heads, 2K_0-1, 2K_1-1]``, indexed by the key-minus-query
            offset (in dilated steps) plus ``K-1``; differentiable.
        attn_bias_fn: optional ``fn(offsets) -> [heads, 2K_0-1, 2K_1-1]``: a per-head additive bias as a
            function of the per-axis offsets; ``offsets[a]`` holds key-minus-query offsets in pixels,
            ``(m - K_a + 1) * dilation_a``, shaped to broadcast across axes. E.g. a Manhattan decay
            ``lambda o: -gamma[:, None, None] * (o[0].abs() + o[1].abs())``. Added to ``rpb``.
        score: ``'softmax'`` or ``'sigmoid'`` (each in-window weight is ``sigmoid(logit)``, no normalisation).
        score_decay: optional ``[heads, 2K_0-1, 2K_1-1]`` factors multiplying each in-window weight after the
            score function (``score='sigmoid'`` only), indexed like ``rpb``: a multiplicative, post-activation
            decay such as ``gamma ** |offset|``. Treated as a constant (no gradient).
        return_lse: also return the log-sum-exp ``[B, H, W, heads]`` (fp32; fp64 for fp64 inputs) of the
            logits (softmax only).
        backend: ``'auto'``, ``'reference'``, ``'torch'`` or ``'triton'`` (:mod:`visionattn.kernels.backends`).
    Returns:
        ``out [B, H, W, heads, Dv]`` (and ``lse`` if asked).
    """
    params = na_params(2, query, key, value, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                       scale=scale, rpb=rpb, attn_bias_fn=attn_bias_fn, score=score, score_decay=score_decay,
                       return_lse=return_lse, backend=backend)
    return _attention(params, query, key, value, rpb, attn_bias_fn, score_decay)


def na3d(query, key, value, kernel_size, *, stride=1, dilation=1, is_causal=False, scale=None, rpb=None,
         attn_bias_fn=None, score="softmax", score_decay=None, return_lse=False, backend="auto"):
    """3-D neighborhood attention. ``query, key [B, D, H, W, heads, Dh]``; ``rpb [heads, 2K_0-1, 2K_1-1,
    2K_2-1]``. See :func:`na2d`."""
    params = na_params(3, query, key, value, kernel_size, stride=stride, dilation=dilation, is_causal=is_causal,
                       scale=scale, rpb=rpb, attn_bias_fn=attn_bias_fn, score=score, score_decay=score_decay,
                       return_lse=return_lse, backend=backend)
    return _attention(params, query, key, value, rpb, attn_bias_fn, score_decay)


_NA_FNS = {1: na1d, 2: na2d, 3: na3d}
