"""Semantic segmentation (2-D and 3-D) for the trainer, and the sliding-window inference ``segment`` shares.

Data come in two layouts:
- ``kind: msd``: a Medical Segmentation Decathlon folder (``dataset.json`` listing ``training`` pairs, or
  ``imagesTr/`` + ``labelsTr/`` with the same file names), NIfTI volumes;
- ``kind: image_mask``: 2-D images and masks in two folders, paired by the part of the file name before
  the first ``_`` (DRIVE: ``21_training.tif`` and ``21_manual1.gif``).

Preprocessing is MONAI dictionary transforms, described by the recipe's ``data`` section so that the same
steps run at training, validation and ``visionattn segment`` time (the run folder's ``config.yaml`` keeps
them): orientation, voxel spacing, intensity normalisation. The deterministic part runs once per case and
is cached in memory; augmentation (pad, random crop, flips, intensity jitter) runs per sample, seeded per
``(seed, epoch, index)`` through :class:`~visionattn.tasks.data.SeededTransform`.

Validation runs whole cases through :func:`sliding_window_predict` and reports Dice per foreground label
(MONAI's ``DiceMetric``) and their mean, ``dice``, the metric the trainer tracks.
"""
from __future__ import annotations

import json
import math
import warnings
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import IMAGE_SUFFIXES, DataError, SeededTransform
from visionattn.tasks.errors import SegmentError
from visionattn.tasks.imageio import image_size, pixel_limit
from visionattn.tasks.niftiio import DEFAULT_MAX_VOXELS, check_header, verify_gzip_stream
from visionattn.tasks.runtime import all_gather_lists, all_reduce_sum, build_model_from_recipe

NIFTI_SUFFIXES = (".nii", ".nii.gz")
INTENSITY_MODES = ("zscore", "zscore_nonzero", "scale01", "none")


def _strip_nifti(name: str) -> str:
    return name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else name


# ---------------------------------------------------------------------------------------------------
# finding cases


