"""Non-causal linear attention as HER-Seg's DLA uses it, heads-last ``[B, N, heads, d]``.

Per batch and head, with feature-mapped queries and keys ``q, k`` (the kernel feature map, e.g.
``ELU + 1``, already applied), rotated copies ``q~, k~`` (RoPE; default: the unrotated ones) and values
``v``::

    S     = (1/N) sum_m k~_m v_m^T            [d, dv]   (HER-Seg: (k~^T N^-1/2)(v N^-1/2))
    kbar  = (1/N) sum_m k_m                   [d]
    z_n   = 1 / (q_n . kbar + eps)                      (the normaliser uses the UNrotated features)
    out_n = (q~_n S) z_n                      [dv]

Signature: ``linear_attention(q, k, v, q_rot=None, k_rot=None, *, eps=1e-6, chunk_size=None,
backend='auto')``: the tensors are positional (``q_rot``/``k_rot`` together or not at all), every option is
keyword-only.

Backends (``backend=``, the vocabulary of :mod:`visionattn.kernels.backends`):

- ``"reference"``: the quadratic form ``A = q~ k~^T / N``, ``out = (A v) z`` with autograd; small inputs
  only, the test oracle.
- ``"torch"``: a ``torch.autograd.Function`` with an explicit backward in which every product is one
  contraction over all N tokens (``S = k~^T v``, ``q~ S``, ...): none of them forms anything larger than
  its ``N x d`` operands, so cutting N into chunks would save no memory and only add passes (``chunk_size``
  still cuts it, for tests and for bounding the ``N x d`` temporaries). Time is linear in N; memory is
  O(N d) for the outputs, gradients and temporaries plus O(d dv) summaries per head: no N x N and no
  N x d x dv tensor is formed. The backward reuses the forward's output and normaliser (``dout . (q~ S)
  z^2 = (dout . out) z``) instead of recomputing ``q~ S``. The ops are plain torch ops, so
  ``torch.utils.flop_counter`` and dispatch-mode memory trackers see them. Twice-differentiable it is not.
- ``"triton"``: four Triton kernels (two passes forward, two backward; below) behind ``torch.library``
  custom ops with a registered autograd formula, fake implementations and a FLOP formula.
- ``"auto"``: Triton for CUDA tensors when Triton is available, else ``"torch"``.

Gradients, with ``y_n = q~_n S`` and ``g_n = dout_n z_n``::

    dq~_n = g_n S^T            dS  = sum_n q~_n^T g_n          dk~_m = v_m dS^T / N    dv_m = k~_m dS / N
    dden_n = -(dout_n . y_n) z_n^2                 dq_n = dden_n kbar              dk_m = (sum_n dden_n q_n) / N

The Triton passes: forward (1) ``S`` and ``sum k`` partial sums over N tiles, one partial per program,
summed by torch (deterministic, no atomics); (2) outputs per N tile. Backward (3) ``dq~``, ``dq`` per N
tile and partial sums of ``dS``, ``dkbar``; (4) ``dk~``, ``dv``, ``dk`` per N tile. fp16/bf16/fp32 inputs
are computed in fp32 (``tl.dot`` with ``input_precision="ieee"``), fp64 in fp64.
"""
from __future__ import annotations

import functools
import os

import torch
from torch.autograd.function import once_differentiable

from visionattn.kernels.backends import BACKENDS, check_backend, resolve_backend

try:
    import triton
    import triton.language as tl
except ImportError:  # only the Triton backend needs it
    triton = tl = None

