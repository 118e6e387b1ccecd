"""The small-window CPU path (kernels.small_window) against the brute-force reference: its window tables
against the reference's dense mask, then outputs, log-sum-exp and every gradient over 1-D/2-D/3-D problems
with dilation, stride, causal axes, even kernels and clamped borders; half-precision inputs; and the
fallbacks (switched off, no compiler, float64) to the tiled path."""
import math
import warnings

import pytest
import torch

from visionattn.kernels import na1d, na2d, na3d, neighborhood, small_window
from visionattn.kernels.reference import dense_mask_and_bias_index

FNS = {1: na1d, 2: na2d, 3: na3d}

# (spatial, kernel_size, dilation, stride, is_causal): every slot bucket (3, 9, 27), padded buckets, borders
CASES = [
    ((23,), 3, 1, 1, False),
    ((29,), 6, 2, 3, True),
    ((31,), 27, 1, 1, False),
    ((12, 11), 3, 1, 1, False),
    ((13, 10), 5, (2, 1), (1, 2), False),
    ((11, 9), (4, 3), 1, (2, 1), (False, True)),
    ((7, 6, 8), 3, (1, 2, 1), (1, 1, 2), (False, False, True)),
]


def _ids(case):
    return "x".join(map(str, case[0])) + f"-k{case[1]}-d{case[2]}-s{case[3]}-c{case[4]}"


def _tuple(x, n):
    return tuple(x) if isinstance(x, tuple) else (x,) * n


