"""The blocked fast path (``stride == kernel_size``, :mod:`visionattn.kernels.windowed`) against the
brute-force reference: forward, log-sum-exp and the gradients of query, key, value and the positional bias,
on extents that the kernel divides and that it does not (a last partial block whose queries see the last
``K`` keys); and the dispatch: blocked calls, Gated-SwinRMT's among them, take it, the others do not."""
import pytest
import torch
from visionattn.kernels import neighborhood, neighborhood_attention, windowed

from visionattn.backbones.gated_swinrmt import WindowedRetention

# (spatial, kernel_size): divisible and not, kernel == extent, kernel 1 on an axis, 1-D to 3-D
CASES = [
    ((12,), 3),
    ((10,), 3),          # last block: 1 query, keys [7, 10)
    ((11,), 4),          # last block: 3 queries
    ((7,), 7),           # one window, kernel == extent
    ((14, 21), (1, 7)),  # Gated-SwinRMT's row pass
    ((21, 14), (7, 1)),  # and its column pass
    ((8, 9), (3, 2)),    # partial blocks on both axes
    ((9, 11), 4),
    ((6, 5, 7), (2, 5, 3)),
    ((5, 6, 4), 2),
]
SCORES = [("softmax", False, False), ("softmax", True, False), ("sigmoid", False, False), ("sigmoid", True, True)]


def _ids(case):
    spatial, k = case
    return f"{'x'.join(map(str, spatial))}-k{k}"


def _run(backend, case, score, use_rpb, use_decay, seed=0):
    spatial, ks = case
    ks_t = ks if isinstance(ks, tuple) else (ks,) * len(spatial)
    g = torch.Generator().manual_seed(seed)
    B, h, D, Dv = 2, 3, 5, 4

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    q, k = rand(B, *spatial, h, D).requires_grad_(), rand(B, *spatial, h, D).requires_grad_()
    v = rand(B, *spatial, h, Dv).requires_grad_()
    table = (h, *(2 * x - 1 for x in ks_t))
    rpb = rand(*table).requires_grad_() if use_rpb else None
    decay = torch.rand(*table, generator=g, dtype=torch.float64) if use_decay else None
    res = neighborhood_attention(q, k, v, ks, stride=ks, rpb=rpb, score=score, score_decay=decay,
                                 return_lse=score == "softmax", backend=backend)
    out, lse = res if score == "softmax" else (res, None)
    loss = (out * rand(*out.shape)).sum()
    if lse is not None:
        loss = loss + (lse * rand(*lse.shape)).sum()
    leaves = [t for t in (q, k, v, rpb) if t is not None]
    return [out] + ([lse] if lse is not None else []) + list(torch.autograd.grad(loss, leaves))


@pytest.mark.parametrize("score,use_rpb,use_decay", SCORES,
                         ids=["softmax", "softmax-rpb", "sigmoid", "sigmoid-rpb-decay"])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_blocked_path_matches_reference(case, score, use_rpb, use_decay, monkeypatch):
    calls = []
    real = windowed.windowed_forward
    monkeypatch.setattr(windowed, "windowed_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    ours = _run("torch", case, score, use_rpb, use_decay)
    assert calls == [1]  # the torch backend took the blocked path
    ref = _run("reference", case, score, use_rpb, use_decay)
    names = ["out"] + (["lse"] if score == "softmax" else []) + ["dq", "dk", "dv"] + (["drpb"] if use_rpb else [])
    for name, a, b in zip(names, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, name=name: f"{name}: {m}")


def test_blocked_path_float32_and_tiled_agree():
    """The blocked path and the tiled path it replaces agree in fp32 (same call, path forced)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 14, 21, 2, 8, generator=g) for _ in range(3))
    rpb = torch.randn(2, 1, 13, generator=g)
    out = neighborhood_attention(q, k, v, (1, 7), stride=(1, 7), rpb=rpb, backend="torch")
    from visionattn.kernels.semantics import na_params
    from visionattn.kernels.tiled import tiled_forward

    params = na_params(2, q, k, v, (1, 7), stride=(1, 7), rpb=rpb, backend="torch")
    tiled, _ = tiled_forward(q, k, v, rpb, None, params)
    torch.testing.assert_close(out, tiled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs", [{"stride": (1, 3)}, {"stride": (1, 7), "dilation": (2, 1)},
                                    {"stride": (1, 7), "is_causal": (False, True)}])
def test_other_calls_stay_on_the_tiled_path(kwargs, monkeypatch):
    monkeypatch.setattr(windowed, "windowed_forward", lambda *a, **kw: pytest.fail("took the blocked path"))
    q = torch.randn(1, 14, 14, 2, 8)
    neighborhood_attention(q, q, q, (1, 7), backend="torch", **kwargs)


@pytest.mark.parametrize("variant", ["retention", "swat"])
@pytest.mark.parametrize("shift", [False, True])
def test_gated_swinrmt_takes_the_blocked_path(variant, shift, monkeypatch):
    """Both passes of the windowed retention (row ``(1, M)`` then column ``(M, 1)``) go to the blocked path,
    forward and backward, never to the tiled kernel; and its output is the reference backend's."""
    calls = []
    real = windowed.windowed_forward
    monkeypatch.setattr(windowed, "windowed_forward",
                        lambda *a, **kw: calls.append(a[-1].kernel_size) or real(*a, **kw))
    monkeypatch.setattr(neighborhood, "_na_forward_op", lambda *a, **kw: pytest.fail("took the generic op"))
    torch.manual_seed(0)
    mod = WindowedRetention(16, 2, variant=variant, window_size=4, shift=shift, attention_backend="auto").double()
    ref = WindowedRetention(16, 2, variant=variant, window_size=4, shift=shift, attention_backend="reference").double()
    ref.load_state_dict(mod.state_dict())
    x = torch.randn(2, 9, 11, 16, dtype=torch.float64, requires_grad=True)
    out = mod(x)
    assert calls == [(1, 4), (4, 1)]
    (gx,) = torch.autograd.grad(out.square().sum(), x)
    out_ref = ref(x)
    (gx_ref,) = torch.autograd.grad(out_ref.square().sum(), x)
    torch.testing.assert_close(out, out_ref, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-9, atol=1e-10)


def test_blocked_path_compiles_without_graph_break():
    """torch.compile (fullgraph) captures the blocked path, forward and backward, with the eager results."""
    def fn(q, k, v, rpb):
        return neighborhood_attention(q, k, v, (1, 7), stride=(1, 7), rpb=rpb, backend="torch")

    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 9, 10, 2, 8, generator=g, requires_grad=True) for _ in range(3))
    rpb = torch.randn(2, 1, 13, generator=g, requires_grad=True)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    out = compiled(q, k, v, rpb)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, rpb))
    out_eager = fn(q, k, v, rpb)
    grads_eager = torch.autograd.grad(out_eager.square().sum(), (q, k, v, rpb))
    torch.testing.assert_close(out, out_eager)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b)
