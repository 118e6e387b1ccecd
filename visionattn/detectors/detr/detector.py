"""``DETRDetector``: torchvision-style detection I/O around ``backbone -> encoder -> decoder -> losses``,
the model class every DETR family derives from (each supplies its backbone and encoder)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

from visionattn.detectors.detr.boxes import cxcywh_to_xyxy
from visionattn.detectors.detr.criterion import RTDETRCriterion
from visionattn.detectors.detr.decoder import DecoderConfig, RTDETRDecoder

__all__ = ["DETRDetector", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DETRDetector(nn.Module):
    """A DETR-style detector: resizes and normalises images, runs ``backbone -> encoder ->`` the shared
    :class:`~visionattn.detectors.detr.decoder.RTDETRDecoder`, and returns losses or detections.

    Args:
        backbone: ``[B, C, S, S]`` -> list of per-level maps; must have ``out_channels`` (one per level).
        encoder: that list -> a list of ``[B, decoder.hidden_dim, H_l, W_l]`` maps, same levels.
        num_classes: object classes (labels ``0..num_classes-1``, no background class).
        decoder: the decoder's sizes and denoising (:class:`DecoderConfig`); built here with
            :class:`~visionattn.detectors.detr.criterion.RTDETRCriterion` as the losses.
        input_size: the square side ``S`` images are resized to (a multiple of 32).
        max_detections: detections returned per image in eval.
        in_chans: image channels ``C`` (3: RGB, normalised with ImageNet's mean and std; any other count is
            normalised with the mean of those, per channel, as timm adapts a stem to ``in_chans``).

    ``forward(images, targets=None)``:
        images: list of ``[C, H_i, W_i]`` float images in 0..1 (sizes may differ) or a ``[B, C, H, W]`` batch;
            each is resized to ``input_size`` x ``input_size`` and normalised (see ``in_chans``).
        targets (training): per image ``boxes [n_i, 4]`` (xyxy pixels of that image) and ``labels [n_i]``
            (int64 in ``[0, num_classes)``); images without boxes are allowed.
    Returns:
        training: ``dict(loss, loss_vfl, loss_bbox, loss_giou)`` (scalars; ``loss`` is the sum of the other
            three, each already weighted and summed over all decoder layers, the encoder and denoising);
        eval: per image ``dict(boxes [K, 4] xyxy pixels, labels [K] int64, scores [K])``, the top
            ``max_detections`` (query, class) pairs sorted by score.
    """

    def __init__(self, backbone: nn.Module, encoder: nn.Module, num_classes: int,
                 decoder: DecoderConfig = DecoderConfig(), input_size: int = 640, max_detections: int = 300,
                 in_chans: int = 3):
        super().__init__()
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32 (the deepest stride), got {input_size}")
        self.backbone, self.encoder = backbone, encoder
        self.decoder = RTDETRDecoder(num_classes, [decoder.hidden_dim] * len(backbone.out_channels), decoder)
        self.criterion = RTDETRCriterion(num_classes)
        self.num_classes = num_classes
        self.input_size = input_size
        self.img_size = (input_size, input_size)  # read by visionattn.model_info for its FLOPs input
        self.max_detections = max_detections
        self.in_chans = in_chans
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if in_chans == 3 else \
            ((sum(IMAGENET_MEAN) / 3,) * in_chans, (sum(IMAGENET_STD) / 3,) * in_chans)
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, in_chans, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, in_chans, 1, 1), persistent=False)

    def preprocess(self, images: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Resized, normalised batch ``[B, C, S, S]`` and the original sizes ``[B, 2]`` as ``(H, W)``."""
        size = (self.input_size, self.input_size)
        batch, sizes = [], []
        for image in images:
            if image.dim() != 3 or image.shape[0] != self.in_chans:
                raise ValueError(f"expected images of shape [{self.in_chans}, H, W] (in_chans={self.in_chans}), "
                                 f"got {tuple(image.shape)}")
            sizes.append(image.shape[-2:])
            if tuple(image.shape[-2:]) != size:
                image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False, antialias=True)[0]
            batch.append(image)
        batch = (torch.stack(batch) - self.pixel_mean) / self.pixel_std
        return batch, torch.tensor([list(s) for s in sizes], dtype=batch.dtype, device=batch.device)

    @staticmethod
    def normalize_targets(targets: Sequence[dict[str, torch.Tensor]],
                          sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Targets with boxes as cxcywh fractions of their image (so resizing leaves them unchanged)."""
        normalized = []
        for t, (h, w) in zip(targets, sizes):
            scale = torch.stack([w, h, w, h]).to(t["boxes"].device)
            boxes = box_convert(t["boxes"].to(scale.dtype).reshape(-1, 4) / scale, "xyxy", "cxcywh").clamp(0, 1)
            normalized.append({"boxes": boxes, "labels": t["labels"].long().reshape(-1)})
        return normalized

    def postprocess(self, logits: torch.Tensor, boxes: torch.Tensor,
                    sizes: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """Top ``max_detections`` (query, class) pairs per image; boxes scaled to, and clipped inside, each image.
        ``logits [B, Q, K]``, ``boxes [B, Q, 4]`` cxcywh 0..1, ``sizes [B, 2]``."""
        B, Q, K = logits.shape
        scores, flat_idx = logits.sigmoid().flatten(1).topk(min(self.max_detections, Q * K), dim=1)
        labels, query_idx = flat_idx % K, flat_idx // K
        detections = []
        for i in range(B):
            h, w = sizes[i]
            image_corner = torch.stack([w, h, w, h])
            xyxy = torch.minimum((cxcywh_to_xyxy(boxes[i, query_idx[i]]) * image_corner).clamp(min=0), image_corner)
            detections.append({"boxes": xyxy, "labels": labels[i], "scores": scores[i]})
        return detections

    def forward(self, images: Sequence[torch.Tensor] | torch.Tensor,
                targets: Sequence[dict[str, torch.Tensor]] | None = None):
        batch, sizes = self.preprocess(list(images))
        if self.training:
            if targets is None or len(targets) != len(batch):
                raise ValueError("in training mode the detector needs one target dict per image")
            targets = self.normalize_targets(targets, sizes)
        features = self.encoder(self.backbone(batch))
        outputs = self.decoder(features, targets if self.training else None)
        if self.training:
            return self.criterion(outputs, targets)
        return self.postprocess(outputs["logits"][-1], outputs["boxes"][-1], sizes)