def find_msd_cases(root: str | Path) -> list[dict]:
    """``[{case, image, label}]`` of an MSD-style folder, sorted by case name; every file checked to exist."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data set folder not found: {root}")
    listing = root / "dataset.json"
    if listing.is_file():
        try:
            pairs = json.loads(listing.read_text())["training"]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{listing}: expected JSON with a 'training' list of {{image, label}} pairs ({e})") from e
        cases = [{"image": root / p["image"], "label": root / p["label"]} for p in pairs]
    else:
        images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
        if not images_dir.is_dir():
            raise DataError(f"{root} has neither dataset.json nor an imagesTr/ folder (MSD layout expected)")
        images = sorted(p for p in images_dir.iterdir() if p.name.endswith(NIFTI_SUFFIXES) and not p.name.startswith("."))
        cases = [{"image": p, "label": labels_dir / p.name} for p in images]
    if not cases:
        raise DataError(f"{root}: no training cases found")
    for c in cases:
        for key in ("image", "label"):
            if not c[key].is_file():
                raise DataError(f"{c[key]}: {key} file missing (listed for case {_strip_nifti(c['image'].name)})")
        c["case"] = _strip_nifti(c["image"].name)
    return sorted(cases, key=lambda c: c["case"])


def find_image_mask_pairs(images_dir: str | Path, masks_dir: str | Path) -> list[dict]:
    """``[{case, image, label}]`` pairing files by the name part before the first ``_``."""
    images_dir, masks_dir = Path(images_dir), Path(masks_dir)
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"folder not found: {d}")

    def by_key(folder: Path) -> dict[str, Path]:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | {".gif"})
        out: dict[str, Path] = {}
        for p in files:
            key = p.stem.split("_")[0]
            if key in out:
                raise DataError(f"{p} and {out[key]} share the case key {key!r} (the name part before the first '_')")
            out[key] = p
        return out

    images, masks = by_key(images_dir), by_key(masks_dir)
    if not images:
        raise DataError(f"{images_dir} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    unmatched = sorted(set(images) ^ set(masks))
    if unmatched:
        k = unmatched[0]
        where = f"image {images[k]} has no mask in {masks_dir}" if k in images else f"mask {masks[k]} has no image in {images_dir}"
        raise DataError(f"image/mask mismatch: {where} ({len(unmatched)} unpaired)")
    return [{"case": k, "image": images[k], "label": masks[k]} for k in sorted(images)]


def fixed_case_split(cases: Sequence[dict], val_fraction: float, seed: int = 0, folds: int | None = None,
                     fold: int | None = None) -> tuple[list[dict], list[dict]]:
    """A split that depends only on the case names and ``seed``: the cases sorted by name, shuffled by a
    generator seeded with ``seed``, the first ``round(val_fraction * n)`` (at least 1) for validation.

    Cross-validation (``folds`` = F, ``fold`` = f in ``0..F-1``, replacing ``val_fraction``): the shuffled
    cases are cut into F consecutive parts of sizes differing by at most one and part f validates, so the F
    folds validate every case exactly once (nnU-Net's 5-fold scheme). With n divisible by F, fold 0 is the
    ``val_fraction = 1/F`` split."""
    ordered = sorted(cases, key=lambda c: c["case"])
    order = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed)).tolist()
    if folds is not None or fold is not None:
        if not isinstance(folds, int) or isinstance(folds, bool) or not 2 <= folds <= len(ordered):
            raise ConfigError(f"data.folds must be an integer from 2 to the number of cases ({len(ordered)}), "
                              f"got {folds!r}")
        if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < folds:
            raise ConfigError(f"data.fold must be an integer from 0 to {folds - 1} (with data.folds={folds}), "
                              f"got {fold!r}")
        bounds = [round(i * len(ordered) / folds) for i in range(folds + 1)]
        held = set(order[bounds[fold]:bounds[fold + 1]])
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"data.val_fraction must be between 0 and 1, got {val_fraction}")
        n_val = max(1, round(val_fraction * len(ordered)))
        if n_val >= len(ordered):
            raise ConfigError(f"val_fraction={val_fraction} leaves no training cases out of {len(ordered)}")
        held = set(order[:n_val])
    val = [c for i, c in enumerate(ordered) if i in held]
    train = [c for i, c in enumerate(ordered) if i not in held]
    return train, val


# ---------------------------------------------------------------------------------------------------
# transforms


def preprocessing(data: dict, keys: Sequence[str] = ("image", "label"), load: bool = True,
                  zoom_label: bool = True) -> list:
    """The deterministic MONAI dictionary transforms from a recipe's ``data`` section.

    ``keys`` are ``("image",)`` at inference and ``("image", "label")`` in training. Images come out as
    float32 ``[C, *spatial]``; labels as ``[1, *spatial]`` with values ``0 .. K-1`` (``data.label_values``
    maps raw mask values, e.g. DRIVE's 0/255, to classes). 2-D files are first checked from their header
    (:func:`visionattn.tasks.imageio.image_size`: a supported format, at most ``data.max_image_pixels``
    pixels), so a decompression bomb is refused before it is decoded. ``load=False`` leaves out the reading:
    the items then hold channel-first MONAI ``MetaTensor``s with their affine (``segment`` reads each volume
    once, itself).
    """
    from monai import transforms as T

    spatial_dims = int(data.get("spatial_dims", 3))
    keys = list(keys)
    # PIL reads the 2-D formats (MONAI's PIL reader does not claim .tif/.gif unless asked); nibabel the NIfTIs
    reader = "PILReader" if spatial_dims == 2 else "NibabelReader"
    ops: list = []
    if load and spatial_dims == 2:
        # MONAI decodes the file itself (keeping 16-bit and palette-index samples as they are, which
        # intensity normalisation and data.label_values rely on), so only the header is checked here
        max_pixels = pixel_limit(data.get("max_image_pixels"))
        ops.append(T.Lambdad(keys=keys, func=partial(_checked_2d_file, max_pixels=max_pixels)))
    if load:
        ops.append(T.LoadImaged(keys=keys, image_only=True, ensure_channel_first=True, reader=reader))
    if load and spatial_dims == 2:
        # PIL images load as [C, W, H]; put them in [C, H, W] like every other 2-D tensor here
        ops.append(T.Transposed(keys=keys, indices=(0, 2, 1)))
        if data.get("grayscale", False):
            ops.append(T.Lambdad(keys="image", func=lambda x: x.mean(0, keepdim=True)))
        channels = image_channels(data)
        if channels is not None:
            ops.append(T.Lambdad(keys="image", func=lambda x: x[channels]))
        clahe = clahe_settings(data)
        if clahe is not None:
            ops.append(T.Lambdad(keys="image", func=partial(equalize_adaptive, **clahe)))
    if spatial_dims == 3 and data.get("orientation"):
        ops.append(T.Orientationd(keys=keys, axcodes=data["orientation"], labels=(("L", "R"), ("P", "A"), ("I", "S"))))
    if spatial_dims == 3 and data.get("spacing"):
        modes = ["bilinear" if k == "image" else "nearest" for k in keys]
        ops.append(T.Spacingd(keys=keys, pixdim=data["spacing"], mode=modes))
    zoom = data_zoom(data)
    if zoom is not None:
        # data.zoom enlarges the grid the network sees (e.g. 2 for thin structures and a stride-4 prediction),
        # after any resampling to data.spacing: images (bi/trilinear), and labels (nearest) unless
        # ``zoom_label=False``, which validation uses to score on the original grid; MONAI's Zoomd is
        # inverted by ``segment``'s Invertd
        zoomed = [k for k in keys if k == "image" or zoom_label]
        modes = [("bilinear" if spatial_dims == 2 else "trilinear") if k == "image" else "nearest" for k in zoomed]
        ops.append(T.Zoomd(keys=zoomed, zoom=zoom, mode=modes, keep_size=False))
    ops.append(T.EnsureTyped(keys="image", dtype=torch.float32, track_meta=True))
    intensity = data.get("intensity", "zscore")
    if intensity not in INTENSITY_MODES:
        raise ConfigError(f"data.intensity must be one of {list(INTENSITY_MODES)}, got {intensity!r}")
    if intensity in ("zscore", "zscore_nonzero"):
        ops.append(T.NormalizeIntensityd(keys="image", nonzero=intensity == "zscore_nonzero", channel_wise=True))
    elif intensity == "scale01":
        ops.append(T.ScaleIntensityd(keys="image", minv=0.0, maxv=1.0, channel_wise=True))
    if "label" in keys:
        values = data.get("label_values")
        if values:
            ops.append(T.MapLabelValued(keys="label", orig_labels=list(values), target_labels=list(range(len(values)))))
        ops.append(T.EnsureTyped(keys="label", dtype=torch.uint8, track_meta=False))
    return ops


def data_zoom(data: dict) -> list[float] | None:
    """``data.zoom`` (one factor, or one per spatial axis) as a list, or ``None`` where it is absent or 1."""
    value = data.get("zoom")
    if value is None:
        return None
    spatial_dims = int(data.get("spatial_dims", 3))
    factors = [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)] * spatial_dims
    if len(factors) != spatial_dims or not all(f > 0 for f in factors):
        raise ConfigError(f"data.zoom must be a positive number or {spatial_dims} of them, got {value!r}")
    return None if all(f == 1 for f in factors) else factors


def image_channels(data: dict) -> list[int] | None:
    """``data.channels``: the image channels kept, in order (2-D images; e.g. ``[1]``, the green channel of an RGB
    fundus photograph, where retinal vessels have the most contrast), or ``None`` (all)."""
    value = data.get("channels")
    if value is None:
        return None
    if (not isinstance(value, (list, tuple)) or not value
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in value)):
        raise ConfigError(f"data.channels must be a non-empty list of channel indices (e.g. [1]), got {value!r}")
    if int(data.get("in_channels", len(value))) != len(value):
        raise ConfigError(f"data.channels keeps {len(value)} channel(s) but data.in_channels is "
                          f"{data.get('in_channels')}: set data.in_channels={len(value)}")
    return list(value)


CLAHE_KEYS = ("clip_limit", "tiles")


def clahe_settings(data: dict) -> dict | None:
    """``data.clahe``: contrast-limited adaptive histogram equalisation of each channel of a 2-D image, before
    intensity normalisation, as :func:`equalize_adaptive` takes it; ``true`` for OpenCV's usual
    ``{clip_limit: 2.0, tiles: 8}``, or those keys; ``None`` when absent or false."""
    value = data.get("clahe")
    if value is None or value is False:
        return None
    if int(data.get("spatial_dims", 3)) != 2:
        raise ConfigError("data.clahe applies to 2-D images only (data.spatial_dims: 2)")
    given = {} if value is True else value
    if not isinstance(given, dict) or set(given) - set(CLAHE_KEYS):
        raise ConfigError(f"data.clahe must be true or a mapping with keys {list(CLAHE_KEYS)}, got {value!r}")
    settings = {"clip_limit": 2.0, "tiles": 8, **given}
    clip, tiles = settings["clip_limit"], settings["tiles"]
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0 < clip <= 1000:
        raise ConfigError(f"data.clahe.clip_limit must be a number in (0, 1000], got {clip!r}")
    if isinstance(tiles, bool) or not isinstance(tiles, int) or not 1 <= tiles <= 64:
        raise ConfigError(f"data.clahe.tiles (tiles per side) must be an integer from 1 to 64, got {tiles!r}")
    return {"clip_limit": float(clip), "tiles": tiles}


def equalize_adaptive(image: torch.Tensor, clip_limit: float = 2.0, tiles: int = 8) -> torch.Tensor:
    """OpenCV's CLAHE on each channel of ``image [C, H, W]`` (integer samples 0-255 or 0-65535, as 8- and
    16-bit images load), on a ``tiles x tiles`` grid; returns float32 ``[C, H, W]`` on the same scale, the
    MetaTensor's metadata kept."""
    import cv2

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3:
        raise DataError(f"data.clahe needs [C, H, W] images, got shape {array.shape}")
    if not np.isfinite(array).all() or array.min() < 0 or array.max() > 65535 or not (array == np.round(array)).all():
        raise DataError("data.clahe needs 8- or 16-bit images (integer samples 0-65535); this one has other values")
    samples = array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    equalizer = cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(tiles, tiles))
    out = np.stack([equalizer.apply(np.ascontiguousarray(channel)) for channel in samples]).astype(np.float32)
    result = torch.from_numpy(out)
    if hasattr(image, "meta"):  # a MONAI MetaTensor: keep its affine and history
        from monai.data import MetaTensor

        result = MetaTensor(result, meta=image.meta, applied_operations=image.applied_operations)
    return result


