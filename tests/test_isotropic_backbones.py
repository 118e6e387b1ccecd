"""NiNformer and Activator: sizes of the released configurations (counted by running the official code,
shared/reference/backbones.md 5-6) and the architectural quirks the official code has."""
import pytest
import torch

import visionattn


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,num_classes,expected", [
    ("ninformer_cifar", 10, 2.65e6), ("ninformer_cifar", 100, 2.68e6),
    ("activator_cifar", 10, 2.651e6), ("activator_cifar", 100, 2.674e6),
    ("activator_glu_cifar", 10, 1.599e6), ("activator_glu_cifar", 100, 1.622e6),
])
def test_released_configurations_match_published_sizes(name, num_classes, expected):
    n = n_params(visionattn.create_model(name, num_classes=num_classes))
    assert abs(n - expected) / expected < 0.01, n


def test_exact_counts_from_the_block_structure():
    # patch conv 3*16*256+256; per block: LN 512, MGU proj 65,792, token MLP 64->512->64 66,112, two LNs
    # 1,024, channel MLP 262,912, FFN 262,912; head 256*10+10
    block = 512 + 65_792 + 66_112 + 1_024 + 262_912 + 262_912
    assert n_params(visionattn.create_model("ninformer_cifar")) == 12_544 + 4 * block + 2_570
    gu = 2 * (256 * 512 + 512) + 1_024 + (512 * 256 + 256)
    assert n_params(visionattn.create_model("activator_glu_cifar")) == 12_544 + 4 * (512 + gu) + 2_570


@pytest.mark.parametrize("name", ["ninformer_cifar", "activator_cifar"])
def test_one_layernorm_serves_both_prenorm_positions(name):
    model = visionattn.create_model(name)
    block = model.blocks[0]
    norms = [m for n, m in block.named_children() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 1  # a single module, applied before both sub-layers
    calls = []
    norms[0].register_forward_hook(lambda *a: calls.append(1))
    block(torch.randn(1, 64, 256))
    assert len(calls) == 2


def test_no_position_embedding_or_class_token():
    for name in ("ninformer_cifar", "activator_cifar"):
        keys = visionattn.create_model(name).state_dict().keys()
        assert not any("pos" in k or "cls" in k for k in keys)


def _shuffle_patches(x, perm, p=4):
    B, C, H, W = x.shape
    tiles = x.reshape(B, C, H // p, p, W // p, p).permute(0, 2, 4, 1, 3, 5).reshape(B, -1, C, p, p)
    tiles = tiles[:, perm]
    return tiles.reshape(B, H // p, W // p, C, p, p).permute(0, 3, 1, 4, 2, 5).reshape(B, C, H, W)


def test_activator_processes_each_patch_on_its_own():
    """Everything after the patch embedding is per token, so shuffling patches leaves the logits unchanged
    (the official code's behaviour); NiNformer's token-mixing MLP does see the order."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    perm = torch.randperm(64)
    xs = _shuffle_patches(x, perm)
    act = visionattn.create_model("activator_cifar").eval()
    nin = visionattn.create_model("ninformer_cifar").eval()
    with torch.no_grad():
        torch.testing.assert_close(act(xs), act(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(nin(xs), nin(x), atol=1e-3)


def test_activator_gating_unit_formula():
    from visionattn.backbones.activator import ActivatorGatingUnit

    torch.manual_seed(0)
    gu = ActivatorGatingUnit(8, 16)
    x = torch.randn(3, 8)
    ln = torch.nn.functional.layer_norm
    u = ln(torch.nn.functional.gelu(x @ gu.fc_gate.weight.T + gu.fc_gate.bias), (16,), gu.norm.weight, gu.norm.bias)
    v = ln(x @ gu.fc_value.weight.T + gu.fc_value.bias, (16,), gu.norm.weight, gu.norm.bias)
    torch.testing.assert_close(gu(x), (u * v) @ gu.fc_out.weight.T + gu.fc_out.bias)


def test_mixer_gating_unit_formula():
    from visionattn.backbones.ninformer import MixerGatingUnit

    torch.manual_seed(0)
    mgu = MixerGatingUnit(8, 5, 16, dropout=0.0)
    t = torch.randn(2, 5, 8)
    tok = mgu.token_mix(mgu.token_norm(t).transpose(1, 2)).transpose(1, 2)
    gate = t + tok
    gate = gate + mgu.channel_mix(mgu.channel_norm(gate))
    torch.testing.assert_close(mgu(t), mgu.proj(t) * gate)


def test_bad_configuration_is_reported():
    with pytest.raises(ValueError, match="divisible by patch_size"):
        visionattn.create_model("ninformer_cifar", img_size=30)
    with pytest.raises(ValueError, match="act must be one of"):
        visionattn.create_model("activator_cifar", act="tanh")
    with pytest.raises(ValueError, match="built for 32x32 inputs"):
        visionattn.create_model("activator_cifar")(torch.randn(1, 3, 64, 64))


@pytest.mark.parametrize("name,params_m", [("ninformer_s16_224", 38.09), ("ninformer_b16_224", 136.33), ("activator_s16_224", 36.18)])
def test_larger_variants_have_their_documented_sizes(name, params_m):
    n = n_params(visionattn.create_model(name))
    assert abs(n / 1e6 - params_m) < 0.01  # the README's model table prints the count (tests/test_readme_tables.py)
