"""The segmentation task: data discovery and its errors, the fixed splits, MONAI preprocessing against
direct reads, deep-supervision losses, Dice against MONAI's own pipeline, and the recipes end to end
(train a few steps, evaluate, segment with the run folder)."""
import json
import math
import shutil
from contextlib import nullcontext
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import visionattn
from visionattn.cli import main
from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import DataError
from visionattn.tasks.run import Run
from visionattn.tasks.segmentation import (
    SegmentationCases,
    SegmentationTask,
    find_image_mask_pairs,
    find_msd_cases,
    fixed_case_split,
    sliding_window_predict,
)
from visionattn.tasks.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
HIPPO = dict(kind="msd", spatial_dims=3, in_channels=1, labels=["background", "anterior", "posterior"],
             orientation="RAS", spacing=[1.0, 1.0, 1.0], intensity="zscore", roi_size=[48, 64, 48])


def small_msd_copy(shared_data: Path, dest: Path, n: int = 6) -> Path:
    src = shared_data / "msd_hippocampus"
    (dest / "imagesTr").mkdir(parents=True)
    (dest / "labelsTr").mkdir()
    for f in sorted((src / "imagesTr").iterdir())[:n]:
        shutil.copy(f, dest / "imagesTr" / f.name)
        shutil.copy(src / "labelsTr" / f.name, dest / "labelsTr" / f.name)
    return dest


def test_msd_discovery_and_its_errors(shared_data, tmp_path):
    cases = find_msd_cases(shared_data / "msd_hippocampus")
    assert len(cases) == 220 and cases[0]["case"] == "hippocampus_001"
    with pytest.raises(DataError, match="not found"):
        find_msd_cases(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="neither dataset.json nor an imagesTr"):
        find_msd_cases(tmp_path / "empty")
    root = small_msd_copy(shared_data, tmp_path / "msd", n=3)
    victim = sorted((root / "labelsTr").iterdir())[1]
    victim.unlink()
    with pytest.raises(DataError, match=victim.name):
        find_msd_cases(root)


def test_training_refuses_volumes_a_plain_loader_takes(shared_data, tmp_path):
    """A .nii.gz whose voxel bytes were damaged inside a stream that still decodes loads without a word through
    MONAI's LoadImage (nibabel stops at the last voxel, before the CRC), with wrong intensities; the training
    and validation loader reads each stream to its end, so the case is refused by name. A header claiming
    8.6 billion voxels is refused from the header alone (``data.max_voxels``)."""
    import gzip

    from monai.transforms import LoadImage

    root = small_msd_copy(shared_data, tmp_path / "msd", n=3)
    victim = sorted((root / "imagesTr").iterdir())[1]
    raw = gzip.decompress(victim.read_bytes())
    stored = gzip.compress(raw, compresslevel=0)  # stored blocks: the voxel bytes appear verbatim
    middle = raw[len(raw) // 2:len(raw) // 2 + 64]
    assert stored.count(middle) == 1
    victim.write_bytes(stored.replace(middle, bytes(b ^ 0x5A for b in middle)))
    naive = np.asarray(LoadImage(image_only=True)(str(victim)))  # no error
    original = np.asarray(nib.Nifti1Image.from_bytes(raw).dataobj)
    assert naive.shape == original.shape and not np.array_equal(naive, original)
    cases = find_msd_cases(root)
    with pytest.raises(DataError, match=rf"case {victim.name[:-7]}: cannot read {victim.name}.*corrupt or truncated"):
        SegmentationCases(cases, HIPPO, augment=False)

    shutil.copy(shared_data / "msd_hippocampus" / "imagesTr" / victim.name, victim)
    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 2048))
    header.set_data_dtype(np.uint8)
    bomb = root / "imagesTr" / sorted((root / "imagesTr").iterdir())[2].name
    bomb.write_bytes(gzip.compress(header.binaryblock + b"\x00" * 4 + b"\x00" * 1000))
    with pytest.raises(DataError, match=r"over the limit.*data.max_voxels"):
        SegmentationCases(find_msd_cases(root), HIPPO, augment=False)


