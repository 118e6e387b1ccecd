"""Linear attention (HER-Seg's DLA): the chunked torch path and the Triton kernels (through
TRITON_INTERPRET=1 off-GPU) against the quadratic reference, forward and every gradient; memory that
grows linearly in N; FLOP counting; argument checks."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from visionattn.kernels import linear_attention, linear_attention_reference
from visionattn.kernels.linear_attention import _torch_backward, _torch_forward
from visionattn.kernels import triton_available
from visionattn.tasks.bench import PeakTensorMemory

# B, N, heads, d, dv: tails after the 16-token interpreter tiles and the 16-token torch chunks
SHAPES = [(1, 70, 2, 4, 4), (2, 33, 2, 8, 16), (1, 50, 2, 16, 8), (2, 1, 2, 8, 8)]
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not triton_available(), reason="no Triton"))]


def _inputs(B, N, H, d, dv, dtype=torch.float32, seed=0):
    """Feature-mapped (positive) q, k and their 'rotated' copies, values of either sign."""
    g = torch.Generator().manual_seed(seed)
    pos = [torch.nn.functional.elu(torch.randn(B, N, H, d, generator=g, dtype=dtype)) + 1 for _ in range(2)]
    rot = [torch.randn(B, N, H, d, generator=g, dtype=dtype) for _ in range(2)]
    v = torch.randn(B, N, H, dv, generator=g, dtype=dtype)
    return [t.requires_grad_() for t in (*pos, v, *rot)]  # q, k, v, q_rot, k_rot


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_every_gradient_match_the_quadratic_reference(backend, shape):
    q, k, v, q_rot, k_rot = inputs = _inputs(*shape)
    dout = torch.randn(*shape[:3], shape[4])
    expected = linear_attention_reference(q, k, v, q_rot, k_rot)
    expected_grads = torch.autograd.grad(expected, inputs, dout)
    out = linear_attention(q, k, v, q_rot, k_rot, backend=backend, chunk_size=16)
    grads = torch.autograd.grad(out, inputs, dout)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    for name, got, want in zip(("q", "k", "v", "q_rot", "k_rot"), grads, expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_and_unrotated_default(backend):
    q, k, v, _, _ = _inputs(2, 37, 2, 8, 8, dtype=torch.float64)
    out = linear_attention(q, k, v, backend=backend, chunk_size=16)  # q_rot, k_rot default to q, k
    expected = linear_attention_reference(q, k, v, q, k)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    for got, want in zip(grads, torch.autograd.grad(expected.square().sum(), (q, k, v))):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-12)


def test_normaliser_makes_constant_values_pass_through():
    """Without rotation, sum_m (q.k_m) c / sum_m (q.k_m) = c: each output is a convex mix of the values."""
    q, k, _, _, _ = _inputs(1, 40, 2, 8, 4)
    v = torch.tensor([1.0, -2.0, 3.0, 0.5]).expand(1, 40, 2, 4)
    out = linear_attention(q.detach(), k.detach(), v, eps=0.0, backend="torch")
    torch.testing.assert_close(out, v.expand_as(out), rtol=1e-5, atol=1e-6)


def test_torch_path_has_no_quadratic_tensors_and_linear_peak_memory():
    class LargestTensor(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in torch.utils._pytree.tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    LargestTensor.largest = max(LargestTensor.largest, t.numel())
            return out

    def step(N, chunk_size=None):  # the default: every product one contraction over all N tokens
        q, k, v, q_rot, k_rot = (t.detach() for t in _inputs(1, N, 1, 4, 4))
        dout = torch.randn(1, N, 1, 4)
        with PeakTensorMemory() as mem:
            out, S, kbar, z = _torch_forward(q_rot, k_rot, q, k, v, 1e-6, chunk_size)
            grads = _torch_backward(dout, q_rot, k_rot, q, k, v, S, kbar, z, out, 1e-6, chunk_size)
            del out, grads
        return mem.peak

    N = 4096
    with LargestTensor():
        step(N)
        step(N, chunk_size=256)
    assert LargestTensor.largest <= N * 4, LargestTensor.largest  # never N x N (16.7M), nothing beyond N x d
    small, large = step(1024), step(4096)
    assert large < 4.5 * small, (small, large)  # quadratic growth would be 16x


@pytest.mark.parametrize("backend", BACKENDS)
def test_flop_counter_counts_the_attention_products(backend):
    B, N, H, d, dv = 1, 40, 2, 8, 4
    q, k, v, q_rot, k_rot = (t.detach() for t in _inputs(B, N, H, d, dv))
    with FlopCounterMode(display=False) as counter:
        linear_attention(q, k, v, q_rot, k_rot, backend=backend, chunk_size=16)
    assert counter.get_total_flops() == 2 * B * H * N * (2 * d * dv + d)


def test_argument_checks():
    q, k, v, q_rot, _ = (t.detach() for t in _inputs(1, 8, 2, 4, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        linear_attention(q, k, v, backend="cuda")
    with pytest.raises(ValueError, match="q_rot and k_rot together"):
        linear_attention(q, k, v, q_rot)
    with pytest.raises(ValueError, match=r"k must have q's shape"):
        linear_attention(q, k[:, :4], v)
    with pytest.raises(ValueError, match=r"v must be \[B, N, heads, dv\]"):
        linear_attention(q, k, v[:, :, :1])
    with pytest.raises(ValueError, match="q_rot is torch.float64"):
        linear_attention(q, k, v, q_rot.double(), q_rot.double())
    with pytest.raises(ValueError, match=r"q must be \[B, N, heads, d\]"):
        linear_attention(q[0], k[0], v[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_accumulate_in_float32(dtype):
    """Half-precision inputs: the output is rounded to their dtype, so the backward recomputes q~ S in float32
    rather than reuse it; results match the float64 reference on the same (rounded) inputs."""
    q, k, v, q_rot, k_rot = (t.detach().to(dtype).requires_grad_() for t in _inputs(2, 45, 3, 8, 4))
    dout = torch.randn(2, 45, 3, 4).to(dtype)
    out = linear_attention(q, k, v, q_rot, k_rot, backend="torch")
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, (q, k, v, q_rot, k_rot), dout)
    wide = [t.detach().double().requires_grad_() for t in (q, k, v, q_rot, k_rot)]
    expected = linear_attention_reference(*wide)
    expected_grads = torch.autograd.grad(expected, wide, dout.double())
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)
    for name, got, want in zip(("q", "k", "v", "q_rot", "k_rot"), grads, expected_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2, msg=lambda m: f"d{name}: {m}")
