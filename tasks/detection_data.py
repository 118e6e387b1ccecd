"""Object detection data: Pascal VOC and COCO readers with named errors, NEU-DET's fixed stratified split,
and bbox-aware augmentation (albumentations).

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
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import IMAGE_SUFFIXES
from visionattn.tasks.errors import DataError
from visionattn.tasks.imageio import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageError,
    bad_images_error,
    check_image,
    pixel_limit,
    read_image,
)

# (annotation folder, image folder): Pascal VOC's names, then NEU-DET's
VOC_LAYOUTS = (("Annotations", "JPEGImages"), ("ANNOTATIONS", "IMAGES"))
# data.augment keys: flip probabilities, affine range (scale 1 +- s, shift +- t of the size, applied with
# p=0.5), brightness/contrast limits (applied with p=0.5), and the visible fraction below which a box
# cut by the affine is dropped
AUGMENT_DEFAULTS = dict(hflip=0.5, vflip=0.0, scale=0.1, translate=0.05, brightness=0.2, contrast=0.2,
                        min_visibility=0.3)


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
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
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
