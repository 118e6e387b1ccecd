"""Both vocabularies everywhere (timm's ``in_chans``/``num_classes``, MONAI's ``in_channels``/``out_channels``),
fine-tuning from a checkpoint with another class count (the head is reset, as timm does; any other mismatch is
an error), and ``pretrained=True`` without the network failing at once instead of retrying for a minute."""
import logging
import socket

import pytest
import timm
import torch

import visionattn
from visionattn.errors import InvalidInputError, ModelArgumentError
from visionattn.registry import _accepted_arguments, get_entry

ALL = visionattn.list_models()


def _meta_shapes(name: str, **kwargs) -> dict[str, tuple]:
    with torch.device("meta"):
        model = visionattn.create_model(name, **kwargs)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ALL)
def test_both_vocabularies_build_the_same_model(name):
    """Built on the meta device (no memory): the other vocabulary's names give the model the model's own names
    give, and they do change it (2 input channels and 5 classes are nobody's default)."""
    accepted = _accepted_arguments(get_entry(name))
    own_in = "in_chans" if "in_chans" in accepted else "in_channels"
    own_out = "num_classes" if "num_classes" in accepted else "out_channels"
    other = {"in_chans": "in_channels", "in_channels": "in_chans", "num_classes": "out_channels",
             "out_channels": "num_classes"}
    assert own_in in accepted, f"{name} takes no input-channel argument"
    want = _meta_shapes(name, **{own_in: 2, own_out: 5})
    assert want != _meta_shapes(name), "the arguments changed nothing; the test could not fail"
    assert _meta_shapes(name, **{other[own_in]: 2, other[own_out]: 5}) == want


def test_both_names_with_different_values_is_an_error():
    with pytest.raises(ModelArgumentError, match="name the same argument"):
        visionattn.create_model("agunet_2d", num_classes=3, out_channels=4)
    visionattn.create_model("agunet_2d", num_classes=3, out_channels=3)  # the same value twice is fine
    with pytest.raises(ModelArgumentError, match="name the same argument"):
        timm.create_model("va_ninformer_cifar", in_chans=1, in_channels=3)


def test_detectors_take_grayscale_images():
    model = visionattn.create_model("dfir_detr", in_channels=1, num_classes=2, input_size=64, num_queries=8,
                                    num_denoising=0).eval()
    with torch.no_grad():
        out = model([torch.rand(1, 50, 70)])
    assert out[0]["boxes"].shape == (16, 4)
    with pytest.raises(ValueError, match=r"expected images of shape \[1, H, W\]"):
        model([torch.rand(3, 50, 70)])


@pytest.mark.parametrize("name,kwargs", [
    ("ninformer_cifar", {}),
    ("agunet_3d", {"deep_supervision": True}),
    ("emcad_pvt_v2_b0", {"deep_supervision": True}),
    ("rtdetr_r18", {"input_size": 64, "num_queries": 8}),
])
def test_fine_tuning_with_another_class_count_resets_only_the_head(name, kwargs, tmp_path, caplog):
    source = visionattn.create_model(name, num_classes=5, **kwargs)
    path = tmp_path / "source.pth"
    torch.save(source.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="visionattn"):
        tuned = visionattn.create_model(name, num_classes=3, checkpoint_path=str(path), **kwargs)
    assert "classifier head" in caplog.text
    src, dst = source.state_dict(), tuned.state_dict()
    reset = [k for k in dst if src[k].shape != dst[k].shape]
    assert reset, "no head differs; the test could not fail"
    for k in dst:
        if k not in reset:
            assert torch.equal(src[k], dst[k]), f"{k} was not loaded"
    # the same class count loads every tensor, head included, and says nothing
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="visionattn"):
        same = visionattn.create_model(name, num_classes=5, checkpoint_path=str(path), **kwargs)
    assert "classifier head" not in caplog.text
    assert all(torch.equal(v, same.state_dict()[k]) for k, v in src.items())


def test_a_mismatch_outside_the_head_is_an_error(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(visionattn.create_model("agunet_3d", filters=[16, 32, 64, 128]).state_dict(), path)
    with pytest.raises(InvalidInputError, match=r"shapes differ \(encoders"):
        visionattn.create_model("agunet_3d", filters=[8, 16, 32, 64], checkpoint_path=str(path))


@pytest.fixture
def offline(monkeypatch):
    """No network (connections fail as DNS does here), and any download attempt fails the test."""
    def refuse(*args, **kwargs):
        raise OSError("[Errno -2] Name or service not known")

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr("timm.models._hub.hf_hub_download", no_download)
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_hf", no_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def test_pretrained_without_network_fails_at_once(offline):
    for make in (lambda: visionattn.create_model("convit_tiny.fb_in1k", pretrained=True),
                 lambda: timm.create_model("va_convit_tiny", pretrained=True)):
        with pytest.raises(InvalidInputError, match=r"timm/convit_tiny.fb_in1k.*cannot be reached.*local file"):
            make()
    with pytest.raises(InvalidInputError, match="no pretrained weights to download"):
        visionattn.create_model("agunet_3d", pretrained=True)


def test_pretrained_from_a_local_file_needs_no_network(offline, tmp_path):
    source = visionattn.create_model("convit_tiny", img_size=32, num_classes=3)
    torch.save(source.state_dict(), tmp_path / "w.pth")
    model = timm.create_model("va_convit_tiny", pretrained=True, img_size=32, num_classes=3,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "w.pth")))
    # timm loads everything but the head, which it resets since the config's weights have 1000 classes
    assert torch.equal(model.patch_embed.proj.weight, source.patch_embed.proj.weight)
    assert torch.equal(model.blocks[0].attn.qk.weight, source.blocks[0].attn.qk.weight)