def test_unreadable_case_and_out_of_range_labels_are_named(shared_data, tmp_path):
    root = small_msd_copy(shared_data, tmp_path / "msd", n=2)
    first, second = sorted((root / "imagesTr").iterdir())
    first.write_bytes(b"not a nifti")
    with pytest.raises(DataError, match=first.stem.split(".")[0]):
        SegmentationCases(find_msd_cases(root)[:1], HIPPO, augment=False)
    label = nib.load(str(root / "labelsTr" / second.name))
    data = np.asarray(label.dataobj).copy()
    data[0, 0, 0] = 7
    nib.save(nib.Nifti1Image(data, label.affine), str(root / "labelsTr" / second.name))
    with pytest.raises(DataError, match="label value 7"):
        SegmentationCases(find_msd_cases(root)[1:], HIPPO, augment=False)


def test_image_mask_pairing_and_mismatch(shared_data, tmp_path):
    drive = shared_data / "drive" / "training"
    pairs = find_image_mask_pairs(drive / "images", drive / "1st_manual")
    assert len(pairs) == 20 and pairs[0]["image"].name == "21_training.tif" and pairs[0]["label"].name == "21_manual1.gif"
    images, masks = tmp_path / "images", tmp_path / "masks"
    shutil.copytree(drive / "images", images)
    shutil.copytree(drive / "1st_manual", masks)
    (masks / "33_manual1.gif").unlink()
    with pytest.raises(DataError, match="33_training.tif has no mask"):
        find_image_mask_pairs(images, masks)


def test_fixed_split_is_deterministic_and_disjoint(shared_data):
    cases = find_msd_cases(shared_data / "msd_hippocampus")
    train, val = fixed_case_split(cases, 0.2, seed=0)
    again_train, again_val = fixed_case_split(list(reversed(cases)), 0.2, seed=0)
    assert [c["case"] for c in val] == [c["case"] for c in again_val]
    assert len(train) == 176 and len(val) == 44
    assert not {c["case"] for c in train} & {c["case"] for c in val}
    assert [c["case"] for c in fixed_case_split(cases, 0.2, seed=1)[1]] != [c["case"] for c in val]


def test_five_folds_validate_every_case_once_and_fold_0_is_the_fixed_split(shared_data):
    cases = find_msd_cases(shared_data / "msd_hippocampus")
    fixed_val = [c["case"] for c in fixed_case_split(cases, 0.2, seed=0)[1]]
    seen = []
    for fold in range(5):
        train, val = fixed_case_split(cases, 0.2, seed=0, folds=5, fold=fold)
        assert len(val) == 44 and len(train) == 176
        assert not {c["case"] for c in train} & {c["case"] for c in val}
        seen += [c["case"] for c in val]
    assert sorted(seen) == sorted(c["case"] for c in cases)  # each case validated exactly once
    assert [c["case"] for c in fixed_case_split(cases, 0.2, seed=0, folds=5, fold=0)[1]] == fixed_val
    uneven = [{"case": f"c{i:02d}"} for i in range(7)]
    assert sorted(len(fixed_case_split(uneven, 0.2, folds=3, fold=f)[1]) for f in range(3)) == [2, 2, 3]
    for folds, fold, message in ((5, 5, "data.fold must be an integer from 0 to 4"), (1, 0, "data.folds must be"),
                                 (5, None, "data.fold must be"), (None, 0, "data.folds must be")):
        with pytest.raises(ConfigError, match=message):
            fixed_case_split(cases, 0.2, folds=folds, fold=fold)


