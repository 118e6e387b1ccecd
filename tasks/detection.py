"""Object detection: Pascal VOC and COCO readers, a fixed stratified split, bbox-aware augmentation
(albumentations), mAP (torchmetrics with the pycocotools backend), COCO JSON export, ``visionattn detect``
and the trainer's :class:`DetectionTask`.

Conventions (torchvision's detection API):

* an image is a float tensor ``[3, H, W]`` in 0..1; the detector resizes and normalises it itself;
* a target is a dict: ``boxes [n, 4]`` float32, absolute ``x1, y1, x2, y2`` pixels in continuous 0-based
  coordinates (a box over pixel columns 0..9 has ``x1 = 0, x2 = 10``, so VOC's 1-based inclusive
  ``xmin..xmax`` becomes ``xmin - 1 .. xmax``), ``labels [n]`` int64 in ``0..K-1`` (no background class) and
  ``difficult [n]`` bool (VOC ``difficult`` / COCO ``iscrowd``: left out of training targets, and neither
  a hit nor a miss for the metric);
* a prediction is a dict ``boxes [m, 4]``, ``labels [m]``, ``scores [m]`` in the same pixels.

NEU-DET has no official split; :func:`fixed_split` makes the one the recipes use: 20 % of each class
(the class is the file-name prefix, ``crazing_12`` -> ``crazing``) chosen by a seeded shuffle, the same on
every machine. On the 1,500 images of ``../shared/data/neu_det`` that is 200 training and 50 validation
images per class (1,200 / 300).
"""
from __future__ import annotations

import copy
import json
import os
import random
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from visionattn.tasks.config import ConfigError, load_run_config
from visionattn.tasks.data import IMAGE_SUFFIXES, DataError, SeededTransform
from visionattn.tasks.files import atomic_path, write_json_atomic
from visionattn.tasks.imageio import (
    DEFAULT_MAX_IMAGE_PIXELS, ImageError, bad_images_error, check_image, pixel_limit, read_image,
)

# (annotation folder, image folder): Pascal VOC's names, then NEU-DET's
VOC_LAYOUTS = (("Annotations", "JPEGImages"), ("ANNOTATIONS", "IMAGES"))
# data.augment keys: flip probabilities, affine range (scale 1 +- s, shift +- t of the size, applied with
# p=0.5), brightness/contrast limits (applied with p=0.5), and the visible fraction below which a box
# cut by the affine is dropped
AUGMENT_DEFAULTS = dict(hflip=0.5, vflip=0.0, scale=0.1, translate=0.05, brightness=0.2, contrast=0.2,
                        min_visibility=0.3)
BOX_COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
               "#fabed4", "#469990", "#dcbeff", "#9a6324"]


# ---------------------------------------------------------------------------------------------------
# images and files


def read_rgb(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode an image file to ``[H, W, 3]`` uint8 RGB (:func:`visionattn.tasks.imageio.read_image`), or raise
    :class:`~visionattn.tasks.imageio.ImageError` (a :class:`DataError`) naming the file."""
    return read_image(path, "RGB", max_pixels)


def image_size(path: Path, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """``(width, height)`` from the image header (nothing decoded), or
    :class:`~visionattn.tasks.imageio.ImageError` naming the file when :func:`read_rgb` would refuse it as
    far as the header tells (unreadable, over ``max_pixels``, floating-point samples)."""
    return check_image(path, max_pixels)


def collect_images(input_path: str | Path) -> list[Path]:
    """An image file, or the image files under a folder (recursively, sorted)."""
    src = Path(input_path)
    if src.is_file():
        return [src]
    if not src.is_dir():
        raise FileNotFoundError(f"input not found: {src}")
    files = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) under {src}")
    return files


def save_png_atomic(image: torch.Tensor, path: Path) -> None:
    """Save a ``[3, H, W]`` uint8 image as PNG through a temporary name in the same folder."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp, format="PNG")


# ---------------------------------------------------------------------------------------------------
# data sets


@dataclass
class DetectionRecord:
    """One annotated image: ``boxes [n, 4]`` float32 xyxy pixels, ``labels [n]`` int64, ``difficult [n]`` bool."""

    image_id: str
    path: Path
    width: int
    height: int
    boxes: np.ndarray
    labels: np.ndarray
    difficult: np.ndarray


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 -> ``[3, H, W]`` float in 0..1."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


def to_tensors(image: np.ndarray, target: dict) -> tuple[torch.Tensor, dict]:
    """The image as :func:`image_to_tensor`; copies of the target's arrays as tensors (``boxes [n, 4]``
    float32, ``labels [n]`` int64, ``difficult [n]`` bool)."""
    return image_to_tensor(image), {
        "boxes": torch.tensor(np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4)),
        "labels": torch.tensor(np.asarray(target["labels"], dtype=np.int64).reshape(-1)),
        "difficult": torch.tensor(np.asarray(target["difficult"], dtype=bool).reshape(-1)),
    }


