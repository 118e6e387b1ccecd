"""The 'torch' neighborhood-attention backend's machinery against the reference: many chunks, batch and head
slices, padded tiles, bias tables built per call, the gradient of the returned log-sum-exp, and the scratch
arena (results never alias it; a first call in inference mode does not poison later training calls).
Small windows are kept on this path (VISIONATTN_NA_COMPILE=0)."""
import threading

import pytest
import torch

from visionattn.kernels import na1d, na2d, na3d, tiled

FNS = {1: na1d, 2: na2d, 3: na3d}

# (spatial, kernel_size, dilation, stride, is_causal), heads 3, head_dim 8, batch 3
CASES = [
    ((37,), 6, 2, 3, False),
    ((13, 10), 5, (2, 1), (1, 2), False),
    ((11, 9), (4, 3), 1, (2, 1), (False, True)),
    ((5, 6, 7), (3, 2, 5), (1, 2, 1), (1, 2, 3), (False, True, False)),
]


@pytest.fixture(autouse=True)
def tiled_path_only(monkeypatch):
    """Every call here takes the tiled path: small windows would otherwise take kernels.small_window,
    which tests/test_na_small_window.py checks."""
    monkeypatch.setenv("VISIONATTN_NA_COMPILE", "0")


def _ids(case):
    return "x".join(map(str, case[0])) + f"-k{case[1]}"


@pytest.fixture
def fresh_tiling(monkeypatch, request):
    """Chunks of the test's size (``request.param`` score elements: small ones cut the (batch, head) pairs into
    slices of one batch element or of a few heads, and the tiles into many chunks), no cached mask bias,
    fresh caches."""
    monkeypatch.setattr(tiled, "CHUNK_ELEMENTS", getattr(request, "param", 1 << 9))
    monkeypatch.setattr(tiled, "BIAS_CACHE_ELEMENTS", 0)
    tiled._problems.clear()
    yield
    tiled._problems.clear()


def _inputs(case, dtype=torch.float32, batch=3, heads=3, head_dim=8, seed=0):
    spatial, k = case[0], case[1]
    ks = k if isinstance(k, tuple) else (k,) * len(spatial)
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    q, kk, v = (make(batch, *spatial, heads, head_dim).requires_grad_() for _ in range(3))
    rpb = make(heads, *(2 * x - 1 for x in ks)).requires_grad_()
    dout = make(batch, *spatial, heads, head_dim, scale=0.05)
    dlse = make(batch, *spatial, heads, scale=0.05)
    return q, kk, v, rpb, dout, dlse


def _softmax_run(case, backend, dtype):
    spatial, k, d, s, c = case
    q, kk, v, rpb, dout, dlse = _inputs(case, dtype)
    out, lse = FNS[len(spatial)](q, kk, v, k, stride=s, dilation=d, is_causal=c, rpb=rpb, return_lse=True,
                                 backend=backend)
    # the loss uses the log-sum-exp too, so its gradient (dlse) flows into the backward
    grads = torch.autograd.grad((out * dout.to(out.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum(), (q, kk, v, rpb))
    return [out, lse, *grads]


def _assert_close(got, want, atol=1e-4):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "drpb"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("fresh_tiling", [1 << 5, 1 << 10, 1 << 20], indirect=True,
                         ids=["head-slices", "batch-slices", "one-slice"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_chunks_slices_and_lse_gradient_match_reference(case, fresh_tiling):
    _assert_close(_softmax_run(case, "torch", torch.float32), _softmax_run(case, "reference", torch.float64))


@pytest.mark.parametrize("fresh_tiling", [1 << 5], indirect=True)
@pytest.mark.parametrize("case", CASES[1:3], ids=_ids)
def test_sigmoid_with_decay_in_small_chunks(case, fresh_tiling):
    spatial, k, d, s, c = case
    ks = k if isinstance(k, tuple) else (k,) * len(spatial)
    decay = torch.rand(3, *(2 * x - 1 for x in ks), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    results = []
    for backend, dtype in (("reference", torch.float64), ("torch", torch.float32)):
        q, kk, v, rpb, dout, _ = _inputs(case, dtype)
        out = FNS[len(spatial)](q, kk, v, k, stride=s, dilation=d, is_causal=c, rpb=rpb, score="sigmoid",
                                score_decay=decay.to(dtype), backend=backend)
        results.append([out, *torch.autograd.grad(out, (q, kk, v, rpb), dout)])
    for name, g, w in zip(("out", "dq", "dk", "dv", "drpb"), results[1], results[0]):
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_float64_is_exact_in_small_chunks(fresh_tiling):
    _assert_close(_softmax_run(CASES[1], "torch", torch.float64), _softmax_run(CASES[1], "reference", torch.float64),
                  atol=1e-12)


def test_results_never_alias_the_scratch_arena():
    """Outputs and gradients are fresh tensors: a later call (same shapes, other values) leaves them as they were."""
    case = ((9, 10), 3, 1, 1, False)
    first = _softmax_run(case, "torch", torch.float32)
    kept = [t.detach().clone() for t in first]
    q, kk, v, rpb, dout, _ = _inputs(case, seed=7)
    out = na2d(q, kk, v, 3, rpb=rpb)
    torch.autograd.grad(out, (q, kk, v, rpb), dout)
    for t, k in zip(first, kept):
        assert torch.equal(t.detach(), k)
    # heads == 1 makes the heads-first and token-major layouts coincide (views instead of copies)
    q1, k1, v1 = (torch.randn(1, 6, 7, 1, 4) for _ in range(3))
    a = na2d(q1, k1, v1, 3)
    a_kept = a.clone()
    na2d(q1 * 2, k1, v1, 3)
    assert torch.equal(a, a_kept)


def test_first_call_in_inference_mode_then_training():
    tiled._ARENA.buffers.clear()
    tiled._ARENA.views.clear()
    q, kk, v, rpb, dout, _ = _inputs(CASES[1])
    with torch.inference_mode():
        na2d(q, kk, v, 5, dilation=(2, 1), stride=(1, 2), rpb=rpb)
    out = na2d(q, kk, v, 5, dilation=(2, 1), stride=(1, 2), rpb=rpb)
    grads = torch.autograd.grad(out, (q, kk, v, rpb), dout)
    ref = na2d(q, kk, v, 5, dilation=(2, 1), stride=(1, 2), rpb=rpb, backend="reference")
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-4)
    for g, r in zip(grads, torch.autograd.grad(ref, (q, kk, v, rpb), dout)):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-4)


def test_threads_have_their_own_scratch():
    case = CASES[1]
    want = _softmax_run(case, "reference", torch.float64)
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(_softmax_run(case, "torch", torch.float32))
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 6
    for got in results:
        _assert_close(got, want)