def _checked_2d_file(path: str, max_pixels: int) -> str:
    """``path`` unchanged once its image header passes :func:`~visionattn.tasks.imageio.image_size`."""
    image_size(path, max_pixels)
    return path


AUGMENT_KEYS = ("flip_axes", "intensity", "rotate90", "foreground_crop", "pos", "neg", "rotate", "scale",
                "spatial_prob", "gamma", "gamma_prob")


def augment_settings(data: dict) -> dict:
    """``data.augment`` checked and completed with the defaults, as :func:`augmentation` applies it (and the
    MONAI bundle export writes it): unknown keys, rotation, scale and gamma ranges are refused here."""
    given = data.get("augment") or {}
    unknown = sorted(set(given) - set(AUGMENT_KEYS))
    if unknown:
        raise ConfigError(f"data.augment: unknown key(s) {unknown}; known: {list(AUGMENT_KEYS)}")
    aug = {"flip_axes": list(range(len(data["roi_size"]))), "intensity": 0.1, "rotate90": False, "rotate": 0.0,
           "scale": 0.0, "spatial_prob": 0.2, "gamma": None, "gamma_prob": 0.3, **given}
    rotate, scale = float(aug["rotate"]), float(aug["scale"])
    if not (0 <= rotate <= 180 and 0 <= scale < 1):
        raise ConfigError(f"data.augment: rotate must be 0-180 degrees and scale 0-1, got {rotate}, {scale}")
    if aug["gamma"]:
        low, high = (float(g) for g in aug["gamma"])
        if not 0 < low <= high:
            raise ConfigError(f"data.augment.gamma must be [low, high] with 0 < low <= high, got {aug['gamma']}")
    return aug


