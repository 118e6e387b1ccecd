"""Image classification for the trainer: data sets from the recipe, the model, cross-entropy, top-1 accuracy.

A task object is the trainer's plug-in for one kind of problem; the trainer itself knows nothing about
images, labels or metrics. Every task has the methods of :class:`ClassificationTask`.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import ImageFolderClassification, NpzClassification, SeededTransform, build_transforms
from visionattn.tasks.runtime import all_reduce_sum, build_model_from_recipe


def build_datasets(cfg: dict, seed: int):
    """``(train, val or None, classes)`` from the recipe's ``data`` section (``image_folder`` or ``npz``)."""
    data = cfg.get("data") or {}
    kind = data.get("kind", "image_folder")
    img_size = int(data.get("img_size", 32))
    mean, std = data.get("mean", (0.5, 0.5, 0.5)), data.get("std", (0.5, 0.5, 0.5))
    gray = bool(data.get("grayscale_to_rgb", False))
    t_train = build_transforms(img_size, mean, std, True, data.get("augment"), gray)
    t_eval = build_transforms(img_size, mean, std, False, None, gray)
    if kind == "image_folder":
        root, vpc = data.get("root"), int(data.get("val_per_class", 0))
        if not root:
            raise ConfigError("data.root is required for data.kind=image_folder")
        limit = data.get("max_image_pixels")
        train = ImageFolderClassification(root, "train" if vpc else "all", vpc, t_train, max_image_pixels=limit)
        val = ImageFolderClassification(data.get("val_root", root), "val" if vpc else "all", vpc, t_eval,
                                        max_image_pixels=limit) if (vpc or data.get("val_root")) else None
    elif kind == "npz":
        path = data.get("path")
        if not path:
            raise ConfigError("data.path is required for data.kind=npz")
        train = NpzClassification(path, data.get("train_split", "train"), t_train)
        val = NpzClassification(path, data.get("val_split", "val"), t_eval)
    else:
        raise ConfigError(f"data.kind must be 'image_folder' or 'npz' for classification, got {kind!r}")
    return SeededTransform(train, seed), val, train.classes


class ClassificationTask:
    """Single-label classification: ``(image [3, H, W], class index)`` samples, top-1 accuracy."""

    name = "classification"
    primary_metric = "acc"
    greater_is_better = True

    def __init__(self, label_smoothing: float = 0.0):
        self.label_smoothing = label_smoothing

    def build_datasets(self, cfg: dict, seed: int):
        train, val, classes = build_datasets(cfg, seed)
        return train, val, {"classes": list(classes)}

    def build_model(self, cfg: dict, meta: dict) -> torch.nn.Module:
        return build_model_from_recipe(cfg, num_classes=len(meta["classes"]))

    def collate(self, items: list, device):
        """``x [B, 3, H, W]``, ``y [B]`` on ``device``."""
        x = torch.stack([it[0] for it in items]).to(device)
        y = torch.tensor([it[1] for it in items], device=device)
        return x, y

    def load_batch(self, dataset, indices: list[int], device):
        return self.collate([dataset[i] for i in indices], device)

    def training_loss(self, net, x, y, loss_fn: Callable | None) -> torch.Tensor:
        logits = net(x)
        if loss_fn is not None:
            return loss_fn(logits, y)
        return F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)

    @torch.no_grad()
    def evaluate(self, model, dataset, rank: int, world: int, device, autocast, batch_size: int) -> dict[str, float]:
        """Loss and top-1 accuracy over ``dataset``, each rank taking every ``world``-th sample, reduced."""
        idx = list(range(rank, len(dataset), world))
        loss_sum = correct = count = 0.0
        for b in range(0, len(idx), batch_size):
            x, y = self.load_batch(dataset, idx[b:b + batch_size], device)
            with autocast():
                logits = model(x).float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(1) == y).sum().item()
            count += len(y)
        loss_sum, correct, count = all_reduce_sum([loss_sum, correct, count], device)
        return {"loss": loss_sum / count, "acc": correct / count}
