"""Neighborhood attention: ``na1d``, ``na2d``, ``na3d`` (NATTEN's semantics, heads-last layout).

Backends:
- ``"reference"``: brute force over a dense mask (:mod:`.reference`), small inputs only; the test oracle.
- ``"cpu"``: tiled PyTorch (:mod:`.tiled`), forward and backward, any device; the CPU default.
- ``"triton"``: fused Triton kernels (:mod:`.triton_na`), forward and backward; the CUDA default.
- ``"auto"``: Triton for CUDA tensors when Triton is importable, else ``"cpu"``.

The fast backends run behind the ``visionattn::na_forward`` / ``visionattn::na_backward`` custom ops
(``torch.library``) with fake implementations and a registered autograd formula, so ``torch.compile``
captures them without graph breaks.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Callable, Sequence

import torch

from visionattn.kernels.reference import na_reference
from visionattn.kernels.semantics import check_args, offset_grids
from visionattn.kernels.tiled import tiled_backward, tiled_forward

BACKENDS = ("auto", "reference", "cpu", "triton")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton kernels can run here: a CUDA device, or ``TRITON_INTERPRET=1``."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _run_forward(backend, q, k, v, rpb, decay, ks, dil, st, causal, scale, sigmoid):
    if backend == "triton":
        from visionattn.kernels.triton_na import triton_forward

        return triton_forward(q, k, v, rpb, decay, ks, dil, st, causal, scale, sigmoid)
    return tiled_forward(q, k, v, rpb, decay, ks, dil, st, causal, scale, sigmoid)


def _run_backward(backend, dout, dlse, q, k, v, rpb, decay, out, lse, ks, dil, st, causal, scale, sigmoid):
    if backend == "triton":
        from visionattn.kernels.triton_na import triton_backward

        return triton_backward(dout, dlse, q, k, v, rpb, decay, out, lse, ks, dil, st, causal, scale, sigmoid)
    return tiled_backward(dout, dlse, q, k, v, rpb, decay, out, lse, ks, dil, st, causal, scale, sigmoid)


@torch.library.custom_op("visionattn::na_forward", mutates_args=())
def _na_forward_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rpb: torch.Tensor | None, decay: torch.Tensor | None,
    kernel_size: list[int], dilation: list[int], stride: list[int], is_causal: list[bool],
    scale: float, sigmoid: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _run_forward(backend, q, k, v, rpb, decay, kernel_size, dilation, stride, is_causal, scale, sigmoid)
    return out, lse


@_na_forward_op.register_fake
def _(q, k, v, rpb, decay, kernel_size, dilation, stride, is_causal, scale, sigmoid, backend):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty(q.shape[:-1], dtype=lse_dtype)


@torch.library.custom_op("visionattn::na_backward", mutates_args=())
def _na_backward_op(
    dout: torch.Tensor, dlse: torch.Tensor | None, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    rpb: torch.Tensor | None, decay: torch.Tensor | None,
    out: torch.Tensor, lse: torch.Tensor,
    kernel_size: list[int], dilation: list[int], stride: list[int], is_causal: list[bool],
    scale: float, sigmoid: bool, backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv, drpb = _run_backward(
        backend, dout, dlse, q, k, v, rpb, decay, out, lse, kernel_size, dilation, stride, is_causal, scale, sigmoid
    )
    if drpb is None:
        drpb = q.new_empty(0)
    return dq, dk, dv, drpb


@_na_backward_op.register_fake
def _(dout, dlse, q, k, v, rpb, decay, out, lse, kernel_size, dilation, stride, is_causal, scale, sigmoid, backend):
    drpb = torch.empty_like(rpb) if rpb is not None else q.new_empty(0)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), drpb


def _setup_context(ctx, inputs, output):
    q, k, v, rpb, decay, kernel_size, dilation, stride, is_causal, scale, sigmoid, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, rpb, decay, out, lse)
    ctx.args = (kernel_size, dilation, stride, is_causal, scale, sigmoid, backend)
    ctx.has_rpb = rpb is not None


def _backward(ctx, dout, dlse):
    q, k, v, rpb, decay, out, lse = ctx.saved_tensors
    dlse = dlse.contiguous() if dlse is not None else None
    dq, dk, dv, drpb = _na_backward_op(dout.contiguous(), dlse, q, k, v, rpb, decay, out, lse, *ctx.args)
    return dq, dk, dv, (drpb if ctx.has_rpb else None), None, None, None, None, None, None, None, None


_na_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formula() -> None:
    """Let ``torch.utils.flop_counter`` (and so ``visionattn info``) count the op: the QK and AV products,
    ``2 * B * heads * N * prod(K) * (D + Dv)``, as NATTEN counts them (causal windows counted in full)."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.visionattn.na_forward)
    def _na_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
        kernel_size = args[2]
        B, *spatial, heads, D = q_shape
        return 2 * B * heads * math.prod(spatial) * math.prod(kernel_size) * (D + v_shape[-1])


_register_flop_formula()


