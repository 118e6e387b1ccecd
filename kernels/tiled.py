"""Tiled neighborhood attention in plain PyTorch: the ``'torch'`` backend (any device; what ``'auto'`` picks off-GPU).

Queries are cut into tiles (per axis, within one dilation group); each tile attends to the union of its
queries' windows (the "halo"), a small dense block, with the exact window mask applied inside it. Tiles
are processed in chunks sized to stay in cache, so the score block of one chunk is all that is ever
materialised; nothing of size ``N * K^d`` or ``N^2`` is kept for backward. Backward recomputes the
probabilities from the saved log-sum-exp (softmax) and forms dQ, dK, dV and dRPB explicitly, as fused
kernels do: five batched matmuls per chunk (two in the forward) and few passes over the score block.

- Layout: a chunk's tiles are gathered from the token-major inputs by one row copy (a row is one head's
  vector of one token) straight into the ``[pairs * tiles, T, D]`` batches ``bmm`` takes (pairs: the
  (batch, head) pairs of a slice of the call), and results go back by one indexed copy (queries) or add
  (halos) straight into the outputs; nothing is transposed.
- Passes: the scale rides on the matmuls (``alpha``) and the bias, ``-lse`` and ``-delta`` on their
  ``beta`` inputs, so a chunk's backward makes four elementwise passes over its scores. Softmax logits are
  kept in base 2 (``exp2`` is several times faster than ``exp`` on CPU and has no slow path for results
  below the normal range).
- Bias: the window mask and the relative positional bias are not stored per tile. Tiles with the same
  (mask, offset) pattern form a group (all interior tiles share one); the bias is read per group and
  ``drpb`` summed per group before the small scatter into the table.
- Memory: every temporary is chunk-sized and comes from a per-thread arena reused across chunks and calls;
  fresh buffers would cost a page fault per 4 KiB page every call.

Per-axis tile tables come from :mod:`visionattn.kernels.semantics` and are cached per problem shape.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from functools import lru_cache

import torch

from visionattn.kernels.semantics import NAParams, group_length, window_bounds

# elements of one chunk's score block [B, heads, tiles, Tq, Hk]: small enough to stay in cache across the
# few passes made over it, large enough that the matmuls and the per-op overhead stay efficient
CHUNK_ELEMENTS = 1 << 18
# a chunk's window-mask bias is cached across calls while all chunks together hold at most this many
BIAS_CACHE_ELEMENTS = 1 << 21
# a scratch buffer (see _scratch) larger than this is not kept between calls
ARENA_MAX_ELEMENTS = 1 << 22
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def default_tile(n_dims: int, kernel_size: int, axis: int) -> int:
    """Queries per tile along ``axis``. A tile of ``T`` queries needs a halo of ``T + K - 1`` keys per axis,
    so a larger tile wastes more products on keys outside the windows (and gathers more halo copies per
    query) while a smaller one makes the matmuls less efficient; these sizes were the fastest measured on
    CPU for kernel sizes 3 to 31. In 3-D a 2x2x2 tile has 8 queries, the inner size of the backward's dK and
    dV products: 2x2x4 (the last axis, contiguous in memory, longer) was 6-18% faster forward and 13-28%
    backward at K=5 and 7 (16^3 to 32^3), 2x4x4 and 4x4x4 slower."""
    if n_dims == 3:
        return 4 if axis == 2 else 2
    return {1: 16, 2: 4}[n_dims]


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
    """The per-axis tiles of one call and, per chunk of N-D tiles, the flat index tensors and the tiles'
    (mask, offset) pattern groups."""

    def __init__(self, spatial, params: NAParams, device, tile=None):
        n = len(spatial)
        kernel_size, stride, dilation, is_causal = params.kernel_size, params.stride, params.dilation, params.is_causal
        self.n = n
        self.spatial = tuple(spatial)
        self.N = math.prod(spatial)
        self.axes = [
            _tiles_on(device, (spatial[a], kernel_size[a], dilation[a], stride[a], is_causal[a],
                               (tile[a] if isinstance(tile, tuple) else tile) or default_tile(n, kernel_size[a], a)))
            for a in range(n)
        ]
        self.n_tiles = [ax.q_index.shape[0] for ax in self.axes]
        self.total_tiles = math.prod(self.n_tiles)
        self.Tq = math.prod(ax.q_index.shape[1] for ax in self.axes)
        self.Hk = math.prod(ax.kv_index.shape[1] for ax in self.axes)
        self.flat_stride = [math.prod(spatial[a + 1:]) for a in range(n)]
        self.rpb_size = math.prod(2 * k - 1 for k in kernel_size)
        self.rpb_stride = [math.prod(2 * k - 1 for k in kernel_size[a + 1:]) for a in range(n)]
        self.padded = not all(bool(ax.q_valid.all()) for ax in self.axes)  # some tile repeats a query
        self.rows = self.N + 1 if self.padded else self.N  # tokens per batch element of a results buffer
        self.cache_bias = self.total_tiles * self.Tq * self.Hk <= BIAS_CACHE_ELEMENTS
        self.device = device
        self._chunks: dict[int, list[dict]] = {}

    def schedule(self, pairs: int, rows: int = 1) -> list[dict]:
        """The chunks of tiles for a slice of ``pairs`` (batch, head) pairs: as many tiles as keep the chunk's
        score block(s) (``rows`` blocks of ``pairs x Tq x Hk`` per tile) near ``CHUNK_ELEMENTS``."""
        return self.chunks(max(1, CHUNK_ELEMENTS // (rows * pairs * self.Tq * self.Hk)))

    def chunks(self, tiles_per_chunk: int) -> list[dict]:
        """Chunks of ``tiles_per_chunk`` tiles; built once per problem and chunk size."""
        if tiles_per_chunk not in self._chunks:
            self._chunks[tiles_per_chunk] = [
                self.chunk(torch.arange(b, min(b + tiles_per_chunk, self.total_tiles), device=self.device))
                for b in range(0, self.total_tiles, tiles_per_chunk)
            ]
        return self._chunks[tiles_per_chunk]

    def chunk(self, ids: torch.Tensor) -> dict:
        """Flat indices for N-D tiles ``ids``:

        - ``q_src [C, Tq]``: each slot's query (a tile's padded slots repeat its last query, so every row
          has keys); ``kv [C, Hk]``: each tile's halo;
        - ``q_out [C, Tq]``: where each slot's result goes (padded slots: the extra row ``N``) and
          ``pad_pos``, the padded slots' positions among the ``C * Tq`` (None when there are none);
        - ``group [C]`` and ``pattern [G, Tq * Hk]``: tiles with the same pattern share a group; a pattern
          holds the flat rpb index of every (query, key) pair, ``rpb_size`` (one past the table) where the
          key is outside the query's window.
        """
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
        q_src = q.reshape(C, self.Tq).contiguous()
        valid = valid.expand([C] + [ax.q_index.shape[1] for ax in self.axes]).reshape(-1)
        full = [C] + [ax.q_index.shape[1] for ax in self.axes] + [ax.kv_index.shape[1] for ax in self.axes]
        mask = mask.expand(full).reshape(C, -1)
        rel = torch.where(mask, rel.expand(full).reshape(C, -1), self.rpb_size)
        pattern, group = torch.unique(rel, dim=0, return_inverse=True)
        return dict(C=C, q_src=q_src, q_out=torch.where(valid.view(C, self.Tq), q_src, self.N),
                    kv=kv.reshape(C, self.Hk).contiguous(), group=group, pattern=pattern,
                    pad_pos=None if bool(valid.all()) else torch.nonzero(~valid).flatten())

    def mask_bias(self, c: dict, dtype) -> torch.Tensor:
        """The chunk's window mask as an additive bias ``[C, Tq, Hk]`` (0 inside, ``-inf`` outside)."""
        key = ("bias", dtype)
        if key in c:
            return c[key]
        table = torch.zeros(self.rpb_size + 1, dtype=dtype, device=self.device)
        table[-1] = float("-inf")
        per_group = table[c["pattern"]]
        if self.cache_bias:
            bias = c[key] = per_group.index_select(0, c["group"]).view(-1, self.Tq, self.Hk)
            return bias
        bias = _scratch("bias", (c["C"], self.Tq * self.Hk), dtype, self.device)
        return torch.index_select(per_group, 0, c["group"], out=bias).view(-1, self.Tq, self.Hk)