def augmentation(data: dict) -> list:
    """Per-sample random transforms: pad to ``roi_size``, random crop, rotation and scaling, flips, gamma,
    intensity jitter.

    ``data.augment`` keys: ``flip_axes`` (axes mirrored with p 0.5), ``rotate`` (degrees, about every axis),
    ``scale`` (relative, e.g. 0.15 for 0.85-1.15) applied together with probability ``spatial_prob`` (nnU-Net's
    0.2) on the crop (image bilinear, label nearest, zeros outside), ``gamma`` (e.g. [0.7, 1.5], with
    probability ``gamma_prob``), ``intensity`` (scale and shift jitter), ``rotate90``, ``foreground_crop``.
    """
    from monai import transforms as T

    roi = list(data["roi_size"])
    aug = augment_settings(data)
    keys = ["image", "label"]
    ops: list = [
        T.SpatialPadd(keys=keys, spatial_size=roi),
        T.RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=roi, pos=float(aug.get("pos", 1.0)),
                                 neg=float(aug.get("neg", 1.0)), num_samples=1)
        if aug.get("foreground_crop", True) else T.RandSpatialCropd(keys=keys, roi_size=roi, random_size=False),
    ]
    rotate, scale = float(aug["rotate"]), float(aug["scale"])
    if rotate or scale:
        angle = math.radians(rotate)
        ops.append(T.RandAffined(keys=keys, prob=float(aug["spatial_prob"]), mode=("bilinear", "nearest"),
                                 rotate_range=[angle] * (1 if len(roi) == 2 else 3), scale_range=[scale] * len(roi),
                                 padding_mode="zeros"))
    for axis in aug["flip_axes"]:
        ops.append(T.RandFlipd(keys=keys, prob=0.5, spatial_axis=axis))
    if aug["gamma"]:
        low, high = (float(g) for g in aug["gamma"])
        ops.append(T.RandAdjustContrastd(keys="image", prob=float(aug["gamma_prob"]), gamma=(low, high)))
    if aug["rotate90"]:
        ops.append(T.RandRotate90d(keys=keys, prob=0.5, spatial_axes=(0, 1)))
    if aug["intensity"]:
        ops += [T.RandScaleIntensityd(keys="image", factors=aug["intensity"], prob=0.5),
                T.RandShiftIntensityd(keys="image", offsets=aug["intensity"], prob=0.5)]
    return ops


