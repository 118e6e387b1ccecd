"""Top-K sparse attention: the chunked op and the Triton kernel against the dense masked reference (outputs
and every gradient), the tie rule, the limits K = 1 and K = N, and argument checks. The chunked op's CPU tests
run twice (fixture ``passes``): through the fused passes torch.compile builds, and through the eager ones."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from visionattn.kernels import topk_attention, topk_attention_reference, triton_available
from visionattn.kernels.sparse_attention import topk_keep_mask


def qkv(batch=2, nq=23, nk=23, heads=3, dim=8, dim_v=5, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda n, d: torch.randn(batch, n, heads, d, generator=g, dtype=dtype, requires_grad=True)  # noqa: E731
    return make(nq, dim), make(nk, dim), make(nk, dim_v)


@pytest.fixture(params=["fused", "eager"])
def passes(request, monkeypatch):
    """The chunked op's elementwise passes: compiled (the default on CPU) or eager (VISIONATTN_TOPK_COMPILE=0)."""
    from visionattn.kernels import sparse_attention

    if request.param == "eager":
        monkeypatch.setenv("VISIONATTN_TOPK_COMPILE", "0")
    else:
        monkeypatch.delenv("VISIONATTN_TOPK_COMPILE", raising=False)
    monkeypatch.setattr(sparse_attention, "_FUSED", {})
    return request.param


def grads(out, inputs, seed=1):
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, dout)


@pytest.mark.parametrize("top_k", [1, 5, 12, 23])
@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_matches_dense_reference_forward_and_backward(top_k, chunk_size, passes):
    q, k, v = qkv()
    out = topk_attention(q, k, v, top_k, chunk_size=chunk_size)
    ref = topk_attention_reference(q, k, v, top_k)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(got, want)


def test_cross_attention_lengths_and_custom_scale(passes):
    q, k, v = qkv(nq=7, nk=19)
    out = topk_attention(q, k, v, 6, scale=0.3, chunk_size=3)
    ref = topk_attention_reference(q, k, v, 6, scale=0.3)
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
        torch.testing.assert_close(got, want)


def test_mixture_of_k_matches_mixed_references(passes):
    q, k, v = qkv()
    top_ks = [11, 15, 17, 19]
    mix = torch.softmax(torch.randn(q.shape[0], len(top_ks), dtype=q.dtype), -1).requires_grad_()
    out = topk_attention(q, k, v, top_ks, mix=mix, chunk_size=5)
    ref = sum(mix[:, r, None, None, None] * topk_attention_reference(q, k, v, kk) for r, kk in enumerate(top_ks))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v, mix)), grads(ref, (q, k, v, mix))):
        torch.testing.assert_close(got, want)
    # without mix: the mean of the maps
    mean_ref = sum(topk_attention_reference(q, k, v, kk) for kk in top_ks) / len(top_ks)
    torch.testing.assert_close(topk_attention(q, k, v, top_ks), mean_ref)


def test_gradcheck(passes):
    q, k, v = qkv(batch=2, nq=6, nk=9, heads=2, dim=3, dim_v=2)
    mix = torch.rand(2, 2, dtype=torch.float64, requires_grad=True)
    def mixed(a, b, c, m):
        return topk_attention(a, b, c, [4, 7], mix=m, chunk_size=4)

    assert torch.autograd.gradcheck(mixed, (q, k, v, mix))


def test_all_keys_is_full_softmax_attention(passes):
    q, k, v = qkv(dtype=torch.float32)
    out = topk_attention(q, k, v, k.shape[1])
    full = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_one_key_returns_the_best_keys_value(passes):
    q, k, v = qkv()
    best = torch.einsum("bqhd,bkhd->bhqk", q, k).argmax(-1)  # [B, H, Nq]
    want = torch.stack([v[b, best[b, h], h] for b in range(q.shape[0]) for h in range(q.shape[2])])
    out = topk_attention(q, k, v, 1).permute(0, 2, 1, 3).reshape(want.shape)
    torch.testing.assert_close(out, want)


