"""HER-Seg: sizes against the v1 code's count, shapes and the size rule, gradients, DLA against a naive
re-implementation (v1's complex-number RoPE + the quadratic attention oracle), RoPE / gate / meta-pooling
behaviour, registry and MONAI use, and the memory benchmark at a small size."""
import pytest
import torch
import torch.nn.functional as F

import visionattn
from visionattn.decoders import HERSeg
from visionattn.decoders.herseg import DualGatedLinearAttention, MetaPooling, RoPE2d
from visionattn.kernels import linear_attention_reference

# v1 code (dim 96): LGViT 957,648 + neck 615,424 + mask decoder 1,947,072 (four output tokens, three hypernetwork
# MLPs) + prompt encoder 6,220 = 3,526,364. With three classes ours has three tokens plus SAM's no-mask embedding
# (the only part of the prompt encoder that acts without prompts) where v1 has four tokens.
V1_PARAMS = 3_526_364
HYPERNET_AND_TOKEN = 2 * (256 * 256 + 256) + (256 * 32 + 32) + 256  # per class: hypernetwork MLP + task token


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_parameter_counts_against_the_v1_code():
    one, three = HERSeg(out_channels=1), HERSeg(out_channels=3)
    assert n_params(one.encoder) == 957_648 and n_params(one.neck) == 615_424
    assert n_params(three) == V1_PARAMS - 6_220
    assert n_params(three) - n_params(one) == 2 * HYPERNET_AND_TOKEN
    assert 3.2e6 < n_params(one) < 3.3e6


@pytest.mark.parametrize("out_channels", [1, 3])
@pytest.mark.parametrize("size", [(64, 64), (128, 96)])
def test_output_shapes(out_channels, size):
    net = HERSeg(in_channels=1, out_channels=out_channels).eval()
    with torch.no_grad():
        out = net(torch.randn(2, 1, *size))
    assert out.shape == (2, out_channels, *size) and torch.isfinite(out).all()


def test_odd_sizes_are_padded_and_bad_arguments_are_refused():
    net = HERSeg(depths=(1, 1, 1), mbconv_depth=1).eval()
    x = torch.randn(1, 3, 70, 45)
    with torch.no_grad():  # zero-padded to 80x48 inside, cropped back
        torch.testing.assert_close(net(x), net(torch.nn.functional.pad(x, (0, 3, 0, 10)))[..., :70, :45])
    with pytest.raises(ValueError, match=r"expects \[B, 3, H, W\]"):
        net(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match="2-D network"):
        HERSeg(spatial_dims=3)
    with pytest.raises(ValueError, match="img_size"):
        HERSeg(img_size=1000)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    net = HERSeg(out_channels=2, drop_path_rate=0.1).train()
    for block in net.encoder.mbconvs:  # v1 starts the last BN's gamma at 0, which would zero its conv's gradient
        torch.nn.init.ones_(block.project[1].weight)
    net(torch.randn(2, 3, 64, 80)).square().mean().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name} got no gradient"


def _v1_rope(x, h, w):
    """v1's RoPE (``SAM/LGViT.py``): channel pairs as complex numbers times ``exp(i angle)``, the angles
    ``[row * theta, col * theta]`` with ``theta_j = 10000^(-j / k)``, ``k = C / 4``. ``x [B, h, w, C]``."""
    C = x.shape[-1]
    k = C // 4
    theta = 1 / (10000 ** (torch.arange(k) / k))
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    angles = torch.cat([rows[..., None] * theta, cols[..., None] * theta], dim=-1)
    rotation = torch.polar(torch.ones_like(angles), angles)
    return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2)) * rotation).flatten(-2)