def root_cause(error: BaseException) -> str:
    """The innermost error's message (MONAI wraps a reader's error in 'applying transform ...')."""
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def _plain(x) -> torch.Tensor:
    """A MONAI ``MetaTensor`` as a plain tensor (batches of plain tensors are cheaper to move around)."""
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def check_volume_files(case: dict, max_voxels: int = DEFAULT_MAX_VOXELS) -> None:
    """The checks ``segment`` makes on a NIfTI file, for a training or validation case's image and label:
    from the header alone, the voxel count (``data.max_voxels``), the header extensions and the intensity
    scaling; then a ``.gz`` file's whole stream, so that its CRC is checked (nibabel stops at the last voxel
    and would take a damaged stream that still decodes, giving wrong voxels and labels). 2-D images are
    checked by their own reader (:func:`_checked_2d_file`)."""
    for key in ("image", "label"):
        path = Path(case[key])
        if not path.name.endswith(NIFTI_SUFFIXES):
            continue
        try:
            check_header(path, max_voxels)
            verify_gzip_stream(path)
        except SegmentError as e:
            hint = "; data.max_voxels in the recipe sets the limit" if "max-voxels" in str(e) else ""
            raise DataError(f"case {case['case']}: {e}{hint}") from None


class SegmentationCases(Dataset):
    """Preprocessed cases held in memory; ``__getitem__`` returns ``(image [C, *S], label [1, *S] uint8)``.

    With ``augment=True`` each item is a random ``roi_size`` crop of its case (augmented); otherwise the
    whole case. Loading errors name the file.
    """

    def __init__(self, cases: Sequence[dict], data: dict, augment: bool):
        from monai.transforms import Compose

        self.cases, self.data_cfg = list(cases), data
        # validation keeps its labels on the original grid (data.zoom): Dice is scored there
        pre = Compose(preprocessing(data, zoom_label=augment))
        zoom = data_zoom(data)
        self.items = []
        max_voxels = int(data.get("max_voxels", DEFAULT_MAX_VOXELS))
        for c in self.cases:
            check_volume_files(c, max_voxels)
            try:
                item = pre({"image": str(c["image"]), "label": str(c["label"])})
            except Exception as e:
                raise DataError(f"case {c['case']}: cannot load {c['image']} / {c['label']}: {root_cause(e)}") from e
            image, label = item["image"], item["label"]
            expected = tuple(label.shape[1:]) if zoom is None or augment else \
                tuple(int(math.floor(float(n) * z)) for n, z in zip(label.shape[1:], zoom))  # as MONAI sizes it
            if tuple(image.shape[1:]) != expected:
                raise DataError(f"case {c['case']}: image {tuple(image.shape[1:])} and label "
                                f"{tuple(label.shape[1:])} differ in size ({c['image']}, {c['label']})")
            top = int(label.max())
            if top >= len(data["labels"]):
                raise DataError(f"case {c['case']}: label value {top} in {c['label']} but data.labels names "
                                f"{len(data['labels'])} classes")
            self.items.append({"image": _plain(image), "label": _plain(label)})
        self.augment = Compose(augmentation(data)) if augment else None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if self.augment is None:
            return item["image"], item["label"]
        # MONAI's random transforms keep their own generator; seed it from numpy's, which SeededTransform sets
        self.augment.set_random_state(seed=int(np.random.randint(0, 2**31 - 1)))
        out = self.augment(dict(item))
        out = out[0] if isinstance(out, list) else out
        return _plain(out["image"]).float(), _plain(out["label"]).to(torch.uint8)


# ---------------------------------------------------------------------------------------------------
# inference


