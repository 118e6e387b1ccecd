"""Fused neighborhood attention in Triton (CUDA; runs on CPU under ``TRITON_INTERPRET=1`` for tests).

Every problem is lifted to three axes (1-D and 2-D get leading axes of extent 1). A program owns
``BLOCK_Q`` consecutive queries of one dilation group along the last axis, with fixed coordinates on the
first two. Their windows on axes 0 and 1 are therefore shared, and are walked key row by key row; on the
last axis the union of their windows is one contiguous range, walked in ``BLOCK_KV`` blocks with the exact
per-query window as a mask. Scores go through ``tl.dot``, an online softmax (or sigmoid weights) and
never reach global memory: the forward writes only the output and the log-sum-exp.

The backward kernel walks the same keys per query block, writes dQ directly and accumulates dK, dV and
the relative-positional-bias gradient with fp32 atomics (several query blocks share keys).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from visionattn.kernels.semantics import NAParams

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _window(p, Lg, K: tl.constexpr, S: tl.constexpr, CAUSAL: tl.constexpr):
    """[start, end) of the window of group position p (NATTEN's rule; see semantics.py)."""
    if CAUSAL:
        leader = tl.minimum((p // S) * S + S - 1, Lg - 1)
        start = tl.maximum(leader - K + 1, 0)
        end = p + 1
    else:
        leader = tl.minimum((p // S) * S + S // 2, Lg - 1)
        start = tl.minimum(tl.maximum(leader - K // 2, 0), Lg - K)
        end = start + K
    return start, end


@triton.jit
def _program_tile(L0, L1, L2, H, n_qblocks2,
                  K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
                  D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
                  S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
                  C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, BLOCK_Q: tl.constexpr):
    """This program's batch, head and query tile: fixed coordinates (i0, i1) with their windows on axes 0
    and 1, and BLOCK_Q queries of dilation group g2 on the last axis with their windows and union [lo, hi)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    qb = pid % n_qblocks2
    rest = pid // n_qblocks2
    g2 = rest % D2
    rest = rest // D2
    i1 = rest % L1
    i0 = rest // L1

    g0 = i0 % D0
    p0 = i0 // D0
    Lg0 = L0 // D0 + (g0 < L0 % D0).to(tl.int32)
    g1 = i1 % D1
    p1 = i1 // D1
    Lg1 = L1 // D1 + (g1 < L1 % D1).to(tl.int32)
    Lg2 = L2 // D2 + (g2 < L2 % D2).to(tl.int32)
    w0s, w0e = _window(p0, Lg0, K0, S0, C0)
    w1s, w1e = _window(p1, Lg1, K1, S1, C1)

    p2 = qb * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_valid = p2 < Lg2
    p2c = tl.minimum(p2, Lg2 - 1)
    w2s, w2e = _window(p2c, Lg2, K2, S2, C2)
    lo = tl.min(tl.where(q_valid, w2s, 1 << 30), axis=0)
    hi = tl.max(tl.where(q_valid, w2e, 0), axis=0)
    i2 = p2c * D2 + g2
    return b, h, i0, i1, g0, g1, g2, p0, p1, w0s, w0e, w1s, w1e, p2c, q_valid, w2s, w2e, lo, hi, i2


@triton.jit
def _na_fwd_kernel(
    Q, Kt, V, RPB, DECAY, O, LSE,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    so_b, so_0, so_1, so_2, so_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,
    L0, L1, L2, H, D, DV, n_qblocks2, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_DECAY: tl.constexpr, SIGMOID: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    b, h, i0, i1, g0, g1, g2, p0, p1, w0s, w0e, w1s, w1e, p2c, q_valid, w2s, w2e, lo, hi, i2 = _program_tile(
        L0, L1, L2, H, n_qblocks2, K0, K1, K2, D0, D1, D2, S0, S1, S2, C0, C1, C2, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sq_b + i0 * sq_0 + i1 * sq_1 + i2[:, None] * sq_2 + h * sq_h + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_valid[:, None] & (offs_d[None, :] < D), other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_Q], -1.0e30, tl.float32)
    l_i = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_DV], tl.float32)
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    for m0 in range(w0s, w0e):
        j0 = m0 * D0 + g0
        for m1 in range(w1s, w1e):
            j1 = m1 * D1 + g1
            for kb in range(lo, hi, BLOCK_KV):
                kp2 = kb + tl.arange(0, BLOCK_KV)
                k_in = kp2 < hi
                j2 = kp2 * D2 + g2
                k_ptrs = Kt + b * sq_b + j0 * sq_0 + j1 * sq_1 + j2[:, None] * sq_2 + h * sq_h + offs_d[None, :]
                k = tl.load(k_ptrs, mask=k_in[:, None] & (offs_d[None, :] < D), other=0.0)
                if DOT_FP32:
                    k = k.to(tl.float32)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale  # [BLOCK_Q, BLOCK_KV] fp32
                allowed = (kp2[None, :] >= w2s[:, None]) & (kp2[None, :] < w2e[:, None]) & k_in[None, :] & q_valid[:, None]
                r = ((m0 - p0 + K0 - 1) * R1 + (m1 - p1 + K1 - 1)) * R2 + (kp2[None, :] - p2c[:, None] + K2 - 1)
                r = tl.where(allowed, r, 0)
                if HAS_RPB:
                    s += tl.load(RPB + h * (2 * K0 - 1) * R1 * R2 + r).to(tl.float32)
                v_ptrs = V + b * sv_b + j0 * sv_0 + j1 * sv_1 + j2[:, None] * sv_2 + h * sv_h + offs_dv[None, :]
                v = tl.load(v_ptrs, mask=k_in[:, None] & (offs_dv[None, :] < DV), other=0.0)
                if DOT_FP32:
                    v = v.to(tl.float32)
                if SIGMOID:
                    p = tl.where(allowed, tl.sigmoid(s), 0.0)
                    if HAS_DECAY:
                        p = p * tl.load(DECAY + h * (2 * K0 - 1) * R1 * R2 + r).to(tl.float32)
                    acc += tl.dot(p.to(v.dtype), v, input_precision="ieee")
                else:
                    s = tl.where(allowed, s, float("-inf"))
                    m_new = tl.maximum(m_i, tl.max(s, axis=1))
                    alpha = tl.exp(m_i - m_new)
                    p = tl.exp(s - m_new[:, None])
                    l_i = l_i * alpha + tl.sum(p, axis=1)
                    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
                    m_i = m_new
    if not SIGMOID:
        l_i = tl.where(q_valid, l_i, 1.0)  # padded query slots saw no key
        acc = acc / l_i[:, None]
        lse_ptrs = LSE + b * sl_b + i0 * sl_0 + i1 * sl_1 + i2 * sl_2 + h * sl_h
        tl.store(lse_ptrs, m_i + tl.log(l_i), mask=q_valid)
    o_ptrs = O + b * so_b + i0 * so_0 + i1 * so_1 + i2[:, None] * so_2 + h * so_h + offs_dv[None, :]
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=q_valid[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _na_bwd_kernel(
    Q, Kt, V, RPB, DECAY, DO, LSE, DELTA, DQ, DK, DV_, DRPB,
    sq_b, sq_0, sq_1, sq_2, sq_h,
    sv_b, sv_0, sv_1, sv_2, sv_h,
    sl_b, sl_0, sl_1, sl_2, sl_h,
    L0, L1, L2, H, D, DV, n_qblocks2, scale,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,
    D0: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr,
    S0: tl.constexpr, S1: tl.constexpr, S2: tl.constexpr,
    C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr,
    HAS_RPB: tl.constexpr, HAS_DECAY: tl.constexpr, SIGMOID: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_KV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    # Q, K, V, DO arrive as fp32 copies; DQ/DK/DV_ are fp32 with Q's (or V's) strides.
    b, h, i0, i1, g0, g1, g2, p0, p1, w0s, w0e, w1s, w1e, p2c, q_valid, w2s, w2e, lo, hi, i2 = _program_tile(
        L0, L1, L2, H, n_qblocks2, K0, K1, K2, D0, D1, D2, S0, S1, S2, C0, C1, C2, BLOCK_Q)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    qmask = q_valid[:, None] & (offs_d[None, :] < D)
    q_off = b * sq_b + i0 * sq_0 + i1 * sq_1 + i2[:, None] * sq_2 + h * sq_h + offs_d[None, :]
    q = tl.load(Q + q_off, mask=qmask, other=0.0)
    do_off = b * sv_b + i0 * sv_0 + i1 * sv_1 + i2[:, None] * sv_2 + h * sv_h + offs_dv[None, :]
    do = tl.load(DO + do_off, mask=q_valid[:, None] & (offs_dv[None, :] < DV), other=0.0)
    l_off = b * sl_b + i0 * sl_0 + i1 * sl_1 + i2 * sl_2 + h * sl_h
    if not SIGMOID:
        lse = tl.load(LSE + l_off, mask=q_valid, other=0.0)
        delta = tl.load(DELTA + l_off, mask=q_valid, other=0.0)

    dq = tl.zeros([BLOCK_Q, BLOCK_D], tl.float32)
    R1: tl.constexpr = 2 * K1 - 1
    R2: tl.constexpr = 2 * K2 - 1
    for m0 in range(w0s, w0e):
        j0 = m0 * D0 + g0
        for m1 in range(w1s, w1e):
            j1 = m1 * D1 + g1
            for kb in range(lo, hi, BLOCK_KV):
                kp2 = kb + tl.arange(0, BLOCK_KV)
                k_in = kp2 < hi
                j2 = kp2 * D2 + g2
                k_off = b * sq_b + j0 * sq_0 + j1 * sq_1 + j2[:, None] * sq_2 + h * sq_h + offs_d[None, :]
                kmask = k_in[:, None] & (offs_d[None, :] < D)
                k = tl.load(Kt + k_off, mask=kmask, other=0.0)
                v_off = b * sv_b + j0 * sv_0 + j1 * sv_1 + j2[:, None] * sv_2 + h * sv_h + offs_dv[None, :]
                vmask = k_in[:, None] & (offs_dv[None, :] < DV)
                v = tl.load(V + v_off, mask=vmask, other=0.0)
                s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
                allowed = (kp2[None, :] >= w2s[:, None]) & (kp2[None, :] < w2e[:, None]) & k_in[None, :] & q_valid[:, None]
                r = ((m0 - p0 + K0 - 1) * R1 + (m1 - p1 + K1 - 1)) * R2 + (kp2[None, :] - p2c[:, None] + K2 - 1)
                r = tl.where(allowed, r, 0)
                if HAS_RPB:
                    s += tl.load(RPB + h * (2 * K0 - 1) * R1 * R2 + r).to(tl.float32)
                dp = tl.dot(do, tl.trans(v), input_precision="ieee")
                if SIGMOID:
                    sig = tl.sigmoid(s)
                    p = tl.where(allowed, sig, 0.0)
                    ds = dp * p * (1.0 - sig)
                    if HAS_DECAY:
                        dec = tl.load(DECAY + h * (2 * K0 - 1) * R1 * R2 + r).to(tl.float32)
                        p = p * dec
                        ds = ds * dec
                else:
                    p = tl.where(allowed, tl.exp(s - lse[:, None]), 0.0)
                    ds = p * (dp - delta[:, None])
                tl.atomic_add(DV_ + v_off, tl.dot(tl.trans(p), do, input_precision="ieee"), mask=vmask)
                tl.atomic_add(DK + k_off, tl.dot(tl.trans(ds), q, input_precision="ieee") * scale, mask=kmask)
                dq += tl.dot(ds, k, input_precision="ieee")
                if HAS_RPB:
                    tl.atomic_add(DRPB + h * (2 * K0 - 1) * R1 * R2 + r, ds, mask=allowed)
    tl.store(DQ + q_off, dq * scale, mask=qmask)


def _lift3(seq, fill):
    seq = list(seq)
    return [fill] * (3 - len(seq)) + seq


def _blocks(D: int, Dv: int) -> tuple[int, int, int, int]:
    block_d = max(16, triton.next_power_of_2(D))
    block_dv = max(16, triton.next_power_of_2(Dv))
    if INTERPRET:
        return 16, 16, block_d, block_dv
    return 64, 64, block_d, block_dv


def _as3(x: torch.Tensor) -> torch.Tensor:
    """``[B, *spatial, h, D]`` -> ``[B, X0, X1, X2, h, D]`` view."""
    B, *spatial, h, D = x.shape
    return x.view(B, *_lift3(spatial, 1), h, D)


def _common(q, params: NAParams):
    n = q.dim() - 3
    L = _lift3(q.shape[1:1 + n], 1)
    ks = _lift3(params.kernel_size, 1)
    dil = _lift3(params.dilation, 1)
    st = _lift3(params.stride, 1)
    causal = _lift3(params.is_causal, False)
    Lg2_max = math.ceil(L[2] / dil[2])
    return L, ks, dil, st, causal, Lg2_max


def triton_forward(q, k, v, rpb, decay, params: NAParams):
    """Fused forward; same contract as :func:`visionattn.kernels.tiled.tiled_forward`."""
    B, *spatial, h, D = q.shape
    Dv = v.shape[-1]
    scale, sigmoid = params.scale, params.sigmoid
    L, ks, dil, st, causal, Lg2_max = _common(q, params)
    BLOCK_Q, BLOCK_KV, BLOCK_D, BLOCK_DV = _blocks(D, Dv)
    q3, k3, v3 = _as3(q.contiguous()), _as3(k.contiguous()), _as3(v.contiguous())
    out = torch.empty_like(v3)
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    lse = torch.empty(out.shape[:-1], device=q.device, dtype=lse_dtype)
    n_qblocks2 = triton.cdiv(Lg2_max, BLOCK_Q)
    grid = (L[0] * L[1] * dil[2] * n_qblocks2, B * h)
    rpb_arg = rpb.contiguous() if rpb is not None else q3
    decay_arg = decay.contiguous() if decay is not None else q3
    _na_fwd_kernel[grid](
        q3, k3, v3, rpb_arg, decay_arg, out, lse,
        *q3.stride()[:5], *v3.stride()[:5], *out.stride()[:5], *lse.stride(),
        L[0], L[1], L[2], h, D, Dv, n_qblocks2, scale,
        K0=ks[0], K1=ks[1], K2=ks[2], D0=dil[0], D1=dil[1], D2=dil[2], S0=st[0], S1=st[1], S2=st[2],
        C0=causal[0], C1=causal[1], C2=causal[2], HAS_RPB=rpb is not None, HAS_DECAY=decay is not None, SIGMOID=sigmoid,
        DOT_FP32=INTERPRET or q.dtype in (torch.float32, torch.float64),
        BLOCK_Q=BLOCK_Q, BLOCK_KV=BLOCK_KV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
    )
    if sigmoid:
        lse.zero_()
    return out.view(*q.shape[:-1], Dv), lse.view(q.shape[:-1])


def triton_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params: NAParams):
    """Fused backward; same contract as :func:`visionattn.kernels.tiled.tiled_backward`."""
    B, *spatial, h, D = q.shape
    Dv = v.shape[-1]
    scale, sigmoid = params.scale, params.sigmoid
    L, ks, dil, st, causal, Lg2_max = _common(q, params)
    BLOCK_Q, BLOCK_KV, BLOCK_D, BLOCK_DV = _blocks(D, Dv)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    q3, k3, v3 = (_as3(x.contiguous().to(acc)) for x in (q, k, v))
    do3 = _as3(dout.contiguous().to(acc))
    lse3 = lse.reshape(q3.shape[:-1]).to(acc).contiguous()
    delta = (do3 * _as3(out.contiguous()).to(acc)).sum(-1)
    if dlse is not None and not sigmoid:
        delta = delta - dlse.reshape(delta.shape).to(acc)  # d lse / d s = p
    delta = delta.contiguous()
    dq = torch.empty_like(q3)
    dk = torch.zeros_like(k3)
    dv = torch.zeros_like(v3)
    drpb = torch.zeros(rpb.shape, device=q.device, dtype=acc) if rpb is not None else None
    n_qblocks2 = triton.cdiv(Lg2_max, BLOCK_Q)
    grid = (L[0] * L[1] * dil[2] * n_qblocks2, B * h)
    rpb_arg = rpb.contiguous() if rpb is not None else q3
    decay_arg = decay.contiguous().to(acc) if decay is not None else q3
    _na_bwd_kernel[grid](
        q3, k3, v3, rpb_arg, decay_arg, do3, lse3, delta, dq, dk, dv, drpb if drpb is not None else dq,
        *q3.stride()[:5], *v3.stride()[:5], *lse3.stride(),
        L[0], L[1], L[2], h, D, Dv, n_qblocks2, scale,
        K0=ks[0], K1=ks[1], K2=ks[2], D0=dil[0], D1=dil[1], D2=dil[2], S0=st[0], S1=st[1], S2=st[2],
        C0=causal[0], C1=causal[1], C2=causal[2], HAS_RPB=rpb is not None, HAS_DECAY=decay is not None, SIGMOID=sigmoid,
        BLOCK_Q=BLOCK_Q, BLOCK_KV=BLOCK_KV, BLOCK_D=BLOCK_D, BLOCK_DV=BLOCK_DV,
    )
    dq = dq.to(q.dtype).view(q.shape)
    dk = dk.to(k.dtype).view(k.shape)
    dv = dv.to(v.dtype).view(v.shape)
    if drpb is not None:
        drpb = drpb.to(rpb.dtype)
    return dq, dk, dv, drpb
