"""The model families' layout (issue 16): the DETR toolkit split out of ``rtdetr.py`` left both detectors'
weights and outputs as they were, registrations are written out by name, and no family imports another
family's module or private names.

The reference values below were recorded from the code before the split (``rtdetr.py`` holding the toolkit);
``torch.manual_seed`` fixes the initial weights, so they are the same on every machine up to float rounding.
"""
from __future__ import annotations

import ast
import hashlib
import inspect
import sys
from pathlib import Path

import pytest
import torch

import visionattn
from visionattn.detectors.detr import DecoderConfig, DETRDetector

ROOT = Path(__file__).resolve().parents[1]
FAMILY_PACKAGES = ("backbones", "decoders", "detectors")

# state_dict(): number of keys, sha256 of the sorted keys joined by newlines, parameter count (default sizes)
STATE_DICTS = {
    "rtdetr_r18": (527, "39489f0921dd65e2087d3bd63c74ded335e16452c3e3764c19f51814496f7b91", 20_180_240),
    "dfir_detr": (663, "034ed0eee405c0afacceb96af61f0406b844130cc79cf1f341d4baebddc45bb6", 11_701_324),
}

# small configurations (as tests/test_detectors.py's), 6 classes, weights from torch.manual_seed(0)
SMALL = {
    "rtdetr_r18": dict(backbone="resnet10t", hidden_dim=64, num_heads=4, ffn_dim=128, num_fusion_blocks=1,
                       num_queries=30, num_denoising=12, max_detections=40, input_size=128),
    "dfir_detr": dict(widths=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1), head_dim=16, hidden_dim=64, num_heads=4,
                      ffn_dim=128, fusion_blocks=1, num_queries=30, num_denoising=12, max_detections=40,
                      input_size=128),
}
# eval: per image (sum of the boxes, sum of the scores); training (torch.manual_seed(1) first): the losses
REFERENCE = {
    "rtdetr_r18": dict(
        eval=[(15950.000406, 0.779342), (10134.000405, 0.776074), (11740.00049, 0.777409)],
        train=dict(loss=41.399185, loss_bbox=26.623404, loss_giou=10.827005, loss_vfl=3.948775)),
    "dfir_detr": dict(
        eval=[(15650.000211, 1.082242), (9726.00024, 1.082576), (10930.000244, 1.082587)],
        train=dict(loss=43.147305, loss_bbox=26.540071, loss_giou=12.943019, loss_vfl=3.664214)),
}

# every name registered before the split (names may be added, none may disappear)
REGISTERED_BEFORE = [
    "activator_cifar", "activator_glu_cifar", "activator_s16_224", "agunet_2d", "agunet_3d", "biformer_base",
    "biformer_small", "biformer_stl", "biformer_tiny", "convit_base", "convit_base_plus", "convit_small",
    "convit_small_plus", "convit_tiny", "convit_tiny_plus", "dagunet_2d", "dagunet_3d", "daunet_2d", "daunet_3d",
    "dfir_detr", "emcad_pvt_v2_b0", "emcad_pvt_v2_b2", "gated_swinrmt_retention", "gated_swinrmt_retention_cifar",
    "gated_swinrmt_retention_small", "gated_swinrmt_retention_tiny", "gated_swinrmt_swat",
    "gated_swinrmt_swat_cifar", "gated_swinrmt_swat_small", "gated_swinrmt_swat_tiny", "herseg",
    "ninformer_b16_224", "ninformer_cifar", "ninformer_s16_224", "rtdetr_r18",
]


def reference_batch():
    generator = torch.Generator().manual_seed(123)
    images = [torch.rand(3, 200, 200, generator=generator), torch.rand(3, 96, 150, generator=generator),
              torch.rand(3, 160, 120, generator=generator)]
    targets = [
        dict(boxes=torch.tensor([[10.0, 20, 100, 120], [50, 50, 60, 70]]), labels=torch.tensor([1, 3])),
        dict(boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.long)),
        dict(boxes=torch.tensor([[0.0, 0, 120, 160]]), labels=torch.tensor([5])),
    ]
    return images, targets


# ---------------------------------------------------------------------------------------------------------
# detectors: unchanged by the split


@pytest.mark.parametrize("name", list(STATE_DICTS))
def test_detector_state_dict_keys_and_parameter_count_are_unchanged(name):
    model = visionattn.create_model(name)
    keys = sorted(model.state_dict())
    digest = hashlib.sha256("\n".join(keys).encode()).hexdigest()
    assert (len(keys), digest, sum(p.numel() for p in model.parameters())) == STATE_DICTS[name]