def mirror_axes(data: dict) -> list[int]:
    """The spatial axes (0-based, of the preprocessed image) a model trained by this recipe's ``data`` section
    is invariant to: the axes it was flipped along in training (``data.augment.flip_axes``; every axis when
    the recipe leaves the default). Test-time mirroring uses only these: mirroring a hippocampus model
    along the anterior-posterior axis swaps the meaning of its two labels (nnU-Net keeps the same
    ``allowed_mirroring_axes``)."""
    spatial_dims = int(data.get("spatial_dims", 3))
    augment = data.get("augment")
    if augment is None or "flip_axes" not in augment:
        return list(range(spatial_dims))
    return sorted(int(a) for a in augment["flip_axes"] or [])


@torch.no_grad()
def sliding_window_predict(model: torch.nn.Module, image: torch.Tensor, roi_size: Sequence[int], overlap: float = 0.5,
                           mode: str = "gaussian", sw_batch_size: int = 4, device: str | torch.device = "cpu",
                           stitch_device: str | torch.device = "cpu", tta: bool | Sequence[int] = False,
                           autocast: Callable | None = None, progress: bool = False) -> torch.Tensor:
    """Class probabilities ``[1, K, *S]`` (float32, on ``stitch_device``) for ``image [1, C, *S]``.

    Windows run on ``device`` and are stitched on ``stitch_device`` (the CPU by default, so the full-size
    buffers never sit in GPU memory). ``tta`` averages over mirrorings (nnU-Net's test-time augmentation):
    ``True`` every combination of the spatial axes (2^spatial_dims passes), a sequence of spatial axes
    (0-based, see :func:`mirror_axes`) every combination of those only.
    """
    from contextlib import nullcontext

    from monai.inferers import sliding_window_inference

    autocast = autocast or nullcontext
    if tta is True:
        axes_allowed = list(range(image.ndim - 2))
    elif tta is False or tta is None:
        axes_allowed = []
    else:
        axes_allowed = sorted(set(int(a) for a in tta))
        if any(not 0 <= a < image.ndim - 2 for a in axes_allowed):
            raise ValueError(f"mirror axes {axes_allowed} are not spatial axes of a {image.ndim - 2}-D image")
    spatial = [2 + a for a in axes_allowed]
    flips = [()] + [tuple(a for j, a in enumerate(spatial) if m >> j & 1) for m in range(1, 2 ** len(spatial))]

    def predictor(window: torch.Tensor) -> torch.Tensor:
        with autocast():
            out = model(window.to(device))
        if isinstance(out, (list, tuple)):  # a deep-supervision list (finest first): the prediction is the first
            out = out[0]
        return out.float().softmax(1)

    total = None
    for axes in flips:
        x = image.flip(axes) if axes else image
        probs = sliding_window_inference(x, roi_size, sw_batch_size, predictor, overlap=overlap, mode=mode,
                                         sw_device=device, device=stitch_device, progress=progress)
        probs = torch.as_tensor(probs)
        probs = probs.flip(axes) if axes else probs
        total = probs if total is None else total.add_(probs)
    return total / len(flips)


# ---------------------------------------------------------------------------------------------------
# the task


