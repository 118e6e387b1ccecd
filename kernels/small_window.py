"""Neighborhood attention for small windows (at most 27 keys per query) on CPU, one offset at a time.

The tiled path (:mod:`.tiled`) scores each tile of queries against the union of their windows: at K=3 in
2-D a 4x4 tile scores a 6x6 halo, 36 keys where 9 are used, and its backward's matmuls and gathers cost
three times its forward. With few keys per query it is cheaper to visit the window's offsets directly:

- tables (cached per problem): ``key [N, S]``, the flat index of each query's ``S`` window keys (padded to
  a bucket of 3, 9 or 27 slots; padded and causally cut slots are ``valid == False``), ``rel [N, S]`` the
  bias-table offset of each key, and the inverse, ``inv [N, S]``: for key ``j`` and slot ``o`` one query
  whose slot ``o`` is ``j`` ("primary"). Windows clamped at borders give a few keys more than one query per
  slot; those pairs ("extras", listed apart) are added by one small ``index_add``.
- forward: scores ``q . k[key]`` per slot, softmax over the ``S`` slots, ``out = sum_o p_o v[key_o]``;
  backward: the scores are recomputed, ``dS = p (dout . v[key] - dout . out + dlse)``, ``dq`` summed over
  slots, ``dk`` and ``dv`` gathered through ``inv`` (no scatter), ``drpb`` by an ``index_add`` over ``rel``.

Every pass is written as gathers and elementwise products that ``torch.compile``'s C++ backend fuses into
loops over rows, so no ``[N, S, D]`` gather is ever materialised. Compiled on first use per slot bucket
and head shape (batch and token counts symbolic: see ``_run``), computed in fp32 (fp16/bf16 inputs are
upcast; fp64 stays on the tiled path, whose double-precision gradients the tests check). Softmax scores
only; sigmoid scores take the tiled path.
Without a working compiler, or with ``VISIONATTN_NA_COMPILE=0``, the tiled path runs instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from visionattn.kernels.compiled import run_compiled, switched_off
from visionattn.kernels.semantics import NAParams, axis_window_table

MAX_KEYS = 27  # windows of at most this many keys take this path (K=3 in 3-D, K<=5 in 2-D, K<=27 in 1-D)
SLOT_BUCKETS = (3, 9, 27)  # windows are padded to one of these, so at most three compilations per pass
ENV_VAR = "VISIONATTN_NA_COMPILE"
_FAMILY = tuple((name, slots) for name in ("forward", "backward") for slots in SLOT_BUCKETS)
_COMPILED: dict = {}  # (pass, slots) -> compiled function, or None (see kernels.compiled)
STATIC_HEAD_SHAPES = 3  # per pass, head shapes compiled in as constants (see _run)
_STATIC_HEAD_SHAPES_SEEN: dict = {}  # (pass, slots) -> the head shapes compiled in so far


def small_window_applies(params: NAParams, q: torch.Tensor) -> bool:
    """Whether a call takes this path: CPU, fp32/fp16/bf16, softmax scores, at most :data:`MAX_KEYS` keys
    per window, and the compiled passes not switched off (or found broken)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and params.score == "softmax" and math.prod(params.kernel_size) <= MAX_KEYS
            and not switched_off(ENV_VAR) and not any(v is None for v in _COMPILED.values()))


@dataclass(frozen=True)
class WindowTables:
    """Per-query window keys and their inverse for one problem (see the module docstring); int64."""

    key: torch.Tensor  # [N, S]
    valid: torch.Tensor  # [N, S] bool
    rel: torch.Tensor  # [N, S] flat index into rpb[h]; 0 where not valid
    inv: torch.Tensor  # [N, S] primary query of (key, slot); 0 where inv_valid is False
    inv_valid: torch.Tensor  # [N, S] bool
    extra_key: torch.Tensor  # [E] key of each extra (query, slot) pair
    extra_flat: torch.Tensor  # [E] query * S + slot of each extra pair


