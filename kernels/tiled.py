"""Tiled neighborhood attention in plain PyTorch: the ``'torch'`` backend (any device; what ``'auto'`` picks off-GPU).

Queries are cut into tiles (per axis, within one dilation group); each tile attends to the union of its
queries' windows (the "halo"), a small dense block, with the exact window mask applied inside it. Tiles
are processed in chunks so that the score block of one chunk is all that is ever materialised; nothing of
size ``N * K^d`` or ``N^2`` is kept for backward. Backward recomputes the scores from the saved
log-sum-exp (softmax) and forms dQ, dK, dV and dRPB explicitly, as fused kernels do.

Per-axis tile tables come from :mod:`visionattn.kernels.semantics` and are cached per problem shape.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from visionattn.kernels.semantics import NAParams, group_length, window_bounds

# elements of one chunk's score block [B, tiles, heads, Tq, Hk]; bounds memory, keeps matmuls large
CHUNK_ELEMENTS = 1 << 23
DEFAULT_TILE = {1: 64, 2: 8, 3: 4}


@dataclass(frozen=True)
class AxisTiles:
    """Query tiles of one axis and their key halos (true indices, int64)."""

    q_index: torch.Tensor  # [n_tiles, T]; padded slots repeat the tile's last query
    q_valid: torch.Tensor  # [n_tiles, T] bool
    kv_index: torch.Tensor  # [n_tiles, H]
    mask: torch.Tensor  # [n_tiles, T, H] bool: key in the query's window
    rel: torch.Tensor  # [n_tiles, T, H] rpb offset index (key - query + K - 1), 0 where masked out

    def to(self, device) -> "AxisTiles":
        return AxisTiles(*(t.to(device) for t in (self.q_index, self.q_valid, self.kv_index, self.mask, self.rel)))


@lru_cache(maxsize=128)
def axis_tiles(L: int, K: int, d: int, s: int, causal: bool, tile: int) -> AxisTiles:
    """Tiles of ``tile`` consecutive queries of each dilation group, with a halo of fixed length ``H``
    covering the union of their windows (``H`` is the largest union, at most the group length)."""
    groups = []
    span = 1
    for g in range(d):
        Lg = group_length(L, d, g)
        T = min(tile, Lg)
        for t0 in range(0, Lg, T):
            ps = list(range(t0, min(t0 + T, Lg)))
            bounds = [window_bounds(p, Lg, K, s, causal) for p in ps]
            lo = min(b[0] for b in bounds)
            hi = max(b[1] for b in bounds)
            span = max(span, hi - lo)
            groups.append((g, Lg, ps, bounds, lo))
    T = max(len(x[2]) for x in groups)
    H = min(span, max(x[1] for x in groups))
    q_index, q_valid, kv_index, masks, rels = [], [], [], [], []
    for g, Lg, ps, bounds, lo in groups:
        halo_start = max(min(lo, Lg - H), 0)
        halo = torch.arange(halo_start, halo_start + H)
        halo_in_group = halo < Lg
        pad = T - len(ps)
        ps_padded = ps + [ps[-1]] * pad
        bounds_padded = bounds + [bounds[-1]] * pad
        starts = torch.tensor([b[0] for b in bounds_padded])[:, None]
        ends = torch.tensor([b[1] for b in bounds_padded])[:, None]
        m = halo_in_group[None, :] & (halo[None, :] >= starts) & (halo[None, :] < ends)
        rel = halo[None, :] - torch.tensor(ps_padded)[:, None] + K - 1
        q_index.append(torch.tensor(ps_padded) * d + g)
        q_valid.append(torch.arange(T) < len(ps))
        kv_index.append(torch.clamp(halo, max=Lg - 1) * d + g)
        masks.append(m)
        rels.append(torch.where(m, rel, torch.zeros_like(rel)))
    return AxisTiles(
        torch.stack(q_index), torch.stack(q_valid), torch.stack(kv_index), torch.stack(masks), torch.stack(rels)
    )


_device_tiles: dict = {}


def _tiles_on(device, key) -> AxisTiles:
    cache_key = (str(device), key)
    if cache_key not in _device_tiles:
        if len(_device_tiles) > 256:
            _device_tiles.clear()
        _device_tiles[cache_key] = axis_tiles(*key).to(device)
    return _device_tiles[cache_key]


class _Problem:
    """The per-axis tiles of one call and, per chunk of N-D tiles, the flat index tensors and masks."""

    def __init__(self, spatial, params: NAParams, device, tile=None):
        n = len(spatial)
        kernel_size, stride, dilation, is_causal = params.kernel_size, params.stride, params.dilation, params.is_causal
        tile = tile or DEFAULT_TILE[n]
        self.n = n
        self.spatial = tuple(spatial)
        self.N = math.prod(spatial)
        self.axes = [
            _tiles_on(device, (spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a], tile))
            for a in range(n)
        ]
        self.n_tiles = [ax.q_index.shape[0] for ax in self.axes]
        self.total_tiles = math.prod(self.n_tiles)
        self.Tq = math.prod(ax.q_index.shape[1] for ax in self.axes)
        self.Hk = math.prod(ax.kv_index.shape[1] for ax in self.axes)
        self.flat_stride = [math.prod(spatial[a + 1:]) for a in range(n)]
        self.rpb_stride = [math.prod(2 * k - 1 for k in kernel_size[a + 1:]) for a in range(n)]
        self.device = device
        self._chunks: dict[int, list[dict]] = {}

    def chunks(self, rows_per_tile: int) -> list[dict]:
        """Chunks of tiles whose score blocks (``rows_per_tile`` rows of ``Tq x Hk`` per tile) stay under
        ``CHUNK_ELEMENTS``; built once per problem and chunk size."""
        per = max(1, CHUNK_ELEMENTS // max(1, rows_per_tile * self.Tq * self.Hk))
        if per not in self._chunks:
            self._chunks[per] = [
                self.chunk(torch.arange(b, min(b + per, self.total_tiles), device=self.device))
                for b in range(0, self.total_tiles, per)
            ]
        return self._chunks[per]

    def chunk(self, ids: torch.Tensor) -> dict:
        """Flat indices for N-D tiles ``ids``: ``q [C, Tq]`` (padded slots -> N), ``q_src [C, Tq]``,
        ``valid [C, Tq]``, ``kv [C, Hk]``, ``mask [C, Tq, Hk]`` (bool), ``bias [C, 1, Tq, Hk]``
        (0 or -inf) and ``rel [C, Tq, Hk]`` (flat rpb index)."""
        n, C = self.n, ids.numel()
        per_axis = []
        rem = ids
        for a in reversed(range(n)):
            per_axis.append(rem % self.n_tiles[a])
            rem = rem // self.n_tiles[a]
        per_axis.reverse()

        def place(t: torch.Tensor, a: int, with_halo: bool) -> torch.Tensor:
            # [C, T_a] or [C, T_a, H_a] -> broadcastable [C, T..., (H...)]
            shape = [C] + [1] * (2 * n if with_halo else n)
            shape[1 + a] = t.shape[1]
            if with_halo:
                shape[1 + n + a] = t.shape[2]
            return t.reshape(shape)

        q = kv = valid = mask = rel = None
        for a, ax in enumerate(self.axes):
            ta = per_axis[a]
            qa = place(ax.q_index[ta] * self.flat_stride[a], a, False)
            va = place(ax.q_valid[ta], a, False)
            kva = ax.kv_index[ta] * self.flat_stride[a]
            kva = kva.reshape([C] + [1] * a + [kva.shape[1]] + [1] * (n - a - 1))
            ma = place(ax.mask[ta], a, True)
            ra = place(ax.rel[ta] * self.rpb_stride[a], a, True)
            q = qa if q is None else q + qa
            valid = va if valid is None else valid & va
            kv = kva if kv is None else kv + kva
            mask = ma if mask is None else mask & ma
            rel = ra if rel is None else rel + ra
        valid = valid.reshape(C, self.Tq)
        q_src = q.reshape(C, self.Tq)  # padded slots repeat a real query, so every row has keys
        full = [C] + [ax.q_index.shape[1] for ax in self.axes] + [ax.kv_index.shape[1] for ax in self.axes]
        mask = mask.expand(full).reshape(C, self.Tq, self.Hk)
        bias = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
        return dict(
            q=torch.where(valid, q_src, self.N), q_src=q_src, valid=valid, kv=kv.reshape(C, self.Hk),
            mask=mask, bias=bias[:, None], rel=rel.expand(full).reshape(C, self.Tq, self.Hk),
        )


_problems: dict = {}


def _problem(spatial, params: NAParams, device, tile=None) -> _Problem:
    """Cached :class:`_Problem` (a layer calls with the same shape every step)."""
    key = (tuple(spatial), params.kernel_size, params.stride, params.dilation, params.is_causal, str(device), tile)
    if key not in _problems:
        if len(_problems) >= 8:
            _problems.pop(next(iter(_problems)))
        _problems[key] = _Problem(spatial, params, device, tile)
    return _problems[key]


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, h, D]``, ``index [C, T]`` -> ``[B, C, h, T, D]``."""
    B, _, h, D = x.shape
    C, T = index.shape
    return x.index_select(1, index.reshape(-1)).view(B, C, T, h, D).permute(0, 1, 3, 2, 4)


