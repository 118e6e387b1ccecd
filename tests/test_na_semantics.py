"""NATTEN's window rules, checked against windows written out by hand, and the reference oracle against
plain self-attention where the two coincide."""
import pytest
import torch
import torch.nn.functional as F

from visionattn.kernels import na1d, na2d, na3d, na_reference
from visionattn.kernels.semantics import axis_mask_and_offsets


def keys_of(L, K, d=1, s=1, causal=False):
    mask, _ = axis_mask_and_offsets(L, K, d, s, causal)
    return [torch.nonzero(mask[i]).flatten().tolist() for i in range(L)]


def test_odd_kernel_borders_shift_inward():
    w = keys_of(7, 3)
    assert w[0] == [0, 1, 2] and w[3] == [2, 3, 4] and w[6] == [4, 5, 6]


def test_even_kernel_has_more_keys_on_the_left():
    w = keys_of(8, 4)
    assert w[3] == [1, 2, 3, 4]  # two left, itself, one right
    assert w[0] == [0, 1, 2, 3] and w[7] == [4, 5, 6, 7]


def test_dilation_works_in_group_coordinates():
    w = keys_of(7, 3, d=2)  # groups {0,2,4,6} and {1,3,5}
    assert w[0] == [0, 2, 4] and w[6] == [2, 4, 6] and w[4] == [2, 4, 6]
    assert w[1] == [1, 3, 5] and w[5] == [1, 3, 5]


def test_stride_equal_to_kernel_is_blocked_attention():
    w = keys_of(8, 4, s=4)
    assert all(w[i] == [0, 1, 2, 3] for i in range(4))
    assert all(w[i] == [4, 5, 6, 7] for i in range(4, 8))


def test_strided_windows_share_the_leaders_window():
    w = keys_of(9, 3, s=2)  # leaders 1, 3, 5, 7 and the last group clamps to 8
    assert w[0] == w[1] == [0, 1, 2]
    assert w[2] == w[3] == [2, 3, 4]
    assert w[8] == [6, 7, 8]


def test_causal_windows_are_truncated_not_shifted():
    w = keys_of(6, 3, causal=True)
    assert w[0] == [0] and w[1] == [0, 1] and w[4] == [2, 3, 4]


def test_causal_stride_uses_the_last_query_of_the_group():
    w = keys_of(8, 4, s=2, causal=True)
    assert w[2] == [0, 1, 2] and w[3] == [0, 1, 2, 3]  # leader 3 -> start 0, each ends at the query


def test_rpb_offsets_track_the_true_offset():
    _, off = axis_mask_and_offsets(7, 3, 1, 1, False)
    assert off[0, 2].item() == 2 - 0 + 2 and off[6, 4].item() == 4 - 6 + 2


@pytest.mark.parametrize("causal", [False, True])
def test_kernel_equal_to_extent_is_self_attention(causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 12, 3, 8) for _ in range(3))
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)
    for backend in ("reference", "torch"):
        torch.testing.assert_close(na1d(q, k, v, 12, is_causal=causal, backend=backend), ref, rtol=1e-5, atol=1e-5)
    q2, k2, v2 = (torch.randn(1, 4, 5, 2, 8) for _ in range(3))
    flat = [t.reshape(1, 20, 2, 8).transpose(1, 2) for t in (q2, k2, v2)]
    ref2 = F.scaled_dot_product_attention(*flat).transpose(1, 2).reshape(1, 4, 5, 2, 8)
    torch.testing.assert_close(na2d(q2, k2, v2, (4, 5), backend="torch"), ref2, rtol=1e-5, atol=1e-5)


def test_reference_against_a_per_query_loop():
    """The dense-mask oracle against the simplest possible implementation: loop over queries and their keys."""
    torch.manual_seed(0)
    H, W, K = 5, 6, 3
    q, k, v = (torch.randn(1, H, W, 1, 4, dtype=torch.float64) for _ in range(3))
    out, _ = na_reference(q, k, v, K)
    rows, cols = keys_of(H, K), keys_of(W, K)
    for i in range(H):
        for j in range(W):
            keys = [(a, b) for a in rows[i] for b in cols[j]]
            logits = torch.stack([(q[0, i, j, 0] * k[0, a, b, 0]).sum() / 2.0 for a, b in keys])
            expected = (torch.softmax(logits, 0)[:, None] * torch.stack([v[0, a, b, 0] for a, b in keys])).sum(0)
            torch.testing.assert_close(out[0, i, j, 0], expected)


def _qkv(shape):
    return [torch.randn(shape) for _ in range(3)]


@pytest.mark.parametrize("call,match", [
    (lambda: na2d(*_qkv((1, 5, 5, 2, 8)), 6), "kernel_size \\* dilation must be <= the input extent"),
    (lambda: na2d(*_qkv((1, 9, 9, 2, 8)), 3, dilation=4), "axis 0 has extent 9 but kernel_size 3 \\* dilation 4"),
    (lambda: na2d(*_qkv((1, 9, 9, 2, 8)), 3, stride=4), "stride must be in \\[1, kernel_size\\]"),
    (lambda: na2d(*_qkv((1, 9, 9, 2, 8)), 0), "kernel_size must be >= 1"),
    (lambda: na2d(*_qkv((1, 9, 9, 2, 8)), 3, dilation=0), "dilation must be >= 1"),
    (lambda: na2d(*_qkv((1, 9, 9, 2, 8)), (3, 3, 3)), "kernel_size must be a int or a tuple of 2"),
    (lambda: na2d(*_qkv((1, 9, 2, 8)), 3), "query must be 5-D"),
    (lambda: na1d(torch.randn(1, 9, 2, 8), torch.randn(1, 8, 2, 8), torch.randn(1, 9, 2, 8), 3), "key shape"),
    (lambda: na1d(torch.randn(1, 9, 2, 8), torch.randn(1, 9, 2, 8).double(), torch.randn(1, 9, 2, 8), 3), "dtypes differ"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, rpb=torch.zeros(2, 4)), "rpb must have shape"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, score="relu"), "score must be"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, score="sigmoid", return_lse=True), "return_lse"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, is_causal=1), "is_causal must be bool"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, backend="cuda"),
     "backend must be one of 'auto', 'reference', 'torch', 'triton', got 'cuda'"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, backend="cpu"), "backend 'cpu' is now called 'torch'"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, scale="0.5"), "scale must be a finite number"),
    (lambda: na1d(*_qkv((1, 9, 2, 8)), 3, rpb=torch.zeros(2, 5, dtype=torch.long)), "rpb must be a floating-point"),
    (lambda: na2d(*_qkv((1, 9, 9, 2, 8)), 3, dilation=(1, 2, 1)), "dilation must be a int or a tuple of 2"),
    (lambda: na3d(*_qkv((1, 4, 4, 4, 2, 8)), 3, attn_bias_fn=lambda o: torch.zeros(3)), "attn_bias_fn must return"),
])
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
