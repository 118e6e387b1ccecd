"""Data sets for the trainer (classification here; segmentation and detection in their task modules), with clear errors for bad data and deterministic augmentation.

Augmentation randomness is seeded per ``(seed, epoch, index)`` (:class:`SeededTransform`), so a sample
looks the same whatever the number of workers or processes, and a run resumed mid-epoch sees exactly the
images the uninterrupted run saw.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from visionattn.tasks.errors import DataError
from visionattn.tasks.imageio import check_images, pixel_limit, read_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}


class ImageFolderClassification(Dataset):
    """``root/<class>/<image>`` folders (classes sorted by name), optionally a deterministic split.

    Args:
        root: the folder. split: ``'all'``, ``'train'`` or ``'val'``; ``val_per_class`` images of each class
            (the last ones in sorted order) form ``'val'``, the rest ``'train'``.
        transform: applied to the PIL image (RGB, 8 bits per sample). Returns ``(image, label)``.
        max_image_pixels: images whose header declares more pixels are refused (``None``: the default,
            :data:`~visionattn.tasks.imageio.DEFAULT_MAX_IMAGE_PIXELS`).

    The headers of the split's images are checked here (readable, within ``max_image_pixels``; nothing is
    decoded), and one :class:`DataError` lists every bad file, so training does not stop mid-run on one.
    """

    def __init__(self, root: str, split: str = "all", val_per_class: int = 0, transform: Callable | None = None,
                 max_image_pixels: int | None = None):
        self.max_image_pixels = pixel_limit(max_image_pixels)
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data set folder not found: {self.root}")
        if split not in ("all", "train", "val"):
            raise DataError(f"split must be 'all', 'train' or 'val', got {split!r}")
        self.classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        if not self.classes:
            raise DataError(f"{self.root} holds no class folders (expected root/<class>/<image files>)")
        self.samples: list[tuple[Path, int]] = []
        for label, cls in enumerate(self.classes):
            files = sorted(p for p in (self.root / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"class folder {self.root / cls} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            if split != "all":
                if val_per_class >= len(files):
                    raise DataError(f"val_per_class={val_per_class} leaves no training images in {self.root / cls}")
                files = files[-val_per_class:] if split == "val" else files[: len(files) - val_per_class]
            self.samples += [(f, label) for f in files]
        check_images([f for f, _ in self.samples], self.max_image_pixels, str(self.root))
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        from PIL import Image

        path, label = self.samples[index]
        image = Image.fromarray(read_image(path, "RGB", self.max_image_pixels))  # ImageError names the file
        return (self.transform(image) if self.transform else image), label


class NpzClassification(Dataset):
    """MedMNIST-style ``.npz`` (``<split>_images`` uint8 ``[N, H, W(, C)]``, ``<split>_labels`` ``[N, 1]``).
    Returns ``(image, label)`` with the image as a PIL image for the transform."""

    def __init__(self, path: str, split: str = "train", transform: Callable | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data file not found: {self.path}")
        try:
            data = np.load(self.path)
        except Exception as e:
            raise DataError(f"cannot read {self.path} as .npz: {e}") from e
        keys = (f"{split}_images", f"{split}_labels")
        missing = [k for k in keys if k not in data]
        if missing:
            raise DataError(f"{self.path} has no {missing} (keys: {sorted(data.files)})")
        self.images, self.labels = data[keys[0]], data[keys[1]].reshape(-1).astype(np.int64)
        if len(self.images) != len(self.labels):
            raise DataError(f"{self.path}: {len(self.images)} images but {len(self.labels)} labels for split {split!r}")
        if len(self.images) == 0:
            raise DataError(f"{self.path}: split {split!r} is empty")
        self.classes = [str(c) for c in sorted(set(self.labels.tolist()))]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image

        image = Image.fromarray(self.images[index])
        return (self.transform(image) if self.transform else image), int(self.labels[index])


class SeededTransform(Dataset):
    """Wraps a data set so that each sample's random augmentation is seeded by ``(seed, epoch, index)``."""

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item_seed = ((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) % 2**32
        py_state, np_state = random.getstate(), np.random.get_state()
        try:  # torch, numpy and python generators all seeded, and restored afterwards
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed)
                random.seed(item_seed)
                np.random.seed(item_seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class EpochBatches:
    """The batches of one epoch: a permutation seeded by ``(seed, epoch)``, cut into global batches; with
    ``world_size > 1`` each rank takes its share of every global batch (so one process with batch B and N
    processes with batch B/N see the same samples per step)."""

    def __init__(self, n: int, global_batch: int, seed: int, shuffle: bool = True, drop_last: bool = True,
                 rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise DataError(f"batch size {global_batch} must be divisible by the number of processes {world_size}")
        self.n, self.global_batch, self.seed, self.shuffle, self.drop_last = n, global_batch, seed, shuffle, drop_last
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return self.n // self.global_batch if self.drop_last else math.ceil(self.n / self.global_batch)

    def batches(self, epoch: int) -> list[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        out = []
        for b in range(len(self)):
            batch = order[b * self.global_batch:(b + 1) * self.global_batch]
            per = math.ceil(len(batch) / self.world_size)
            out.append(batch[self.rank * per:(self.rank + 1) * per])
        return out


CLASSIFICATION_AUGMENT_KEYS = ("crop_padding", "hflip")


def build_transforms(img_size: int, mean: Sequence[float], std: Sequence[float], train: bool,
                     augment: dict[str, Any] | None = None, grayscale_to_rgb: bool = False):
    """torchvision v2 pipeline: (random crop with padding, horizontal flip) for training, then tensor + normalise.
    ``augment`` (``data.augment``): ``crop_padding`` (pixels, default 4; 0: no crop) and ``hflip`` (default true)."""
    from torchvision.transforms import v2

    from visionattn.tasks.config import ConfigError

    augment = augment or {}
    unknown = [k for k in augment if k not in CLASSIFICATION_AUGMENT_KEYS]
    if unknown:
        raise ConfigError(f"data.augment: unknown key(s) {unknown} for classification; known: "
                          f"{list(CLASSIFICATION_AUGMENT_KEYS)}")
    padding = augment.get("crop_padding", 4)
    if isinstance(padding, bool) or not isinstance(padding, int) or not 0 <= padding <= img_size:
        raise ConfigError(f"data.augment.crop_padding must be a whole number of pixels from 0 to data.img_size "
                          f"({img_size}), got {padding!r}")
    if not isinstance(augment.get("hflip", True), bool):
        raise ConfigError(f"data.augment.hflip must be true or false, got {augment['hflip']!r}")
    ops: list = [v2.PILToTensor()]
    if grayscale_to_rgb:
        ops.append(v2.Grayscale(num_output_channels=3))
    ops.append(v2.Resize((img_size, img_size), antialias=True))
    if train:
        if padding:
            ops.append(v2.RandomCrop(img_size, padding=padding, padding_mode="reflect"))
        if augment.get("hflip", True):
            ops.append(v2.RandomHorizontalFlip())
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)
