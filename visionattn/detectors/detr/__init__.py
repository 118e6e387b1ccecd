"""The DETR toolkit shared by the detector families (RT-DETR, DFIR-DETR), one concern per module:

- :mod:`~visionattn.detectors.detr.detector`: :class:`DETRDetector`, torchvision-style I/O (resize, normalise,
  losses in training, top-K detections in eval) around ``backbone -> encoder -> decoder``;
- :mod:`~visionattn.detectors.detr.backbone`: :class:`TimmBackbone`, a timm ``features_only`` model;
- :mod:`~visionattn.detectors.detr.encoder`: :class:`HybridEncoder` (projections, AIFI, the CCFM topology with
  the family's up/down/fusion operators);
- :mod:`~visionattn.detectors.detr.decoder`: :class:`DecoderConfig` and :class:`RTDETRDecoder` (IoU-aware query
  selection, multi-scale deformable attention, iterative box refinement);
- :mod:`~visionattn.detectors.detr.denoising`: contrastive denoising queries and their attention mask;
- :mod:`~visionattn.detectors.detr.matcher`: :class:`HungarianMatcher`;
- :mod:`~visionattn.detectors.detr.criterion`: varifocal + L1 + GIoU losses (:class:`RTDETRCriterion`);
- :mod:`~visionattn.detectors.detr.blocks` and :mod:`~visionattn.detectors.detr.boxes`: small layers and box helpers.

A family file builds its backbone and encoder, fills a :class:`DecoderConfig` and derives from
:class:`DETRDetector`; it registers no model here.
"""
from visionattn.detectors.detr.backbone import TimmBackbone
from visionattn.detectors.detr.blocks import MLP, ConvNormAct, RepVGGBlock
from visionattn.detectors.detr.boxes import cxcywh_to_xyxy, inverse_sigmoid
from visionattn.detectors.detr.criterion import RTDETRCriterion, varifocal_loss
from visionattn.detectors.detr.decoder import DecoderConfig, MSDeformableAttention, RTDETRDecoder
from visionattn.detectors.detr.denoising import DenoisingQueries, build_denoising_queries
from visionattn.detectors.detr.detector import DETRDetector
from visionattn.detectors.detr.encoder import AIFI, HybridEncoder
from visionattn.detectors.detr.matcher import HungarianMatcher

__all__ = [
    "AIFI", "ConvNormAct", "DETRDetector", "DecoderConfig", "DenoisingQueries", "HungarianMatcher", "HybridEncoder",
    "MLP", "MSDeformableAttention", "RTDETRCriterion", "RTDETRDecoder", "RepVGGBlock", "TimmBackbone",
    "build_denoising_queries", "cxcywh_to_xyxy", "inverse_sigmoid", "varifocal_loss",
]