__all__ = ["BACKENDS", "linear_attention", "linear_attention_reference"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention_reference(q, k, v, q_rot=None, k_rot=None, *, eps: float = 1e-6) -> torch.Tensor:
    """Quadratic oracle: forms the ``[B, heads, N, N]`` matrix ``A = q~ k~^T / N``; ``out = (A v) z``.

    Shapes as :func:`linear_attention`; computed in the inputs' dtype, differentiable by autograd.
    """
    q_rot = q if q_rot is None else q_rot
    k_rot = k if k_rot is None else k_rot
    N = q.shape[1]
    qr, kr, qh, kh, vh = (t.transpose(1, 2) for t in (q_rot, k_rot, q, k, v))  # [B, heads, N, *]
    attn = qr @ kr.transpose(-1, -2) / N
    z = 1.0 / (qh @ kh.mean(2, keepdim=True).transpose(-1, -2) + eps)  # [B, heads, N, 1]
    return ((attn @ vh) * z).transpose(1, 2)


# ---------------------------------------------------------------------------------------------- torch


def _spans(N: int, chunk_size: int | None) -> list[slice]:
    step = N if chunk_size is None else chunk_size
    return [slice(s, min(s + step, N)) for s in range(0, N, step)]


def _heads(t: torch.Tensor, dtype) -> torch.Tensor:
    """``[B, N, heads, d]`` -> a ``[B, heads, N, d]`` view (a copy only to change the dtype)."""
    return t.to(dtype).transpose(1, 2)


def _matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a [B, heads, M, K] @ b [B, heads, K, P]`` -> ``[B, heads, M, P]`` (contiguous, or into ``out``): one
    ``bmm`` per batch element, so strided heads-first views of heads-last tensors are read in place (matmul
    would copy them to merge the batch and head dimensions)."""
    if out is None:
        out = a.new_empty(a.shape[0], a.shape[1], a.shape[2], b.shape[3])
    for i in range(a.shape[0]):
        if out[i].is_contiguous():
            torch.bmm(a[i], b[i], out=out[i])
        else:
            out[i].copy_(torch.bmm(a[i], b[i]))
    return out


def _torch_forward(q_rot, k_rot, q, k, v, eps: float, chunk_size: int | None = None):
    """Forward: ``out [B, N, heads, dv]`` (inputs' dtype; a heads-first tensor seen heads-last),
    ``S [B, heads, d, dv]``, ``kbar [B, heads, d]`` and ``z [B, heads, N, 1]`` (the normaliser's
    reciprocal), all but ``out`` in fp32 (fp64 for fp64 inputs). Each product is one contraction over the
    ``chunk_size`` tokens of a chunk, all ``N`` by default: ``S`` is a ``d x dv`` sum, so a contraction
    over all tokens holds nothing larger than its ``N x d`` operands."""
    B, N, H, D = q.shape
    acc = _acc_dtype(q.dtype)
    spans = _spans(N, chunk_size)
    S = sum(_matmul(_heads(k_rot[:, c], acc).transpose(2, 3), _heads(v[:, c], acc)) for c in spans).div_(N)
    kbar = sum(k[:, c].to(acc).sum(1) for c in spans).div_(N)  # [B, heads, d]
    # the normaliser as the row kbar^T q^T: BLAS runs a matrix-vector product far faster with the long side
    # (N) as its output than as its contraction
    z = q.new_empty(B, H, 1, N, dtype=acc)
    for c in spans:
        _matmul(kbar[:, :, None], _heads(q[:, c], acc).transpose(2, 3), out=z[..., c]).add_(eps).reciprocal_()
    z = z.view(B, H, N, 1)
    out = q.new_empty(B, H, N, v.shape[-1], dtype=acc)
    for c in spans:
        _matmul(_heads(q_rot[:, c], acc), S, out=out[:, :, c]).mul_(z[:, :, c])
    return out.to(v.dtype).transpose(1, 2), S, kbar, z


def _torch_backward(dout, q_rot, k_rot, q, k, v, S, kbar, z, out, eps: float, chunk_size: int | None = None):
    """Backward: ``(dq_rot, dk_rot, dq, dk, dv)`` (heads-first tensors seen heads-last; ``dk`` an expanded
    view: every key gets the same gradient through the mean). ``out`` (the forward's, when it is in the
    accumulation dtype; else None) spares recomputing ``y = q~ S``: ``(dout . y) z^2 = (dout z) . out``."""
    B, N, H, D = q.shape
    acc = S.dtype
    spans = _spans(N, chunk_size)
    dq_rot, dq = q.new_empty(B, H, N, D, dtype=acc), q.new_empty(B, H, N, D, dtype=acc)
    dS, dkbar = torch.zeros_like(S), torch.zeros_like(kbar)[:, :, None]  # [B, heads, 1, d]
    for c in spans:
        dout_c = _heads(dout[:, c], acc)
        g = torch.mul(dout_c, z[:, :, c], out=dout_c.new_empty(dout_c.shape))  # [B, heads, n, dv], contiguous
        _matmul(g, S.transpose(2, 3), out=dq_rot[:, :, c])
        qr_c = _heads(q_rot[:, c], acc)
        dS += _matmul(qr_c.transpose(2, 3), g)
        y_z = _heads(out[:, c], acc) if out is not None else _matmul(qr_c, S).mul_(z[:, :, c])
        dden = (g * y_z).sum(-1, keepdim=True).neg_()  # -(dout . y) z^2, [B, heads, n, 1]
        torch.mul(dden, kbar[:, :, None], out=dq[:, :, c])
        dkbar += _matmul(dden.transpose(2, 3), _heads(q[:, c], acc))  # the row dden^T q, as for z
    dS /= N
    dk_rot, dv = q.new_empty(B, H, N, D, dtype=acc), q.new_empty(B, H, N, v.shape[-1], dtype=acc)
    for c in spans:
        _matmul(_heads(v[:, c], acc), dS.transpose(2, 3), out=dk_rot[:, :, c])
        _matmul(_heads(k_rot[:, c], acc), dS, out=dv[:, :, c])
    dk = (dkbar[:, :, 0] / N).to(k.dtype)[:, None].expand_as(k)
    heads_last = [t.to(dtype).transpose(1, 2) for t, dtype in
                  ((dq_rot, q_rot.dtype), (dk_rot, k_rot.dtype), (dq, q.dtype), (dv, v.dtype))]
    return heads_last[0], heads_last[1], heads_last[2], dk, heads_last[3]


class _LinearAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_rot, k_rot, q, k, v, eps: float, chunk_size: int | None):
        out, S, kbar, z = _torch_forward(q_rot, k_rot, q, k, v, eps, chunk_size)
        saved_out = out if out.dtype == S.dtype else None  # half outputs are too coarse to reuse
        ctx.save_for_backward(q_rot, k_rot, q, k, v, S, kbar, z, saved_out)
        ctx.eps, ctx.chunk_size = eps, chunk_size
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        grads = _torch_backward(dout, *ctx.saved_tensors, ctx.eps, ctx.chunk_size)
        return (*grads, None, None)


# --------------------------------------------------------------------------------------------- Triton
# The kernels are plain functions compiled by ``triton.jit`` on first use rather than at import, so
# ``TRITON_INTERPRET=1`` (CPU tests) takes effect whenever it is set before the first Triton call, as for
# the neighborhood-attention kernels. Tensors are contiguous ``[B, N, heads, d]``; per (batch, head) a
# tile is ``[BLOCK_N, BLOCK_D]`` at ``base + row * stride_n + col``. ``S``/``kbar`` and their gradients are
# contiguous ``[B * heads, d, dv]`` / ``[B * heads, d]``.


def _fwd_summary_kernel(KR, K, V, S_PART, KSUM_PART, N, H, D, DV, n_tiles, n_split,
                        stride_b, stride_n, vstride_b, vstride_n,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Pass 1: program (split, b*H+h) sums ``k~^T v`` and ``k`` over N tiles split, split + n_split, ..."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d, mask_e = offs_d < D, offs_e < DV
    base = b * stride_b + h * D
    vbase = b * vstride_b + h * DV
    s_acc = tl.zeros([BLOCK_D, BLOCK_DV], dtype=S_PART.dtype.element_ty)
    k_acc = tl.zeros([BLOCK_D], dtype=S_PART.dtype.element_ty)
    for t in range(split, n_tiles, n_split):
        rows = t * BLOCK_N + offs_n
        mask_n = rows < N
        qk_mask = mask_n[:, None] & mask_d[None, :]
        kr = tl.load(KR + base + rows[:, None] * stride_n + offs_d[None, :], mask=qk_mask, other=0.0)
        k = tl.load(K + base + rows[:, None] * stride_n + offs_d[None, :], mask=qk_mask, other=0.0)
        v = tl.load(V + vbase + rows[:, None] * vstride_n + offs_e[None, :],
                    mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        s_acc += tl.dot(tl.trans(kr), v, input_precision="ieee")
        k_acc += tl.sum(k, axis=0)
    part = bh * n_split + split
    tl.store(S_PART + part * D * DV + offs_d[:, None] * DV + offs_e[None, :], s_acc,
             mask=mask_d[:, None] & mask_e[None, :])
    tl.store(KSUM_PART + part * D + offs_d, k_acc, mask=mask_d)


def _fwd_output_kernel(QR, Q, S, KBAR, OUT, N, H, D, DV, eps, stride_b, stride_n, vstride_b, vstride_n,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Pass 2: program (tile, b*H+h) writes ``out = (q~ S) / (q . kbar + eps)`` for one N tile."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n, mask_d, mask_e = rows < N, offs_d < D, offs_e < DV
    s = tl.load(S + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=mask_d[:, None] & mask_e[None, :],
                other=0.0)
    kbar = tl.load(KBAR + bh * D + offs_d, mask=mask_d, other=0.0)
    ptrs = b * stride_b + h * D + rows[:, None] * stride_n + offs_d[None, :]
    qk_mask = mask_n[:, None] & mask_d[None, :]
    q = tl.load(Q + ptrs, mask=qk_mask, other=0.0)
    qr = tl.load(QR + ptrs, mask=qk_mask, other=0.0)
    den = tl.sum(q * kbar[None, :], axis=1) + eps
    out = tl.dot(qr, s, input_precision="ieee") / den[:, None]
    tl.store(OUT + b * vstride_b + h * DV + rows[:, None] * vstride_n + offs_e[None, :], out,
             mask=mask_n[:, None] & mask_e[None, :])


def _bwd_query_kernel(QR, Q, DOUT, S, KBAR, DQR, DQ, DS_PART, DKBAR_PART, N, H, D, DV, n_tiles, n_split, eps,
                      stride_b, stride_n, vstride_b, vstride_n,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Pass 3: per N tile ``dq~`` and ``dq``; partial sums of ``dS = sum q~^T g`` and ``sum dden q``."""
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_d, mask_e = offs_d < D, offs_e < DV
    s_mask = mask_d[:, None] & mask_e[None, :]
    s = tl.load(S + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=s_mask, other=0.0)
    kbar = tl.load(KBAR + bh * D + offs_d, mask=mask_d, other=0.0)
    base = b * stride_b + h * D
    vbase = b * vstride_b + h * DV
    ds_acc = tl.zeros([BLOCK_D, BLOCK_DV], dtype=DS_PART.dtype.element_ty)
    dk_acc = tl.zeros([BLOCK_D], dtype=DS_PART.dtype.element_ty)
    for t in range(split, n_tiles, n_split):
        rows = t * BLOCK_N + offs_n
        mask_n = rows < N
        qk_mask = mask_n[:, None] & mask_d[None, :]
        ptrs = base + rows[:, None] * stride_n + offs_d[None, :]
        q = tl.load(Q + ptrs, mask=qk_mask, other=0.0)
        qr = tl.load(QR + ptrs, mask=qk_mask, other=0.0)
        dout = tl.load(DOUT + vbase + rows[:, None] * vstride_n + offs_e[None, :],
                       mask=mask_n[:, None] & mask_e[None, :], other=0.0)
        z = 1.0 / (tl.sum(q * kbar[None, :], axis=1) + eps)
        g = dout * z[:, None]
        tl.store(DQR + ptrs, tl.dot(g, tl.trans(s), input_precision="ieee"), mask=qk_mask)
        y = tl.dot(qr, s, input_precision="ieee")
        dden = -tl.sum(dout * y, axis=1) * z * z
        tl.store(DQ + ptrs, dden[:, None] * kbar[None, :], mask=qk_mask)
        ds_acc += tl.dot(tl.trans(qr), g, input_precision="ieee")
        dk_acc += tl.sum(dden[:, None] * q, axis=0)
    part = bh * n_split + split
    tl.store(DS_PART + part * D * DV + offs_d[:, None] * DV + offs_e[None, :], ds_acc, mask=s_mask)
    tl.store(DKBAR_PART + part * D + offs_d, dk_acc, mask=mask_d)


def _bwd_key_kernel(KR, V, DS, DKMEAN, DKR, DK, DV_OUT, N, H, D, DV, stride_b, stride_n, vstride_b, vstride_n,
                    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    """Pass 4: per N tile ``dk~ = v dS^T``, ``dv = k~ dS`` (``dS`` already divided by N) and ``dk = dkbar / N``."""
    tile = tl.program_id(0)
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    mask_n, mask_d, mask_e = rows < N, offs_d < D, offs_e < DV
    ds = tl.load(DS + bh * D * DV + offs_d[:, None] * DV + offs_e[None, :], mask=mask_d[:, None] & mask_e[None, :],
                 other=0.0)
    dkmean = tl.load(DKMEAN + bh * D + offs_d, mask=mask_d, other=0.0)
    ptrs = b * stride_b + h * D + rows[:, None] * stride_n + offs_d[None, :]
    vptrs = b * vstride_b + h * DV + rows[:, None] * vstride_n + offs_e[None, :]
    qk_mask = mask_n[:, None] & mask_d[None, :]
    v_mask = mask_n[:, None] & mask_e[None, :]
    kr = tl.load(KR + ptrs, mask=qk_mask, other=0.0)
    v = tl.load(V + vptrs, mask=v_mask, other=0.0)
    tl.store(DKR + ptrs, tl.dot(v, tl.trans(ds), input_precision="ieee"), mask=qk_mask)
    tl.store(DV_OUT + vptrs, tl.dot(kr, ds, input_precision="ieee"), mask=v_mask)
    tl.store(DK + ptrs, tl.broadcast_to(dkmean[None, :], [BLOCK_N, BLOCK_D]), mask=qk_mask)


@functools.lru_cache(maxsize=1)
def _kernels():
    return {fn.__name__: triton.jit(fn) for fn in
            (_fwd_summary_kernel, _fwd_output_kernel, _bwd_query_kernel, _bwd_key_kernel)}


def _launch_config(N: int, D: int, DV: int) -> tuple[int, int, int, int, int]:
    """``BLOCK_N, BLOCK_D, BLOCK_DV, n_tiles, n_split``; tl.dot needs tiles of at least 16. The interpreter
    gets small tiles and few splits so that tests cover tails and several tiles per program."""
    block_d, block_dv = max(16, triton.next_power_of_2(D)), max(16, triton.next_power_of_2(DV))
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    block_n = 16 if interpret else 64
    n_tiles = triton.cdiv(N, block_n)
    return block_n, block_d, block_dv, n_tiles, min(n_tiles, 2 if interpret else 32)


def _triton_forward(q_rot, k_rot, q, k, v, eps: float):
    kernels = _kernels()
    acc = _acc_dtype(q.dtype)
    q_rot, k_rot, q, k, vc = (t.contiguous().to(acc) for t in (q_rot, k_rot, q, k, v))
    B, N, H, D = q.shape
    DV = vc.shape[-1]
    block_n, block_d, block_dv, n_tiles, n_split = _launch_config(N, D, DV)
    blocks = dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv)
    strides = (q.stride(0), q.stride(1), vc.stride(0), vc.stride(1))
    s_part = q.new_empty((B * H, n_split, D, DV))
    ksum_part = q.new_empty((B * H, n_split, D))
    kernels["_fwd_summary_kernel"][(n_split, B * H)](
        k_rot, k, vc, s_part, ksum_part, N, H, D, DV, n_tiles, n_split, *strides, **blocks)
    S = s_part.sum(1) / N
    kbar = ksum_part.sum(1) / N
    out = torch.empty_like(vc)
    kernels["_fwd_output_kernel"][(n_tiles, B * H)](q_rot, q, S, kbar, out, N, H, D, DV, eps, *strides, **blocks)
    return out.to(v.dtype), S.view(B, H, D, DV), kbar.view(B, H, D)


def _triton_backward(dout, q_rot, k_rot, q, k, v, S, kbar, eps: float):
    kernels = _kernels()
    acc = S.dtype
    dtypes = [t.dtype for t in (q_rot, k_rot, q, k, v)]
    q_rot, k_rot, q, vc, dout = (t.contiguous().to(acc) for t in (q_rot, k_rot, q, v, dout))
    B, N, H, D = q.shape
    DV = vc.shape[-1]
    block_n, block_d, block_dv, n_tiles, n_split = _launch_config(N, D, DV)
    blocks = dict(BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_DV=block_dv)
    strides = (q.stride(0), q.stride(1), vc.stride(0), vc.stride(1))
    dq_rot, dq = torch.empty_like(q), torch.empty_like(q)
    ds_part = q.new_empty((B * H, n_split, D, DV))
    dkbar_part = q.new_empty((B * H, n_split, D))
    kernels["_bwd_query_kernel"][(n_split, B * H)](
        q_rot, q, dout, S.contiguous(), kbar.contiguous(), dq_rot, dq, ds_part, dkbar_part,
        N, H, D, DV, n_tiles, n_split, eps, *strides, **blocks)
    dS = ds_part.sum(1) / N
    dkmean = dkbar_part.sum(1) / N
    dk_rot, dk, dv = torch.empty_like(q), torch.empty_like(q), torch.empty_like(vc)
    kernels["_bwd_key_kernel"][(n_tiles, B * H)](
        k_rot, vc, dS, dkmean, dk_rot, dk, dv, N, H, D, DV, *strides, **blocks)
    return tuple(g.to(dt) for g, dt in zip((dq_rot, dk_rot, dq, dk, dv), dtypes))


@torch.library.custom_op("visionattn::linear_attention_forward", mutates_args=())
def _triton_forward_op(q_rot: torch.Tensor, k_rot: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_forward(q_rot, k_rot, q, k, v, eps)


@_triton_forward_op.register_fake
def _(q_rot, k_rot, q, k, v, eps):
    B, N, H, D = q.shape
    acc = _acc_dtype(q.dtype)
    return v.new_empty(v.shape), q.new_empty((B, H, D, v.shape[-1]), dtype=acc), q.new_empty((B, H, D), dtype=acc)


@torch.library.custom_op("visionattn::linear_attention_backward", mutates_args=())
def _triton_backward_op(dout: torch.Tensor, q_rot: torch.Tensor, k_rot: torch.Tensor, q: torch.Tensor,
                        k: torch.Tensor, v: torch.Tensor, S: torch.Tensor, kbar: torch.Tensor, eps: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return _triton_backward(dout, q_rot, k_rot, q, k, v, S, kbar, eps)


@_triton_backward_op.register_fake
def _(dout, q_rot, k_rot, q, k, v, S, kbar, eps):
    return tuple(torch.empty_like(t) for t in (q_rot, k_rot, q, k, v))


def _setup_context(ctx, inputs, output):
    q_rot, k_rot, q, k, v, eps = inputs
    _, S, kbar = output
    ctx.save_for_backward(q_rot, k_rot, q, k, v, S, kbar)
    ctx.mark_non_differentiable(S, kbar)
    ctx.eps = eps


def _backward(ctx, dout, _dS, _dkbar):
    grads = _triton_backward_op(dout.contiguous(), *ctx.saved_tensors, ctx.eps)
    return (*grads, None)


_triton_forward_op.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formula() -> None:
    """Count the Triton op in ``torch.utils.flop_counter`` as the torch path's einsums are counted:
    ``S`` and the outputs (``2 N d dv`` multiply-adds) plus the normaliser (``N d``), per batch and head."""
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.visionattn.linear_attention_forward)
    def _linear_attention_flops(q_rot_shape, k_rot_shape, q_shape, k_shape, v_shape, *args, out_shape=None,
                                **kwargs) -> int:
        B, N, H, D = q_shape
        return 2 * B * H * N * (2 * D * v_shape[-1] + D)


_register_flop_formula()


# ----------------------------------------------------------------------------------------------- API


def _check(q, k, v, q_rot, k_rot, eps, chunk_size) -> None:
    for name, t in (("q", q), ("k", k), ("v", v), ("q_rot", q_rot), ("k_rot", k_rot)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"linear_attention: {name} must be a tensor, got {type(t).__name__}")
    if q.ndim != 4:
        raise ValueError(f"linear_attention: q must be [B, N, heads, d], got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("q_rot", q_rot), ("k_rot", k_rot)):
        if t.shape != q.shape:
            raise ValueError(f"linear_attention: {name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    if v.ndim != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"linear_attention: v must be [B, N, heads, dv] = [{', '.join(map(str, q.shape[:3]))}, dv], "
                         f"got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v), ("q_rot", q_rot), ("k_rot", k_rot)):
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"linear_attention: {name} is {t.dtype} on {t.device}, q is {q.dtype} on {q.device}")
    if not q.is_floating_point():
        raise ValueError(f"linear_attention: inputs must be floating point, got {q.dtype}")
    if q.shape[1] == 0:
        raise ValueError("linear_attention: N must be at least 1")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"linear_attention: eps must be a number >= 0, got {eps!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"linear_attention: chunk_size must be None or an int >= 1, got {chunk_size!r}")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_rot: torch.Tensor | None = None,
                     k_rot: torch.Tensor | None = None, *, eps: float = 1e-6, chunk_size: int | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """Non-causal linear attention with an un-rotated normaliser (HER-Seg's DLA; formulas in the module doc).

    Positional: the tensors ``q, k, v`` and, optionally, ``q_rot, k_rot``; everything else is keyword-only.

    Args:
        q, k: feature-mapped (non-negative for a well-defined normaliser) queries and keys ``[B, N, heads, d]``.
        v: values ``[B, N, heads, dv]``.
        q_rot, k_rot: rotated copies of ``q, k`` (same shape) used in the ``q~ k~^T v`` product; both or
            neither (default ``q, k``: plain linear attention).
        eps: added to the normaliser's denominator ``q_n . mean(k)``.
        chunk_size: tokens per chunk of the ``'torch'`` backend; None (the default): all N at once, one
            contraction per product (the fastest; its temporaries are ``N x d`` either way).
        backend: ``'auto'``, ``'reference'``, ``'torch'`` or ``'triton'`` (:mod:`visionattn.kernels.backends`).

    Returns:
        ``[B, N, heads, dv]`` in the inputs' dtype.
    """
    check_backend("linear_attention", backend)
    if (q_rot is None) != (k_rot is None):
        raise ValueError("linear_attention: pass q_rot and k_rot together (rotating only one side mixes "
                         "rotated and unrotated features), or neither")
    q_rot = q if q_rot is None else q_rot
    k_rot = k if k_rot is None else k_rot
    _check(q, k, v, q_rot, k_rot, eps, chunk_size)
    backend = resolve_backend("linear_attention", backend, q)
    if backend == "reference":
        return linear_attention_reference(q, k, v, q_rot, k_rot, eps=eps)
    if backend == "triton":
        return _triton_forward_op(q_rot, k_rot, q, k, v, float(eps))[0]
    return _LinearAttention.apply(q_rot, k_rot, q, k, v, float(eps), chunk_size)
