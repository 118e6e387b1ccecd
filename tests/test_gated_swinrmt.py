"""Gated-SwinRMT: the windowed retention on the neighborhood-attention kernel against a direct, loop-based
implementation of the same windows (shifted windows, partial windows at the borders, the collapse to one
window on small maps), plus sizes and the gates the abstract names."""

import pytest
import torch
import torch.nn.functional as F

import visionattn
from visionattn.backbones.gated_swinrmt import WindowedRetention, balanced_alibi_slopes, retention_decay_rates


def window_ids(L, M, shift):
    """Window of each index: windows start at -(M - shift) % M, so a shifted grid has a partial first window."""
    top = (M - shift) % M
    return [(i + top) // M for i in range(L)]


def direct_pass(q, k, v, axis, M, shift, weight_fn):
    """One retention pass done the slow way: every query against the keys of its own window on ``axis``.
    q, k: [H, W, heads, d]; v: [H, W, heads, dv]."""
    H, W = q.shape[:2]
    L = H if axis == 0 else W
    ids = window_ids(L, M, shift)
    out = torch.zeros_like(v)
    for a in range(H):
        for b in range(W):
            i = a if axis == 0 else b
            keys = [j for j in range(L) if ids[j] == ids[i]]
            pos = [(j, b) if axis == 0 else (a, j) for j in keys]
            kk = torch.stack([k[p] for p in pos])  # [n, heads, d]
            vv = torch.stack([v[p] for p in pos])
            dist = torch.tensor([abs(j - i) for j in keys], dtype=q.dtype)
            logits = (q[a, b][None] * kk).sum(-1) * q.shape[-1] ** -0.5  # [n, heads]
            w = weight_fn(logits, dist[:, None])
            out[a, b] = (w[..., None] * vv).sum(0)
    return out


def direct_retention(mod: WindowedRetention, x: torch.Tensor) -> torch.Tensor:
    B, H, W, C = x.shape
    heads, hd = mod.num_heads, mod.head_dim
    M, shift = mod.window_size, (mod.window_size // 2 if mod.shift else 0)
    if min(H, W) <= M:
        M, shift = min(H, W), 0
    log_gamma = retention_decay_rates(heads)
    q, k, v = mod.q(x), mod.k(x), mod.v(x)
    if mod.variant == "swat":
        v = v * F.silu(mod.value_gate(x))
        slopes = balanced_alibi_slopes(heads)

        def weight_fn(logits, dist):
            return torch.sigmoid(logits + slopes * dist) * torch.exp(log_gamma * dist)
    else:
        def weight_fn(logits, dist):
            return torch.softmax(logits + log_gamma * dist, dim=0)
    outs = []
    for b in range(B):
        qb, kb = q[b].view(H, W, heads, hd), k[b].view(H, W, heads, hd)
        o = direct_pass(qb, kb, v[b].view(H, W, heads, hd), 1, M, shift, weight_fn)
        o = direct_pass(qb, kb, o, 0, M, shift, weight_fn)
        outs.append(o.reshape(H, W, C))
    out = torch.stack(outs)
    if mod.variant == "swat":
        out = mod.norm(out.reshape(-1, C)).view(B, H, W, C)
    out = out + mod.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    if mod.variant == "retention":
        out = out * torch.sigmoid(mod.gate(x))
    return mod.out_proj(out)


@pytest.mark.parametrize("variant", ["retention", "swat"])
@pytest.mark.parametrize("size,M,shift", [((9, 11), 4, False), ((9, 11), 4, True), ((10, 7), 3, True), ((5, 6), 7, True),
                                          ((8, 12), 4, False), ((6, 6), 7, True)])  # the last two: no padding
def test_windowed_retention_matches_direct_windows(variant, size, M, shift):
    torch.manual_seed(0)
    mod = WindowedRetention(16, 2, variant=variant, window_size=M, shift=shift, rope=False).eval()
    x = torch.randn(2, *size, 16)
    with torch.no_grad():
        torch.testing.assert_close(mod(x), direct_retention(mod, x), rtol=1e-4, atol=1e-5)


def test_windowed_retention_gradients_flow_everywhere():
    mod = WindowedRetention(16, 2, variant="retention", window_size=4, shift=True)
    x = torch.randn(1, 9, 10, 16, requires_grad=True)
    mod(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in mod.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_rotary_keeps_scores_relative():
    from visionattn.backbones.gated_swinrmt import rotary

    torch.manual_seed(0)
    freq = 1.0 / 10000 ** torch.linspace(0, 1, 4)
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    def score(i, j):
        return (rotary(q, (torch.tensor([float(i)])[:, None] * freq)) * rotary(k, (torch.tensor([float(j)])[:, None] * freq))).sum()
    torch.testing.assert_close(score(3, 5), score(10, 12))


def test_decay_rates_and_slopes():
    lg = retention_decay_rates(4, 2.0, 4.0)
    torch.testing.assert_close(lg, torch.log(1 - 2 ** (-2.0 - torch.arange(4.0))).float())
    s = balanced_alibi_slopes(8)
    assert (s[:4] < 0).all() and (s[4:] > 0).all()
    torch.testing.assert_close(s[:4].abs(), torch.tensor([2 ** (-8 * k / 4) for k in range(1, 5)]))


@pytest.mark.parametrize("name", ["gated_swinrmt_swat", "gated_swinrmt_retention"])
def test_paper_size(name):
    n = sum(p.numel() for p in visionattn.create_model(name).parameters())
    assert 77e6 <= n <= 80e6, n  # the abstract: "about 77-79M"; this reading gives 79.5M


def test_variants_differ_only_by_their_gates():
    swat = visionattn.create_model("gated_swinrmt_swat_cifar").state_dict()
    ret = visionattn.create_model("gated_swinrmt_retention_cifar").state_dict()
    only_swat = {k.split(".")[-2] for k in set(swat) - set(ret)}
    only_ret = {k.split(".")[-2] for k in set(ret) - set(swat)}
    assert only_swat == {"value_gate", "norm"} and only_ret == {"gate"}


def test_runs_at_cifar_and_imagenet_sizes_and_rejects_bad_config():
    m = visionattn.create_model("gated_swinrmt_swat_cifar").eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="heads of an even width"):
        visionattn.create_model("gated_swinrmt_retention_tiny", num_heads=(3, 4, 8, 16))
    with pytest.raises(ValueError, match="at least 32x32"):
        m(torch.randn(1, 3, 16, 16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rotary_turns_each_channel_pair(dtype):
    """rotary against the pair rotation written out channel by channel ((x1, x2) -> (x1 cos - x2 sin,
    x1 sin + x2 cos)), for the complex-product path (fp32, fp64) and the real one (bf16)."""
    from visionattn.backbones.gated_swinrmt import rotary

    torch.manual_seed(0)
    x = torch.randn(2, 6, 3, 8, dtype=torch.float64)
    angles = torch.rand(6, 4, dtype=torch.float64) * 7
    expected = torch.empty_like(x)
    for i in range(4):
        c, s = angles[:, i].cos()[:, None], angles[:, i].sin()[:, None]
        x1, x2 = x[..., 2 * i], x[..., 2 * i + 1]
        expected[..., 2 * i], expected[..., 2 * i + 1] = x1 * c - x2 * s, x1 * s + x2 * c
    got = rotary(x.to(dtype), angles.to(dtype))
    assert got.dtype == dtype and got.shape == x.shape
    tol = {torch.float32: 1e-6, torch.float64: 1e-12, torch.bfloat16: 5e-2}[dtype]
    torch.testing.assert_close(got.double(), expected, rtol=tol, atol=tol)