def test_2d_masks_keep_the_image_orientation(shared_data):
    from PIL import Image

    drive = shared_data / "drive" / "training"
    data = dict(kind="image_mask", spatial_dims=2, in_channels=3, labels=["background", "vessel"],
                label_values=[0, 255], intensity="zscore", roi_size=[64, 64])
    case = find_image_mask_pairs(drive / "images", drive / "1st_manual")[:1]
    image, label = SegmentationCases(case, data, augment=False)[0]
    want_mask = np.array(Image.open(case[0]["label"])) > 0
    want_red = np.array(Image.open(case[0]["image"]))[..., 0].astype(np.float64)
    assert label.shape == (1, *want_mask.shape)
    np.testing.assert_array_equal(label[0].numpy(), want_mask)
    red = image[0].double().numpy()
    np.testing.assert_allclose(red, (want_red - want_red.mean()) / want_red.std(), atol=1e-4)


def test_zoom_enlarges_the_grid_and_validation_scores_on_the_original_grid(shared_data):
    from monai.transforms import Compose
    from PIL import Image

    from visionattn.tasks.config import ConfigError
    from visionattn.tasks.segmentation import data_zoom, preprocessing

    drive = shared_data / "drive" / "training"
    data = dict(kind="image_mask", spatial_dims=2, in_channels=3, labels=["background", "vessel"],
                label_values=[0, 255], intensity="zscore", roi_size=[64, 64], zoom=2)
    case = find_image_mask_pairs(drive / "images", drive / "1st_manual")[:1]
    mask = np.array(Image.open(case[0]["label"])) > 0
    h, w = mask.shape
    # training: image and mask both zoomed, the mask by nearest neighbour (each pixel a 2x2 block)
    item = Compose(preprocessing(data))({"image": str(case[0]["image"]), "label": str(case[0]["label"])})
    assert item["image"].shape == (3, 2 * h, 2 * w) and item["label"].shape == (1, 2 * h, 2 * w)
    for dy in (0, 1):
        for dx in (0, 1):
            np.testing.assert_array_equal(np.asarray(item["label"][0, dy::2, dx::2]), mask)
    # validation: the image zoomed, the mask left on its grid, and Dice scored there: a network calling
    # every pixel vessel scores 2|mask| / (|mask| + h*w)
    image, label = SegmentationCases(case, data, augment=False)[0]
    assert image.shape == (3, 2 * h, 2 * w) and label.shape == (1, h, w)
    net = torch.nn.Conv2d(3, 2, 1).eval()
    with torch.no_grad():
        net.weight.zero_()
        net.bias.copy_(torch.tensor([0.0, 1.0]))
    task = SegmentationTask()
    task.inference = {"overlap": 0.25, "mode": "gaussian", "sw_batch_size": 4}
    got = task.evaluate(net, SegmentationCases(case, data, augment=False), 0, 1, "cpu", nullcontext, 4)
    assert got["dice_vessel"] == pytest.approx(2 * mask.sum() / (mask.sum() + h * w), abs=1e-6)
    assert data_zoom(dict(data, zoom=1)) is None and data_zoom(dict(data, zoom=[2, 3])) == [2.0, 3.0]
    with pytest.raises(ConfigError, match="data.zoom"):
        data_zoom(dict(data, zoom=[2]))
    with pytest.raises(ConfigError, match="data.zoom"):
        data_zoom(dict(data, zoom=0))


