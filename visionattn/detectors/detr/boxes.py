"""Box helpers of the DETR toolkit. Boxes inside the detectors are ``(cx, cy, w, h)`` fractions of the
resized image, in ``[0, 1]``; the decoder refines them in logit space (``inverse_sigmoid``)."""
from __future__ import annotations

import torch
from torchvision.ops import box_convert

__all__ = ["cxcywh_to_xyxy", "inverse_sigmoid"]


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``log(x / (1 - x))`` with ``x`` clamped to ``[eps, 1 - eps]``; any shape."""
    x = x.clamp(0, 1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    """``[..., 4]`` centre-size boxes to corner boxes ``(x1, y1, x2, y2)``."""
    return box_convert(boxes, "cxcywh", "xyxy")
