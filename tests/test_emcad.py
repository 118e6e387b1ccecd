"""EMCAD: decoder sizes against the paper's counts, the module rules of the official code, the network on
any 4-level encoder, MONAI use, and the MUTATION loss against MONAI's Dice and torch's cross-entropy."""
import itertools

import pytest
import torch

import visionattn
from visionattn.decoders import EMCADDecoder, EMCADNet, MutationLoss, mutation_loss
from visionattn.decoders.emcad import CAB, channel_shuffle


def n_params(m):
    return sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("channels,expected", [([256, 160, 64, 32], 506_507), ([512, 320, 128, 64], 1_913_515)])
def test_decoder_parameter_counts(channels, expected):
    assert n_params(EMCADDecoder(channels)) == expected


def test_one_spatial_attention_shared_by_all_stages():
    dec = EMCADDecoder([256, 160, 64, 32])
    assert all(m.sab is dec.sab for m in dec.mscams)
    assert n_params(dec.sab) == 98


def test_full_models_match_the_paper_sizes():
    # paper: 3.92M (B0) and 26.76M (B2) with a 9-class (Synapse) head
    for name, expected in (("emcad_pvt_v2_b0", 3.92e6), ("emcad_pvt_v2_b2", 26.76e6)):
        n = n_params(visionattn.create_model(name, out_channels=9))
        assert abs(n - expected) / expected < 0.01, (name, n)


def test_channel_shuffle_and_cab_ratio():
    x = torch.arange(8.0).view(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert CAB(8).fc1.out_channels == 1 and CAB(64).fc1.out_channels == 4


@pytest.mark.parametrize("size", [(64, 64), (70, 100)])
def test_outputs_deep_supervision_and_odd_sizes(size):
    torch.manual_seed(0)
    net = visionattn.create_model("emcad_pvt_v2_b0", in_channels=1, out_channels=3, deep_supervision=True)
    x = torch.randn(2, 1, *size)
    outs = net.train()(x)
    assert isinstance(outs, list) and len(outs) == 4 and all(o.shape == (2, 3, *size) for o in outs)
    for m in net.modules():  # training outputs with fixed BatchNorm statistics: the first is the eval output
        if isinstance(m, torch.nn.BatchNorm2d):
            m.eval()
    with torch.no_grad():
        torch.testing.assert_close(net(x)[0], net.eval()(x))
    net.train()
    sum(o.mean() for o in outs).backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)
    with torch.no_grad():
        out = net.eval()(x)
    assert out.shape == (2, 3, *size)
    with pytest.raises(ValueError, match=r"expects \[B, 1, H, W\]"):
        net(torch.randn(1, 3, 64, 64))


def test_works_on_a_visionattn_backbone_and_in_monai_sliding_windows():
    from monai.inferers import sliding_window_inference

    net = EMCADNet(in_channels=3, out_channels=2, encoder="va_biformer_tiny").eval()
    with torch.no_grad():
        out = sliding_window_inference(torch.randn(1, 3, 96, 80), roi_size=(64, 64), sw_batch_size=2, predictor=net)
    assert out.shape == (1, 2, 96, 80)
    assert visionattn.get_entry("emcad_pvt_v2_b2").task == "segmentation"
    with pytest.raises(ValueError, match="2-D network"):
        EMCADNet(spatial_dims=3)


def test_mutation_loss_against_monai_and_torch():
    from monai.losses import DiceLoss

    torch.manual_seed(0)
    outs = [torch.randn(2, 4, 8, 8, requires_grad=True) for _ in range(4)]
    target = torch.randint(0, 4, (2, 1, 8, 8))
    dice = DiceLoss(include_background=True, to_onehot_y=True, softmax=True, squared_pred=True, batch=True,
                    smooth_nr=1e-5, smooth_dr=1e-5)
    expected = 0
    n_terms = 0
    for r in range(1, 5):
        for subset in itertools.combinations(outs, r):
            logits = sum(subset)
            expected = expected + 0.3 * torch.nn.functional.cross_entropy(logits, target[:, 0]) + 0.7 * dice(logits, target)
            n_terms += 1
    assert n_terms == 15
    got = mutation_loss(outs, target)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(MutationLoss()(outs, target[:, 0]), expected)
    got.backward()
    assert all(o.grad is not None for o in outs)


def test_monai_bundle_example_builds_our_classes():
    from pathlib import Path

    from monai.bundle import ConfigParser

    path = Path(__file__).resolve().parents[1] / "configs" / "segmentation" / "emcad_monai_bundle.yaml"
    parser = ConfigParser()
    parser.read_config(str(path))
    net = parser.get_parsed_content("network_def")
    assert isinstance(net, EMCADNet) and net.out_channels == 3
    assert isinstance(parser.get_parsed_content("loss"), MutationLoss)
    from visionattn.tasks.config import read_yaml_file, validate

    validate(read_yaml_file(path), str(path))  # and visionattn's target rules accept every entry of it