class SegmentationTask:
    """Dense labelling with ``data.labels`` classes (background first); Dice over the foreground labels."""

    name = "segmentation"
    primary_metric = "dice"
    greater_is_better = True

    def build_datasets(self, cfg: dict, seed: int):
        data = cfg.get("data") or {}
        for key in ("labels", "roi_size"):
            if not data.get(key):
                raise ConfigError(f"data.{key} is required for segmentation recipes")
        kind = data.get("kind", "msd")
        if kind == "msd":
            if not data.get("root"):
                raise ConfigError("data.root is required for data.kind=msd")
            cases = find_msd_cases(data["root"])
        elif kind == "image_mask":
            if not data.get("images") or not data.get("masks"):
                raise ConfigError("data.images and data.masks are required for data.kind=image_mask")
            cases = find_image_mask_pairs(data["images"], data["masks"])
        else:
            raise ConfigError(f"data.kind must be 'msd' or 'image_mask' for segmentation, got {kind!r}")
        if len(data["roi_size"]) != int(data.get("spatial_dims", 3)):
            raise ConfigError(f"data.roi_size {data['roi_size']} does not have data.spatial_dims={data.get('spatial_dims', 3)} entries")
        train_cases, val_cases = fixed_case_split(cases, float(data.get("val_fraction", 0.2)), int(data.get("split_seed", 0)),
                                                  folds=data.get("folds"), fold=data.get("fold"))
        if data.get("max_train_cases"):
            train_cases = train_cases[: int(data["max_train_cases"])]
        train = SeededTransform(SegmentationCases(train_cases, data, augment=True), seed)
        val = SegmentationCases(val_cases, data, augment=False)
        self.inference = dict(cfg.get("inference") or {})
        meta = {"classes": list(data["labels"]), "spatial_dims": int(data.get("spatial_dims", 3)), "train_cases": [c["case"] for c in train_cases],
                "val_cases": [c["case"] for c in val_cases]}
        return train, val, meta

    def build_model(self, cfg: dict, meta: dict) -> torch.nn.Module:
        data = cfg.get("data") or {}
        spec = cfg.get("model") or {}
        defaults: dict[str, Any] = {"in_channels": int(data.get("in_channels", 1)), "out_channels": len(meta["classes"])}
        if "_target_" in spec:
            return build_model_from_recipe(cfg)
        return build_model_from_recipe(cfg, **defaults)

    def load_batch(self, dataset, indices: list[int], device):
        return self.collate([dataset[i] for i in indices], device)

    def collate(self, items: list, device):
        """``image [B, C, *roi]`` float, ``label [B, 1, *roi]`` long."""
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.stack([it[1] for it in items]).long().to(device)
        return x, y

    def training_loss(self, net, x, y, loss_fn: Callable | None) -> torch.Tensor:
        out = net(x)
        if loss_fn is None:
            from monai.losses import DiceCELoss

            loss_fn = self._default_loss = getattr(self, "_default_loss", None) or DiceCELoss(to_onehot_y=True, softmax=True)
        takes_list = getattr(loss_fn, "takes_output_list", False)
        if isinstance(out, (list, tuple)) and not takes_list:
            # deep supervision (opt-in: model.kwargs.deep_supervision: true): every visionattn network lists its
            # outputs finest first, the order DeepSupervisionLoss weights 1, 1/2, 1/4, ...
            from monai.losses import DeepSupervisionLoss

            if not isinstance(loss_fn, DeepSupervisionLoss):
                loss_fn = DeepSupervisionLoss(loss_fn)
            y = y.float()  # it resizes the target (nearest) for the coarser outputs, which needs floats
        elif takes_list and isinstance(out, torch.Tensor) and not getattr(self, "_warned_single_output", False):
            import warnings

            self._warned_single_output = True
            warnings.warn(f"{type(loss_fn).__name__} supervises a list of outputs, but the model returns one tensor: "
                          "set model.kwargs.deep_supervision: true in the recipe for deep supervision", stacklevel=2)
        return loss_fn(out, y)

    @torch.no_grad()
    def evaluate(self, model, dataset, rank: int, world: int, device, autocast, batch_size: int,
                 per_case: list | None = None) -> dict[str, float]:
        """Whole-case sliding-window inference; Dice and normalised surface Dice (NSD) per foreground label and
        their means, over this rank's cases (every ``world``-th), summed across ranks. A label absent from both
        prediction and truth in a case is skipped for that case (not counted as 1 or 0).

        ``per_case``: a list that receives one row per case, in the dataset's order, gathered from every process:
        ``{"case": name, "dice_LABEL": .., "nsd_LABEL": ..}`` (nan where the label is absent from both), as
        nnU-Net's ``metric_per_case``.

        NSD (MONAI's ``SurfaceDiceMetric``): the fraction of both boundaries within ``inference.nsd_tolerance``
        (default 1, in the units of ``data.spacing``: mm for the MSD recipes, pixels without a spacing) of the
        other boundary.

        ``dice_pooled_LABEL`` (and their mean, ``dice_pooled``): Dice of the voxels of all cases taken together,
        ``2 TP / (2 TP + FP + FN)`` with the counts summed over cases, as the retinal-vessel literature reports
        its F1 over a test set (large cases weigh more; a hard small case weighs less than in the mean).

        ``inference.tta: true`` averages each case's prediction over the mirrorings along the axes the recipe
        flipped in training (:func:`mirror_axes`), as ``segment --tta`` does (nnU-Net validates this way).
        """
        from monai.metrics import DiceMetric, SurfaceDiceMetric
        inference = getattr(self, "inference", {})
        roi = dataset_roi(dataset)
        n_classes = len(dataset_classes(dataset))
        data_cfg = _base(dataset).data_cfg
        spacing = data_cfg.get("spacing") or [1.0] * int(data_cfg.get("spatial_dims", 3))
        tolerance = float(inference.get("nsd_tolerance", 1.0))
        tta = mirror_axes(data_cfg) if inference.get("tta") else False
        metric = DiceMetric(include_background=False, reduction="none", ignore_empty=True, num_classes=n_classes)
        surface = SurfaceDiceMetric([tolerance] * (n_classes - 1), include_background=False, reduction="none")
        names = dataset_classes(dataset)[1:]
        sums, counts = [0.0] * (n_classes - 1), [0.0] * (n_classes - 1)
        nsd_sums, nsd_counts = [0.0] * (n_classes - 1), [0.0] * (n_classes - 1)
        overlap, sizes = [0.0] * (n_classes - 1), [0.0] * (n_classes - 1)  # pooled: sum of TP, of |pred| + |truth|
        rows: list[tuple[int, dict]] = []  # (case index, its metrics) for per_case
        for i in range(rank, len(dataset), world):
            image, label = dataset[i]
            probs = sliding_window_predict(model, image[None], roi, float(inference.get("overlap", 0.5)),
                                           inference.get("mode", "gaussian"), int(inference.get("sw_batch_size", batch_size)),
                                           device, "cpu", tta=tta, autocast=autocast)
            if probs.shape[2:] != label.shape[1:]:  # data.zoom: back to the label's (original) grid
                probs = torch.nn.functional.interpolate(probs.float(), size=list(label.shape[1:]), mode="area")
            pred = probs.argmax(1, keepdim=True)
            scores = metric(pred, label[None].long())[0]
            one_hot = [torch.nn.functional.one_hot(t[:, 0].long(), n_classes).movedim(-1, 1) for t in (pred, label[None])]
            voxels = tuple(range(2, one_hot[0].dim()))  # pooled Dice: this case's TP and |pred| + |truth| per label
            tp = (one_hot[0] & one_hot[1]).sum(voxels)[0, 1:].tolist()
            both = (one_hot[0] + one_hot[1]).sum(voxels)[0, 1:].tolist()
            overlap = [a + b for a, b in zip(overlap, tp)]
            sizes = [a + b for a, b in zip(sizes, both)]
            with warnings.catch_warnings():  # an empty label in a case is expected (its NSD is nan, skipped)
                warnings.filterwarnings("ignore", message=".*is all 0, this may result in nan/inf distance")
                warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
                nsd = surface(*one_hot, spacing=[float(v) for v in spacing])[0]
            if per_case is not None:
                row = {"case": _case_name(dataset, i)}
                row.update({f"dice_{name}": float(s) for name, s in zip(names, scores.tolist())})
                row.update({f"nsd_{name}": float(n) for name, n in zip(names, nsd.tolist())})
                rows.append((i, row))
            for c, (s, n) in enumerate(zip(scores.tolist(), nsd.tolist())):
                if not math.isnan(s):
                    sums[c] += s
                    counts[c] += 1
                if not math.isnan(n):
                    nsd_sums[c] += n
                    nsd_counts[c] += 1
        if per_case is not None:
            gathered = all_gather_lists(rows) if world > 1 else rows  # (world 1: this process validated all)
            per_case.extend(row for _, row in sorted(gathered, key=lambda r: r[0]))
        k = n_classes - 1
        reduced = all_reduce_sum(sums + counts + nsd_sums + nsd_counts + overlap + sizes, device)
        dice = {f"dice_{name}": (s / c if c else float("nan"))
                for name, s, c in zip(names, reduced[:k], reduced[k:2 * k])}
        nsd = {f"nsd_{name}": (s / c if c else float("nan"))
               for name, s, c in zip(names, reduced[2 * k:3 * k], reduced[3 * k:4 * k])}
        pooled = {f"dice_pooled_{name}": (2 * o / n if n else float("nan"))
                  for name, o, n in zip(names, reduced[4 * k:5 * k], reduced[5 * k:])}

        def mean(values: dict) -> float:
            valid = [v for v in values.values() if not math.isnan(v)]
            return sum(valid) / len(valid) if valid else 0.0

        return {"dice": mean(dice), **dice, "nsd": mean(nsd), **nsd, "dice_pooled": mean(pooled), **pooled}


def dataset_roi(dataset) -> list[int]:
    return list(_base(dataset).data_cfg["roi_size"])


def dataset_classes(dataset) -> list[str]:
    return list(_base(dataset).data_cfg["labels"])


def _case_name(dataset, index: int) -> str:
    """The recipe's name of case ``index`` (its ``case`` entry), or ``case INDEX`` for other datasets."""
    cases = getattr(_base(dataset), "cases", None)
    try:
        return str(cases[index]["case"])
    except (TypeError, KeyError, IndexError):
        return f"case {index}"


def _base(dataset):
    return dataset.dataset if isinstance(dataset, SeededTransform) else dataset