def test_green_channel_and_clahe_raise_vessel_contrast(shared_data):
    """``data.channels: [1]`` keeps the green channel and ``data.clahe`` equalises it as OpenCV's CLAHE does;
    on a real DRIVE image the vessels then stand out more from the background inside the field of view (the
    separation ``(mean background - mean vessel) / std`` grows), which is why retinal recipes use it."""
    import cv2
    from monai.transforms import Compose
    from PIL import Image

    from visionattn.tasks.segmentation import clahe_settings, equalize_adaptive, preprocessing

    drive = shared_data / "drive" / "training"
    case = find_image_mask_pairs(drive / "images", drive / "1st_manual")[0]
    data = dict(kind="image_mask", spatial_dims=2, in_channels=1, labels=["background", "vessel"],
                label_values=[0, 255], intensity="zscore", roi_size=[64, 64], channels=[1])
    items = {clahe: Compose(preprocessing(dict(data, clahe=clahe)))({"image": str(case["image"]),
                                                                     "label": str(case["label"])})
             for clahe in (False, True)}
    green = np.array(Image.open(case["image"]))[..., 1]
    want = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(green).astype(np.float64)
    got = items[True]["image"][0].double().numpy()
    assert got.shape == green.shape
    np.testing.assert_allclose(got, (want - want.mean()) / want.std(), atol=1e-4)
    plain = items[False]["image"][0].double().numpy()
    np.testing.assert_allclose(plain, (green - green.mean()) / green.std(), atol=1e-4)
    vessel = np.asarray(items[True]["label"][0]) > 0
    inside = green > 20  # the field of view (outside it the photograph is black)

    def separation(image):
        v, b = image[vessel & inside], image[~vessel & inside]
        return (b.mean() - v.mean()) / image[inside].std()

    assert separation(got) > separation(plain) + 0.2
    # 16-bit samples keep their range; non-integer samples are refused
    wide = torch.tensor(np.stack([green.astype(np.float32) * 200]))
    assert equalize_adaptive(wide).max() > 255
    with pytest.raises(DataError, match="8- or 16-bit"):
        equalize_adaptive(torch.full((1, 8, 8), 0.5))
    assert clahe_settings(dict(spatial_dims=2, clahe={"tiles": 4})) == {"clip_limit": 2.0, "tiles": 4}
    for bad, match in ((dict(spatial_dims=3, clahe=True), "2-D images only"),
                       (dict(spatial_dims=2, clahe={"tile": 8}), "keys"),
                       (dict(spatial_dims=2, clahe={"clip_limit": -1}), "clip_limit"),
                       (dict(spatial_dims=2, clahe={"tiles": 0}), "tiles")):
        with pytest.raises(ConfigError, match=match):
            clahe_settings(bad)
    for bad, match in ((dict(data, in_channels=3), "data.in_channels=1"), (dict(data, channels=[]), "channel indices"),
                       (dict(data, channels=["green"]), "channel indices")):
        with pytest.raises(ConfigError, match=match):
            preprocessing(bad)


def test_augmented_crops_are_seeded_per_sample(shared_data):
    data = dict(HIPPO, augment={"flip_axes": [0], "intensity": 0.1, "foreground_crop": True})
    cases = find_msd_cases(shared_data / "msd_hippocampus")[:2]
    from visionattn.tasks.data import SeededTransform

    ds = SeededTransform(SegmentationCases(cases, data, augment=True), seed=3)
    a, b = ds[1], ds[1]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert a[0].shape == (1, 48, 64, 48)
    ds.set_epoch(1)
    assert not torch.equal(ds[1][0], a[0])


def test_rotation_scaling_and_gamma_move_image_and_label_together():
    """``data.augment`` rotate/scale (nnU-Net's spatial augmentation) resample the image and its label with one
    transform: a bright box in the image still covers the label's box after it; gamma changes intensities only;
    unknown keys are refused."""
    from monai.transforms import Compose

    from visionattn.tasks.segmentation import augmentation

    label = torch.zeros(1, 24, 32, 24, dtype=torch.uint8)
    label[0, 6:18, 8:20, 6:14] = 1
    label[0, 10:14, 20:28, 8:16] = 2
    image = label.float() * 10
    data = dict(HIPPO, roi_size=[24, 32, 24])
    spatial = Compose(augmentation(dict(data, augment=dict(flip_axes=[], intensity=0, foreground_crop=False,
                                                           rotate=30, scale=0.2, spatial_prob=1.0))))
    changed = 0
    for seed in range(4):
        spatial.set_random_state(seed=seed)
        out = spatial({"image": image.clone(), "label": label.clone()})
        img, lab = out["image"].as_tensor(), out["label"].as_tensor()
        assert set(lab.unique().tolist()) <= {0, 1, 2}
        changed += int(not torch.equal(lab, label))
        bright, fg = img[0] > 5, lab[0] > 0
        iou = (bright & fg).sum() / (bright | fg).sum()
        assert iou > 0.8, (seed, float(iou))
    assert changed == 4
    gamma = Compose(augmentation(dict(data, augment=dict(flip_axes=[], intensity=0, foreground_crop=False,
                                                         gamma=[0.5, 0.6], gamma_prob=1.0))))
    gamma.set_random_state(seed=0)
    noisy = image + torch.linspace(0, 1, image.numel()).reshape(image.shape)
    out = gamma({"image": noisy.clone(), "label": label.clone()})
    assert torch.equal(out["label"].as_tensor(), label) and not torch.allclose(out["image"].as_tensor(), noisy)
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['rotation'\]"):
        augmentation(dict(data, augment={"rotation": 10}))
    with pytest.raises(ConfigError, match="rotate must be"):
        augmentation(dict(data, augment={"rotate": 10, "scale": 1.5}))


