"""Object detection for the trainer: :class:`DetectionTask` (data from :mod:`~visionattn.tasks.detection_data`,
mAP from :mod:`~visionattn.tasks.detection_metrics`). The ``detect`` command is :mod:`visionattn.tasks.detect`.

NEU-DET has no official split; :func:`~visionattn.tasks.detection_data.fixed_split` makes the one the
recipes use: 20 % of each class chosen by a seeded shuffle, the same on every machine (1,200 training and
300 validation images of ``../shared/data/neu_det``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from visionattn.tasks.config import ConfigError
from visionattn.tasks.data import SeededTransform
from visionattn.tasks.detection_data import (
    CocoDetection,
    VOCDetection,
    build_detection_transforms,
    fixed_split,
)
from visionattn.tasks.detection_metrics import evaluate_detections
from visionattn.tasks.runtime import build_model_from_recipe


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
        if cfg.get("loss"):
            raise ConfigError("detection models compute their own losses; remove the recipe's 'loss' section")
        spec = cfg.get("model") or {}
        asked = (spec.get("kwargs") or {}).get("num_classes", len(meta["classes"]))
        if "_target_" not in spec and asked != len(meta["classes"]):
            raise ConfigError(f"model.kwargs.num_classes={asked} but the data has "
                              f"{len(meta['classes'])} classes {meta['classes']}")
        return build_model_from_recipe(cfg, num_classes=len(meta["classes"]))

    def load_batch(self, dataset, indices: list[int], device) -> tuple[list[torch.Tensor], list[dict]]:
        return self.collate([dataset[i] for i in indices], device)

    def collate(self, items: list, device) -> tuple[list[torch.Tensor], list[dict]]:
        """Images ``[3, H, W]`` and training targets ``{boxes [n, 4], labels [n]}`` on ``device``, difficult
        boxes left out."""
        images, targets = [], []
        for image, target in items:
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
