"""Hungarian matching of predictions to ground-truth boxes (one prediction per box, per image)."""
from __future__ import annotations

from typing import Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from visionattn.detectors.detr.boxes import cxcywh_to_xyxy

__all__ = ["HungarianMatcher"]


class HungarianMatcher(nn.Module):
    """One-to-one assignment of predictions to targets per image (``scipy.optimize.linear_sum_assignment``).

    cost = ``cost_class`` * focal class cost + ``cost_bbox`` * L1 (cxcywh) + ``cost_giou`` * (-GIoU), with the
    focal cost ``alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`` at each target's class.
    ``logits [B, Q, num_classes]``, ``boxes [B, Q, 4]`` cxcywh, targets per image ``labels [n_i]`` and
    ``boxes [n_i, 4]`` cxcywh -> per image ``(pred_idx [n_i], target_idx [n_i])`` int64.
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 alpha: float = 0.25, gamma: float = 2.0):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    @torch.no_grad()
    def cost_matrices(self, logits: torch.Tensor, boxes: torch.Tensor,
                      targets: Sequence[dict[str, torch.Tensor]]) -> list[torch.Tensor]:
        """Per image, the ``[Q, n_i]`` assignment cost."""
        costs = []
        for logit, box, t in zip(logits, boxes, targets):
            prob = logit.sigmoid()[:, t["labels"]]
            positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
            negative = (1 - self.alpha) * prob ** self.gamma * -(1 - prob + 1e-8).log()
            cost_l1 = torch.cdist(box, t["boxes"], p=1)
            cost_giou = -generalized_box_iou(cxcywh_to_xyxy(box), cxcywh_to_xyxy(t["boxes"]))
            costs.append(self.cost_class * (positive - negative) + self.cost_bbox * cost_l1
                         + self.cost_giou * cost_giou)
        return costs

    @torch.no_grad()
    def forward(self, logits: torch.Tensor, boxes: torch.Tensor,
                targets: Sequence[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        indices = []
        for cost in self.cost_matrices(logits, boxes, targets):
            rows, cols = linear_sum_assignment(cost.float().cpu().numpy())
            indices.append((torch.as_tensor(rows, dtype=torch.long, device=logits.device),
                            torch.as_tensor(cols, dtype=torch.long, device=logits.device)))
        return indices