def test_ties_keep_the_lower_key_index(passes):
    # integer-valued inputs make the scores exact, so equal keys give bitwise-equal scores
    q = torch.ones(1, 1, 1, 2, dtype=torch.float64)
    k = torch.tensor([[3.0, 0], [1, 0], [2, 0], [1, 0], [1, 0], [0, 0]], dtype=torch.float64).view(1, 6, 1, 2)
    v = torch.arange(6, dtype=torch.float64).view(1, 6, 1, 1)
    # scores 3, 1, 2, 1, 1, 0: K = 3 keeps keys 0, 2 and the first of the tied 1s (key 1)
    assert topk_keep_mask(torch.tensor([3.0, 1, 2, 1, 1, 0]), 3).tolist() == [True, True, True, False, False, False]
    weights = torch.softmax(torch.tensor([3.0, 1, 2], dtype=torch.float64) * 2 ** -0.5, 0)
    want = (weights * torch.tensor([0.0, 1, 2], dtype=torch.float64)).sum()
    for chunk in (1, None):
        torch.testing.assert_close(topk_attention(q, k, v, 3, chunk_size=chunk).flatten(), want.view(1))
    torch.testing.assert_close(topk_attention_reference(q, k, v, 3).flatten(), want.view(1))


def test_ties_agree_with_reference_on_duplicated_keys(passes):
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (2, 9, 2, 4), generator=g).double().requires_grad_()
    k = torch.randint(-2, 3, (2, 5, 2, 4), generator=g).double().repeat(1, 3, 1, 1).requires_grad_()
    v = torch.randn(2, 15, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for top_k in (2, 4, 7):
        out = topk_attention(q, k, v, top_k, chunk_size=4)
        ref = topk_attention_reference(q, k, v, top_k)
        torch.testing.assert_close(out, ref)
        for got, want in zip(grads(out, (q, k, v)), grads(ref, (q, k, v))):
            torch.testing.assert_close(got, want)


def test_chunking_bounds_memory_and_float32_matches(passes):
    q, k, v = qkv(batch=1, nq=300, nk=300, heads=2, dim=16, dim_v=16, dtype=torch.float32)
    out = topk_attention(q, k, v, 150, chunk_size=64)
    torch.testing.assert_close(out, topk_attention_reference(q, k, v, 150), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("top_k", [0, 24, 2.5, True])
def test_rejects_bad_top_k(top_k):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="top_k"):
        topk_attention(q, k, v, top_k)


def test_rejects_mismatched_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="agree"):
        topk_attention(q, k[:, :, :, :4], v, 3)
    with pytest.raises(ValueError, match="agree"):
        topk_attention(q, k, v[:, :5], 3)
    with pytest.raises(ValueError, match=r"\[B, N, heads, D\]"):
        topk_attention(q[0], k, v, 3)


def test_rejects_bad_mix():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sequence"):
        topk_attention(q, k, v, 3, mix=torch.ones(2, 1, dtype=q.dtype))
    with pytest.raises(ValueError, match="mix must be"):
        topk_attention(q, k, v, [3, 5], mix=torch.ones(2, 3, dtype=q.dtype))


def test_threshold_mask_matches_stable_sort_mask_with_many_ties():
    from visionattn.kernels.sparse_attention import _threshold_keep_mask

    scores = torch.randint(0, 4, (200, 17), generator=torch.Generator().manual_seed(5)).float()
    for top_k in (1, 5, 9, 17):
        largest = scores.topk(min(top_k + 1, 17), dim=-1).values
        runner_up = largest[..., top_k:top_k + 1] if top_k < 17 else None
        mask = _threshold_keep_mask(scores, largest[..., top_k - 1:top_k], runner_up, top_k)
        assert torch.equal(mask, topk_keep_mask(scores, top_k))



