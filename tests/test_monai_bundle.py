"""`visionattn export RUN --format monai-bundle`: a MONAI bundle that `python -m monai.bundle run` infers and
trains with (MONAI's SupervisedEvaluator and SupervisedTrainer running a visionattn network), weights in
safetensors only.

The bundle is exported once from the bundled hippocampus model; inference runs on the 3 bundled sample
volumes and is compared with `visionattn segment`'s labels for the same volumes; training runs 1 epoch on an
MSD-style folder made of those 3 samples (2 train, 1 validation by visionattn's fixed split), on one thread.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")
nib = pytest.importorskip("nibabel")

from visionattn.tasks.segment import BUNDLED

SAMPLES = BUNDLED / "samples"
CASES = ("hippocampus_015", "hippocampus_020", "hippocampus_024")
# what README.md reports for `visionattn segment` on these 3 samples (mean Dice against their labels)
README_DICE = {"anterior": 0.884, "posterior": 0.867}


def _engines_available() -> None:
    """`python -m monai.bundle` needs `fire`, MONAI's engines `pytorch-ignite`."""
    for module, package in (("ignite", "pytorch-ignite"), ("fire", "fire")):
        pytest.importorskip(module, reason=f"`python -m monai.bundle run` needs {package} (pip install {package})")


def _monai_bundle(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "monai.bundle", "run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, f"monai.bundle run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """The bundled model exported through the command line, as a user would."""
    from visionattn.cli import main

    out = tmp_path_factory.mktemp("bundle") / "hippocampus_agunet"
    assert main(["export", "hippocampus_agunet", "--format", "monai-bundle", "-o", str(out)]) == 0
    return out


def _dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    x, y = a == label, b == label
    total = int(x.sum()) + int(y.sum())
    return 1.0 if total == 0 else 2.0 * int((x & y).sum()) / total


# ---------------------------------------------------------------------------------------------------
# (1) the folder, its metadata and the network's declared input/output


def test_export_writes_a_bundle_whose_metadata_and_network_agree(bundle):
    from monai.bundle import ConfigParser, verify_net_in_out
    from visionattn.tasks.monai_bundle import check_metadata
    from visionattn.tasks.run import Run

    for path in ("configs/metadata.json", "configs/inference.json", "configs/train.json", "configs/logging.conf",
                 "configs/recipe.yaml", "models/model.safetensors", "docs/README.md"):
        assert (bundle / path).is_file(), path
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    # `monai.bundle verify_metadata` downloads its JSON schema from the URL in "schema": not reachable
    # offline, so the specification's mandatory keys are checked here instead
    assert check_metadata(meta) == []
    assert check_metadata({k: v for k, v in meta.items() if k != "task"}) == ["task"]
    run = Run.load("hippocampus_agunet")
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {str(i): c for i, c in enumerate(run.classes)}
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == len(run.classes)
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == run.config["data"]["roi_size"]
    # the weights are the run's, byte for byte
    assert (bundle / "models" / "model.safetensors").read_bytes() == run.weights.read_bytes()

    # the network the configs build is visionattn's, with the run's name and arguments
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    net_def = parser.get("network_def")
    assert net_def["_target_"] == "visionattn.create_model"
    assert net_def["name"] == run.config["model"]["name"]
    assert {k: net_def[k] for k in run.config["model"]["kwargs"]} == run.config["model"]["kwargs"]
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert train["network_def"] == net_def

    # MONAI's own check: the network takes the declared input and gives the declared channels
    verify_net_in_out(net_id="network_def", meta_file=str(bundle / "configs" / "metadata.json"),
                      config_file=str(bundle / "configs" / "inference.json"), bundle_root=str(bundle), device="cpu")


def test_bundle_training_augments_and_splits_as_the_recipe(bundle):
    """train.json's random transforms are the recipe's (``segmentation.augmentation``), class for class and
    with the same probabilities and ranges (the bundled model's recipe rotates, scales and changes gamma), and
    its split is the run's cross-validation fold."""
    from monai.bundle import ConfigParser

    from visionattn.tasks.segment import load_segmentation_model
    from visionattn.tasks.segmentation import augmentation

    data = load_segmentation_model("hippocampus_agunet").data
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "train.json"))
    exported = parser.get_parsed_content("train#preprocessing").transforms
    ours = augmentation(data)
    tail = exported[len(exported) - len(ours):]
    assert [type(t).__name__ for t in tail] == [type(t).__name__ for t in ours]
    assert "RandAffined" in [type(t).__name__ for t in ours] and "RandAdjustContrastd" in [type(t).__name__ for t in ours]
    for mine, theirs in zip(ours, tail):
        if hasattr(mine, "prob"):
            assert theirs.prob == mine.prob, type(mine).__name__
    affine = next(t for t in tail if type(t).__name__ == "RandAffined").rand_affine.rand_affine_grid
    want = next(t for t in ours if type(t).__name__ == "RandAffined").rand_affine.rand_affine_grid
    assert affine.rotate_range == want.rotate_range and affine.scale_range == want.scale_range
    gamma = next(t for t in tail if type(t).__name__ == "RandAdjustContrastd").adjuster.gamma
    assert tuple(gamma) == tuple(next(t for t in ours if type(t).__name__ == "RandAdjustContrastd").adjuster.gamma)
    train = json.loads((bundle / "configs" / "train.json").read_text())
    assert (train["folds"], train["fold"]) == (data["folds"], data["fold"]) == (5, 0)


