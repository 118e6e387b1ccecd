"""Every neighborhood-attention backend against the brute-force reference: forward, log-sum-exp and the
gradients of query, key, value and the relative positional bias, over a grid of cases. The 'torch' backend's
small windows are kept on its tiles here (VISIONATTN_NA_COMPILE=0), so the grid checks the tiles on every
case; tests/test_na_small_window.py checks the compiled small-window path against the same reference (each
compile there costs 10-90 s on a 2-core machine; in this grid it cost over 200 s of CI time)."""
import pytest
import torch

from visionattn.kernels import na1d, na2d, na3d, triton_available
from visionattn.layers import NeighborhoodAttention1d, NeighborhoodAttention2d, NeighborhoodAttention3d

FNS = {1: na1d, 2: na2d, 3: na3d}


@pytest.fixture(autouse=True)
def tiles_for_small_windows(monkeypatch):
    monkeypatch.setenv("VISIONATTN_NA_COMPILE", "0")


# Triton runs on CUDA tensors on a GPU machine and on CPU tensors under TRITON_INTERPRET=1 elsewhere
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (spatial, kernel_size, dilation, stride, is_causal, heads, head_dim)
CASES = [
    ((33,), 5, 1, 1, False, 2, 8),                       # 1-D, extent not a multiple of kernel or tile
    ((70,), 8, 1, 1, False, 1, 16),                      # even kernel, crosses the 64-query tile
    ((40,), 7, 3, 1, False, 2, 8),                       # dilation, unequal group lengths
    ((37,), 6, 2, 3, False, 1, 8),                       # even kernel + dilation + stride
    ((29,), 4, 1, 1, True, 2, 8),                        # causal
    ((31,), 5, 2, 2, True, 1, 8),                        # causal + dilation + stride
    ((12,), 12, 1, 1, False, 2, 8),                      # kernel == extent
    ((9, 11), (3, 4), 1, 1, False, 2, 8),                # 2-D odd/even mix
    ((13, 10), 5, (2, 1), (1, 2), False, 2, 8),          # per-axis dilation and stride
    ((10, 9), 3, 1, 3, (True, False), 1, 16),            # blocked, causal on one axis
    ((11, 12), (4, 3), (2, 3), (2, 1), (False, True), 2, 8),
    ((6, 7), (6, 7), 1, 1, False, 1, 8),                 # kernel == extent (2-D)
    ((17, 9), 7, 1, 1, False, 1, 12),                    # head_dim not a power of two
    ((5, 6, 7), (3, 2, 5), (1, 2, 1), (1, 2, 3), (False, True, False), 1, 8),
    ((6, 5, 9), 3, 1, 1, False, 2, 4),                   # 3-D plain
    ((8, 6, 5), (4, 3, 2), (2, 1, 2), 1, (True, False, False), 1, 8),
]


def _ids(case):
    spatial, k, d, s, c, h, hd = case
    return f"{'x'.join(map(str, spatial))}-k{k}-d{d}-s{s}-c{c}-h{h}"


def _inputs(case, dtype, rpb=True, batch=2, seed=0, device="cpu"):
    spatial, k, d, s, c, h, hd = case
    g = torch.Generator().manual_seed(seed)
    n = len(spatial)
    ks = k if isinstance(k, tuple) else (k,) * n

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    q, kk, v = (make(batch, *spatial, h, hd).requires_grad_() for _ in range(3))
    bias = make(h, *(2 * x - 1 for x in ks)).requires_grad_() if rpb else None
    dout = make(batch, *spatial, h, hd, scale=0.05)
    return q, kk, v, bias, dout


def _run(case, backend, score, dtype, rpb=True, batch=2):
    spatial, k, d, s, c, h, hd = case
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    q, kk, v, bias, dout = _inputs(case, dtype, rpb, batch, device=device)
    fn = FNS[len(spatial)]
    res = fn(q, kk, v, k, stride=s, dilation=d, is_causal=c, rpb=bias, score=score, backend=backend,
             return_lse=score == "softmax")
    out, lse = res if score == "softmax" else (res, None)
    inputs = [q, kk, v] + ([bias] if rpb else [])
    grads = torch.autograd.grad(out, inputs, dout)
    return out, lse, grads


