"""Ensembles in ``segment`` (nnU-Net's ensemble of folds): the class probabilities of several models averaged
before the argmax. The members are 1x1x1 convolutions, so each voxel's probabilities have a closed form to
check against, and their weights are drawn so that the ensemble's labels differ from every member's."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from visionattn.cli import main
from visionattn.tasks.runtime import atomic_save_weights
from visionattn.tasks.segment import SegmentError, Segmenter, load_segmentation_models

SHAPE = (20, 18, 16)


def conv_run(folder: Path, seed: int, weights: str = "model.safetensors", **data) -> Path:
    """A run folder whose network is a random 1x1x1 convolution (3 classes from one channel), on a 2 mm RAS
    recipe; ``data`` overrides recipe keys."""
    folder.mkdir(parents=True)
    recipe = {"spatial_dims": 3, "in_channels": 1, "labels": ["background", "a", "b"], "orientation": "RAS",
              "spacing": [2.0, 2.0, 2.0], "intensity": "zscore", "roi_size": [16, 16, 16],
              "augment": {"flip_axes": [0]}}
    recipe.update(data)
    cfg = {"task": "segmentation", "data": recipe, "inference": {"overlap": 0.25, "mode": "constant", "sw_batch_size": 2},
           "model": {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 3, "kernel_size": 1}}
    conv = torch.nn.Conv3d(1, 3, 1)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(3, 1, 1, 1, 1, generator=generator) * 3)
        conv.bias.copy_(torch.randn(3, generator=generator))
    (folder / "config.yaml").write_text(yaml.safe_dump(cfg))
    atomic_save_weights(conv, folder / weights)
    return folder


def probabilities_by_hand(run: Path, volume: np.ndarray) -> np.ndarray:
    """``[3, *SHAPE]``: softmax of the convolution on the z-scored volume, in float64."""
    from safetensors.numpy import load_file

    state = load_file(str(run / "model.safetensors"))
    z = (volume - volume.mean()) / volume.std()
    logits = state["weight"].reshape(3, 1).astype(np.float64) * z.reshape(1, -1) + state["bias"][:, None]
    e = np.exp(logits - logits.max(0))
    return (e / e.sum(0)).reshape(3, *volume.shape)


@pytest.fixture
def volume() -> np.ndarray:
    return np.random.default_rng(0).normal(size=SHAPE).astype(np.float32)


AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])  # RAS, 2 mm: the recipe's grid, so nothing is resampled


def test_the_ensemble_averages_its_members_probabilities(tmp_path, volume):
    runs = [conv_run(tmp_path / f"m{k}", seed=k) for k in (1, 2, 3)]
    by_hand = [probabilities_by_hand(r, volume) for r in runs]
    expected = np.mean(by_hand, axis=0)
    # the labels tell the ensemble from any one member and from a majority vote (the probabilities, below,
    # from a mean of logits too)
    for member in by_hand:
        assert (member.argmax(0) != expected.argmax(0)).sum() >= 20
    votes = np.stack([m.argmax(0) for m in by_hand])
    assert (np.apply_along_axis(lambda v: np.bincount(v, minlength=3).argmax(), 0, votes) != expected.argmax(0)).any()

    seg = Segmenter.from_run([str(r) for r in runs], tta=False)
    out = seg.predict(volume, AFFINE, probabilities=True)
    np.testing.assert_allclose(out["probabilities"], expected, atol=1e-5)
    np.testing.assert_array_equal(out["labels"], expected.argmax(0))
    assert seg.source.startswith("ensemble of 3: ")
    single = Segmenter.from_run(str(runs[0]), tta=False).predict(volume, AFFINE, probabilities=True)
    np.testing.assert_allclose(single["probabilities"], by_hand[0], atol=1e-5)


def test_a_crossval_folder_is_the_ensemble_of_its_folds(tmp_path, volume, capsys):
    cv = tmp_path / "cv"
    for k in (0, 1, 2):
        conv_run(cv / f"fold{k}", seed=10 + k, folds=3, fold=k)  # as crossval writes them
    (cv / "crossval.json").write_text("{}")
    cases = tmp_path / "scans"
    cases.mkdir()
    nib.save(nib.Nifti1Image(volume, AFFINE), str(cases / "case.nii.gz"))

    assert [Path(m.source).parent.name for m in load_segmentation_models(str(cv))] == ["fold0", "fold1", "fold2"]
    assert main(["segment", "-i", str(cases), "-o", str(tmp_path / "by_folder"), "--model", str(cv), "--no-tta",
                 "--no-progress"]) == 0
    said = capsys.readouterr().out
    assert "with an ensemble of 3 (" in said
    assert main(["segment", "-i", str(cases), "-o", str(tmp_path / "by_name"), "--no-tta", "--no-progress"]
                + [a for k in (0, 1, 2) for a in ("--model", str(cv / f"fold{k}"))]) == 0
    labels = [np.asarray(nib.load(str(tmp_path / d / "case.nii.gz")).dataobj) for d in ("by_folder", "by_name")]
    np.testing.assert_array_equal(labels[0], labels[1])
    expected = np.mean([probabilities_by_hand(cv / f"fold{k}", volume) for k in (0, 1, 2)], axis=0).argmax(0)
    np.testing.assert_array_equal(labels[0], expected)
    summary = json.loads((tmp_path / "by_folder" / "summary.json").read_text())
    assert summary["model"].startswith("ensemble of 3: ") and summary["cases"][0]["model"] == summary["model"]


def test_an_unfinished_or_missing_fold_is_named_with_the_fix(tmp_path):
    cv = tmp_path / "cv"
    conv_run(cv / "fold0", seed=1, folds=3, fold=0)
    conv_run(cv / "fold1", seed=2, folds=3, fold=1, weights="best.safetensors")  # still training: no final weights yet
    with pytest.raises(SegmentError, match=r"fold1 has not finished \(no model\.safetensors\).*--model .*fold0"):
        load_segmentation_models(str(cv))
    (cv / "fold1" / "best.safetensors").rename(cv / "fold1" / "model.safetensors")
    with pytest.raises(SegmentError, match=r"a crossval folder of 3 folds without fold2; train it .*--model .*fold0"):
        load_segmentation_models(str(cv))
    conv_run(cv / "fold2", seed=3, folds=3, fold=2)
    assert len(load_segmentation_models(str(cv))) == 3


@pytest.mark.parametrize("change, named", [
    ({"spacing": [1.0, 1.0, 1.0]}, r"data\.spacing: \[2\.0, 2\.0, 2\.0\] against \[1\.0, 1\.0, 1\.0\]"),
    ({"labels": ["background", "b", "a"]}, r"data\.labels"),
    ({"intensity": "scale01"}, r"data\.intensity"),
    ({"orientation": "LPS"}, r"data\.orientation"),
])
def test_members_that_see_or_label_differently_are_refused(tmp_path, change, named):
    first = conv_run(tmp_path / "a", seed=1)
    other = conv_run(tmp_path / "b", seed=2, **change)
    with pytest.raises(SegmentError, match=r"cannot join an ensemble with .*" + named):
        Segmenter.from_run([str(first), str(other)])


def test_other_misuses_of_an_ensemble(tmp_path, volume, capsys):
    a = conv_run(tmp_path / "a", seed=1)
    b = conv_run(tmp_path / "b", seed=2, roi_size=[8, 8, 8])
    with pytest.raises(SegmentError, match="the same weights given twice"):
        load_segmentation_models([str(a), str(a / "model.safetensors")])
    with pytest.raises(SegmentError, match=r"different window sizes \(16x16x16, 8x8x8\); give one with --roi-size"):
        Segmenter.from_run([str(a), str(b)])
    Segmenter.from_run([str(a), str(b)], roi_size=[12, 12, 12]).predict(volume, AFFINE)  # given: it runs
    with pytest.raises(SegmentError, match="--onnx FILE holds one network, and the ensemble has 2"):
        Segmenter.from_run([str(a), str(b)], roi_size=[8, 8, 8], engine="onnx", onnx_path=str(tmp_path / "x.onnx"))
    assert main(["segment", "-i", str(tmp_path), "-o", str(tmp_path / "out"), "--model", str(a),
                 "--model", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err


def test_mirroring_uses_the_axes_every_member_was_flipped_along(tmp_path):
    a = conv_run(tmp_path / "a", seed=1, augment={"flip_axes": [0, 2]})
    b = conv_run(tmp_path / "b", seed=2, augment={"flip_axes": [0, 1]})
    assert Segmenter.from_run([str(a), str(b)], tta=True).mirror_axes == [0]
    assert Segmenter.from_run(str(a), tta=True).mirror_axes == [0, 2]