def test_export_refuses_to_replace_a_bundle_without_overwrite(bundle, capsys):
    from visionattn.cli import main

    before = (bundle / "configs" / "inference.json").read_text()
    assert main(["export", "hippocampus_agunet", "--format", "monai-bundle", "-o", str(bundle)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (bundle / "configs" / "inference.json").read_text() == before
    # a model built by name has no trained weights to bundle
    assert main(["export", "agunet_3d", "--format", "monai-bundle", "-o", str(bundle.parent / "x")]) == 2
    assert not (bundle.parent / "x").exists()


# ---------------------------------------------------------------------------------------------------
# (2) inference through `python -m monai.bundle run` gives `visionattn segment`'s labels


def test_bundle_inference_matches_visionattn_segment(bundle, tmp_path):
    _engines_available()
    from visionattn.tasks.segment import Segmenter

    out = tmp_path / "pred"
    _monai_bundle("--config_file", str(bundle / "configs" / "inference.json"), "--bundle_root", str(bundle),
                  "--dataset_dir", str(SAMPLES / "images"), "--output_dir", str(out), cwd=tmp_path)
    segmenter = Segmenter.from_run("hippocampus_agunet", device="cpu")
    dice_ref: dict[str, list[float]] = {"anterior": [], "posterior": []}
    for case in CASES:
        source = nib.load(str(SAMPLES / "images" / f"{case}.nii.gz"))
        written = nib.load(str(out / f"{case}_seg.nii.gz"))
        got = np.asarray(written.dataobj)
        # on the input's own grid
        assert got.shape == source.shape
        np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
        want = segmenter.predict(np.asarray(source.dataobj, dtype=np.float32), source.affine)["labels"]
        differing = int((got != want).sum())
        for k in (1, 2):
            assert _dice(got, want, k) >= 0.99, (case, k, differing)
        assert differing <= 1e-3 * want.size, (case, differing)
        truth = np.asarray(nib.load(str(SAMPLES / "labels" / f"{case}.nii.gz")).dataobj).round()
        for k, name in enumerate(("anterior", "posterior"), start=1):
            dice_ref[name].append(_dice(got, truth, k))
    for name, values in dice_ref.items():
        assert abs(float(np.mean(values)) - README_DICE[name]) < 0.01, (name, values)


# ---------------------------------------------------------------------------------------------------
# (3) training through `python -m monai.bundle run`: MONAI's SupervisedTrainer/SupervisedEvaluator on our network


def _msd_folder(root: Path) -> Path:
    """An MSD-style folder (dataset.json, imagesTr/, labelsTr/) holding the 3 bundled samples."""
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for case in CASES:
        (root / "imagesTr" / f"{case}.nii.gz").write_bytes((SAMPLES / "images" / f"{case}.nii.gz").read_bytes())
        (root / "labelsTr" / f"{case}.nii.gz").write_bytes((SAMPLES / "labels" / f"{case}.nii.gz").read_bytes())
    listing = {"training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in CASES]}
    (root / "dataset.json").write_text(json.dumps(listing))
    return root


def test_bundle_training_runs_monai_engines_and_writes_loadable_safetensors(bundle, tmp_path):
    _engines_available()
    import shutil

    import visionattn

    work = tmp_path / "bundle"
    shutil.copytree(bundle, work)
    data = _msd_folder(tmp_path / "Task04_Hippocampus")
    exported = (work / "models" / "model.safetensors").read_bytes()
    proc = _monai_bundle("--config_file", str(work / "configs" / "train.json"), "--bundle_root", str(work),
                         "--dataset_dir", str(data), "--epochs", "1", "--val_interval", "1", "--batch_size", "2",
                         "--folds", "3",  # the bundled model is fold 0 of 5; three cases make three folds
                         cwd=tmp_path)
    log = proc.stdout + proc.stderr
    assert "train_loss" in log and "val_mean_dice" in log, log[-2000:]
    # best weights (validation Dice), last weights, metrics; nothing pickled
    best, final = work / "models" / "model.safetensors", work / "models" / "model_final.safetensors"
    assert best.is_file() and final.is_file()
    assert best.read_bytes() != exported  # trained from scratch, then saved over the exported weights
    metrics = (work / "eval" / "metrics.csv").read_text().strip().split(",")
    assert metrics[0] == "val_mean_dice" and 0.0 <= float(metrics[1]) <= 1.0
    assert not [p for p in work.rglob("*") if p.suffix in (".pt", ".pth", ".ckpt", ".pkl")]

    # the weights load back with visionattn (strict, digest checked), into the network the bundle describes
    net_def = dict(json.loads((work / "configs" / "train.json").read_text())["network_def"])
    net_def.pop("_target_")
    name = net_def.pop("name")
    for path in (best, final):
        model = visionattn.create_model(name, **net_def)
        visionattn.load_checkpoint(model, str(path))
        assert all(torch.isfinite(p).all() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------
# (4) safetensors only


_PICKLE_MAGIC = (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05", b"PK\x03\x04")  # pickle protocols, torch.save zip


def test_bundle_holds_no_pickle_and_loads_weights_only_from_safetensors(bundle, tmp_path):
    from visionattn.tasks.monai_bundle import load_weights

    for path in bundle.rglob("*"):
        if path.is_file():
            assert path.suffix not in (".pt", ".pth", ".ckpt", ".pkl", ".ts"), path
            assert not path.read_bytes()[:4].startswith(_PICKLE_MAGIC), path
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    assert inference["ckpt_path"].endswith("/models/model.safetensors'")
    assert "load_weights(@network_def, @ckpt_path)" in inference["network"]
    for name in ("inference.json", "train.json"):
        text = (bundle / "configs" / name).read_text()
        for pickling in ("CheckpointLoader", "CheckpointSaver", "torch.load", "torch.save"):
            assert pickling not in text, (name, pickling)

    import visionattn

    net_def = dict(inference["network_def"])
    net_def.pop("_target_")
    name = net_def.pop("name")
    model = visionattn.create_model(name, **net_def)
    loaded = load_weights(model, bundle / "models" / "model.safetensors")
    assert loaded is model
    pickled = tmp_path / "model.pt"
    torch.save(model.state_dict(), pickled)
    with pytest.raises(ValueError, match="safetensors"):
        load_weights(model, pickled)
