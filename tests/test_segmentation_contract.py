"""The segmentation contract (issue 13): every registered segmentation model behaves like a MONAI network.

For each model of ``visionattn.list_models(task="segmentation")`` (small configurations where the defaults
are big), and for DAUNet's neighborhood-attention bottleneck:

- MONAI's argument order (``spatial_dims, in_channels, out_channels``) and a tensor out in training and
  in eval by default, so stock MONAI losses (``DiceCELoss``) take it;
- deep supervision only when asked, as a list finest first (its first entry is what eval returns), which
  ``DeepSupervisionLoss`` takes; weights saved with it load without it;
- any input size (padded inside to ``size_divisible`` and cropped back: the same logits as padding by
  hand), ``sliding_window_inference``, ``torch.autocast(cpu, bfloat16)``;
- ``torch.jit.script`` and ONNX with dynamic batch and sides, checked in onnxruntime at three sizes (two
  of them odd) against PyTorch.

And :class:`~visionattn.decoders.MutationLoss` on index and one-hot labels.
"""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F

import visionattn
from visionattn.decoders import MutationLoss

SMALL_UNET = dict(filters=(8, 16, 32, 32))
SMALL_HERSEG = dict(depths=(1, 1, 1), mbconv_depth=1, embed_dim=32, num_heads=(2, 2, 2), decoder_dim=64,
                    decoder_heads=4, decoder_mlp_dim=64)
# name -> constructor arguments beyond in/out channels; spatial sizes to run at (the first is the ONNX example)
CASES = {
    "agunet_2d": (SMALL_UNET, [(32, 48), (37, 50), (45, 29)]),
    "agunet_3d": (SMALL_UNET, [(16, 24, 16), (21, 13, 19), (17, 30, 9)]),
    "daunet_2d": (SMALL_UNET, [(32, 48), (37, 50), (45, 29)]),
    "daunet_3d": (SMALL_UNET, [(16, 24, 16), (21, 13, 19), (17, 30, 9)]),
    "dagunet_2d": (SMALL_UNET, [(32, 48), (37, 50), (45, 29)]),
    "dagunet_3d": (SMALL_UNET, [(16, 24, 16), (21, 13, 19), (17, 30, 9)]),
    "emcad_pvt_v2_b0": ({}, [(64, 64), (33, 45), (57, 39)]),
    "emcad_pvt_v2_b2": ({}, [(64, 64), (33, 45), (57, 39)]),
    "herseg": (SMALL_HERSEG, [(32, 48), (33, 45), (57, 39)]),
}
NEIGHBORHOOD = ("daunet_3d", dict(SMALL_UNET, bottleneck_attention="neighborhood", attention_kernel=3))
IN_CHANNELS, OUT_CHANNELS = 2, 3


def test_every_registered_segmentation_model_is_covered():
    assert sorted(CASES) == sorted(visionattn.list_models(task="segmentation"))


_BUILT: dict[str, torch.nn.Module] = {}


def build(name: str, kwargs: dict | None = None, **extra) -> torch.nn.Module:
    """A fresh copy of the model (built once per configuration: PVTv2-B2's 26M parameters take a while)."""
    kwargs = dict(CASES[name][0] if kwargs is None else kwargs, **extra)
    key = f"{name}{sorted(kwargs.items())}"
    if key not in _BUILT:
        torch.manual_seed(0)
        net = visionattn.create_model(name, in_channels=IN_CHANNELS, out_channels=OUT_CHANNELS, **kwargs)
        with torch.no_grad():  # the dual-attention residual scales start at 0: open them so the attention counts
            for pname, p in net.named_parameters():
                if pname.endswith("gamma"):
                    p.fill_(0.5)
        _BUILT[key] = net
    return copy.deepcopy(_BUILT[key]).train()


def dims_of(name: str) -> int:
    return len(CASES[name][1][0])


def inputs(name: str, size=None, batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, IN_CHANNELS, *(size or CASES[name][1][1]), generator=torch.Generator().manual_seed(1))


def labels(x: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, OUT_CHANNELS, (x.shape[0], 1, *x.shape[2:]), generator=torch.Generator().manual_seed(2))


def freeze_layers(net: torch.nn.Module) -> torch.nn.Module:
    """Training mode at the top (deep-supervision lists) with BatchNorm, dropout and drop-path in eval."""
    net.train()
    for m in net.modules():
        if m is not net:
            m.eval()
    return net


MODELS = sorted(CASES)
WITH_NEIGHBORHOOD = [pytest.param(n, None, id=n) for n in MODELS] + [
    pytest.param(NEIGHBORHOOD[0], NEIGHBORHOOD[1], id="daunet_3d-neighborhood")]