@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("top_ks", [(1,), (17,), (5, 9, 12), (9, 13, 16, 17), (12, 5, 12)])
@pytest.mark.parametrize("threads", [1, 3])
def test_thresholds_are_the_kth_largest_with_tie_flags(dtype, top_ks, threads):
    """Both selection paths (numpy's partition for CPU float32/64, on 1 or 3 threads, and torch.topk
    otherwise) against a full sort: the K-th largest score and whether the K+1-th equals it, with ties."""
    from visionattn.kernels.sparse_attention import _thresholds

    scores = torch.randint(0, 6, (3, 80, 17), generator=torch.Generator().manual_seed(2)).to(dtype)
    scores[0] += torch.randn(80, 17, generator=torch.Generator().manual_seed(3)).to(dtype)  # and no ties
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        threshold, ambiguous = _thresholds(scores, top_ks)
    finally:
        torch.set_num_threads(previous)
    descending = scores.sort(-1, descending=True).values
    for r, k in enumerate(top_ks):
        assert torch.equal(threshold[..., r], descending[..., k - 1])
        expected = descending[..., k] == descending[..., k - 1] if k < 17 else torch.zeros_like(ambiguous[..., r])
        assert torch.equal(ambiguous[..., r], expected)

# ------------------------------------------------------------------------------------ the Triton kernel
# (CUDA on a GPU machine; TRITON_INTERPRET=1 on CPU tensors elsewhere)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="needs CUDA or TRITON_INTERPRET=1 and triton")


def _on(device, *tensors):
    return [t.detach().to(device).requires_grad_() for t in tensors]


@needs_triton
@pytest.mark.parametrize("top_k", [1, 5, 23, (11, 15, 17, 19)], ids=str)
def test_triton_matches_dense_reference_forward_and_backward(top_k):
    q, k, v = qkv()
    mix = None
    if isinstance(top_k, tuple):
        mix = torch.softmax(torch.randn(q.shape[0], len(top_k), dtype=q.dtype), -1).requires_grad_()
    inputs = [q, k, v] + ([mix] if mix is not None else [])
    ref = topk_attention(*inputs[:3], list(top_k) if mix is not None else top_k, mix=mix, backend="reference")
    dev = _on(TRITON_DEVICE, *inputs)
    out = topk_attention(*dev[:3], list(top_k) if mix is not None else top_k, mix=dev[3] if mix is not None else None,
                         backend="triton")
    torch.testing.assert_close(out.cpu(), ref)
    for got, want in zip(grads(out, dev), grads(ref, inputs)):
        torch.testing.assert_close(got.cpu(), want)


@needs_triton
def test_triton_ties_agree_with_reference_on_duplicated_keys():
    g = torch.Generator().manual_seed(3)
    q = torch.randint(-2, 3, (2, 9, 2, 4), generator=g).double()
    q[:, :4] = -q[:, :4].abs()
    k = torch.randint(-2, 3, (2, 5, 2, 4), generator=g).double().repeat(1, 3, 1, 1)
    k[:, 0] = 0.0  # many exact-zero scores: ties at zero, keys of either sign around them
    v = torch.randn(2, 15, 2, 3, generator=g, dtype=torch.float64)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    for top_k in (2, 4, 7):
        ref = topk_attention_reference(q, k, v, top_k)
        dev = _on(TRITON_DEVICE, q, k, v)
        out = topk_attention(*dev, top_k, backend="triton")
        torch.testing.assert_close(out.cpu(), ref)
        for got, want in zip(grads(out, dev), grads(ref, (q, k, v))):
            torch.testing.assert_close(got.cpu(), want)


@needs_triton
def test_triton_float32_cross_attention_and_scale():
    q, k, v = qkv(batch=1, nq=40, nk=33, heads=2, dim=16, dim_v=8, dtype=torch.float32)
    ref = topk_attention_reference(q, k, v, 20, scale=0.3)
    dev = _on(TRITON_DEVICE, q, k, v)
    out = topk_attention(*dev, 20, scale=0.3, backend="triton")
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads(out, dev), grads(ref, (q, k, v))):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@needs_triton
def test_triton_key_limit_is_explicit_and_auto_falls_back():
    from visionattn.kernels.sparse_attention import TRITON_MAX_KEYS

    q = torch.randn(1, 2, 1, 2, device=TRITON_DEVICE)
    k = torch.randn(1, TRITON_MAX_KEYS + 1, 1, 2, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match=f"handles up to {TRITON_MAX_KEYS} keys"):
        topk_attention(q, k, k, 3, backend="triton")
    torch.testing.assert_close(topk_attention(q, k, k, 3), topk_attention(q, k, k, 3, backend="torch"))