class DetectionDataset(Dataset):
    """Annotated images (``records``, class names ``classes``). Item ``i`` is ``(image [3, H, W] float in 0..1,
    {boxes [n, 4], labels [n], difficult [n]})`` after ``transform`` (a :class:`DetectionTransform`;
    ``None`` gives the image at its own size). Images over ``max_image_pixels`` pixels are refused."""

    classes: list[str]
    records: list[DetectionRecord]
    transform: Callable | None
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS

    @property
    def ids(self) -> list[str]:
        return [r.image_id for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        record = self.records[index]
        target = {"boxes": record.boxes, "labels": record.labels, "difficult": record.difficult}
        return (self.transform or to_tensors)(read_rgb(record.path, self.max_image_pixels), target)

    def subset(self, indices: Sequence[int], transform: Callable | None) -> "DetectionDataset":
        """The records at ``indices`` (same classes) with another transform, without reading anything again."""
        part = copy.copy(self)
        part.records = [self.records[i] for i in indices]
        part.transform = transform
        return part

    def image_infos(self) -> list[dict]:
        """COCO ``images`` entries (``id`` is the position plus one)."""
        return [{"id": i + 1, "file_name": r.path.name, "height": r.height, "width": r.width}
                for i, r in enumerate(self.records)]


def _records_or_error(items: Sequence, build: Callable[[Any], DetectionRecord], where: str) -> list[DetectionRecord]:
    """``build(item)`` for each item; images failing their header check (unreadable, too large) are gathered
    into one :class:`DataError` listing them, so every bad file is named at once (other problems raise at once)."""
    records, bad = [], []
    for item in items:
        try:
            records.append(build(item))
        except ImageError as e:
            bad.append(e)
    if bad:
        raise bad_images_error(bad, len(items), where)
    return records


def _clip_box(box: Sequence[float], width: int, height: int, where: str) -> list[float]:
    x1, y1, x2, y2 = min(max(box[0], 0.0), width), min(max(box[1], 0.0), height), \
        min(max(box[2], 0.0), width), min(max(box[3], 0.0), height)
    if x2 <= x1 or y2 <= y1:
        raise DataError(f"{where}: box {list(box)} is empty or lies outside the {width}x{height} image")
    return [x1, y1, x2, y2]


def _records_arrays(boxes: list, labels: list, difficult: list) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return (np.asarray(boxes, dtype=np.float32).reshape(-1, 4), np.asarray(labels, dtype=np.int64),
            np.asarray(difficult, dtype=bool))


def parse_voc_xml(path: Path) -> dict:
    """A Pascal VOC annotation as ``{filename, width, height, objects: [(name, [xmin, ymin, xmax, ymax], difficult)]}``
    with VOC's 1-based inclusive coordinates as written; ``width``/``height`` are None if ``<size>`` is absent."""
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as e:
        raise DataError(f"cannot parse annotation {path}: {e}") from e
    if root.tag != "annotation":
        raise DataError(f"{path} is not a Pascal VOC annotation (root element <{root.tag}>, expected <annotation>)")

    def number(node, tag: str, where: str) -> float:
        text = node.findtext(tag) if node is not None else None
        try:
            return float(text)
        except (TypeError, ValueError):
            raise DataError(f"{path}: {where} has no numeric <{tag}> (got {text!r})") from None

    size = root.find("size")
    width = int(number(size, "width", "<size>")) if size is not None else None
    height = int(number(size, "height", "<size>")) if size is not None else None
    objects = []
    for k, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        if not name:
            raise DataError(f"{path}: object {k} has no <name>")
        box = obj.find("bndbox")
        if box is None:
            raise DataError(f"{path}: object {k} ({name}) has no <bndbox>")
        coords = [number(box, tag, f"object {k} ({name})") for tag in ("xmin", "ymin", "xmax", "ymax")]
        objects.append((name, coords, (obj.findtext("difficult") or "0").strip() == "1"))
    return {"filename": (root.findtext("filename") or "").strip(), "width": width, "height": height,
            "objects": objects}


class VOCDetection(DetectionDataset):
    """Pascal VOC: ``root/Annotations/<id>.xml`` with ``root/JPEGImages/<id>.<ext>`` (NEU-DET's
    ``ANNOTATIONS/`` + ``IMAGES/`` too).

    Args:
        root: the data set folder.
        split: ``'all'`` (every annotation, which must pair one to one with the images), the name of a
            ``root/ImageSets/Main/<split>.txt`` id list, or a list of ids.
        classes: class names in label order; ``None``: the names found in the annotations, sorted.
        transform: see :class:`DetectionDataset`.
        max_image_pixels: images whose header declares more pixels are refused (``None``: the default,
            :data:`~visionattn.tasks.imageio.DEFAULT_MAX_IMAGE_PIXELS`).

    Boxes are converted to 0-based continuous pixels (``xmin - 1, ymin - 1, xmax, ymax``) and clipped to the
    image. Every annotation is parsed and every image header read here, so a missing folder, an empty one,
    a broken or incomplete XML file, an unknown class or an image that does not match its annotation fails
    at once with a :class:`DataError` naming the file; unreadable or oversized images are gathered into one
    :class:`DataError` listing them.
    """

    def __init__(self, root: str | Path, split: str | Sequence[str] = "all", classes: Sequence[str] | None = None,
                 transform: Callable | None = None, max_image_pixels: int | None = None):
        self.max_image_pixels = pixel_limit(max_image_pixels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data set folder not found: {self.root}")
        layout = next(((a, i) for a, i in VOC_LAYOUTS if (self.root / a).is_dir()), None)
        if layout is None:
            raise DataError(f"{self.root} has no annotation folder (expected Pascal VOC's Annotations/ + JPEGImages/ "
                            "or NEU-DET's ANNOTATIONS/ + IMAGES/)")
        self.annotation_dir, self.image_dir = self.root / layout[0], self.root / layout[1]
        if not self.image_dir.is_dir():
            raise DataError(f"image folder not found: {self.image_dir}")
        ids = self._select_ids(split)
        parsed = [(image_id, parse_voc_xml(self.annotation_dir / f"{image_id}.xml")) for image_id in ids]
        names = sorted({name for _, ann in parsed for name, _, _ in ann["objects"]})
        self.classes = list(classes) if classes is not None else names
        label_of = {name: i for i, name in enumerate(self.classes)}
        self.records = _records_or_error(parsed, lambda item: self._record(*item, label_of), str(self.image_dir))
        self.transform = transform

    def _select_ids(self, split: str | Sequence[str]) -> list[str]:
        annotated = sorted(p.stem for p in self.annotation_dir.glob("*.xml"))
        if isinstance(split, str) and split == "all":
            if not annotated:
                raise DataError(f"annotation folder {self.annotation_dir} holds no .xml files")
            images = {p.stem for p in self.image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
            unannotated = sorted(images - set(annotated))
            if unannotated:
                raise DataError(f"{len(unannotated)} image(s) in {self.image_dir} have no annotation in "
                                f"{self.annotation_dir}: {', '.join(unannotated[:5])}")
            return annotated
        if isinstance(split, str):
            list_file = self.root / "ImageSets" / "Main" / f"{split}.txt"
            if not list_file.is_file():
                raise DataError(f"split {split!r}: id list {list_file} not found")
            ids = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
        else:
            ids = list(split)
        if not ids:
            raise DataError(f"split {split if isinstance(split, str) else '(list)'} of {self.root} is empty")
        missing = sorted(set(ids) - set(annotated))
        if missing:
            raise DataError(f"{len(missing)} id(s) have no annotation in {self.annotation_dir}: "
                            f"{', '.join(f'{m}.xml' for m in missing[:5])}")
        return ids

    def _record(self, image_id: str, ann: dict, label_of: dict[str, int]) -> DetectionRecord:
        xml = self.annotation_dir / f"{image_id}.xml"
        if ann["filename"] and Path(ann["filename"]).stem != image_id:
            raise DataError(f"{xml} describes image {ann['filename']!r}, not {image_id}")
        path = self.image_dir / ann["filename"] if ann["filename"] else None
        if path is None or not path.is_file():
            path = next((self.image_dir / f"{image_id}{ext}" for ext in sorted(IMAGE_SUFFIXES)
                         if (self.image_dir / f"{image_id}{ext}").is_file()), None)
        if path is None:
            raise DataError(f"{xml} has no image: no {image_id}.* in {self.image_dir}")
        width, height = image_size(path, self.max_image_pixels)
        if ann["width"] is not None and (ann["width"], ann["height"]) != (width, height):
            raise DataError(f"{path} is {width}x{height} but {xml} gives {ann['width']}x{ann['height']}")
        boxes, labels, difficult = [], [], []
        for k, (name, (xmin, ymin, xmax, ymax), is_difficult) in enumerate(ann["objects"]):
            if name not in label_of:
                raise DataError(f"{xml}: object {k} has class {name!r}, not one of {list(label_of)}")
            boxes.append(_clip_box([xmin - 1, ymin - 1, xmax, ymax], width, height, f"{xml} object {k}"))
            labels.append(label_of[name])
            difficult.append(is_difficult)
        return DetectionRecord(image_id, path, width, height, *_records_arrays(boxes, labels, difficult))


class CocoDetection(DetectionDataset):
    """COCO JSON (``images``, ``annotations`` with ``bbox: [x, y, w, h]``, ``categories``) over ``images_dir``.

    Categories, sorted by id, become labels ``0..K-1``; ``category_ids[label]`` is the original id and
    :attr:`categories` the ``{id, name}`` list for :func:`to_coco_json`. Boxes become xyxy, clipped to the
    image; ``iscrowd`` boxes are flagged ``difficult``. Images without annotations are kept (no boxes).
    Image headers are checked as in :class:`VOCDetection` (``max_image_pixels`` likewise).
    """

    def __init__(self, images_dir: str | Path, annotation_json: str | Path, transform: Callable | None = None,
                 max_image_pixels: int | None = None):
        self.max_image_pixels = pixel_limit(max_image_pixels)
        self.images_dir, self.annotation_json = Path(images_dir), Path(annotation_json)
        if not self.images_dir.is_dir():
            raise DataError(f"image folder not found: {self.images_dir}")
        if not self.annotation_json.is_file():
            raise DataError(f"annotation file not found: {self.annotation_json}")
        try:
            coco = json.loads(self.annotation_json.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"cannot parse {self.annotation_json} as JSON: {e}") from e
        if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list) for k in ("images", "categories")):
            raise DataError(f"{self.annotation_json} is not a COCO data set (needs 'images' and 'categories' lists)")
        if not coco["images"]:
            raise DataError(f"{self.annotation_json} lists no images")
        self.categories = sorted(({"id": int(c["id"]), "name": str(c["name"])} for c in coco["categories"]),
                                 key=lambda c: c["id"])
        self.classes = [c["name"] for c in self.categories]
        self.category_ids = [c["id"] for c in self.categories]
        label_of = {cid: i for i, cid in enumerate(self.category_ids)}
        images = {int(im["id"]): im for im in coco["images"]}
        per_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
        for ann in coco.get("annotations") or []:
            where = f"{self.annotation_json} annotation {ann.get('id')}"
            if ann.get("image_id") not in per_image:
                raise DataError(f"{where}: image_id {ann.get('image_id')!r} is not in 'images'")
            if ann.get("category_id") not in label_of:
                raise DataError(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
            per_image[ann["image_id"]].append(ann)
        self.records = _records_or_error(list(images), lambda i: self._record(images[i], per_image[i], label_of),
                                         str(self.images_dir))
        self.transform = transform

    def _record(self, image: dict, anns: list[dict], label_of: dict[int, int]) -> DetectionRecord:
        path = self.images_dir / image["file_name"]
        if not path.is_file():
            raise DataError(f"{self.annotation_json}: image {image['file_name']!r} not found in {self.images_dir}")
        width, height = image_size(path, self.max_image_pixels)
        if (image.get("width"), image.get("height")) not in ((width, height), (None, None)):
            raise DataError(f"{path} is {width}x{height} but {self.annotation_json} gives "
                            f"{image.get('width')}x{image.get('height')}")
        boxes, labels, difficult = [], [], []
        for ann in anns:
            x, y, w, h = (float(v) for v in ann["bbox"])
            boxes.append(_clip_box([x, y, x + w, y + h], width, height,
                                   f"{self.annotation_json} annotation {ann.get('id')}"))
            labels.append(label_of[ann["category_id"]])
            difficult.append(bool(ann.get("iscrowd", 0)))
        return DetectionRecord(Path(image["file_name"]).with_suffix("").as_posix(), path, width, height,
                               *_records_arrays(boxes, labels, difficult))


def class_of_id(image_id: str) -> str:
    """The class a NEU-DET-style id names (``rolled-in_scale_12`` -> ``rolled-in_scale``); ``''`` if none."""
    match = re.fullmatch(r"(.+)_\d+", image_id)
    return match.group(1) if match else ""


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def fixed_split(ids: Sequence[str], val_fraction: float = 0.2, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic train/val split, stratified by the class in the id (:func:`class_of_id`; ids without
    one form a single group). Each group, in natural order, is shuffled by ``random.Random(f"{seed}:{class}")``
    (string seeding is the same on every platform and Python version) and its first
    ``round(val_fraction * n)`` ids (at least one when ``val_fraction > 0`` and the group has two or more) go
    to validation. Returns ``(train_ids, val_ids)``, each in natural order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups: dict[str, list[str]] = {}
    for image_id in sorted(ids, key=_natural_key):
        groups.setdefault(class_of_id(image_id), []).append(image_id)
    train, val = [], []
    for cls, members in groups.items():
        n_val = round(val_fraction * len(members))
        if val_fraction > 0 and len(members) > 1:
            n_val = max(1, n_val)
        shuffled = list(members)
        random.Random(f"{seed}:{cls}").shuffle(shuffled)
        val += shuffled[:n_val]
        train += shuffled[n_val:]
    return sorted(train, key=_natural_key), sorted(val, key=_natural_key)


# ---------------------------------------------------------------------------------------------------
# augmentation


def _probability(value: Any, key: str) -> float:
    """A flip setting: ``true`` means 0.5, ``false``/``null`` 0, a number is the probability."""
    if value is True:
        return 0.5
    p = float(value or 0.0)
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"data.augment.{key} must be a probability in [0, 1] or true/false, got {value!r}")
    return p


class DetectionTransform:
    """An albumentations pipeline on ``(image [H, W, 3] uint8, target with boxes/labels/difficult)``
    returning ``(image [3, H', W'] float in 0..1, target tensors)`` (see :func:`to_tensors`).

    albumentations keeps its own random generators; they are reseeded on every call from torch's global
    generator, so ``torch.manual_seed`` and :class:`SeededTransform` make the augmentation repeatable.
    ``compose=None`` only converts to tensors."""

    def __init__(self, compose):
        self.compose = compose

    def __call__(self, image: np.ndarray, target: dict) -> tuple[torch.Tensor, dict]:
        if self.compose is None:
            return to_tensors(image, target)
        seed = int(torch.randint(0, 2**62, ()))
        self.compose.set_random_state(np.random.default_rng(seed), random.Random(seed))
        out = self.compose(image=image, bboxes=np.asarray(target["boxes"], dtype=np.float32).reshape(-1, 4),
                           labels=np.asarray(target["labels"]), difficult=np.asarray(target["difficult"]))
        return to_tensors(out["image"], {"boxes": out["bboxes"], "labels": out["labels"], "difficult": out["difficult"]})


def build_detection_transforms(img_size: int | None, train: bool, augment: dict | None = None) -> DetectionTransform:
    """Training: flips, a small scale/shift, brightness/contrast (``augment`` overrides
    :data:`AUGMENT_DEFAULTS`), then a resize to ``img_size x img_size``; evaluation: the resize only.
    ``img_size=None`` keeps the image size. Boxes follow every step (albumentations ``pascal_voc`` format,
    clipped to the image; a box less than ``min_visibility`` visible after the affine is dropped with its
    label). No normalisation: the detector does it."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # albumentations asks PyPI for updates on import
    import albumentations as A

    augment = dict(augment or {})
    unknown = sorted(set(augment) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown data.augment keys {unknown}; known: {sorted(AUGMENT_DEFAULTS)}")
    opts = dict(AUGMENT_DEFAULTS, **augment)
    ops = []
    if train:
        hflip, vflip = _probability(opts["hflip"], "hflip"), _probability(opts["vflip"], "vflip")
        if hflip:
            ops.append(A.HorizontalFlip(p=hflip))
        if vflip:
            ops.append(A.VerticalFlip(p=vflip))
        scale, shift = float(opts["scale"]), float(opts["translate"])
        if scale or shift:
            ops.append(A.Affine(scale=(1 - scale, 1 + scale), translate_percent=(-shift, shift), p=0.5))
        if opts["brightness"] or opts["contrast"]:
            ops.append(A.RandomBrightnessContrast(brightness_limit=float(opts["brightness"]),
                                                  contrast_limit=float(opts["contrast"]), p=0.5))
    if img_size:
        ops.append(A.Resize(height=int(img_size), width=int(img_size)))
    bbox_params = A.BboxParams(format="pascal_voc", label_fields=["labels", "difficult"], clip=True,
                               min_visibility=float(opts["min_visibility"]) if train else 0.0)
    return DetectionTransform(A.Compose(ops, bbox_params=bbox_params) if ops else None)


# ---------------------------------------------------------------------------------------------------
# metrics and export


def _undefined_to_nan(value: float) -> float:
    """pycocotools writes -1 where a value is undefined (no ground truth); report NaN instead."""
    return float("nan") if value < 0 else float(value)


def evaluate_detections(predictions: Sequence[dict], targets: Sequence[dict],
                        class_names: Sequence[str] | None = None) -> dict[str, float]:
    """mAP of ``predictions`` against ``targets`` (one dict per image, same order) with torchmetrics'
    ``MeanAveragePrecision`` on the pycocotools backend (COCO's 101-point interpolated AP over the 100
    highest-scoring detections of each image).

    Returns floats: ``map_50`` (AP at IoU 0.5, averaged over classes), ``map`` (averaged over IoU
    0.5:0.95), ``map_75``, and ``ap50_<class>`` for each class of ``class_names`` (or, without names, for
    each label in the targets). No predictions at all give 0.0; targets' ``difficult`` boxes are passed as
    ``iscrowd`` (a detection on them counts neither way). A value without ground truth behind it (a class
    absent from the targets, or no boxes at all) is NaN.
    """
    from torchmetrics.detection import MeanAveragePrecision

    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions for {len(targets)} targets")
    preds = [{"boxes": torch.as_tensor(p["boxes"], dtype=torch.float32).reshape(-1, 4).cpu(),
              "scores": torch.as_tensor(p["scores"], dtype=torch.float32).reshape(-1).cpu(),
              "labels": torch.as_tensor(p["labels"], dtype=torch.int64).reshape(-1).cpu()} for p in predictions]
    gts = []
    for t in targets:
        labels = torch.as_tensor(t["labels"], dtype=torch.int64).reshape(-1).cpu()
        difficult = t.get("difficult", t.get("iscrowd"))
        crowd = torch.zeros_like(labels) if difficult is None else torch.as_tensor(difficult).reshape(-1).long().cpu()
        gts.append({"boxes": torch.as_tensor(t["boxes"], dtype=torch.float32).reshape(-1, 4).cpu(),
                    "labels": labels, "iscrowd": crowd})
    metric = MeanAveragePrecision(iou_type="bbox", backend="pycocotools", extended_summary=True)
    metric.warn_on_many_detections = False  # DETR-style models return 300; COCO's rule keeps the best 100
    metric.update(preds, gts)
    result = metric.compute()
    out = {key: _undefined_to_nan(float(result[key])) for key in ("map_50", "map", "map_75")}
    evaluated = result["classes"].reshape(-1).tolist()  # the labels along the precision's class axis
    precision_50 = result["precision"][0, :, :, 0, -1]  # [101 recall points, classes] at IoU 0.5, all areas, 100 dets
    if class_names is not None:
        report = list(enumerate(class_names))
    else:
        report = [(label, str(label)) for label in sorted({int(v) for g in gts for v in g["labels"]})]
    for label, name in report:
        column = precision_50[:, evaluated.index(label)] if label in evaluated else torch.empty(0)
        defined = column[column > -1]
        # float32 like torchmetrics' own values (pycocotools' precision carries a 1e-16 epsilon)
        out[f"ap50_{name}"] = float(defined.mean().float()) if len(defined) else float("nan")
    return out


def to_coco_json(image_infos: Sequence[dict], detections: Sequence[dict], categories: Sequence[str] | Sequence[dict]) -> dict:
    """A COCO dict ``{images, annotations, categories}`` for boxes on images.

    Args:
        image_infos: per image ``{file_name, height, width}`` and optionally ``id`` (default: position + 1);
            other keys are kept.
        detections: per image (same order) ``boxes [n, 4]`` xyxy pixels and ``labels [n]``; with ``scores``
            each annotation carries its ``score``, so ``annotations`` is also a COCO *results* list
            (``pycocotools.COCO.loadRes``); ``difficult`` becomes ``iscrowd``.
        categories: class names (label ``i`` -> category id ``i + 1``) or ``{id, name}`` dicts in label order.
    """
    if len(image_infos) != len(detections):
        raise ValueError(f"{len(image_infos)} images but {len(detections)} detection lists")
    cats = [{"id": int(c["id"]), "name": str(c["name"])} if isinstance(c, dict) else {"id": i + 1, "name": str(c)}
            for i, c in enumerate(categories)]
    cats = [dict(c, supercategory="none") for c in cats]
    images, annotations = [], []
    for i, (info, detection) in enumerate(zip(image_infos, detections)):
        image = {"id": int(info.get("id", i + 1)), **{k: v for k, v in info.items() if k != "id"}}
        images.append(image)
        boxes = torch.as_tensor(detection["boxes"], dtype=torch.float64).reshape(-1, 4)
        labels = torch.as_tensor(detection["labels"]).reshape(-1).tolist()
        scores = torch.as_tensor(detection["scores"]).reshape(-1).tolist() if "scores" in detection else None
        crowd = (torch.as_tensor(detection["difficult"]).reshape(-1).tolist() if "difficult" in detection
                 else [False] * len(labels))
        for k, ((x1, y1, x2, y2), label) in enumerate(zip(boxes.tolist(), labels)):
            w, h = x2 - x1, y2 - y1
            ann = {"id": len(annotations) + 1, "image_id": image["id"], "category_id": cats[int(label)]["id"],
                   "bbox": [round(x1, 3), round(y1, 3), round(w, 3), round(h, 3)], "area": round(w * h, 3),
                   "iscrowd": int(bool(crowd[k]))}
            if scores is not None:
                ann["score"] = round(float(scores[k]), 5)
            annotations.append(ann)
    return {"images": images, "annotations": annotations, "categories": cats}


# ---------------------------------------------------------------------------------------------------
# `visionattn detect`


def load_detection_model(spec: str, num_classes: int | None = None, classes: Sequence[str] | None = None,
                         input_size: int | None = None) -> tuple[nn.Module, list[str]]:
    """The detector for ``visionattn detect`` and its class names.

    ``spec`` is a registered detection model name (random weights; a warning is printed) or a trainer
    output: its folder (``best.safetensors``, else ``model.safetensors``) or a weights file in it, rebuilt
    from the ``config.yaml`` beside it, with the class names that config records. ``classes`` overrides
    the names; ``num_classes`` is passed to a model built by name, ``input_size`` (the side the detector
    resizes images to) to either.
    """
    import visionattn

    path = Path(spec)
    if path.exists():
        weights = path
        if path.is_dir():
            weights = next((path / n for n in ("best.safetensors", "model.safetensors") if (path / n).is_file()), None)
            if weights is None:
                raise FileNotFoundError(f"{path} holds neither best.safetensors nor model.safetensors")
        config_path = weights.parent / "config.yaml"
        if not config_path.is_file():
            raise FileNotFoundError(f"{weights}: no config.yaml beside it (expected a `visionattn train` output folder)")
        cfg = load_run_config(config_path)  # a run folder is data: validated before anything is built
        task = cfg.get("task", "classification")
        if task != "detection":
            raise ConfigError(f"{weights} is a {task} model (see {config_path}); `visionattn detect` needs a detection run")
        names = list(classes or (cfg.get("data") or {}).get("classes") or [])
        if not names:
            raise ConfigError(f"{config_path} records no data.classes; pass --classes a,b,c")
        if input_size:
            cfg["model"].setdefault("kwargs", {})["input_size"] = input_size
        model = DetectionTask().build_model(cfg, {"classes": names})
        visionattn.load_checkpoint(model, str(weights))
        return model.eval(), names
    if path.suffix in (".safetensors", ".pt", ".pth") or os.sep in spec:
        raise FileNotFoundError(f"model not found: {spec}")
    entry = visionattn.get_entry(spec)
    if entry.task != "detection":
        raise ConfigError(f"{spec} is a {entry.task} model; detection models: "
                          f"{', '.join(visionattn.list_models(task='detection')) or 'none registered'}")
    if classes and num_classes and len(classes) != num_classes:
        raise ConfigError(f"--classes names {len(classes)} classes but --num-classes is {num_classes}")
    model = visionattn.create_model(spec, num_classes=num_classes or (len(classes) if classes else None),
                                    input_size=input_size)
    print(f"detect: warning: {spec} has random weights (no trained checkpoint given); its boxes are meaningless",
          file=sys.stderr)
    n = getattr(model, "num_classes", None) or num_classes or len(classes or [])
    return model.eval(), list(classes or [f"class_{i}" for i in range(n)])


def _relative_names(inputs: Sequence[Path]) -> tuple[list[str], list[str]]:
    """Each input's path relative to the inputs' common folder (``more/a.jpg``), and its output stem
    (``more__a``)."""
    parent = Path(os.path.commonpath([str(p.resolve().parent) for p in inputs]))
    relative = [p.resolve().relative_to(parent) for p in inputs]
    stems = ["__".join(r.with_suffix("").parts) for r in relative]
    duplicates = sorted({n for n in stems if stems.count(n) > 1})
    if duplicates:
        raise ValueError(f"several inputs would be written as the same output: {', '.join(duplicates[:5])}")
    return [r.as_posix() for r in relative], stems


def _predict(model: nn.Module, images: list[np.ndarray], device: torch.device) -> list[dict | Exception]:
    """The model's predictions (CPU tensors) for each ``[H, W, 3]`` image; an image the model fails on (the
    batch is retried one image at a time) gets the exception instead."""
    tensors = [image_to_tensor(image).to(device) for image in images]
    try:
        outputs = model(tensors)
    except Exception as e:  # reported against the image by the caller; the other images go on
        if len(images) == 1:
            return [e]
        return [_predict(model, [im], device)[0] for im in images]
    return [{"boxes": o["boxes"].detach().float().cpu().reshape(-1, 4), "labels": o["labels"].detach().long().cpu(),
             "scores": o["scores"].detach().float().cpu()} for o in outputs]


@torch.no_grad()
def detect(model: nn.Module, inputs: Sequence[Path], out_dir: Path, score_threshold: float = 0.3,
           overwrite: bool = False, device: str = "cpu", batch_size: int = 4, draw: bool = True,
           classes: Sequence[str] | None = None, max_image_pixels: int | None = None) -> dict:
    """Run a detector on image files and write ``out_dir/detections.json`` and, with ``draw``,
    ``out_dir/images/<name>.png`` (boxes, class names and scores drawn; ``<name>`` is the path below the
    inputs' common folder with ``/`` written ``__``), each atomically.

    ``detections.json`` is a COCO dict (:func:`to_coco_json`): ``images`` (with each input's ``path``),
    ``categories``, ``annotations`` holding the detections scoring at least ``score_threshold`` (a COCO
    results list), plus ``failed`` (``{path, error}``) and ``score_threshold``. An image that cannot be read
    (unreadable, corrupt, truncated, or declaring more than ``max_image_pixels`` pixels, default
    :data:`~visionattn.tasks.imageio.DEFAULT_MAX_IMAGE_PIXELS`; see :func:`read_rgb`) or that the model fails
    on is reported by name, one line on stderr and an entry in ``failed``; the others are still processed.
    Existing outputs are refused (``FileExistsError``) unless ``overwrite``.

    Returns the summary ``{images, detections, failed: [{path, error}], output}``.
    """
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise ValueError("detect: no input images")
    max_image_pixels = pixel_limit(max_image_pixels)
    out_dir = Path(out_dir)
    file_names, stems = _relative_names(inputs)
    json_path, image_dir = out_dir / "detections.json", out_dir / "images"
    outputs = [json_path] + ([image_dir / f"{stem}.png" for stem in stems] if draw else [])
    existing = [p for p in outputs if p.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds outputs ({', '.join(str(p) for p in existing[:3])}"
                              f"{', ...' if len(existing) > 3 else ''}); pass --overwrite to replace them")
    (image_dir if draw else out_dir).mkdir(parents=True, exist_ok=True)
    classes = list(classes or [])
    model = model.eval().to(device)
    infos, detections, failed = [], [], []

    def report(path: Path, error: Exception) -> None:
        # a DataError already names the file; anything else (a model failure) gets the name added
        message = str(error) if isinstance(error, DataError) else f"{path}: {type(error).__name__}: {error}"
        message = " ".join(message.split())  # one line per image
        failed.append({"path": str(path), "error": message})
        print(f"detect: {message}", file=sys.stderr)

    for start in range(0, len(inputs), batch_size):
        readable = []
        for k in range(start, min(start + batch_size, len(inputs))):
            try:
                readable.append((k, read_rgb(inputs[k], max_image_pixels)))
            except DataError as e:
                report(inputs[k], e)
        if not readable:
            continue
        predictions = _predict(model, [image for _, image in readable], torch.device(device))
        for (k, image), prediction in zip(readable, predictions):
            if isinstance(prediction, Exception):
                report(inputs[k], prediction)
                continue
            keep = prediction["scores"] >= score_threshold
            kept = {key: value[keep] for key, value in prediction.items()}
            height, width = image.shape[:2]
            infos.append({"file_name": file_names[k], "path": str(inputs[k]), "height": height, "width": width})
            detections.append(kept)
            if draw:
                save_png_atomic(draw_detections(image, kept, classes), image_dir / f"{stems[k]}.png")
    result = to_coco_json(infos, detections, _category_names(classes, detections))
    result.update(failed=failed, score_threshold=score_threshold)
    write_json_atomic(result, json_path)
    summary = {"images": len(infos), "detections": len(result["annotations"]), "failed": failed,
               "output": str(out_dir)}
    print(f"detect: {summary['images']} images, {summary['detections']} detections (score >= {score_threshold}), "
          f"{len(failed)} failed -> {out_dir}")
    return summary


def _category_names(classes: Sequence[str], detections: Sequence[dict]) -> list[str]:
    """``classes``, extended with ``class_<label>`` up to the largest label detected."""
    top = max((int(d["labels"].max()) for d in detections if len(d["labels"])), default=-1)
    return list(classes) + [f"class_{i}" for i in range(len(classes), top + 1)]


def draw_detections(image: np.ndarray, detection: dict, classes: Sequence[str]) -> torch.Tensor:
    """``[H, W, 3]`` uint8 image with the boxes, ``"<class> <score>"`` captions, one colour per class ->
    ``[3, H, W]`` uint8."""
    from torchvision.utils import draw_bounding_boxes

    canvas = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    labels = detection["labels"].tolist()
    if not labels:
        return canvas
    captions = [f"{classes[c] if c < len(classes) else f'class_{c}'} {s:.2f}"
                for c, s in zip(labels, detection["scores"].tolist())]
    colours = [BOX_COLOURS[c % len(BOX_COLOURS)] for c in labels]
    return draw_bounding_boxes(canvas, detection["boxes"], labels=captions, colors=colours, width=2)


# ---------------------------------------------------------------------------------------------------
# the trainer's task


class DetectionTask:
    """Object detection for the trainer: ``(image [3, H, W], {boxes, labels, difficult})`` samples, models
    with the torchvision detection API (losses from ``model(images, targets)``), mAP@0.5 as the metric.

    Recipe keys: ``data.kind`` ``voc`` (``data.root``) or ``coco`` (``data.images`` + ``data.annotations``);
    ``data.val_fraction`` (default 0.2, per-class :func:`fixed_split` with ``data.split_seed``, default 0;
    0 means no validation); ``data.img_size`` (square resize; none keeps the size); ``data.augment`` (see
    :data:`AUGMENT_DEFAULTS`); ``data.classes`` (label order; found in the annotations when absent and then
    written back into the recipe, so the run's ``config.yaml`` records it); ``data.max_image_pixels`` (images
    declaring more pixels are refused when the data set is built; default
    :data:`~visionattn.tasks.imageio.DEFAULT_MAX_IMAGE_PIXELS`).
    """

    name = "detection"
    primary_metric = "map_50"
    greater_is_better = True

    def build_datasets(self, cfg: dict, seed: int) -> tuple[Dataset, Dataset | None, dict]:
        data = cfg.setdefault("data", {})
        kind = data.get("kind", "voc")
        classes = data.get("classes")
        if kind == "voc":
            if not data.get("root"):
                raise ConfigError("data.root is required for data.kind=voc")
            full = VOCDetection(data["root"], "all", classes, max_image_pixels=data.get("max_image_pixels"))
        elif kind == "coco":
            if not data.get("images") or not data.get("annotations"):
                raise ConfigError("data.images and data.annotations are required for data.kind=coco")
            full = CocoDetection(data["images"], data["annotations"], max_image_pixels=data.get("max_image_pixels"))
            if classes is not None and list(classes) != full.classes:
                raise ConfigError(f"data.classes {list(classes)} differ from the categories of "
                                  f"{data['annotations']}: {full.classes}")
        else:
            raise ConfigError(f"data.kind must be 'voc' or 'coco' for detection, got {kind!r}")
        data["classes"] = list(full.classes)
        img_size = data.get("img_size")
        train_ids, val_ids = fixed_split(full.ids, float(data.get("val_fraction", 0.2)), int(data.get("split_seed", 0)))
        position = {image_id: i for i, image_id in enumerate(full.ids)}
        train = full.subset([position[i] for i in train_ids],
                            build_detection_transforms(img_size, True, data.get("augment")))
        val = None
        if val_ids:
            val = full.subset([position[i] for i in val_ids], build_detection_transforms(img_size, False))
        return SeededTransform(train, seed), val, {"classes": list(full.classes)}

    def build_model(self, cfg: dict, meta: dict) -> nn.Module:
        from visionattn.tasks.classification import build_model_from_recipe

        if cfg.get("loss"):
            raise ConfigError("detection models compute their own losses; remove the recipe's 'loss' section")
        spec = cfg.get("model") or {}
        asked = (spec.get("kwargs") or {}).get("num_classes", len(meta["classes"]))
        if "_target_" not in spec and asked != len(meta["classes"]):
            raise ConfigError(f"model.kwargs.num_classes={asked} but the data has "
                              f"{len(meta['classes'])} classes {meta['classes']}")
        return build_model_from_recipe(cfg, num_classes=len(meta["classes"]))

    def load_batch(self, dataset, indices: list[int], device) -> tuple[list[torch.Tensor], list[dict]]:
        """Images ``[3, H, W]`` and training targets ``{boxes [n, 4], labels [n]}`` on ``device``, difficult
        boxes left out."""
        images, targets = [], []
        for i in indices:
            image, target = dataset[i]
            keep = ~target["difficult"]
            images.append(image.to(device))
            targets.append({"boxes": target["boxes"][keep].to(device), "labels": target["labels"][keep].to(device)})
        return images, targets

    def training_loss(self, net, inputs: list[torch.Tensor], targets: list[dict], loss_fn) -> torch.Tensor:
        """The detector's own weighted total, ``net(images, targets)["loss"]`` (``loss_fn`` is always None:
        :meth:`build_model` refuses a recipe ``loss``)."""
        return net(inputs, targets)["loss"]

    @torch.no_grad()
    def evaluate(self, model, dataset, rank: int, world: int, device, autocast, batch_size: int) -> dict[str, float]:
        """:func:`evaluate_detections` over ``dataset``: each rank predicts every ``world``-th image, the
        predictions and targets are gathered, so every rank returns the same metrics."""
        import torch.distributed as dist

        indices = list(range(rank, len(dataset), world))
        predictions, targets = [], []
        for b in range(0, len(indices), batch_size):
            items = [dataset[i] for i in indices[b:b + batch_size]]
            with autocast():
                outputs = model([image.to(device) for image, _ in items])
            predictions += [{"boxes": o["boxes"].float().cpu(), "labels": o["labels"].cpu(),
                             "scores": o["scores"].float().cpu()} for o in outputs]
            targets += [target for _, target in items]
        if world > 1 and dist.is_available() and dist.is_initialized():
            gathered: list = [None] * world
            dist.all_gather_object(gathered, (predictions, targets))
            predictions = [p for part_p, _ in gathered for p in part_p]
            targets = [t for _, part_t in gathered for t in part_t]
        classes = getattr(dataset, "classes", None) or getattr(getattr(dataset, "dataset", None), "classes", None)
        return evaluate_detections(predictions, targets, classes)