def test_monai_argument_order():
    classes = {visionattn.get_entry(name).model_cls: name for name in MODELS}
    assert len(classes) == 3  # AttentionUNet, EMCADNet, HERSeg
    for cls, name in classes.items():
        assert list(inspect.signature(cls.__init__).parameters)[1:4] == ["spatial_dims", "in_channels", "out_channels"]
        extra = {"encoder": "pvt_v2_b0"} if name.startswith("emcad") else {}
        net = cls(dims_of(name), IN_CHANNELS, OUT_CHANNELS, **CASES[name][0], **extra)
        assert (net.spatial_dims, net.in_channels, net.out_channels) == (dims_of(name), IN_CHANNELS, OUT_CHANNELS)
        with pytest.raises(ValueError, match="2-D network" if dims_of(name) == 2 else "spatial_dims must be 2 or 3"):
            cls(4, IN_CHANNELS, OUT_CHANNELS, **CASES[name][0], **extra)


@pytest.mark.parametrize("name", MODELS)
def test_a_tensor_in_training_and_eval_by_default(name):
    from monai.losses import DiceCELoss

    net = build(name)
    assert net.deep_supervision is False
    x = inputs(name)
    out = net.train()(x)
    assert isinstance(out, torch.Tensor) and out.shape == (2, OUT_CHANNELS, *x.shape[2:])
    loss = DiceCELoss(to_onehot_y=True, softmax=True)(out, labels(x))
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        assert net.eval()(x).shape == out.shape


@pytest.mark.parametrize("name", MODELS)
def test_deep_supervision_is_opt_in_finest_first_and_loads_without_it(name):
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    net = build(name, deep_supervision=True)
    x = inputs(name)
    outs = net.train()(x)
    assert isinstance(outs, list) and len(outs) >= 1
    assert outs[0].shape == (2, OUT_CHANNELS, *x.shape[2:])
    sides = [o.shape[2:].numel() for o in outs]
    assert sides == sorted(sides, reverse=True)  # finest first
    loss = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(outs, labels(x).float())
    loss.backward()
    assert torch.isfinite(loss)
    with torch.no_grad():
        want = net.eval()(x)
        assert isinstance(want, torch.Tensor)
        torch.testing.assert_close(freeze_layers(net)(x)[0], want)  # the first entry is the prediction
        plain = build(name)  # no deep supervision: the auxiliary heads' weights are dropped on loading
        plain.load_state_dict(net.state_dict())
        torch.testing.assert_close(plain.eval()(x), want)
    assert sum(p.numel() for p in plain.parameters()) <= sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_any_size_is_padded_inside_and_cropped_back(name):
    net = build(name).eval()
    d = net.size_divisible
    with torch.no_grad():
        for size in CASES[name][1][1:]:
            x = inputs(name, size, batch=1)
            out = net(x)
            assert out.shape == (1, OUT_CHANNELS, *size)
            pad = [p for s in reversed(size) for p in (0, (-s) % d)]
            by_hand = net(F.pad(x, pad))[(Ellipsis, *[slice(0, s) for s in size])]
            torch.testing.assert_close(out, by_hand)


@pytest.mark.parametrize("name", MODELS)
def test_sliding_window_inference(name):
    from monai.inferers import sliding_window_inference

    net = build(name).eval()
    example, odd = CASES[name][1][0], CASES[name][1][1]
    volume = inputs(name, [s + 7 for s in odd], batch=1)
    with torch.no_grad():
        out = sliding_window_inference(volume, example, 2, net, overlap=0.25)
    assert out.shape == (1, OUT_CHANNELS, *volume.shape[2:]) and torch.isfinite(out).all()