_problems: dict = {}


def _problem(spatial, params: NAParams, device, tile=None) -> _Problem:
    """Cached :class:`_Problem` (a layer calls with the same shape every step)."""
    key = (tuple(spatial), params.kernel_size, params.stride, params.dilation, params.is_causal, str(device), tile)
    if key not in _problems:
        if len(_problems) >= 8:
            _problems.pop(next(iter(_problems)))
        _problems[key] = _Problem(spatial, params, device, tile)
    return _problems[key]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# scratch memory
#
# Every temporary is chunk-sized and taken from a per-thread arena of named buffers that lives across calls
# (on CPU): a fresh allocation of a few MiB costs a page fault per 4 KiB page when first written, which made
# up a large share of the time of a call whose buffers were allocated anew (and zero-filled) every time.


class _Arena(threading.local):
    def __init__(self):
        self.buffers: dict = {}  # (name, dtype, device) -> flat buffer
        self.views: dict = {}  # (name, shape, dtype, device) -> view of the buffer (chunks repeat shapes)


_ARENA = _Arena()


def _scratch(name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """A contiguous ``shape`` view of the arena's buffer ``name`` (uninitialised). Distinct names never alias;
    one name is reused by every chunk and every call. Kept between calls on CPU up to ``ARENA_MAX_ELEMENTS``."""
    arena = _ARENA
    view = arena.views.get((name, shape, dtype, device))
    if view is not None:
        return view
    numel = math.prod(shape)
    key = (name, dtype, device)
    buf = arena.buffers.get(key)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a buffer made in inference mode could not be written outside it
            buf = torch.empty(numel, dtype=dtype, device=device)
        if device.type != "cpu" or numel > ARENA_MAX_ELEMENTS:
            return buf.view(shape)
        arena.buffers[key] = buf
        arena.views = {k: v for k, v in arena.views.items() if k[0] != name or k[2:] != key[1:]}
    view = buf[:numel].view(shape)
    if len(arena.views) > 512:
        arena.views.clear()
    arena.views[(name, shape, dtype, device)] = view
    return view


# ---------------------------------------------------------------------------------------------------
# layout: the backends get token-major tensors, [B, N, h, D]: row (b * N + token) * h + head of the [B * N * h,
# D] view holds one head's vector of one token. A chunk's tiles are gathered by one row copy straight into the
# [pairs * C, T, D] batch of matrices bmm takes (pairs: the (batch, head) pairs of a slice of the call), and
# the results go back by one indexed copy (queries) or add (halos) straight into the outputs.


def _slices(B: int, h: int, per_pair: int) -> list[tuple[int, int, int, int]]:
    """``(b0, b1, h0, h1)`` slices of the (batch, head) pairs such that one tile's score block(s) for the
    slice's pairs (``per_pair`` elements each) fit a chunk: whole batch elements when one fits, else head
    ranges of one batch element."""
    fit = max(1, CHUNK_ELEMENTS * max(1, torch.get_num_threads()) // per_pair)
    if fit >= h:
        nb = min(B, fit // h)
        return [(b0, min(b0 + nb, B), 0, h) for b0 in range(0, B, nb)]
    return [(b, b + 1, h0, min(h0 + fit, h)) for b in range(B) for h0 in range(0, h, fit)]


def _rows(c: dict, kind: str, sl, tokens: int, h: int) -> torch.Tensor:
    """Row indices into a token-major ``[B * tokens * h, D]`` view for a chunk's slots and a slice's pairs,
    pair-major (``[pairs * C * T]``): the slots' queries (``'q'``; padded slots read their real query), their
    output rows (``'out'``; padded slots write to token ``N``, so ``tokens`` must be ``N + 1`` when there are
    any) or the halos' keys (``'kv'``). Cached in the chunk."""
    key = (kind, sl, tokens, h)
    if key not in c:
        b0, b1, h0, h1 = sl
        slot = {"q": c["q_src"], "out": c["q_out"], "kv": c["kv"]}[kind].reshape(1, 1, -1)
        device = slot.device
        batch = torch.arange(b0, b1, device=device).view(-1, 1, 1) * tokens
        head = torch.arange(h0, h1, device=device).view(1, -1, 1)
        c[key] = ((batch + slot) * h + head).reshape(-1)
    return c[key]


def _gather(name: str, x: torch.Tensor, index: torch.Tensor, T: int, dtype) -> torch.Tensor:
    """Rows ``index`` of ``x [rows, D]`` -> ``[len(index) // T, T, D]`` in ``dtype`` (an arena buffer)."""
    out = _scratch(name, (index.numel(), x.shape[-1]), dtype, x.device)
    if x.dtype == dtype:
        torch.index_select(x, 0, index, out=out)
    else:
        out.copy_(x.index_select(0, index))
    return out.view(-1, T, x.shape[-1])


def _pair_table(name: str, prob: _Problem, c: dict, table_ext: torch.Tensor) -> torch.Tensor:
    """Per (head, tile, query, key) value of a per-offset table ``table_ext [heads, rpb_size + 1]`` (its last
    column for keys outside the window): ``[heads, C, Tq, Hk]``, read per pattern group, copied per tile."""
    h = table_ext.shape[0]
    pattern = c["pattern"]
    out = _scratch(name, (h, c["C"], prob.Tq * prob.Hk), table_ext.dtype, table_ext.device)
    # index_select on the flat pattern: advanced indexing (table_ext[:, pattern]) took 2-4x as long on CPU
    per_group = torch.index_select(table_ext, 1, pattern.view(-1)).view(h, pattern.shape[0], -1)
    torch.index_select(per_group, 1, c["group"], out=out)
    return out.view(h, c["C"], prob.Tq, prob.Hk)


def _extend(table: torch.Tensor | None, h: int, outside: float, dtype, factor: float = 1.0) -> torch.Tensor | None:
    """``table [h, 2K-1, ...]`` -> ``[h, rpb_size + 1]`` in ``dtype``, times ``factor``, with ``outside`` last."""
    if table is None:
        return None
    flat = table.reshape(h, -1).to(dtype) * factor
    return torch.cat([flat, flat.new_full((h, 1), outside)], 1)


# ---------------------------------------------------------------------------------------------------
# forward and backward


def tiled_forward(q, k, v, rpb, decay, params: NAParams, tile=None):
    """Forward. ``q, k [B, *spatial, h, D]``, ``v [B, *spatial, h, Dv]`` -> ``(out, lse [B, *spatial, h])``;
    ``lse`` is fp32 (fp64 for fp64 inputs; zeros for sigmoid scores). ``decay`` (sigmoid only) multiplies
    the weights, indexed like ``rpb``. Windows, scale and score come from ``params``; ``tile`` is the number of
    queries per tile along each axis (an int, or a tuple per axis; default :func:`default_tile`)."""
    with torch.no_grad():
        return _forward(q, k, v, rpb, decay, params, tile)


def _output(shape, dtype, compute, device, prob: _Problem, zero: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """An output ``shape [B, *spatial, h, D]`` in ``dtype`` and the ``[rows, D]`` tensor results are written
    to, in ``compute`` dtype: the output itself, or a buffer with a dummy token ``N`` per batch element (for
    padded slots) or of another dtype, copied into the output by :func:`_finish`."""
    out = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
    B, h, D = shape[0], shape[-2], shape[-1]
    if not prob.padded and dtype == compute:
        return out, out.view(-1, D)
    return out, (torch.zeros if zero else torch.empty)(B * prob.rows * h, D, dtype=compute, device=device)


def _finish(out: torch.Tensor, rows: torch.Tensor, prob: _Problem) -> torch.Tensor:
    if rows.data_ptr() != out.data_ptr():
        B, h, D = out.shape[0], out.shape[-2], out.shape[-1]
        out.view(B, prob.N, h, D).copy_(rows.view(B, prob.rows, h, D)[:, :prob.N])
    return out


def _forward(q, k, v, rpb, decay, params: NAParams, tile):
    B, *spatial, h, D = q.shape
    Dv = v.shape[-1]
    scale, sigmoid = params.scale, params.sigmoid
    device = q.device
    prob = _problem(spatial, params, device, tile)
    N, Tq, Hk = prob.N, prob.Tq, prob.Hk
    compute = _compute_dtype(q.dtype)
    qr, kr, vr = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv)  # [B * N * h, D]
    out, out_rows = _output((B, *spatial, h, Dv), q.dtype, compute, device, prob)
    lse, lse_rows = _output((B, *spatial, h, 1), compute, compute, device, prob, zero=sigmoid)
    # softmax logits are kept in base 2 (times log2(e), folded into the scale and the bias): exp2 is several
    # times faster than exp on CPU, and exp's slow path for results below the normal range is never taken
    unit = 1.0 if sigmoid else LOG2E
    rpb_ext = _extend(rpb, h, float("-inf"), compute, unit)
    decay_ext = _extend(decay, h, 0.0, compute)
    for sl in _slices(B, h, Tq * Hk):
        b0, b1, h0, h1 = sl
        nb, nh = b1 - b0, h1 - h0
        pairs = nb * nh
        for c in prob.schedule(pairs):
            C = c["C"]
            G = pairs * C
            kv_index = _rows(c, "kv", sl, N, h)
            qg = _gather("q", qr, _rows(c, "q", sl, N, h), Tq, compute)
            kg = _gather("k", kr, kv_index, Hk, compute)
            s = _scratch("s", (G, Tq, Hk), compute, device)
            if rpb_ext is not None:
                bias = _pair_table("bias", prob, c, rpb_ext[h0:h1])
            else:
                bias = prob.mask_bias(c, compute)
            s.view(nb, nh, C, Tq, Hk).copy_(bias)  # the input the scores accumulate into
            s.baddbmm_(qg, kg.transpose(1, 2), alpha=scale * unit)
            vg = _gather("v", vr, kv_index, Hk, compute)
            o = _scratch("o", (G, Tq, Dv), compute, device)
            out_index = _rows(c, "out", sl, prob.rows, h)
            if sigmoid:
                s.sigmoid_()  # exactly 0 outside the windows (sigmoid(-inf))
                if decay_ext is not None:
                    s.view(nb, nh, C, Tq, Hk).mul_(_pair_table("factor", prob, c, decay_ext[h0:h1]))
                torch.bmm(s, vg, out=o)
            else:
                m = torch.amax(s, dim=-1, keepdim=True, out=_scratch("m", (G, Tq, 1), compute, device))
                s.sub_(m).exp2_()
                denom = torch.sum(s, dim=-1, keepdim=True, out=_scratch("denom", (G, Tq, 1), compute, device))
                torch.bmm(s, vg, out=o).div_(denom)  # normalise the [Tq, Dv] output, not the [Tq, Hk] weights
                m.add_(denom.log2_()).mul_(LN2)  # the log-sum-exp, natural log
                lse_rows.index_copy_(0, out_index, m.view(-1, 1))
            out_rows.index_copy_(0, out_index, o.view(-1, Dv))
    # outputs must be contiguous: the custom op's fake implementation promises it to torch.compile
    return _finish(out, out_rows, prob), _finish(lse, lse_rows, prob).view(B, *spatial, h)


def tiled_backward(dout, dlse, q, k, v, rpb, decay, out, lse, params: NAParams, tile=None):
    """Gradients ``(dq, dk, dv, drpb)`` (``drpb`` None without ``rpb``) from the output gradient ``dout``
    and, optionally, a gradient ``dlse`` of the returned log-sum-exp (softmax; d lse / d s = p). The
    probabilities are recomputed per chunk from the saved log-sum-exp; only one chunk's score block exists
    at a time. ``tile`` as for :func:`tiled_forward`."""
    with torch.no_grad():
        return _backward(dout, dlse, q, k, v, rpb, decay, out, lse, params, tile)


def _neg_delta(dout: torch.Tensor, out: torch.Tensor, dlse, compute) -> torch.Tensor:
    """``-(dout . out) + dlse`` per query and head, flat ``[B * N * h, 1]``, with chunk-sized temporaries."""
    Dv = dout.shape[-1]
    dof, of = dout.reshape(-1, Dv), out.reshape(-1, Dv)
    neg_delta = torch.empty(dof.shape[0], 1, device=dout.device, dtype=compute)
    step = max(1, CHUNK_ELEMENTS // Dv)
    for r0 in range(0, dof.shape[0], step):
        r1 = min(r0 + step, dof.shape[0])
        prod = _scratch("delta", (r1 - r0, Dv), compute, dout.device).copy_(dof[r0:r1]).mul_(of[r0:r1])
        torch.sum(prod, dim=-1, keepdim=True, out=neg_delta[r0:r1])
    neg_delta.neg_()
    if dlse is not None:
        neg_delta += dlse.reshape(-1, 1)
    return neg_delta


def _backward(dout, dlse, q, k, v, rpb, decay, out, lse, params: NAParams, tile):
    B, *spatial, h, D = q.shape
    Dv = v.shape[-1]
    scale, sigmoid = params.scale, params.sigmoid
    device = q.device
    prob = _problem(spatial, params, device, tile)
    N, Tq, Hk = prob.N, prob.Tq, prob.Hk
    compute = _compute_dtype(q.dtype)
    qr, kr, vr, dor = q.reshape(-1, D), k.reshape(-1, D), v.reshape(-1, Dv), dout.reshape(-1, Dv)
    dq, dq_rows = _output(q.shape, q.dtype, compute, device, prob)
    # halo results are added (zeros to start from), with no padded slots
    dk = torch.zeros(k.shape, dtype=compute, device=device)
    dv = torch.zeros(v.shape, dtype=compute, device=device)
    dk_rows, dv_rows = dk.view(-1, D), dv.view(-1, Dv)
    drpb = torch.zeros(h, prob.rpb_size + 1, device=device, dtype=compute) if rpb is not None else None
    unit = 1.0 if sigmoid else LOG2E
    rpb_ext = _extend(rpb, h, float("-inf"), compute, unit)
    decay_ext = _extend(decay, h, 0.0, compute)
    if not sigmoid:
        neg_delta = _neg_delta(dout, out, dlse, compute)
        lse2 = lse.reshape(-1, 1).to(compute) * LOG2E  # base-2 logits, as in the forward
    for sl in _slices(B, h, 2 * Tq * Hk):
        b0, b1, h0, h1 = sl
        nb, nh = b1 - b0, h1 - h0
        pairs = nb * nh
        for c in prob.schedule(pairs, 2):
            C = c["C"]
            G = pairs * C
            q_index, kv_index = _rows(c, "q", sl, N, h), _rows(c, "kv", sl, N, h)
            qg, kg = _gather("q", qr, q_index, Tq, compute), _gather("k", kr, kv_index, Hk, compute)
            vg, dog = _gather("v", vr, kv_index, Hk, compute), _gather("dout", dor, q_index, Tq, compute)
            if c["pad_pos"] is not None:  # padded slots get a zero output gradient: they contribute nothing
                dog.view(pairs, C * Tq, Dv).index_fill_(1, c["pad_pos"], 0.0)
            if rpb_ext is not None:
                bias = _pair_table("bias", prob, c, rpb_ext[h0:h1])
            else:
                bias = prob.mask_bias(c, compute)
            s = _scratch("s", (G, Tq, Hk), compute, device)
            dp = _scratch("dp", (G, Tq, Hk), compute, device)
            if sigmoid:
                s.view(nb, nh, C, Tq, Hk).copy_(bias)
                sig = s.baddbmm_(qg, kg.transpose(1, 2), alpha=scale).sigmoid_()  # 0 outside the windows
                ds = torch.bmm(dog, vg.transpose(1, 2), out=dp).mul_(sig)
                ds.addcmul_(ds, sig, value=-1.0)  # dp * sig * (1 - sig)
                p = sig
                if decay_ext is not None:
                    factor = _pair_table("factor", prob, c, decay_ext[h0:h1])
                    ds.view(nb, nh, C, Tq, Hk).mul_(factor)
                    p.view(nb, nh, C, Tq, Hk).mul_(factor)
            else:
                # p = exp(s + bias - lse): the bias and -lse form the input the product accumulates into
                lse_t = _gather("lse:t", lse2, q_index, Tq, compute)
                torch.sub(bias, lse_t.view(nb, nh, C, Tq, 1), out=s.view(nb, nh, C, Tq, Hk))
                p = s.baddbmm_(qg, kg.transpose(1, 2), alpha=scale * LOG2E).exp2_()  # 0 outside the windows
                # ds = p * (dout . v - delta), -delta being the input of the dout v^T product
                neg_delta_t = _gather("neg_delta:t", neg_delta, q_index, Tq, compute)
                if c["pad_pos"] is not None:
                    neg_delta_t.view(pairs, C * Tq).index_fill_(1, c["pad_pos"], 0.0)
                ds = torch.baddbmm(neg_delta_t, dog, vg.transpose(1, 2), out=dp).mul_(p)
            dv_t = torch.bmm(p.transpose(1, 2), dog, out=_scratch("dv", (G, Hk, Dv), compute, device))
            dv_rows.index_add_(0, kv_index, dv_t.view(-1, Dv))
            zero = dv_t.new_zeros(1, 1, 1)
            dq_t = torch.baddbmm(zero, ds, kg, beta=0.0, alpha=scale, out=_scratch("dq", (G, Tq, D), compute, device))
            dq_rows.index_copy_(0, _rows(c, "out", sl, prob.rows, h), dq_t.view(-1, D))
            dk_t = torch.baddbmm(zero, ds.transpose(1, 2), qg, beta=0.0, alpha=scale,
                                 out=_scratch("dk", (G, Hk, D), compute, device))
            dk_rows.index_add_(0, kv_index, dk_t.view(-1, D))
            if drpb is not None:
                # sum ds over the tiles of each pattern group, then scatter the groups into the table (entries
                # outside the windows have ds == 0 and land in the extra last column)
                per_tile = ds.view(nb, nh, C, Tq * Hk)
                per_tile = per_tile.sum(0) if nb > 1 else per_tile[0]
                pattern = c["pattern"]
                per_group = per_tile.new_zeros(nh, pattern.shape[0], Tq * Hk).index_add_(1, c["group"], per_tile)
                drpb[h0:h1].scatter_add_(1, pattern.view(1, -1).expand(nh, -1), per_group.view(nh, -1))
    if drpb is not None:
        drpb = drpb[:, :-1].to(rpb.dtype).reshape(rpb.shape)
    return _finish(dq, dq_rows, prob), dk.to(k.dtype), dv.to(v.dtype), drpb
