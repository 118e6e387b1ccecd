"""RT-DETR's losses: varifocal (classification, IoU-aware) + L1 + GIoU (boxes), on every decoder layer,
the encoder's top-K proposals (both Hungarian-matched) and the denoising queries (matched by construction)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from visionattn.detectors.detr.boxes import cxcywh_to_xyxy
from visionattn.detectors.detr.denoising import DenoisingQueries
from visionattn.detectors.detr.matcher import HungarianMatcher

__all__ = ["RTDETRCriterion", "varifocal_loss"]


def varifocal_loss(logits: torch.Tensor, target_scores: torch.Tensor, is_positive: torch.Tensor,
                   alpha: float = 0.75, gamma: float = 2.0) -> torch.Tensor:
    """Varifocal loss (VarifocalNet, as RT-DETR uses it), summed over all elements.

    ``BCE(logits, q)`` weighted by ``alpha * p^gamma`` on negatives and by the target score ``q`` on
    positives, where ``q`` is the IoU of the matched box at its class (0 elsewhere) and ``p = sigmoid``
    (detached). ``logits, target_scores, is_positive [..., num_classes]`` -> scalar.
    """
    prob = logits.detach().sigmoid()
    weight = alpha * prob.pow(gamma) * (~is_positive) + target_scores
    return F.binary_cross_entropy_with_logits(logits, target_scores, weight=weight, reduction="sum")


class RTDETRCriterion(nn.Module):
    """Hungarian-matched varifocal + L1 + GIoU losses over every supervised output.

    Supervised: each decoder layer, the encoder's top-K (both matched with :class:`HungarianMatcher`) and
    each layer's denoising queries (matched by construction). Each term is ``sum / num_boxes`` (``num_boxes``
    times the denoising groups for the denoising outputs).

    ``forward(outputs, targets)``: ``outputs`` the decoder's dict (:class:`~visionattn.detectors.detr.decoder.
    RTDETRDecoder`), ``targets`` per image ``labels [n_i]`` and ``boxes [n_i, 4]`` (cxcywh 0..1) ->
    ``dict(loss, loss_vfl, loss_bbox, loss_giou)``: the three weighted terms summed over all outputs, and
    ``loss`` their total (scalars).
    """

    def __init__(self, num_classes: int, matcher: HungarianMatcher | None = None, weight_vfl: float = 1.0,
                 weight_bbox: float = 5.0, weight_giou: float = 2.0, alpha: float = 0.75, gamma: float = 2.0):
        super().__init__()
        self.num_classes = num_classes
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weights = {"loss_vfl": weight_vfl, "loss_bbox": weight_bbox, "loss_giou": weight_giou}
        self.alpha, self.gamma = alpha, gamma

    def output_losses(self, logits: torch.Tensor, boxes: torch.Tensor, targets: Sequence[dict[str, torch.Tensor]],
                      indices: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      num_boxes: float) -> dict[str, torch.Tensor]:
        """Unweighted losses of one output: ``logits [B, Q, K]``, ``boxes [B, Q, 4]`` and the matches."""
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        pred_idx = torch.cat([src for src, _ in indices])
        matched_boxes = boxes[batch_idx, pred_idx]
        target_boxes = torch.cat([t["boxes"][tgt] for t, (_, tgt) in zip(targets, indices)])
        target_labels = torch.cat([t["labels"][tgt] for t, (_, tgt) in zip(targets, indices)])

        matched_xyxy, target_xyxy = cxcywh_to_xyxy(matched_boxes), cxcywh_to_xyxy(target_boxes)
        ious = box_iou(matched_xyxy.detach(), target_xyxy).diagonal()
        is_positive = torch.zeros_like(logits, dtype=torch.bool)
        is_positive[batch_idx, pred_idx, target_labels] = True
        target_scores = torch.zeros_like(logits)
        target_scores[batch_idx, pred_idx, target_labels] = ious.to(logits.dtype)
        return {
            "loss_vfl": varifocal_loss(logits, target_scores, is_positive, self.alpha, self.gamma) / num_boxes,
            "loss_bbox": F.l1_loss(matched_boxes, target_boxes, reduction="sum") / num_boxes,
            "loss_giou": generalized_box_iou_loss(matched_xyxy, target_xyxy, reduction="sum") / num_boxes,
        }

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        num_boxes = max(1.0, float(sum(len(t["labels"]) for t in targets)))
        totals = {name: outputs["logits"][-1].new_zeros(()) for name in self.weights}

        def add(losses: dict[str, torch.Tensor]) -> None:
            for name, value in losses.items():
                totals[name] = totals[name] + self.weights[name] * value

        matched = list(zip(outputs["logits"], outputs["boxes"])) + [(outputs["enc_logits"], outputs["enc_boxes"])]
        for logits, boxes in matched:
            add(self.output_losses(logits, boxes, targets, self.matcher(logits, boxes, targets), num_boxes))

        dn: DenoisingQueries | None = outputs.get("dn")
        if dn is not None:
            dn_indices = [(pos, torch.arange(len(t["labels"]), device=pos.device).repeat(dn.num_groups))
                          for pos, t in zip(dn.positive_idx, targets)]
            for logits, boxes in zip(outputs["dn_logits"], outputs["dn_boxes"]):
                add(self.output_losses(logits, boxes, targets, dn_indices, num_boxes * dn.num_groups))
        return dict(loss=sum(totals.values()), **totals)