@pytest.fixture
def small_path_only(monkeypatch):
    """Fails any call that reaches the tiled path, so a test proves it ran the small-window passes."""
    monkeypatch.delenv("VISIONATTN_NA_COMPILE", raising=False)

    def refuse(*args, **kwargs):
        raise AssertionError("took the tiled path")

    monkeypatch.setattr(neighborhood, "tiled_forward", refuse)
    monkeypatch.setattr(neighborhood, "tiled_backward", refuse)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_window_tables_match_the_reference_mask(case):
    """Each query's valid slots hold exactly the keys of its row of the dense mask, with the reference's bias
    index; the primary inverse plus the extras list every valid (query, slot) pair exactly once."""
    spatial, k, d, s, c = case
    n = len(spatial)
    ks, ds, ss, cs = _tuple(k, n), _tuple(d, n), _tuple(s, n), _tuple(c, n)
    t = small_window.window_tables(spatial, ks, ss, ds, cs)
    mask, index = dense_mask_and_bias_index(spatial, ks, ds, ss, cs)
    N, S = t.key.shape
    assert S >= math.prod(ks) and S in small_window.SLOT_BUCKETS
    from_tables = torch.zeros(N, N, dtype=torch.bool)
    rows = torch.arange(N)[:, None].expand(N, S)
    from_tables[rows[t.valid], t.key[t.valid]] = True
    assert torch.equal(from_tables, mask)
    assert int(t.valid.sum()) == int(mask.sum())  # no key twice in a window
    assert torch.equal(t.rel[t.valid], index[rows[t.valid], t.key[t.valid]])
    pairs = set()
    for key in range(N):
        for slot in range(S):
            if t.inv_valid[key, slot]:
                pairs.add((int(t.inv[key, slot]), slot, key))
    extras = [(int(f) // S, int(f) % S, int(j)) for f, j in zip(t.extra_flat, t.extra_key)]
    assert len(pairs) + len(extras) == int(t.valid.sum())
    pairs.update(extras)
    want = {(int(i), int(o), int(t.key[i, o])) for i, o in zip(*torch.nonzero(t.valid, as_tuple=True))}
    assert pairs == want


def _run(case, backend, dtype, with_rpb=True, seed=0, heads=3, dim=8):
    spatial, k, d, s, c = case
    ks = _tuple(k, len(spatial))
    g = torch.Generator().manual_seed(seed)

    def make(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    q, kk, v = (make(2, *spatial, heads, dim).requires_grad_() for _ in range(3))
    rpb = make(heads, *(2 * x - 1 for x in ks)).requires_grad_() if with_rpb else None
    dout = make(2, *spatial, heads, dim, scale=0.05)
    dlse = make(2, *spatial, heads, scale=0.05)
    out, lse = FNS[len(spatial)](q, kk, v, k, stride=s, dilation=d, is_causal=c, rpb=rpb, return_lse=True,
                                 backend=backend)
    inputs = (q, kk, v) + ((rpb,) if with_rpb else ())
    # the loss uses the log-sum-exp too, so its gradient (dlse) reaches the backward
    grads = torch.autograd.grad((out * dout.to(out.dtype)).sum() + (lse * dlse.to(lse.dtype)).sum(), inputs)
    return [out, lse, *grads]


def _assert_close(got, want, atol):
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "drpb"), got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_outputs_and_gradients_match_reference(case, small_path_only):
    _assert_close(_run(case, "torch", torch.float32), _run(case, "reference", torch.float64), atol=1e-4)


def test_without_positional_bias(small_path_only):
    case = CASES[4]
    _assert_close(_run(case, "torch", torch.float32, with_rpb=False),
                  _run(case, "reference", torch.float64, with_rpb=False), atol=1e-4)


def test_bfloat16_inputs_are_computed_in_float32(small_path_only):
    """bf16 in, bf16 out; the error is the output's rounding, not a bf16 softmax (the reference runs in fp32
    on the same bf16 inputs)."""
    case = CASES[3]
    got = _run(case, "torch", torch.bfloat16)
    want = _run(case, "reference", torch.bfloat16)
    assert got[0].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    _assert_close(got, want, atol=2e-2)


def test_head_shapes_past_the_constant_ones_share_a_symbolic_compilation(monkeypatch, small_path_only):
    """The first head shapes of a pass are compiled in as constants, the ones after that share one
    compilation with symbolic sizes (kernels.small_window._run); both give the reference's results."""
    monkeypatch.setattr(small_window, "STATIC_HEAD_SHAPES", 1)
    monkeypatch.setattr(small_window, "_STATIC_HEAD_SHAPES_SEEN", {})
    marked = []
    real_mark_static = torch._dynamo.mark_static
    monkeypatch.setattr(torch._dynamo, "mark_static", lambda t, d: marked.append(d) or real_mark_static(t, d))
    case = CASES[0]
    for i, (heads, dim) in enumerate(((2, 4), (5, 16))):
        count = len(marked)
        got = _run(case, "torch", torch.float32, heads=heads, dim=dim)
        _assert_close(got, _run(case, "reference", torch.float64, heads=heads, dim=dim), atol=1e-4)
        assert (len(marked) > count) == (i == 0)  # the first head shape is compiled in, the second is not


def test_switched_off_and_float64_take_the_tiled_path(monkeypatch):
    calls = []
    real = neighborhood.tiled_forward

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(neighborhood, "tiled_forward", spy)
    case = CASES[3]
    monkeypatch.setenv("VISIONATTN_NA_COMPILE", "0")
    _run(case, "torch", torch.float32)
    assert len(calls) == 1
    monkeypatch.delenv("VISIONATTN_NA_COMPILE")
    _assert_close(_run(case, "torch", torch.float64), _run(case, "reference", torch.float64), atol=1e-12)
    assert len(calls) == 2
    _run(case, "torch", torch.float32)
    assert len(calls) == 2  # fp32, switched on: the small-window path


def test_a_failing_compiler_warns_once_and_falls_back(monkeypatch):
    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fail

    monkeypatch.delenv("VISIONATTN_NA_COMPILE", raising=False)
    monkeypatch.setattr(small_window, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    case = CASES[4]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = _run(case, "torch", torch.float32)
        got_again = _run(case, "torch", torch.float32)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "small-window" in messages[0] and "VISIONATTN_NA_COMPILE=0" in messages[0]
    assert all(f is None for f in small_window._COMPILED.values())
    want = _run(case, "reference", torch.float64)
    _assert_close(got, want, atol=1e-4)
    _assert_close(got_again, want, atol=1e-4)
