"""The parts of timm's model contract that .ci/timm-tests checks through timm's own test file, here on one
small model per family without the network: TorchScript and torch.fx give the eager outputs, models build
on the meta device and in another dtype, reset_classifier keeps device / dtype / mode, and
prune_intermediate_layers keeps the taps and leaves no unused parameter."""
import copy

import pytest
import timm
import torch
from timm.models import get_notrace_functions, get_notrace_modules
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import visionattn

# (timm name, kwargs, input size): the smallest model of each family at a small input
MODELS = [
    ("va_convit_tiny", dict(img_size=64, depth=4, local_up_to_layer=2), 64),
    ("va_biformer_tiny", dict(depths=(1, 1, 2, 1), embed_dims=(32, 64, 96, 128)), 64),
    # 64x64: the first stage (16x16) is larger than the window, so its second block has shifted windows
    ("va_gated_swinrmt_retention_cifar", dict(depths=(2, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim_proj=64), 64),
    ("va_gated_swinrmt_swat_cifar", dict(depths=(2, 1, 1, 1), embed_dims=(16, 32, 64, 128), head_dim_proj=64,
                                         out_norm="rowsum"), 64),
    ("va_ninformer_cifar", dict(drop_rate=0.0), 32),
    ("va_activator_glu_cifar", dict(drop_rate=0.0), 32),
]
IDS = [m[0] for m in MODELS]
# slow: every model scripted and traced (timm's own suite, also slow, repeats these for the va_* models)
pytestmark = [pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"), pytest.mark.slow]


def _create(name, kwargs, **more):
    visionattn.list_models()  # registers the va_* models in timm
    return timm.create_model(name, **dict(kwargs, **more))


def _fx(model):
    tracer_kwargs = dict(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(),
                         param_shapes_constant=True)
    _, eval_nodes = get_graph_node_names(model, tracer_kwargs=tracer_kwargs)
    return create_feature_extractor(model, return_nodes=[eval_nodes[-1]], tracer_kwargs=tracer_kwargs)


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_torchscript_and_fx_match_eager(name, kwargs, size):
    torch.manual_seed(0)
    model = _create(name, kwargs, num_classes=5).eval()
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(torch.jit.script(model)(x), expected)
        fx_model = _fx(model)
        torch.testing.assert_close(next(iter(fx_model(x).values())), expected)
        torch.testing.assert_close(next(iter(torch.jit.script(fx_model)(x).values())), expected)
        # the input checks stay in the traced graph
        with pytest.raises(ValueError, match="in_chans=3, got 1 channels"):
            fx_model(torch.randn(1, 1, size, size))
    model.train()
    fx_train = _fx(model)
    next(iter(fx_train(x).values())).sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_device_dtype_and_reset_classifier(name, kwargs, size):
    with torch.device("meta"):
        model = _create(name, kwargs, device="meta", dtype=torch.float32).eval()
    tensors = [*model.parameters(), *model.buffers()]
    assert all(t.device.type == "meta" for t in tensors)
    out = model(torch.randn(1, 3, size, size, device="meta"))
    assert out.device.type == "meta" and out.shape == (1, model.num_classes)
    meta = _create(name, kwargs, device="meta")  # no device context
    assert all(t.device.type == "meta" for t in [*meta.parameters(), *meta.buffers()])

    half = _create(name, kwargs, dtype=torch.bfloat16).eval()
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert half(torch.randn(1, 3, size, size, dtype=torch.bfloat16)).dtype == torch.bfloat16

    model.to(device="meta", dtype=torch.float64)
    model.reset_classifier(0)
    model.reset_classifier(3)
    head = model.get_classifier()
    assert {(p.device.type, p.dtype) for p in head.parameters()} == {("meta", torch.float64)}
    assert all(not m.training for m in model.modules())


def test_factory_arguments_do_not_change_the_model():
    torch.manual_seed(0)
    a = _create("va_biformer_tiny", dict(depths=(1, 1, 1, 1)))
    torch.manual_seed(0)
    b = _create("va_biformer_tiny", dict(depths=(1, 1, 1, 1)), device="cpu", dtype=torch.float32)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb
        torch.testing.assert_close(va, vb, rtol=0, atol=0)
    with pytest.raises(TypeError):
        _create("va_biformer_tiny", {}, not_a_model_arg=1)


@pytest.mark.parametrize("name,kwargs,size", MODELS, ids=IDS)
def test_prune_intermediate_layers_contract(name, kwargs, size):
    """timm's test_prune_intermediate_layers_contract, on a small model."""
    torch.manual_seed(0)
    model = _create(name, kwargs).eval()
    x = torch.randn(2, 3, size, size)
    last = len(model.feature_info) - 1
    with torch.no_grad():
        expected = model(x)
        taps = model.forward_intermediates(x, intermediates_only=True)
        pruned = copy.deepcopy(model)
        pruned.prune_intermediate_layers([last], prune_head=False)
        torch.testing.assert_close(pruned(x), expected)
    for i in range(last + 1):
        with torch.no_grad():
            selected = model.forward_intermediates(x, indices=[i], stop_early=True, intermediates_only=True)
            torch.testing.assert_close(selected[0], taps[i])
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i])
            torch.testing.assert_close(pruned.forward_intermediates(x, indices=take, intermediates_only=True)[0],
                                       taps[i])
            pruned = copy.deepcopy(model)
            take = pruned.prune_intermediate_layers([i], prune_norm=True)
            features = pruned.forward_features(x)
            if i < last and features.ndim == 4:
                torch.testing.assert_close(features, taps[i])
            # a head for the pruned model fits the kept features
            pruned.reset_classifier(4, "avg")
            assert pruned(x).shape == (2, 4)
            assert pruned.forward_head(pruned.forward_features(x), pre_logits=True).shape[1] == pruned.head_hidden_size
            pruned.reset_classifier(0, "")
        pruned.train()
        selected = pruned.forward_intermediates(x, indices=take, intermediates_only=True)
        sum(f.sum() for f in selected + [pruned.forward_features(x)]).backward()
        unused = [n for n, p in pruned.named_parameters() if p.grad is None]
        assert not unused, f"pruned to {i}, unused params: {unused}"
        if i == 0:  # the most pruned model still scripts
            scripted = torch.jit.script(pruned.eval())
            with torch.no_grad():
                torch.testing.assert_close(scripted(x), pruned(x))


def test_convit_pruned_before_the_class_token_drops_it():
    model = _create("va_convit_tiny", dict(img_size=64, depth=4, local_up_to_layer=2)).eval()
    model.prune_intermediate_layers([1])
    assert model.cls_token is None and "cls_token" not in model.state_dict()
    model.reset_classifier(0, "avg")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.shape == (2, 16, 192)  # patch tokens only
        torch.testing.assert_close(model.forward_head(feat), feat.mean(dim=1))
    with pytest.raises(ValueError, match="class token"):
        model.reset_classifier(0, "token")
