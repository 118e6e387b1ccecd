"""Fused Triton kernels for top-K sparse attention (``topk_attention(..., backend='triton')``).

One program handles ``BLOCK_Q`` queries of one (batch, head) against all ``Nk`` keys, which it holds as one
``[BLOCK_Q, BLOCK_K]`` score tile (``BLOCK_K = next_pow2(Nk)``, at most ``TRITON_MAX_KEYS``). Per query
row and per ``K`` it finds the ``K``-th largest score exactly, with a radix select on the scores' bits
(the float's bits mapped to integers of the same order; one counting pass per bit, all on chip), keeps
the scores above it and, among the scores equal to it, the lowest key indices until ``K`` are kept (the
rule of :mod:`visionattn.kernels.sparse_attention`). The softmax over the kept scores, mixed over the
``R`` values of ``K`` by ``mix``, multiplies ``V``; the scores never reach global memory.

The backward kernel recomputes the scores and masks, writes ``dQ``, accumulates ``dK`` and ``dV`` with
atomics (several query blocks share the keys) and writes per-program partial sums of ``d mix``, summed
by torch. Inputs are computed in fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _order_key(s, KEY_BITS: tl.constexpr):
    """Signed integers with the order of the float scores ``s`` (``-0.0`` mapped to ``+0.0`` first, so the
    two zeros tie as they compare equal): negative floats get their magnitude bits flipped."""
    s = tl.where(s == 0.0, 0.0, s)
    if KEY_BITS == 64:
        bits = s.to(tl.int64, bitcast=True)
        key = bits ^ ((bits >> 63) & 0x7FFFFFFFFFFFFFFF)
    else:
        bits = s.to(tl.int32, bitcast=True)
        key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return key


@triton.jit
def _keep_mask(key, valid, top_k, KEY_BITS: tl.constexpr, LOWEST: tl.constexpr):
    """``[BLOCK_Q, BLOCK_K]`` mask of each row's ``top_k`` largest keys (among ``valid``), ties at the
    ``top_k``-th value won by the lower index. The threshold is built from the most significant bit
    down: the largest ``t`` with ``count(key >= t) >= top_k`` is the ``top_k``-th largest key."""
    n_nonneg = tl.sum(((key >= 0) & valid).to(tl.int32), axis=1)
    zero = tl.zeros([key.shape[0]], dtype=key.dtype)
    prefix = tl.where(n_nonneg >= top_k, zero, zero + LOWEST)
    for bit in tl.static_range(KEY_BITS - 2, -1, -1):
        cand = prefix | (1 << bit)
        count = tl.sum(((key >= cand[:, None]) & valid).to(tl.int32), axis=1)
        prefix = tl.where(count >= top_k, cand, prefix)
    above = (key > prefix[:, None]) & valid
    tied = (key == prefix[:, None]) & valid
    places = top_k - tl.sum(above.to(tl.int32), axis=1)
    rank = tl.cumsum(tied.to(tl.int32), axis=1)
    return above | (tied & (rank <= places[:, None]))


@triton.jit
def _scores(Q, Kt, bh, rows, q_valid, cols, k_valid, Nq, Nk, D, scale,
            BLOCK_D: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    q = tl.load(Q + bh * Nq * D + rows[:, None] * D + offs_d[None, :],
                mask=q_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    k = tl.load(Kt + bh * Nk * D + cols[:, None] * D + offs_d[None, :],
                mask=k_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
    return q, k, s


@triton.jit
def _topk_fwd_kernel(Q, Kt, V, MIX, TOPK, OUT, Nq, Nk, D, DV, H, scale,
                     R: tl.constexpr, KEY_BITS: tl.constexpr, LOWEST: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = rows < Nq
    cols = tl.arange(0, BLOCK_K)
    k_valid = cols < Nk
    offs_e = tl.arange(0, BLOCK_DV)
    q, k, s = _scores(Q, Kt, bh, rows, q_valid, cols, k_valid, Nq, Nk, D, scale, BLOCK_D)
    valid = k_valid[None, :]
    key = _order_key(s, KEY_BITS)
    m = tl.max(tl.where(valid, s, float("-inf")), axis=1)
    e = tl.where(valid, tl.exp(s - m[:, None]), 0.0)
    coeff = tl.zeros([BLOCK_Q, BLOCK_K], dtype=s.dtype)
    for r in tl.static_range(R):
        keep = _keep_mask(key, valid, tl.load(TOPK + r), KEY_BITS, LOWEST)
        z = tl.sum(tl.where(keep, e, 0.0), axis=1)
        w = tl.load(MIX + b * R + r)
        coeff += tl.where(keep, (w / z)[:, None], 0.0)
    e_valid = offs_e[None, :] < DV
    v = tl.load(V + bh * Nk * DV + cols[:, None] * DV + offs_e[None, :], mask=k_valid[:, None] & e_valid, other=0.0)
    out = tl.dot((e * coeff).to(v.dtype), v, input_precision="ieee")
    tl.store(OUT + bh * Nq * DV + rows[:, None] * DV + offs_e[None, :], out, mask=q_valid[:, None] & e_valid)


@triton.jit
def _topk_bwd_kernel(Q, Kt, V, MIX, TOPK, DOUT, DQ, DK, DV_, DMIX_PART, Nq, Nk, D, DV, H, n_qblocks, scale,
                     R: tl.constexpr, KEY_BITS: tl.constexpr, LOWEST: tl.constexpr,
                     BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr):
    qb = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    rows = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = rows < Nq
    cols = tl.arange(0, BLOCK_K)
    k_valid = cols < Nk
    offs_d = tl.arange(0, BLOCK_D)
    offs_e = tl.arange(0, BLOCK_DV)
    d_valid = offs_d[None, :] < D
    e_valid = offs_e[None, :] < DV
    q, k, s = _scores(Q, Kt, bh, rows, q_valid, cols, k_valid, Nq, Nk, D, scale, BLOCK_D)
    valid = k_valid[None, :]
    key = _order_key(s, KEY_BITS)
    m = tl.max(tl.where(valid, s, float("-inf")), axis=1)
    e = tl.where(valid, tl.exp(s - m[:, None]), 0.0)
    v_off = bh * Nk * DV + cols[:, None] * DV + offs_e[None, :]
    v = tl.load(V + v_off, mask=k_valid[:, None] & e_valid, other=0.0)
    dout = tl.load(DOUT + bh * Nq * DV + rows[:, None] * DV + offs_e[None, :], mask=q_valid[:, None] & e_valid,
                   other=0.0)
    e_dw = e * tl.dot(dout, tl.trans(v), input_precision="ieee")  # exp-scores times dL/d(mixed weights)
    coeff = tl.zeros([BLOCK_Q, BLOCK_K], dtype=s.dtype)
    correction = tl.zeros([BLOCK_Q, BLOCK_K], dtype=s.dtype)
    for r in tl.static_range(R):
        keep = _keep_mask(key, valid, tl.load(TOPK + r), KEY_BITS, LOWEST)
        z = tl.sum(tl.where(keep, e, 0.0), axis=1)
        row_dot = tl.sum(tl.where(keep, e_dw, 0.0), axis=1) / z  # <P_r, dW> per query
        tl.store(DMIX_PART + (bh * n_qblocks + qb) * R + r, tl.sum(tl.where(q_valid, row_dot, 0.0), axis=0))
        w = tl.load(MIX + b * R + r)
        coeff += tl.where(keep, (w / z)[:, None], 0.0)
        correction += tl.where(keep, (w * row_dot / z)[:, None], 0.0)
    p = e * coeff
    tl.atomic_add(DV_ + v_off, tl.dot(tl.trans(p), dout, input_precision="ieee"), mask=k_valid[:, None] & e_valid)
    ds = (e_dw * coeff - e * correction) * scale
    tl.store(DQ + bh * Nq * D + rows[:, None] * D + offs_d[None, :], tl.dot(ds, k, input_precision="ieee"),
             mask=q_valid[:, None] & d_valid)
    dk = tl.dot(tl.trans(ds), q, input_precision="ieee")
    tl.atomic_add(DK + bh * Nk * D + cols[:, None] * D + offs_d[None, :], dk, mask=k_valid[:, None] & d_valid)


def _config(Nk: int, D: int, Dv: int, dtype: torch.dtype) -> dict:
    block_k = max(16, triton.next_power_of_2(Nk))
    if INTERPRET:
        block_q, warps = 16, 4
    else:
        block_q = 64 if block_k <= 128 else 32 if block_k <= 512 else 16
        warps = 4 if block_k <= 256 else 8 if block_k <= 1024 else 16
    bits = 64 if dtype == torch.float64 else 32
    return dict(BLOCK_Q=block_q, BLOCK_K=block_k, BLOCK_D=max(16, triton.next_power_of_2(D)),
                BLOCK_DV=max(16, triton.next_power_of_2(Dv)), KEY_BITS=bits, LOWEST=-(1 << (bits - 1)),
                num_warps=warps)


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class _TritonTopK(torch.autograd.Function):
    """Heads-first ``q [B, H, Nq, D]``, ``k [B, H, Nk, D]``, ``v [B, H, Nk, Dv]``, ``mix [B, R]``."""

    @staticmethod
    def forward(ctx, q, k, v, mix, top_ks: tuple[int, ...], scale: float):
        acc = _acc(q.dtype)
        qa, ka, va = (t.contiguous().to(acc) for t in (q, k, v))
        mixa = mix.contiguous().to(acc)
        B, H, Nq, D = qa.shape
        Nk, Dv = ka.shape[2], va.shape[-1]
        cfg = _config(Nk, D, Dv, acc)
        topk = torch.tensor(top_ks, dtype=torch.int32, device=q.device)
        out = torch.empty((B, H, Nq, Dv), device=q.device, dtype=acc)
        grid = (triton.cdiv(Nq, cfg["BLOCK_Q"]), B * H)
        _topk_fwd_kernel[grid](qa, ka, va, mixa, topk, out, Nq, Nk, D, Dv, H, scale, R=len(top_ks), **cfg)
        ctx.save_for_backward(q, k, v, mix)
        ctx.top_ks, ctx.scale = top_ks, scale
        return out.to(v.dtype)

    @staticmethod
    def backward(ctx, dout):
        q, k, v, mix = ctx.saved_tensors
        acc = _acc(q.dtype)
        qa, ka, va, douta = (t.contiguous().to(acc) for t in (q, k, v, dout))
        mixa = mix.contiguous().to(acc)
        B, H, Nq, D = qa.shape
        Nk, Dv = ka.shape[2], va.shape[-1]
        R = len(ctx.top_ks)
        cfg = _config(Nk, D, Dv, acc)
        topk = torch.tensor(ctx.top_ks, dtype=torch.int32, device=q.device)
        n_qblocks = triton.cdiv(Nq, cfg["BLOCK_Q"])
        dq = torch.empty_like(qa)
        dk = torch.zeros_like(ka)
        dv = torch.zeros_like(va)
        dmix_part = torch.empty((B * H * n_qblocks, R), device=q.device, dtype=acc)
        _topk_bwd_kernel[(n_qblocks, B * H)](qa, ka, va, mixa, topk, douta, dq, dk, dv, dmix_part,
                                             Nq, Nk, D, Dv, H, n_qblocks, ctx.scale, R=R, **cfg)
        dmix = dmix_part.view(B, H * n_qblocks, R).sum(1)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dmix.to(mix.dtype), None, None


def triton_topk_attention(q, k, v, mix, top_ks: tuple[int, ...], scale: float) -> torch.Tensor:
    """Heads-first top-K attention (``[B, H, Nq, Dv]``), mixed over ``top_ks`` by ``mix [B, R]``; the contract
    of the chunked ``'torch'`` path in :mod:`visionattn.kernels.sparse_attention`."""
    return _TritonTopK.apply(q, k, v, mix, tuple(top_ks), float(scale))
