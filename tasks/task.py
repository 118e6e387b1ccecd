"""The task plug-in contract and the task registry.

A task is what the trainer and the commands need to know about one kind of problem: its data sets, its
model, its loss and its metrics. The trainer (:mod:`visionattn.tasks.trainer`) knows nothing about images,
labels or boxes; it drives a :class:`Task` named by the recipe's ``task:`` key. Task plug-ins build on
:mod:`visionattn.tasks.runtime` and never import the trainer, so ``visionattn.tasks`` has no import cycle
(``tests/test_architecture.py`` checks the import graph).
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch

from visionattn.tasks.config import TASKS, ConfigError


@runtime_checkable
class Task(Protocol):
    """What every task plug-in provides (classification, segmentation, detection)."""

    name: str  # the recipe's ``task:`` value
    primary_metric: str  # the validation metric that picks ``best.safetensors``
    greater_is_better: bool

    def build_datasets(self, cfg: dict, seed: int) -> tuple[Any, Any | None, dict]:
        """``(train set, validation set or None, meta)``; ``meta["classes"]`` names the classes (labels)."""

    def build_model(self, cfg: dict, meta: dict) -> torch.nn.Module:
        """The recipe's model for ``meta`` (e.g. as many outputs as classes)."""

    def collate(self, samples: list, device: torch.device) -> tuple[Any, Any]:
        """Inputs and targets of a batch of samples (``dataset[i]`` each), on ``device``."""

    def load_batch(self, dataset: Any, indices: list[int], device: torch.device) -> tuple[Any, Any]:
        """Inputs and targets of the samples ``indices``: :meth:`collate` of ``[dataset[i] for i in indices]``."""

    def training_loss(self, net: torch.nn.Module, x: Any, y: Any, loss_fn: Callable | None) -> torch.Tensor:
        """The scalar loss of one batch (``loss_fn``: the recipe's ``loss``, if any)."""

    def evaluate(self, model: torch.nn.Module, dataset: Any, rank: int, world: int, device: torch.device,
                 autocast: Callable, batch_size: int) -> dict[str, float]:
        """Validation metrics over ``dataset`` (each rank a share, reduced: the same on every rank)."""


def get_task(cfg: dict) -> Task:
    """The task plug-in named by the recipe's ``task:`` (default ``classification``); imported on demand, so a
    classification run never imports MONAI's or the detectors' dependencies."""
    name = cfg.get("task", "classification")
    if name == "classification":
        from visionattn.tasks.classification import ClassificationTask

        return ClassificationTask(label_smoothing=float((cfg.get("train") or {}).get("label_smoothing", 0.0)))
    if name == "segmentation":
        from visionattn.tasks.segmentation import SegmentationTask

        return SegmentationTask()
    if name == "detection":
        from visionattn.tasks.detection import DetectionTask

        return DetectionTask()
    raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {name!r}")
