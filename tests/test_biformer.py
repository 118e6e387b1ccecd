"""BiFormer: sizes against the paper, the official checkpoint key layout, and the routed attention against
the official algorithm (ops/bra_legacy.py: gather every routed region's K/V at once), restated here."""
import pytest
import torch
import torch.nn.functional as F

import visionattn
from visionattn.backbones.biformer import AttentionLePE, BiLevelRoutingAttention


@pytest.mark.parametrize("name,params,keys", [
    ("biformer_tiny", 13.14e6, 264), ("biformer_small", 25.54e6, 518), ("biformer_base", 56.80e6, 518),
    ("biformer_stl", 28.4e6, None),
])
def test_sizes_match_the_paper(name, params, keys):
    m = visionattn.create_model(name)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n - params) / params < 0.005, n
    if keys:
        assert len(m.state_dict()) == keys  # the official checkpoints' key counts


def test_state_dict_uses_the_official_names():
    sd = visionattn.create_model("biformer_tiny").state_dict()
    C = [64, 128, 256, 512]
    assert sd["downsample_layers.0.0.weight"].shape == (32, 3, 3, 3)
    assert sd["downsample_layers.0.4.running_var"].shape == (64,)
    assert sd["downsample_layers.3.0.weight"].shape == (512, 256, 3, 3)
    for i in range(3):
        assert sd[f"stages.{i}.0.attn.qkv.qkv.weight"].shape == (3 * C[i], C[i])
        assert sd[f"stages.{i}.0.attn.qkv.qkv.bias"].shape == (3 * C[i],)
        assert sd[f"stages.{i}.0.attn.wo.weight"].shape == (C[i], C[i])
        assert sd[f"stages.{i}.0.attn.lepe.weight"].shape == (C[i], 1, 5, 5)
        assert sd[f"stages.{i}.0.pos_embed.weight"].shape == (C[i], 1, 3, 3)
        assert sd[f"stages.{i}.0.mlp.0.weight"].shape == (3 * C[i], C[i])
        assert sd[f"stages.{i}.0.mlp.3.weight"].shape == (C[i], 3 * C[i])
    assert sd["stages.3.0.attn.qkv.weight"].shape == (1536, 512) and "stages.3.0.attn.qkv.bias" not in sd
    assert sd["stages.3.0.attn.proj.weight"].shape == (512, 512)
    assert sd["norm.running_mean"].shape == (512,) and sd["head.weight"].shape == (1000, 512)