def test_dla_matches_a_naive_implementation_through_the_quadratic_reference():
    torch.manual_seed(0)
    B, h, w, C, heads = 2, 5, 7, 32, 4
    dla = DualGatedLinearAttention(C, heads, attention_backend="torch")
    x = torch.randn(B, h * w, C)

    gate = F.silu(dla.gate(x))
    q, k = (F.elu(t) + 1 for t in dla.qk(x).chunk(2, -1))
    v = dla.v_up(F.silu(dla.v_down(x)))
    split = (B, h * w, heads, C // heads)
    q_rot, k_rot = (_v1_rope(t.view(B, h, w, C), h, w).reshape(split) for t in (q, k))
    attn = linear_attention_reference(q.view(split), k.view(split), v.view(split), q_rot, k_rot).reshape(B, h * w, C)
    lepe = dla.lepe(v.transpose(1, 2).reshape(B, C, h, w)).flatten(2).transpose(1, 2)
    expected = dla.proj((attn + lepe) * gate)

    torch.testing.assert_close(dla(x, (h, w)), expected, rtol=1e-5, atol=1e-5)


def test_rope_is_a_rotation_with_the_relative_position_property():
    C, h, w = 16, 6, 5
    rope = RoPE2d(C)
    x = torch.randn(3, h * w, C)
    torch.testing.assert_close(rope(x, (h, w)).norm(dim=-1), x.norm(dim=-1))
    # the same two vectors placed everywhere: <R_p a, R_p' b> depends only on p - p', per head
    a, b = torch.randn(C), torch.randn(C)
    ra, rb = (rope(t.expand(1, h * w, C), (h, w))[0].view(h, w, 4, 4) for t in (a, b))
    dots = torch.einsum("ijhd,klhd->hijkl", ra, rb)  # [heads, h, w, h, w]
    torch.testing.assert_close(dots[:, 0, 0, 2, 3], dots[:, 3, 1, 5, 4])  # offset (+2, +3)
    torch.testing.assert_close(dots[:, 1, 4, 0, 2], dots[:, 5, 2, 4, 0])  # offset (-1, -2)
    assert not torch.allclose(dots[:, 0, 0, 2, 3], dots[:, 0, 0, 3, 2])


def test_output_gate_closes_the_attention_and_the_normaliser_ignores_rotation():
    torch.manual_seed(0)
    dla = DualGatedLinearAttention(16, 2, attention_backend="torch")
    x = torch.randn(1, 12, 16)
    with torch.no_grad():
        dla.gate.weight.zero_()
        dla.gate.bias.fill_(-1e4)  # SiLU(-1e4) = 0: nothing passes gate 2
        torch.testing.assert_close(dla(x, (3, 4)), dla.proj.bias.expand(1, 12, 16))
    # z uses the unrotated features: rotating only q~, k~ changes the output, not the normaliser's value
    q, k, v = (torch.rand(1, 12, 2, 8) + 0.1 for _ in range(3))
    out_rot = linear_attention_reference(q, k, v, -q, k)  # q~ = R(pi) q
    torch.testing.assert_close(out_rot, -linear_attention_reference(q, k, v))


def test_meta_pooling_is_the_identity_on_a_constant_map_and_mixes_neighbours():
    pool = MetaPooling((5, 9, 13))
    const = torch.full((1, 2, 7, 9), 3.0)
    torch.testing.assert_close(pool(const), const)  # AvgPool(x) - x vanishes (count_include_pad=False)
    spike = torch.zeros(1, 1, 9, 9)
    spike[..., 4, 4] = 1.0
    out = pool(spike)
    # padding is not counted: the 13x13 window at the centre of a 9x9 map averages 81 pixels
    torch.testing.assert_close(out[0, 0, 4, 4], torch.tensor(1 + (1 / 25 - 1) + 2 * (1 / 81 - 1)))
    torch.testing.assert_close(out[0, 0, 0, 0], torch.tensor(1 / 25 + 1 / 49))  # 9x9 and 13x13 windows reach it


def test_registry_entry_and_flops_anchor():
    entry = visionattn.get_entry("herseg")
    assert entry.task == "segmentation" and entry.timm_name is None
    assert entry.default_input_size == (3, 1024, 1024)
    net = visionattn.create_model("herseg", out_channels=4, img_size=128)
    assert isinstance(net, HERSeg) and net.img_size == (128, 128)
    with pytest.raises(ValueError, match="herseg has no pretrained weights to download"):
        visionattn.create_model("herseg", pretrained=True)
    # FLOPs grow with the token count; at 1024 the model measures 8.21 GMACs (v1 code: 8.23, paper: 9.39 G)
    gmacs_256 = visionattn.registry.count_flops(net.eval(), (3, 256, 256)) / 2e9
    assert gmacs_256 == pytest.approx(8.2063616 / 16, rel=0.02)


def test_monai_sliding_window_and_dice_ce_loss():
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    net = HERSeg(out_channels=3)
    with torch.no_grad():
        out = sliding_window_inference(torch.randn(1, 3, 96, 80), roi_size=(64, 64), sw_batch_size=2,
                                       predictor=net.eval())
    assert out.shape == (1, 3, 96, 80)
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(net.train()(torch.randn(2, 3, 64, 64)),
                                                      torch.randint(0, 3, (2, 1, 64, 64)))
    loss.backward()
    assert torch.isfinite(loss) and net.decoder.hypernets[2][0].weight.grad is not None


def test_memory_benchmark_at_a_small_size():
    from visionattn.tasks.bench_herseg import bench_herseg_memory, format_table

    rows = bench_herseg_memory(size=64, batch=1, threads=1)
    assert [(r["attention"], r["size"]) for r in rows] == [("torch", 64), ("reference", 64)]
    assert all(r["peak_tensors_mib"] > 0 and r["peak_rss_mib"] > 0 for r in rows)
    table = format_table(rows)
    assert "chunked linear" in table and "quadratic reference" in table and "1x64x64" in table
