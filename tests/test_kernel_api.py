"""The kernels' shared API: positional/keyword-only arguments, the one backend vocabulary (every op, every
name, same outputs and gradients as 'reference'), refused names, and the frozen NAParams."""
import dataclasses

import pytest
import torch

from visionattn.kernels import (
    BACKENDS, NAParams, check_backend, linear_attention, na1d, na2d, na3d, na_reference, neighborhood_attention,
    topk_attention, triton_available,
)
from visionattn.kernels.semantics import na_params
from visionattn.layers import NeighborhoodAttention2d

# Triton runs on CUDA tensors on a GPU machine and on CPU tensors under TRITON_INTERPRET=1 elsewhere
TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EVERY_BACKEND = [
    pytest.param(b, marks=pytest.mark.skipif(b == "triton" and not triton_available(), reason="no Triton"))
    for b in BACKENDS
]


def _device(backend):
    return TRITON_DEVICE if backend in ("triton", "auto") else "cpu"


def _grads(fn, inputs, seed=1):
    out = fn(*inputs)
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype).to(out.device)
    return [out] + list(torch.autograd.grad(out, inputs, dout))


def _assert_all_close(got, want, atol):
    for name, g, w in zip(("out", "d0", "d1", "d2", "d3", "d4", "d5"), got, want):
        torch.testing.assert_close(g.cpu().double(), w.cpu().double(), rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


def _tensors(*shapes, device="cpu", dtype=torch.float32, positive=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        t = torch.randn(*shape, generator=g, dtype=torch.float64)
        t = torch.nn.functional.elu(t) + 1 if positive else t
        out.append(t.to(device=device, dtype=dtype).requires_grad_())
    return out


# ------------------------------------------------------------------------------------- every backend name


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_na_every_backend_matches_reference(backend):
    def run(be, device):
        q, k, v, rpb = _tensors((1, 7, 9, 2, 8), (1, 7, 9, 2, 8), (1, 7, 9, 2, 8), (2, 5, 7), device=device)

        def fn(q, k, v, rpb):
            return na2d(q, k, v, (3, 4), stride=(1, 2), dilation=(2, 1), is_causal=(False, True), rpb=rpb, backend=be)

        return _grads(fn, [q, k, v, rpb])

    _assert_all_close(run(backend, _device(backend)), run("reference", "cpu"), atol=1e-4)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_linear_attention_every_backend_matches_reference(backend):
    def run(be, device):
        q, k = _tensors((2, 21, 2, 8), (2, 21, 2, 8), device=device, positive=True)
        v, q_rot, k_rot = _tensors((2, 21, 2, 4), (2, 21, 2, 8), (2, 21, 2, 8), device=device, seed=1)
        return _grads(lambda *t: linear_attention(*t, chunk_size=8, backend=be), [q, k, v, q_rot, k_rot])

    _assert_all_close(run(backend, _device(backend)), run("reference", "cpu"), atol=1e-5)


@pytest.mark.parametrize("backend", EVERY_BACKEND)
def test_topk_attention_every_backend_matches_reference(backend):
    def run(be, device):
        q, k, v = _tensors((2, 13, 2, 8), (2, 17, 2, 8), (2, 17, 2, 4), device=device)
        mix = torch.softmax(torch.randn(2, 3, generator=torch.Generator().manual_seed(2)), -1).to(device)
        mix.requires_grad_()
        return _grads(lambda q, k, v, m: topk_attention(q, k, v, [3, 8, 17], mix=m, chunk_size=5, backend=be),
                      [q, k, v, mix])

    _assert_all_close(run(backend, _device(backend)), run("reference", "cpu"), atol=1e-5)


# ------------------------------------------------------------------------------------ refused backend names


OPS = {
    "na1d": lambda be: na1d(*_tensors((1, 9, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8)), 3, backend=be),
    "linear_attention": lambda be: linear_attention(*_tensors((1, 9, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8)), backend=be),
    "topk_attention": lambda be: topk_attention(*_tensors((1, 9, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8)), 3, backend=be),
}


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("name", ["cuda", "fused", "", None, "Torch"])
def test_unknown_backend_names_list_the_vocabulary(op, name):
    with pytest.raises(ValueError, match=rf"{op}: backend must be one of 'auto', 'reference', 'torch', 'triton'"):
        OPS[op](name)


@pytest.mark.parametrize("op", OPS)
def test_old_cpu_name_says_it_is_now_torch(op):
    with pytest.raises(ValueError, match=r"backend 'cpu' is now called 'torch'") as info:
        OPS[op]("cpu")
    assert "one of 'auto', 'reference', 'torch', 'triton'" in str(info.value)


def test_modules_check_the_name_when_built():
    with pytest.raises(ValueError, match="is now called 'torch'"):
        NeighborhoodAttention2d(16, 2, 3, attention_backend="cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        NeighborhoodAttention2d(16, 2, 3, attention_backend="gpu")
    with pytest.raises(TypeError):
        NeighborhoodAttention2d(16, 2, 3, backend="torch")  # the old argument name is gone
    assert check_backend("x", "torch") == "torch"


@pytest.mark.skipif(torch.cuda.is_available() or triton_available(), reason="needs a machine without Triton")
def test_triton_without_triton_is_refused():
    with pytest.raises(ValueError, match="backend 'triton' needs"):
        OPS["na1d"]("triton")


# --------------------------------------------------------------------------------------- positional misuse


def test_na_positional_stride_or_dilation_is_a_type_error():
    q, k, v = _tensors((1, 9, 9, 2, 8), (1, 9, 9, 2, 8), (1, 9, 9, 2, 8))
    for fn in (na2d, neighborhood_attention):
        with pytest.raises(TypeError):
            fn(q, k, v, 3, 2)  # was dilation=2 before; never silently stride (or vice versa)
        with pytest.raises(TypeError):
            fn(q, k, v, 3, 1, 2)
    with pytest.raises(TypeError):
        na1d(q[:, 0], k[:, 0], v[:, 0], 3, 1)
    with pytest.raises(TypeError):
        na3d(q[:, None], k[:, None], v[:, None], 1, 1)
    with pytest.raises(TypeError):
        na_reference(q, k, v, 3, 1)
    with pytest.raises(TypeError):  # the old leading n_dims
        neighborhood_attention(2, q, k, v, 3)
    with pytest.raises(TypeError):
        NeighborhoodAttention2d(16, 2, 3, 2)
    # keyword order is free and NATTEN's names work
    torch.testing.assert_close(na2d(q, k, v, 3, dilation=2, stride=2), na2d(q, k, v, 3, stride=2, dilation=2))


def test_linear_and_topk_positional_options_are_type_errors():
    q, k, v = _tensors((1, 9, 2, 8), (1, 9, 2, 8), (1, 9, 2, 8), positive=True)
    with pytest.raises(TypeError):
        linear_attention(q, k, v, q, k, 1e-6)  # eps is keyword-only
    with pytest.raises(TypeError):
        topk_attention(q, k, v, 3, None)  # mix is keyword-only
    with pytest.raises(TypeError):
        topk_attention(q, k, v, 3, None, 0.5)


def test_generic_neighborhood_attention_dispatches_on_rank():
    q, k, v = _tensors((1, 5, 6, 4, 2, 8), (1, 5, 6, 4, 2, 8), (1, 5, 6, 4, 2, 8))
    torch.testing.assert_close(neighborhood_attention(q, k, v, 3, backend="torch"), na3d(q, k, v, 3, backend="torch"))
    with pytest.raises(ValueError, match="1 to 3 axes"):
        neighborhood_attention(q[0, 0, 0], k[0, 0, 0], v[0, 0, 0], 3)


# ------------------------------------------------------------------------------------------------ NAParams


def test_na_params_are_normalised_frozen_and_hashable():
    q = torch.randn(1, 9, 10, 2, 8)
    p = na_params(2, q, q, q, (3, 5), stride=(1, 2), dilation=2, is_causal=(True, False), backend="torch")
    assert p == NAParams(n_dims=2, kernel_size=(3, 5), stride=(1, 2), dilation=(2, 2), is_causal=(True, False),
                         scale=8 ** -0.5, backend="torch")
    assert hash(p) == hash(dataclasses.replace(p)) and len({p, dataclasses.replace(p)}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.stride = (2, 2)
    assert NAParams.from_op_args(*p.op_args(), has_rpb=False, has_score_decay=False) == p
    assert na_params(2, q, q, q, 3, backend="auto").backend == "torch"  # CPU tensors
    with_bias = na_params(2, q, q, q, 3, attn_bias_fn=lambda o: torch.zeros(2, 5, 5), backend="reference")
    assert with_bias.has_rpb and with_bias.backend == "reference" and with_bias.scale == 8 ** -0.5