def test_official_checkpoint_wrapper_loads(tmp_path):
    src = visionattn.create_model("biformer_tiny").eval()
    path = tmp_path / "biformer_tiny_official.pth"
    torch.save({"model": src.state_dict(), "epoch": 299}, path)  # the layout of the released files
    for m in (visionattn.create_model("biformer_tiny", checkpoint_path=str(path)),
              visionattn.create_model("biformer_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))):
        x = torch.randn(1, 3, 224, 224)
        with torch.no_grad():
            torch.testing.assert_close(m.eval()(x), src(x), rtol=0, atol=0)


def official_bra(attn: BiLevelRoutingAttention, x: torch.Tensor) -> torch.Tensor:
    """The official legacy algorithm, step by step (gather of all routed K/V, per-head softmax)."""
    N, H_in, W_in, C = x.shape
    S = attn.n_win
    x = F.pad(x, (0, 0, 0, (S - W_in % S) % S, 0, (S - H_in % S) % S))
    _, H, W, _ = x.shape
    h, w = H // S, W // S
    x = x.reshape(N, S, h, S, w, C).permute(0, 1, 3, 2, 4, 5).reshape(N, S * S, h, w, C)  # n (j i) h w c
    qkv = attn.qkv.qkv(x)
    q, kv = qkv[..., :C], qkv[..., C:]
    q_pix = q.reshape(N, S * S, h * w, C)
    kv_pix = kv.reshape(N, S * S, h * w, 2 * C)
    q_win, k_win = q.mean([2, 3]), kv[..., :C].mean([2, 3])
    v_map = kv[..., C:].reshape(N, S, S, h, w, C).permute(0, 5, 1, 3, 2, 4).reshape(N, C, H, W)
    lepe = attn.lepe(v_map).permute(0, 2, 3, 1)
    logits = (q_win.detach() * attn.scale) @ k_win.detach().transpose(-2, -1)
    r_idx = torch.topk(logits, k=attn.topk, dim=-1).indices  # (n, p2, topk)
    sel = torch.gather(kv_pix.view(N, 1, S * S, h * w, 2 * C).expand(-1, S * S, -1, -1, -1), dim=2,
                       index=r_idx.view(N, S * S, attn.topk, 1, 1).expand(-1, -1, -1, h * w, 2 * C))
    m = attn.num_heads
    k_sel = sel[..., :C].reshape(N * S * S, attn.topk * h * w, m, C // m).permute(0, 2, 3, 1)
    v_sel = sel[..., C:].reshape(N * S * S, attn.topk * h * w, m, C // m).permute(0, 2, 1, 3)
    q_h = q_pix.reshape(N * S * S, h * w, m, C // m).permute(0, 2, 1, 3)
    out = torch.softmax((q_h * attn.scale) @ k_sel, dim=-1) @ v_sel  # (n p2) m w2 c
    out = out.reshape(N, S, S, m, h, w, C // m).permute(0, 1, 4, 2, 5, 3, 6).reshape(N, H, W, C)
    out = attn.wo(out + lepe)
    return out[:, :H_in, :W_in]


@pytest.mark.parametrize("dim,heads,topk,size,kv_chunk", [
    (64, 2, 1, (56, 56), 4), (128, 4, 4, (28, 28), 4), (256, 8, 16, (14, 14), 4),
    (256, 8, 16, (14, 14), 3), (64, 2, 4, (23, 30), 2), (64, 2, 4, (23, 30), 0),
])
def test_routed_attention_matches_official_algorithm(dim, heads, topk, size, kv_chunk):
    torch.manual_seed(0)
    attn = BiLevelRoutingAttention(dim, heads, n_win=7, topk=topk, kv_chunk=kv_chunk)
    with torch.no_grad():
        attn.lepe.weight.normal_(0, 0.1)
    x = torch.randn(2, *size, dim)
    torch.testing.assert_close(attn(x), official_bra(attn, x), rtol=1e-5, atol=1e-5)
    # gradients in float64, where both orders of summation agree to rounding
    attn.double()
    x = x.double().requires_grad_()
    ours, ref = attn(x), official_bra(attn, x)
    g_ours = torch.autograd.grad(ours.square().sum(), [x, attn.qkv.qkv.weight, attn.lepe.weight])
    g_ref = torch.autograd.grad(ref.square().sum(), [x, attn.qkv.qkv.weight, attn.lepe.weight])
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


def test_stage4_attention_quirks():
    torch.manual_seed(0)
    attn = AttentionLePE(512)  # 8 heads regardless of width, no qkv bias, LePE on the input
    assert attn.num_heads == 8 and attn.qkv.bias is None
    x = torch.randn(1, 7, 7, 512)
    q, k, v = attn.qkv(x).reshape(1, 49, 3, 8, 64).permute(2, 0, 3, 1, 4)
    out = (torch.softmax(q @ k.transpose(-1, -2) / 8.0, -1) @ v).transpose(1, 2).reshape(1, 7, 7, 512)
    ref = attn.proj(out + attn.lepe(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
    torch.testing.assert_close(attn(x), ref, rtol=1e-5, atol=1e-5)


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="multiples of head_dim"):
        visionattn.create_model("biformer_tiny", embed_dims=(60, 128, 256, 512))
    with pytest.raises(ValueError, match="topk"):
        visionattn.create_model("biformer_tiny", topks=(50, 4, 16, -2))
    with pytest.raises(ValueError, match="at least 32x32"):
        visionattn.create_model("biformer_tiny")(torch.randn(1, 3, 16, 16))
    attn = BiLevelRoutingAttention(64, 2, 7, 1, auto_pad=False)
    with pytest.raises(ValueError, match="multiples of n_win"):
        attn(torch.randn(1, 15, 14, 64))


def test_chunked_routing_holds_less_for_backward_than_the_full_gather():
    from visionattn.tasks.bench import PeakTensorMemory

    torch.manual_seed(0)
    x = torch.randn(2, 14, 14, 128, requires_grad=True)
    peaks, outs = {}, {}
    for chunk in (4, 0):
        attn = BiLevelRoutingAttention(128, 4, 7, 16, kv_chunk=chunk)
        torch.manual_seed(1)
        attn.apply(lambda m: m.reset_parameters() if hasattr(m, "reset_parameters") else None)
        with PeakTensorMemory() as mem:
            y = attn(x)
            saved = mem.live
            y.sum().backward()
        peaks[chunk], outs[chunk] = (saved, mem.peak), y.detach()
    torch.testing.assert_close(outs[4], outs[0], rtol=1e-5, atol=1e-5)
    assert peaks[4][0] < 0.6 * peaks[0][0]  # tensors kept for backward
    assert peaks[4][1] < 0.6 * peaks[0][1]  # peak over forward and backward
