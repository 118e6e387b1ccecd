"""Recipes: includes, overrides, and the allow-list that keeps a downloaded recipe from running code."""
import pytest
import torch

from visionattn.tasks.config import ConfigError, instantiate, load_config, resolve_target, validate


def test_defaults_includes_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train: {epochs: 3, lr: 0.1}\nmodel: {name: convit_tiny}\n")
    (tmp_path / "run.yaml").write_text("defaults: [base.yaml]\ntrain: {lr: 0.01}\n")
    cfg = load_config(tmp_path / "run.yaml", ["train.epochs=7", "data.root=/x", "train.amp=bf16"])
    assert cfg["train"] == {"epochs": 7, "lr": 0.01, "amp": "bf16"}
    assert cfg["model"]["name"] == "convit_tiny" and cfg["data"]["root"] == "/x"


def test_include_cycle_and_missing_file(tmp_path):
    (tmp_path / "a.yaml").write_text("defaults: [b.yaml]\n")
    (tmp_path / "b.yaml").write_text("defaults: [a.yaml]\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="key.sub=value"):
        (tmp_path / "c.yaml").write_text("x: 1\n")
        load_config(tmp_path / "c.yaml", ["novalue"])


def test_instantiate_allowed_targets():
    loss = instantiate({"_target_": "torch.nn.CrossEntropyLoss", "label_smoothing": 0.1})
    assert isinstance(loss, torch.nn.CrossEntropyLoss) and loss.label_smoothing == 0.1
    opt = instantiate({"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.1})
    assert opt([torch.nn.Parameter(torch.zeros(1))]).defaults["lr"] == 0.1
    model = instantiate({"_target_": "visionattn.create_model", "name": "activator_glu_cifar", "num_classes": 3})
    assert model.num_classes == 3
    dice = instantiate({"_target_": "monai.losses.DiceCELoss", "to_onehot_y": True, "softmax": True})
    assert dice.__class__.__name__ == "DiceCELoss"


@pytest.mark.parametrize("target", [
    "torch.hub.load", "torch.load", "monai.bundle.run", "monai.bundle.ConfigParser", "builtins.eval",
    "builtins.exec", "importlib.import_module", "os.system", "subprocess.run", "subprocess.Popen",
    "pickle.loads", "timm.models.load_checkpoint", "timm.models._builder.torch.load", "torch.nn.modules.module.torch.load",
    "timm.models._hub.load_state_dict_from_hf", "visionattn.tasks.config.instantiate", "numpy.load", "shutil.rmtree",
    "torch.nn.Module.__init__.__globals__", "torchvision.transforms.functional.torch.hub.load",
])
def test_refused_targets(target):
    with pytest.raises(ConfigError, match="refused|outside the allowed|dunder"):
        resolve_target(target)


def test_a_refused_target_anywhere_stops_the_whole_recipe_before_anything_runs(tmp_path):
    marker = tmp_path / "ran"
    (tmp_path / "evil.yaml").write_text(
        "model: {name: convit_tiny}\n"
        "loss: {_target_: torch.nn.CrossEntropyLoss}\n"
        f"data: {{extra: [{{_target_: builtins.open, file: '{marker}', mode: w}}]}}\n"
    )
    with pytest.raises(ConfigError, match="builtins.open"):
        load_config(tmp_path / "evil.yaml")
    assert not marker.exists()


def test_monai_expressions_are_refused():
    with pytest.raises(ConfigError, match="Python expression"):
        validate({"network": {"_target_": "monai.networks.nets.UNet", "spatial_dims": "$__import__('os').getcwd()"}})


def test_unknown_and_bad_targets_are_named():
    with pytest.raises(ConfigError, match="no attribute 'NoSuchLoss'"):
        resolve_target("torch.nn.NoSuchLoss")
    with pytest.raises(ConfigError, match="not a class or function"):
        resolve_target("torch.nn.functional")
    with pytest.raises(ConfigError, match="building torch.nn.CrossEntropyLoss failed"):
        instantiate({"_target_": "torch.nn.CrossEntropyLoss", "bogus": 1})


def test_data_keys_its_task_does_not_read_are_refused_with_the_nearest_known_one(tmp_path, capsys):
    """A misspelt or another task's data key was ignored without a word (``data.zom: 4`` trained at zoom 1)."""
    from visionattn.cli import main

    with pytest.raises(ConfigError, match=r"unknown data key\(s\) 'zom' \(did you mean 'zoom'\?\) for task segmentation"):
        load_config("configs/segmentation/drive_emcad.yaml", ["data.zom=4"])
    with pytest.raises(ConfigError, match=r"unknown data key\(s\) 'zoom' for task detection"):
        load_config("configs/detection/neu_det_dfir_detr.yaml", ["data.zoom=2"])
    load_config("configs/segmentation/drive_emcad.yaml", ["data.zoom=4"])  # the key it reads
    assert main(["train", "configs/classification/cifar10_convit.yaml", "data.image_size=64",
                 f"output_dir={tmp_path / 'run'}"]) == 2
    assert "'image_size' (did you mean 'img_size'?)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    # classification's augment section likewise: two keys, and their values checked
    for override, says in [("data.augment.mixup=0.2", "unknown key(s) ['mixup'] for classification"),
                           ("data.augment.crop_padding=-2", "crop_padding must be a whole number of pixels"),
                           ("data.augment.hflip=0.5", "hflip must be true or false")]:
        assert main(["train", "configs/classification/cifar10_convit.yaml", override,
                     f"output_dir={tmp_path / 'run'}"]) == 2
        assert says in capsys.readouterr().err