def _scores(qt, kt, c, rpb_flat, scale, compute):
    """Masked logits ``[B, C, h, Tq, Hk]`` (``-inf`` outside the windows)."""
    s = torch.matmul(qt.to(compute), kt.to(compute).transpose(-1, -2)).mul_(scale)
    s += c["bias"].to(compute)
    if rpb_flat is not None:
        s += rpb_flat.to(compute)[:, c["rel"]].transpose(0, 1)  # [C, h, Tq, Hk], broadcast over B
    return s


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fused_cpu_sdpa_available(q: torch.Tensor, v: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype == torch.float32
        and q.shape[-1] == v.shape[-1]  # the CPU flash kernel wants one head size for q, k and v
        and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")
    )


def _gather_tiles_heads(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x [B, N, h, D]``, ``index [C, T]`` -> ``[C, B*h, T, D]`` (batch folded into heads)."""
    B, _, h, D = x.shape
    C, T = index.shape
    t = x.index_select(1, index.reshape(-1)).view(B, C, T, h, D).permute(1, 0, 3, 2, 4)
    return t.reshape(C, B * h, T, D)


def tiled_forward(q, k, v, rpb, decay, params: NAParams, tile=None):
    """Forward. ``q, k [B, *spatial, h, D]``, ``v [B, *spatial, h, Dv]`` -> ``(out, lse [B, *spatial, h])``;
    ``lse`` is fp32 (fp64 for fp64 inputs; zeros for sigmoid scores). ``decay`` (sigmoid only) multiplies
    the weights, indexed like ``rpb``. Windows, scale and score come from ``params``."""
    B, *spatial, h, D = q.shape
    Dv = v.shape[-1]
    scale, sigmoid = params.scale, params.sigmoid
    prob = _problem(spatial, params, q.device, tile)
    N = prob.N
    compute = _compute_dtype(q.dtype)
    qf, kf, vf = q.reshape(B, N, h, D), k.reshape(B, N, h, D), v.reshape(B, N, h, Dv)
    rpb_flat = rpb.reshape(h, -1) if rpb is not None else None
    out = torch.zeros(B, N + 1, h, Dv, device=q.device, dtype=q.dtype)  # row N collects padded slots
    lse = torch.zeros(B, N + 1, h, device=q.device, dtype=compute)
    if not sigmoid and _fused_cpu_sdpa_available(q, v):
        # CPU flash attention with the window mask as an additive bias: one fused pass per chunk
        for c in prob.chunks(B * h):
            C = c["kv"].shape[0]
            mask = c["bias"]  # [C, 1, Tq, Hk]
            if rpb_flat is not None:
                mask = (rpb_flat[:, c["rel"]].transpose(0, 1) + mask).unsqueeze(1)  # [C, 1, h, Tq, Hk]
                mask = mask.expand(C, B, h, prob.Tq, prob.Hk).reshape(C, B * h, prob.Tq, prob.Hk)
            o, chunk_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                _gather_tiles_heads(qf, c["q_src"]), _gather_tiles_heads(kf, c["kv"]),
                _gather_tiles_heads(vf, c["kv"]), 0.0, False, attn_mask=mask, scale=scale,
            )
            rows = c["q"].reshape(-1)
            out.index_copy_(1, rows, o.view(C, B, h, prob.Tq, Dv).permute(1, 0, 3, 2, 4).reshape(B, -1, h, Dv))
            lse.index_copy_(1, rows, chunk_lse.view(C, B, h, prob.Tq).permute(1, 0, 3, 2).reshape(B, -1, h))
    else:
        for c in prob.chunks(B * h):
            s = _scores(_gather(qf, c["q_src"]), _gather(kf, c["kv"]), c, rpb_flat, scale, compute)
            if sigmoid:
                p = torch.sigmoid_(s)  # exactly 0 outside the windows (sigmoid(-inf))
                if decay is not None:
                    p = p * decay.reshape(h, -1).to(compute)[:, c["rel"]].transpose(0, 1)
            else:
                m = s.amax(dim=-1, keepdim=True)
                p = torch.exp_(s.sub_(m))
                denom = p.sum(dim=-1, keepdim=True)
                p.div_(denom)
                chunk_lse = (m + denom.log()).squeeze(-1)  # [B, C, h, Tq]
                lse.index_copy_(1, c["q"].reshape(-1), chunk_lse.permute(0, 1, 3, 2).reshape(B, -1, h))
            o = torch.matmul(p, _gather(vf, c["kv"]).to(compute))  # [B, C, h, Tq, Dv]
            out.index_copy_(1, c["q"].reshape(-1), o.permute(0, 1, 3, 2, 4).reshape(B, -1, h, Dv).to(q.dtype))
    # outputs must be contiguous: the custom op's fake implementation promises it to torch.compile
    out = out[:, :N].contiguous().reshape(B, *spatial, h, Dv)
    return out, lse[:, :N].contiguous().reshape(B, *spatial, h)


def tiled_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params: NAParams, tile=None):
    """Gradients ``(dq, dk, dv, drpb)`` (``drpb`` None without ``rpb``) from the output gradient ``dout``
    and, optionally, a gradient ``dlse`` of the returned log-sum-exp (softmax; d lse / d s = p). Scores are
    recomputed per chunk from the saved log-sum-exp; only one chunk's score block exists at a time."""
    B, *spatial, h, D = q.shape
    Dv = v.shape[-1]
    scale, sigmoid = params.scale, params.sigmoid
    prob = _problem(spatial, params, q.device, tile)
    N = prob.N
    compute = _compute_dtype(q.dtype)
    qf, kf, vf = q.reshape(B, N, h, D), k.reshape(B, N, h, D), v.reshape(B, N, h, Dv)
    dof = dout.reshape(B, N, h, Dv).to(compute)
    rpb_flat = rpb.reshape(h, -1) if rpb is not None else None
    dq = torch.zeros(B, N + 1, h, D, device=q.device, dtype=compute)
    dk = torch.zeros(B, N, h, D, device=q.device, dtype=compute)
    dv = torch.zeros(B, N, h, Dv, device=q.device, dtype=compute)
    drpb = torch.zeros_like(rpb_flat, dtype=compute) if rpb is not None else None
    if not sigmoid:
        delta = (dof * out.reshape(B, N, h, Dv).to(compute)).sum(-1)  # [B, N, h]
        if dlse is not None:
            delta = delta - dlse.reshape(B, N, h).to(compute)
        lsef = lse.reshape(B, N, h).to(compute)
    for c in prob.chunks(B * h * 3):
        qt, kt, vt = _gather(qf, c["q_src"]), _gather(kf, c["kv"]), _gather(vf, c["kv"]).to(compute)
        s = _scores(qt, kt, c, rpb_flat, scale, compute)
        valid = c["valid"][None, :, None, :, None]
        dot = _gather(dof, c["q_src"]) * valid  # padded slots contribute nothing
        dp = torch.matmul(dot, vt.transpose(-1, -2))  # [B, C, h, Tq, Hk]
        if sigmoid:
            sig = torch.sigmoid_(s)  # 0 outside the windows
            ds = dp.mul_(sig * (1 - sig))
            p = sig
            if decay is not None:
                factor = decay.reshape(h, -1).to(compute)[:, c["rel"]].transpose(0, 1)
                ds.mul_(factor)
                p = sig * factor
        else:
            lse_t = _gather(lsef.unsqueeze(-1), c["q_src"])  # [B, C, h, Tq, 1]
            p = torch.exp_(s.sub_(lse_t))  # 0 outside the windows
            delta_t = _gather(delta.unsqueeze(-1), c["q_src"])
            ds = dp.sub_(delta_t).mul_(p).mul_(valid)
        dv_t = torch.matmul(p.transpose(-1, -2), dot)  # [B, C, h, Hk, Dv]
        dv.index_add_(1, c["kv"].reshape(-1), dv_t.permute(0, 1, 3, 2, 4).reshape(B, -1, h, Dv))
        dq_t = torch.matmul(ds, kt.to(compute)).mul_(scale)
        dq.index_copy_(1, c["q"].reshape(-1), dq_t.permute(0, 1, 3, 2, 4).reshape(B, -1, h, D))
        dk_t = torch.matmul(ds.transpose(-1, -2), qt.to(compute)).mul_(scale)
        dk.index_add_(1, c["kv"].reshape(-1), dk_t.permute(0, 1, 3, 2, 4).reshape(B, -1, h, D))
        if drpb is not None:
            # entries outside the windows have ds == 0, so they add nothing to index 0
            drpb.index_add_(1, c["rel"].reshape(-1), ds.sum(0).transpose(0, 1).reshape(h, -1))
    dq = dq[:, :N].to(q.dtype).contiguous().reshape(q.shape)
    dk = dk.to(k.dtype).reshape(k.shape)
    dv = dv.to(v.dtype).reshape(v.shape)
    if drpb is not None:
        drpb = drpb.to(rpb.dtype).reshape(rpb.shape)
    return dq, dk, dv, drpb