@pytest.mark.parametrize("name,kwargs", WITH_NEIGHBORHOOD)
def test_autocast_bfloat16_on_cpu(name, kwargs):
    from monai.losses import DiceCELoss

    net = build(name, kwargs)
    x = inputs(name)
    with torch.no_grad():
        want = net.eval()(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            got = net.eval()(x)
        out = net.train()(x)
        loss = DiceCELoss(to_onehot_y=True, softmax=True)(out.float(), labels(x))
    loss.backward()
    assert got.shape == want.shape and torch.isfinite(got).all() and torch.isfinite(loss)
    assert (got.float() - want).abs().mean() < 0.1 * want.abs().mean() + 0.05  # bfloat16 keeps ~3 digits


@pytest.mark.parametrize("name,kwargs", WITH_NEIGHBORHOOD)
def test_torchscript(name, kwargs):
    net = build(name, kwargs).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated upstream; MONAI's ckpt_export uses it
        scripted = torch.jit.script(net)
    # the profiling executor's first calls re-optimise the graph at every new size: slow and beside the point here
    with torch.no_grad(), torch.jit.optimized_execution(False):
        for size in CASES[name][1][1:]:
            x = inputs(name, size)
            torch.testing.assert_close(scripted(x), net(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["agunet_3d", "herseg"])
def test_torchscript_keeps_the_deep_supervision_list(name):
    net = freeze_layers(build(name, deep_supervision=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(net)
    x = inputs(name)
    with torch.no_grad(), torch.jit.optimized_execution(False):
        got, want = scripted(x), net(x)
        assert isinstance(got, list) and len(got) == len(want)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert isinstance(scripted.eval()(x), torch.Tensor)


@pytest.mark.parametrize("name,kwargs", WITH_NEIGHBORHOOD)
def test_onnx_with_dynamic_sizes_in_onnxruntime(name, kwargs, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from visionattn.tasks.export import OnnxNetwork, compare, export_onnx

    net = build(name, kwargs).eval()
    sizes = CASES[name][1]
    path = tmp_path / f"{name}.onnx"
    export_onnx(net, path, inputs(name, sizes[0], batch=1))
    rows = compare(OnnxNetwork(path, threads=2), net, sizes, IN_CHANNELS, atol=1e-4, rtol=1e-4, report=None)
    assert [r["size"] for r in rows] == [list(s) for s in sizes] and rows[0]["batch"] == 2
    assert all(r["ok"] for r in rows), rows
    assert all(r["max_abs_diff"] < 1e-4 for r in rows), rows


def test_onnx_through_the_dynamo_exporter(tmp_path):
    """torch's default ONNX exporter (``torch.export``-based, as MONAI's ``convert_to_onnx`` calls it on
    torch >= 2.9) also gives a graph valid at every size."""
    pytest.importorskip("onnxscript")
    pytest.importorskip("onnxruntime")
    from visionattn.tasks.export import OnnxNetwork, compare, export_onnx

    net = build("dagunet_2d").eval()
    sizes = CASES["dagunet_2d"][1]
    path = tmp_path / "dagunet.onnx"
    export_onnx(net, path, inputs("dagunet_2d", sizes[0]), exporter="dynamo")
    rows = compare(OnnxNetwork(path, threads=2), net, sizes, IN_CHANNELS, report=None)
    assert all(r["ok"] for r in rows), rows


# ---------------------------------------------------------------------------------------------------
# the trainer's segmentation task


def test_the_trainer_warns_when_a_list_loss_gets_one_output():
    from visionattn.tasks.segmentation import SegmentationTask

    task, net = SegmentationTask(), torch.nn.Conv2d(1, 3, 1)
    x, y = torch.randn(2, 1, 8, 8), torch.randint(0, 3, (2, 1, 8, 8))
    with pytest.warns(UserWarning, match="deep_supervision: true"):
        loss = task.training_loss(net, x, y, MutationLoss())
    torch.testing.assert_close(loss, MutationLoss()([net(x)], y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per task
        task.training_loss(net, x, y, MutationLoss())


# ---------------------------------------------------------------------------------------------------
# MutationLoss: index and one-hot labels


def test_mutation_loss_takes_index_and_one_hot_labels_alike():
    torch.manual_seed(0)
    outs = [torch.randn(2, 3, 6, 5) for _ in range(3)]
    index = torch.randint(0, 3, (2, 1, 6, 5))
    onehot = F.one_hot(index[:, 0], 3).movedim(-1, 1)
    loss = MutationLoss()
    want = loss(outs, index)
    for target in (index[:, 0], index.float(), onehot, onehot.float(), onehot.bool()):
        torch.testing.assert_close(loss(outs, target), want)
    # one-hot taken as class indices (channel 0) would have been a different loss
    assert not torch.allclose(loss(outs, onehot[:, :1]), want)


@pytest.mark.parametrize("target,match", [
    (torch.zeros(2, 2, 6, 5), r"target \[2, 2, 6, 5\] fits neither"),       # neither 1 nor K channels
    (torch.zeros(2, 6, 4), r"fits neither"),                                 # wrong spatial size
    (torch.full((2, 1, 6, 5), 0.5), "non-integer"),                          # soft values in an index map
    (torch.full((2, 1, 6, 5), 3), r"0\.\.2"),                                 # a class the logits lack
])
def test_mutation_loss_refuses_ambiguous_or_wrong_targets(target, match):
    outs = [torch.randn(2, 3, 6, 5) for _ in range(2)]
    with pytest.raises(ValueError, match=match):
        MutationLoss()(outs, target)


def test_mutation_loss_refuses_one_channel_and_mixed_sizes():
    with pytest.raises(ValueError, match="at least 2 classes"):  # K = 1: index and one-hot would look alike
        MutationLoss()(torch.randn(2, 1, 4, 4), torch.zeros(2, 1, 4, 4))
    net = build("agunet_2d", deep_supervision=True).train()
    outs = net(inputs("agunet_2d"))  # a U-Net's list halves in size: not for the MUTATION sums
    with pytest.raises(ValueError, match="must have one shape"):
        MutationLoss()(outs, labels(inputs("agunet_2d")))
