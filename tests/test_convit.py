"""ConViT against timm's implementation (same key layout as the official checkpoints) and its own
definitions (relative offsets, local init, positional-attention cache)."""
import pytest
import timm
import torch

import visionattn
from visionattn.backbones.convit import GatedPositionalSelfAttention, relative_offsets


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    theirs = timm.create_model("convit_tiny")
    ours = visionattn.create_model("convit_tiny")
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def test_state_dict_layout_is_timms(pair):
    ours, theirs = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert len(ours.state_dict()) == 180


def test_logits_match_timm_in_eval(pair):
    ours, theirs = pair
    ours.eval(), theirs.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = theirs(x)
        out = ours(x)  # first call fills the positional cache
        out_cached = ours(x)
    assert (out - ref).abs().max().item() <= 1e-5
    assert (out_cached - ref).abs().max().item() <= 1e-5


def test_gradients_match_timm_in_training(pair):
    ours, theirs = pair
    ours.train(), theirs.train()
    x = torch.randn(2, 3, 224, 224)
    ours.zero_grad(), theirs.zero_grad()
    ours(x).square().mean().backward()
    theirs(x).square().mean().backward()
    g_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, g_theirs[name].grad, rtol=1e-4, atol=1e-6, msg=name)
    ours.eval(), theirs.eval()


def test_cache_follows_parameter_updates(pair):
    ours, theirs = pair
    ours.eval(), theirs.eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        ours(x)  # cache filled
        for m in (ours, theirs):  # an in-place update, as an optimizer step does
            m.blocks[0].attn.gating_param.add_(-3.0)
            m.blocks[3].attn.pos_proj.weight.mul_(0.5)
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
        new = {k: v * 1.01 if "pos_proj" in k else v for k, v in theirs.state_dict().items()}
        theirs.load_state_dict(new)
        ours.load_state_dict(new)
        assert (ours(x) - theirs(x)).abs().max().item() <= 1e-5
        assert (ours.double()(x.double()) - theirs.double()(x.double())).abs().max().item() <= 1e-9
    ours.float(), theirs.float()


def test_relative_offsets_definition():
    r = relative_offsets((14, 14))
    assert r.shape == (196, 196, 3)
    assert r[0, 1].tolist() == [1, 0, 1] and r[0, 14].tolist() == [0, 1, 1]
    assert r[15, 0].tolist() == [-1, -1, 2]
    # rectangular grids: token n sits at (n // cols, n % cols)
    r = relative_offsets((2, 3))
    assert r[0, 5].tolist() == [2, 1, 5]


def test_local_init_matches_paper():
    a = GatedPositionalSelfAttention(192, num_heads=4)
    a.local_init()
    assert a.pos_proj.weight.tolist() == [[-1, -1, -1], [-1, 1, -1], [1, -1, -1], [1, 1, -1]]
    assert torch.equal(a.v.weight, torch.eye(192))
    b = GatedPositionalSelfAttention(432, num_heads=9, locality_strength=2.0)
    b.local_init()
    assert b.pos_proj.weight[4].tolist() == [0, 0, -2]  # centre head: a peak on the query itself
    assert b.pos_proj.weight[0].tolist() == [-4, -4, -2]


def test_attention_dropout_path_equals_fused_path_without_dropout():
    torch.manual_seed(1)
    a = GatedPositionalSelfAttention(64, num_heads=4, attn_drop=0.5)
    a.grid_size = (4, 4)
    a.local_init()
    with torch.no_grad():
        a.gating_param.uniform_(-2, 2)
    x = torch.randn(3, 16, 64)
    a.train()
    torch.manual_seed(2)
    explicit_dropped = a(x)  # explicit path with dropout
    a.attn_drop.p = 0.0
    fused = a(x)
    # explicit formula, written out here independently
    B, N, C = x.shape
    q, k = a.qk(x).reshape(B, N, 2, 4, 16).permute(2, 0, 3, 1, 4)
    v = a.v(x).reshape(B, N, 4, 16).transpose(1, 2)
    pos = torch.softmax(a.pos_proj(relative_offsets((4, 4))).permute(2, 0, 1), -1)
    g = torch.sigmoid(a.gating_param).view(1, -1, 1, 1)
    attn = (1 - g) * torch.softmax(q @ k.transpose(-1, -2) * 16 ** -0.5, -1) + g * pos
    ref = a.proj((attn @ v).transpose(1, 2).reshape(B, N, C))
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(explicit_dropped, ref)