def _compare(case, backend, score, dtype, atol_fwd, atol_bwd, rpb=True, batch=2):
    ref = _run(case, "reference", score, torch.float64, rpb, batch)
    got = _run(case, backend, score, dtype, rpb, batch)
    assert got[0].dtype == dtype
    torch.testing.assert_close(got[0].cpu().double(), ref[0], rtol=0, atol=atol_fwd)
    if ref[1] is not None:
        torch.testing.assert_close(got[1].cpu().double(), ref[1], rtol=0, atol=atol_fwd)
    for name, g, r in zip(("dq", "dk", "dv", "drpb"), got[2], ref[2]):
        torch.testing.assert_close(g.cpu().double(), r, rtol=0, atol=atol_bwd, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_torch_backend_fp32(case, score):
    # NATTEN's fp32 tolerances: forward 1e-4, backward 1e-4 (dq 1e-2 there; we hold dq to 1e-4 too)
    _compare(case, "torch", score, torch.float32, 1e-4, 1e-4)


@pytest.mark.parametrize("case", CASES[:2] + CASES[7:9] + CASES[13:14], ids=_ids)
def test_torch_backend_without_rpb_batch1(case):
    _compare(case, "torch", "softmax", torch.float32, 1e-4, 1e-4, rpb=False, batch=1)


@pytest.mark.parametrize("dtype,atol_fwd,atol_bwd", [(torch.float16, 1e-2, 1e-2), (torch.bfloat16, 5e-2, 5e-2)])
@pytest.mark.parametrize("case", [CASES[1], CASES[8], CASES[13]], ids=_ids)
def test_torch_backend_half_precision(case, dtype, atol_fwd, atol_bwd):
    _compare(case, "torch", "softmax", dtype, atol_fwd, atol_bwd)


def test_torch_backend_float64_is_exact():
    _compare(CASES[10], "torch", "softmax", torch.float64, 1e-12, 1e-12)


TRITON_CASES = [CASES[0], CASES[3], CASES[5], CASES[7], CASES[9], CASES[10], CASES[13]]


@pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("case", TRITON_CASES, ids=_ids)
def test_triton_backend_fp32(case, score):
    _compare(case, "triton", score, torch.float32, 1e-4, 1e-4, batch=1)


@pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1 and triton")
@pytest.mark.parametrize("dtype,atol", [(torch.float16, 1e-2), (torch.bfloat16, 5e-2)])
def test_triton_backend_half_precision(dtype, atol):
    _compare(CASES[8], "triton", "softmax", dtype, atol, atol, batch=1)


def test_attn_bias_fn_manhattan_decay():
    """A per-head bias as a function of the offsets equals the same table passed as rpb, and trains."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 9, 10, 2, 8) for _ in range(3))
    gamma = torch.tensor([0.3, 0.7], requires_grad=True)

    def decay(offsets):
        return -gamma[:, None, None] * (offsets[0].abs() + offsets[1].abs())

    out = na2d(q, k, v, 5, dilation=(1, 2), attn_bias_fn=decay, backend="torch")
    dy = torch.arange(-4, 5).abs()[:, None]
    dx = (torch.arange(-4, 5) * 2).abs()[None, :]
    table = -gamma.detach()[:, None, None] * (dy + dx)
    torch.testing.assert_close(out, na2d(q, k, v, 5, dilation=(1, 2), rpb=table, backend="reference"))
    out.sum().backward()
    assert gamma.grad is not None and torch.all(gamma.grad != 0)


def test_custom_ops_pass_opcheck():
    from visionattn.kernels.neighborhood import _na_forward_op
    from visionattn.kernels.semantics import na_params

    q, k, v = (torch.randn(1, 7, 6, 2, 8, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 5, 5, requires_grad=True)
    # the primitive arguments NAParams.op_args() builds: kernel_size, stride, dilation, is_causal, scale, sigmoid, backend
    params = na_params(2, q, k, v, 3, dilation=(1, 2), is_causal=(False, True), scale=0.35, rpb=rpb, backend="torch")
    assert params.op_args() == ([3, 3], [1, 1], [1, 2], [False, True], 0.35, False, "torch")
    torch.library.opcheck(_na_forward_op, (q, k, v, rpb, None, *params.op_args()))
    decay = torch.rand(2, 5, 5)
    op_args = ([3, 3], [1, 1], [1, 1], [False, False], 0.35, True, "torch")
    torch.library.opcheck(_na_forward_op, (q, k, v, rpb, decay, *op_args))


def test_torch_compile_has_no_graph_break():
    torch.manual_seed(0)
    layer = NeighborhoodAttention2d(32, 4, 5, rel_pos_bias=True)
    x = torch.randn(2, 9, 11, 32)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, layer(x))
    out.sum().backward()
    assert layer.rpb.grad is not None


@pytest.mark.parametrize("cls,shape", [
    (NeighborhoodAttention1d, (2, 20, 16)), (NeighborhoodAttention2d, (2, 7, 9, 16)), (NeighborhoodAttention3d, (1, 5, 6, 4, 16)),
])
def test_modules_match_reference_backend(cls, shape):
    torch.manual_seed(0)
    layer = cls(16, 2, 3, rel_pos_bias=True)
    x = torch.randn(shape)
    ref = cls(16, 2, 3, rel_pos_bias=True, attention_backend="reference")
    ref.load_state_dict(layer.state_dict())
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="expects"):
        layer(torch.randn(shape[1:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", [CASES[3], CASES[10], CASES[13]], ids=_ids)
def test_sigmoid_with_multiplicative_decay(case, backend):
    """score_decay multiplies each sigmoid weight by a per-head, per-offset factor (a post-activation decay)."""
    if backend == "triton" and not triton_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 and triton")
    spatial, k, d, s, c, h, hd = case
    ks = k if isinstance(k, tuple) else (k,) * len(spatial)
    decay = torch.rand(h, *(2 * x - 1 for x in ks), generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    fn = FNS[len(spatial)]
    results = []
    for be, dtype in (("reference", torch.float64), (backend, torch.float32)):
        device = TRITON_DEVICE if be == "triton" else "cpu"
        q, kk, v, bias, dout = _inputs(case, dtype, batch=1, device=device)
        out = fn(q, kk, v, k, stride=s, dilation=d, is_causal=c, rpb=bias, score="sigmoid", backend=be,
                 score_decay=decay.to(device=device, dtype=dtype))
        grads = torch.autograd.grad(out, [q, kk, v, bias], dout)
        results.append([out] + list(grads))
    for a, b in zip(results[1], results[0]):
        torch.testing.assert_close(a.cpu().double(), b, rtol=0, atol=1e-4)


def test_score_decay_arguments_are_checked():
    q = torch.randn(1, 9, 2, 8)
    with pytest.raises(ValueError, match="needs score='sigmoid'"):
        na1d(q, q, q, 3, score_decay=torch.ones(2, 5))
    with pytest.raises(ValueError, match="score_decay must have shape"):
        na1d(q, q, q, 3, score="sigmoid", score_decay=torch.ones(2, 4))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_value_head_dim_may_differ(backend):
    if backend == "triton" and not triton_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1 and triton")
    device = TRITON_DEVICE if backend == "triton" else "cpu"
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 9, 10, 2, 9, generator=g) for _ in range(2))
    v = torch.randn(1, 9, 10, 2, 5, generator=g)
    for score in ("softmax", "sigmoid"):
        ref = na2d(q, k, v, (1, 5), stride=(1, 5), score=score, backend="reference")
        got = na2d(q.to(device), k.to(device), v.to(device), (1, 5), stride=(1, 5), score=score, backend=backend)
        torch.testing.assert_close(got.cpu(), ref, rtol=1e-5, atol=1e-5)


def test_flop_counter_counts_the_op():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(2, 10, 12, 3, 16)
    v = torch.randn(2, 10, 12, 3, 8)
    with FlopCounterMode(display=False) as counter:
        na2d(q, q, v, (3, 5), backend="torch")
    assert counter.get_total_flops() == 2 * 2 * 3 * 120 * 15 * (16 + 8)