def test_deep_supervision_outputs_go_through_monai_deep_supervision_loss():
    from monai.losses import DeepSupervisionLoss, DiceCELoss

    task = SegmentationTask()
    net = visionattn.create_model("agunet_3d", in_channels=1, out_channels=3, filters=[4, 8, 16],
                                  deep_supervision=True).train()
    x = torch.randn(2, 1, 16, 16, 16)
    y = torch.randint(0, 3, (2, 1, 16, 16, 16))
    torch.manual_seed(0)
    loss = task.training_loss(net, x, y, None)
    torch.manual_seed(0)
    outs = net(x)
    assert isinstance(outs, list) and len(outs) == 2  # two decoder levels
    want = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True))(outs, y.float())
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())


def test_validation_dice_matches_monai_pipeline(shared_data):
    from monai.inferers import sliding_window_inference
    from monai.metrics import DiceMetric

    torch.manual_seed(0)
    net = visionattn.create_model("agunet_3d", in_channels=1, out_channels=3, filters=[4, 8, 16]).eval()
    cases = find_msd_cases(shared_data / "msd_hippocampus")[:3]
    ds = SegmentationCases(cases, HIPPO, augment=False)
    task = SegmentationTask()
    task.inference = {"overlap": 0.5, "mode": "gaussian", "sw_batch_size": 2}
    got = task.evaluate(net, ds, 0, 1, "cpu", nullcontext, 2)
    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True, num_classes=3)
    with torch.no_grad():
        for image, label in ds:
            logits = sliding_window_inference(image[None], [48, 64, 48], 2, net, overlap=0.5, mode="gaussian")
            metric(logits.argmax(1, keepdim=True), label[None].long())
    want = metric.aggregate()
    assert got["dice_anterior"] == pytest.approx(float(want[0]), abs=1e-5)
    assert got["dice_posterior"] == pytest.approx(float(want[1]), abs=1e-5)
    assert got["dice"] == pytest.approx(float(want.mean()), abs=1e-5)


def _brute_force_nsd(pred: np.ndarray, truth: np.ndarray, tolerance: float, spacing) -> float:
    """Surface Dice from its definition: boundary voxels (the mask minus its 6-connected erosion) of each mask
    within ``tolerance`` (Euclidean, in ``spacing`` units) of the other mask's boundary, over both boundaries."""
    from scipy import ndimage

    def boundary(m):
        return m & ~ndimage.binary_erosion(m)

    bp, bt = boundary(pred), boundary(truth)
    if not bp.any() and not bt.any():
        return float("nan")
    if not bp.any() or not bt.any():
        return 0.0
    to_t = ndimage.distance_transform_edt(~bt, sampling=spacing)
    to_p = ndimage.distance_transform_edt(~bp, sampling=spacing)
    return float(((to_t[bp] <= tolerance).sum() + (to_p[bt] <= tolerance).sum()) / (bp.sum() + bt.sum()))


class _ReadsLabelFromImage(torch.nn.Module):
    """A "network" whose image holds a label map (3 labels): its logits are that map's one-hot."""

    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), 3).movedim(-1, 1).float() * 10


