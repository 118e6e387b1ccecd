"""Test-time mirroring with a trained model: only along the axes the model was trained to be invariant to.

A network that is invariant by construction (a voxel-wise one) cannot tell right from wrong mirroring; the
bundled hippocampus AGUNet can: it was trained with left-right flips only, and mirroring the
anterior-posterior axis swaps the meaning of its two labels."""
import numpy as np
import nibabel as nib
import pytest
import torch

from visionattn.tasks.segment import BUNDLED, Segmenter, dice_per_label
from visionattn.tasks.segmentation import mirror_axes, sliding_window_predict


def _mean_dice(segmenter: Segmenter) -> float:
    scores = []
    for image_path in sorted((BUNDLED / "samples" / "images").glob("*.nii.gz")):
        image = nib.load(str(image_path))
        truth = np.asarray(nib.load(str(BUNDLED / "samples" / "labels" / image_path.name)).dataobj)
        labels = segmenter.predict(np.asarray(image.dataobj, np.float32), image.affine)["labels"]
        scores += dice_per_label(labels, truth, 3)
    return float(np.mean(scores))


def test_mirror_axes_come_from_the_recipe():
    assert mirror_axes({"spatial_dims": 3, "augment": {"flip_axes": [0]}}) == [0]
    assert mirror_axes({"spatial_dims": 3}) == [0, 1, 2]  # the training default flips every axis
    assert mirror_axes({"spatial_dims": 2, "augment": {"flip_axes": []}}) == []
    assert Segmenter.from_run("hippocampus_agunet", tta=True).mirror_axes == [0]
    assert Segmenter.from_run("hippocampus_agunet", tta=False).mirror_axes == []
    assert Segmenter.from_run("hippocampus_agunet").mirror_axes == [0]  # its run config: inference.tta true


def test_tta_with_the_trained_model_does_not_lower_dice():
    torch.set_num_threads(1)
    plain = _mean_dice(Segmenter.from_run("hippocampus_agunet", tta=False))
    mirrored = _mean_dice(Segmenter.from_run("hippocampus_agunet", tta=True))
    assert plain > 0.85
    assert mirrored >= plain - 1e-3, (plain, mirrored)
    # the old behaviour, every axis mirrored, ruins it: the test can tell
    everything = Segmenter.from_run("hippocampus_agunet", tta=True)
    everything.mirror_axes = [0, 1, 2]
    assert _mean_dice(everything) < 0.5


def test_sliding_window_mirroring_only_along_the_given_axes():
    calls = []

    def net(x):
        calls.append(x.clone())
        return torch.cat([x, -x], 1)

    image = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4)
    sliding_window_predict(net, image, [2, 3, 4], overlap=0.0, tta=[1])
    assert len(calls) == 2 and torch.equal(calls[1], image.flip(3))
    with pytest.raises(ValueError, match="not spatial axes"):
        sliding_window_predict(net, image, [2, 3, 4], tta=[3])
