"""Contrastive denoising queries (DINO, as RT-DETR uses them): noised copies of the ground-truth boxes that
the decoder learns to reconstruct (positives) or to reject (negatives), and the attention mask that keeps
them apart from the matching queries and from each other."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torchvision.ops import box_convert

from visionattn.detectors.detr.boxes import cxcywh_to_xyxy, inverse_sigmoid

__all__ = ["DenoisingQueries", "build_denoising_queries"]


@dataclass
class DenoisingQueries:
    """Contrastive denoising queries for one batch.

    Attributes:
        class_embeds: ``[B, num_dn, C]`` embeddings of the (noised) labels.
        boxes_unact: ``[B, num_dn, 4]`` noised boxes, cxcywh in logit space.
        attn_mask: ``[num_dn + num_queries, num_dn + num_queries]``, True where attention is blocked.
        positive_idx: per image, the indices (into ``num_dn``) of the positive queries, group-major, so
            that ``positive_idx[i][g * n_i + j]`` reconstructs ground-truth box ``j`` of image ``i``.
        num_groups: denoising groups (each a positive and a negative copy of every box).
    """

    class_embeds: torch.Tensor
    boxes_unact: torch.Tensor
    attn_mask: torch.Tensor
    positive_idx: list[torch.Tensor]
    num_groups: int

    @property
    def num_queries(self) -> int:
        """``num_dn``, the denoising queries per image (``num_groups * 2 * max_boxes``)."""
        return self.class_embeds.shape[1]


def build_denoising_queries(
    targets: Sequence[dict[str, torch.Tensor]],
    num_classes: int,
    num_queries: int,
    class_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries | None:
    """RT-DETR's contrastive denoising groups (DINO-style), or None when no image has a box.

    Every ground-truth box is copied into ``num_groups = max(1, num_denoising // max_boxes)`` groups, each
    with a positive copy (corners moved by up to half the box size) and a negative copy (moved by 1-2x half
    the size), laid out per group as ``[positives (max_boxes), negatives (max_boxes)]``; images with fewer
    boxes are padded with the ``num_classes`` padding label. A quarter of the labels (``label_noise_ratio / 2``)
    are replaced by random classes. The attention mask keeps the matching queries from seeing the denoising
    queries, and the groups from seeing each other.

    Args:
        targets: per image ``labels [n_i]`` (int64) and ``boxes [n_i, 4]`` (cxcywh in 0..1).
        num_queries: the matching queries that follow the denoising ones (for the mask's size).
        class_embed: ``nn.Embedding(num_classes + 1, C, padding_idx=num_classes)``.
    """
    counts = [len(t["labels"]) for t in targets]
    max_boxes = max(counts, default=0)
    if max_boxes == 0 or num_denoising <= 0:
        return None
    device = class_embed.weight.device
    num_groups = max(1, num_denoising // max_boxes)
    B = len(targets)
    labels = torch.full((B, max_boxes), num_classes, dtype=torch.long, device=device)
    boxes = torch.zeros(B, max_boxes, 4, device=device)
    is_box = torch.zeros(B, max_boxes, dtype=torch.bool, device=device)
    for i, (t, n) in enumerate(zip(targets, counts)):
        labels[i, :n] = t["labels"]
        boxes[i, :n] = t["boxes"]
        is_box[i, :n] = True
    # [B, num_groups * 2 * max_boxes]: per group, positives then negatives
    labels = labels.repeat(1, 2 * num_groups)
    boxes = boxes.repeat(1, 2 * num_groups, 1)
    is_box = is_box.repeat(1, 2 * num_groups)
    is_negative = torch.zeros(2 * max_boxes, dtype=torch.bool, device=device)
    is_negative[max_boxes:] = True
    is_negative = is_negative.repeat(num_groups)  # [num_dn]
    positive_idx = [torch.nonzero(is_box[i] & ~is_negative).flatten() for i in range(B)]

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & is_box
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise_scale > 0:
        corners = cxcywh_to_xyxy(boxes)
        half_sizes = (boxes[..., 2:] * 0.5).repeat(1, 1, 2) * box_noise_scale
        signs = torch.randint(0, 2, boxes.shape, device=device).float() * 2 - 1
        # positives move by [0, 1), negatives by [1, 2) half sizes
        magnitudes = torch.rand(boxes.shape, device=device) + is_negative[:, None].float()
        corners = (corners + signs * magnitudes * half_sizes).clamp(0, 1)
        boxes = box_convert(corners, "xyxy", "cxcywh")

    num_dn = labels.shape[1]
    total = num_dn + num_queries
    attn_mask = torch.zeros(total, total, dtype=torch.bool, device=device)
    attn_mask[num_dn:, :num_dn] = True
    group_size = 2 * max_boxes
    for g in range(num_groups):
        rows = slice(g * group_size, (g + 1) * group_size)
        attn_mask[rows, :g * group_size] = True
        attn_mask[rows, (g + 1) * group_size:num_dn] = True
    return DenoisingQueries(class_embed(labels), inverse_sigmoid(boxes), attn_mask, positive_idx, num_groups)