@pytest.mark.parametrize("tolerance", [1.0, 2.0])
def test_validation_surface_dice_matches_its_definition(tolerance):
    """NSD in the validation metrics against a brute-force surface Dice, for a prediction that is the label
    shifted by one voxel along one axis and two along another (anisotropic spacing)."""
    truth = torch.zeros(1, 20, 24, 18, dtype=torch.uint8)
    truth[0, 4:12, 5:15, 4:12] = 1
    truth[0, 12:16, 8:20, 6:14] = 2
    pred = torch.roll(truth, shifts=(1, 2), dims=(1, 2))

    class Cases(torch.utils.data.Dataset):
        data_cfg = dict(HIPPO, roi_size=[16, 16, 16], spacing=[1.0, 0.7, 1.5])

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return pred.float(), truth

    task = SegmentationTask()
    task.inference = {"overlap": 0.5, "mode": "constant", "sw_batch_size": 2, "nsd_tolerance": tolerance}
    got = task.evaluate(_ReadsLabelFromImage(), Cases(), 0, 1, "cpu", nullcontext, 2)
    spacing = (1.0, 0.7, 1.5)
    want = [_brute_force_nsd((pred[0] == c).numpy(), (truth[0] == c).numpy(), tolerance, spacing) for c in (1, 2)]
    assert all(0 < w <= 1 for w in want) and (tolerance > 1 or max(want) < 1)
    assert got["nsd_anterior"] == pytest.approx(want[0], abs=1e-6)
    assert got["nsd_posterior"] == pytest.approx(want[1], abs=1e-6)
    assert got["nsd"] == pytest.approx(sum(want) / 2, abs=1e-6)
    assert got["dice"] < 1


def test_pooled_dice_counts_the_voxels_of_all_cases_together():
    """``dice_pooled_LABEL``: 2 TP / (|pred| + |truth|) with the counts summed over cases. A small case predicted
    badly and a large one predicted well: the pooled figure is near the large case's, the mean of the cases'
    Dice is not; both against counts taken here with numpy."""
    big_truth = torch.zeros(1, 20, 24, 18, dtype=torch.uint8)
    big_truth[0, 2:18, 2:22, 2:16] = 1
    big_truth[0, 8:12, 8:12, 8:12] = 2
    big_pred = big_truth.clone()
    big_pred[0, 2:4] = 0  # two slices of label 1 missed
    small_truth = torch.zeros(1, 16, 16, 16, dtype=torch.uint8)
    small_truth[0, 4:8, 4:8, 4:8] = 1
    small_truth[0, 10:12, 10:12, 10:12] = 2
    small_pred = torch.roll(small_truth, shifts=(2, 1), dims=(1, 2))  # half of label 1 overlaps, label 2: 1/4
    cases = [(big_pred, big_truth), (small_pred, small_truth)]

    class Cases(torch.utils.data.Dataset):
        data_cfg = dict(HIPPO, roi_size=[16, 16, 16])

        def __len__(self):
            return len(cases)

        def __getitem__(self, i):
            return cases[i][0].float(), cases[i][1]

    task = SegmentationTask()
    task.inference = {"overlap": 0.5, "mode": "constant", "sw_batch_size": 2}
    got = task.evaluate(_ReadsLabelFromImage(), Cases(), 0, 1, "cpu", nullcontext, 2)
    for c, name in ((1, "anterior"), (2, "posterior")):
        preds = [(p[0] == c).numpy() for p, _ in cases]
        truths = [(t[0] == c).numpy() for _, t in cases]
        tp = sum(int((p & t).sum()) for p, t in zip(preds, truths))
        size = sum(int(p.sum() + t.sum()) for p, t in zip(preds, truths))
        per_case = [2 * (p & t).sum() / (p.sum() + t.sum()) for p, t in zip(preds, truths)]
        assert got[f"dice_pooled_{name}"] == pytest.approx(2 * tp / size, abs=1e-9)
        assert got[f"dice_{name}"] == pytest.approx(float(np.mean(per_case)), abs=1e-6)
        assert got[f"dice_pooled_{name}"] > got[f"dice_{name}"] + 0.1  # the large, good case weighs more
    assert got["dice_pooled"] == pytest.approx((got["dice_pooled_anterior"] + got["dice_pooled_posterior"]) / 2)


