"""timm's model contract (timm tests/test_models.py, see shared/reference/ecosystem.md 1.7), run over every
registered 2-D classifier through timm's own create_model, on small inputs."""
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

import visionattn

CLASSIFIERS = [n for n in visionattn.list_models(task="classification") if visionattn.get_entry(n).timm_name]
SIZE = 64  # small inputs keep the suite fast; every family accepts img_size
SMALL = dict(img_size=SIZE)
# one cheap model per family: the first one each family module registers. Every model of every family goes
# through timm's own tests/test_models.py (.ci/timm-tests, tests/test_timm_suite.py); these are our own
# contracts beside it (meta builds, device/dtype, features, pretrained files), once per family.
SMALLEST = list({visionattn.get_entry(n).fn.__module__: n
                  for n in reversed(visionattn.registry._REGISTRY) if n in CLASSIFIERS}.values())


def _create(name, **kwargs):
    return timm.create_model(visionattn.get_entry(name).timm_name, **dict(SMALL, **kwargs))


def _x(batch=2, chans=3):
    return torch.randn(batch, chans, SIZE, SIZE)


@pytest.mark.parametrize("name", SMALLEST)
def test_forward_and_grad_checkpointing(name):
    model = _create(name).eval()
    x = _x(1)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (1, model.num_classes) and not torch.isnan(out).any()
        model.set_grad_checkpointing(True)
        assert torch.allclose(out, model(x), rtol=1e-4, atol=1e-5)
    # checkpointing is active when gradients are: same output, same gradients
    model.set_grad_checkpointing(False)
    a = model(x)
    model.set_grad_checkpointing(True)
    b = model(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", SMALLEST)
def test_backward_reaches_every_parameter(name):
    model = _create(name, num_classes=42, drop_path_rate=0.1).train()
    out = model(_x(2))
    assert out.shape == (2, 42)
    out.mean().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert not torch.isnan(p.grad).any(), pname
    assert sum(p.grad.numel() for p in model.parameters()) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", SMALLEST)
def test_in_chans_num_classes_global_pool(name):
    model = _create(name, in_chans=1, num_classes=7).eval()
    with torch.no_grad():
        assert model(_x(2, 1)).shape == (2, 7)
    for pool in [p for p in type(model).GLOBAL_POOLS if p]:
        m = _create(name, num_classes=5, global_pool=pool).eval()
        with torch.no_grad():
            assert m(_x(1)).shape == (1, 5)
    with pytest.raises(ValueError, match="global_pool"):
        _create(name, global_pool="max")


@pytest.mark.parametrize("name", SMALLEST)
def test_features_head_and_classifier_reset(name):
    model = _create(name).eval()
    cfg = model.pretrained_cfg
    assert model.num_features > 0 and model.head_hidden_size > 0 and model.num_classes == cfg["num_classes"]
    assert len(cfg["input_size"]) == 3
    sd = model.state_dict()
    assert cfg["classifier"] + ".weight" in sd and cfg["first_conv"] + ".weight" in sd
    assert model.get_classifier() is model.head
    x = _x(2)
    with torch.no_grad():
        feats = model.forward_features(x)
        channel_dim = -1 if feats.ndim == 3 else 1  # token models are NLC, hierarchical ones NCHW
        assert feats.shape[channel_dim] == model.num_features
        pre = model.forward_head(feats, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        model.reset_classifier(0)
        assert model.num_classes == 0
        out = model(x)
        assert out.shape == pre.shape and torch.allclose(out, pre)
        model.reset_classifier(0, "")
        unpooled = model(x)
        if feats.ndim == 3:
            assert unpooled.shape == feats.shape
        else:  # NCHW: the head may project channels (RMT's head) but must keep the map
            assert unpooled.ndim == 4 and unpooled.shape[2:] == feats.shape[2:]
        model.reset_classifier(11, "avg")
        assert model(x).shape == (2, 11)
    enc = _create(name, num_classes=0).eval()
    with torch.no_grad():
        assert enc(x).shape == (2, enc.head_hidden_size)


@pytest.mark.parametrize("name", SMALLEST)
def test_features_only_and_intermediates(name, tmp_path):
    model = _create(name).eval()
    x = _x(2)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        assert len(inter) == len(model.feature_info) >= 3
        for t, info in zip(inter, model.feature_info):
            assert t.shape == (2, info["num_chs"], SIZE // info["reduction"], SIZE // info["reduction"])
        model.set_grad_checkpointing(True)
        final2, _ = model.forward_intermediates(x)
        torch.testing.assert_close(final, final2)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        torch.testing.assert_close(last2[-1], inter[-1])

    n = len(model.feature_info)
    out_indices = (1, n // 2, n - 1)
    weights = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(weights))
    feat = _create(
        name, features_only=True, out_indices=out_indices, pretrained=True,
        pretrained_cfg_overlay=dict(file=str(weights)),
    ).eval()
    assert feat.feature_info.out_indices == out_indices
    with torch.no_grad():
        outs = feat(x)
    assert len(outs) == len(out_indices) == len(feat.feature_info.channels())
    for o, ch, red, idx in zip(outs, feat.feature_info.channels(), feat.feature_info.reduction(), out_indices):
        assert o.shape == (2, ch, SIZE // red, SIZE // red)
        torch.testing.assert_close(o, inter[idx])


# shallower builds for the compile test: dynamo traces every block of an unrolled stack, so its time grows
# with depth, while a graph break would sit in a block's code, which these keep at least once of every kind
# (ConViT: a GPSA block and a self-attention block; Gated-SwinRMT: a plain and a shifted block in stage 1,
# the only stage whose map (16x16 at this input) is larger than the window, one whole-map block after it;
# BiFormer: one routed block per stage, the last stage's full attention included)
COMPILE_DEPTH = {"convit_tiny": dict(depth=2, local_up_to_layer=1), "biformer_tiny": dict(depths=(1, 1, 1, 1)),
                 "gated_swinrmt_swat_cifar": dict(depths=(2, 1, 1, 1))}


@pytest.mark.parametrize("name", SMALLEST)
def test_torch_compile_fullgraph(name):
    """torch.compile is the graph-capture path we support: TorchScript is in maintenance mode in PyTorch,
    and torch.fx symbolic tracing cannot follow the input-shape checks. fullgraph=True proves the model
    compiles without graph breaks; aot_eager keeps the test fast while still tracing forward and backward."""
    # no dropout: outputs must be comparable
    model = _create(name, num_classes=4, drop_rate=0.0, **COMPILE_DEPTH.get(name, {})).train()
    x = _x(2)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    compiled(x).sum().backward()
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", SMALLEST)
def test_pretrained_from_local_file(name, tmp_path):
    src = _create(name).eval()
    sd = {k: v.contiguous() for k, v in src.state_dict().items()}
    st_path, pt_path = tmp_path / "w.safetensors", tmp_path / "w.pth"
    save_file(sd, str(st_path))
    torch.save(sd, pt_path)
    x = _x(1)
    with torch.no_grad():
        ref = src(x)
        for path in (st_path, pt_path):
            m = _create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
            m = visionattn.create_model(name, checkpoint_path=str(path), **SMALL).eval()
            torch.testing.assert_close(m(x), ref, rtol=0, atol=0)
        # another head size: the classifier is dropped, the rest loads
        m = _create(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(st_path)), num_classes=5)
        for k, v in m.state_dict().items():
            if not k.startswith(m.pretrained_cfg["classifier"]):
                torch.testing.assert_close(v, sd[k])


class _Payload:
    """Stands in for code hidden in a pickled checkpoint."""

    def __reduce__(self):
        return (print, ("this must never run",))


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"model": _Payload()}, f)
    with pytest.raises(ValueError, match="weights_only=True"):
        visionattn.create_model("convit_tiny", checkpoint_path=str(path), **SMALL)
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        visionattn.create_model("convit_tiny", checkpoint_path=str(tmp_path / "missing.pth"), **SMALL)


def test_mismatched_checkpoint_names_keys(tmp_path):
    path = tmp_path / "w.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="missing keys"):
        visionattn.create_model("convit_tiny", checkpoint_path=str(path), **SMALL)


@pytest.mark.parametrize("name", SMALLEST)
def test_bad_input_is_explained(name):
    model = _create(name).eval()
    with pytest.raises(ValueError, match="in_chans=3, got 1 channels"):
        model(_x(1, 1))
    if model.pretrained_cfg.get("fixed_input_size"):
        with pytest.raises(ValueError, match=f"built for {SIZE}x{SIZE} inputs"):
            model(torch.randn(1, 3, SIZE + 16, SIZE))
    else:  # any size works; too small a one is explained
        with pytest.raises(ValueError, match="at least"):
            model(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        model(torch.randn(3, SIZE, SIZE))