def test_mixture_with_ties_duplicate_and_all_keys(passes):
    """Bottom-side ranking (every K keeps at least half the keys) with ties across cuts, a repeated K and
    K = Nk, mixed: against the mixed references."""
    g = torch.Generator().manual_seed(11)
    q = torch.randint(-2, 3, (2, 9, 2, 4), generator=g).double().requires_grad_()
    k = torch.randint(-2, 3, (2, 5, 2, 4), generator=g).double().repeat(1, 3, 1, 1).requires_grad_()
    v = torch.randn(2, 15, 2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    top_ks = [10, 8, 15, 10]
    mix = torch.softmax(torch.randn(2, 4, generator=g, dtype=torch.float64), -1).requires_grad_()
    out = topk_attention(q, k, v, top_ks, mix=mix, chunk_size=4)
    ref = sum(mix[:, r, None, None, None] * topk_attention_reference(q, k, v, kk) for r, kk in enumerate(top_ks))
    torch.testing.assert_close(out, ref)
    for got, want in zip(grads(out, (q, k, v, mix)), grads(ref, (q, k, v, mix))):
        torch.testing.assert_close(got, want)


def test_backward_reranks_a_chunk_whose_recomputed_sets_differ(monkeypatch, passes):
    """The backward rebuilds the kept sets from the saved thresholds; if the recomputed scores no longer give
    K keys per set (a matmul that is not bitwise reproducible), it ranks the chunk afresh. Simulated by
    lowering the first backward chunk's scores a little: the K-th key then falls under its threshold."""
    from visionattn.kernels import sparse_attention

    q, k, v = qkv()
    top_ks = [5, 12]
    out = topk_attention(q, k, v, top_ks, chunk_size=8)
    calls = {"scores": 0, "ranked": 0}
    log2_scores, thresholds = sparse_attention._log2_scores, sparse_attention._thresholds

    def drifting_scores(q_, k_, scale):
        calls["scores"] += 1
        s = log2_scores(q_, k_, scale)
        return s - 1e-6 if calls["scores"] == 1 else s

    def counted_thresholds(scores, ks):
        calls["ranked"] += 1
        return thresholds(scores, ks)

    monkeypatch.setattr(sparse_attention, "_log2_scores", drifting_scores)
    monkeypatch.setattr(sparse_attention, "_thresholds", counted_thresholds)
    got = grads(out, (q, k, v))
    monkeypatch.setattr(sparse_attention, "_log2_scores", log2_scores)
    monkeypatch.setattr(sparse_attention, "_thresholds", thresholds)
    ref = sum(topk_attention_reference(q, k, v, kk) for kk in top_ks) / 2
    assert calls["scores"] == 3 and calls["ranked"] == 1  # 3 chunks; only the drifted one was ranked again
    for g_, w in zip(got, grads(ref, (q, k, v))):
        torch.testing.assert_close(g_, w)


def test_fused_passes_are_used_and_match_the_eager_ones(monkeypatch):
    """On CPU the chunks go through the compiled passes (not a silent fallback), with the eager passes'
    results; a compiler that fails is reported once and the eager passes take over."""
    from visionattn.kernels import sparse_attention

    q, k, v = qkv(batch=2, nq=64, nk=150, heads=2, dim=16, dim_v=8, dtype=torch.float32, seed=4)
    top_ks = [75, 100, 112, 120]  # DKSA's 1/2 .. 4/5 of the keys
    mix = torch.softmax(torch.randn(2, 4, generator=torch.Generator().manual_seed(5)), -1).requires_grad_()

    def run():
        out = topk_attention(q, k, v, top_ks, mix=mix, chunk_size=16)
        return (out, *grads(out, (q, k, v, mix)))

    monkeypatch.delenv("VISIONATTN_TOPK_COMPILE", raising=False)
    monkeypatch.setattr(sparse_attention, "_FUSED", {})
    fused = run()
    assert set(sparse_attention._FUSED) == {"set_sums", "mixed_weights", "backward_sums", "backward_grads"}
    assert all(f is not None for f in sparse_attention._FUSED.values())
    monkeypatch.setenv("VISIONATTN_TOPK_COMPILE", "0")
    monkeypatch.setattr(sparse_attention, "_FUSED", {})
    eager = run()
    assert set(sparse_attention._FUSED.values()) == {None}
    for got, want in zip(fused, eager):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    def broken_compile(fn, **kwargs):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
        return fail

    monkeypatch.delenv("VISIONATTN_TOPK_COMPILE")
    monkeypatch.setattr(sparse_attention, "_FUSED", {})
    monkeypatch.setattr(torch, "compile", broken_compile)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fallback = run()
    assert [str(w.message) for w in caught if "fused CPU passes" in str(w.message)] == [
        "topk_attention: the fused CPU passes could not be compiled (RuntimeError: InvalidCxxCompiler: No working "
        "C++ compiler found); using the eager passes (slower). Set VISIONATTN_TOPK_COMPILE=0 to skip the attempt."]
    for got, want in zip(fallback, eager):
        torch.testing.assert_close(got, want)

def test_only_tied_rows_leave_the_fused_passes(monkeypatch, passes):
    """Queries of zeros score every key alike (each cut splits a tie); the other rows have no ties. With the
    fused passes only the tied rows go through the eager ones; either way the result is the reference's."""
    from visionattn.kernels import sparse_attention

    q, k, v = qkv(batch=1, nq=12, nk=20, heads=2, dim=6, dim_v=4, seed=8)
    q = q.detach().clone()
    q[:, ::3] = 0  # 4 of 12 queries, in both heads: 8 of the 24 rows
    q.requires_grad_()
    rows_seen = []
    eager_weights, eager_backward = sparse_attention._eager_weights, sparse_attention._eager_backward

    def counted_weights(s2, *args):
        rows_seen.append(("forward", s2.shape[0]))
        return eager_weights(s2, *args)

    def counted_backward(s2, *args):
        rows_seen.append(("backward", s2.shape[0]))
        return eager_backward(s2, *args)

    monkeypatch.setattr(sparse_attention, "_eager_weights", counted_weights)
    monkeypatch.setattr(sparse_attention, "_eager_backward", counted_backward)
    top_ks = [7, 13]
    out = topk_attention(q, k, v, top_ks)
    got = (out, *grads(out, (q, k, v)))
    ref = sum(topk_attention_reference(q, k, v, kk) for kk in top_ks) / 2
    for g_, w in zip(got, (ref, *grads(ref, (q, k, v)))):
        torch.testing.assert_close(g_, w)
    assert rows_seen == ([("forward", 8), ("backward", 8)] if passes == "fused" else
                         [("forward", 24), ("backward", 24)])


def test_single_row_chunks_keep_the_fused_passes(passes):
    """One batch element, one head, one query per chunk: chunks of a single row (a size torch.compile
    specialises) still match the reference, and do not switch the fused passes off."""
    from visionattn.kernels import sparse_attention

    q, k, v = qkv(batch=1, nq=3, nk=9, heads=1, dim=4, dim_v=3, seed=6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = topk_attention(q, k, v, [3, 5], chunk_size=1)
        got = (out, *grads(out, (q, k, v)))
    ref = (topk_attention_reference(q, k, v, 3) + topk_attention_reference(q, k, v, 5)) / 2
    for g_, w in zip(got, (ref, *grads(ref, (q, k, v)))):
        torch.testing.assert_close(g_, w)
    expect_compiled = passes == "fused"
    assert all((f is not None) == expect_compiled for f in sparse_attention._FUSED.values())
