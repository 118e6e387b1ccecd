"""AGUNet / DAUNet / DAGUNet in 2-D and 3-D: sizes, the concatenating attention gate, deep supervision,
odd sizes, the neighborhood-attention bottleneck, and use inside MONAI (losses, sliding windows, real MRI)."""
import pytest
import torch
import torch.nn.functional as F

import visionattn
from visionattn.decoders import AttentionGate, AttentionUNet
from visionattn.decoders.agunet import PositionAttention

SMALL = dict(filters=(8, 16, 32, 32))


@pytest.mark.parametrize("name,expected", [("agunet_3d", 18.7e6), ("daunet_3d", 25.8e6), ("dagunet_3d", 31.0e6)])
def test_sizes_match_the_reference_estimates(name, expected):
    n = sum(p.numel() for p in visionattn.create_model(name).parameters())
    assert abs(n - expected) / expected < 0.01, n


def test_attention_gate_concatenates_its_projections():
    torch.manual_seed(0)
    gate = AttentionGate(2, 6, 6, 3).eval()
    g, x = torch.randn(2, 6, 5, 5), torch.randn(2, 6, 5, 5)
    g1, x1 = gate.w_g(g), gate.w_x(x)
    psi = gate.psi(F.relu(torch.cat([g1, x1], 1)))
    assert psi.shape == (2, 1, 5, 5)
    torch.testing.assert_close(gate(g, x), x * psi)
    assert gate.psi[0].in_channels == 6  # concatenated (2 x 3), not summed


@pytest.mark.parametrize("variant", ["agunet", "daunet", "dagunet"])
@pytest.mark.parametrize("dims,size", [(2, (37, 50)), (3, (20, 27, 18))])
def test_shapes_deep_supervision_and_gradients(variant, dims, size):
    torch.manual_seed(0)
    net = AttentionUNet(spatial_dims=dims, in_channels=2, out_channels=3, variant=variant, deep_supervision=True,
                        **SMALL).train()
    x = torch.randn(2, 2, *size)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 3
    for k, o in enumerate(outs):  # finest first, halving each time
        assert o.shape == (2, 3, *[-(-s // 2 ** k) for s in size]), (k, o.shape)
    sum(o.square().mean() for o in outs).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
    with torch.no_grad():
        assert net.eval()(x).shape == (2, 3, *size)


def test_neighborhood_bottleneck_equals_global_when_it_covers_the_map():
    torch.manual_seed(0)
    glob = PositionAttention(3, 16, "global")
    local = PositionAttention(3, 16, "neighborhood", kernel_size=9)
    local.load_state_dict(glob.state_dict())
    with torch.no_grad():
        glob.gamma.fill_(0.7)
        local.gamma.fill_(0.7)
    x = torch.randn(2, 16, 4, 5, 3)
    torch.testing.assert_close(local(x), glob(x), rtol=1e-5, atol=1e-5)
    big = visionattn.create_model("daunet_3d", bottleneck_attention="neighborhood", attention_kernel=3, **SMALL).eval()
    with torch.no_grad():
        assert big(torch.randn(1, 1, 48, 48, 48)).shape == (1, 2, 48, 48, 48)


def test_monai_deep_supervision_loss_and_bad_input():
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    net = visionattn.create_model("agunet_2d", out_channels=3, deep_supervision=True, **SMALL).train()
    outs = net(torch.randn(2, 1, 32, 40))
    assert isinstance(outs, list) and len(outs) == 3
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weight_mode="same")
    value = loss(outs, torch.randint(0, 3, (2, 1, 32, 40)).float())
    value.backward()
    assert torch.isfinite(value)
    with pytest.raises(ValueError, match=r"expects \[B, 1, X, X\]"):
        net(torch.randn(2, 3, 32, 40))
    with pytest.raises(ValueError, match="variant must be"):
        AttentionUNet(variant="unet")


def test_sliding_window_on_a_real_hippocampus_volume(shared_data):
    import nibabel as nib
    from monai.inferers import sliding_window_inference

    image = sorted((shared_data / "msd_hippocampus" / "imagesTr").glob("*.nii*"))[0]
    vol = torch.from_numpy(nib.load(str(image)).get_fdata().astype("float32"))[None, None]
    vol = (vol - vol.mean()) / (vol.std() + 1e-6)
    net = visionattn.create_model("agunet_3d", out_channels=3, **SMALL).eval()
    with torch.no_grad():
        out = sliding_window_inference(vol, roi_size=(32, 32, 32), sw_batch_size=2, predictor=net, overlap=0.25)
    assert out.shape == (1, 3, *vol.shape[2:]) and torch.isfinite(out).all()