@pytest.mark.parametrize("name", list(SMALL))
def test_detector_outputs_and_losses_are_unchanged(name):
    torch.manual_seed(0)
    model = visionattn.create_model(name, num_classes=6, **SMALL[name]).eval()
    images, targets = reference_batch()
    with torch.no_grad():
        detections = model(images)
    got = [(d["boxes"].double().sum().item(), d["scores"].double().sum().item()) for d in detections]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                               torch.tensor(REFERENCE[name]["eval"], dtype=torch.float64), rtol=1e-4, atol=1e-5)
    torch.manual_seed(1)  # the denoising noise
    losses = model.train()(images, targets)
    got = {k: v.item() for k, v in losses.items()}
    assert got == pytest.approx(REFERENCE[name]["train"], rel=1e-4)


def test_both_detectors_build_the_shared_decoder_from_one_config():
    kwargs = dict(hidden_dim=64, num_heads=4, ffn_dim=128, num_queries=30, num_decoder_layers=2, num_points=2,
                  num_denoising=12, label_noise_ratio=0.25, box_noise_scale=0.5)
    want = DecoderConfig(hidden_dim=64, num_heads=4, ffn_dim=128, num_queries=30, num_layers=2, num_points=2,
                         num_denoising=12, label_noise_ratio=0.25, box_noise_scale=0.5)
    for name, family in (("rtdetr_r18", dict(backbone="resnet10t", num_fusion_blocks=1)),
                         ("dfir_detr", dict(widths=(8, 16, 32, 64, 128), depths=(1, 1, 1, 1), head_dim=16))):
        model = visionattn.create_model(name, num_classes=5, input_size=128, **family, **kwargs)
        assert isinstance(model, DETRDetector)
        assert model.decoder.config == want, name
        assert len(model.decoder.layers) == 2 and model.decoder.layers[0].cross_attn.num_points == 2
        assert model.decoder.num_classes == model.criterion.num_classes == model.num_classes == 5


def test_shared_ops_are_one_function():
    from visionattn.decoders import emcad
    from visionattn.detectors import dfir_detr
    from visionattn.layers import channel_shuffle

    assert emcad.channel_shuffle is dfir_detr.channel_shuffle is channel_shuffle
    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


# ---------------------------------------------------------------------------------------------------------
# registrations


def test_no_registered_name_disappeared():
    assert set(REGISTERED_BEFORE) <= set(visionattn.list_models())


def test_every_registered_constructor_is_written_out_under_its_name():
    """``grep 'def agunet_3d'`` finds every model: no constructor is generated in a loop."""
    for name in visionattn.list_models():
        fn = visionattn.get_entry(name).fn
        assert fn.__name__ == name and fn.__qualname__ == name, name
        source = inspect.getsource(sys.modules[fn.__module__])
        assert f"\ndef {name}(" in source, f"{name} is not defined by name in {fn.__module__}"


def test_agunet_registrations_are_unchanged():
    want = {"agunet": "agunet", "daunet": "daunet", "dagunet": "dagunet"}
    for name in visionattn.list_models("*unet_*"):
        variant, dims = name.rsplit("_", 1)
        entry = visionattn.get_entry(name)
        assert entry.task == "segmentation" and entry.timm_name is None
        assert entry.default_input_size == ((1, 256, 256) if dims == "2d" else (1, 128, 128, 144))
        model = visionattn.create_model(name, filters=(4, 8, 8))
        assert (model.variant, model.spatial_dims) == (want[variant], int(dims[0]))
        with pytest.raises(ValueError, match="no pretrained weights"):
            entry.fn(pretrained=True)
    assert len(visionattn.list_models("*unet_*")) == 6


# ---------------------------------------------------------------------------------------------------------
# imports between families


def _family_modules() -> dict[str, Path]:
    """``visionattn.<package>.<module>`` -> file, for the family modules (not ``__init__``, not toolkits)."""
    modules = {}
    for package in FAMILY_PACKAGES:
        for path in sorted((ROOT / "visionattn" / package).glob("*.py")):
            if path.name != "__init__.py":
                modules[f"visionattn.{package}.{path.stem}"] = path
    return modules


def _imported(path: Path) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every ``from visionattn... import name`` and ``(module, None)`` for ``import``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("visionattn"):
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names if alias.name.startswith("visionattn")]
    return found


def test_families_import_no_other_family_and_no_private_names():
    families = _family_modules()
    assert {"visionattn.detectors.rtdetr", "visionattn.backbones.activator", "visionattn.decoders.emcad"} \
        <= set(families)
    for module, path in families.items():
        for imported, name in _imported(path):
            where = f"{path.relative_to(ROOT)} imports {imported}" + (f".{name}" if name else "")
            assert imported not in families or imported == module, where
            assert imported not in {f"visionattn.{package}" for package in FAMILY_PACKAGES}, where  # re-exports
            assert name is None or not name.startswith("_"), where


def test_every_model_package_is_listed_for_the_wheel():
    """``pyproject.toml`` lists packages one by one: a new subpackage (``visionattn.detectors.detr``) must be
    there, or the wheel silently lacks it."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    packages = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "visionattn").rglob("__init__.py")}
    assert "visionattn.detectors.detr" in packages
    assert packages <= listed, sorted(packages - listed)