def _resolve_backend(backend: str, q: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda and triton_available() else "cpu"
    if backend == "triton" and not triton_available():
        raise ValueError("backend='triton' needs a CUDA device (or TRITON_INTERPRET=1 set before import) and triton")
    return backend


def neighborhood_attention(
    n_dims: int,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kernel_size: int | Sequence[int],
    dilation: int | Sequence[int] = 1,
    stride: int | Sequence[int] = 1,
    is_causal: bool | Sequence[bool] = False,
    rpb: torch.Tensor | None = None,
    scale: float | None = None,
    score: str = "softmax",
    return_lse: bool = False,
    backend: str = "auto",
    attn_bias_fn: Callable[[list[torch.Tensor]], torch.Tensor] | None = None,
    score_decay: torch.Tensor | None = None,
):
    """Neighborhood attention over ``n_dims`` spatial axes; see :func:`na2d` for the arguments."""
    ks, dil, st, causal = check_args(n_dims, query, key, value, kernel_size, dilation, stride, is_causal, rpb, score,
                                     return_lse, score_decay)
    heads, head_dim = query.shape[-2], query.shape[-1]
    if attn_bias_fn is not None:
        bias = attn_bias_fn(offset_grids(ks, dil, device=query.device))
        expected = (heads, *(2 * k - 1 for k in ks))
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != expected:
            got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"na{n_dims}d: attn_bias_fn must return a tensor of shape {expected}, got {got}")
        rpb = bias if rpb is None else rpb + bias
    if rpb is not None:
        rpb = rpb.to(query.dtype)
    if score_decay is not None:
        score_decay = score_decay.detach().to(query.dtype)  # a fixed prior: no gradient flows to it
    scale = head_dim ** -0.5 if scale is None else float(scale)
    backend = _resolve_backend(backend, query)
    sigmoid = score == "sigmoid"
    if backend == "reference":
        out, lse = na_reference(query, key, value, ks, dil, st, causal, rpb, scale, score, score_decay)
    else:
        q, k, v = query.contiguous(), key.contiguous(), value.contiguous()
        rpb_c = rpb.contiguous() if rpb is not None else None
        decay_c = score_decay.contiguous() if score_decay is not None else None
        out, lse = _na_forward_op(q, k, v, rpb_c, decay_c, list(ks), list(dil), list(st), list(causal), scale, sigmoid, backend)
    if return_lse:
        return out, lse
    return out


def na1d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         score="softmax", return_lse=False, backend="auto", attn_bias_fn=None, score_decay=None):
    """1-D neighborhood attention. ``query, key [B, L, heads, D]``, ``value [B, L, heads, Dv]``;
    ``rpb [heads, 2K-1]``. See :func:`na2d`."""
    return neighborhood_attention(1, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale,
                                  score, return_lse, backend, attn_bias_fn, score_decay)


def na2d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         score="softmax", return_lse=False, backend="auto", attn_bias_fn=None, score_decay=None):
    """2-D neighborhood attention (NATTEN semantics).

    Args:
        query, key: ``[B, H, W, heads, D]``; value: ``[B, H, W, heads, Dv]`` (heads-last, as NATTEN).
        kernel_size, dilation, stride: int or per-axis tuple; ``1 <= stride <= kernel_size`` and
            ``kernel_size * dilation <= extent`` per axis.
        is_causal: bool or per-axis tuple.
        rpb: optional relative positional bias ``[heads, 2K_0-1, 2K_1-1]``, indexed by the key-minus-query
            offset (in dilated steps) plus ``K-1``; differentiable.
        scale: logit scale, default ``D ** -0.5`` (``0.0`` is honoured, unlike NATTEN).
        score: ``'softmax'`` or ``'sigmoid'`` (each in-window weight is ``sigmoid(logit)``, no normalisation).
        return_lse: also return the log-sum-exp ``[B, H, W, heads]`` (fp32; fp64 for fp64 inputs) of the logits (softmax only).
        backend: ``'auto'``, ``'reference'``, ``'cpu'`` or ``'triton'``.
        attn_bias_fn: optional ``fn(offsets) -> [heads, 2K_0-1, 2K_1-1]``: a per-head additive bias as a
            function of the per-axis offsets; ``offsets[a]`` holds key-minus-query offsets in pixels,
            ``(m - K_a + 1) * dilation_a``, shaped to broadcast across axes. E.g. a Manhattan decay
            ``lambda o: -gamma[:, None, None] * (o[0].abs() + o[1].abs())``. Added to ``rpb``.
        score_decay: optional ``[heads, 2K_0-1, 2K_1-1]`` factors multiplying each in-window weight after the
            score function (``score='sigmoid'`` only), indexed like ``rpb``: a multiplicative, post-activation
            decay such as ``gamma ** |offset|``. Treated as a constant (no gradient).
    Returns:
        ``out [B, H, W, heads, Dv]`` (and ``lse`` if asked).
    """
    return neighborhood_attention(2, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale,
                                  score, return_lse, backend, attn_bias_fn, score_decay)


def na3d(query, key, value, kernel_size, dilation=1, stride=1, is_causal=False, rpb=None, scale=None,
         score="softmax", return_lse=False, backend="auto", attn_bias_fn=None, score_decay=None):
    """3-D neighborhood attention. ``query, key [B, D, H, W, heads, Dh]``; ``rpb [heads, 2K_0-1, 2K_1-1,
    2K_2-1]``. See :func:`na2d`."""
    return neighborhood_attention(3, query, key, value, kernel_size, dilation, stride, is_causal, rpb, scale,
                                  score, return_lse, backend, attn_bias_fn, score_decay)