def _axis_slots(L: int, K: int, d: int, s: int, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One axis: per true index ``i`` and slot ``j < K``, the key's true index, whether the slot is in the
    window (a causal window near the start is shorter than ``K``) and the bias offset ``key - query + K - 1``
    in group units (the reference's ``rpb_index``). All ``[L, K]``."""
    start, end = axis_window_table(L, K, d, s, causal)
    i = torch.arange(L)[:, None]
    pos = start[:, None] + torch.arange(K)[None, :]
    valid = pos < end[:, None]
    pos = torch.where(valid, pos, start[:, None])
    return pos * d + i % d, valid, pos - i // d + K - 1


@lru_cache(maxsize=64)
def window_tables(spatial: tuple[int, ...], kernel_size: tuple[int, ...], stride: tuple[int, ...],
                  dilation: tuple[int, ...], is_causal: tuple[bool, ...]) -> WindowTables:
    n = len(spatial)
    key = valid = rel = None
    for a in range(n):
        k_a, v_a, r_a = _axis_slots(spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a])
        shape = [1] * (2 * n)
        shape[a], shape[n + a] = spatial[a], kernel_size[a]
        k_a = k_a.view(shape) * math.prod(spatial[a + 1:])
        r_a = r_a.view(shape) * math.prod(2 * k - 1 for k in kernel_size[a + 1:])
        key = k_a if key is None else key + k_a
        rel = r_a if rel is None else rel + r_a
        valid = v_a.view(shape) if valid is None else valid & v_a.view(shape)
    N, used = math.prod(spatial), math.prod(kernel_size)
    S = next(b for b in SLOT_BUCKETS if b >= used)
    full = (*spatial, *kernel_size)
    key = key.expand(full).reshape(N, used)
    valid = valid.expand(full).reshape(N, used)
    rel = torch.where(valid, rel.expand(full).reshape(N, used), 0)
    if S > used:  # padded slots: invalid, pointing at the query's first key
        pad = S - used
        key = torch.cat([key, key[:, :1].expand(N, pad)], 1)
        valid = torch.cat([valid, valid.new_zeros(N, pad)], 1)
        rel = torch.cat([rel, rel.new_zeros(N, pad)], 1)
    # inverse: the valid (query, slot) pairs grouped by (key, slot); the first query of a group is primary
    query = torch.arange(N)[:, None].expand(N, S)[valid]
    slot = torch.arange(S)[None, :].expand(N, S)[valid]
    key_slot = key[valid] * S + slot
    order = torch.argsort(key_slot * N + query)
    key_slot, query, slot = key_slot[order], query[order], slot[order]
    primary = torch.ones_like(key_slot, dtype=torch.bool)
    primary[1:] = key_slot[1:] != key_slot[:-1]
    inv = torch.zeros(N * S, dtype=torch.long)
    inv_valid = torch.zeros(N * S, dtype=torch.bool)
    inv[key_slot[primary]] = query[primary]
    inv_valid[key_slot[primary]] = True
    extra = ~primary
    return WindowTables(key.contiguous(), valid.contiguous(), rel.contiguous(), inv.view(N, S), inv_valid.view(N, S),
                        key_slot[extra] // S, query[extra] * S + slot[extra])


# ---------------------------------------------------------------------------------------------------
# the passes (compiled). q, k [B, N, h, D], v [B, N, h, Dv] fp32; bias [h, R]; scale a 0-d tensor (a float
# would be compiled in as a constant)


def _scores(q, k, key, valid, bias, rel, scale):
    """``[B, N, S, h]`` scaled, biased scores; ``-inf`` at slots outside the window."""
    s = (q.unsqueeze(2) * k[:, key]).sum(-1) * scale + bias[:, rel].permute(1, 2, 0)
    return torch.where(valid[:, :, None], s, float("-inf"))


def _forward_pass(q, k, v, key, valid, bias, rel, scale):
    """``(out [B, N, h, Dv], lse [B, N, h])``."""
    s = _scores(q, k, key, valid, bias, rel, scale)
    m = s.amax(2, keepdim=True)
    e = torch.exp(s - m)
    z = e.sum(2, keepdim=True)
    out = ((e / z).unsqueeze(-1) * v[:, key]).sum(2)
    return out, (m + torch.log(z)).squeeze(2)


def _backward_pass(dout, dlse, q, k, v, out, lse, key, valid, bias, rel, scale, inv, inv_valid, extra_key,
                   extra_flat):
    """``(dq, dk, dv, dS)``; ``dS [B, N, S, h]`` is the gradient of the scaled scores (for ``drpb``)."""
    S = key.shape[1]
    p = torch.exp(_scores(q, k, key, valid, bias, rel, scale) - lse.unsqueeze(2))
    dp = (dout.unsqueeze(2) * v[:, key]).sum(-1)
    ds = p * (dp - (dout * out).sum(-1).unsqueeze(2) + dlse.unsqueeze(2))
    dqs = ds * scale
    dq = dqs[:, :, 0, :, None] * k[:, key[:, 0]]
    dk = torch.where(inv_valid[:, 0, None], dqs[:, inv[:, 0], 0], 0.0)[..., None] * q[:, inv[:, 0]]
    dv = torch.where(inv_valid[:, 0, None], p[:, inv[:, 0], 0], 0.0)[..., None] * dout[:, inv[:, 0]]
    for o in range(1, S):  # unrolled: each term is one more gather into the same fused loop
        dq = dq + dqs[:, :, o, :, None] * k[:, key[:, o]]
        i = inv[:, o]
        dk = dk + torch.where(inv_valid[:, o, None], dqs[:, i, o], 0.0)[..., None] * q[:, i]
        dv = dv + torch.where(inv_valid[:, o, None], p[:, i, o], 0.0)[..., None] * dout[:, i]
    # border keys that one slot reaches from more than one query: the pairs past the primary one
    query = extra_flat // S
    dk = dk.index_add(1, extra_key, dqs.flatten(1, 2)[:, extra_flat, :, None] * q[:, query])
    dv = dv.index_add(1, extra_key, p.flatten(1, 2)[:, extra_flat, :, None] * dout[:, query])
    return dq, dk, dv, ds


# ---------------------------------------------------------------------------------------------------
# entry points (None when the compiled passes are unavailable: the caller takes the tiled path)


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, *spatial, h, D] -> [B, N, h, D]`` fp32, detached last: neither a view (dynamo would guard on
    the base's shape) nor requiring grad, either of which would cost the compiled passes a recompilation."""
    return x.reshape(x.shape[0], -1, *x.shape[-2:]).float().detach()


def _constant_dims(t: torch.Tensor) -> tuple[int, ...]:
    """The dims of a pass's argument compiled in as constants: heads and channels of ``[B, N, h, D]`` and
    ``[B, N, h]`` and of the bias ``[h, R]``, and the slots of the window tables ``[N, S]``."""
    if not t.is_floating_point():
        return (1,) if t.dim() == 2 else ()
    return {4: (2, 3), 3: (2,), 2: (0,)}.get(t.dim(), ())


def _run(name: tuple, fn, *args):
    """One compiled pass. Batch and token counts are symbolic (one compilation serves every image size);
    head count, head dims and slots are compiled in as constants, so the loops over them unroll and
    vectorise (2-D 56x56, K=3, 4 heads of 32: forward 1.8 ms against 2.9 ms with all sizes symbolic,
    forward+backward 6.2 against 9.5 ms). Past :data:`STATIC_HEAD_SHAPES` distinct head shapes in one pass
    the others share a symbolic compilation, which keeps a pass under dynamo's recompile limit (8; a head
    shape may compile twice, since a batch of 1 is specialised)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    shape = tuple(t.shape[d] for t in tensors for d in _constant_dims(t))
    seen = _STATIC_HEAD_SHAPES_SEEN.setdefault(name, set())
    if shape in seen or len(seen) < STATIC_HEAD_SHAPES:
        seen.add(shape)
        for t in tensors:
            for d in _constant_dims(t):
                torch._dynamo.mark_static(t, d)
    return run_compiled(_COMPILED, _FAMILY, name, fn, args, env_var=ENV_VAR, dynamic=True,
                        what="neighborhood attention: the small-window CPU passes")


@lru_cache(maxsize=64)
def _constants(spatial: tuple[int, ...], heads: int, params: NAParams):
    """A problem's window tables, the zero bias table used without ``rpb`` (full size, so the ``rel``
    indices stay in range) and the scale as a 0-d tensor: built once, not per call."""
    tables = window_tables(spatial, params.kernel_size, params.stride, params.dilation, params.is_causal)
    zero_bias = torch.zeros(heads, math.prod(2 * k - 1 for k in params.kernel_size))
    return tables, zero_bias, torch.tensor(params.scale, dtype=torch.float32)


def _problem(q: torch.Tensor, rpb: torch.Tensor | None, params: NAParams):
    tables, zero_bias, scale = _constants(tuple(q.shape[1:-2]), q.shape[-2], params)
    bias = rpb.reshape(q.shape[-2], -1).float().detach() if rpb is not None else zero_bias
    return tables, bias, scale


def small_window_forward(q, k, v, rpb, params: NAParams):
    """``(out [B, *spatial, h, Dv] in q's dtype, lse [B, *spatial, h] fp32)``, or None (see above)."""
    tables, bias, scale = _problem(q, rpb, params)
    S = tables.key.shape[1]
    with torch.no_grad():
        res = _run(("forward", S), _forward_pass, _flat(q), _flat(k), _flat(v), tables.key, tables.valid, bias,
                   tables.rel, scale)
    if res is None:
        return None
    out, lse = res
    return out.to(q.dtype).reshape(*q.shape[:-1], v.shape[-1]), lse.reshape(q.shape[:-1])


def small_window_backward(dout, dlse, q, k, v, rpb, out, lse, params: NAParams):
    """``(dq, dk, dv, drpb)`` in the inputs' dtypes (``drpb`` None without ``rpb``), or None (see above)."""
    tables, bias, scale = _problem(q, rpb, params)
    B, S = q.shape[0], tables.key.shape[1]
    h = q.shape[-2]
    if dlse is not None:
        dlse_flat = dlse.reshape(B, -1, h).float().detach()
    else:  # full size, not [B, 1, h]: a size-1 axis would be compiled apart, doubling the pass's compilations
        dlse_flat = q.new_zeros(B, tables.key.shape[0], h, dtype=torch.float32)
    with torch.no_grad():
        res = _run(("backward", S), _backward_pass, _flat(dout), dlse_flat, _flat(q), _flat(k), _flat(v), _flat(out),
                   lse.reshape(B, -1, h).float().detach(), tables.key, tables.valid, bias, tables.rel, scale,
                   tables.inv, tables.inv_valid, tables.extra_key, tables.extra_flat)
        if res is None:
            return None
        dq, dk, dv, ds = res
        drpb = None
        if rpb is not None:
            rows = ds.sum(0)[tables.valid]  # [pairs, h]
            drpb = torch.zeros(bias.shape[1], h).index_add_(0, tables.rel[tables.valid], rows)
            drpb = drpb.t().to(rpb.dtype).reshape(rpb.shape)
    return dq.to(q.dtype).reshape(q.shape), dk.to(k.dtype).reshape(k.shape), dv.to(v.dtype).reshape(v.shape), drpb