def test_mirroring_tta_is_exact_for_a_mirror_symmetric_network():
    net = torch.nn.Conv3d(1, 3, 1).eval()
    x = torch.randn(1, 1, 20, 24, 18)
    plain = sliding_window_predict(net, x, [16, 16, 16], 0.25, "constant", 2)
    tta = sliding_window_predict(net, x, [16, 16, 16], 0.25, "constant", 2, tta=True)
    torch.testing.assert_close(plain, tta, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(plain, net(x).softmax(1), rtol=1e-5, atol=1e-6)
    # no autograd graph is kept across windows (it held every window's activations: 9 GB on a 256x256x150 case)
    assert not sliding_window_predict(net, x, [16, 16, 16], 0.25, "constant", 2).requires_grad


def test_hippocampus_recipe_trains_evaluates_and_segments(shared_data, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "run"
    args = ["train", "configs/segmentation/hippocampus_agunet.yaml", f"output_dir={out}", "train.max_steps=2",
            "train.max_minutes=null", "train.schedule_by_time=false", "train.batch_size=2", "data.max_train_cases=4",
            "model.kwargs.filters=[4,8,16]", "data.val_fraction=0.02"]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["best"]["dice"] <= 1
    for name in ("model.safetensors", "best.safetensors", "last.pt", "config.yaml", "metrics.csv"):
        assert (out / name).is_file(), name
    capsys.readouterr()
    assert main(["evaluate", "configs/segmentation/hippocampus_agunet.yaml", "--checkpoint", str(out / "last.pt"),
                 f"output_dir={tmp_path / 'eval'}", "model.kwargs.filters=[4,8,16]", "data.val_fraction=0.02",
                 "data.max_train_cases=4"]) == 0
    means = json.loads(capsys.readouterr().out)
    assert "dice_posterior" in means and "per_case" not in means
    # --per-case: each validation case's row, whose means are the metrics printed beside them
    assert main(["evaluate", str(out), "--per-case"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["per_case"]
    cfg = dict(Run.load(out).config, train={"epochs": 0})
    assert [r["case"] for r in rows] == Trainer(cfg, write_outputs=False).meta["val_cases"]
    for name in ("dice_anterior", "dice_posterior", "nsd_anterior", "nsd_posterior"):
        values = [r[name] for r in rows if not math.isnan(r[name])]
        assert report[name] == pytest.approx(sum(values) / len(values), rel=1e-6)
        assert report[name] == pytest.approx(means[name], rel=1e-6)  # the run folder holds the same weights
    # the run folder is a model for `segment`; the recipe's validation cases have reference labels
    val_case = "hippocampus_015"
    images = shared_data / "msd_hippocampus" / "imagesTr"
    seg_out = tmp_path / "seg"
    assert main(["segment", "-i", str(images / f"{val_case}.nii.gz"), "-o", str(seg_out), "--model", str(out),
                 "--labels", str(shared_data / "msd_hippocampus" / "labelsTr"), "--no-progress"]) == 0
    entry = json.loads((seg_out / "summary.json").read_text())["cases"][0]
    assert set(entry["dice"]) == {"anterior", "posterior"}


def test_drive_recipe_trains_two_steps(shared_data, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    out = tmp_path / "drive"
    assert main(["train", "configs/segmentation/drive_emcad.yaml", f"output_dir={out}", "train.max_steps=1",
                 "train.max_minutes=null", "train.schedule_by_time=false", "train.batch_size=2",
                 "data.roi_size=[128,128]", "data.max_train_cases=2"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 1 and "dice_vessel" in summary["best"]
    model = visionattn.create_model("emcad_pvt_v2_b0", in_channels=3, out_channels=2)
    visionattn.load_checkpoint(model, str(out / "model.safetensors"))  # shared tensors load strictly



def test_drive_monai_unet_baseline_recipe_trains_one_step(shared_data, tmp_path, monkeypatch):
    """The DRIVE baseline recipe: the EMCAD recipe's data and training with MONAI's UNet in place of the model,
    at full resolution (data.zoom 1), its weights a MONAI UNet's."""
    from monai.networks.nets import UNet

    monkeypatch.chdir(REPO)
    out = tmp_path / "drive_unet"
    assert main(["train", "configs/segmentation/drive_monai_unet.yaml", f"output_dir={out}", "train.max_steps=1",
                 "train.max_minutes=null", "train.schedule_by_time=false", "train.batch_size=2",
                 "data.roi_size=[128,128]", "data.max_train_cases=2"]) == 0
    config = Run.load(out).config
    assert config["data"]["zoom"] == 1 and config["data"]["labels"] == ["background", "vessel"]
    assert "dice_pooled_vessel" in json.loads((out / "summary.json").read_text())["best"]
    unet = UNet(spatial_dims=2, in_channels=3, out_channels=2, channels=[32, 64, 128, 256], strides=[2, 2, 2],
                num_res_units=2)
    visionattn.load_checkpoint(unet, str(out / "model.safetensors"))

DDP_PER_CASE = """
import json, sys
import torch
import torch.distributed as dist
from visionattn.tasks.runtime import dist_setup, leave
from visionattn.tasks.segmentation import SegmentationTask

class ReadsLabelFromImage(torch.nn.Module):  # the image holds the prediction's label map
    def forward(self, x):
        return torch.nn.functional.one_hot(x[:, 0].round().long(), 2).movedim(-1, 1).float() * 10

class Cases(torch.utils.data.Dataset):  # case k: a 4x(4+k) square predicted one pixel off
    data_cfg = dict(spatial_dims=2, labels=["background", "vessel"], roi_size=[16, 16])
    cases = [dict(case=f"case_{{k}}") for k in range(5)]
    def __len__(self):
        return 5
    def __getitem__(self, k):
        truth = torch.zeros(1, 20, 20, dtype=torch.uint8)
        truth[0, 4:8, 4:8 + k] = 1
        return torch.roll(truth, 1, dims=2).float(), truth

def evaluate(rank, world):
    rows = []
    task = SegmentationTask()
    task.inference = dict(overlap=0.5, mode="constant", sw_batch_size=2)
    metrics = task.evaluate(ReadsLabelFromImage(), Cases(), rank, world, "cpu", None, 2, per_case=rows)
    return metrics, rows

dist_setup("cpu")  # the trainer's set-up: gloo; leave() below tears the group down as the command does
both = evaluate(dist.get_rank(), dist.get_world_size())
alone = evaluate(0, 1)
ok = (both[1] == alone[1] and [r["case"] for r in both[1]] == [f"case_{{k}}" for k in range(5)]
      and all(abs(both[0][name] - alone[0][name]) < 1e-9 for name in alone[0]))  # sums in another order
open(f"{out}/rank{{dist.get_rank()}}.txt", "w").write(json.dumps([ok, both[1]]))
leave(0)  # as the visionattn command ends a torchrun process (runtime.leave)
"""


def test_per_case_rows_are_gathered_across_two_processes(tmp_path):
    """Under torchrun each process validates every other case: the per-case rows are every case's, in order, on
    each process, the same as one process's."""
    import os
    import subprocess
    import sys

    script = tmp_path / "ddp_per_case.py"
    script.write_text(DDP_PER_CASE.format(out=str(tmp_path)))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for rank in (0, 1):
        ok, rows = json.loads((tmp_path / f"rank{rank}.txt").read_text())
        assert ok, rows
        # Dice of a 4 x w square shifted by one pixel along w: 2 (w - 1) / 2w
        assert [row["dice_vessel"] for row in rows] == pytest.approx([(w - 1) / w for w in range(4, 9)])
